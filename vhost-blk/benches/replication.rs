//! Replication: what shipping the journal to a replica costs, measured with
//! the same libblkio client (one queue of 256; four for one row) against
//!
//! - `rewind-blk serve` without replication,
//! - a primary `rewind-blk` replicating to a replica `rewind-blk` over
//!   loopback TCP + mutual TLS, in async and in sync mode,
//! - qemu-storage-daemon alone (vhost-user-blk export of a raw image),
//! - and the anchor: qemu-storage-daemon with a `blockdev-mirror` job to a
//!   second qemu-storage-daemon's NBD export over loopback TCP
//!   (`copy-mode=background` and `copy-mode=write-blocking`; the latter
//!   also with the NBD export on a Unix socket, which QEMU 7.2's NBD server
//!   needs to be fast: it does not set TCP_NODELAY).
//!
//! Every setup serves a copy of the same prefilled raw image. Server CPU
//! is every daemon of a setup (primary and replica; source and target),
//! from `/proc/PID/stat` (which keeps the time of threads that exited),
//! from the start of a run until the replica (or the mirror target) caught
//! up after it; a full run drops the page cache before each workload (see
//! `drop_caches`). Then: the RPO of async replication under steady paced
//! writes, the stream's throughput against loopback references, and the
//! initial sync of a half-written volume against `cp --sparse=always`.
//!
//! `cargo bench -p rewind-vhost-blk --bench replication` (REWIND_BENCH_DIR
//! picks the file system, REWIND_BENCH_QUICK=1 makes a small smoke run).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_rewind-blk");
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Queues every server offers; the four-queue row uses them all, the
/// others one.
const QUEUES: usize = 4;
/// Journal limit of the benchmark's 1 GiB volumes: large enough that no
/// run reaches it (a forced fold would measure the applier instead).
const JOURNAL_MAX: &str = "32G";

/// Sizes and durations of a run.
struct Scale {
    quick: bool,
    /// Size of the volumes and images of the IOPS and latency rows.
    size: u64,
    rounds: usize,
    qd32: Duration,
    qd1: Duration,
    rpo_run: Duration,
    bulk_run: Duration,
    /// Initial sync: the volume's size; half of it is written.
    sync_size: u64,
    loopback: Duration,
    /// Random bytes each client writes from (so zstd finds nothing to
    /// compress, as with real data that does not compress).
    pool: usize,
}

impl Scale {
    fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                quick,
                size: 64 * MIB,
                rounds: 1,
                qd32: Duration::from_millis(500),
                qd1: Duration::from_millis(500),
                rpo_run: Duration::from_secs(1),
                bulk_run: Duration::from_secs(1),
                sync_size: 64 * MIB,
                loopback: Duration::from_millis(200),
                pool: 8 << 20,
            }
        } else {
            Scale {
                quick,
                size: GIB,
                rounds: 3,
                qd32: Duration::from_secs(4),
                qd1: Duration::from_secs(4),
                rpo_run: Duration::from_secs(20),
                bulk_run: Duration::from_secs(10),
                sync_size: 4 * GIB,
                loopback: Duration::from_secs(3),
                pool: 64 << 20,
            }
        }
    }
}

/// A child process, killed when dropped (also on a panic); its stderr goes
/// to a log file, shown when something waits on it in vain.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Daemon {
        let err = File::create(&log).expect("create a daemon log");
        command.stdout(Stdio::null()).stderr(err);
        // SAFETY: prctl is async-signal-safe; this only asks the kernel to
        // kill the child if the benchmark dies without running its drops.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// User + system CPU of the whole process, exited threads included.
    fn cpu(&self) -> Duration {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_else(|e| panic!("{} is gone ({e}):\n{}", self.name, self.log_tail()));
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("/proc/PID/stat has a comm")
            .1
            .split_whitespace()
            .collect();
        let field = |i: usize| -> u64 {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .expect("utime and stime in /proc/PID/stat")
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_nanos((field(11) + field(12)) * 1_000_000_000 / hz)
    }

    /// Panics with the log if the process exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.log_tail());
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every `every` until it holds; panics after `limit`.
fn wait_until(what: &str, limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(every);
    }
}

fn wait_for_path(path: &Path, daemon: &mut Daemon) {
    wait_until(
        &path.display().to_string(),
        Duration::from_secs(60),
        Duration::from_millis(10),
        || {
            daemon.check_alive();
            path.exists()
        },
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on loopback")
        .port()
}

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One request to a `rewind-blk` control socket (ctl/PROTOCOL.md): the
/// answer's `result`.
fn ctl(control: &Path, command: &str) -> Result<Value, String> {
    let mut stream = UnixStream::connect(control).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{}", json!({"version": 1, "command": command})).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let answer: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
    if answer["ok"] != true {
        return Err(format!("{command}: {answer}"));
    }
    Ok(answer["result"].clone())
}

/// A node's TLS identity, from `rewind-blk cert`.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
    fingerprint: String,
}

fn identity(dir: &Path, name: &str) -> Identity {
    let out = run(Command::new(BIN)
        .args(["cert", "--name", name, "--out"])
        .arg(dir));
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    Identity {
        cert: field("certificate").map_or_else(|| dir.join(format!("{name}.crt")), PathBuf::from),
        key: field("key").map_or_else(|| dir.join(format!("{name}.key")), PathBuf::from),
        fingerprint: field("fingerprint")
            .unwrap_or_else(|| panic!("`rewind-blk cert` printed no fingerprint: {out}")),
    }
}

fn tls_args(me: &Identity, peer: &Identity) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        me.cert.display().to_string(),
        "--tls-key".into(),
        me.key.display().to_string(),
        "--tls-peer-fingerprint".into(),
        peer.fingerprint.clone(),
    ]
}

/// `rewind-blk create`; returns the volume's directory.
fn create_volume(dir: &Path, name: &str, size: u64, args: &[&str]) -> PathBuf {
    let volume = dir.join(name);
    run(Command::new(BIN)
        .args(["create", "--size", &size.to_string()])
        .args(args)
        .arg("--volume")
        .arg(&volume));
    volume
}

fn volume_uuid(volume: &Path) -> String {
    let text = std::fs::read_to_string(volume.join("volume.json")).expect("volume.json");
    let json: Value = serde_json::from_str(&text).expect("volume.json is JSON");
    json["uuid"]
        .as_str()
        .expect("volume.json names its uuid")
        .to_owned()
}

/// `rewind-blk serve` of `volume` on `dir/NAME.sock`, control socket
/// `dir/NAME.ctl`; waits for the vhost-user socket.
fn serve(dir: &Path, name: &str, volume: &Path, extra: &[String]) -> (Daemon, PathBuf, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let control = dir.join(format!("{name}.ctl"));
    let mut daemon = Daemon::spawn(
        name,
        Command::new(BIN)
            .args(["serve", "--num-queues", &QUEUES.to_string(), "--volume"])
            .arg(volume)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--control-socket")
            .arg(&control)
            .args(extra),
        dir.join(format!("{name}.log")),
    );
    wait_for_path(&socket, &mut daemon);
    (daemon, socket, control)
}

/// A QMP connection to a qemu-storage-daemon.
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects once the socket listens: QEMU creates its path at bind,
    /// a moment before it listens.
    fn connect(path: &Path) -> Qmp {
        let mut stream = None;
        wait_until(
            "QMP to listen",
            Duration::from_secs(60),
            Duration::from_millis(10),
            || {
                stream = UnixStream::connect(path).ok();
                stream.is_some()
            },
        );
        let stream = stream.expect("connected");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("QMP timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone the QMP socket"));
        let mut qmp = Qmp { stream, reader };
        let greeting = qmp.line();
        assert!(greeting.get("QMP").is_some(), "not QMP: {greeting}");
        qmp.execute("qmp_capabilities", Value::Null)
            .expect("qmp_capabilities");
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "qemu-storage-daemon closed QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs a command; events that arrive meanwhile are skipped.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut message = json!({ "execute": command });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        writeln!(self.stream, "{message}").expect("write to QMP");
        loop {
            let answer = self.line();
            if let Some(r) = answer.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = answer.get("error") {
                return Err(format!("{command}: {e}"));
            }
        }
    }

    /// The mirror job: (ready, len, offset).
    fn job(&mut self) -> (bool, u64, u64) {
        let jobs = self
            .execute("query-block-jobs", Value::Null)
            .expect("query-block-jobs");
        let job = jobs
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["device"] == "m"))
            .unwrap_or_else(|| panic!("the mirror job is gone: {jobs}"));
        (
            job["ready"] == true,
            job["len"].as_u64().unwrap_or(0),
            job["offset"].as_u64().unwrap_or(0),
        )
    }
}

/// What else a setup must wait for after writes: the replica or the
/// mirror target to catch up.
enum Follower {
    None,
    Rewind { control: PathBuf },
    Mirror { qmp: Qmp },
}

/// One server setup the client measures.
struct Setup {
    label: &'static str,
    socket: PathBuf,
    follower: Follower,
    /// Every process whose CPU counts (fields drop in order: the daemons
    /// are killed before their directory goes).
    daemons: Vec<Daemon>,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn cpu(&self) -> Duration {
        self.daemons.iter().map(Daemon::cpu).sum()
    }

    fn check_alive(&mut self) {
        for d in &mut self.daemons {
            d.check_alive();
        }
    }

    /// Whether nothing written is still on its way to the follower.
    fn caught_up(&mut self) -> bool {
        match &mut self.follower {
            Follower::None => true,
            Follower::Rewind { control } => rewind_caught_up(control),
            Follower::Mirror { qmp } => {
                let (ready, len, offset) = qmp.job();
                ready && len == offset
            }
        }
    }

    /// Waits until the follower caught up; returns how long that took.
    fn settle(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let deadline = started + limit;
        while !self.caught_up() {
            self.check_alive();
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .daemons
                    .iter()
                    .map(|d| format!("--- {}:\n{}", d.name, d.log_tail()))
                    .collect();
                panic!(
                    "{}: the follower did not catch up within {limit:?}\n{}",
                    self.label,
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        started.elapsed()
    }
}

/// The primary's link is streaming, no resync runs, and the replica holds
/// every record the primary wrote: not only what is durable on the
/// primary (writes no flush covered wait there for the sender to flush
/// them) but every record with data (`lag_records` 0).
fn rewind_caught_up(control: &Path) -> bool {
    let (Ok(status), Ok(link)) = (ctl(control, "status"), ctl(control, "replication")) else {
        return false;
    };
    let durable = status["durable_lsn"].as_u64().unwrap_or(u64::MAX);
    link["state"] == "streaming"
        && link["resync"].is_null()
        && link["lag_records"] == 0
        && link["acked_lsn"].as_u64().is_some_and(|a| a >= durable)
}

#[derive(Clone, Copy, PartialEq)]
enum Replication {
    Off,
    Async,
    Sync,
}

struct Identities {
    primary: Identity,
    replica: Identity,
}

/// A primary made `--from` `image` (and its replica, if it replicates).
fn start_rewind(
    base: &Path,
    label: &'static str,
    image: &Path,
    size: u64,
    mode: Replication,
    ids: &Identities,
) -> Setup {
    let dir = tempfile::tempdir_in(base).expect("setup dir");
    let journal = ["--journal-max", JOURNAL_MAX];
    let mut create_args = journal.to_vec();
    let image_arg = image.to_str().expect("utf-8 image path");
    create_args.extend(["--from", image_arg]);
    let primary_vol = create_volume(dir.path(), "primary", size, &create_args);
    let mut daemons = Vec::new();
    let mut primary_args = Vec::new();
    if mode != Replication::Off {
        let uuid = volume_uuid(&primary_vol);
        let mut replica_args = journal.to_vec();
        replica_args.extend(["--replica-of", &uuid]);
        let replica_vol = create_volume(dir.path(), "replica", size, &replica_args);
        let port = free_port();
        let mut args = vec![
            "--replication-listen".to_owned(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(tls_args(&ids.replica, &ids.primary));
        let (replica, _, _) = serve(dir.path(), "replica", &replica_vol, &args);
        daemons.push(replica);
        primary_args = vec![
            "--replicate-to".to_owned(),
            format!("127.0.0.1:{port}"),
            "--replication-mode".to_owned(),
            if mode == Replication::Sync {
                "sync"
            } else {
                "async"
            }
            .to_owned(),
        ];
        primary_args.extend(tls_args(&ids.primary, &ids.replica));
    }
    let (primary, socket, control) = serve(dir.path(), "primary", &primary_vol, &primary_args);
    daemons.insert(0, primary);
    Setup {
        label,
        socket,
        follower: if mode == Replication::Off {
            Follower::None
        } else {
            Follower::Rewind { control }
        },
        daemons,
        _dir: dir,
    }
}

fn qsd_vhost_args(image: &Path, socket: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={}", image.display()),
        "--blockdev".into(),
        "driver=raw,node-name=d0,file=f0".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={QUEUES}",
            socket.display()
        ),
    ]
}

/// qemu-storage-daemon's vhost-user-blk export of a copy of `image`.
fn start_qsd(base: &Path, image: &Path) -> Setup {
    let dir = tempfile::tempdir_in(base).expect("setup dir");
    let copy = dir.path().join("disk.raw");
    std::fs::copy(image, &copy).expect("copy the image");
    let socket = dir.path().join("qsd.sock");
    let mut qsd = Daemon::spawn(
        "qemu-storage-daemon",
        Command::new("qemu-storage-daemon").args(qsd_vhost_args(&copy, &socket)),
        dir.path().join("qsd.log"),
    );
    wait_for_path(&socket, &mut qsd);
    Setup {
        label: "qsd alone",
        socket,
        follower: Follower::None,
        daemons: vec![qsd],
        _dir: dir,
    }
}

/// How the mirror reaches its NBD target.
#[derive(Clone, Copy)]
enum Nbd {
    /// Loopback TCP, as between two hosts.
    Tcp,
    /// A Unix socket: the same without TCP (QEMU 7.2's NBD server does not
    /// set TCP_NODELAY; see BENCHMARKS.md).
    Unix,
}

/// The anchor: qemu-storage-daemon exporting a copy of `image` over
/// vhost-user-blk, mirrored (`blockdev-mirror`, `copy_mode`) to a second
/// qemu-storage-daemon's NBD export over loopback TCP; returns once the
/// job is ready (the initial full copy done).
fn start_mirror(
    base: &Path,
    label: &'static str,
    image: &Path,
    copy_mode: &str,
    transport: Nbd,
) -> Setup {
    let dir = tempfile::tempdir_in(base).expect("setup dir");
    let size = std::fs::metadata(image).expect("image size").len();
    let target_img = dir.path().join("target.raw");
    File::create(&target_img)
        .and_then(|f| f.set_len(size))
        .expect("target image");
    let port = free_port();
    let nbd_path = dir.path().join("nbd.sock");
    let (listen, server) = match transport {
        Nbd::Tcp => (
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            json!({"type": "inet", "host": "127.0.0.1", "port": port.to_string()}),
        ),
        Nbd::Unix => (
            format!("addr.type=unix,addr.path={}", nbd_path.display()),
            json!({"type": "unix", "path": nbd_path}),
        ),
    };
    let mut target = Daemon::spawn(
        "qemu-storage-daemon (NBD target)",
        Command::new("qemu-storage-daemon").args([
            "--blockdev".to_owned(),
            format!("driver=file,node-name=f1,filename={}", target_img.display()),
            "--blockdev".to_owned(),
            "driver=raw,node-name=d1,file=f1".to_owned(),
            "--nbd-server".to_owned(),
            listen,
            "--export".to_owned(),
            "type=nbd,id=e1,node-name=d1,name=disk,writable=on".to_owned(),
        ]),
        dir.path().join("target.log"),
    );
    wait_until(
        "the NBD server",
        Duration::from_secs(30),
        Duration::from_millis(10),
        || {
            target.check_alive();
            match transport {
                Nbd::Tcp => TcpStream::connect(("127.0.0.1", port)).is_ok(),
                Nbd::Unix => nbd_path.exists(),
            }
        },
    );
    let source_img = dir.path().join("source.raw");
    std::fs::copy(image, &source_img).expect("copy the image");
    let socket = dir.path().join("source.sock");
    let qmp_path = dir.path().join("qmp.sock");
    let mut args = qsd_vhost_args(&source_img, &socket);
    args.extend([
        "--chardev".to_owned(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp_path.display()
        ),
        "--monitor".to_owned(),
        "chardev=qmp".to_owned(),
    ]);
    let mut source = Daemon::spawn(
        "qemu-storage-daemon (mirror source)",
        Command::new("qemu-storage-daemon").args(args),
        dir.path().join("source.log"),
    );
    wait_for_path(&socket, &mut source);
    wait_for_path(&qmp_path, &mut source);
    let mut qmp = Qmp::connect(&qmp_path);
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": "target",
            "server": server,
            "export": "disk",
        }),
    )
    .unwrap_or_else(|e| panic!("blockdev-add of the NBD target refused: {e}"));
    qmp.execute(
        "blockdev-mirror",
        json!({
            "job-id": "m",
            "device": "d0",
            "target": "target",
            "sync": "full",
            "copy-mode": copy_mode,
        }),
    )
    .unwrap_or_else(|e| panic!("blockdev-mirror refused: {e}"));
    let mut setup = Setup {
        label,
        socket,
        follower: Follower::Mirror { qmp },
        daemons: vec![source, target],
        _dir: dir,
    };
    setup.settle(Duration::from_secs(600));
    setup
}

/// The libblkio client: one queue of 256, buffers in one region of random
/// bytes, each request taking the next slice of it.
struct Client {
    // Fields drop in order: the queue before the instance that owns it.
    q: Blkioq,
    _region: MemoryRegion,
    _blkio: Blkio,
    base: *mut u8,
    pool: usize,
    cursor: usize,
    rng: StdRng,
}

impl Client {
    fn connect(socket: &Path, pool: usize, seed: u64) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("libblkio driver");
        b.set_str("path", socket.to_str().expect("utf-8 socket path"))
            .expect("path");
        b.connect().expect("connect to the vhost-user socket");
        b.set_i32("num-queues", 1).expect("queues");
        b.set_i32("queue-size", 256).expect("queue size");
        let q = b.start().expect("start").queues.remove(0);
        let region = b.alloc_mem_region(pool).expect("alloc");
        let base = region.addr as *mut u8;
        let mut rng = StdRng::seed_from_u64(seed);
        // SAFETY: the region is `pool` bytes, mapped, and ours alone.
        rng.fill(unsafe { std::slice::from_raw_parts_mut(base, pool) });
        b.map_mem_region(&region).expect("map");
        Client {
            q,
            _region: region,
            _blkio: b,
            base,
            pool,
            cursor: 0,
            rng,
        }
    }

    /// The next `len` bytes of the pool (aligned to `len`).
    fn buf(&mut self, len: usize) -> *const u8 {
        if self.cursor + len > self.pool {
            self.cursor = 0;
        }
        // SAFETY: cursor + len <= pool, inside the mapped region.
        let p = unsafe { self.base.add(self.cursor) };
        self.cursor += len;
        p
    }

    fn offset(&mut self, len: usize, size: u64) -> u64 {
        self.rng.random_range(0..size / len as u64) * len as u64
    }

    fn write(&mut self, len: usize, size: u64, user_data: usize) {
        let offset = self.offset(len, size);
        let buf = self.buf(len);
        self.q.write(offset, buf, len, user_data, ReqFlags::empty());
    }

    /// Waits for at least one completion; returns the finished slots.
    fn complete(&mut self, done: &mut [MaybeUninit<Completion>]) -> Vec<usize> {
        let n = self.q.do_io(done, 1, None, None).expect("do_io");
        done[..n]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialized the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                assert_eq!(c.ret, 0, "the server failed a request");
                c.user_data
            })
            .collect()
    }

    /// One request at a time: submit, wait.
    fn sync_write(&mut self, len: usize, size: u64) {
        let mut done = [MaybeUninit::uninit()];
        self.write(len, size, 0);
        self.complete(&mut done);
    }

    fn sync_flush(&mut self) {
        let mut done = [MaybeUninit::uninit()];
        self.q.flush(0, ReqFlags::empty());
        self.complete(&mut done);
    }

    /// Random `len`-byte writes, `depth` in flight, for `run`; returns the
    /// writes completed and the time they took (in-flight ones finish).
    fn closed_loop(
        &mut self,
        depth: usize,
        len: usize,
        size: u64,
        run: Duration,
    ) -> (u64, Duration) {
        let started = Instant::now();
        for slot in 0..depth {
            self.write(len, size, slot);
        }
        let mut in_flight = depth;
        let mut completed = 0;
        let mut done: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        while in_flight > 0 {
            let finished = self.complete(&mut done);
            let more = started.elapsed() < run;
            for slot in finished {
                completed += 1;
                if more {
                    self.write(len, size, slot);
                } else {
                    in_flight -= 1;
                }
            }
        }
        (completed, started.elapsed())
    }
}

/// 4 KiB random writes from each of `QUEUES` queues at depth 8 (one
/// client thread per queue, as a guest's vCPUs) for a quarter of
/// `scale.qd32`: the journals of a full run's three rewind setups and two
/// replicas keep every write (a full run needs about 60 GB of free disk
/// already); returns the writes completed and the time they took.
fn all_queues(socket: &Path, scale: &Scale, seed: u64) -> (u64, Duration) {
    const DEPTH: usize = 8;
    const LEN: usize = 4096;
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("libblkio driver");
    b.set_str("path", socket.to_str().expect("utf-8 socket path"))
        .expect("path");
    b.connect().expect("connect to the vhost-user socket");
    b.set_i32("num-queues", QUEUES as i32).expect("queues");
    b.set_i32("queue-size", 256).expect("queue size");
    let queues = b.start().expect("start").queues;
    let per_queue = DEPTH * LEN;
    let region = b.alloc_mem_region(QUEUES * per_queue).expect("alloc");
    // SAFETY: the region is mapped, QUEUES * per_queue bytes, ours alone.
    StdRng::seed_from_u64(seed).fill(unsafe {
        std::slice::from_raw_parts_mut(region.addr as *mut u8, QUEUES * per_queue)
    });
    b.map_mem_region(&region).expect("map");
    let base = region.addr;
    let run = scale.qd32 / 4;
    let started = Instant::now();
    let ops = std::thread::scope(|s| {
        let threads: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed * 16 + i as u64);
                    let blocks = scale.size / LEN as u64;
                    let buf = |slot: usize| (base + i * per_queue + slot * LEN) as *const u8;
                    for slot in 0..DEPTH {
                        let at = rng.random_range(0..blocks) * LEN as u64;
                        q.write(at, buf(slot), LEN, slot, ReqFlags::empty());
                    }
                    let mut done: Vec<MaybeUninit<Completion>> =
                        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
                    let (mut in_flight, mut completed) = (DEPTH, 0u64);
                    while in_flight > 0 {
                        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
                        let more = started.elapsed() < run;
                        for c in &done[..n] {
                            // SAFETY: do_io initialized the first `n` completions.
                            let c = unsafe { c.assume_init_read() };
                            assert_eq!(c.ret, 0, "the server failed a request");
                            completed += 1;
                            if more {
                                let at = rng.random_range(0..blocks) * LEN as u64;
                                q.write(at, buf(c.user_data), LEN, c.user_data, ReqFlags::empty());
                            } else {
                                in_flight -= 1;
                            }
                        }
                    }
                    completed
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .sum()
    });
    (ops, started.elapsed())
}

/// What one run of the IOPS and latency workloads measured on a setup.
#[derive(Clone, Copy)]
struct Cell {
    iops: f64,
    /// 4 KiB random writes from every queue at depth 8 each.
    iops_queues: f64,
    cpu_per_io: Duration,
    catch_up: Duration,
    p50: Duration,
    p99: Duration,
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i]
}

/// 4 KiB random writes at depth 32, then QD1 write(4 KiB)+flush latency,
/// then 4 KiB random writes from four queues at depth 8.
/// A full run starts each with an empty page cache (see `drop_caches`).
fn measure(setup: &mut Setup, scale: &Scale, seed: u64) -> Cell {
    setup.settle(Duration::from_secs(300));
    if !scale.quick {
        drop_caches();
    }
    let mut client = Client::connect(&setup.socket, scale.pool, seed);
    let cpu_before = setup.cpu();
    let (ops, took) = client.closed_loop(32, 4096, scale.size, scale.qd32);
    // IOPS over the client's run; CPU until the follower holds it all.
    let catch_up = setup.settle(Duration::from_secs(300));
    let cpu = setup.cpu().saturating_sub(cpu_before);
    let iops = ops as f64 / took.as_secs_f64();
    // The latency run starts with nothing left to write back.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < scale.qd1 {
        let t = Instant::now();
        client.sync_write(4096, scale.size);
        client.sync_flush();
        latencies.push(t.elapsed());
    }
    drop(client);
    // A server takes one client at a time.
    let (ops_queues, took_queues) = all_queues(&setup.socket, scale, seed);
    setup.settle(Duration::from_secs(300));
    setup.check_alive();
    latencies.sort_unstable();
    // Write back what this run left dirty before the next setup runs.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    Cell {
        iops,
        iops_queues: ops_queues as f64 / took_queues.as_secs_f64(),
        cpu_per_io: cpu / ops.max(1) as u32,
        catch_up,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    }
}

/// A raw image of `size` bytes, random data where `data(mib_index)`.
fn make_image(path: &Path, size: u64, seed: u64, data: impl Fn(u64) -> bool) -> u64 {
    let f = File::create(path).expect("image");
    f.set_len(size).expect("image size");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chunk = vec![0u8; MIB as usize];
    let mut written = 0;
    for i in 0..size / MIB {
        if data(i) {
            rng.fill(&mut chunk[..]);
            f.write_all_at(&chunk, i * MIB).expect("write the image");
            written += MIB;
        }
    }
    f.sync_all().expect("sync the image");
    written
}

/// Drops the page cache (root only); says whether it could. A full run
/// does this before each workload: on the project's VMs the host takes
/// back free guest memory (free page reporting), and a page the guest
/// allocates from never-used memory costs a host fault on first touch;
/// after a few GB of new page cache every 4 KiB write into a new page
/// is several times slower (BENCHMARKS.md). Rewind's journal allocates
/// new page cache for every write, qemu-storage-daemon rewrites the pages
/// of its cached image; starting each run with memory just freed gives
/// both the same start.
fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// RPO of async replication while a client writes 64 KiB blocks paced to
/// `rate` bytes/s with a flush every 32 writes; `rpo_seconds` sampled
/// every 100 ms. Returns (sorted samples, bytes/s the client reached).
fn rpo_under_load(setup: &Setup, control: &Path, scale: &Scale, rate: f64) -> (Vec<f64>, f64) {
    const LEN: usize = 64 << 10;
    let interval = Duration::from_secs_f64(LEN as f64 / rate);
    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let mut client = Client::connect(&setup.socket, scale.pool, 7);
    let mut written = 0u64;
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut next = Instant::now();
            while !stop.load(Ordering::Acquire) {
                next += Duration::from_millis(100);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let link = ctl(control, "replication").expect("replication status");
                let rpo = link["rpo_seconds"].as_f64().expect("rpo_seconds");
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(rpo);
            }
        });
        let mut k = 0u32;
        while started.elapsed() < scale.rpo_run {
            let due = started + interval * k;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            client.sync_write(LEN, scale.size);
            written += LEN as u64;
            k += 1;
            if k.is_multiple_of(32) {
                client.sync_flush();
            }
        }
        stop.store(true, Ordering::Release);
    });
    let elapsed = started.elapsed();
    let mut samples = samples.into_inner().unwrap_or_else(|e| e.into_inner());
    if samples.is_empty() {
        let link = ctl(control, "replication").expect("replication status");
        samples.push(link["rpo_seconds"].as_f64().expect("rpo_seconds"));
    }
    samples.sort_by(f64::total_cmp);
    (samples, written as f64 / elapsed.as_secs_f64())
}

/// Plain TCP over loopback: one thread writes 1 MiB buffers, another reads.
fn tcp_loopback(run: Duration) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; MIB as usize];
            let mut n = 0u64;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return n,
                    Ok(k) => n += k as u64,
                    Err(e) => panic!("loopback read: {e}"),
                }
            }
        });
        let mut stream = TcpStream::connect(addr).expect("connect");
        let _ = stream.set_nodelay(true);
        let buf = vec![0x5au8; MIB as usize];
        let started = Instant::now();
        while started.elapsed() < run {
            stream.write_all(&buf).expect("loopback write");
        }
        drop(stream);
        let n = reader.join().expect("reader");
        n as f64 / started.elapsed().as_secs_f64()
    })
}

/// TLS 1.3 over loopback with the daemon's own TLS setup (the same
/// certificates, pinned fingerprints, rustls with ring, tokio, two
/// workers): 1 MiB writes one way.
fn tls_loopback(ids: &Identities, run: Duration) -> f64 {
    use rewind_vhost_blk::replication::tls::{PeerTrust, TlsContext, TlsSettings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let context = |me: &Identity, peer: &Identity| {
        TlsContext::load(
            &TlsSettings {
                cert: me.cert.clone(),
                key: me.key.clone(),
                trust: PeerTrust::Fingerprint(peer.fingerprint.parse().expect("fingerprint")),
            },
            "test",
        )
        .expect("TLS context")
    };
    let client = context(&ids.primary, &ids.replica);
    let server = context(&ids.replica, &ids.primary);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = server.acceptor();
        let reader = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let _ = tcp.set_nodelay(true);
            let mut tls = acceptor.accept(tcp).await.expect("TLS accept");
            let mut buf = vec![0u8; MIB as usize];
            let mut n = 0u64;
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) => return n,
                    Ok(k) => n += k as u64,
                    Err(e) => panic!("TLS read: {e}"),
                }
            }
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = tcp.set_nodelay(true);
        let mut tls = client
            .connector()
            .connect(client.server_name(), tcp)
            .await
            .expect("TLS connect");
        let mut buf = vec![0u8; MIB as usize];
        StdRng::seed_from_u64(3).fill(&mut buf[..]);
        let started = Instant::now();
        while started.elapsed() < run {
            tls.write_all(&buf).await.expect("TLS write");
        }
        tls.shutdown().await.expect("TLS close");
        let n = reader.await.expect("reader");
        n as f64 / started.elapsed().as_secs_f64()
    })
}

/// The disk: sequential 1 MiB writes with an fdatasync every 32 MiB.
fn disk_write(dir: &Path, run: Duration) -> f64 {
    let path = dir.join("disk-reference.bin");
    let f = File::create(&path).expect("disk reference file");
    let mut buf = vec![0u8; MIB as usize];
    StdRng::seed_from_u64(4).fill(&mut buf[..]);
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < run {
        f.write_all_at(&buf, n).expect("disk reference write");
        n += MIB;
        if n.is_multiple_of(32 * MIB) {
            f.sync_data().expect("fdatasync");
        }
    }
    f.sync_data().expect("fdatasync");
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    rate
}

/// Stream throughput: unpaced 1 MiB writes (4 in flight, no flush) on the
/// async pair for `run`. Returns (client bytes/s, bytes_sent/s over the
/// run, bytes_sent/s until caught up, catch-up time after the writes).
fn stream_throughput(
    setup: &mut Setup,
    control: &Path,
    scale: &Scale,
) -> (f64, f64, f64, Duration) {
    setup.settle(Duration::from_secs(300));
    let sent = || -> u64 {
        ctl(control, "replication").expect("replication status")["bytes_sent"]
            .as_u64()
            .expect("bytes_sent")
    };
    let mut client = Client::connect(&setup.socket, scale.pool, 9);
    let sent0 = sent();
    let started = Instant::now();
    let (ops, took) = client.closed_loop(4, MIB as usize, scale.size, scale.bulk_run);
    let sent_run = sent() - sent0;
    let catch_up = setup.settle(Duration::from_secs(300));
    let sent_all = sent() - sent0;
    let total = started.elapsed();
    drop(client);
    (
        (ops * MIB) as f64 / took.as_secs_f64(),
        sent_run as f64 / took.as_secs_f64(),
        sent_all as f64 / total.as_secs_f64(),
        catch_up,
    )
}

/// Initial sync of a `size` volume imported from an image with random data
/// in every other MiB, against `cp --sparse=always` of the image.
struct InitialSync {
    size: u64,
    data: u64,
    /// `cp --sparse=always` of the image: (the copy, with its fsync).
    cps: Vec<(Duration, Duration)>,
    resync: Duration,
    bytes_sent: u64,
    resync_data: u64,
    /// CPU of both daemons from their start to the end of the sync.
    cpu: Duration,
    cold: bool,
}

/// `cp --sparse=always` of `image` (from a cold cache in a full run), then
/// `sync` of the copy (the fsync that makes it durable, as the replica's
/// resync is durable once it acknowledges); the copy is removed.
fn copy_image(image: &Path, scale: &Scale) -> (Duration, Duration) {
    let copy = image.with_extension("copy");
    if !scale.quick {
        drop_caches();
    }
    let t = Instant::now();
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(&copy));
    let cp = t.elapsed();
    run(Command::new("sync").arg(&copy));
    let with_sync = t.elapsed();
    std::fs::remove_file(&copy).expect("remove the copy");
    eprintln!("initial sync: cp {cp:?}, with fsync {with_sync:?}");
    (cp, with_sync)
}

fn initial_sync(base: &Path, scale: &Scale, ids: &Identities) -> InitialSync {
    let dir = tempfile::tempdir_in(base).expect("dir");
    let image = dir.path().join("half.raw");
    let size = scale.sync_size;
    eprintln!("initial sync: writing a {} MiB image", size / MIB);
    let data = make_image(&image, size, 11, |i| i % 2 == 0);
    let cold = !scale.quick && drop_caches();
    let mut cps = vec![copy_image(&image, scale)];

    // The pair.
    let primary_vol = create_volume(
        dir.path(),
        "primary",
        size,
        &["--from", image.to_str().expect("utf-8 path")],
    );
    let uuid = volume_uuid(&primary_vol);
    let replica_vol = create_volume(dir.path(), "replica", size, &["--replica-of", &uuid]);
    let port = free_port();
    let mut args = vec![
        "--replication-listen".to_owned(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend(tls_args(&ids.replica, &ids.primary));
    let (mut replica, _, replica_ctl) = serve(dir.path(), "replica", &replica_vol, &args);
    let cold = cold && (scale.quick || drop_caches());
    let mut args = vec![
        "--replicate-to".to_owned(),
        format!("127.0.0.1:{port}"),
        "--replication-mode".to_owned(),
        "async".to_owned(),
    ];
    args.extend(tls_args(&ids.primary, &ids.replica));
    let started = Instant::now();
    let (mut primary, _, primary_ctl) = serve(dir.path(), "primary", &primary_vol, &args);
    let mut resync_data = 0;
    let mut bytes_sent = 0;
    wait_until(
        "the initial sync",
        Duration::from_secs(1200),
        Duration::from_millis(10),
        || {
            primary.check_alive();
            replica.check_alive();
            let Ok(link) = ctl(&primary_ctl, "replication") else {
                return false;
            };
            if let Some(d) = link["resync"]["data_bytes"].as_u64() {
                resync_data = resync_data.max(d);
            }
            bytes_sent = link["bytes_sent"].as_u64().unwrap_or(0);
            rewind_caught_up(&primary_ctl)
                && ctl(&replica_ctl, "replication").is_ok_and(|r| r["state"] == "streaming")
        },
    );
    let resync = started.elapsed();
    let cpu = primary.cpu() + replica.cpu();
    eprintln!("initial sync: {resync:?}, {bytes_sent} bytes sent, daemons' CPU {cpu:?}");
    drop(primary);
    drop(replica);
    // cp again after the sync: the disk's speed drifts on a shared machine.
    if !scale.quick {
        cps.push(copy_image(&image, scale));
    }
    InitialSync {
        size,
        data,
        cps,
        resync,
        bytes_sent,
        resync_data,
        cpu,
        cold,
    }
}

/// The median (of an even count, the mean of the middle two).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn mbs(bytes_per_second: f64) -> String {
    format!("{:.0} MB/s", bytes_per_second / 1e6)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let scale = Scale::new(std::env::var_os("REWIND_BENCH_QUICK").is_some());
    let base = std::env::var_os("REWIND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).expect("bench dir");
    let ids = Identities {
        primary: identity(&work.path().join("certs"), "primary"),
        replica: identity(&work.path().join("certs"), "replica"),
    };
    let image = work.path().join("disk.raw");
    make_image(&image, scale.size, 1, |_| true);

    // Rows 1, 2 and 5: every setup, alternating, `rounds` times.
    eprintln!("starting the setups");
    let t = Instant::now();
    let mut setups = vec![
        start_rewind(
            work.path(),
            "rewind, no replication",
            &image,
            scale.size,
            Replication::Off,
            &ids,
        ),
        start_rewind(
            work.path(),
            "rewind + replica, async",
            &image,
            scale.size,
            Replication::Async,
            &ids,
        ),
        start_rewind(
            work.path(),
            "rewind + replica, sync",
            &image,
            scale.size,
            Replication::Sync,
            &ids,
        ),
        start_qsd(work.path(), &image),
        start_mirror(
            work.path(),
            "qsd + mirror, background",
            &image,
            "background",
            Nbd::Tcp,
        ),
        start_mirror(
            work.path(),
            "qsd + mirror, write-blocking",
            &image,
            "write-blocking",
            Nbd::Tcp,
        ),
        start_mirror(
            work.path(),
            "qsd + mirror, write-blocking, NBD over a Unix socket",
            &image,
            "write-blocking",
            Nbd::Unix,
        ),
    ];
    for s in &mut setups {
        let waited = s.settle(Duration::from_secs(600));
        eprintln!("{}: ready ({waited:?} more for the follower)", s.label);
    }
    eprintln!("setups ready in {:?}", t.elapsed());
    let mut cells: Vec<Vec<Cell>> = vec![Vec::new(); setups.len()];
    for round in 0..scale.rounds {
        // Alternate the order, so a drift of the machine falls on all.
        let mut order: Vec<usize> = (0..setups.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let s = &mut setups[i];
            let c = measure(s, &scale, 100 + round as u64);
            eprintln!(
                "round {}: {}: {:.0} IOPS, {} us CPU/IO, caught up in {:?}, write+flush p50 {} us p99 {} us",
                round + 1,
                s.label,
                c.iops,
                us(c.cpu_per_io),
                c.catch_up,
                us(c.p50),
                us(c.p99)
            );
            cells[i].push(c);
        }
    }

    // Row 3 on the async pair.
    let control = match &setups[1].follower {
        Follower::Rewind { control } => control.clone(),
        _ => unreachable!("setup 1 is the async pair"),
    };
    eprintln!("RPO under paced load");
    setups[1].settle(Duration::from_secs(300));
    let cold = !scale.quick && drop_caches();
    let (rpo, paced_rate) = rpo_under_load(&setups[1], &control, &scale, 50e6);
    eprintln!("stream throughput");
    if !scale.quick {
        drop_caches();
    }
    let (client_rate, stream_run, stream_all, stream_catch_up) =
        stream_throughput(&mut setups[1], &control, &scale);
    drop(setups);

    // Row 4.
    let sync = initial_sync(work.path(), &scale, &ids);

    // References for the stream.
    let tcp = tcp_loopback(scale.loopback);
    let tls = tls_loopback(&ids, scale.loopback);
    let disk = disk_write(work.path(), scale.loopback);

    // The tables.
    let labels = [
        "rewind, no replication",
        "rewind + replica, async",
        "rewind + replica, sync",
        "qsd alone",
        "qsd + mirror, background",
        "qsd + mirror, write-blocking",
        "qsd + mirror, write-blocking, NBD over a Unix socket",
    ];
    let row = |name: &str, f: &dyn Fn(&Cell) -> String| {
        let values: Vec<String> = cells
            .iter()
            .map(|runs| runs.iter().map(f).collect::<Vec<_>>().join(" / "))
            .collect();
        println!("| {name} | {} |", values.join(" | "));
    };
    println!();
    println!(
        "| workload (one value per round) | {} |",
        labels.join(" | ")
    );
    println!("|---|{}", "---|".repeat(labels.len()));
    row("4 KiB random writes QD32, IOPS", &|c| {
        format!("{:.0}", c.iops)
    });
    row(
        &format!("4 KiB random writes, {QUEUES} queues x QD8, IOPS"),
        &|c| format!("{:.0}", c.iops_queues),
    );
    row(
        "server CPU per write, us (every daemon of the setup)",
        &|c| format!("{:.1}", c.cpu_per_io.as_secs_f64() * 1e6),
    );
    row("follower caught up after the QD32 run, ms", &|c| {
        format!("{:.0}", c.catch_up.as_secs_f64() * 1e3)
    });
    row("QD1 write(4 KiB)+flush p50, us", &|c| us(c.p50));
    row("QD1 write(4 KiB)+flush p99, us", &|c| us(c.p99));

    let avg = |i: usize, f: &dyn Fn(&Cell) -> f64| median(cells[i].iter().map(f));
    let iops = |i: usize| avg(i, &|c| c.iops);
    let iops_queues = |i: usize| avg(i, &|c| c.iops_queues);
    let cpu = |i: usize| avg(i, &|c| c.cpu_per_io.as_secs_f64() * 1e6);
    let p50 = |i: usize| avg(i, &|c| c.p50.as_secs_f64() * 1e6);
    let p99 = |i: usize| avg(i, &|c| c.p99.as_secs_f64() * 1e6);
    let (none, asy, syn, qsd, bg, wb, wb_unix) = (0, 1, 2, 3, 4, 5, 6);
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    println!();
    println!(
        "Page cache dropped before each workload: {}. Ratios below use the median of the rounds.",
        if cold { "yes" } else { "no" }
    );
    println!();
    println!("| # | measure | rewind | against | ratio | goal |");
    println!("|---|---|---|---|---|---|");
    let ratio = iops(asy) / iops(none);
    println!(
        "| 1 | 4 KiB random writes QD32, IOPS: async vs no replication | {:.0} | {:.0} | {ratio:.3}x | at least 0.90x: {} |",
        iops(asy),
        iops(none),
        verdict(ratio >= 0.9)
    );
    for (name, i) in [("async", asy), ("sync", syn)] {
        println!(
            "| 1 | 4 KiB random writes, {QUEUES} queues x QD8, IOPS: {name} vs no replication | {:.0} | {:.0} | {:.3}x | |",
            iops_queues(i),
            iops_queues(none),
            iops_queues(i) / iops_queues(none)
        );
    }
    println!(
        "| 1 | 4 KiB random writes, {QUEUES} queues x QD8, IOPS: async vs qsd alone | {:.0} | {:.0} | {:.2}x | |",
        iops_queues(asy),
        iops_queues(qsd),
        iops_queues(asy) / iops_queues(qsd)
    );
    println!(
        "| 1 | server CPU per write: primary + replica (async) vs qsd alone | {:.1} us | {:.1} us | {:.2}x | |",
        cpu(asy),
        cpu(qsd),
        cpu(asy) / cpu(qsd)
    );
    println!(
        "| 1 | 4 KiB random writes QD32, IOPS: async vs qsd alone | {:.0} | {:.0} | {:.2}x | |",
        iops(asy),
        iops(qsd),
        iops(asy) / iops(qsd)
    );
    for (name, i) in [("sync", syn), ("async", asy)] {
        println!(
            "| 2 | QD1 write+flush p50 / p99: {name} vs no replication | {:.0} / {:.0} us | {:.0} / {:.0} us | {:.2}x / {:.2}x | |",
            p50(i),
            p99(i),
            p50(none),
            p99(none),
            p50(i) / p50(none),
            p99(i) / p99(none)
        );
    }
    let rpo_max = rpo.last().copied().unwrap_or(f64::NAN);
    println!(
        "| 3 | RPO, async, {} of 64 KiB writes + flush every 32, {} samples: p50 / p99 / max | {:.3} / {:.3} / {:.3} s | | | max under 1 s: {} |",
        mbs(paced_rate),
        rpo.len(),
        percentile(&rpo, 0.5),
        percentile(&rpo, 0.99),
        rpo_max,
        verdict(rpo_max < 1.0)
    );
    println!(
        "| 3 | stream, unpaced 1 MiB writes (client {}): bytes_sent per second while writing / until caught up ({:.1} s after) | {} / {} | TLS loopback {} (TCP {}, disk {}) | {:.2}x of TLS | |",
        mbs(client_rate),
        stream_catch_up.as_secs_f64(),
        mbs(stream_run),
        mbs(stream_all),
        mbs(tls),
        mbs(tcp),
        mbs(disk),
        stream_all / tls
    );
    let cp = mean(sync.cps.iter().map(|c| c.0.as_secs_f64()));
    let cp_sync = mean(sync.cps.iter().map(|c| c.1.as_secs_f64()));
    let secs = |f: &dyn Fn(&(Duration, Duration)) -> Duration| {
        let v: Vec<String> = sync
            .cps
            .iter()
            .map(|c| format!("{:.1}", f(c).as_secs_f64()))
            .collect();
        v.join(" / ")
    };
    println!(
        "| 4 | initial sync, {} GiB volume, {} GiB in every other MiB{}: primary start to streaming (daemons' CPU {:.1} s) | {:.1} s | cp --sparse=always {} s ({} s with fsync), before / after | {:.2}x ({:.2}x) | |",
        sync.size as f64 / GIB as f64,
        sync.data as f64 / GIB as f64,
        if sync.cold { ", cold cache" } else { ", warm cache" },
        sync.cpu.as_secs_f64(),
        sync.resync.as_secs_f64(),
        secs(&|c| c.0),
        secs(&|c| c.1),
        sync.resync.as_secs_f64() / cp,
        sync.resync.as_secs_f64() / cp_sync
    );
    println!(
        "| 4 | initial sync: bytes sent (resync data {} MiB) vs bytes that differ | {} MiB | {} MiB | {:.3}x | |",
        sync.resync_data / MIB,
        sync.bytes_sent / MIB,
        sync.data / MIB,
        sync.bytes_sent as f64 / sync.data as f64
    );
    for (name, r, q) in [
        ("async vs mirror background", asy, bg),
        ("sync vs mirror write-blocking", syn, wb),
        (
            "sync vs mirror write-blocking, NBD over a Unix socket",
            syn,
            wb_unix,
        ),
    ] {
        println!(
            "| 5 | 4 KiB random writes QD32, IOPS: {name} | {:.0} | {:.0} | {:.2}x | |",
            iops(r),
            iops(q),
            iops(r) / iops(q)
        );
        println!(
            "| 5 | server CPU per write: {name} | {:.1} us | {:.1} us | {:.2}x | |",
            cpu(r),
            cpu(q),
            cpu(r) / cpu(q)
        );
        println!(
            "| 5 | QD1 write+flush p50 / p99: {name} | {:.0} / {:.0} us | {:.0} / {:.0} us | {:.2}x / {:.2}x | |",
            p50(r),
            p99(r),
            p50(q),
            p99(q),
            p50(r) / p50(q),
            p99(r) / p99(q)
        );
    }
}
