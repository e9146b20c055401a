//! `rewindctl` against a fake daemon answering on a real Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_rewindctl");

/// Serves one connection: reads the request, sends `answer`.
fn fake_daemon(socket: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
    scripted_daemon(socket, vec![answer.to_owned()])
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

/// A daemon that answers one request with `lines` (progress, then answer).
fn scripted_daemon(socket: &Path, lines: Vec<String>) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut request = String::new();
        BufReader::new(stream.try_clone().expect("clone"))
            .read_line(&mut request)
            .expect("request");
        for line in lines {
            writeln!(&stream, "{line}").expect("line");
        }
        request
    })
}

#[test]
fn materialize_sends_an_absolute_path_and_follows_progress() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let lines = vec![
        r#"{"version":1,"progress":{"done":0,"total":100}}"#.to_owned(),
        r#"{"version":1,"progress":{"done":100,"total":100}}"#.to_owned(),
        r#"{"version":1,"ok":true,"result":{"output":"/x/at.raw","lsn":7,"size":100}}"#.to_owned(),
    ];
    let daemon = scripted_daemon(&socket, lines);
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["--control"])
        .arg(&socket)
        .args(["materialize", "--at", "-5m", "--output", "at.raw", "--json"])
        .output()
        .expect("run");
    let request: serde_json::Value =
        serde_json::from_str(&daemon.join().expect("daemon")).expect("JSON");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(request["command"], "materialize");
    assert_eq!(request["at"], "-5m");
    let output = dir.path().join("at.raw");
    assert_eq!(request["output"], output.to_str().expect("utf-8"));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["lsn"], 7);
}

#[test]
fn bookmark_sends_its_name_and_commands_need_a_control_socket() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let daemon = fake_daemon(
        &socket,
        r#"{"version":1,"ok":true,"result":{"name":"pre","lsn":3,"time":"2026-11-22T19:36:00Z"}}"#,
    );
    let out = rewindctl(&socket, &["bookmark", "pre"]);
    let request: serde_json::Value =
        serde_json::from_str(&daemon.join().expect("daemon")).expect("JSON");
    assert_eq!(
        request,
        serde_json::json!({"version": 1, "command": "bookmark", "name": "pre"})
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("lsn   3"));

    let out = Command::new(BIN).arg("timeline").output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--control PATH is needed"));
}

/// A real volume with `first` at 0 (lsn returned), then overwritten.
fn volume_with_history(dir: &Path) -> u64 {
    use rewind_journal::{BaseImage, OpenOptions, OsStorage, Volume, VolumeSettings};
    let storage = OsStorage::shared();
    let mut settings = VolumeSettings::new(4 << 20);
    settings.segment_size = 1 << 20;
    Volume::create(
        storage.as_ref(),
        dir,
        &settings,
        BaseImage::Empty,
        &mut |_, _| {},
    )
    .expect("create");
    let (v, _) = Volume::open(storage, dir, OpenOptions::default()).expect("open");
    let first = v.write(0, &[1u8; 4096]).expect("write");
    v.write(0, &[2u8; 4096]).expect("overwrite");
    v.close().expect("close");
    first
}

/// `rewindctl materialize --volume VOL --at AT --output OUTPUT`.
fn materialize_offline(vol: &Path, at: &str, output: &Path) -> Output {
    Command::new(BIN)
        .args(["materialize", "--volume"])
        .arg(vol)
        .args(["--at", at, "--output"])
        .arg(output)
        .output()
        .expect("run rewindctl")
}

#[test]
fn offline_materialize_reads_the_volume_directory() {
    let dir = tempfile::tempdir().expect("tmp");
    let vol = dir.path().join("vol");
    let first = volume_with_history(&vol);
    let output = dir.path().join("first.raw");
    let out = materialize_offline(&vol, &format!("lsn:{first}"), &output);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(&output).expect("image");
    assert_eq!(image.len(), 4 << 20);
    assert!(image[..4096].iter().all(|&b| b == 1));
    assert!(image[4096..].iter().all(|&b| b == 0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("lsn     {first}")));

    let out = materialize_offline(&vol, "-10h", &dir.path().join("old.raw"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outside the history window") && err.contains("lsn 0"),
        "{err}"
    );
    assert!(!dir.path().join("old.raw").exists());

    // A volume its daemon holds open is refused.
    let (_held, _) = rewind_journal::Volume::open(
        rewind_journal::OsStorage::shared(),
        &vol,
        rewind_journal::OpenOptions::default(),
    )
    .expect("open");
    let out = materialize_offline(&vol, "lsn:1", &dir.path().join("busy.raw"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("open in another process"));
}

#[test]
fn each_command_sends_its_arguments() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let sock = dir.path().join("view.sock");
    let cases: Vec<(Vec<&str>, serde_json::Value)> = vec![
        (
            vec!["drain"],
            serde_json::json!({"command": "drain", "timeout_ms": 10_000, "abort": false}),
        ),
        (
            vec!["drain", "--timeout", "2500ms", "--abort"],
            serde_json::json!({"command": "drain", "timeout_ms": 2500, "abort": true}),
        ),
        (vec!["resume"], serde_json::json!({"command": "resume"})),
        (
            vec!["fence", "--timeout", "1m"],
            serde_json::json!({"command": "fence", "timeout_ms": 60_000}),
        ),
        (vec!["unfence"], serde_json::json!({"command": "unfence"})),
        (
            vec!["revert", "--at", "-90s"],
            serde_json::json!({"command": "revert", "at": "-90s"}),
        ),
        (
            vec![
                "export",
                "--at",
                "lsn:5",
                "--socket-path",
                "view.sock",
                "--scratch",
            ],
            serde_json::json!({"command": "export", "at": "lsn:5", "socket_path": sock, "scratch": true}),
        ),
        (
            vec!["unexport", "--socket-path", "view.sock"],
            serde_json::json!({"command": "unexport", "socket_path": sock}),
        ),
    ];
    for (args, mut want) in cases {
        let _ = std::fs::remove_file(&socket);
        let daemon = fake_daemon(
            &socket,
            r#"{"version":1,"ok":true,"result":{"state":"drained"}}"#,
        );
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .arg("--control")
            .arg(&socket)
            .args(&args)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "state  drained\n");
        let request: serde_json::Value =
            serde_json::from_str(&daemon.join().expect("daemon")).expect("JSON");
        want["version"] = 1.into();
        assert_eq!(request, want, "{args:?}");
    }
    let out = rewindctl(&socket, &["drain", "--timeout", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("durations like"));
    let out = rewindctl(&socket, &["export", "--at", "-5m"]);
    assert!(!out.status.success(), "--socket-path is required");
}

/// Answers `answers.len()` connections in turn, one answer line each;
/// returns the requests.
fn daemon_answering(socket: &Path, answers: Vec<String>) -> std::thread::JoinHandle<Vec<String>> {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        answers
            .into_iter()
            .map(|answer| {
                let (stream, _) = listener.accept().expect("accept");
                let mut request = String::new();
                BufReader::new(stream.try_clone().expect("clone"))
                    .read_line(&mut request)
                    .expect("request");
                writeln!(&stream, "{answer}").expect("answer");
                request
            })
            .collect()
    })
}

fn checksums(lsn: u64, hashes: &[&str]) -> String {
    serde_json::json!({"version": 1, "ok": true, "result": {
        "lsn": lsn, "size": 3 << 20, "chunk_bytes": 1 << 20, "hashes": hashes,
    }})
    .to_string()
}

#[test]
fn verify_compares_both_sides_at_the_acked_lsn_and_fails_on_a_difference() {
    let dir = tempfile::tempdir().expect("tmp");
    let (primary, replica) = (dir.path().join("p.sock"), dir.path().join("r.sock"));
    let link = r#"{"version":1,"ok":true,"result":{"acked_lsn":41}}"#.to_owned();
    let ours = daemon_answering(&primary, vec![link, checksums(41, &["a", "b", "c"])]);
    let theirs = daemon_answering(&replica, vec![checksums(41, &["a", "x", "c"])]);
    let out = rewindctl(
        &primary,
        &["verify", "--peer", replica.to_str().expect("utf-8")],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a difference fails the command: {table}"
    );
    assert!(table.contains("equal            false"), "{table}");
    assert!(
        table.contains("1048576  1048576"),
        "the second MiB differs: {table}"
    );
    let requests = ours.join().expect("primary");
    let asked: serde_json::Value = serde_json::from_str(&requests[1]).expect("json");
    assert_eq!(asked["command"], "checksums");
    assert_eq!(asked["at"], "lsn:41");
    let key = asked["key"].as_str().expect("key");
    assert_eq!(key.len(), 64, "a 256-bit key");
    let peer: serde_json::Value =
        serde_json::from_str(&theirs.join().expect("replica")[0]).expect("json");
    assert_eq!(peer["key"], key, "both sides hash with the same key");
    assert_eq!(
        peer["at"], "lsn:41",
        "the peer hashes the lsn the primary resolved"
    );
}

#[test]
fn replication_wait_follows_a_resync_until_streaming_and_fails_when_outdated() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("p.sock");
    let link = |state: &str, resync: serde_json::Value, error: &str| {
        serde_json::json!({"version": 1, "ok": true, "result": {
            "state": state, "resync": resync, "last_error": error, "acked_lsn": 7,
            "lag_records": 0,
        }})
        .to_string()
    };
    let syncing = serde_json::json!({"sync_lsn": 7, "done_bytes": 1, "total_bytes": 2});
    let daemon = daemon_answering(
        &socket,
        vec![
            link("syncing", syncing, ""),
            link("streaming", serde_json::Value::Null, ""),
        ],
    );
    let out = rewindctl(&socket, &["replication", "--wait", "--timeout", "10s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("state ") && l.ends_with(" streaming")),
        "{table}"
    );
    assert_eq!(daemon.join().expect("daemon").len(), 2);

    let _ = std::fs::remove_file(&socket);
    let daemon = daemon_answering(
        &socket,
        vec![link(
            "outdated",
            serde_json::Value::Null,
            "the replica refused: fenced",
        )],
    );
    let out = rewindctl(&socket, &["replication", "--wait"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outdated: the replica refused: fenced"),
        "{err}"
    );
    daemon.join().expect("daemon");
}
