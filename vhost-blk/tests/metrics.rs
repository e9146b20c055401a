//! `serve --metrics-listen`: the Prometheus metrics, scraped over HTTP
//! during libblkio load, the same text through `rewindctl metrics`,
//! promtool's checks of the text and of the shipped alert rules, and the
//! listeners (with the control socket's) when the daemon runs out of file
//! descriptors.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::client::{pattern, Client};
use common::load::Load;
use common::{wait_until, workspace, Server, TestVolume};

/// A port nobody listens on now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One HTTP request; the status line and the body.
fn http(address: SocketAddr, request: &str) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    Ok((head.to_string(), body.to_string()))
}

fn scrape(address: SocketAddr) -> String {
    let (head, body) =
        http(address, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").expect("scrape");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// The value of the one series named `name` whose labels include every
/// `labels` pair.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| {
            l.rsplit(' ')
                .next()
                .expect("a value")
                .parse()
                .expect("a number")
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?} in\n{text}");
    found[0]
}

fn op(text: &str, name: &str, op: &str) -> f64 {
    value(text, name, &[("op", op)])
}

fn promtool(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed (Debian's prometheus package; ci/install-deps.sh): {e}")
        });
    let mut input = child.stdin.take().expect("promtool's stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("write to promtool");
    drop(input);
    let out = child.wait_with_output().expect("promtool's output");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rewindctl_metrics(control: &Path) -> String {
    let out = Command::new(common::libvirt::rewindctl())
        .arg("--control")
        .arg(control)
        .arg("metrics")
        .output()
        .expect("run rewindctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn status(control: &Path) -> serde_json::Value {
    rewind_ctl::request(control, "status", serde_json::Value::Null, &mut |_, _| {}).expect("status")
}

#[test]
fn metrics_move_with_the_guests_io_and_match_rewindctl() {
    let vol = TestVolume::create("64M");
    let control = vol.dir.path().join("control.sock");
    let address = free_port();
    let _server = Server::start(
        &vol,
        &[
            "--control-socket",
            control.to_str().unwrap(),
            "--metrics-listen",
            &address.to_string(),
        ],
    );
    wait_until("the metrics listener", Duration::from_secs(20), || {
        TcpStream::connect(address).is_ok()
    });
    let uuid = status(&control)["volume"].as_str().unwrap().to_string();

    let before = scrape(address);
    for line in before.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains(&format!("volume=\"{uuid}\"")), "{line}");
    }
    assert_eq!(op(&before, "rewind_io_requests_total", "write"), 0.0);
    assert_eq!(op(&before, "rewind_io_requests_total", "flush"), 0.0);
    assert_eq!(value(&before, "rewind_role", &[("role", "primary")]), 1.0);
    assert_eq!(
        value(&before, "rewind_gate_state", &[("state", "serving")]),
        1.0
    );
    assert_eq!(value(&before, "rewind_replication_enabled", &[]), 0.0);
    // Nothing folded or held yet on a new volume (a 1 h window).
    assert_eq!(value(&before, "rewind_fold_bytes_total", &[]), 0.0);
    assert_eq!(value(&before, "rewind_fold_seconds_total", &[]), 0.0);
    assert_eq!(value(&before, "rewind_storage_held_requests", &[]), 0.0);
    let journal_before = value(&before, "rewind_journal_bytes", &[]);

    // Scrapes during load: the write counter rises while it runs.
    let load = Load::default();
    std::thread::scope(|s| {
        let _stop = load.stop_on_drop();
        let writer = s.spawn(|| load.run(&vol.socket));
        let mut last = 0.0;
        for round in 0..3 {
            wait_until(
                &format!("the write counter to pass {last} (round {round})"),
                Duration::from_secs(30),
                || {
                    let now = op(&scrape(address), "rewind_io_requests_total", "write");
                    assert!(now >= last, "a counter went down: {last} -> {now}");
                    let rose = now > last;
                    if rose {
                        last = now;
                    }
                    rose
                },
            );
        }
        // The journal grows past the segments it started with.
        wait_until("the journal to grow", Duration::from_secs(60), || {
            value(&scrape(address), "rewind_journal_bytes", &[]) > journal_before
        });
        let during = scrape(address);
        assert_eq!(value(&during, "rewind_client_attached", &[]), 1.0);
        load.stop();
        writer.join().unwrap();
    });
    assert!(load.completed() > 0);
    assert_eq!(load.errors(), 0);

    // Every write the client saw completed is counted, with its bytes and
    // a latency; nothing else was asked for.
    let after = scrape(address);
    let writes = load.completed() as f64;
    assert_eq!(op(&after, "rewind_io_requests_total", "write"), writes);
    assert_eq!(
        op(&after, "rewind_io_bytes_total", "write"),
        writes * 4096.0
    );
    assert_eq!(op(&after, "rewind_io_errors_total", "write"), 0.0);
    assert_eq!(
        op(&after, "rewind_io_request_duration_seconds_count", "write"),
        writes
    );
    assert_eq!(
        value(
            &after,
            "rewind_io_request_duration_seconds_bucket",
            &[("op", "write"), ("le", "+Inf")]
        ),
        writes
    );
    assert!(op(&after, "rewind_io_request_duration_seconds_sum", "write") > 0.0);
    assert_eq!(op(&after, "rewind_io_requests_total", "read"), 0.0);
    assert!(value(&after, "rewind_io_modifying_total", &[]) >= writes);
    assert!(value(&after, "rewind_last_lsn", &[]) >= writes);
    assert_eq!(value(&after, "rewind_io_failed_total", &[]), 0.0);

    // One client: writes, a read and a flush, each counted as such.
    wait_until(
        "the load's client to detach",
        Duration::from_secs(30),
        || status(&control)["attached"].is_null(),
    );
    let mut client = Client::connect(&vol.socket, 1);
    let data = pattern(7, 64 << 10);
    for i in 0..3 {
        assert_eq!(client.write(0, i * (64 << 10), &data), 0);
    }
    assert_eq!(client.read(0, 0, data.len()), data);
    assert_eq!(client.flush(0), 0);
    let idle = scrape(address);
    assert_eq!(op(&idle, "rewind_io_requests_total", "write"), writes + 3.0);
    assert_eq!(
        op(&idle, "rewind_io_bytes_total", "write"),
        writes * 4096.0 + 3.0 * 65536.0
    );
    assert_eq!(op(&idle, "rewind_io_requests_total", "read"), 1.0);
    assert_eq!(op(&idle, "rewind_io_bytes_total", "read"), 65536.0);
    assert_eq!(op(&idle, "rewind_io_requests_total", "flush"), 1.0);
    let s = status(&control);
    assert_eq!(
        value(&idle, "rewind_journal_bytes", &[]),
        s["journal_bytes"].as_f64().unwrap()
    );
    assert_eq!(
        value(&idle, "rewind_durable_lsn", &[]),
        s["durable_lsn"].as_f64().unwrap()
    );
    assert_eq!(
        value(&idle, "rewind_journal_segments", &[("state", "used")]),
        s["segments_used"].as_f64().unwrap()
    );

    // rewindctl prints what a scrape gets (the idle volume's numbers hold
    // still, but a window may tick between two reads: retry a few times).
    let mut same = false;
    for _ in 0..20 {
        let (ctl, scraped) = (rewindctl_metrics(&control), scrape(address));
        if ctl == scraped {
            same = true;
            break;
        }
    }
    assert!(same, "rewindctl metrics never matched a scrape");

    // promtool accepts the text, with and without traffic in it.
    promtool(&["check", "metrics"], Some(&before));
    promtool(&["check", "metrics"], Some(&idle));

    // Bad requests get errors; the listener keeps serving.
    let (head, _) = http(address, "GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
    let (head, _) = http(address, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
    let (head, _) = http(address, "garbage\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let (head, _) = http(address, &long).unwrap();
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    scrape(address);
    drop(client);
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = workspace().join("vhost-blk/prometheus/rewind-alerts.yml");
    promtool(&["check", "rules", rules.to_str().unwrap()], None);
}

#[test]
fn a_taken_metrics_port_fails_the_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let vol = TestVolume::create("16M");
    let out = Command::new(common::BIN)
        .args(["serve", "--volume"])
        .arg(&vol.path)
        .arg("--socket-path")
        .arg(&vol.socket)
        .arg("--metrics-listen")
        .arg(taken.local_addr().unwrap().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot serve metrics on"), "{stderr}");
}

/// The metrics text of a node, through its control socket.
fn node_metrics(node: &common::replication::Node) -> String {
    node.ctl("metrics", serde_json::Value::Null)["text"]
        .as_str()
        .expect("text")
        .to_string()
}

#[test]
fn replication_series_follow_the_link() {
    use common::replication::Pair;
    let mut pair = Pair::start(&[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    let data = pattern(3, 64 << 10);
    for i in 0..8 {
        assert_eq!(client.write(0, i * (64 << 10), &data), 0);
    }
    assert_eq!(client.flush(0), 0);
    let acked = pair.caught_up() as f64;

    let primary = node_metrics(&pair.primary);
    assert_eq!(value(&primary, "rewind_replication_enabled", &[]), 1.0);
    assert_eq!(
        value(
            &primary,
            "rewind_replication_state",
            &[("state", "streaming")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &primary,
            "rewind_replication_state",
            &[("state", "disconnected")]
        ),
        0.0
    );
    assert!(value(&primary, "rewind_replication_acked_lsn", &[]) >= acked);
    assert_eq!(value(&primary, "rewind_replication_lag_records", &[]), 0.0);
    assert_eq!(value(&primary, "rewind_replication_lag_bytes", &[]), 0.0);
    assert_eq!(value(&primary, "rewind_replication_rpo_seconds", &[]), 0.0);
    // On the wire, compressed: more than nothing.
    assert!(value(&primary, "rewind_replication_sent_bytes_total", &[]) > 0.0);
    assert_eq!(value(&primary, "rewind_role", &[("role", "primary")]), 1.0);
    promtool(&["check", "metrics"], Some(&primary));

    let replica = node_metrics(&pair.replica);
    assert_eq!(value(&replica, "rewind_role", &[("role", "replica")]), 1.0);
    assert_eq!(
        value(
            &replica,
            "rewind_replication_state",
            &[("state", "streaming")]
        ),
        1.0
    );
    assert_eq!(op(&replica, "rewind_io_requests_total", "write"), 0.0);
    promtool(&["check", "metrics"], Some(&replica));

    // The replica goes away: the primary's link leaves streaming, and
    // what it writes now is lag.
    pair.replica.kill();
    wait_until(
        "the link to leave streaming",
        Duration::from_secs(30),
        || {
            let text = node_metrics(&pair.primary);
            value(&text, "rewind_replication_state", &[("state", "streaming")]) == 0.0
        },
    );
    assert_eq!(client.write(0, 0, &data), 0);
    assert_eq!(client.flush(0), 0);
    wait_until("lag to show", Duration::from_secs(30), || {
        let text = node_metrics(&pair.primary);
        value(&text, "rewind_replication_lag_records", &[]) > 0.0
            && value(&text, "rewind_replication_lag_bytes", &[]) > 0.0
    });
    drop(client);
}

/// The daemon's CPU time so far (user and system, all its threads).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("its stat");
    // After the command name in parentheses: state is field 3, utime 14.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat's command")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// The daemon's limit on open files: the one it had when `limit` is None,
/// else the one set.
fn file_limit(pid: u32, limit: Option<libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new = limit
        .as_ref()
        .map_or(std::ptr::null(), |l| l as *const libc::rlimit);
    // SAFETY: prlimit on our own child; `new` is null or points to `limit`
    // and `old` to a local, both alive across the call.
    let done = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, new, &mut old) };
    assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// With no file descriptor left, the control socket's and the metrics
/// listener's accepts fail (EMFILE) for as long as that lasts: each
/// listener pauses before it tries again instead of spinning a CPU, and
/// both serve the connections that waited once descriptors are free.
#[test]
fn out_of_file_descriptors_the_listeners_wait_then_serve() {
    let vol = TestVolume::create("64M");
    let control = vol.dir.path().join("control.sock");
    let address = free_port();
    let server = Server::start(
        &vol,
        &[
            "--control-socket",
            control.to_str().unwrap(),
            "--metrics-listen",
            &address.to_string(),
        ],
    );
    // Both listeners are bound before the guest's socket, which start
    // waited for, and nothing has connected. Once the daemon's descriptors
    // stay the same, a limit at its lowest free descriptor number lets it
    // open no more: each accept fails.
    let pid = server.pid();
    let descriptors = || -> Vec<u64> {
        let mut open: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("its descriptors")
            .map(|e| {
                let name = e.expect("a descriptor").file_name();
                name.to_string_lossy().parse().expect("a number")
            })
            .collect();
        open.sort_unstable();
        open
    };
    let mut open = descriptors();
    wait_until("its descriptors to settle", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(50));
        let now = descriptors();
        std::mem::replace(&mut open, now) == open
    });
    let lowest_free = (0..).find(|n| !open.contains(n)).expect("a free number");
    let old = file_limit(pid, None);
    file_limit(
        pid,
        Some(libc::rlimit {
            rlim_cur: lowest_free,
            rlim_max: old.rlim_max,
        }),
    );
    // Each listener's thread waits in accept with a descriptor number
    // taken already, so the first connection to each is accepted: the
    // control socket's is closed (it needs a second descriptor to answer
    // on), the metrics listener answers its scrape. Those after them wait.
    let waiting: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&control).expect("connect"))
        .collect();
    assert!(scrape(address).contains("rewind_role"));
    let mut scrape_waiting = TcpStream::connect(address).expect("connect");
    scrape_waiting
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("send");
    // A window to measure a rate in, not a wait for an event.
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_time(pid) - before;
    assert!(
        spent < Duration::from_millis(250),
        "the daemon spent {spent:?} of CPU in 1 s with its listeners out of descriptors"
    );
    let log = std::fs::read_to_string(vol.socket.with_extension("log")).expect("its log");
    let failed = log.matches("control socket accept failed").count();
    assert!(
        (1..=30).contains(&failed),
        "{failed} accept warnings in 1 s"
    );

    // Served once descriptors are free again: those that waited, then new
    // ones.
    file_limit(pid, Some(old));
    let answered = waiting
        .into_iter()
        .filter(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut line = String::new();
            writeln!(s, r#"{{"version":1,"command":"status"}}"#).is_ok()
                && BufReader::new(s).read_line(&mut line).is_ok()
                && line.contains(r#""ok":true"#)
        })
        .count();
    assert_eq!(answered, 3, "waiting control clients answered, of 4");
    scrape_waiting
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut answer = String::new();
    scrape_waiting
        .read_to_string(&mut answer)
        .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // The listener reads on until its client closes.
    drop(scrape_waiting);
    assert_eq!(status(&control)["state"], "serving");
    assert!(scrape(address).contains("rewind_role"));
}
