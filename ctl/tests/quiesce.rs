//! `bookmark --quiesce` against real `rewind-blk serve` daemons, with a
//! fake guest agent (the guest test in vhost-blk/tests/guest_quiesce.rs
//! has a real one): the bookmark is marked app-consistent, the guest is
//! thawed and the volume resumed whatever fails, and without an agent the
//! command fails or, if asked, falls back to a crash-consistent bookmark.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::agent::{
    hangs_from_freeze, hangs_in_freeze, healthy, refuses_freeze, refuses_thaw, FakeAgent, Script,
};
use common::{Daemon, REWINDCTL};

fn rewindctl(controls: &[&Path], args: &[&str]) -> Output {
    let mut command = Command::new(REWINDCTL);
    for control in controls {
        command.arg("--control").arg(control);
    }
    command.args(args).output().expect("run rewindctl")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn bookmarks(control: &Path) -> Vec<Value> {
    let timeline = json_of(&rewindctl(&[control], &["timeline", "--json"]));
    timeline["bookmarks"].as_array().expect("bookmarks").clone()
}

fn state(control: &Path) -> Value {
    json_of(&rewindctl(&[control], &["status", "--json"]))["state"].clone()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_quiesced_bookmark_is_app_consistent_and_reports_the_freeze() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(dir.path(), "a");
    let qga = dir.path().join("qga.sock");
    let mut fake = FakeAgent::start(&qga, healthy, b"");
    let qga_arg = qga.to_str().expect("utf-8");
    let out = rewindctl(
        &[&daemon.control],
        &["bookmark", "q1", "--quiesce", "--qga", qga_arg, "--json"],
    );
    let mark = json_of(&out);
    assert_eq!(mark["name"], "q1");
    assert_eq!(mark["app_consistent"], true, "{mark}");
    assert_eq!(mark["frozen_filesystems"], 2, "{mark}");
    for timing in ["frozen_ms", "agent_freeze_ms"] {
        assert!(mark[timing].as_f64().is_some_and(|ms| ms >= 0.0), "{mark}");
    }
    assert_eq!(
        fake.commands_until("guest-fsfreeze-thaw", Duration::from_secs(5)),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw"
        ]
    );
    // A plain bookmark beside it is not.
    json_of(&rewindctl(
        &[&daemon.control],
        &["bookmark", "plain", "--json"],
    ));
    let marks = bookmarks(&daemon.control);
    assert_eq!(marks[0]["name"], "q1");
    assert_eq!(marks[0]["app_consistent"], true);
    assert_eq!(marks[1]["app_consistent"], false);
    assert_eq!(state(&daemon.control), "serving");
    let table = rewindctl(&[&daemon.control], &["timeline"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let q1 = table
        .lines()
        .find(|l| l.contains(" q1 "))
        .expect("q1's row");
    assert!(q1.ends_with("  app_consistent"), "{table}");
    let plain = table.lines().find(|l| l.contains(" plain ")).expect("row");
    assert!(!plain.contains("app_consistent"), "{table}");

    let out = rewindctl(
        &[&daemon.control],
        &["bookmark", "q2", "--quiesce", "--qga", qga_arg],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("app_consistent      true"), "{shown}");
    assert!(shown.contains("frozen_ms "), "{shown}");
}

#[test]
fn without_an_answering_agent_it_fails_or_falls_back_if_asked() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(dir.path(), "a");
    let qga = dir.path().join("qga.sock");
    let qga_arg = qga.to_str().expect("utf-8");
    let quiesce = ["--quiesce", "--qga", qga_arg, "--timeout", "500ms"];

    let out = rewindctl(
        &[&daemon.control],
        &[&["bookmark", "q1"][..], &quiesce].concat(),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no application-consistent bookmark") && err.contains("cannot connect"),
        "{err}"
    );
    assert!(bookmarks(&daemon.control).is_empty());

    // An agent socket with nobody answering (no qemu-ga in the guest).
    let listener = std::os::unix::net::UnixListener::bind(&qga).expect("bind");
    let args = [
        &["bookmark", "q1"][..],
        &quiesce,
        &["--fallback-crash-consistent"],
    ]
    .concat();
    let out = rewindctl(&[&daemon.control], &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("took a crash-consistent bookmark") && err.contains("did not answer"),
        "{err}"
    );
    let marks = bookmarks(&daemon.control);
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0]["app_consistent"], false);
    assert_eq!(state(&daemon.control), "serving");
    drop(listener);
}

/// `bookmark q1 --quiesce --timeout 500ms` with an agent that hangs as
/// `script` says: fails within two timeouts (the freeze's, the thaw's)
/// and some slack for a loaded machine, after sending the thaw, with
/// nothing bookmarked and the volume serving. Returns its stderr.
fn hung_bookmark(script: Script) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(dir.path(), "a");
    let qga = dir.path().join("qga.sock");
    let mut fake = FakeAgent::start(&qga, script, b"");
    let qga_arg = qga.to_str().expect("utf-8");
    let started = Instant::now();
    let args = [
        "bookmark",
        "q1",
        "--quiesce",
        "--qga",
        qga_arg,
        "--timeout",
        "500ms",
    ];
    let out = rewindctl(&[&daemon.control], &args);
    let took = started.elapsed();
    assert!(!out.status.success());
    assert!(took < Duration::from_millis(2500), "{took:?}");
    let seen = fake.commands_until("guest-fsfreeze-thaw", Duration::from_secs(5));
    assert_eq!(seen.last().map(String::as_str), Some("guest-fsfreeze-thaw"));
    assert!(bookmarks(&daemon.control).is_empty());
    assert_eq!(state(&daemon.control), "serving");
    let err = stderr(&out);
    assert!(
        err.contains("did not answer guest-fsfreeze-freeze"),
        "{err}"
    );
    err
}

#[test]
fn a_freeze_that_hangs_fails_within_the_timeout_and_thaws() {
    let err = hung_bookmark(hangs_in_freeze);
    assert!(err.contains("thawed the guest"), "{err}");
}

#[test]
fn an_agent_stuck_in_its_freeze_fails_the_command_loudly_within_two_timeouts() {
    let err = hung_bookmark(hangs_from_freeze);
    assert!(
        err.contains("THE GUEST MAY STILL BE FROZEN") && !err.contains("thawed the guest"),
        "{err}"
    );
}

#[test]
fn a_refused_freeze_and_a_taken_name_freeze_nothing_for_long() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(dir.path(), "a");
    let qga = dir.path().join("qga.sock");
    let mut fake = FakeAgent::start(&qga, refuses_freeze, b"");
    let qga_arg = qga.to_str().expect("utf-8");
    let out = rewindctl(
        &[&daemon.control],
        &["bookmark", "q1", "--quiesce", "--qga", qga_arg],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Operation not supported"), "{err}");
    assert!(bookmarks(&daemon.control).is_empty());

    // A name that is taken is refused before any freeze.
    json_of(&rewindctl(
        &[&daemon.control],
        &["bookmark", "q1", "--json"],
    ));
    let before = fake
        .commands_until("guest-fsfreeze-thaw", Duration::from_secs(5))
        .len();
    let out = rewindctl(
        &[&daemon.control],
        &["bookmark", "q1", "--quiesce", "--qga", qga_arg],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(
        fake.commands_until("never", Duration::from_millis(200))
            .len(),
        before
    );
}

#[test]
fn a_thaw_that_fails_fails_the_command_loudly_with_what_to_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(dir.path(), "a");
    let qga = dir.path().join("qga.sock");
    let _fake = FakeAgent::start(&qga, refuses_thaw, b"");
    let qga_arg = qga.to_str().expect("utf-8");
    let out = rewindctl(
        &[&daemon.control],
        &["bookmark", "q1", "--quiesce", "--qga", qga_arg, "--json"],
    );
    assert!(!out.status.success());
    // The bookmark was taken: it is shown, and the volume serves.
    let mark: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(mark["app_consistent"], true, "{mark}");
    assert_eq!(state(&daemon.control), "serving");
    let err = stderr(&out);
    assert!(
        err.contains("THE GUEST MAY STILL BE FROZEN")
            && err.contains("Input/output error")
            && err.contains("guest-fsfreeze-thaw")
            && err.contains(qga_arg),
        "{err}"
    );
}

#[test]
fn a_group_freezes_every_guest_and_bookmarks_every_volume() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b) = (
        Daemon::start(dir.path(), "a"),
        Daemon::start(dir.path(), "b"),
    );
    let (qa, qb) = (dir.path().join("qa.sock"), dir.path().join("qb.sock"));
    let mut fakes = [
        FakeAgent::start(&qa, healthy, b""),
        FakeAgent::start(&qb, healthy, b""),
    ];
    let (qa, qb) = (qa.to_str().expect("utf-8"), qb.to_str().expect("utf-8"));
    let controls = [a.control.as_path(), b.control.as_path()];
    let args = [
        "bookmark",
        "g1",
        "--quiesce",
        "--qga",
        qa,
        "--qga",
        qb,
        "--json",
    ];
    let report = json_of(&rewindctl(&controls, &args));
    for (member, control) in report.as_array().expect("a list").iter().zip(controls) {
        assert_eq!(member["control"], control.to_str().expect("utf-8"));
        assert_eq!(member["result"]["app_consistent"], true, "{report}");
        assert!(member["result"]["frozen_ms"].is_number(), "{report}");
        assert_eq!(bookmarks(control)[0]["app_consistent"], true);
        assert_eq!(state(control), "serving");
    }
    for fake in &mut fakes {
        let seen = fake.commands_until("guest-fsfreeze-thaw", Duration::from_secs(5));
        assert_eq!(seen.last().map(String::as_str), Some("guest-fsfreeze-thaw"));
    }

    // One agent hangs: both guests are thawed, nobody is bookmarked.
    let qc = dir.path().join("qc.sock");
    let mut hung = FakeAgent::start(&qc, hangs_in_freeze, b"");
    let qc = qc.to_str().expect("utf-8");
    let args = [
        "bookmark",
        "g2",
        "--quiesce",
        "--qga",
        qa,
        "--qga",
        qc,
        "--timeout",
        "500ms",
    ];
    let out = rewindctl(&controls, &args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
    for control in controls {
        assert_eq!(bookmarks(control).len(), 1);
        assert_eq!(state(control), "serving");
    }
    for fake in [&mut fakes[0], &mut hung] {
        let seen = fake.commands_until("guest-fsfreeze-thaw", Duration::from_secs(5));
        assert_eq!(seen.last().map(String::as_str), Some("guest-fsfreeze-thaw"));
    }

    let out = rewindctl(&controls, &["bookmark", "g3", "--quiesce", "--qga", qa]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("one --qga per --control"),
        "{}",
        stderr(&out)
    );
}
