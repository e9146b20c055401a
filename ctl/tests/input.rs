//! rewindctl on bad input from its user and from daemons: errors that
//! say what was wrong, where, and nothing lost or mistaken.

use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::scripted_daemon;

const BIN: &str = env!("CARGO_BIN_EXE_rewindctl");

fn rewindctl(controls: &[&Path], args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    for control in controls {
        command.arg("--control").arg(control);
    }
    command.args(args).output().expect("run rewindctl")
}

#[test]
fn a_local_error_names_the_path_and_what_was_done() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("file");
    let (a, b) = (dir.path().join("a.ctl"), dir.path().join("b.ctl"));
    let out = rewindctl(
        &[&a, &b],
        &[
            "materialize",
            "--at",
            "-1m",
            "--output",
            file.to_str().expect("utf-8"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot create the output directory {}: File exists",
            file.display()
        )) && !err.contains("talking to the daemon"),
        "{err}"
    );
}

fn checksums(size: u64, hashes: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"version": 1, "ok": true, "result": {
        "lsn": 5, "size": size, "chunk_bytes": 4096, "hashes": hashes,
    }})
}

fn verify(ours: serde_json::Value, theirs: serde_json::Value) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let (primary, replica) = (dir.path().join("p.sock"), dir.path().join("r.sock"));
    let a = scripted_daemon(&primary, vec![ours.to_string()]);
    let b = scripted_daemon(&replica, vec![theirs.to_string()]);
    let out = rewindctl(
        &[&primary],
        &[
            "verify",
            "--at",
            "lsn:5",
            "--peer",
            replica.to_str().expect("utf-8"),
        ],
    );
    a.join().expect("primary");
    b.join().expect("replica");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn verify_refuses_hashes_it_cannot_place() {
    // A hash that is not a string is not dropped (shifting the others).
    let err = verify(
        checksums(8192, serde_json::json!(["aa", 7])),
        checksums(8192, serde_json::json!(["aa", "bb"])),
    );
    assert!(err.contains("sent 7 as hash 1, not a string"), "{err}");
    // More hashes than chunks in the size: not an offset past the end.
    let err = verify(
        checksums(100, serde_json::json!(["aa", "bb"])),
        checksums(100, serde_json::json!(["aa", "cc"])),
    );
    assert!(
        err.contains("2 hashes for 100 bytes in chunks of 4096 bytes"),
        "{err}"
    );
}

#[test]
fn a_zero_quiesce_timeout_is_refused_naming_the_option() {
    let dir = tempfile::tempdir().expect("tmp");
    let control = dir.path().join("a.ctl");
    let qga = dir.path().join("qga.sock");
    let out = rewindctl(
        &[&control],
        &[
            "bookmark",
            "b1",
            "--quiesce",
            "--qga",
            qga.to_str().expect("utf-8"),
            "--timeout",
            "0s",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--timeout") && err.contains("more than zero"),
        "{err}"
    );
}
