//! Input the control socket of a real `rewind-blk serve` must survive:
//! point specs built to exhaust its stack, and the last request of a
//! client that shut its side down without a newline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Controlled, TestVolume};
use serde_json::json;

fn connect(control: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(control).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s
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
