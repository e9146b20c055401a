//! `serve --bookmark-every` (and `--bookmark-qga`) on the real binary: the
//! automatic bookmarks show in `timeline`, named by their tick; a replica
//! takes none; with a guest agent they are application-consistent, and
//! crash-consistent (the guest thawed all the same) when it does not
//! answer its freeze.

mod common;

// rewindctl's fake guest agent, shared with its tests; this binary uses
// only some of its scripts.
#[path = "../../ctl/tests/common/agent.rs"]
#[allow(dead_code)]
mod agent;

use std::path::Path;
use std::time::{Duration, SystemTime};

use agent::{FakeAgent, Script};
use common::client::Client;
use common::{wait_until, Controlled, Server, TestVolume};
use serde_json::Value;

/// Long enough for two 1 s ticks on a loaded machine, each with an agent
/// that answers nothing within its 0.5 s timeouts.
const LIMIT: Duration = Duration::from_secs(60);

/// `rewind-blk serve` with a control socket and `extra` options.
fn serve(vol: &TestVolume, extra: &[&str]) -> Controlled {
    let control = vol.dir.path().join("control.sock");
    let mut args = vec!["--control-socket", control.to_str().expect("path")];
    args.extend_from_slice(extra);
    let server = Server::start(vol, &args);
    Controlled { server, control }
}

/// An automatic bookmark: its name's moment, its record's, and the flag.
#[derive(Debug)]
struct Auto {
    tick: SystemTime,
    taken: SystemTime,
    app_consistent: bool,
}

fn automatic(daemon: &Controlled) -> Vec<Auto> {
    let timeline = daemon.ctl("timeline", Value::Null);
    let time = |s: &str| humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    timeline["bookmarks"]
        .as_array()
        .expect("bookmarks")
        .iter()
        .filter_map(|b| {
            let name = b["name"].as_str().expect("name");
            Some(Auto {
                tick: time(name.strip_prefix("auto-")?),
                taken: time(b["time"].as_str().expect("time")),
                app_consistent: b["app_consistent"].as_bool().expect("app_consistent"),
            })
        })
        .collect()
}

/// Polls until `enough` holds of the automatic bookmarks taken after
/// `since`, and returns them.
fn wait_for(daemon: &Controlled, since: SystemTime, enough: impl Fn(&[Auto]) -> bool) -> Vec<Auto> {
    let mut marks = Vec::new();
    wait_until("automatic bookmarks", LIMIT, || {
        marks = automatic(daemon);
        marks.retain(|m| m.tick >= since);
        enough(&marks)
    });
    marks
}

/// Ticks at least a second apart, each bookmark taken at or after its
/// tick, soon after it.
fn check_ticks(marks: &[Auto]) {
    for pair in marks.windows(2) {
        let apart = pair[1].tick.duration_since(pair[0].tick).expect("in order");
        assert!(apart >= Duration::from_secs(1), "{marks:?}");
    }
    for m in marks {
        let late = m
            .taken
            .duration_since(m.tick)
            .expect("taken after its tick");
        assert!(late < Duration::from_secs(10), "{m:?}");
    }
}

#[test]
fn bookmarks_come_every_interval_and_none_on_a_replica() {
    let primary = TestVolume::create("4M");
    // A replica of some primary: it needs none to refuse bookmarking.
    let uuid = "5e1f0000-0000-4000-8000-000000000019";
    let replica_vol =
        TestVolume::create_with("4M", &["--segment-size", "1M", "--replica-of", uuid]);
    // The replica runs first: it has had every tick the primary had.
    let replica = serve(&replica_vol, &["--bookmark-every", "1s"]);
    let started = SystemTime::now();
    let daemon = serve(&primary, &["--bookmark-every", "1s"]);
    let marks = wait_for(&daemon, started, |m| m.len() >= 2);
    check_ticks(&marks);
    assert!(marks.iter().all(|m| !m.app_consistent), "{marks:?}");
    assert_eq!(replica.status()["role"], "replica");
    let timeline = replica.ctl("timeline", Value::Null);
    assert_eq!(timeline["bookmarks"], serde_json::json!([]), "{timeline}");
}

/// A daemon taking a bookmark every second with the fake agent running
/// `script`, and a client running its device (a guest).
struct WithAgent {
    agent: FakeAgent,
    /// Kept running until the test has counted the agent's thaws: the
    /// daemon sends a thaw after the bookmark shows in `timeline`, so
    /// stopping it at the bookmark could cut the thaw off.
    _daemon: Controlled,
    _guest: Client,
    _vol: TestVolume,
}

/// Starts [`WithAgent`] and returns it with the automatic bookmarks taken
/// while it runs, once there are two.
fn with_agent(script: Script) -> (Vec<Auto>, WithAgent) {
    let vol = TestVolume::create("4M");
    let socket = vol.dir.path().join("qga.sock");
    let agent = FakeAgent::start(&socket, script, b"");
    let daemon = serve(&vol, &qga_args(&socket));
    let guest = Client::connect(&vol.socket, 1);
    let attached = SystemTime::now();
    let marks = wait_for(&daemon, attached, |m| m.len() >= 2);
    check_ticks(&marks);
    let running = WithAgent {
        agent,
        _daemon: daemon,
        _guest: guest,
        _vol: vol,
    };
    (marks, running)
}

fn qga_args(socket: &Path) -> [&str; 4] {
    [
        "--bookmark-every",
        "1s",
        "--bookmark-qga",
        socket.to_str().expect("path"),
    ]
}

/// The freezes and thaws the agent saw, once it saw `thaws` thaws (a
/// bookmark is taken before its thaw is sent, so the last one may still
/// be on its way when the bookmarks are counted).
fn freezes_and_thaws(agent: &mut FakeAgent, thaws: usize) -> Vec<String> {
    let mut seen = Vec::new();
    wait_until("the agent's thaws", LIMIT, || {
        seen = agent
            .commands_until("guest-fsfreeze-thaw", LIMIT)
            .iter()
            .filter(|c| c.starts_with("guest-fsfreeze-"))
            .cloned()
            .collect();
        seen.iter().filter(|c| *c == "guest-fsfreeze-thaw").count() >= thaws
    });
    seen
}

#[test]
fn an_answering_agent_makes_them_application_consistent() {
    let (marks, mut running) = with_agent(agent::healthy);
    assert!(marks.iter().all(|m| m.app_consistent), "{marks:?}");
    let seen = freezes_and_thaws(&mut running.agent, 2);
    assert!(seen.len() >= 4, "{seen:?}");
    // Each freeze thawed before the next.
    for (i, c) in seen.iter().enumerate() {
        let want = ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"][i % 2];
        assert!(c == want || i + 1 == seen.len(), "{seen:?}");
    }
}

#[test]
fn an_agent_that_never_answers_gets_crash_consistent_ones_and_a_thaw() {
    let (marks, mut running) = with_agent(agent::hangs_from_freeze);
    assert!(marks.iter().all(|m| !m.app_consistent), "{marks:?}");
    let seen = freezes_and_thaws(&mut running.agent, 1);
    let freeze = seen.iter().position(|c| c == "guest-fsfreeze-freeze");
    let thaw = seen.iter().position(|c| c == "guest-fsfreeze-thaw");
    assert!(freeze.is_some() && thaw > freeze, "{seen:?}");
}
