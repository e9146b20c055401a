//! Application-consistent bookmarks with a real guest agent: a TCG guest
//! on rewind-blk mounts an ext4 filesystem (made on the host) and writes
//! to it without pause; `bookmark --quiesce` freezes it through Debian's
//! qemu-ga (guest-tests/build.sh packs it into qga.gz) while the volume is
//! bookmarked. The bookmark's image is a clean filesystem (`fsck.ext4 -n`
//! finds nothing, not even a journal to replay, where a crash-consistent
//! bookmark taken just after has one), and the guest writes on after the
//! thaw. Before the agent starts, the same command fails within
//! its timeout: QEMU holds the channel open and nobody answers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::guest::{assert_passed, build_guest, field, guest, Guest, GuestConfig, QEMU};
use common::{wait_until, Controlled, TestVolume};
use rewind_ctl::quiesce;
use serde_json::{json, Value};

/// qga.gz: qemu-ga, its libraries and virtio_console, built once.
fn agent_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let archive = guest().join("qga.gz");
        if !archive.exists() {
            build_guest(guest());
        }
        assert!(
            archive.exists(),
            "guest-tests/build.sh made no qga.gz: install qemu-guest-agent (ci/install-deps.sh)"
        );
        archive
    })
}

/// The guest: mounts the disk, writes to it in a loop (4 KiB files with
/// fsync; a count every 10), waits for `agent` to start qemu-ga and for
/// `stop` to end the writer (between two files) and unmount.
const SCRIPT: &str = r#"
insmod /lib/modules/virtio_console.ko
i=0
while ! ls /dev/vport*p1 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /mnt/data
mount -t ext4 /dev/vda /mnt/data
(
  n=0
  while [ ! -e /tmp/stop ]; do
    n=$((n + 1))
    dd if=/dev/urandom of=/mnt/data/f$((n % 64)) bs=4k count=4 conv=fsync 2>/dev/null
    [ $((n % 10)) -ne 0 ] || echo "WROTE: $n"
  done
) &
writer=$!
echo "WRITING: 1"
read cmd
[ "$cmd" = agent ]
qemu-ga -m virtio-serial -p $(ls /dev/vport*p1) -d -f /tmp/qga.pid
echo "AGENT: started"
read cmd
[ "$cmd" = stop ]
touch /tmp/stop
wait $writer
umount /mnt/data
echo "UNMOUNTED: 1"
"#;

/// The next `WROTE: n` count the guest prints.
fn next_count(guest: &mut Guest) -> u64 {
    let line = guest.wait_for("WROTE: ");
    field(&line, "WROTE").parse().expect("a count")
}

/// `fsck.ext4 -n -f` of an image (checks everything, changes nothing).
fn fsck(image: &Path) -> Output {
    Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(image)
        .output()
        .expect("run fsck.ext4 (install e2fsprogs: ci/install-deps.sh)")
}

#[test]
fn a_quiesced_bookmark_of_a_writing_guest_is_a_clean_filesystem() {
    let work = tempfile::tempdir().expect("tmp");
    let image = work.path().join("ext4.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image");
    // Initialized up front, so no lazy init writes meanwhile.
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&image)
        .output()
        .expect("run mkfs.ext4 (install e2fsprogs: ci/install-deps.sh)");
    assert!(made.status.success(), "{made:?}");
    let image_arg = image.to_str().expect("utf-8");
    let vol = TestVolume::create_with("64M", &["--segment-size", "4M", "--from", image_arg]);
    let daemon = Controlled::start(&vol);
    wait_until("the control socket", Duration::from_secs(20), || {
        daemon.control.exists()
    });

    let qga = work.path().join("qga.sock");
    let mut qemu = Command::new(QEMU);
    qemu.args(["-chardev"])
        .arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qga.display()
        ))
        .args(["-device", "virtio-serial"])
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    let mut guest = Guest::start_with(
        qemu,
        &vol.socket,
        SCRIPT,
        GuestConfig::default(),
        &[agent_archive()],
    );
    guest.wait_for("WRITING: 1");
    next_count(&mut guest);

    // No agent yet: the channel is there and says nothing.
    let timeout = Duration::from_secs(2);
    let started = Instant::now();
    let options = quiesce::Options {
        timeout,
        fallback: false,
    };
    let err = quiesce::bookmark(&daemon.control, &qga, "too-early", options)
        .expect_err("no agent answers");
    let took = started.elapsed();
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(took < timeout + Duration::from_secs(2), "{took:?}");
    eprintln!("without an agent: failed after {took:?}: {err}");

    guest.send("agent\n");
    guest.wait_for("AGENT: started");
    let before = next_count(&mut guest);
    // TCG is slow: the agent's freeze alone can take seconds.
    let options = quiesce::Options {
        timeout: Duration::from_secs(60),
        fallback: false,
    };
    let outcome = quiesce::bookmark(&daemon.control, &qga, "app", options).expect("quiesce");
    assert!(outcome.thaw_failed.is_none(), "{:?}", outcome.thaw_failed);
    let mark = outcome.result;
    assert_eq!(mark["app_consistent"], true, "{mark}");
    assert!(
        mark["frozen_filesystems"].as_u64() >= Some(1),
        "the ext4 filesystem was frozen: {mark}"
    );
    eprintln!(
        "quiesced bookmark: agent_freeze_ms {} frozen_ms {}",
        mark["agent_freeze_ms"], mark["frozen_ms"]
    );
    // A crash-consistent bookmark of the same writing guest, to compare.
    let crash = daemon.ctl("bookmark", json!({"name": "crash"}));
    assert_eq!(crash["app_consistent"], false);
    // The guest writes on after the thaw.
    let mut after = next_count(&mut guest);
    while after < before + 30 {
        after = next_count(&mut guest);
    }
    guest.send("stop\n");
    guest.wait_for("UNMOUNTED: 1");
    let console = guest.finish();
    assert_passed(&console);

    let timeline = daemon.ctl("timeline", Value::Null);
    let flags: Vec<(&str, bool)> = timeline["bookmarks"]
        .as_array()
        .expect("bookmarks")
        .iter()
        .filter_map(|b| Some((b["name"].as_str()?, b["app_consistent"].as_bool()?)))
        .collect();
    assert_eq!(flags, [("app", true), ("crash", false)]);

    let checked: Vec<(&str, Output)> = ["app", "crash"]
        .into_iter()
        .map(|name| {
            let out = work.path().join(format!("{name}.raw"));
            let at = format!("bookmark:{name}");
            daemon.ctl("materialize", json!({"at": at, "output": out}));
            (name, fsck(&out))
        })
        .collect();
    for (name, out) in &checked {
        eprintln!(
            "fsck.ext4 -n -f of bookmark {name}: exit {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Frozen, ext4 checkpointed its journal and marked itself clean; the
    // crash-consistent image has a journal to replay (fsck -n skips it).
    let replay = |out: &Output| String::from_utf8_lossy(&out.stdout).contains("journal recovery");
    let [(_, app), (_, crash)] = &checked[..] else {
        unreachable!("two images")
    };
    assert!(
        app.status.success() && !replay(app),
        "the app-consistent image is not clean: {app:?}"
    );
    assert!(replay(crash), "{crash:?}");
}
