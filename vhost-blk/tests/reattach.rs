//! The attach record across daemon restarts (issue 19, point 2), through
//! the vhost-user socket with libblkio clients, each in a process of its
//! own (the attach id is the process at the other end of the socket): a
//! client that comes back after `kill -9` of rewind-blk is admitted when
//! only the restart happened, and refused, with the reason in
//! `status.last_refusal`, when another client wrote or the volume was
//! reverted meanwhile.

mod common;

use std::time::Duration;

use common::child_client::{BlockClient, ChildClient};
use common::client::pattern;
use common::{wait_until, Controlled, TestVolume};
use serde_json::{json, Value};

/// SIGKILL and a new daemon on the same volume.
fn kill_and_restart(daemon: Controlled, vol: &TestVolume) -> Controlled {
    daemon.kill();
    Controlled::start(vol)
}

/// A client that wrote and flushed `seed`'s pattern at 0, then lost its
/// daemon to SIGKILL; returns it and the restarted daemon.
fn written_then_killed(vol: &TestVolume, seed: u8) -> (ChildClient, Controlled) {
    let daemon = Controlled::start(vol);
    let mut a = ChildClient::connect(&vol.socket, 1);
    assert_eq!(a.write(0, 0, &pattern(seed, 64 << 10)), 0);
    assert_eq!(a.flush(0), 0);
    let attached = daemon.status()["attached"]["attach_id"]["pid"].clone();
    assert_eq!(attached, json!(a.pid()), "the client is its own process");
    (a, kill_and_restart(daemon, vol))
}

/// The daemon's status once it admitted `client`. It judges a client
/// after accepting the connection, while the handshake goes on in the
/// connection's thread (the client's IO waits for the judgement), so the
/// client can finish its setup a moment before status shows it.
fn admitted(daemon: &Controlled, client: &ChildClient) -> Value {
    let pid = json!(client.pid());
    wait_until("the client admitted", Duration::from_secs(20), || {
        let status = daemon.status();
        status["attached"]["attach_id"]["pid"] == pid || !status["last_refusal"].is_null()
    });
    let status = daemon.status();
    assert_eq!(status["attached"]["attach_id"]["pid"], pid, "{status}");
    status
}

/// The refusal `client` got, as status says. The daemon judges a client
/// once it has accepted the connection, while the handshake goes on in
/// the connection's thread, so on a loaded machine the client can finish
/// its setup before the refusal ends the connection: then the refusal
/// shows in status a moment later.
fn refused(daemon: &Controlled, client: &mut ChildClient) -> String {
    let error = match client.reconnect() {
        Err(error) => error,
        Ok(()) => {
            wait_until("the refusal", Duration::from_secs(20), || {
                !daemon.status()["last_refusal"].is_null()
            });
            "set up before the refusal ended the connection".to_owned()
        }
    };
    let status = daemon.status();
    assert!(status["attached"].is_null(), "{status}");
    let reason = status["last_refusal"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains(&format!("since client {}:", client.pid()))
            && reason.contains("restart the VM"),
        "{reason} ({error})"
    );
    reason
}

#[test]
fn a_restart_alone_admits_the_client_back_to_its_disk() {
    let vol = TestVolume::create("16M");
    let (mut a, daemon) = written_then_killed(&vol, 1);
    a.reconnect().expect("admitted after the restart");
    let status = admitted(&daemon, &a);
    assert!(status["last_refusal"].is_null(), "{status}");
    assert!(a.read(0, 0, 64 << 10) == pattern(1, 64 << 10));

    // It goes, the daemon is killed again: still nothing changed.
    a.disconnect();
    wait_until("the client to be gone", Duration::from_secs(30), || {
        daemon.status()["attached"].is_null()
    });
    let daemon = kill_and_restart(daemon, &vol);
    a.reconnect().expect("admitted after the second restart");
    let status = admitted(&daemon, &a);
    assert!(status["last_refusal"].is_null(), "{status}");
}

#[test]
fn a_write_by_another_client_meanwhile_refuses_the_client() {
    let vol = TestVolume::create("16M");
    let (mut a, daemon) = written_then_killed(&vol, 1);
    let mut b = ChildClient::connect(&vol.socket, 1);
    assert_eq!(b.write(0, 1 << 20, &pattern(2, 4096)), 0);
    assert_eq!(b.flush(0), 0);
    drop(b);
    daemon.wait_detached();
    // The record, not the daemon's memory, decides.
    let daemon = kill_and_restart(daemon, &vol);
    let reason = refused(&daemon, &mut a);
    assert!(reason.contains("the journal changed the disk"), "{reason}");
}

#[test]
fn a_revert_meanwhile_refuses_the_client() {
    let vol = TestVolume::create("16M");
    let before = {
        let daemon = Controlled::start(&vol);
        let lsn = daemon.status()["last_lsn"].as_u64().expect("last_lsn");
        let Controlled { mut server, .. } = daemon;
        assert!(server.stop().success());
        lsn
    };
    let (mut a, daemon) = written_then_killed(&vol, 3);
    daemon.ctl("drain", Value::Null);
    daemon.ctl("revert", json!({ "at": format!("lsn:{before}") }));
    daemon.ctl("resume", Value::Null);
    refused(&daemon, &mut a);
    // A new client is welcome, and finds the disk as reverted.
    let mut b = ChildClient::connect(&vol.socket, 1);
    assert!(b.read(0, 0, 4096).iter().all(|&byte| byte == 0));
}

/// Runs a `ChildClient`'s process (common/child_client.rs).
#[test]
#[ignore = "the process of a ChildClient, which starts it itself"]
fn child_client() {
    common::child_client::serve();
}
