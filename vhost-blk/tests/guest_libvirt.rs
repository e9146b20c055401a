//! libvirt for real: Debian's libvirtd (and virtlogd) run as the test's own
//! foreground processes with private directories (common/libvirt.rs),
//! define a TCG domain from qemu-configs/libvirt-domain-tcg.xml and
//! `virsh start` it on a rewind-blk socket. The guest (guest-tests/) checks
//! its disk from inside; the daemon is killed (SIGKILL) and restarted under
//! the running domain; `virsh destroy` leaves a volume that `rewindctl
//! fence` fences with nobody attached. A second test lets the shipped hook
//! (vhost-blk/libvirt/qemu-hook) start and stop rewind-blk with the domain.

mod common;

use std::path::Path;
use std::time::Duration;

use common::libvirt::{create_volume, ctl, Hook, Libvirt};
use common::{wait_until, workspace, Server, TestVolume, BIN};
use serde_json::Value;

fn attached_pid(status: &Value) -> Option<i64> {
    status["attached"]["attach_id"]["pid"].as_i64()
}

/// Writes a random pattern (O_DIRECT, fsync) of 64 KiB blocks at block
/// `seek`, reads it back and prints `KEY: its md5`.
fn write_pattern(key: &str, seek: u32, blocks: u32) -> String {
    format!(
        r#"
dd if=/dev/urandom of=/tmp/{key} bs=64k count={blocks} 2>/dev/null
dd if=/tmp/{key} of=/dev/vda bs=64k seek={seek} oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/{key}.back bs=64k skip={seek} count={blocks} iflag=direct 2>/dev/null
cmp /tmp/{key} /tmp/{key}.back
echo "{key}: $(md5sum < /tmp/{key} | cut -d' ' -f1)"
"#
    )
}

/// Writes a pattern and waits for the test (which kills and restarts
/// rewind-blk meanwhile); then reads it back, writes and checks a second
/// one on the new daemon, and waits to be destroyed.
fn through_a_restart() -> String {
    format!(
        r#"echo "SIZE: $(cat /sys/block/vda/size)"
{}
read go
dd if=/dev/vda of=/tmp/back bs=64k skip=16 count=32 iflag=direct 2>/dev/null
cmp /tmp/WROTE /tmp/back
{}
read end
"#,
        write_pattern("WROTE", 16, 32),
        write_pattern("AFTER-RESTART", 200, 16)
    )
}

/// A later boot: both patterns are on the disk.
fn check_both(first: &str, second: &str) -> String {
    format!(
        r#"
[ "$(dd if=/dev/vda bs=64k skip=16 count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "{first}" ]
[ "$(dd if=/dev/vda bs=64k skip=200 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "{second}" ]
echo "CHECKED: yes"
"#
    )
}

/// Starts the domain again with a script that checks both patterns, and
/// waits for it to pass and power off.
fn boot_and_check(lv: &Libvirt, name: &str, first: &str, second: &str) {
    lv.set_script(name, &check_both(first, second));
    let mut console = lv.start_domain(name);
    console.wait_for("CHECKED: yes");
    assert_eq!(
        value(&console.wait_for("GUEST-RESULT: "), "GUEST-RESULT"),
        "0"
    );
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_once(&format!("{key}: "))
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn a_libvirt_domain_runs_on_rewind_blk_through_a_daemon_kill_and_is_fenced_after_destroy() {
    const NAME: &str = "rewind-libvirt-kill";
    let vol = TestVolume::create("64M");
    let control = vol.dir.path().join("control.sock");
    let args = [
        "--num-queues",
        "1",
        "--control-socket",
        control.to_str().expect("path"),
    ];
    let mut server = Server::start(&vol, &args);
    let lv = Libvirt::start(None);
    lv.define(NAME, &vol.socket, &through_a_restart());
    let mut console = lv.start_domain(NAME);
    assert_eq!(
        value(&console.wait_for("SIZE: "), "SIZE"),
        ((64u64 << 20) / 512).to_string()
    );
    let first = value(&console.wait_for("WROTE: "), "WROTE").to_owned();

    // libvirt's QEMU is the client rewind-blk serves.
    let qemu = lv.qemu_pid(NAME);
    let cmdline = lv.qemu_log(NAME);
    assert!(
        cmdline.contains("vhost-user-blk-pci")
            && cmdline.contains(vol.socket.to_str().expect("path")),
        "{cmdline}"
    );
    let status = ctl(&control, &["status"]);
    assert_eq!(attached_pid(&status), Some(i64::from(qemu)), "{status}");
    let before = status["last_lsn"].as_u64().expect("last_lsn");

    // kill -9 under the running domain; the stale control socket is the
    // operator's (or the unit's) to remove.
    assert!(!server.kill().success(), "killed by SIGKILL");
    std::fs::remove_file(&control).expect("the dead daemon's control socket");
    server = Server::start(&vol, &args);
    console.send("go\n");
    let second = value(&console.wait_for("AFTER-RESTART: "), "AFTER-RESTART").to_owned();
    let status = ctl(&control, &["status"]);
    assert_eq!(
        attached_pid(&status),
        Some(i64::from(qemu)),
        "the same QEMU reconnected: {status}"
    );
    assert!(status["last_lsn"].as_u64() > Some(0), "{status}");
    assert_eq!(lv.state(NAME), "running");

    // virsh destroy: QEMU is gone, nothing is in flight, the fence takes.
    lv.virsh(&["destroy", NAME]);
    assert_eq!(lv.state(NAME), "shut off");
    wait_until("QEMU to detach", Duration::from_secs(30), || {
        ctl(&control, &["status"])["attached"].is_null()
    });
    let fence = ctl(&control, &["fence"]);
    assert_eq!(fence["state"], "fenced", "{fence}");
    assert_eq!(fence["epoch"], 2, "{fence}");
    assert!(
        fence["disconnected"].is_null(),
        "nobody to cut off: {fence}"
    );
    let status = ctl(&control, &["status"]);
    assert_eq!(
        (
            &status["state"],
            &status["io"]["in_flight"],
            &status["io"]["failed"]
        ),
        (&Value::from("fenced"), &Value::from(0), &Value::from(0)),
        "{status}"
    );
    assert_eq!(status["last_lsn"], fence["last_lsn"]);
    assert!(fence["last_lsn"].as_u64() > Some(before));

    // After unfence the domain starts again and finds both patterns.
    ctl(&control, &["unfence"]);
    boot_and_check(&lv, NAME, &first, &second);
    wait_until("the domain to power off", Duration::from_secs(60), || {
        lv.state(NAME) == "shut off"
    });
    assert!(server.stop().success(), "rewind-blk exits 0 on SIGTERM");
}

/// Writes two patterns and waits to be destroyed.
fn write_and_wait() -> String {
    format!(
        "{}{}read end\n",
        write_pattern("WROTE", 16, 32),
        write_pattern("WROTE2", 200, 16)
    )
}

fn read_pid(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // A zombie has exited; its parent is the hook, long gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn the_libvirt_hook_serves_the_volume_while_the_domain_runs() {
    const NAME: &str = "rewind-hooked";
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let volumes = dir.path().join("volumes");
    std::fs::create_dir_all(&run).expect("mkdir");
    std::fs::create_dir_all(&volumes).expect("mkdir");
    create_volume(Path::new(BIN), &volumes.join(NAME));
    let conf = format!(
        "REWIND_BLK={}\nREWIND_RUN_DIR={}\nREWIND_VOLUME_DIR={}\nREWIND_SYSTEMD=no\n\
         REWIND_SERVE_ARGS='--num-queues 1'\n",
        BIN,
        run.display(),
        volumes.display()
    );
    let script = workspace().join("vhost-blk/libvirt/qemu-hook");
    let lv = Libvirt::start(Some(Hook {
        script: &script,
        conf,
    }));
    let socket = run.join(format!("{NAME}.sock"));
    let control = run.join(format!("{NAME}.ctl"));
    let pidfile = run.join(format!("{NAME}.pid"));
    let log = run.join(format!("{NAME}.log"));
    assert!(!socket.exists());
    lv.define(NAME, &socket, &write_and_wait());

    // virsh start: the hook serves the volume before QEMU connects.
    let mut console = lv.start_domain(NAME);
    let first = value(&console.wait_for("WROTE: "), "WROTE").to_owned();
    let second = value(&console.wait_for("WROTE2: "), "WROTE2").to_owned();
    let daemon = read_pid(&pidfile).expect("the hook's pid file");
    assert!(alive(daemon));
    let status = ctl(&control, &["status"]);
    assert_eq!(
        attached_pid(&status),
        Some(i64::from(lv.qemu_pid(NAME))),
        "{status}"
    );

    // virsh destroy: the hook stops rewind-blk (drain, flush, exit).
    lv.virsh(&["destroy", NAME]);
    wait_until(
        "the hook to stop rewind-blk",
        Duration::from_secs(60),
        || !alive(daemon),
    );
    assert!(!pidfile.exists() && !socket.exists() && !control.exists());
    let text = std::fs::read_to_string(&log).expect("the daemon's log");
    assert!(text.contains("stopping: flushing the volume"), "{text}");

    // The next start serves the volume again, with what was written.
    boot_and_check(&lv, NAME, &first, &second);
    let again = read_pid(&pidfile).expect("a new pid file");
    assert_ne!(again, daemon);
    // The guest powered off: libvirt's release hook stops the daemon.
    wait_until(
        "the hook to stop rewind-blk",
        Duration::from_secs(60),
        || !alive(again),
    );
    assert_eq!(lv.state(NAME), "shut off");
    assert!(!pidfile.exists(), "{}", console.text());
}
