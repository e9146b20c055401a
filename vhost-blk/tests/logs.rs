//! `--log-format json` through the real binary: every line of stderr is a
//! JSON object, and the warnings an operator acts on (here a fence and the
//! client it refuses) carry their event name and the volume's uuid. The
//! event names are all documented in OPERATIONS.md.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::client::{pattern, Client};
use common::{wait_until, workspace, TestVolume, BIN};
use rewind_journal::events;
use serde_json::{json, Value};

/// Each line of `text` as JSON; fails on one that is not an object.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => v,
            _ => panic!("not a JSON object: {line:?}\n{text}"),
        })
        .collect()
}

/// The daemon's log lines with `event` = `name`.
fn with_event<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

/// A `rewind-blk serve --log-format json` writing its stderr into a file;
/// killed if dropped.
struct Daemon {
    child: Child,
}

impl Daemon {
    /// SIGTERM; asserts a clean exit.
    fn stop(&mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let mut status = None;
        wait_until("the daemon to exit", Duration::from_secs(30), || {
            status = self.child.try_wait().expect("wait");
            status.is_some()
        });
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
    }
}

/// Serves `vol` with a control socket and the JSON log in a file; returns
/// the daemon, the control socket and the log file.
fn serve_json(vol: &TestVolume) -> (Daemon, PathBuf, PathBuf) {
    let control = vol.dir.path().join("control.sock");
    let log = vol.dir.path().join("stderr.log");
    let child = Command::new(BIN)
        .args(["serve", "--log-format", "json", "--volume"])
        .arg(&vol.path)
        .arg("--socket-path")
        .arg(&vol.socket)
        .arg("--control-socket")
        .arg(&control)
        .stdin(Stdio::null())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn serve");
    let daemon = Daemon { child };
    wait_until("the sockets", Duration::from_secs(20), || {
        vol.socket.exists() && control.exists()
    });
    (daemon, control, log)
}

/// A control request, as `rewindctl` sends it.
fn ctl(control: &Path, command: &str, args: Value) -> Value {
    rewind_ctl::request(control, command, args, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn json_log_names_the_fence_and_the_refused_client_with_the_volume() {
    let vol = TestVolume::create("16M");
    let (mut daemon, control, log) = serve_json(&vol);
    let ctl = |command: &str, args: Value| ctl(&control, command, args);
    let uuid = ctl("status", Value::Null)["volume"]
        .as_str()
        .expect("the volume's uuid")
        .to_owned();

    // Fenced with nobody attached: the next client is turned away.
    ctl("fence", json!({"timeout_ms": 10_000}));
    if let Ok(mut c) = Client::try_connect(&vol.socket, 1, false) {
        let wrote = c.write_within(0, &[1; 4096], Duration::from_millis(200));
        assert_ne!(wrote, Some(0), "a fenced volume took a write");
    }
    let read_log = || std::fs::read_to_string(&log).expect("read the log");
    wait_until("the refusal in the log", Duration::from_secs(30), || {
        read_log().contains(events::CLIENT_REFUSED)
    });
    daemon.stop();

    let text = read_log();
    let lines = json_lines(&text);
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "no {key}: {line}");
        }
    }
    let fenced = with_event(&lines, events::FENCED);
    assert_eq!(fenced.len(), 1, "{text}");
    assert_eq!(fenced[0]["level"], "WARN");
    assert_eq!(fenced[0]["volume"], uuid.as_str());
    assert_eq!(fenced[0]["epoch"], 2);
    let refused = with_event(&lines, events::CLIENT_REFUSED);
    assert!(!refused.is_empty(), "{text}");
    for line in refused {
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["volume"], uuid.as_str());
        let message = line["message"].as_str().expect("a message");
        assert!(message.contains("fenced at epoch 2"), "{message}");
    }
}

#[test]
fn a_full_journal_logs_its_forced_folds_once_a_minute_and_counts_every_one() {
    // 8 segments of 1 MiB under the default hour-long window: every MiB
    // written past the first 8 is a forced fold.
    let vol = TestVolume::create_with("16M", &["--segment-size", "1M", "--journal-max", "8M"]);
    let (mut daemon, control, log) = serve_json(&vol);
    let mut client = Client::connect(&vol.socket, 1);
    for i in 0..32u64 {
        let data = pattern(i as u8, 1 << 20);
        assert_eq!(client.write(0, (i % 16) << 20, &data), 0);
    }
    assert_eq!(client.flush(0), 0);
    let mut folds = 0;
    wait_until("forced folds", Duration::from_secs(60), || {
        folds = ctl(&control, "status", Value::Null)["forced_folds"]
            .as_u64()
            .expect("forced_folds");
        folds >= 3
    });
    daemon.stop();

    let text = std::fs::read_to_string(&log).expect("read the log");
    let lines = json_lines(&text);
    let logged = with_event(&lines, events::FORCED_FOLD);
    // One line a minute: fewer lines than folds (the folds take seconds).
    assert!(
        !logged.is_empty() && logged.len() < folds as usize,
        "{folds} forced folds, {} lines: {text}",
        logged.len()
    );
    assert_eq!(logged[0]["level"], "WARN");
    assert_eq!(logged[0]["folds"], 1, "the first fold at once: {text}");
}

#[test]
fn json_log_reports_a_failed_start_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--volume"])
        .arg(dir.path().join("none"))
        .arg("--socket-path")
        .arg(dir.path().join("sock"))
        .stdin(Stdio::null())
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let lines = json_lines(&text);
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{text}");
    assert_eq!(last["event"], events::DAEMON_FAILED, "{text}");
    let message = last["message"].as_str().expect("a message");
    assert!(message.contains("not a rewind volume"), "{message}");
}

#[test]
fn an_unknown_log_format_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["serve", "--log-format", "bogus", "--print-capabilities"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'bogus' for '--log-format <LOG_FORMAT>'")
            && err.contains("[possible values: text, json]"),
        "{err}"
    );
}

#[test]
fn every_event_is_in_the_operations_table() {
    let doc = std::fs::read_to_string(workspace().join("vhost-blk/OPERATIONS.md"))
        .expect("OPERATIONS.md");
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Log events"))
        .expect("a section \"Log events\"");
    let table: Vec<&str> = section.lines().filter(|l| l.starts_with("| `")).collect();
    for name in events::ALL {
        let row = format!("| `{name}` |");
        assert!(
            table.iter().any(|l| l.starts_with(&row)),
            "{name} is not in the table of OPERATIONS.md"
        );
    }
    assert_eq!(table.len(), events::ALL.len(), "rows for unknown events");
}
