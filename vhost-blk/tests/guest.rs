//! Real QEMU guests (TCG) whose disk is served by rewind-blk, booted with the
//! command line kept in qemu-configs/vhost-user-blk.args. The guest (a
//! Debian cloud kernel and a busybox initramfs, built by
//! guest-tests/build.sh) runs a shell script and the checks happen inside it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::client::{pattern, Client};
use common::guest::{assert_passed, boot, boot_allowing_reboot, boot_until, boot_watching, field};
use common::replication::Pair;
use common::{wait_until, workspace, Controlled, Server, TestVolume};
use serde_json::{json, Value};

/// Writes a pattern with O_DIRECT and fsync, reads it back, makes a
/// filesystem, fills it, remounts it; 2 vCPUs on 2 queues.
const FIRST_BOOT: &str = r#"
echo "SIZE: $(cat /sys/block/vda/size)"
echo "QUEUES: $(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=4096 seek=12288 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=4096 skip=12288 count=256 iflag=direct 2>/dev/null
cmp /tmp/pat /tmp/back
echo "PATTERN: $(md5sum < /tmp/pat | cut -d' ' -f1)"
mke2fs -q /dev/vda 32768
mount /dev/vda /mnt
for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=8 2>/dev/null; done
(cd /mnt && md5sum f*) > /tmp/sums
umount /mnt
mount /dev/vda /mnt
(cd /mnt && md5sum -c /tmp/sums) >/dev/null
umount /mnt
sed 's/^/SUM: /' /tmp/sums
"#;

#[test]
fn a_guest_keeps_its_data_and_filesystem_across_a_daemon_restart() {
    let vol = TestVolume::create("64M");
    let mut server = Server::start(&vol, &["--num-queues", "2"]);
    let console = boot(&vol.socket, 2, 2, FIRST_BOOT);
    assert_passed(&console);
    assert_eq!(field(&console, "SIZE"), ((64u64 << 20) / 512).to_string());
    assert_eq!(field(&console, "QUEUES"), "2", "both queues in use");
    let pattern = field(&console, "PATTERN").to_string();
    let sums: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("SUM: ").map(|(_, s)| s.trim()))
        .collect();
    assert_eq!(sums.len(), 8, "{console}");
    assert!(server.stop().success(), "rewind-blk exits 0 on SIGTERM");

    // A new daemon on the same volume; a new guest checks everything.
    let _server = Server::start(&vol, &["--num-queues", "1"]);
    let second = format!(
        r#"
dd if=/dev/vda of=/tmp/back bs=4096 skip=12288 count=256 iflag=direct 2>/dev/null
[ "$(md5sum < /tmp/back | cut -d' ' -f1)" = "{pattern}" ]
mount /dev/vda /mnt
cat > /tmp/sums <<'SUMS'
{sums}
SUMS
(cd /mnt && md5sum -c /tmp/sums)
umount /mnt
echo "CHECKED: yes"
"#,
        sums = sums.join("\n")
    );
    let console = boot(&vol.socket, 1, 1, &second);
    assert_passed(&console);
    assert_eq!(field(&console, "CHECKED"), "yes");
}

#[test]
fn the_libvirt_domain_xml_validates() {
    let xml = workspace().join("qemu-configs/libvirt-domain.xml");
    let out = match Command::new("virt-xml-validate")
        .arg(&xml)
        .arg("domain")
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("cannot run virt-xml-validate ({e}): install libvirt-clients"),
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&xml).expect("xml");
    assert!(text.contains("type='vhostuser'") && text.contains("<source type='memfd'/>"));
}

/// Writes in chunks; the daemon is killed (SIGKILL) after the third chunk
/// and started again. QEMU reconnects and resubmits what was not completed;
/// the guest must see no error and read back exactly what it wrote.
const WRITE_THROUGH_A_KILL: &str = r#"
dd if=/dev/urandom of=/tmp/pat bs=1M count=16 2>/dev/null
i=0
while [ $i -lt 16 ]; do
  dd if=/tmp/pat of=/dev/vda bs=64k count=16 skip=$((i * 16)) seek=$((i * 16)) oflag=direct 2>/dev/null
  echo "CHUNK: $i"
  i=$((i + 1))
done
sync
dd if=/dev/vda of=/tmp/back bs=1M count=16 iflag=direct 2>/dev/null
cmp /tmp/pat /tmp/back
echo "SURVIVED: yes"
"#;

#[test]
fn a_guest_writing_through_a_daemon_kill_sees_no_error_and_no_loss() {
    let vol = TestVolume::create("64M");
    let mut server = Some(Server::start(&vol, &["--num-queues", "2"]));
    let mut restarted = false;
    let console = boot_watching(&vol.socket, 2, 2, WRITE_THROUGH_A_KILL, |line| {
        if line.starts_with("CHUNK: 2") && !restarted {
            let mut old = server.take().expect("server");
            assert!(!old.kill().success(), "killed by SIGKILL");
            server = Some(Server::start(&vol, &["--num-queues", "2"]));
            restarted = true;
        }
    });
    assert!(restarted, "the guest never reached chunk 2:\n{console}");
    assert_passed(&console);
    assert_eq!(field(&console, "SURVIVED"), "yes");
}

/// First boot: data, its checksum and a marker, then `reboot -f` (the
/// device is reset on the same connection). Second boot: checks them.
const REBOOT: &str = r#"
if [ "$(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 6)" = "REBOOT" ]; then
  want=$(dd if=/dev/vda bs=512 skip=101 count=1 2>/dev/null | head -c 32)
  got=$(dd if=/dev/vda bs=4096 skip=1000 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ]
  echo "REBOOTED: yes"
else
  dd if=/dev/urandom of=/dev/vda bs=4096 seek=1000 count=64 oflag=direct conv=fsync 2>/dev/null
  dd if=/dev/vda bs=4096 skip=1000 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1 | head -c 32 > /tmp/sum
  dd if=/tmp/sum of=/dev/vda bs=512 seek=101 conv=sync,fsync 2>/dev/null
  printf REBOOT > /tmp/mark
  dd if=/tmp/mark of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null
  echo "REBOOTING: now"
  reboot -f
fi
"#;

#[test]
fn a_guest_reboot_resets_the_device_and_keeps_the_data() {
    let vol = TestVolume::create("64M");
    let _server = Server::start(&vol, &["--num-queues", "1"]);
    let console = boot_allowing_reboot(&vol.socket, REBOOT);
    assert_eq!(field(&console, "REBOOTING"), "now", "{console}");
    assert_passed(&console);
    assert_eq!(field(&console, "REBOOTED"), "yes");
}

impl Controlled {
    /// Drain, revert to `at`, resume; returns the revert record's lsn.
    fn revert(&self, at: &str) -> u64 {
        self.wait_detached();
        self.ctl("drain", Value::Null);
        let reverted = self.ctl("revert", json!({ "at": at }));
        self.ctl("resume", Value::Null);
        reverted["lsn"].as_u64().expect("lsn")
    }
}

fn now_rfc3339() -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    rewind_journal::format_ns(ns)
}

/// md5 of `len` bytes at the start of `file`, as the guest's md5sum prints it.
fn md5_head(file: &Path, len: usize) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c {len} \"$0\" | md5sum | cut -d' ' -f1"))
        .arg(file)
        .output()
        .expect("md5sum");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// 1 MiB pattern P1, a pause (the host notes the time T), then 256 KiB
/// of P2 over its start.
const TWO_PATTERNS: &str = r#"
dd if=/dev/urandom of=/tmp/p1 bs=64k count=16 2>/dev/null
dd if=/tmp/p1 of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null
echo "P1: $(md5sum < /tmp/p1 | cut -d' ' -f1)"
echo "WRITTEN: p1"
sleep 3
dd if=/dev/urandom of=/tmp/p2 bs=64k count=4 2>/dev/null
dd if=/tmp/p2 of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null
echo "P2: $(md5sum < /tmp/p2 | cut -d' ' -f1)"
"#;

/// Runs TWO_PATTERNS; returns (T, P1's md5, P2's md5).
fn two_patterns(vol: &TestVolume) -> (String, String, String) {
    let mut at = None;
    let console = boot_watching(&vol.socket, 1, 1, TWO_PATTERNS, |line| {
        if line.contains("WRITTEN: p1") {
            at = Some(now_rfc3339());
        }
    });
    assert_passed(&console);
    let at = at.expect("T");
    (
        at,
        field(&console, "P1").to_owned(),
        field(&console, "P2").to_owned(),
    )
}

/// The guest's check that the disk starts with `len` bytes whose md5 is `md5`.
fn check_head(len_64k: u32, md5: &str) -> String {
    format!(
        r#"
[ "$(dd if=/dev/vda bs=64k count={len_64k} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "{md5}" ]
echo "CHECKED: yes"
"#
    )
}

#[test]
fn materialize_at_a_moment_between_two_writes_yields_the_first_online_and_offline() {
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    let (at, p1, _) = two_patterns(&vol);
    let online = vol.dir.path().join("online.raw");
    let done = daemon.ctl("materialize", json!({"at": at, "output": online}));
    assert_eq!(done["size"], 64 << 20);
    assert_eq!(
        md5_head(&online, 1 << 20),
        p1,
        "the disk at T is the first pattern"
    );
    assert!(daemon.server.stop().success());

    let offline = vol.dir.path().join("offline.raw");
    rewind_ctl::materialize_offline(&vol.path, &at, &offline, &mut |_, _| {})
        .expect("offline materialize");
    let (a, b) = (
        std::fs::read(&online).expect("online"),
        std::fs::read(&offline).expect("offline"),
    );
    assert!(a == b, "online and offline images differ");
}

#[test]
fn a_scratch_export_boots_a_second_guest_at_t_and_leaves_the_live_disk_alone() {
    let vol = TestVolume::create("64M");
    let daemon = Controlled::start(&vol);
    let (at, p1, p2) = two_patterns(&vol);
    let view = vol.dir.path().join("view.sock");
    let exported = daemon.ctl(
        "export",
        json!({"at": at, "socket_path": view, "scratch": true}),
    );
    assert_eq!(exported["writable"], true);
    let script = format!(
        "{}\n{}",
        check_head(16, &p1),
        r#"
dd if=/dev/urandom of=/tmp/p3 bs=64k count=4 2>/dev/null
dd if=/tmp/p3 of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null
[ "$(dd if=/dev/vda bs=64k count=4 iflag=direct 2>/dev/null | md5sum)" = "$(md5sum < /tmp/p3)" ]
echo "WROTE: yes"
"#
    );
    let console = boot(&view, 1, 1, &script);
    assert_passed(&console);
    assert_eq!(field(&console, "WROTE"), "yes");
    daemon.ctl("unexport", json!({"socket_path": view}));
    assert!(!view.exists());

    let live = vol.dir.path().join("live.raw");
    let last = daemon.status()["last_lsn"].as_u64().expect("last_lsn");
    daemon.ctl(
        "materialize",
        json!({"at": format!("lsn:{last}"), "output": live}),
    );
    assert_eq!(md5_head(&live, 256 << 10), p2, "the live disk is untouched");
}

#[test]
fn a_revert_boots_as_at_t_and_reverting_to_just_before_it_undoes_it() {
    let vol = TestVolume::create("64M");
    let daemon = Controlled::start(&vol);
    let (at, p1, p2) = two_patterns(&vol);
    let serving = daemon
        .try_ctl("revert", json!({ "at": at }))
        .expect_err("revert while serving");
    assert!(serving.to_string().contains("drain"), "{serving}");

    let revert_lsn = daemon.revert(&at);
    let console = boot(&vol.socket, 1, 1, &check_head(16, &p1));
    assert_eq!(
        field(&console, "CHECKED"),
        "yes",
        "as at T after the revert:\n{console}"
    );

    daemon.revert(&format!("lsn:{}", revert_lsn - 1));
    let console = boot(&vol.socket, 1, 1, &check_head(4, &p2));
    assert_eq!(
        field(&console, "CHECKED"),
        "yes",
        "the revert undone:\n{console}"
    );
}

/// Four writers of 1 MiB chunks with O_DIRECT, and a heartbeat that does
/// not touch the disk; every chunk is checked at the end.
const WRITERS: &str = r#"
(while :; do echo TICK; sleep 0.2; done) &
ticker=$!
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
pids=""
for j in 0 1 2 3; do
  (k=0; while [ $k -lt 6 ]; do
     dd if=/tmp/p of=/dev/vda bs=64k count=16 seek=$(( (j * 6 + k) * 16 )) oflag=direct 2>/dev/null || exit 1
     echo "CHUNK: $j $k"; k=$((k + 1)); done) &
  pids="$pids $!"
done
for p in $pids; do wait $p; done
kill $ticker
want=$(md5sum < /tmp/p | cut -d' ' -f1)
c=0
while [ $c -lt 24 ]; do
  [ "$(dd if=/dev/vda bs=64k count=16 skip=$((c * 16)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$want" ]
  c=$((c + 1))
done
echo "VERIFIED: yes"
"#;

#[test]
fn a_drain_while_a_guest_writes_holds_its_writes_and_resume_lets_it_finish() {
    let vol = TestVolume::create("64M");
    let daemon = Controlled::start(&vol);
    // (drain's answer, status after three heartbeats while drained)
    let mut drained: Option<(Value, Value)> = None;
    let mut ticks = 0;
    let mut resumed = false;
    let console = boot_watching(&vol.socket, 1, 1, WRITERS, |line| {
        if line.starts_with("CHUNK") && drained.is_none() {
            let answer = daemon.ctl("drain", json!({"timeout_ms": 10_000}));
            drained = Some((answer, Value::Null));
        } else if line.starts_with("TICK") && !resumed {
            if let Some((_, after)) = drained.as_mut() {
                ticks += 1;
                if ticks == 3 {
                    *after = daemon.status();
                    daemon.ctl("resume", Value::Null);
                    resumed = true;
                }
            }
        }
    });
    assert_passed(&console);
    assert_eq!(
        field(&console, "VERIFIED"),
        "yes",
        "no IO error, every chunk there"
    );
    let (answer, after) = drained.expect("drained while the guest wrote");
    assert!(resumed, "{console}");
    assert_eq!(answer["state"], "drained", "{answer}");
    assert_eq!(after["state"], "drained");
    assert_eq!(
        after["last_lsn"], answer["last_lsn"],
        "nothing was written while drained"
    );
}

/// Writes forever, with a heartbeat that does not touch the disk.
const WRITE_FOREVER: &str = r#"
(while :; do echo TICK; sleep 0.2; done) &
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
i=0
while :; do
  dd if=/tmp/p of=/dev/vda bs=64k count=16 seek=$(( i % 32 * 16 )) oflag=direct 2>/dev/null
  echo "CHUNK: $i"
  i=$((i + 1))
done
"#;

#[test]
fn a_fenced_guest_cannot_write_or_reattach_and_a_new_one_boots_after_unfence() {
    let vol = TestVolume::create("64M");
    let daemon = Controlled::start(&vol);
    let mut fenced: Option<Value> = None;
    let mut unfenced = false;
    let mut refusals = Vec::new();
    let refusal = |daemon: &Controlled| daemon.status()["last_refusal"].as_str().map(str::to_owned);
    let console = boot_until(&vol.socket, WRITE_FOREVER, |line| {
        if line.starts_with("CHUNK") && fenced.is_none() {
            fenced = Some(daemon.ctl("fence", Value::Null));
            return false;
        }
        if !line.starts_with("TICK") || fenced.is_none() {
            return false;
        }
        // QEMU reconnects every second (reconnect=1) and is refused.
        match refusal(&daemon) {
            Some(r) if !unfenced && r.contains("fenced at epoch 2") => {
                refusals.push(r);
                daemon.ctl("unfence", Value::Null);
                unfenced = true;
                false
            }
            Some(r) if unfenced && r.contains("attached at epoch 1") => {
                refusals.push(r);
                true
            }
            _ => false,
        }
    });
    let fenced = fenced.unwrap_or_else(|| panic!("never fenced:\n{console}"));
    assert_eq!(
        (fenced["epoch"].as_u64(), fenced["state"].as_str()),
        (Some(2), Some("fenced"))
    );
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    let status = daemon.status();
    assert_eq!(
        status["last_lsn"], fenced["last_lsn"],
        "the fenced guest wrote nothing more"
    );
    assert_eq!(status["state"], "serving");

    // A new QEMU is a new client at epoch 2: it reads and writes.
    let script = r#"
dd if=/dev/urandom of=/tmp/p bs=64k count=4 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null
[ "$(dd if=/dev/vda bs=64k count=4 iflag=direct 2>/dev/null | md5sum)" = "$(md5sum < /tmp/p)" ]
echo "WROTE: yes"
"#;
    let console = boot(&vol.socket, 1, 1, script);
    assert_passed(&console);
    assert_eq!(field(&console, "WROTE"), "yes");
    assert!(daemon.status()["last_lsn"].as_u64() > fenced["last_lsn"].as_u64());
}

/// Makes a filesystem on the whole disk (busybox has mke2fs, not
/// mkfs.ext4: ext2, mounted by the kernel's ext4 driver), fills it with
/// files of known content, unmounts it; prints every file's md5.
const FILL_A_FILESYSTEM: &str = r#"
mke2fs -q -L rewind-t /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/dir/sub
echo "written on the primary before T" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/big.bin bs=64k count=64 2>/dev/null
dd if=/dev/urandom of=/mnt/dir/sub/data.bin bs=64k count=16 2>/dev/null
for i in 1 2 3 4 5; do dd if=/dev/urandom of=/mnt/dir/f$i bs=4k count=$((i * 3)) 2>/dev/null; done
(cd /mnt && find . -type f | sort | xargs md5sum) > /tmp/sums
sync
umount /mnt
mount -t ext4 -o ro /dev/vda /mnt
(cd /mnt && md5sum -c /tmp/sums) >/dev/null
umount /mnt
echo "FILES: $(wc -l < /tmp/sums)"
sed 's/^/SUM: /' /tmp/sums
"#;

#[test]
fn a_second_guest_boots_from_a_scratch_export_of_the_replica_at_t_and_finds_the_files() {
    let pair = Pair::start(&[]);
    let console = boot(&pair.primary.vol.socket, 1, 1, FILL_A_FILESYSTEM);
    assert_passed(&console);
    let files = field(&console, "FILES").to_owned();
    let sums: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("SUM: ").map(|(_, s)| s.trim()))
        .collect();
    assert_eq!(sums.len(), 8, "{console}");
    assert_eq!(files, "8");

    // T: a bookmark once the guest is gone; then the primary's disk
    // changes after T (its first MiB, superblock included, overwritten).
    wait_until("the guest to detach", Duration::from_secs(30), || {
        pair.primary.ctl("status", Value::Null)["attached"].is_null()
    });
    let bookmark = pair
        .primary
        .ctl("bookmark", json!({"name": "after-guest1"}));
    let after_t = pattern(0x5a, 1 << 20);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    assert_eq!(client.write(0, 0, &after_t), 0);
    assert_eq!(client.flush(0), 0);
    drop(client);
    let acked = pair.caught_up();
    let bookmark_lsn = bookmark["lsn"].as_u64().expect("bookmark lsn");
    assert!(acked > bookmark_lsn, "the write after T is replicated");
    let replica_last = |pair: &Pair| {
        pair.replica.ctl("status", Value::Null)["last_lsn"]
            .as_u64()
            .expect("last_lsn")
    };
    let before = replica_last(&pair);

    // The replica exports its disk at T with a scratch overlay.
    let view = pair.replica.vol.dir.path().join("view.sock");
    let exported = pair.replica.ctl(
        "export",
        json!({"at": "bookmark:after-guest1", "socket_path": view, "scratch": true}),
    );
    assert_eq!(exported["writable"], true, "{exported}");
    assert_eq!(
        exported["lsn"], bookmark["lsn"],
        "the view is at the bookmark's lsn on the primary: {exported} (bookmark {bookmark})"
    );
    let script = format!(
        r#"
mount -t ext4 /dev/vda /mnt
cat > /tmp/sums <<'SUMS'
{sums}
SUMS
(cd /mnt && md5sum -c /tmp/sums)
[ "$(cd /mnt && find . -type f | wc -l)" = "{files}" ]
[ "$(cat /mnt/hello.txt)" = "written on the primary before T" ]
echo "FOUND: yes"
echo "written in the scratch overlay" > /mnt/scratch.txt
rm /mnt/dir/f1
sync
umount /mnt
mount -t ext4 -o ro /dev/vda /mnt
[ "$(cat /mnt/scratch.txt)" = "written in the scratch overlay" ]
[ ! -e /mnt/dir/f1 ]
umount /mnt
echo "SCRATCH-WRITTEN: yes"
"#,
        sums = sums.join("\n")
    );
    let console = boot(&view, 1, 1, &script);
    assert_passed(&console);
    assert_eq!(field(&console, "FOUND"), "yes");
    assert_eq!(field(&console, "SCRATCH-WRITTEN"), "yes");
    pair.replica.ctl("unexport", json!({"socket_path": view}));
    assert!(!view.exists());

    // The replica's own disk is untouched: no new record, the same disk as
    // the primary's, with what the primary wrote after T.
    assert_eq!(
        replica_last(&pair),
        before,
        "the guest wrote to the overlay only"
    );
    let on_replica = pair.replica.materialize(acked);
    assert!(
        on_replica[..1 << 20] == after_t[..],
        "the replica's disk is past T"
    );
    assert!(
        on_replica == pair.primary.materialize(acked),
        "the replica and the primary differ at lsn {acked}"
    );
    assert_eq!(
        pair.replica.replication()["state"],
        "streaming",
        "the export did not disturb the link"
    );
}
