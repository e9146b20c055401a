//! `bookmark --quiesce` against a real daemon and a fake guest agent: a
//! name the daemon would refuse freezes nothing, and a Ctrl-C during the
//! freeze waits until what the operator must do was printed.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::agent::{healthy, FakeAgent};
use common::{Daemon, REWINDCTL};

#[test]
fn a_name_with_a_trailing_space_freezes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(dir.path(), "a");
    let qga = dir.path().join("qga.sock");
    let mut fake = FakeAgent::start(&qga, healthy, b"");
    let out = Command::new(REWINDCTL)
        .arg("--control")
        .arg(&daemon.control)
        .args(["bookmark", "x ", "--quiesce", "--qga"])
        .arg(&qga)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"bookmark name "x ""#), "{err}");
    let seen = fake.commands_until("guest-fsfreeze-freeze", Duration::from_millis(500));
    assert!(seen.is_empty(), "the agent was asked {seen:?}");
}

/// Freezes slowly, then cannot thaw.
fn slow_freeze_refused_thaw(command: &str) -> Option<String> {
    match command {
        "guest-fsfreeze-freeze" => {
            std::thread::sleep(Duration::from_millis(1500));
            Some(r#"{"return": 1}"#.into())
        }
        "guest-fsfreeze-thaw" => Some(
            r#"{"error": {"class": "GenericError", "desc": "failed to thaw /mnt: Input/output error"}}"#
                .into(),
        ),
        other => healthy(other),
    }
}

#[test]
fn a_ctrl_c_during_the_freeze_waits_for_the_thaw_advice() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(dir.path(), "a");
    let qga = dir.path().join("qga.sock");
    let mut fake = FakeAgent::start(&qga, slow_freeze_refused_thaw, b"");
    let child = Command::new(REWINDCTL)
        .arg("--control")
        .arg(&daemon.control)
        .args(["bookmark", "b1", "--quiesce", "--json", "--qga"])
        .arg(&qga)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let seen = fake.commands_until("guest-fsfreeze-freeze", Duration::from_secs(20));
    assert!(
        seen.iter().any(|c| c == "guest-fsfreeze-freeze"),
        "{seen:?}"
    );
    interrupt(child.id());
    let out = child.wait_with_output().expect("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("THE GUEST MAY STILL BE FROZEN") && err.contains("guest-fsfreeze-thaw"),
        "{err}"
    );
    let mark: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the bookmark");
    assert_eq!(mark["app_consistent"], true, "{mark}");
}

fn interrupt(pid: u32) {
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}
