//! Input the control socket of a real `rewind-blk serve` must survive:
//! point specs built to exhaust its stack, the last request of a client
//! that shut its side down without a newline, and more connections than
//! it serves at once; the progress lines of the role changes, which may
//! wait long; and role changes past the epoch cap.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::client::{pattern, Client};
use common::{wait_until, Controlled, TestVolume, KEEP_EPOCHS, MAX_EPOCHS};
use rewind_vhost_blk::control::{MAX_CONNECTIONS, MAX_QUERIES_OVER_CAP};
use serde_json::{json, Value};

fn connect(control: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(control).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s
}

/// Sends a status request and reads the first line that comes back.
fn status_on(s: &mut UnixStream) -> Value {
    writeln!(s, r#"{{"version":1,"command":"status"}}"#).expect("send");
    let mut line = String::new();
    BufReader::new(&*s).read_line(&mut line).expect("a line");
    serde_json::from_str(&line).expect("JSON")
}

#[test]
fn a_point_spec_nested_thousands_deep_is_refused_and_the_daemon_lives() {
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    // About 54 KiB: under the 64 KiB line limit.
    let nested = format!("{}lsn:1", "branch:a@".repeat(6000));
    let dir = tempfile::tempdir().expect("tmp");
    let output = dir.path().join("at.raw");
    for (command, args) in [
        ("materialize", json!({"at": nested, "output": output})),
        (
            "export",
            json!({"at": nested, "socket_path": dir.path().join("view.sock")}),
        ),
        ("checksums", json!({"at": nested, "key": "00".repeat(32)})),
    ] {
        let err = daemon.try_ctl(command, args).expect_err(command);
        let message = err.to_string();
        assert!(
            message.contains("at most 1024 bytes"),
            "{command}: {message}"
        );
        assert!(message.len() < 2000, "{command}: {} bytes", message.len());
    }
    let nested = format!("{}lsn:1", "branch:a@".repeat(100));
    let err = daemon
        .try_ctl("checksums", json!({"at": nested, "key": "00".repeat(32)}))
        .expect_err("nested");
    assert!(err.to_string().contains("names no other branch"), "{err}");
    assert_eq!(daemon.status()["state"], "serving");
    assert!(daemon.server.stop().success());
}

#[test]
fn a_request_without_a_final_newline_is_answered() {
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    // What `printf '%s' '{...}' | socat - UNIX-CONNECT:...` sends.
    let mut s = connect(&daemon.control);
    s.write_all(br#"{"version":1,"command":"status"}"#)
        .expect("send");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("one JSON line");
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["result"]["state"], "serving", "{answer}");

    // Two requests, the second without its newline: both answered.
    let mut s = connect(&daemon.control);
    s.write_all(
        b"{\"version\":1,\"command\":\"status\"}\n{\"version\":1,\"command\":\"timeline\"}",
    )
    .expect("send");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let lines: Vec<serde_json::Value> = BufReader::new(s)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("line")).expect("JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
    assert!(lines[1]["result"]["bookmarks"].is_array(), "{lines:?}");
    assert!(daemon.server.stop().success());
}

/// Sends `command` with `args` on a new connection; every line up to the
/// answer, which is last.
fn lines_until_answer(control: &std::path::Path, command: &str, args: Value) -> Vec<Value> {
    let mut request = json!({"version": 1, "command": command});
    if let (Some(request), Value::Object(args)) = (request.as_object_mut(), args) {
        request.extend(args);
    }
    let mut s = connect(control);
    writeln!(s, "{request}").expect("send");
    let mut lines = Vec::new();
    for line in BufReader::new(s).lines() {
        let line: Value = serde_json::from_str(&line.expect("a line")).expect("JSON");
        let answered = line.get("ok").is_some();
        lines.push(line);
        if answered {
            return lines;
        }
    }
    panic!("{command}: the connection closed before the answer: {lines:?}");
}

#[test]
fn role_changes_send_progress_before_their_answer() {
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    for (command, answered_ok) in [
        // No replica: refused.
        ("handover", false),
        // The primary already.
        ("failover", true),
        // No guest attached: seals.
        ("demote", true),
        // No peer to resolve against: refused.
        ("resolve", false),
        // It holds its own seal.
        ("promote", true),
    ] {
        let args = match command {
            "promote" => json!({}),
            "resolve" => json!({"discard_this_side": true}),
            _ => json!({"timeout_ms": 1000}),
        };
        let lines = lines_until_answer(&daemon.control, command, args);
        let (answer, before) = lines.split_last().expect("an answer");
        assert_eq!(answer["ok"], answered_ok, "{command}: {answer}");
        assert!(
            !before.is_empty() && before.iter().all(|l| l["progress"].is_object()),
            "{command}: {lines:?}"
        );
    }
    // rewindctl's client reads through them.
    let again = daemon
        .try_ctl("promote", json!({}))
        .expect_err("the primary");
    assert!(again.to_string().contains("already the primary"), "{again}");
    assert!(daemon.server.stop().success());
}

/// Sends `request` on a new connection and reads the first line back.
fn ask(control: &std::path::Path, request: &str) -> Value {
    let s = connect(control);
    let mut writer = &s;
    // A refused connection is answered and closed unread: the send may fail.
    let _ = writeln!(writer, "{request}");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("a line");
    serde_json::from_str(&line).expect("JSON")
}

/// Past the cap, queries are still answered (the Pacemaker agent's
/// monitor is `rewindctl status`), while anything that would change
/// something is refused, not run late for a client that may have given up;
/// past the few connections read for a query, the refusal comes unread.
/// Once a connection ends, everything is served again.
#[test]
fn past_the_cap_only_queries_are_answered_until_a_connection_ends() {
    const STATUS: &str = r#"{"version":1,"command":"status"}"#;
    const BOOKMARK: &str = r#"{"version":1,"command":"bookmark","name":"late"}"#;
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    let mut guest = Client::connect(&vol.socket, 1);
    // Each one answered, so the daemon counts it.
    let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut s = connect(&daemon.control);
            assert_eq!(status_on(&mut s)["ok"], true);
            s
        })
        .collect();

    let status = ask(&daemon.control, STATUS);
    assert_eq!(status["result"]["state"], "serving", "{status}");
    let refused = ask(&daemon.control, BOOKMARK);
    let message = refused["error"].as_str().expect("refused");
    assert!(
        message.contains(&format!("{MAX_CONNECTIONS} control connections are open")),
        "{message}"
    );

    // Connections read for a query, all taken by clients that send
    // nothing: the next one gets the refusal without being read.
    let quiet: Vec<UnixStream> = (0..MAX_QUERIES_OVER_CAP)
        .map(|_| connect(&daemon.control))
        .collect();
    let unread = ask(&daemon.control, STATUS);
    assert!(
        unread["error"]
            .as_str()
            .is_some_and(|e| e.contains("control connections are open")),
        "{unread}"
    );
    // rewindctl reports that reason, even where its request could not be
    // sent, the connection being closed already.
    let reported = daemon
        .try_ctl("status", Value::Null)
        .expect_err("refused")
        .to_string();
    assert!(
        reported.contains("control connections are open"),
        "{reported}"
    );
    drop(quiet);
    wait_until(
        "a query to be answered again",
        Duration::from_secs(20),
        || ask(&daemon.control, STATUS)["ok"] == true,
    );

    // Those held, and the guest, are served meanwhile.
    for s in &mut held {
        assert_eq!(status_on(s)["ok"], true);
    }
    let data = pattern(7, 4096);
    assert_eq!(guest.write(0, 0, &data), 0);
    assert_eq!(guest.read(0, 0, 4096), data);

    // A connection that ends frees its place: a bookmark is taken again.
    drop(held.pop());
    wait_until("a bookmark to be taken", Duration::from_secs(20), || {
        ask(&daemon.control, BOOKMARK)["ok"] == true
    });
    let timeline = ask(&daemon.control, r#"{"version":1,"command":"timeline"}"#);
    let late = timeline["result"]["bookmarks"]
        .as_array()
        .expect("bookmarks")
        .iter()
        .filter(|b| b["name"] == "late")
        .count();
    assert_eq!(late, 1, "only the bookmark taken below the cap: {timeline}");
    drop((held, guest));
    assert!(daemon.server.stop().success());
}

/// The epochs `status` lists: (first, last, how many).
fn epochs(status: &Value) -> (u64, u64, usize) {
    let history = status["epoch_history"].as_array().expect("epoch_history");
    let epoch = |e: Option<&Value>| e.and_then(|e| e["epoch"].as_u64()).expect("an epoch");
    (epoch(history.first()), epoch(history.last()), history.len())
}

/// Past the most epochs a history lists, a promotion raises the epoch as
/// anywhere: the oldest epochs are forgotten, the newest kept, and the
/// volume opens with them.
#[test]
fn past_the_epoch_cap_a_promotion_forgets_the_oldest_epochs() {
    let vol = TestVolume::create("64M");
    vol.at_the_epoch_cap("replica");
    let mut daemon = Controlled::start(&vol);
    let promoted = daemon.ctl("promote", json!({}));
    assert_eq!(promoted["epoch"], MAX_EPOCHS + 1, "{promoted}");
    let status = daemon.status();
    assert_eq!(status["role"], "primary", "{status}");
    let kept = (
        MAX_EPOCHS + 2 - KEEP_EPOCHS as u64,
        MAX_EPOCHS + 1,
        KEEP_EPOCHS,
    );
    assert_eq!(epochs(&status), kept);
    assert!(daemon.server.stop().success());
    // It opens again, with them.
    let mut daemon = Controlled::start(&vol);
    let status = daemon.status();
    assert_eq!(status["epoch"], MAX_EPOCHS + 1);
    assert_eq!(epochs(&status), kept);
    assert!(daemon.server.stop().success());
}

/// At the cap a fence raises the epoch (the guest is cut off), and a
/// demote seals, as anywhere.
#[test]
fn at_the_epoch_cap_fence_and_demote_work() {
    let vol = TestVolume::create("64M");
    vol.at_the_epoch_cap("primary");
    let mut daemon = Controlled::start(&vol);
    let mut guest = Client::connect(&vol.socket, 1);
    assert_eq!(guest.write(0, 0, &pattern(1, 4096)), 0);
    assert_eq!(guest.flush(0), 0);
    let fenced = daemon.ctl("fence", json!({}));
    assert_eq!(fenced["epoch"], MAX_EPOCHS + 1, "{fenced}");
    assert_eq!(epochs(&daemon.status()).2, KEEP_EPOCHS);
    drop(guest);
    wait_until("the guest to be gone", Duration::from_secs(20), || {
        daemon.status()["attached"].is_null()
    });
    let demoted = daemon.ctl("demote", json!({}));
    assert_eq!(demoted["epoch"], MAX_EPOCHS + 1, "{demoted}");
    let status = daemon.status();
    assert_eq!(status["role"], "replica", "{status}");
    assert!(daemon.server.stop().success());
    let mut daemon = Controlled::start(&vol);
    assert_eq!(daemon.status()["epoch"], MAX_EPOCHS + 1);
    assert!(daemon.server.stop().success());
}
