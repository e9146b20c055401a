//! The guest agent client (rewind_ctl::qga) against a fake agent on a
//! Unix socket.

use std::time::{Duration, Instant};

use rewind_ctl::qga::{Agent, QgaError};

mod common;

use common::agent::{hangs_in_freeze, healthy, refuses_freeze, FakeAgent};

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn a_healthy_agent_freezes_and_thaws_after_a_resync() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("qga.sock");
    // What an earlier client left in the channel: a half line, an answer
    // of its own, and a delimited answer to its sync.
    let stale = b"{\"ret\xff{\"return\": 7}\n{\"return\": {}}\n";
    let mut fake = FakeAgent::start(&socket, healthy, stale);
    let mut agent = Agent::connect(&socket, SHORT).expect("connect and sync");
    assert_eq!(agent.freeze().expect("freeze"), 2);
    assert_eq!(agent.thaw().expect("thaw"), 2);
    assert_eq!(agent.freeze_status().expect("status"), "thawed");
    assert_eq!(
        fake.commands_until("guest-fsfreeze-status", SHORT),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw",
            "guest-fsfreeze-status"
        ]
    );
}

#[test]
fn a_freeze_that_never_answers_times_out_and_the_thaw_still_goes() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("qga.sock");
    let mut fake = FakeAgent::start(&socket, hangs_in_freeze, b"");
    let mut agent = Agent::connect(&socket, SHORT).expect("connect");
    let started = Instant::now();
    let err = agent.freeze().expect_err("no answer");
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            QgaError::Timeout {
                command: "guest-fsfreeze-freeze",
                ..
            }
        ),
        "{err}"
    );
    assert!(took >= SHORT && took < SHORT * 3, "{took:?}");
    assert!(err.to_string().contains("is qemu-ga running"), "{err}");
    // The thaw goes out behind a fresh sync, which skips whatever the
    // freeze may still answer.
    assert_eq!(agent.resync_and_thaw().expect("thaw"), 2);
    let seen = fake.commands_until("guest-fsfreeze-thaw", SHORT);
    assert_eq!(seen.last().map(String::as_str), Some("guest-fsfreeze-thaw"));
}

#[test]
fn a_refused_freeze_says_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("qga.sock");
    let _fake = FakeAgent::start(&socket, refuses_freeze, b"");
    let mut agent = Agent::connect(&socket, SHORT).expect("connect");
    let err = agent.freeze().expect_err("refused");
    assert!(
        matches!(&err, QgaError::Refused { class, .. } if class == "GenericError"),
        "{err}"
    );
    assert!(err.to_string().contains("Operation not supported"), "{err}");
}

#[test]
fn no_agent_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("qga.sock");
    let err = Agent::connect(&socket, SHORT).expect_err("no socket");
    assert!(matches!(err, QgaError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("org.qemu.guest_agent.0"), "{err}");
    // A socket nobody answers on (QEMU with no agent in the guest): the
    // sync times out.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let started = Instant::now();
    let err = Agent::connect(&socket, SHORT).expect_err("no answer");
    assert!(
        matches!(
            err,
            QgaError::Timeout {
                command: "guest-sync-delimited",
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < SHORT * 3);
}
