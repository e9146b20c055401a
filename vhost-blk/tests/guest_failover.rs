//! Failover, rejoin and failback with real QEMU guests (TCG) between two
//! hosts on one machine: each host is a network namespace (common/netns.rs)
//! with its own `rewind-blk serve`, replicating to the other over the veth
//! pair with mutual TLS, and its own QEMU. The daemons are driven through
//! their control sockets as `rewindctl` drives them; the guests write,
//! report what they saw flushed, and check what the test types into their
//! consoles.
//!
//! The guest that takes over is booted before the failover: its QEMU
//! connects to the replica, whose gate holds its first read (the partition
//! table) until the promotion, so "command to serving" is measured from the
//! guest's side too.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::{assert_passed, field, fields, Guest};
use common::twins::{number, streaming, Daemon, Twins};
use common::wait_until;
use serde_json::{json, Value};

/// The `SUM: md5  ./path` lines a guest printed under `key`, as
/// (md5, path).
fn sums(console: &str, key: &str) -> Vec<(String, String)> {
    fields(console, key)
        .into_iter()
        .map(|l| {
            let (md5, path) = l.split_once("  ").expect("md5sum line");
            (md5.to_owned(), path.to_owned())
        })
        .collect()
}

/// md5 of `count` 64 KiB blocks from block `skip` of an image file.
fn md5_of(file: &std::path::Path, skip: u32, count: u32) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if=\"$0\" bs=64k skip={skip} count={count} 2>/dev/null | md5sum | cut -d' ' -f1"
        ))
        .arg(file)
        .output()
        .expect("md5sum");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The guest that takes over (or fails back): it says READY once its disk
/// answered its first read, then runs the commands typed into its
/// console, one a line:
/// `mount`; `file MD5 PATH` (under /mnt); `absent PATH`;
/// `raw MD5 SKIP COUNT` and `zero SKIP COUNT` (64 KiB blocks of the disk);
/// `write SEEK DIR` (256 KiB of new data at block SEEK, and files in
/// /mnt/DIR when mounted; prints WROTE-RAW and WSUM); `say WORD`; `end`.
const TAKE_OVER: &str = r#"
stty -echo 2>/dev/null || true
echo "READY: yes"
mounted=""
bad() { echo "BAD: $*"; exit 1; }
while read -r cmd a b c; do
  case "$cmd" in
    mount) mount -o noatime /dev/vda /mnt; mounted=1 ;;
    file) [ "$(md5sum < "/mnt/$b" | cut -d' ' -f1)" = "$a" ] || bad "file $b" ;;
    absent) [ ! -e "/mnt/$a" ] || bad "present $a" ;;
    raw) [ "$(dd if=/dev/vda bs=64k skip=$b count=$c iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$a" ] || bad "raw at $b" ;;
    zero) [ "$(dd if=/dev/vda bs=64k skip=$a count=$b iflag=direct 2>/dev/null | md5sum)" = "$(dd if=/dev/zero bs=64k count=$b 2>/dev/null | md5sum)" ] || bad "not zero at $a" ;;
    write)
      dd if=/dev/urandom of=/tmp/w bs=64k count=4 2>/dev/null
      dd if=/tmp/w of=/dev/vda bs=64k seek=$a oflag=direct conv=fsync 2>/dev/null
      echo "WROTE-RAW: $(md5sum < /tmp/w | cut -d' ' -f1)"
      if [ -n "$mounted" ]; then
        mkdir -p "/mnt/$b"
        for i in 1 2 3; do dd if=/dev/urandom of="/mnt/$b/g$i" bs=4k count=$((i * 4)) 2>/dev/null; done
        sync
        (cd /mnt && md5sum ./$b/*) | sed 's/^/WSUM: /'
      fi ;;
    say) echo "SAID: $a" ;;
    end) break ;;
    *) bad "unknown command $cmd" ;;
  esac
done
[ -z "$mounted" ] || umount /mnt
echo "CHECKED: yes"
"#;

/// Boots the guest that takes over on host A (`on_a`) or B and waits
/// until its first read waits at the daemon's gate.
fn waiting_guest(twins: &Twins, on_a: bool) -> Guest {
    let mut guest = twins.guest(on_a, TAKE_OVER);
    guest.wait_for("[vda]");
    guest
}

/// Runs `failover` on `daemon` with `args`; checks that `waiting` served
/// no IO before it and prints how long it took to serve. Returns the
/// answer.
fn fail_over(scenario: &str, daemon: &Daemon, args: Value, waiting: Option<&mut Guest>) -> Value {
    let start = Instant::now();
    let done = daemon.ctl("failover", args);
    let command = start.elapsed();
    let took = number(&done, "took_ms");
    let to_guest = waiting.map(|guest| {
        guest.wait_for("READY: yes");
        let at = guest.last_at();
        assert!(
            at > start,
            "the guest was served before the failover:\n{}",
            guest.console()
        );
        format!(
            ", {} ms to the waiting guest's first IO",
            (at - start).as_millis()
        )
    });
    eprintln!(
        "{scenario}: failover on {} took {took} ms in the daemon (took_ms), {} ms for the \
         command{}",
        daemon.name,
        command.as_millis(),
        to_guest.unwrap_or_default()
    );
    done
}

/// Types the commands into a TAKE_OVER guest and waits until it did
/// them all.
fn run_commands(guest: &mut Guest, commands: &[String], word: &str) {
    let mut text = commands.join("\n");
    text.push_str(&format!("\nsay {word}\n"));
    guest.send(&text);
    guest.wait_for(&format!("SAID: {word}"));
}

fn end_commands(mut guest: Guest) -> String {
    guest.send("end\n");
    let console = guest.finish();
    assert_passed(&console);
    assert_eq!(field(&console, "CHECKED"), "yes");
    console
}

/// Async: a pattern (P1, blocks 768..784) and a filesystem with files,
/// synced; then it waits for a line (the test cuts the link meanwhile) and
/// writes a tail (P2 at blocks 832..836 and tail.txt), synced, and idles.
const ASYNC_WRITER: &str = r#"
dd if=/dev/urandom of=/tmp/p1 bs=64k count=16 2>/dev/null
dd if=/tmp/p1 of=/dev/vda bs=64k seek=768 oflag=direct conv=fsync 2>/dev/null
echo "P1: $(md5sum < /tmp/p1 | cut -d' ' -f1)"
mke2fs -q /dev/vda 32768
mount -o noatime /dev/vda /mnt
mkdir -p /mnt/dir/sub
echo "written on A before the cut" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/big.bin bs=64k count=16 2>/dev/null
dd if=/dev/urandom of=/mnt/dir/sub/data.bin bs=64k count=4 2>/dev/null
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/dir/f$i bs=4k count=$((i * 5)) 2>/dev/null; done
sync
(cd /mnt && find . -type f | sort | xargs md5sum) | sed 's/^/SUM: /'
echo "SYNCED: yes"
read go
dd if=/dev/urandom of=/tmp/p2 bs=64k count=4 2>/dev/null
dd if=/tmp/p2 of=/dev/vda bs=64k seek=832 oflag=direct conv=fsync 2>/dev/null
echo "not replicated" > /mnt/tail.txt
sync
echo "P2: $(md5sum < /tmp/p2 | cut -d' ' -f1)"
echo "TAIL: synced"
sleep 1000
"#;

#[test]
fn async_forced_failover_to_a_guest_on_b_then_rejoin_and_failback_to_a_fresh_guest_on_a() {
    let scenario = "async, link cut";
    let twins = Twins::start(&[]);
    let started = Instant::now();
    let mut writer = twins.guest(true, ASYNC_WRITER);
    let mut taker = waiting_guest(&twins, false);
    writer.wait_for("SYNCED: yes");
    let p1 = field(writer.console(), "P1").to_owned();
    let synced = sums(writer.console(), "SUM");
    assert_eq!(synced.len(), 6, "{}", writer.console());

    // Everything synced so far is on B; then the link is cut and A's guest
    // writes a tail that B never gets.
    let acked = streaming(&twins.a, &twins.b);
    let caught_up = Instant::now();
    twins.hosts.a.set_link(false);
    writer.send("go\n");
    writer.wait_for("TAIL: synced");
    let p2 = field(writer.console(), "P2").to_owned();
    assert!(
        number(&twins.a.status(), "durable_lsn") > acked,
        "A holds writes B lacks"
    );
    writer.kill();
    // As a cluster manager would, act once B found A silent (a forced
    // failover while B's session from A still looks up asks A to seal and
    // waits its whole timeout for the answer).
    wait_until("B to find A silent", Duration::from_secs(30), || {
        !matches!(
            twins.b.replication()["state"].as_str(),
            Some("streaming" | "syncing")
        )
    });

    // A does not answer: no failover without --force.
    let b_last = number(&twins.b.status(), "last_lsn");
    assert!(b_last >= acked, "B holds what it acknowledged");
    let refused = twins
        .b
        .try_ctl("failover", json!({"timeout_ms": 2000}))
        .expect_err("no seal from a cut-off primary")
        .to_string();
    assert!(refused.contains("--force"), "{refused}");
    assert!(refused.contains(&format!("lsn {b_last}")), "{refused}");
    assert_eq!(twins.b.status()["role"], "replica");

    let before = caught_up.elapsed().as_secs_f64();
    let forced = fail_over(scenario, &twins.b, json!({"force": true}), Some(&mut taker));
    assert_eq!(forced["role"], "primary", "{forced}");
    assert_eq!(forced["forced"], true, "{forced}");
    assert!(number(&forced, "took_ms") < 5000, "{forced}");
    assert!(forced["sealed_lsn"].is_null(), "{forced}");
    assert_eq!(forced["epoch"], 2, "{forced}");
    assert_eq!(number(&forced, "first_lsn"), b_last + 1, "{forced}");
    let rpo = forced["rpo_seconds"].as_f64().expect("rpo_seconds");
    assert!(
        rpo >= before - 0.01 && rpo <= started.elapsed().as_secs_f64(),
        "rpo {rpo} s: B's last record is from before the check {before:.2} s ago"
    );

    // Everything synced before the cut is on B, intact; the tail is not.
    let mut checks = vec!["mount".to_owned(), format!("raw {p1} 768 16")];
    checks.extend(
        synced
            .iter()
            .map(|(md5, path)| format!("file {md5} {path}")),
    );
    checks.extend(["absent tail.txt".to_owned(), "zero 832 4".to_owned()]);
    run_commands(&mut taker, &checks, "checked");
    // B's guest writes on.
    run_commands(&mut taker, &["write 896 b".to_owned()], "wrote");
    let on_b = end_commands(taker);
    let p3 = field(&on_b, "WROTE-RAW").to_owned();
    let b_files = sums(&on_b, "WSUM");
    assert_eq!(b_files.len(), 3, "{on_b}");

    // The link is back: A learns of epoch 2, keeps its tail as a branch and
    // becomes B's replica; B streams to it from the common point, no resync.
    twins.hosts.a.set_link(true);
    let acked = streaming(&twins.b, &twins.a);
    let a = twins.a.status();
    assert_eq!(a["role"], "replica", "{a}");
    assert_eq!(a["epoch"], 2, "{a}");
    assert!(a["hold"].is_null(), "{a}");
    let b_repl = twins.b.replication();
    assert!(b_repl["resync"].is_null(), "{b_repl}");
    assert!(b_repl["last_resync"].is_null(), "{b_repl}");
    let branches = twins.a.ctl("branches", Value::Null)["branches"].clone();
    assert_eq!(branches.as_array().map(Vec::len), Some(1), "{branches}");
    let branch = &branches[0];
    assert_eq!(branch["name"], format!("e1-{}", b_last + 1), "{branch}");
    assert_eq!(number(branch, "base_lsn"), b_last, "{branch}");
    assert_eq!(branch["readable"], true, "{branch}");
    let at = format!("lsn:{acked}");
    let (on_a, on_b) = (
        twins.a.materialize(&at, "a.raw"),
        twins.b.materialize(&at, "b.raw"),
    );
    assert!(
        std::fs::read(on_a).expect("a.raw") == std::fs::read(on_b).expect("b.raw"),
        "A and B differ at lsn {acked}"
    );

    // Failback: B answers and seals (RPO 0); a fresh guest on A sees all
    // that B wrote, and none of A's cut tail.
    let back = fail_over("async failback", &twins.a, json!({}), None);
    assert_eq!(back["forced"], false, "{back}");
    assert_eq!(back["rpo_seconds"], 0.0, "{back}");
    assert_eq!(back["epoch"], 3, "{back}");
    assert!(number(&back, "sealed_lsn") >= acked, "{back}");
    assert_eq!(twins.b.status()["role"], "replica");
    // Booted after the failback: a rejoined node's gate is fenced, and it
    // refuses a QEMU that connects before its promotion (QEMU then exits).
    let mut fresh = twins.guest(true, TAKE_OVER);
    fresh.wait_for("READY: yes");
    let mut checks = vec![
        "mount".to_owned(),
        format!("raw {p1} 768 16"),
        format!("raw {p3} 896 4"),
        "absent tail.txt".to_owned(),
        "zero 832 4".to_owned(),
    ];
    checks.extend(
        synced
            .iter()
            .chain(&b_files)
            .map(|(md5, path)| format!("file {md5} {path}")),
    );
    run_commands(&mut fresh, &checks, "checked");
    run_commands(&mut fresh, &["write 960 a".to_owned()], "wrote");
    end_commands(fresh);
    streaming(&twins.a, &twins.b);

    // A's cut tail is kept: its branch reads as A's disk when it was cut.
    let name = branch["name"].as_str().expect("name");
    let image = twins.a.materialize(&format!("branch:{name}"), "branch.raw");
    assert_eq!(md5_of(&image, 832, 4), p2, "the branch holds A's tail");
    assert_eq!(md5_of(&image, 768, 16), p1, "and what came before it");
}

/// Sync: a filesystem, then files and raw blocks (from block 768), each
/// synced before the guest reports it.
const SYNC_WRITER: &str = r#"
mke2fs -q /dev/vda 32768
mount -o noatime /dev/vda /mnt
i=0
while [ $i -lt 100 ]; do
  dd if=/dev/urandom of=/mnt/f$i bs=64k count=2 2>/dev/null
  sync
  dd if=/dev/urandom of=/tmp/c bs=64k count=1 2>/dev/null
  dd if=/tmp/c of=/dev/vda bs=64k seek=$((768 + i)) oflag=direct conv=fsync 2>/dev/null
  echo "SYNCED: $i $(md5sum < /mnt/f$i | cut -d' ' -f1) $(md5sum < /tmp/c | cut -d' ' -f1)"
  i=$((i + 1))
done
"#;

#[test]
fn sync_forced_failover_after_a_host_crash_keeps_every_write_the_guest_saw_flushed() {
    let scenario = "sync, daemon killed";
    let mut twins = Twins::start(&["--replication-mode", "sync"]);
    let started = Instant::now();
    let mut writer = twins.guest(true, SYNC_WRITER);
    let mut taker = waiting_guest(&twins, false);
    writer.wait_for("SYNCED: 5");
    // Host A dies: its daemon, then its QEMU; every line the guest printed
    // until then counts.
    twins.a.kill();
    writer.kill();
    let lines = fields(writer.console(), "SYNCED");
    let mut synced = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        match line.split(' ').collect::<Vec<_>>()[..] {
            [i, file, block] if file.len() == 32 && block.len() == 32 => {
                synced.push((i.to_owned(), file.to_owned(), block.to_owned()))
            }
            // QEMU died while the guest printed it.
            _ if n + 1 == lines.len() => {}
            _ => panic!("bad line {line:?}:\n{}", writer.console()),
        }
    }
    assert!(synced.len() >= 6, "{}", writer.console());

    let b_last = number(&twins.b.status(), "last_lsn");
    let refused = twins
        .b
        .try_ctl("failover", json!({"timeout_ms": 2000}))
        .expect_err("no seal from a dead primary")
        .to_string();
    assert!(refused.contains("--force"), "{refused}");
    let forced = fail_over(scenario, &twins.b, json!({"force": true}), Some(&mut taker));
    assert_eq!(forced["forced"], true, "{forced}");
    assert!(number(&forced, "took_ms") < 5000, "{forced}");
    assert_eq!(forced["epoch"], 2, "{forced}");
    assert_eq!(number(&forced, "first_lsn"), b_last + 1, "{forced}");
    let rpo = forced["rpo_seconds"].as_f64().expect("rpo_seconds");
    assert!(
        rpo > 0.0 && rpo <= started.elapsed().as_secs_f64(),
        "{forced}"
    );

    // RPO 0 in data terms: every file and block the guest saw synced.
    let mut checks = vec!["mount".to_owned()];
    for (i, file, block) in &synced {
        checks.push(format!("file {file} f{i}"));
        checks.push(format!(
            "raw {block} {} 1",
            768 + i.parse::<u32>().expect("i")
        ));
    }
    run_commands(&mut taker, &checks, "checked");

    // A comes back and rejoins; what it wrote that B lacks (if any) is a
    // branch; B's guest writes on with A as its replica.
    twins.a.restart(&twins.hosts.a);
    let acked = streaming(&twins.b, &twins.a);
    let a = twins.a.status();
    assert_eq!(a["role"], "replica", "{a}");
    assert_eq!(a["epoch"], 2, "{a}");
    let b_repl = twins.b.replication();
    assert!(b_repl["last_resync"].is_null(), "{b_repl}");
    let branches = twins.a.ctl("branches", Value::Null)["branches"].clone();
    for branch in branches.as_array().expect("branches") {
        assert_eq!(branch["name"], format!("e1-{}", b_last + 1), "{branches}");
        assert_eq!(number(branch, "base_lsn"), b_last, "{branches}");
    }
    run_commands(&mut taker, &["write 896 b".to_owned()], "wrote");
    end_commands(taker);
    assert!(streaming(&twins.b, &twins.a) > acked);
}

/// Async: 64 KiB blocks from block 512, each flushed before the guest
/// reports it, with a heartbeat that does not touch the disk.
const LIVE_WRITER: &str = r#"
(while :; do echo TICK; sleep 0.2; done) &
i=0
while [ $i -lt 256 ]; do
  dd if=/dev/urandom of=/tmp/c bs=64k count=1 2>/dev/null
  dd if=/tmp/c of=/dev/vda bs=64k seek=$((512 + i)) oflag=direct conv=fsync 2>/dev/null
  echo "FLUSHED: $i $(md5sum < /tmp/c | cut -d' ' -f1)"
  i=$((i + 1))
done
"#;

#[test]
fn a_live_failover_seals_the_running_guest_out_and_b_holds_all_it_flushed() {
    let scenario = "live, A reachable";
    let twins = Twins::start(&[]);
    let mut writer = twins.guest(true, LIVE_WRITER);
    let mut taker = waiting_guest(&twins, false);
    writer.wait_for("FLUSHED: 5");

    let done = fail_over(scenario, &twins.b, json!({}), Some(&mut taker));
    assert_eq!(done["role"], "primary", "{done}");
    assert_eq!(done["forced"], false, "{done}");
    assert_eq!(done["rpo_seconds"], 0.0, "{done}");
    assert_eq!(done["epoch"], 2, "{done}");
    let sealed = number(&done, "sealed_lsn");
    assert_eq!(twins.a.status()["role"], "replica");

    // A's guest runs on but cannot write: QEMU reconnects (every second)
    // and A refuses it; its IO waits. Once refused, five more heartbeats
    // bring no flush.
    let mut refused_at = None;
    let mut ticks = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks < 5 {
        assert!(
            refused_at.is_some() || Instant::now() < deadline,
            "A never refused its old guest: {}",
            twins.a.status()
        );
        let line = writer
            .next_line()
            .unwrap_or_else(|| panic!("A's guest ended instead of hanging:\n{}", writer.console()));
        if line.starts_with("FLUSHED") {
            assert!(
                refused_at.is_none(),
                "A's guest flushed after A refused it: {line}"
            );
        } else if line.starts_with("TICK") {
            match refused_at {
                Some(_) => ticks += 1,
                None => {
                    let a = twins.a.status();
                    if a["last_refusal"].is_string() {
                        refused_at = Some(a["io"].clone());
                    }
                }
            }
        }
    }
    let a = twins.a.status();
    assert!(
        a["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains("epoch")),
        "{a}"
    );
    assert_eq!(
        Some(&a["io"]),
        refused_at.as_ref(),
        "A served IO after refusing its guest"
    );
    writer.kill();
    let flushed: Vec<(u32, String)> = fields(writer.console(), "FLUSHED")
        .into_iter()
        .map(|l| {
            let (i, md5) = l.split_once(' ').expect("FLUSHED: i md5");
            (i.parse().expect("i"), md5.to_owned())
        })
        .collect();
    assert!(flushed.len() >= 6);

    // Every block A's guest saw flushed is on B.
    let checks: Vec<String> = flushed
        .iter()
        .map(|(i, md5)| format!("raw {md5} {} 1", 512 + i))
        .collect();
    run_commands(&mut taker, &checks, "checked");
    run_commands(&mut taker, &["write 896 b".to_owned()], "wrote");
    end_commands(taker);
    // The sealed A is B's replica from the seal on: nothing to cut.
    let acked = streaming(&twins.b, &twins.a);
    assert!(acked > sealed);
    assert_eq!(
        twins.a.ctl("branches", Value::Null)["branches"],
        json!([]),
        "a sealed primary keeps no branch"
    );
}
