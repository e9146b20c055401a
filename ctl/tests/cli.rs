//! `rewindctl` against a fake daemon answering on a real Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_rewindctl");

/// Serves one connection: checks the request, sends `answer`.
fn fake_daemon(socket: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut request = String::new();
        BufReader::new(stream.try_clone().expect("clone"))
            .read_line(&mut request)
            .expect("request");
        writeln!(&stream, "{answer}").expect("answer");
        request
    })
}

fn rewindctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--control")
        .arg(socket)
        .args(args)
        .output()
        .expect("run rewindctl")
}

const STATUS: &str =
    r#"{"version":1,"ok":true,"result":{"state":"serving","epoch":3,"last_lsn":42,"failed":null}}"#;

#[test]
fn status_prints_a_table_or_json() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let daemon = fake_daemon(&socket, STATUS);
    let out = rewindctl(&socket, &["status"]);
    assert!(out.status.success());
    let request: serde_json::Value =
        serde_json::from_str(&daemon.join().expect("daemon")).expect("request is JSON");
    assert_eq!(
        request,
        serde_json::json!({"version": 1, "command": "status"})
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("state     serving"), "{table}");
    assert!(table.contains("last_lsn  42"), "{table}");

    std::fs::remove_file(&socket).expect("rm");
    let daemon = fake_daemon(&socket, STATUS);
    let out = rewindctl(&socket, &["status", "--json"]);
    daemon.join().expect("daemon");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["epoch"], 3);
}

#[test]
fn failures_exit_non_zero_with_a_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");

    let out = rewindctl(&socket, &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("--control-socket"),
        "{err}"
    );

    let daemon = fake_daemon(
        &socket,
        r#"{"version":1,"ok":false,"error":"volume is fenced"}"#,
    );
    let out = rewindctl(&socket, &["status"]);
    daemon.join().expect("daemon");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused: volume is fenced"));

    std::fs::remove_file(&socket).expect("rm");
    let daemon = fake_daemon(&socket, "HTTP/1.1 400 Bad Request");
    let out = rewindctl(&socket, &["status"]);
    daemon.join().expect("daemon");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a protocol answer"));
}
