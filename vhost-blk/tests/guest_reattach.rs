//! A paused QEMU (QMP `stop`) keeps its vhost-user connection while
//! rewind-blk is killed (SIGKILL) and started again; QEMU reconnects
//! (`reconnect=1`). The volume's durable attach record decides: a restart
//! alone changes nothing and `cont` goes on with the same disk; a revert
//! meanwhile refuses the reconnect, with the reason in
//! `status.last_refusal` (issue 19, point 2).
//!
//! QEMU before 9.1, the system's 7.2 included, cannot resume a paused guest
//! on a restarted backend at all (see `reconnecting_qemu`), so the first
//! test runs the QEMU >= 9.1 that ci/install-deps.sh unpacks from
//! bookworm-backports beside the system's.

mod common;

use std::process::Command;
use std::time::Duration;

use common::guest::{assert_passed, field, Guest, GuestConfig, QEMU};
use common::qmp::Qmp;
use common::{wait_until, Controlled, Server, TestVolume};
use serde_json::{json, Value};

/// Writes a pattern (blocks 16..20 of 64 KiB), then does what the test
/// types: `check N` reads it back, `write N` writes elsewhere, both with
/// O_DIRECT so the disk answers, not the page cache.
const SCRIPT: &str = r#"
dd if=/dev/urandom of=/tmp/p bs=64k count=4 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null
echo "READY: $(md5sum < /tmp/p | cut -d' ' -f1)"
while read -r cmd n; do
  case "$cmd" in
    check) echo "HEAD-$n: $(dd if=/dev/vda bs=64k skip=16 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" ;;
    write) dd if=/dev/urandom of=/dev/vda bs=64k seek=32 count=4 oflag=direct conv=fsync 2>/dev/null; echo "WROTE: $n" ;;
    end) break ;;
  esac
done
"#;

/// How long a guest that was told to go on may take to answer: far more
/// than TCG needs, far less than Linux's 30 s request timeout, so a stall
/// fails the test instead of hiding behind the guest's retries.
const ANSWER: Duration = Duration::from_secs(20);

/// A guest that wrote its pattern and was paused with QMP `stop`.
struct Paused {
    guest: Guest,
    qmp: Qmp,
    pattern: String,
}

fn boot_and_pause(vol: &TestVolume, qemu: &str) -> Paused {
    let qmp_path = vol.dir.path().join("qmp.sock");
    let mut qemu = Command::new(qemu);
    qemu.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    let mut guest = Guest::start(qemu, &vol.socket, SCRIPT, GuestConfig::default());
    let pattern = field(&guest.wait_for("READY: "), "READY").to_string();
    let mut qmp = Qmp::connect(&qmp_path);
    qmp.run("stop", Value::Null);
    Paused {
        guest,
        qmp,
        pattern,
    }
}

#[test]
fn a_paused_guest_continues_after_a_daemon_kill_when_nothing_changed() {
    let vol = TestVolume::create("64M");
    let daemon = Controlled::start(&vol);
    let mut paused = boot_and_pause(&vol, &reconnecting_qemu());
    let attached = daemon.status()["attached"].clone();
    assert!(!attached.is_null(), "QEMU is attached while paused");

    daemon.kill();
    let daemon = Controlled::start(&vol);
    wait_until("QEMU to reconnect", Duration::from_secs(60), || {
        !daemon.status()["attached"].is_null()
    });
    let status = daemon.status();
    assert_eq!(
        status["attached"]["attach_id"], attached["attach_id"],
        "the same QEMU, admitted: {status}"
    );
    assert!(status["last_refusal"].is_null(), "{status}");

    paused.qmp.run("cont", Value::Null);
    let guest = &mut paused.guest;
    guest.send("check 1\nwrite 2\n");
    let head = guest
        .wait_for_within("HEAD-1: ", ANSWER)
        .unwrap_or_else(|| panic!("the guest's read stalled after cont:\n{}", guest.console()));
    assert_eq!(field(&head, "HEAD-1"), paused.pattern);
    guest
        .wait_for_within("WROTE: 2", ANSWER)
        .unwrap_or_else(|| panic!("the guest's write stalled:\n{}", guest.console()));
    guest.send("end\n");
    let console = paused.guest.finish();
    assert_passed(&console);
}

/// Where ci/install-deps.sh puts a QEMU >= 9.1 (from bookworm-backports,
/// beside the system's); `REWIND_QEMU_RECONNECT` names another binary.
const RECONNECTING_QEMU: &str = "/opt/rewind-qemu-bpo/bin/qemu-system-x86_64";

/// A QEMU that can resume a paused guest on a restarted backend. Before
/// QEMU 9.1 ("vhost-user: fix lost reconnect"), a vhost-user-blk device
/// whose backend disconnects while the device is stopped (the VM paused)
/// drops its chardev event handler for good, so the reconnected socket
/// never gets the handshake (features, memory table) and `cont` starts
/// the device there with stale state: the backend refuses SET_VRING_ADDR
/// (no guest memory) and the guest's IO stalls.
fn reconnecting_qemu() -> String {
    let qemu =
        std::env::var("REWIND_QEMU_RECONNECT").unwrap_or_else(|_| RECONNECTING_QEMU.to_owned());
    let out = Command::new(&qemu).arg("--version").output();
    let text = match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        other => panic!(
            "no QEMU >= 9.1 at {qemu} ({other:?}): run ci/install-deps.sh, which unpacks one \
             from bookworm-backports, or set REWIND_QEMU_RECONNECT to one"
        ),
    };
    let version = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (9, 1),
        "{qemu} is QEMU {version}, which lacks \"vhost-user: fix lost reconnect\" (QEMU 9.1): \
         run ci/install-deps.sh or set REWIND_QEMU_RECONNECT to a QEMU >= 9.1"
    );
    qemu
}

#[test]
fn a_paused_guest_is_refused_after_a_daemon_kill_when_the_volume_was_reverted() {
    let vol = TestVolume::create("64M");
    let daemon = Controlled::start(&vol);
    let before = daemon.status()["last_lsn"].as_u64().expect("last_lsn");
    let mut paused = boot_and_pause(&vol, QEMU);

    // Meanwhile a daemon QEMU cannot reach reverts the disk to before the
    // guest's pattern.
    let control = daemon.kill();
    let aside = vol.dir.path().join("aside.sock");
    let args = ["--control-socket", control.to_str().expect("utf-8 path")];
    let meanwhile = Controlled {
        server: Server::start_at(&vol, &aside, &args),
        control: control.clone(),
    };
    meanwhile.ctl("drain", Value::Null);
    meanwhile.ctl("revert", json!({ "at": format!("lsn:{before}") }));
    let Controlled { mut server, .. } = meanwhile;
    assert!(server.stop().success(), "rewind-blk exits 0 on SIGTERM");
    let daemon = Controlled::start(&vol);

    let mut refusal = Value::Null;
    wait_until(
        "QEMU's reconnect to be refused",
        Duration::from_secs(60),
        || {
            refusal = daemon.status()["last_refusal"].clone();
            !refusal.is_null()
        },
    );
    let reason = refusal.as_str().expect("a reason");
    assert!(
        reason.contains("modified since client") && reason.contains("restart the VM"),
        "{reason}"
    );
    assert!(daemon.status()["attached"].is_null());
    paused.guest.kill();
}
