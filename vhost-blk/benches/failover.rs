//! Failover: how long a replica takes from `failover` on its control
//! socket to serving its guest, and what an old primary's rejoin costs.
//!
//! Two `rewind-blk serve` daemons, X and Y, configured symmetrically as
//! `rewindctl` pairs them (each `--replication-listen` and `--replicate-to`
//! the other, mutual TLS with pinned fingerprints, loopback TCP), serve a
//! 4 GiB volume imported from an image with random data in every other MiB
//! (so a resync of the whole disk would show: 2 GiB). Every guest is its
//! own process (this benchmark run again as `failover-guest`): a node
//! keeps out a guest process it served before a role change (its attach
//! id), as it keeps out the old VM, so each failover gets a fresh one.
//!
//! "Serving" is measured by a guest already connected to the replica's
//! vhost-user socket, with a 4 KiB write parked at its closed gate: from
//! the moment the `failover` request is sent until that write and a flush
//! after it completed. Each round, the same pair, X the primary:
//!
//! 1. failover on Y, X reachable with an idle guest attached (X seals);
//!    then the time until Y streams to X (sealed, up: nothing to copy);
//! 2. failback on X (the pair up and in sync);
//! 3. failover on Y while a guest on X writes 4 KiB at random offsets at
//!    depth 32 (the seal ships the tail); then X is restarted without
//!    writes in between: the rejoin of a sealed old primary;
//! 4. Y, the primary, killed (SIGKILL): `failover --force` on X;
//! 5. 1 GiB of 1 MiB writes at random offsets on X, then Y restarted: it
//!    rejoins as X's replica; the time until X streams to it with lag 0,
//!    and X's `bytes_sent` meanwhile.
//!
//! After the rounds: a frozen primary (SIGSTOP: the host hangs, its TCP
//! connection stays open) and `failover --force` with the default seal
//! timeout; and the anchor that runs here: qemu-storage-daemon mirroring
//! (`blockdev-mirror`, background, over NBD on loopback TCP) to a second
//! qemu-storage-daemon, switched over: the source's export deleted, the
//! job cancelled once ready (the target then holds the source's data),
//! the target's NBD export deleted and a vhost-user-blk export added, and
//! a fresh guest connects and writes.
//!
//! `cargo bench -p rewind-vhost-blk --bench failover` (REWIND_BENCH_DIR
//! picks the file system, REWIND_BENCH_QUICK=1 makes a small smoke run,
//! REWIND_BENCH_LOGS=DIR keeps the daemons' logs there).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use common::replication::{free_port, identity, tls_args, volume_uuid};
use common::{wait_until, BIN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// What a failover guest writes while parked.
const PARKED: usize = 4096;

struct Scale {
    quick: bool,
    size: u64,
    segment: &'static str,
    /// The journal's limit: more than the runs write (no forced fold).
    journal_max: &'static str,
    rounds: usize,
    /// Written on the new primary before the old one rejoins.
    rejoin_bytes: u64,
    /// How long the load runs on the primary before the failover.
    load_before: Duration,
    /// Random bytes a guest writes from.
    pool: usize,
}

impl Scale {
    fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                quick,
                size: 64 * MIB,
                segment: "4M",
                journal_max: "1G",
                rounds: 1,
                rejoin_bytes: 16 * MIB,
                load_before: Duration::from_millis(300),
                pool: 4 << 20,
            }
        } else {
            Scale {
                quick,
                size: 4 * GIB,
                segment: "64M",
                journal_max: "32G",
                rounds: 3,
                rejoin_bytes: GIB,
                load_before: Duration::from_secs(2),
                pool: 64 << 20,
            }
        }
    }
}

/// Wall-clock time, to line the benchmark's steps up with the daemons'
/// log lines.
fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

fn note(what: &str) {
    eprintln!("{} {what}", now());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn kill_on_parent_death(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill
    // the child if this process dies without running its drops.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, sig) };
}

fn append_log(log: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open a log")
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One `rewind-blk serve` of a volume, restartable; its log (stderr, all
/// runs) is `dir/NAME.log`.
struct Node {
    name: &'static str,
    volume: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn new(dir: &Path, name: &'static str, volume: PathBuf, args: Vec<String>) -> Node {
        Node {
            name,
            volume,
            socket: dir.join(format!("{name}.sock")),
            control: dir.join(format!("{name}.ctl")),
            log: dir.join(format!("{name}.log")),
            args,
            child: None,
        }
    }

    /// Starts the daemon; returns once both sockets are there.
    fn start(&mut self) -> Duration {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.control);
        note(&format!("{}: start", self.name));
        let started = Instant::now();
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--num-queues", "1", "--volume"])
            .arg(&self.volume)
            .arg("--socket-path")
            .arg(&self.socket)
            .arg("--control-socket")
            .arg(&self.control)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(append_log(&self.log));
        kill_on_parent_death(&mut command);
        let mut child = command.spawn().expect("spawn rewind-blk serve");
        wait_until(self.name, Duration::from_secs(120), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, tail(&self.log));
            }
            self.socket.exists() && self.control.exists()
        });
        self.child = Some(child);
        started.elapsed()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            note(&format!("{}: SIGKILL", self.name));
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn freeze(&self) {
        note(&format!("{}: SIGSTOP", self.name));
        signal(self.child.as_ref().expect("running"), libc::SIGSTOP);
    }

    fn ctl(&self, command: &str, args: Value) -> Value {
        rewind_ctl::request(&self.control, command, args, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{}: {command}: {e}\n{}", self.name, tail(&self.log)))
    }

    fn status(&self) -> Value {
        self.ctl("status", Value::Null)
    }

    fn replication(&self) -> Value {
        self.ctl("replication", Value::Null)
    }

    fn u64(&self, value: &Value, field: &str) -> u64 {
        value[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no {field} in {value}", self.name))
    }

    /// This primary streams to its replica, no resync runs, and the
    /// replica holds every record (`lag_records` 0, all durable acked).
    fn caught_up(&self) -> bool {
        let (status, link) = (self.status(), self.replication());
        link["state"] == "streaming"
            && link["resync"].is_null()
            && link["lag_records"] == 0
            && link["acked_lsn"].as_u64() >= status["durable_lsn"].as_u64()
    }

    /// Polls `caught_up` every 5 ms; returns when it held.
    fn wait_caught_up(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        wait_until(
            &format!("{} to stream with lag 0", self.name),
            limit,
            || self.caught_up(),
        );
        started.elapsed()
    }

    fn wait_detached(&self) {
        wait_until(
            &format!("{}'s guest to detach", self.name),
            Duration::from_secs(30),
            || self.status()["attached"].is_null(),
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A guest: this benchmark run as `failover-guest SOCKET SIZE SEED POOL`,
/// driven by lines on its stdin (see `guest_main`).
struct Guest {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// libblkio's connect and start, as the guest measured them.
    connect: Duration,
}

impl Guest {
    fn start(socket: &Path, size: u64, seed: u64, scale: &Scale) -> Guest {
        let mut command = Command::new(std::env::current_exe().expect("this benchmark"));
        command
            .arg("failover-guest")
            .arg(socket)
            .args([size.to_string(), seed.to_string(), scale.pool.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        kill_on_parent_death(&mut command);
        let mut child = command.spawn().expect("spawn a guest");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut guest = Guest {
            child,
            stdin,
            stdout,
            connect: Duration::ZERO,
        };
        let line = guest.answer("connected");
        guest.connect = Duration::from_micros(line.parse().expect("connect time"));
        guest
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("tell the guest");
    }

    /// The guest's next line, which must start with `word`; the rest.
    fn answer(&mut self, word: &str) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the guest");
        let line = line.trim();
        match line.strip_prefix(word) {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("the guest said {line:?}, not {word}"),
        }
    }

    /// Submits a 4 KiB write that must not complete (the gate is closed).
    fn park(&mut self) {
        self.send("park");
        self.answer("parked");
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one failover measured.
struct Failover {
    /// From sending the request to the parked write and a flush done.
    serving: Duration,
    /// From sending the request to its answer.
    reply: Duration,
    answer: Value,
}

impl Failover {
    fn took_ms(&self) -> f64 {
        self.answer["took_ms"].as_f64().unwrap_or(f64::NAN)
    }
}

/// `failover` (with `args`) on `node`, whose guest has a write parked.
fn failover(node: &Node, guest: &mut Guest, args: Value) -> Failover {
    note(&format!("{}: failover {args}", node.name));
    let started = Instant::now();
    std::thread::scope(|s| {
        let request = s.spawn(|| {
            let answer = node.ctl("failover", args);
            (answer, started.elapsed())
        });
        guest.send("serve");
        guest.answer("done");
        let serving = started.elapsed();
        let (answer, reply) = request.join().expect("the failover request");
        note(&format!(
            "{}: serving after {:.1} ms, answered {answer}",
            node.name,
            ms(serving)
        ));
        Failover {
            serving,
            reply,
            answer,
        }
    })
}

/// What one round measured.
#[derive(Default)]
struct Round {
    idle: Vec<Failover>,
    /// After the idle failover: until the new primary streams to the
    /// sealed old one with lag 0 (from the answer), and bytes sent.
    sealed_stream: Vec<(Duration, u64)>,
    failback: Vec<Failover>,
    loaded: Vec<Failover>,
    /// Under load: records the seal shipped (the sealed lsn minus the
    /// replica's last lsn just before), the old primary's lag_records
    /// then, and the writes the load completed per second before.
    seal_records: Vec<(u64, u64, f64)>,
    /// A sealed old primary restarted without writes: (daemon start,
    /// restart to lag 0, bytes sent).
    sealed_rejoin: Vec<(Duration, Duration, u64)>,
    forced: Vec<Failover>,
    /// 1 GiB later: (write time, daemon start, restart to lag 0, bytes
    /// sent, bytes written, resync).
    rejoin: Vec<(Duration, Duration, Duration, u64, u64, Value)>,
    /// libblkio connect + start of the parked guests.
    connects: Vec<Duration>,
}

/// The pair: `nodes[p]` is the primary.
struct Pair {
    nodes: [Node; 2],
}

impl Drop for Pair {
    /// REWIND_BENCH_LOGS=DIR keeps the daemons' logs, also after a panic.
    fn drop(&mut self) {
        if let Some(logs) = std::env::var_os("REWIND_BENCH_LOGS") {
            let _ = std::fs::create_dir_all(&logs);
            for node in &self.nodes {
                let _ = std::fs::copy(
                    &node.log,
                    Path::new(&logs).join(format!("{}.log", node.name)),
                );
            }
        }
    }
}

fn bytes_sent(node: &Node) -> u64 {
    node.u64(&node.replication(), "bytes_sent")
}

/// A guest on `node` with a write parked at its gate.
fn parked_guest(pair: &Pair, node: usize, seed: u64, scale: &Scale, round: &mut Round) -> Guest {
    let n = &pair.nodes[node];
    n.wait_detached();
    let mut guest = Guest::start(&n.socket, scale.size, seed, scale);
    guest.park();
    round.connects.push(guest.connect);
    guest
}

/// A node that rejoined (Y, at the end of a round) keeps its gate fenced
/// until it is promoted: no guest can wait there. A restart makes it a
/// plain replica again, whose gate a guest may wait at.
fn unfence_replica(pair: &mut Pair) {
    let state = pair.nodes[1].status()["state"].clone();
    if state != "drained" {
        note(&format!("Y's gate is {state}: restarting Y"));
        pair.nodes[1].kill();
        pair.nodes[1].start();
        pair.nodes[0].wait_caught_up(Duration::from_secs(600));
    }
}

fn round(pair: &mut Pair, scale: &Scale, r: usize, out: &mut Round) {
    let (x, y) = (0, 1);
    let seed = 1000 * r as u64;
    pair.nodes[x].wait_caught_up(Duration::from_secs(600));

    unfence_replica(pair);

    // 1. Idle guest on X, failover on Y.
    pair.nodes[x].wait_detached();
    let idle = Guest::start(&pair.nodes[x].socket, scale.size, seed + 1, scale);
    let mut g = parked_guest(pair, y, seed + 2, scale, out);
    let sent0 = bytes_sent(&pair.nodes[y]);
    let f = failover(&pair.nodes[y], &mut g, json!({}));
    assert_eq!(f.answer["forced"], false, "{}", f.answer);
    let t = pair.nodes[y].wait_caught_up(Duration::from_secs(60));
    out.sealed_stream
        .push((t, bytes_sent(&pair.nodes[y]) - sent0));
    out.idle.push(f);
    drop(idle);
    drop(g);

    // 2. Failback on X, both up and in sync.
    let mut g = parked_guest(pair, x, seed + 3, scale, out);
    let f = failover(&pair.nodes[x], &mut g, json!({}));
    assert_eq!(f.answer["forced"], false, "{}", f.answer);
    out.failback.push(f);
    drop(g);
    pair.nodes[x].wait_caught_up(Duration::from_secs(60));

    // 3. Load on X, failover on Y.
    pair.nodes[x].wait_detached();
    let mut load = Guest::start(&pair.nodes[x].socket, scale.size, seed + 4, scale);
    let mut g = parked_guest(pair, y, seed + 5, scale, out);
    load.send(&format!("load {} 32", PARKED));
    std::thread::sleep(scale.load_before);
    let x_link = pair.nodes[x].replication();
    let y_last = pair.nodes[y].u64(&pair.nodes[y].status(), "last_lsn");
    let f = failover(&pair.nodes[y], &mut g, json!({}));
    assert_eq!(f.answer["forced"], false, "{}", f.answer);
    load.send("stop");
    let stopped = load.answer("stopped");
    note(&format!("load on X: {stopped}"));
    let rate: f64 = stopped
        .split_whitespace()
        .find_map(|w| w.strip_prefix("iops="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let sealed = pair.nodes[y].u64(&f.answer, "sealed_lsn");
    out.seal_records.push((
        sealed.saturating_sub(y_last),
        x_link["lag_records"].as_u64().unwrap_or(0),
        rate,
    ));
    out.loaded.push(f);
    drop(load);
    drop(g);
    pair.nodes[y].wait_caught_up(Duration::from_secs(60));

    // 3b. The sealed old primary restarts; nothing to copy.
    pair.nodes[x].kill();
    let sent0 = bytes_sent(&pair.nodes[y]);
    let started = Instant::now();
    let up = pair.nodes[x].start();
    pair.nodes[y].wait_caught_up(Duration::from_secs(120));
    out.sealed_rejoin
        .push((up, started.elapsed(), bytes_sent(&pair.nodes[y]) - sent0));
    note(&format!(
        "X rejoined (sealed, no writes) in {:.1} ms",
        ms(started.elapsed())
    ));

    // 4. Y, the primary, killed: failover --force on X.
    let mut g = parked_guest(pair, x, seed + 6, scale, out);
    pair.nodes[y].kill();
    wait_until("X to notice Y is gone", Duration::from_secs(30), || {
        pair.nodes[x].replication()["state"] != "streaming"
    });
    let f = failover(&pair.nodes[x], &mut g, json!({"force": true}));
    assert_eq!(f.answer["forced"], true, "{}", f.answer);
    out.forced.push(f);

    // 5. 1 GiB on X, then Y restarts and rejoins.
    let sent0 = bytes_sent(&pair.nodes[x]);
    let started = Instant::now();
    g.send(&format!("write {} {} 4", scale.rejoin_bytes, MIB));
    let written: u64 = g.answer("written").parse().expect("bytes written");
    let writing = started.elapsed();
    note(&format!(
        "X: {} MiB written in {:.1} s",
        written / MIB,
        writing.as_secs_f64()
    ));
    drop(g);
    let started = Instant::now();
    let up = pair.nodes[y].start();
    pair.nodes[x].wait_caught_up(Duration::from_secs(600));
    let took = started.elapsed();
    let link = pair.nodes[x].replication();
    note(&format!(
        "Y rejoined after {} MiB in {:.1} ms",
        written / MIB,
        ms(took)
    ));
    out.rejoin.push((
        writing,
        up,
        took,
        pair.nodes[x].u64(&link, "bytes_sent") - sent0,
        written,
        link["last_resync"].clone(),
    ));
}

/// A sparse raw image of `size` bytes with random data in every other MiB.
fn make_image(path: &Path, size: u64) -> u64 {
    let f = File::create(path).expect("image");
    f.set_len(size).expect("image size");
    let mut rng = StdRng::seed_from_u64(11);
    let mut chunk = vec![0u8; MIB as usize];
    let mut data = 0;
    for i in (0..size / MIB).step_by(2) {
        rng.fill(&mut chunk[..]);
        f.write_all_at(&chunk, i * MIB).expect("write the image");
        data += MIB;
    }
    f.sync_all().expect("sync the image");
    data
}

fn create(volume: &Path, size: u64, scale: &Scale, more: &[&str]) {
    let out = Command::new(BIN)
        .args(["create", "--size", &size.to_string()])
        .args(["--segment-size", scale.segment])
        .args(["--journal-max", scale.journal_max])
        .args(more)
        .arg("--volume")
        .arg(volume)
        .output()
        .expect("run create");
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_pair(dir: &Path, image: &Path, scale: &Scale) -> Pair {
    let (xv, yv) = (dir.join("x"), dir.join("y"));
    create(
        &xv,
        scale.size,
        scale,
        &["--from", image.to_str().expect("utf-8 path")],
    );
    create(&yv, scale.size, scale, &["--replica-of", &volume_uuid(&xv)]);
    let certs = dir.join("certs");
    let (xi, yi) = (identity(&certs, "x"), identity(&certs, "y"));
    let (xp, yp) = (free_port(), free_port());
    let args = |me, peer, listen: u16, to: u16| {
        let mut args = vec![
            "--replication-listen".to_owned(),
            format!("127.0.0.1:{listen}"),
            "--replicate-to".to_owned(),
            format!("127.0.0.1:{to}"),
        ];
        args.extend(tls_args(me, peer));
        args
    };
    let mut pair = Pair {
        nodes: [
            Node::new(dir, "X", xv, args(&xi, &yi, xp, yp)),
            Node::new(dir, "Y", yv, args(&yi, &xi, yp, xp)),
        ],
    };
    pair.nodes[1].start();
    pair.nodes[0].start();
    let started = Instant::now();
    pair.nodes[0].wait_caught_up(Duration::from_secs(1200));
    note(&format!(
        "initial sync done in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    pair
}

/// X primary and Y replica, caught up: X frozen, `failover --force` on Y
/// with the default seal timeout. Then X is killed.
fn frozen_primary(pair: &mut Pair, scale: &Scale) -> Failover {
    pair.nodes[0].wait_caught_up(Duration::from_secs(600));
    unfence_replica(pair);
    let mut round = Round::default();
    let mut g = parked_guest(pair, 1, 77, scale, &mut round);
    pair.nodes[0].freeze();
    let f = failover(&pair.nodes[1], &mut g, json!({"force": true}));
    pair.nodes[0].kill();
    f
}

/// A QMP connection; events are kept for `event`.
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects once the socket listens: QEMU creates its path at bind,
    /// a moment before it listens.
    fn connect(path: &Path) -> Qmp {
        let mut stream = None;
        wait_until("QMP to listen", Duration::from_secs(60), || {
            stream = UnixStream::connect(path).ok();
            stream.is_some()
        });
        let writer = stream.expect("connected");
        writer
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("QMP timeout");
        let reader = BufReader::new(writer.try_clone().expect("QMP socket"));
        let mut qmp = Qmp {
            writer,
            reader,
            events: Vec::new(),
        };
        qmp.next();
        qmp.run("qmp_capabilities", json!({}));
        qmp
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        assert!(
            self.reader.read_line(&mut line).expect("read QMP") > 0,
            "QMP closed"
        );
        serde_json::from_str(&line).expect("QMP speaks JSON")
    }

    fn run(&mut self, command: &str, arguments: Value) -> Value {
        let message = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{message}").expect("write QMP");
        loop {
            let v = self.next();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "{command}: {v}");
            self.events.push(v);
        }
    }

    fn event(&mut self, name: &str) -> Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let v = self.next();
            self.events.push(v);
        }
    }
}

fn qsd(name: &str, args: &[String], dir: &Path) -> Child {
    let mut command = Command::new("qemu-storage-daemon");
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(append_log(&dir.join(format!("{name}.log"))));
    kill_on_parent_death(&mut command);
    command.spawn().expect("qemu-storage-daemon")
}

fn qsd_args(image: &Path, node: &str, qmp: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=f{node},filename={}", image.display()),
        "--blockdev".into(),
        format!("driver=raw,node-name={node},file=f{node}"),
        "--chardev".into(),
        format!("socket,id=qmp,path={},server=on,wait=off", qmp.display()),
        "--monitor".into(),
        "chardev=qmp".into(),
    ]
}

/// What the anchor measured: (the target's export added, a fresh guest's
/// write + flush done), both from the first command.
fn mirror_switchover(dir: &Path, image: &Path, scale: &Scale, seed: u64) -> (Duration, Duration) {
    let dir = tempfile::tempdir_in(dir).expect("anchor dir");
    let dir = dir.path();
    let size = std::fs::metadata(image).expect("image").len();
    let target_img = dir.join("target.raw");
    File::create(&target_img)
        .and_then(|f| f.set_len(size))
        .expect("target image");
    let port = free_port();
    let (tq, sq) = (dir.join("target.qmp"), dir.join("source.qmp"));
    let mut args = qsd_args(&target_img, "t", &tq);
    args.extend([
        "--nbd-server".into(),
        format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export".into(),
        "type=nbd,id=nbd,node-name=t,name=disk,writable=on".into(),
    ]);
    let mut target = qsd("target", &args, dir);
    let source_sock = dir.join("source.sock");
    let mut args = qsd_args(image, "s", &sq);
    args.extend([
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=vs,node-name=s,addr.type=unix,addr.path={},writable=on,num-queues=1",
            source_sock.display()
        ),
    ]);
    let mut source = qsd("source", &args, dir);
    wait_until("the qsds", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok() && source_sock.exists() && sq.exists()
    });
    let (mut tqmp, mut sqmp) = (Qmp::connect(&tq), Qmp::connect(&sq));
    sqmp.run(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "nbd", "export": "disk",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
    );
    sqmp.run(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "s", "target": "nbd", "sync": "full",
               "copy-mode": "background"}),
    );
    let synced = Instant::now();
    sqmp.event("BLOCK_JOB_READY");
    note(&format!(
        "anchor: mirror ready in {:.1} s",
        synced.elapsed().as_secs_f64()
    ));
    let idle = Guest::start(&source_sock, size, seed, scale);
    let target_sock = dir.join("target.sock");

    note("anchor: switchover");
    let started = Instant::now();
    sqmp.run("block-export-del", json!({"id": "vs", "mode": "hard"}));
    sqmp.event("BLOCK_EXPORT_DELETED");
    sqmp.run("block-job-cancel", json!({"device": "m"}));
    sqmp.event("BLOCK_JOB_COMPLETED");
    tqmp.run("block-export-del", json!({"id": "nbd", "mode": "hard"}));
    tqmp.event("BLOCK_EXPORT_DELETED");
    tqmp.run(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "vt", "node-name": "t", "writable": true,
               "num-queues": 1, "addr": {"type": "unix", "path": target_sock}}),
    );
    let exported = started.elapsed();
    let mut g = Guest::start(&target_sock, size, seed + 1, scale);
    g.send("write 4096 4096 1");
    g.answer("written");
    let serving = started.elapsed();
    note(&format!(
        "anchor: exported after {:.1} ms, serving after {:.1} ms (guest connect {:.1} ms)",
        ms(exported),
        ms(serving),
        ms(g.connect)
    ));
    drop((g, idle));
    for c in [&mut source, &mut target] {
        let _ = c.kill();
        let _ = c.wait();
    }
    (exported, serving)
}

// ---- the guest process ----

/// A libblkio guest: one queue of 256, writes from a pool of random bytes.
struct Disk {
    q: Blkioq,
    _region: MemoryRegion,
    _blkio: Blkio,
    base: *mut u8,
    pool: usize,
    cursor: usize,
    rng: StdRng,
    size: u64,
    in_flight: usize,
    /// When the last request completed.
    last_done: Instant,
}

impl Disk {
    fn open(socket: &str, size: u64, seed: u64, pool: usize) -> Disk {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("libblkio");
        blkio.set_str("path", socket).expect("path");
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", 1).expect("num-queues");
        blkio.set_i32("queue-size", 256).expect("queue-size");
        let q = blkio.start().expect("start").queues.remove(0);
        let region = blkio.alloc_mem_region(pool).expect("memory");
        let base = region.addr as *mut u8;
        let mut rng = StdRng::seed_from_u64(seed);
        // SAFETY: the region is `pool` bytes, mapped, ours alone.
        rng.fill(unsafe { std::slice::from_raw_parts_mut(base, pool) });
        blkio.map_mem_region(&region).expect("map");
        Disk {
            q,
            _region: region,
            _blkio: blkio,
            base,
            pool,
            cursor: 0,
            rng,
            size,
            in_flight: 0,
            last_done: Instant::now(),
        }
    }

    fn write(&mut self, len: usize) {
        if self.cursor + len > self.pool {
            self.cursor = 0;
        }
        let offset = self.rng.random_range(0..self.size / len as u64) * len as u64;
        // SAFETY: cursor + len <= pool: inside the mapped region.
        let buf = unsafe { self.base.add(self.cursor) };
        self.cursor += len;
        self.q.write(offset, buf, len, 0, ReqFlags::empty());
        self.in_flight += 1;
    }

    fn flush(&mut self) {
        self.q.flush(0, ReqFlags::empty());
        self.in_flight += 1;
    }

    /// Waits up to `limit` for completions: how many, or why the
    /// connection failed.
    fn reap(&mut self, limit: Duration) -> Result<usize, String> {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 64];
        let mut left = limit;
        match self.q.do_io(&mut done, 1, Some(&mut left), None) {
            Ok(n) => {
                for c in &done[..n] {
                    // SAFETY: do_io initialized the first n completions.
                    let ret = unsafe { c.assume_init_read() }.ret;
                    if ret != 0 {
                        return Err(format!("a request failed: {ret}"));
                    }
                }
                self.in_flight -= n;
                Ok(n)
            }
            Err(e) if e.errno() == Errno::TIME => Ok(0),
            Err(e) => Err(e.message().to_owned()),
        }
    }

    fn drain(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while self.in_flight > 0 {
            if Instant::now() > deadline {
                return Err(format!("{} requests did not complete", self.in_flight));
            }
            self.reap(Duration::from_millis(100))?;
        }
        Ok(())
    }

    /// `len`-byte writes, `depth` in flight, while `more(submitted)`;
    /// returns the completed ones and how it ended.
    fn stream(
        &mut self,
        len: usize,
        depth: usize,
        mut more: impl FnMut(u64) -> bool,
    ) -> (u64, Result<(), String>) {
        let (mut submitted, mut completed) = (0u64, 0u64);
        self.last_done = Instant::now();
        loop {
            while self.in_flight < depth && more(submitted) {
                self.write(len);
                submitted += 1;
            }
            if self.in_flight == 0 {
                return (completed, Ok(()));
            }
            match self.reap(Duration::from_millis(20)) {
                Ok(0) => {}
                Ok(n) => {
                    completed += n as u64;
                    self.last_done = Instant::now();
                }
                Err(e) => return (completed, Err(e)),
            }
            if !more(submitted) {
                // Stopped: what is in flight finishes, or the server is gone.
                let left = self.in_flight;
                return (completed + left as u64, self.drain(Duration::from_secs(2)));
            }
        }
    }
}

/// `failover-guest SOCKET SIZE SEED POOL`: connects, prints `connected
/// US`, then runs commands from stdin: `park` (a 4 KiB write that must
/// not complete within 100 ms: `parked`), `serve` (waits for it, then a
/// flush: `done`), `load LEN DEPTH` until `stop` (`stopped ...`), `write
/// BYTES LEN DEPTH` then a flush (`written BYTES`).
fn guest_main(args: &[String]) {
    let [socket, size, seed, pool] = args else {
        panic!("failover-guest SOCKET SIZE SEED POOL");
    };
    let parse = |s: &String| s.parse::<u64>().expect("a number");
    let started = Instant::now();
    let mut disk = Disk::open(socket, parse(size), parse(seed), parse(pool) as usize);
    println!("connected {}", started.elapsed().as_micros());
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let limit = Duration::from_secs(120);
    while let Ok(line) = rx.recv() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| words[i].parse::<u64>().expect("a number");
        match words.first().copied() {
            Some("park") => {
                disk.write(PARKED);
                let got = disk.reap(Duration::from_millis(100)).expect("park");
                assert_eq!(got, 0, "the write was served: the gate is open");
                println!("parked");
            }
            Some("serve") => {
                disk.drain(limit).expect("the parked write");
                disk.flush();
                disk.drain(limit).expect("the flush");
                println!("done");
            }
            Some("load") => {
                let t = Instant::now();
                let (done, end) = disk.stream(n(1) as usize, n(2) as usize, |_| {
                    !matches!(rx.try_recv().as_deref(), Ok("stop"))
                });
                println!(
                    "stopped completed={done} iops={:.0} end={}",
                    done as f64 / disk.last_done.duration_since(t).as_secs_f64(),
                    end.err().unwrap_or_else(|| "ok".into()).replace(' ', "_")
                );
            }
            Some("write") => {
                let count = n(1) / n(2);
                let (done, end) = disk.stream(n(2) as usize, n(3) as usize, |s| s < count);
                end.expect("the writes");
                disk.flush();
                disk.drain(limit).expect("the flush");
                println!("written {}", done * n(2));
            }
            _ => panic!("unknown guest command {line:?}"),
        }
    }
}

// ---- the report ----

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A row: per-round values and their median.
fn row(name: &str, values: Vec<f64>, decimals: usize, goal: &str) {
    let each: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    println!(
        "| {name} | {} | {:.decimals$} | {goal} |",
        each.join(" / "),
        median(values)
    );
}

fn failover_rows(name: &str, f: &[Failover], goal: bool) {
    let serving: Vec<f64> = f.iter().map(|f| ms(f.serving)).collect();
    let verdict = if !goal {
        String::new()
    } else if serving.iter().all(|&s| s < 2000.0) {
        "under 2 s: met".into()
    } else {
        "under 2 s: **not met**".into()
    };
    row(
        &format!("{name}: request to the parked write + flush done, ms"),
        serving,
        1,
        &verdict,
    );
    row(
        &format!("{name}: request to its answer, ms"),
        f.iter().map(|f| ms(f.reply)).collect(),
        1,
        "",
    );
    row(
        &format!("{name}: daemon's took_ms"),
        f.iter().map(Failover::took_ms).collect(),
        0,
        "",
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("failover-guest") {
        return guest_main(&args[2..]);
    }
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let mut scale = Scale::new(std::env::var_os("REWIND_BENCH_QUICK").is_some());
    if let Some(n) = std::env::var("REWIND_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        scale.rounds = n;
    }
    let base = std::env::var_os("REWIND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).expect("bench dir");
    let dir = work.path();
    let image = dir.join("disk.raw");
    note(&format!("writing a {} MiB image", scale.size / MIB));
    let data = make_image(&image, scale.size);
    let mut pair = start_pair(dir, &image, &scale);
    // A record before the first failover: an old primary that never wrote
    // one (lsn 0) counts as a new replica and gets a full resync.
    let mut g = Guest::start(&pair.nodes[0].socket, scale.size, 1, &scale);
    g.send("write 4096 4096 1");
    g.answer("written");
    drop(g);

    let mut out = Round::default();
    for r in 0..scale.rounds {
        note(&format!("round {}", r + 1));
        round(&mut pair, &scale, r, &mut out);
    }
    let frozen = (!scale.quick).then(|| frozen_primary(&mut pair, &scale));
    drop(pair);
    let mut anchor = Vec::new();
    for r in 0..scale.rounds {
        anchor.push(mirror_switchover(dir, &image, &scale, 5000 + r as u64));
    }

    println!();
    println!(
        "{} GiB volumes ({} MiB of random data in every other MiB), segment size {}, {} rounds",
        scale.size as f64 / GIB as f64,
        data / MIB,
        scale.segment,
        scale.rounds
    );
    println!();
    println!("| measure | per round | median | goal |");
    println!("|---|---|---|---|");
    failover_rows(
        "1. failover, old primary reachable, idle guest",
        &out.idle,
        true,
    );
    row(
        "1. then: answer to the new primary streaming to the sealed old one, lag 0, ms",
        out.sealed_stream.iter().map(|s| ms(s.0)).collect(),
        1,
        "",
    );
    row(
        "1. then: bytes sent",
        out.sealed_stream.iter().map(|s| s.1 as f64).collect(),
        0,
        "",
    );
    failover_rows(
        "2. failover, old primary under 4 KiB random writes QD32",
        &out.loaded,
        false,
    );
    row(
        "2. records the seal shipped (sealed lsn - replica's last lsn just before)",
        out.seal_records.iter().map(|s| s.0 as f64).collect(),
        0,
        "",
    );
    row(
        "2. old primary's lag_records just before",
        out.seal_records.iter().map(|s| s.1 as f64).collect(),
        0,
        "",
    );
    row(
        "2. the load's writes per second (until the seal cut it)",
        out.seal_records.iter().map(|s| s.2).collect(),
        0,
        "",
    );
    failover_rows(
        "3. failover --force, old primary killed",
        &out.forced,
        false,
    );
    if let Some(f) = &frozen {
        failover_rows(
            "3. failover --force, old primary frozen (SIGSTOP), default timeout",
            std::slice::from_ref(f),
            false,
        );
    }
    row(
        &format!(
            "4. rejoin after {} MiB on the new primary: old primary's restart to lag 0, ms",
            scale.rejoin_bytes / MIB
        ),
        out.rejoin.iter().map(|j| ms(j.2)).collect(),
        0,
        "",
    );
    row(
        "4. of which the daemon's start (sockets up), ms",
        out.rejoin.iter().map(|j| ms(j.1)).collect(),
        0,
        "",
    );
    row(
        "4. bytes sent / bytes written",
        out.rejoin.iter().map(|j| j.3 as f64 / j.4 as f64).collect(),
        3,
        "about 1: records only",
    );
    row(
        "4. bytes sent, MiB",
        out.rejoin.iter().map(|j| j.3 as f64 / MIB as f64).collect(),
        1,
        "",
    );
    row(
        "4. the writes on the new primary, s",
        out.rejoin.iter().map(|j| j.0.as_secs_f64()).collect(),
        1,
        "",
    );
    let resyncs: Vec<String> = out.rejoin.iter().map(|j| j.5.to_string()).collect();
    println!(
        "| 4. last_resync on the new primary | {} | | none |",
        resyncs.join(" / ")
    );
    row(
        "4. rejoin of a sealed old primary, no writes: restart to lag 0, ms",
        out.sealed_rejoin.iter().map(|j| ms(j.1)).collect(),
        0,
        "",
    );
    row(
        "4. of which the daemon's start, ms",
        out.sealed_rejoin.iter().map(|j| ms(j.0)).collect(),
        0,
        "",
    );
    row(
        "4. bytes sent",
        out.sealed_rejoin.iter().map(|j| j.2 as f64).collect(),
        0,
        "",
    );
    failover_rows("5. failback, both up and in sync", &out.failback, true);
    row(
        "guest's libblkio connect + start (not in the times above), ms",
        out.connects.iter().map(|&c| ms(c)).collect(),
        1,
        "",
    );
    row(
        "anchor: qsd mirror switchover: command to the target's vhost-user export, ms",
        anchor.iter().map(|a| ms(a.0)).collect(),
        1,
        "",
    );
    row(
        "anchor: ... to a fresh guest's 4 KiB write + flush done (its connect included), ms",
        anchor.iter().map(|a| ms(a.1)).collect(),
        1,
        "",
    );
}
