//! `rewindctl` against a fake daemon answering on a real Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;

use common::scripted_daemon;

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

/// All that rewindctl with `args` sends a terminal (util-linux `script`
/// gives it one), its progress bar included, while a daemon sends `lines`.
fn shown_on_a_terminal(lines: Vec<String>, args: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let daemon = scripted_daemon(&socket, lines);
    let command = format!("{BIN} --control {} {args}", socket.display());
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    daemon.join().expect("daemon");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown}");
    shown
}

fn progress(done: u64, total: u64) -> String {
    format!(r#"{{"version":1,"progress":{{"done":{done},"total":{total}}}}}"#)
}

#[test]
fn a_wait_with_nothing_to_count_draws_no_progress_bar() {
    // A count draws a bar: the terminal would show one.
    let image = r#"{"version":1,"ok":true,"result":{"output":"/x.raw","lsn":7,"size":100}}"#;
    let lines = vec![progress(0, 100), progress(50, 100), image.into()];
    let shown = shown_on_a_terminal(lines, "materialize --at lsn:7 --output /x.raw");
    assert!(shown.contains("/100 B"), "{shown:?}");

    // 0 of 0, what demote, failover and handover send while they wait: a
    // bar would be full, as if it were done.
    let demoted = r#"{"version":1,"ok":true,"result":{"role":"replica"}}"#;
    let lines = vec![progress(0, 0), progress(0, 0), demoted.into()];
    let shown = shown_on_a_terminal(lines, "demote");
    assert!(!shown.contains("0 B/0 B"), "{shown:?}");
    assert!(shown.contains("role  replica"), "{shown:?}");
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

#[test]
fn failover_commands_send_their_arguments() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let cases: Vec<(Vec<&str>, serde_json::Value)> = vec![
        (
            vec!["promote"],
            serde_json::json!({"command": "promote", "force": false, "drained": false}),
        ),
        (
            vec!["promote", "--force", "--drained"],
            serde_json::json!({"command": "promote", "force": true, "drained": true}),
        ),
        (
            vec!["demote"],
            serde_json::json!({"command": "demote", "timeout_ms": 10_000}),
        ),
        (
            vec!["demote", "--timeout", "2s"],
            serde_json::json!({"command": "demote", "timeout_ms": 2000}),
        ),
        (
            vec!["failover"],
            serde_json::json!({"command": "failover", "force": false, "timeout_ms": 10_000, "drained": false}),
        ),
        (
            vec!["failover", "--force", "--timeout", "1m", "--drained"],
            serde_json::json!({"command": "failover", "force": true, "timeout_ms": 60_000, "drained": true}),
        ),
        (
            vec!["branch-drop", "split-7"],
            serde_json::json!({"command": "branch-drop", "name": "split-7"}),
        ),
        (
            vec!["resolve", "--discard-this-side"],
            serde_json::json!({"command": "resolve", "discard_this_side": true}),
        ),
    ];
    for (args, mut want) in cases {
        let _ = std::fs::remove_file(&socket);
        let daemon = fake_daemon(
            &socket,
            r#"{"version":1,"ok":true,"result":{"role":"primary","epoch":4}}"#,
        );
        let out = rewindctl(&socket, &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "epoch  4\nrole   primary\n"
        );
        let request: serde_json::Value =
            serde_json::from_str(&daemon.join().expect("daemon")).expect("JSON");
        want["version"] = 1.into();
        assert_eq!(request, want, "{args:?}");
    }
    let out = rewindctl(&socket, &["demote", "--timeout", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("durations like"));
}

#[test]
fn resolve_without_the_flag_says_what_it_would_do_and_sends_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let out = rewindctl(&socket, &["resolve"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("become a read-only branch")
            && err.contains("becomes a replica")
            && err.contains("--discard-this-side"),
        "{err}"
    );
    assert!(listener.accept().is_err(), "nothing was sent");
}

#[test]
fn branches_are_a_table_of_ranges() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let answer = serde_json::json!({"version": 1, "ok": true, "result": {"branches": [
        {"name": "split-3", "base_lsn": 40, "first_lsn": 41, "last_lsn": 57,
         "first_time": "2026-11-30T10:00:00Z", "last_time": "2026-11-30T10:00:09.5Z",
         "epochs": [2], "records": 17, "bytes": 69632, "readable": true},
        {"name": "old", "base_lsn": 2, "first_lsn": 3, "last_lsn": 3,
         "first_time": "2026-11-29T08:00:00Z", "last_time": "2026-11-29T08:00:00Z",
         "epochs": [1], "records": 1, "bytes": 4096, "readable": false},
    ]}});
    let daemon = scripted_daemon(&socket, vec![answer.to_string()]);
    let out = rewindctl(&socket, &["branches"]);
    let request: serde_json::Value =
        serde_json::from_str(&daemon.join().expect("daemon")).expect("JSON");
    assert_eq!(
        request,
        serde_json::json!({"version": 1, "command": "branches"})
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "name     lsns   time                                            records  bytes  readable\n\
         split-3  41-57  2026-11-30T10:00:00Z to 2026-11-30T10:00:09.5Z  17       69632  true\n\
         old      3-3    2026-11-29T08:00:00Z to 2026-11-29T08:00:00Z    1        4096   false\n"
    );

    std::fs::remove_file(&socket).expect("rm");
    let none = r#"{"version":1,"ok":true,"result":{"branches":[]}}"#;
    let daemon = fake_daemon(&socket, none);
    let out = rewindctl(&socket, &["branches"]);
    daemon.join().expect("daemon");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no branches\n");

    std::fs::remove_file(&socket).expect("rm");
    let daemon = fake_daemon(&socket, none);
    let out = rewindctl(&socket, &["branches", "--json"]);
    daemon.join().expect("daemon");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"branches\":[]}\n");
}

#[test]
fn status_shows_the_roles_fields() {
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("ctl.sock");
    let answer = serde_json::json!({"version": 1, "ok": true, "result": {
        "state": "serving", "role": "primary", "node": "host-b", "sealed_lsn": 57,
        "last_record_time": "2026-11-30T10:00:09.5Z",
        "epoch_history": [{"epoch": 1, "first_lsn": 0, "node": "host-a"},
                          {"epoch": 2, "first_lsn": 58, "node": "host-b"}],
    }});
    let daemon = scripted_daemon(&socket, vec![answer.to_string()]);
    let out = rewindctl(&socket, &["status"]);
    daemon.join().expect("daemon");
    let table = String::from_utf8_lossy(&out.stdout);
    for line in [
        "node              host-b",
        "sealed_lsn        57",
        "last_record_time  2026-11-30T10:00:09.5Z",
        "epoch_history:",
        "  1  0  host-a",
        "  2  58  host-b",
    ] {
        assert!(table.lines().any(|l| l == line), "{line:?} in\n{table}");
    }
}

/// One member of a group: a fake daemon answering each connection with
/// the next of `answers`, logging `(member, command)` in `log` so a test
/// can check the order across members. Stops when the answers are used
/// up or `done` is set; returns the requests it got.
struct Member {
    socket: std::path::PathBuf,
    thread: std::cell::Cell<Option<std::thread::JoinHandle<Vec<serde_json::Value>>>>,
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

impl Member {
    fn start(dir: &Path, name: &str, answers: &[serde_json::Value], log: &Log) -> Member {
        let socket = dir.join(format!("{name}.ctl"));
        let listener = UnixListener::bind(&socket).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let (name, log) = (name.to_owned(), log.clone());
        let answers: Vec<String> = answers.iter().map(|a| a.to_string()).collect();
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut requests = Vec::new();
            for answer in answers {
                let stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if std::time::Instant::now() > deadline {
                                return requests;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                };
                stream.set_nonblocking(false).expect("blocking");
                let mut line = String::new();
                BufReader::new(stream.try_clone().expect("clone"))
                    .read_line(&mut line)
                    .expect("request");
                let request: serde_json::Value = serde_json::from_str(&line).expect("JSON");
                let command = request["command"].as_str().unwrap_or("?").to_owned();
                log.lock().expect("log").push((name.clone(), command));
                requests.push(request);
                writeln!(&stream, "{answer}").expect("answer");
            }
            requests
        });
        Member {
            socket,
            thread: Some(thread).into(),
        }
    }

    /// The requests it got, without their version (once it is done).
    fn requests(&self) -> Vec<serde_json::Value> {
        let thread = self.thread.take().expect("asked once");
        let mut requests = thread.join().expect("member");
        for r in &mut requests {
            assert_eq!(r["version"], 1);
            r.as_object_mut().expect("object").remove("version");
        }
        requests
    }
}

fn ok(result: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"version": 1, "ok": true, "result": result})
}

fn refused(error: &str) -> serde_json::Value {
    serde_json::json!({"version": 1, "ok": false, "error": error})
}

fn primary(uuid: &str) -> serde_json::Value {
    ok(serde_json::json!({"volume": uuid, "role": "primary", "state": "serving"}))
}

fn drained(already: bool) -> serde_json::Value {
    ok(serde_json::json!({"state": "drained", "already_drained": already, "last_lsn": 9}))
}

fn mark(lsn: u64) -> serde_json::Value {
    ok(serde_json::json!({"name": "pre", "lsn": lsn, "time": "2026-11-30T10:00:00Z"}))
}

fn serving() -> serde_json::Value {
    ok(serde_json::json!({"state": "serving"}))
}

/// `rewindctl --control M ... ARGS` for every member, from `dir`.
fn group_ctl(dir: &Path, members: &[&Path], args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.current_dir(dir);
    for m in members {
        command.arg("--control").arg(m);
    }
    command.args(args).output().expect("run rewindctl")
}

fn commands(requests: &[serde_json::Value]) -> Vec<&str> {
    requests
        .iter()
        .map(|r| r["command"].as_str().expect("command"))
        .collect()
}

#[test]
fn a_group_bookmark_drains_every_member_before_bookmarking_any_then_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    let script = [primary("a"), drained(false), mark(10), serving()];
    let a = Member::start(dir.path(), "a", &script, &log);
    let b = Member::start(dir.path(), "b", &script, &log);
    // Drained by its operator before: bookmarked, and left drained.
    let c = Member::start(
        dir.path(),
        "c",
        &[primary("c"), drained(true), mark(12)],
        &log,
    );
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket, &c.socket],
        &["bookmark", "pre"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        table,
        format!(
            "== {}\nlsn   10\nname  pre\ntime  2026-11-30T10:00:00Z\n\
             == {}\nlsn   10\nname  pre\ntime  2026-11-30T10:00:00Z\n\
             == {}\nlsn   12\nname  pre\ntime  2026-11-30T10:00:00Z\n",
            a.socket.display(),
            b.socket.display(),
            c.socket.display()
        )
    );
    let (ra, rb, rc) = (a.requests(), b.requests(), c.requests());
    assert_eq!(
        ra,
        [
            serde_json::json!({"command": "status"}),
            serde_json::json!({"command": "drain", "timeout_ms": 10_000}),
            serde_json::json!({"command": "bookmark", "name": "pre"}),
            serde_json::json!({"command": "resume"}),
        ]
    );
    assert_eq!(ra, rb);
    assert_eq!(commands(&rc), ["status", "drain", "bookmark"]);
    // One moment: every drain answered before any bookmark was asked,
    // every bookmark before any resume.
    let order: Vec<String> = log
        .lock()
        .expect("log")
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    let last = |c: &str| order.iter().rposition(|x| x == c).expect("seen");
    let first = |c: &str| order.iter().position(|x| x == c).expect("seen");
    assert!(last("drain") < first("bookmark"), "{order:?}");
    assert!(last("bookmark") < first("resume"), "{order:?}");
}

#[test]
fn a_member_failing_mid_group_bookmark_still_gets_the_others_resumed() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    // b's drain times out: nobody is bookmarked, a is resumed.
    let a = Member::start(
        dir.path(),
        "a",
        &[primary("a"), drained(false), serving()],
        &log,
    );
    let b = Member::start(
        dir.path(),
        "b",
        &[
            primary("b"),
            refused("drain timed out after 10s; 3 requests still in flight"),
        ],
        &log,
    );
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &["bookmark", "pre", "--json"],
    );
    assert!(!out.status.success());
    assert_eq!(commands(&a.requests()), ["status", "drain", "resume"]);
    assert_eq!(commands(&b.requests()), ["status", "drain"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        json,
        serde_json::json!([
            {"control": a.socket, "error": format!("not bookmarked: {} could not be drained", b.socket.display())},
            {"control": b.socket, "error": "drain: the daemon refused: drain timed out after 10s; 3 requests still in flight"},
        ])
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 of 2 members failed"), "{err}");

    // b refuses the bookmark itself: a keeps its bookmark, both resume.
    let dir = tempfile::tempdir().expect("tmp");
    let a = Member::start(
        dir.path(),
        "a",
        &[primary("a"), drained(false), mark(10), serving()],
        &log,
    );
    let b = Member::start(
        dir.path(),
        "b",
        &[
            primary("b"),
            drained(false),
            refused("a bookmark named pre is in the window"),
            serving(),
        ],
        &log,
    );
    let out = group_ctl(dir.path(), &[&a.socket, &b.socket], &["bookmark", "pre"]);
    assert!(!out.status.success());
    assert_eq!(
        commands(&a.requests()),
        ["status", "drain", "bookmark", "resume"]
    );
    assert_eq!(
        commands(&b.requests()),
        ["status", "drain", "bookmark", "resume"]
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("lsn   10"), "{table}");
    assert!(
        table
            .contains("error  bookmark: the daemon refused: a bookmark named pre is in the window"),
        "{table}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("1 of 2 members failed: {}", b.socket.display())),
        "{err}"
    );

    // A replica member: refused before anything is drained.
    let dir = tempfile::tempdir().expect("tmp");
    let a = Member::start(dir.path(), "a", &[primary("a")], &log);
    let replica = ok(serde_json::json!({"volume": "b", "role": "replica", "state": "serving"}));
    let b = Member::start(dir.path(), "b", &[replica], &log);
    let out = group_ctl(dir.path(), &[&a.socket, &b.socket], &["bookmark", "pre"]);
    assert!(!out.status.success());
    assert_eq!(commands(&a.requests()), ["status"]);
    assert_eq!(commands(&b.requests()), ["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("a replica takes no bookmark"), "{table}");
}

#[test]
fn a_group_materializes_one_absolute_moment_into_images_named_by_volume() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    let image = |path: &str| ok(serde_json::json!({"output": path, "lsn": 5, "size": 4096}));
    let a = Member::start(dir.path(), "a", &[primary("uuid-a"), image("a")], &log);
    let b = Member::start(dir.path(), "b", &[primary("uuid-b"), image("b")], &log);
    // The group named by a file, its paths relative to it.
    std::fs::write(
        dir.path().join("vm1.group"),
        "# vm1's disks\na.ctl\nb.ctl\n",
    )
    .expect("write");
    let before = std::time::SystemTime::now();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "--group",
            "vm1.group",
            "materialize",
            "--at",
            "-90s",
            "--output",
            "images",
        ])
        .output()
        .expect("run");
    let after = std::time::SystemTime::now();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ra, rb) = (a.requests(), b.requests());
    assert_eq!(commands(&ra), ["status", "materialize"]);
    let images = dir.path().join("images");
    assert!(images.is_dir(), "the output directory is made");
    assert_eq!(
        ra[1]["output"],
        images.join("uuid-a.img").to_str().expect("utf-8")
    );
    assert_eq!(
        rb[1]["output"],
        images.join("uuid-b.img").to_str().expect("utf-8")
    );
    assert_eq!(ra[1]["at"], rb[1]["at"], "one moment for every member");
    let at: rewind_journal::PointInTime = ra[1]["at"].as_str().expect("at").parse().expect("time");
    let ns = |t: std::time::SystemTime| {
        let since = t.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
        u64::try_from(since.as_nanos()).expect("ns") - 90_000_000_000
    };
    match at {
        rewind_journal::PointInTime::Time(t) => {
            assert!(ns(before) <= t && t <= ns(after), "{t}")
        }
        other => panic!("not an absolute time: {other}"),
    }
    let table = String::from_utf8_lossy(&out.stdout);
    // Members are named as the file names them, relative to it.
    assert!(table.starts_with("== a.ctl\nlsn     5\n"), "{table}");

    // An lsn is one volume's: refused before asking anything.
    let out = group_ctl(
        dir.path(),
        &[&dir.path().join("a.ctl"), &dir.path().join("b.ctl")],
        &["materialize", "--at", "lsn:5", "--output", "images"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a group takes a time or a bookmark"), "{err}");
}

#[test]
fn a_group_export_gives_each_member_a_socket_named_by_volume() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    let view = ok(serde_json::json!({"socket_path": "x", "lsn": 5, "writable": true}));
    let a = Member::start(dir.path(), "a", &[primary("uuid-a"), view.clone()], &log);
    let b = Member::start(dir.path(), "b", &[primary("uuid-b"), view], &log);
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &[
            "export",
            "--at",
            "bookmark:pre",
            "--socket-path",
            "views",
            "--scratch",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let views = dir.path().join("views");
    for (member, uuid) in [(a, "uuid-a"), (b, "uuid-b")] {
        let requests = member.requests();
        assert_eq!(
            requests[1],
            serde_json::json!({"command": "export", "at": "bookmark:pre", "scratch": true,
                               "socket_path": views.join(format!("{uuid}.sock"))})
        );
    }

    // Two members serving one volume (a primary and its replica) collide.
    let a = Member::start(dir.path(), "a2", &[primary("same")], &log);
    let b = Member::start(dir.path(), "b2", &[primary("same")], &log);
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &["export", "--at", "bookmark:pre", "--socket-path", "views"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("serve the same volume"));
    assert_eq!(commands(&a.requests()), ["status"]);
    assert_eq!(commands(&b.requests()), ["status"]);
}

#[test]
fn a_group_revert_needs_every_member_drained_and_takes_one_moment() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    let state = |state: &str| ok(serde_json::json!({"state": state, "attached": null}));
    let a = Member::start(dir.path(), "a", &[state("drained")], &log);
    let b = Member::start(dir.path(), "b", &[state("serving")], &log);
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &["revert", "--at", "-1m"],
    );
    assert!(!out.status.success());
    assert_eq!(commands(&a.requests()), ["status"], "nothing reverted");
    assert_eq!(commands(&b.requests()), ["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("error  the volume is serving; a group revert needs every member drained"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "error  not reverted: {} cannot be",
            b.socket.display()
        )),
        "{table}"
    );

    let dir = tempfile::tempdir().expect("tmp");
    let reverted = ok(serde_json::json!({"lsn": 30, "to_lsn": 20}));
    let a = Member::start(dir.path(), "a", &[state("drained"), reverted.clone()], &log);
    let b = Member::start(dir.path(), "b", &[state("fenced"), reverted], &log);
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &["revert", "--at", "-1m"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ra, rb) = (a.requests(), b.requests());
    assert_eq!(commands(&ra), ["status", "revert"]);
    assert_eq!(ra[1], rb[1], "the same moment for both");
    assert!(
        ra[1]["at"].as_str().expect("at").ends_with('Z'),
        "{}",
        ra[1]
    );
}

/// Whether a table has a row `key value`, however wide its key column.
fn has_row(table: &str, key: &str, value: &str) -> bool {
    table
        .lines()
        .any(|line| line.split_whitespace().eq([key, value]))
}

/// A `failover` answer; `held` is the time the member held its old
/// primary's history through.
fn promoted(sealed: Option<u64>, held: &str) -> serde_json::Value {
    ok(
        serde_json::json!({"role": "primary", "epoch": 3, "sealed_lsn": sealed,
                          "forced": sealed.is_none(), "rpo_seconds": 0.0, "took_ms": 12,
                          "already": false, "held_through_time": held}),
    )
}

#[test]
fn a_group_failover_reverts_members_ahead_to_the_moment_every_member_holds() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    let a = Member::start(
        dir.path(),
        "a",
        &[
            promoted(Some(40), "2026-11-30T10:00:09.75Z"),
            ok(serde_json::json!({"lsn": 41, "to_lsn": 38})),
            serving(),
        ],
        &log,
    );
    let b = Member::start(
        dir.path(),
        "b",
        &[promoted(Some(17), "2026-11-30T10:00:09.25Z"), serving()],
        &log,
    );
    let out = group_ctl(dir.path(), &[&a.socket, &b.socket], &["failover", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ra, rb) = (a.requests(), b.requests());
    let failover = serde_json::json!({"command": "failover", "force": false, "timeout_ms": 10_000, "drained": true});
    assert_eq!(
        ra,
        [
            failover.clone(),
            serde_json::json!({"command": "revert", "at": "2026-11-30T10:00:09.25Z"}),
            serde_json::json!({"command": "resume"}),
        ]
    );
    assert_eq!(rb, [failover, serde_json::json!({"command": "resume"})]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json[0]["result"]["reverted_to"], "2026-11-30T10:00:09.25Z");
    assert_eq!(json[0]["result"]["revert"]["to_lsn"], 38);
    assert_eq!(json[0]["result"]["sealed_lsn"], 40);
    assert_eq!(json[0]["result"]["state"], "serving");
    assert_eq!(json[1]["result"]["reverted_to"], serde_json::Value::Null);
    assert_eq!(json[1]["result"]["sealed_lsn"], 17);

    // --force reaches every member; --drained leaves them drained.
    let dir = tempfile::tempdir().expect("tmp");
    let a = Member::start(
        dir.path(),
        "a",
        &[promoted(None, "2026-11-30T10:00:09Z")],
        &log,
    );
    let b = Member::start(
        dir.path(),
        "b",
        &[promoted(None, "2026-11-30T10:00:09Z")],
        &log,
    );
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &["failover", "--force", "--timeout", "3s", "--drained"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ra = a.requests();
    assert_eq!(commands(&ra), ["failover"]);
    assert_eq!(ra[0]["force"], true);
    assert_eq!(ra[0]["timeout_ms"], 3000);
    assert_eq!(commands(&b.requests()), ["failover"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(has_row(&table, "forced", "true"), "{table}");
    assert!(has_row(&table, "state", "drained"), "{table}");
}

#[test]
fn a_group_failover_stops_at_a_failing_member_and_says_which_were_promoted() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    let a = Member::start(
        dir.path(),
        "a",
        &[promoted(Some(40), "2026-11-30T10:00:09Z")],
        &log,
    );
    let b = Member::start(
        dir.path(),
        "b",
        &[refused(
            "the primary does not answer; run with --force once its VM is fenced",
        )],
        &log,
    );
    let c = Member::start(dir.path(), "c", &[], &log);
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket, &c.socket],
        &["failover"],
    );
    assert!(!out.status.success());
    assert_eq!(commands(&a.requests()), ["failover"], "a stays drained");
    assert_eq!(commands(&b.requests()), ["failover"]);
    assert!(c.requests().is_empty(), "c is not attempted");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(has_row(&table, "state", "drained"), "{table}");
    assert!(
        table.contains("error  failover: the daemon refused: the primary does not answer"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "error  not attempted: the group failover stopped at {}",
            b.socket.display()
        )),
        "{table}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the group failover stopped: the failover of {} failed; promoted and left drained: {}",
            b.socket.display(),
            a.socket.display()
        )),
        "{err}"
    );
}

#[test]
fn a_group_runs_other_commands_on_every_member() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Log::default();
    let a = Member::start(dir.path(), "a", &[drained(false)], &log);
    let b = Member::start(dir.path(), "b", &[refused("the volume is fenced")], &log);
    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &["drain", "--timeout", "1s"],
    );
    assert!(!out.status.success());
    let want = serde_json::json!({"command": "drain", "timeout_ms": 1000, "abort": false});
    assert_eq!(a.requests(), std::slice::from_ref(&want));
    assert_eq!(b.requests(), [want]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("error  the daemon refused: the volume is fenced"),
        "{table}"
    );

    let out = group_ctl(
        dir.path(),
        &[&a.socket, &b.socket],
        &["verify", "--peer", "x"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give one --control"));
}
