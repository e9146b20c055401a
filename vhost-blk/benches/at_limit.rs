//! rewind-blk at its journal's hard limit against qemu-storage-daemon (its
//! defaults, and with `cache.direct=on,aio=io_uring`): the same libblkio
//! client, the same prefilled raw image on the same file system, one
//! queue, over a volume whose journal limit is a quarter of the volume.
//! First, 1 MiB sequential writes at depth 8 for a few seconds below the
//! limit, three rounds of the servers in turn: rewind-blk on a second
//! volume whose journal limit the runs cannot fill to a quarter, and on one
//! created with `--preallocate-journal` (its journal written out, so no
//! block it writes is new to the disk). Then each server in turn, a
//! fourth being rewind-blk on a preallocated copy of the volume under
//! test, takes 1 MiB sequential writes at depth 8 (rewind reaches
//! its limit within the run), then 4 KiB random writes at depth 32 for a
//! fixed time (most of it at the limit, folding). Reported: the rate per
//! interval (a twelfth of each run), the lowest interval against qsd's
//! median, the longest latency (when it came, and how many requests took
//! over 100 ms), IO errors (there must be none), and the device's own
//! sequential write rate (`dd oflag=direct`) for scale.
//!
//! `cargo bench -p rewind-vhost-blk --bench at_limit` (REWIND_BENCH_DIR
//! picks the file system, REWIND_BENCH_SECONDS the length of the random
//! run, REWIND_BENCH_QUICK=1 makes a small smoke run of about a minute, one
//! round below the limit).
//!
//! REWIND_BENCH_ONLY=below stops after the runs below the limit;
//! REWIND_BENCH_ONLY=limit skips them.
//!
//! REWIND_BENCH_THROTTLE_IOPS=N (root, cgroup v1 blkio) runs each server,
//! and the `dd` of the device's rate, in a blkio cgroup that caps reads
//! and writes on the file system's disk at N per second each
//! (`blkio.throttle.{read,write}_iops_device`): a slow disk of the kind of
//! a cloud volume's baseline. Under v1 that caps the IO a server's own
//! threads submit (reads that miss the page cache, direct IO, and the
//! writeback of its fsyncs), not the writeback of its buffered writes by
//! the kernel's flusher threads, which no cgroup is charged for; the table
//! after the results shows how much of the disk's IO went through the
//! throttle. The cgroup is removed at the end. rewind-blk's log goes to
//! `at_limit-rewind-blk.log` in cargo's target tmp directory (the
//! preallocated volume's: `at_limit-preallocated-rewind-blk.log`; below the
//! limit: `at_limit-below-rewind-blk.log`).

mod common;

use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use common::{create_rewind, create_volume, make_image, serve_rewind_to, start_qsd, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SMALL: usize = 4096;
const LARGE: usize = 1 << 20;
/// Intervals a run's IOPS are reported in.
const INTERVALS: usize = 12;
/// A request slower than this is counted: the goal for the worst latency
/// of the 1 MiB sequential writes at the limit.
const SLOW: Duration = Duration::from_millis(100);

/// The journal limit of the volume of a run below the limit: more than
/// four times what it writes (`BELOW_SECONDS` at several GB/s), so that
/// the journal stays under a quarter of it, where large writes go straight
/// to the device. Each round has a new volume.
const BELOW_JOURNAL_MAX: u64 = 128 << 30;
/// The segment size of that volume, whatever the shape's: few enough
/// segments for `BELOW_JOURNAL_MAX` (a volume has at most about 8,000).
const BELOW_SEGMENT_SIZE: u64 = 64 << 20;
/// The journal limit of the preallocated volume of a run below the limit
/// (`--preallocate-journal`, written out at its creation each round, so
/// it fits the disk beside the image). A run at 1 GB/s writes past a
/// quarter of it: large writes go straight to the device past a quarter
/// only in a journal at least half the machine's memory (the page cache
/// would not keep its records until they are folded); with more memory
/// than 32 GiB they turn to the page cache there, and the run shows what
/// that costs. A quick run's is small.
const BELOW_PREALLOCATED_MAX: u64 = 16 << 30;
const QUICK_PREALLOCATED_MAX: u64 = 2 << 30;
/// The length of a run below the limit.
const BELOW_SECONDS: u64 = 5;
/// The size of fio's file for the device's rate below the limit: more than
/// it writes in `BELOW_SECONDS`, so that it never wraps.
const BELOW_FIO_SIZE: u64 = 32 << 30;
/// Rounds of runs below the limit, the servers alternating: the disk's
/// speed moves from one run to the next, so medians are compared. One in
/// a quick run.
const BELOW_ROUNDS: usize = 3;

/// The shape of the volume under test.
#[derive(Clone, Copy)]
struct Shape {
    size: u64,
    journal_max: u64,
    segment_size: u64,
}

#[derive(Clone, Copy)]
struct Workload {
    block: usize,
    depth: usize,
    sequential: bool,
    time: Duration,
}

struct Outcome {
    /// Completions per interval, per second.
    intervals: Vec<f64>,
    ops: usize,
    elapsed: Duration,
    max_latency: Duration,
    /// When (since the run's start) the slowest request completed.
    max_latency_at: Duration,
    /// Requests slower than [`SLOW`], and how many completed in each
    /// interval.
    slow: usize,
    slow_intervals: [usize; INTERVALS],
    p99: Duration,
    errors: usize,
    /// When (since the run's start) the first request failed, and its
    /// return value.
    first_error: Option<(Duration, i32)>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn median_interval(&self) -> f64 {
        median(self.intervals.clone())
    }

    fn min_interval(&self) -> f64 {
        self.intervals.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

/// Runs the workload against `server` for its time.
fn run(server: &Server, w: Workload, size: u64, seed: u64) -> Outcome {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("driver");
    b.set_str("path", server.socket.to_str().expect("path"))
        .expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", 1).expect("queues");
    b.set_i32("queue-size", 256).expect("queue size");
    let mut q: Blkioq = b.start().expect("start").queues.remove(0);
    let region = b.alloc_mem_region(w.depth * w.block).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let base = region.addr as *mut u8;
    // SAFETY: the region is mapped, `depth * block` bytes long, and only
    // this thread touches it until the requests that use it are submitted.
    unsafe { std::slice::from_raw_parts_mut(base, w.depth * w.block) }
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7 + seed as usize) as u8);
    let blocks = size / w.block as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next_block = 0;
    let mut started = vec![Instant::now(); w.depth];
    let interval = w.time / INTERVALS as u32;
    let mut counts = [0usize; INTERVALS];
    let mut slow_counts = [0usize; INTERVALS];
    let mut latencies = Vec::new();
    let (mut max_latency, mut max_latency_at) = (Duration::ZERO, Duration::ZERO);
    let mut errors = 0;
    let mut first_error = None;
    println!(
        "  {}: {} run of {} s starts at {} UTC",
        server.name,
        if w.sequential { "sequential" } else { "random" },
        w.time.as_secs(),
        utc_now()
    );
    let t = Instant::now();
    let mut submit = |q: &mut Blkioq, slot: usize, started: &mut [Instant]| {
        // SAFETY: slot < depth, so the buffer lies inside the mapped region.
        let buf = unsafe { base.add(slot * w.block) };
        let block = if w.sequential {
            next_block = (next_block + 1) % blocks;
            next_block
        } else {
            rng.random_range(0..blocks)
        };
        started[slot] = Instant::now();
        q.write(
            block * w.block as u64,
            buf,
            w.block,
            slot,
            ReqFlags::empty(),
        );
    };
    for slot in 0..w.depth {
        submit(&mut q, slot, &mut started);
    }
    let mut in_flight = w.depth;
    let mut done: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    while in_flight > 0 {
        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
        let now = t.elapsed();
        for c in &done[..n] {
            // SAFETY: do_io initialized the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            in_flight -= 1;
            if c.ret != 0 {
                errors += 1;
                first_error.get_or_insert((now, c.ret));
            }
            let latency = started[c.user_data].elapsed();
            if latency > max_latency {
                (max_latency, max_latency_at) = (latency, now);
            }
            latencies.push(latency);
            let at = (now.as_nanos() / interval.as_nanos().max(1)) as usize;
            if let Some(count) = counts.get_mut(at) {
                *count += 1;
            }
            if latency > SLOW {
                if let Some(count) = slow_counts.get_mut(at) {
                    *count += 1;
                }
            }
            if now < w.time {
                submit(&mut q, c.user_data, &mut started);
                in_flight += 1;
            }
        }
    }
    let elapsed = t.elapsed();
    latencies.sort_unstable();
    Outcome {
        intervals: counts
            .iter()
            .map(|&c| c as f64 / interval.as_secs_f64())
            .collect(),
        ops: latencies.len(),
        elapsed,
        max_latency,
        max_latency_at,
        slow: latencies.iter().filter(|&&l| l > SLOW).count(),
        slow_intervals: slow_counts,
        p99: latencies
            .get(latencies.len() * 99 / 100)
            .copied()
            .unwrap_or_default(),
        errors,
        first_error,
    }
}

/// The time of day in UTC, `HH:MM:SS`, to find a run in the daemon's log.
fn utc_now() -> String {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        % 86400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Where the cgroup v1 blkio hierarchy is mounted.
const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// A cgroup v1 blkio group whose processes' reads and writes on one disk
/// are each capped at a number per second; removed when dropped.
struct Throttle {
    /// The group's directory.
    dir: PathBuf,
    /// The group the bench runs in, which it returns to.
    home: PathBuf,
    /// The disk's `MAJ:MIN`.
    device: String,
    /// The disk's directory in sysfs.
    disk: PathBuf,
}

/// IO counts, reads and writes.
#[derive(Clone, Copy, Default)]
struct Ops {
    reads: u64,
    writes: u64,
}

impl Throttle {
    /// Caps reads and writes on the disk that holds `fs` at `iops` each.
    fn new(fs: &Path, iops: u64) -> Throttle {
        let (device, disk) = disk_of(fs);
        assert!(
            Path::new(BLKIO)
                .join("blkio.throttle.write_iops_device")
                .exists(),
            "REWIND_BENCH_THROTTLE_IOPS needs the cgroup v1 blkio controller at {BLKIO}"
        );
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let path = own
            .lines()
            .find_map(|l| l.split_once(":blkio:").map(|(_, p)| p.to_string()))
            .expect("the bench's blkio cgroup");
        let home = Path::new(BLKIO).join(path.trim_start_matches('/'));
        let dir = home.join(format!("rewind-bench-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating {} (needs root): {e}", dir.display()));
        let throttle = Throttle {
            dir,
            home,
            device,
            disk,
        };
        for file in [
            "blkio.throttle.read_iops_device",
            "blkio.throttle.write_iops_device",
        ] {
            let path = throttle.dir.join(file);
            std::fs::write(&path, format!("{} {iops}", throttle.device))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        throttle
    }

    /// Runs `f` with the bench in the group: a process it starts is in the
    /// group from its first IO (a child starts in its parent's cgroup, all
    /// its threads with it), the bench is back out when `f` returns.
    fn inside<T>(&self, f: impl FnOnce() -> T) -> T {
        Self::join(&self.dir);
        let out = f();
        Self::join(&self.home);
        out
    }

    /// Moves the bench (all its threads) into the group at `dir`.
    fn join(dir: &Path) {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
    }

    /// Reads and writes of the group's processes on the disk so far, as
    /// the throttle counted them (`blkio.throttle.io_serviced`).
    fn throttled(&self) -> Ops {
        let text = std::fs::read_to_string(self.dir.join("blkio.throttle.io_serviced"))
            .expect("io_serviced");
        let mut ops = Ops::default();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            if f.next() != Some(&self.device) {
                continue;
            }
            match (f.next(), f.next().and_then(|n| n.parse().ok())) {
                (Some("Read"), Some(n)) => ops.reads = n,
                (Some("Write"), Some(n)) => ops.writes = n,
                _ => {}
            }
        }
        ops
    }

    /// Reads and writes the whole disk completed so far, whoever issued
    /// them (its `stat`).
    fn disk_ops(&self) -> Ops {
        let text = std::fs::read_to_string(self.disk.join("stat")).expect("disk stat");
        let f: Vec<u64> = text
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        Ops {
            reads: f[0],
            writes: f[4],
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // The bench may be in the group still if `inside` panicked; the
        // servers were killed and reaped before this runs.
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove the cgroup {}", self.dir.display());
    }
}

/// The disk `path` lives on: its `MAJ:MIN` and its sysfs directory (a
/// partition's disk: the throttle limits whole disks).
fn disk_of(path: &Path) -> (String, PathBuf) {
    let dev = std::fs::metadata(path).expect("stat").dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let sys =
        std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).unwrap_or_else(|e| {
            panic!(
                "{} is on device {major}:{minor}, not a block device the throttle can cap: {e}",
                path.display()
            )
        });
    let disk = if sys.join("partition").exists() {
        sys.parent().expect("a partition's disk").to_path_buf()
    } else {
        sys
    };
    let device = std::fs::read_to_string(disk.join("dev"))
        .expect("the disk's dev")
        .trim()
        .to_string();
    (device, disk)
}

/// The file system's sequential write rate with the page cache out of the
/// way: `bytes` in 1 MiB direct writes, then the file is removed.
fn device_rate(dir: &Path, bytes: u64, throttle: Option<&Throttle>) -> f64 {
    let file = dir.join("dd.raw");
    let t = Instant::now();
    let dd = || {
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", file.display()))
            .args(["bs=1M", &format!("count={}", bytes >> 20), "oflag=direct"])
            .args(["conv=fdatasync", "status=none"])
            .output()
            .expect("dd")
    };
    let out = match throttle {
        Some(throttle) => throttle.inside(dd),
        None => dd(),
    };
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
    (bytes >> 20) as f64 / took.as_secs_f64()
}

/// The device's rate for the runs below the limit, from fio with the same
/// shape (1 MiB direct writes at depth 8 with io_uring, `BELOW_SECONDS`),
/// in MiB/s: into a new file of `BELOW_FIO_SIZE`, whose blocks the file
/// system allocates as it goes and which the run never wraps (as a growing
/// journal's), then over the first `size` bytes of `image` again and again
/// (as the qsd exports write it). The new file is removed after.
fn fio_sequential(dir: &Path, image: &Path, size: u64, throttle: Option<&Throttle>) -> (f64, f64) {
    let new_file = dir.join("fio-seq.raw");
    let fio = |file: &Path, size: u64| {
        let out = Command::new("fio")
            .args([
                "--name=device",
                "--output-format=json",
                "--rw=write",
                "--bs=1M",
            ])
            .args([
                "--iodepth=8",
                "--ioengine=io_uring",
                "--direct=1",
                "--fallocate=none",
            ])
            .args(["--time_based", &format!("--runtime={BELOW_SECONDS}")])
            .arg(format!("--size={size}"))
            .arg(format!("--filename={}", file.display()))
            .output()
            .expect("fio (apt-get install fio)");
        assert!(
            out.status.success(),
            "fio: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
        v["jobs"][0]["write"]["bw_bytes"].as_f64().expect("fio bw") / (1 << 20) as f64
    };
    let rate = |file: &Path, size: u64| {
        let synced = Command::new("sync").status().expect("sync");
        assert!(synced.success(), "sync: {synced}");
        match throttle {
            Some(t) => t.inside(|| fio(file, size)),
            None => fio(file, size),
        }
    };
    let _ = std::fs::remove_file(&new_file);
    let allocating = rate(&new_file, BELOW_FIO_SIZE);
    std::fs::remove_file(&new_file).expect("remove fio's file");
    (allocating, rate(image, size))
}

/// 1 MiB sequential writes at depth 8 for `BELOW_SECONDS` from each
/// server in turn, `rounds` times: rewind-blk on a new volume of its own
/// each round in `dir`/below whose journal limit is `BELOW_JOURNAL_MAX`
/// (removed after the round), the qsd exports on `image`; then fio's figures for the device
/// (which writes over `image`: its contents do not matter after).
fn below_the_limit(
    dir: &Path,
    image: &Path,
    size: u64,
    rounds: usize,
    preallocated_max: u64,
    throttle: Option<&Throttle>,
) -> Below {
    let below = dir.join("below");
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("at_limit-below-rewind-blk.log");
    let workload = Workload {
        block: LARGE,
        depth: 8,
        sequential: true,
        time: Duration::from_secs(BELOW_SECONDS),
    };
    let mut outcomes = Below {
        preallocated_max,
        ..Below::default()
    };
    std::fs::File::create(&log).expect("rewind-blk's log");
    for round in 0..rounds {
        std::fs::create_dir(&below).expect("a directory for the volume below the limit");
        let volume = create_rewind(
            &below,
            image,
            size,
            &[
                "--journal-max".into(),
                BELOW_JOURNAL_MAX.to_string(),
                "--segment-size".into(),
                BELOW_SEGMENT_SIZE.to_string(),
            ],
        );
        for k in 0..3 {
            // Each run starts with no writeback in flight (the import's,
            // the run before's).
            let synced = Command::new("sync").status().expect("sync");
            assert!(synced.success(), "sync: {synced}");
            let start = || match k {
                0 => serve_rewind_to(
                    &below,
                    &volume,
                    1,
                    // Every round's log, one after the other.
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(&log)
                        .expect("rewind-blk's log"),
                ),
                1 => start_qsd(dir, image, false, 1),
                _ => start_qsd(dir, image, true, 1),
            };
            let server = match throttle {
                Some(t) => t.inside(start),
                None => start(),
            };
            let seed = 30 + (round * 3 + k) as u64;
            let outcome = run(&server, workload, size, seed);
            match outcomes.runs.get_mut(k) {
                Some((_, runs)) => runs.push(outcome),
                None => outcomes.runs.push((server.name, vec![outcome])),
            }
        }
        std::fs::remove_dir_all(&below).expect("remove the volume below the limit");
        // The preallocated volume once the other is gone (the disk holds
        // one of them): empty, as the data a sequential run writes over
        // the whole disk does not depend on what was there.
        std::fs::create_dir(&below).expect("a directory for the preallocated volume");
        let created = Instant::now();
        let volume = create_volume(
            &below,
            None,
            size,
            &[
                "--journal-max".into(),
                preallocated_max.to_string(),
                "--segment-size".into(),
                BELOW_SEGMENT_SIZE.to_string(),
                "--preallocate-journal".into(),
            ],
        );
        outcomes.preallocation.push(created.elapsed());
        let synced = Command::new("sync").status().expect("sync");
        assert!(synced.success(), "sync: {synced}");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("rewind-blk's log");
        let start = || serve_rewind_to(&below, &volume, 1, log);
        let server = match throttle {
            Some(t) => t.inside(start),
            None => start(),
        };
        let outcome = run(&server, workload, size, 60 + round as u64);
        drop(server);
        match outcomes.runs.get_mut(3) {
            Some((_, runs)) => runs.push(outcome),
            None => outcomes
                .runs
                .push(("rewind-blk, preallocated journal", vec![outcome])),
        }
        std::fs::remove_dir_all(&below).expect("remove the preallocated volume");
        let (new_file, written) = fio_sequential(dir, image, size, throttle);
        outcomes.device_new_file.push(new_file);
        outcomes.device_written.push(written);
    }
    outcomes
}

/// What the runs below the limit measured.
#[derive(Default)]
struct Below {
    /// Each server's outcomes, by round.
    runs: Vec<(&'static str, Vec<Outcome>)>,
    /// fio's MiB/s by round, into a new file.
    device_new_file: Vec<f64>,
    /// fio's MiB/s by round, over the qsd exports' image, as they write it.
    device_written: Vec<f64>,
    /// The preallocated volume's journal limit, and how long its
    /// `create --preallocate-journal` took, by round.
    preallocated_max: u64,
    preallocation: Vec<Duration>,
}

/// The median of `values` (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Prints the runs below the limit: rates per interval, then the table.
fn report_below(below: &Below) {
    println!();
    println!(
        "1 MiB sequential writes below the limit (rewind's journal limit {} GiB), depth 8, MiB/s per interval:",
        BELOW_JOURNAL_MAX >> 30
    );
    for (name, runs) in &below.runs {
        for (round, o) in runs.iter().enumerate() {
            let row: Vec<String> = o.intervals.iter().map(|i| format!("{i:.0}")).collect();
            println!("  {name} (round {}): {}", round + 1, row.join(" "));
        }
    }
    println!();
    println!(
        "| 1 MiB seq QD8 below the limit | MiB/s, median of {} | each round | max latency | errors | rewind-blk / it (medians) | each round |",
        below.device_new_file.len()
    );
    println!("|---|---|---|---|---|---|---|");
    let mib_s = |o: &Outcome| o.rate() * (LARGE >> 20) as f64;
    let rewind_below = &below.runs[0].1;
    let rewind_median = median(rewind_below.iter().map(mib_s).collect());
    for (name, runs) in &below.runs {
        let rates: Vec<f64> = runs.iter().map(mib_s).collect();
        let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        let ratios: Vec<String> = rewind_below
            .iter()
            .zip(runs)
            .map(|(ours, theirs)| format!("{:.2}x", ours.rate() / theirs.rate()))
            .collect();
        let worst = runs.iter().map(|o| o.max_latency).max().unwrap_or_default();
        println!(
            "| {name} | {:.0} | {} | {} ms | {} | {:.2}x | {} |",
            median(rates),
            each.join(", "),
            ms(worst),
            runs.iter().map(|o| o.errors).sum::<usize>(),
            rewind_median / median(runs.iter().map(mib_s).collect()),
            ratios.join(", ")
        );
    }
    let rows = [
        ("device, new file (fio)", &below.device_new_file),
        (
            "device, over the image again and again (fio)",
            &below.device_written,
        ),
    ];
    for (name, rates) in rows {
        let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        let ratios: Vec<String> = rewind_below
            .iter()
            .zip(rates)
            .map(|(ours, theirs)| format!("{:.2}x", mib_s(ours) / theirs))
            .collect();
        println!(
            "| {name} | {:.0} | {} | | | {:.2}x | {} |",
            median(rates.clone()),
            each.join(", "),
            rewind_median / median(rates.clone()),
            ratios.join(", ")
        );
    }
    // The preallocated journal against qsd best, paired by round (issue
    // 17's goal for this row: at least 0.8x qsd best).
    let (Some((_, preallocated)), Some((_, best))) = (below.runs.get(3), below.runs.get(2)) else {
        return;
    };
    let ratios: Vec<f64> = preallocated
        .iter()
        .zip(best)
        .map(|(ours, theirs)| ours.rate() / theirs.rate())
        .collect();
    let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
    let seconds: Vec<String> = below
        .preallocation
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect();
    println!();
    println!(
        "rewind-blk with a preallocated journal of {} GiB (created in {} s): {:.0} MiB/s, \
         {:.2}x qsd best paired by round ({}), {:.2}x the device over written blocks",
        below.preallocated_max >> 30,
        seconds.join(", "),
        median(preallocated.iter().map(mib_s).collect()),
        median(ratios),
        shown.join(", "),
        median(preallocated.iter().map(mib_s).collect()) / median(below.device_written.clone()),
    );
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let shape = if quick {
        Shape {
            size: 1 << 30,
            journal_max: 256 << 20,
            segment_size: 8 << 20,
        }
    } else {
        Shape {
            size: 4 << 30,
            journal_max: 1 << 30,
            segment_size: 64 << 20,
        }
    };
    let seconds: u64 = std::env::var("REWIND_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 6 } else { 120 });
    let random = Workload {
        block: SMALL,
        depth: 32,
        sequential: false,
        time: Duration::from_secs(seconds),
    };
    let sequential = Workload {
        block: LARGE,
        depth: 8,
        sequential: true,
        time: Duration::from_secs(seconds / 3).max(Duration::from_secs(3)),
    };
    let base = std::env::var_os("REWIND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("bench dir");
    let throttle_iops: Option<u64> = std::env::var("REWIND_BENCH_THROTTLE_IOPS")
        .ok()
        .map(|s| s.parse().expect("REWIND_BENCH_THROTTLE_IOPS: a number"));
    let throttle = throttle_iops.map(|iops| Throttle::new(dir.path(), iops));
    if let (Some(t), Some(iops)) = (&throttle, throttle_iops) {
        println!(
            "throttled: the servers run in the cgroup v1 blkio group {}, {iops} read and \
             {iops} write IOPS on {} ({})",
            t.dir.display(),
            t.device,
            t.disk.display()
        );
    }
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("at_limit-rewind-blk.log");
    let image = dir.path().join("disk.raw");
    make_image(&image, shape.size);
    let mut journal = vec![
        "--journal-max".to_owned(),
        shape.journal_max.to_string(),
        "--segment-size".into(),
        shape.segment_size.to_string(),
    ];
    let volume = create_rewind(dir.path(), &image, shape.size, &journal);
    println!(
        "volume {} MiB, rewind journal limit {} MiB in {} MiB segments; random run {} s, \
         sequential run {} s, intervals of {:.1} s",
        shape.size >> 20,
        shape.journal_max >> 20,
        shape.segment_size >> 20,
        random.time.as_secs(),
        sequential.time.as_secs(),
        random.time.as_secs_f64() / INTERVALS as f64
    );
    let (rounds, preallocated_max) = match quick {
        true => (1, QUICK_PREALLOCATED_MAX),
        false => (BELOW_ROUNDS, BELOW_PREALLOCATED_MAX),
    };
    let only = std::env::var("REWIND_BENCH_ONLY").unwrap_or_default();
    let below = (only != "limit").then(|| {
        below_the_limit(
            dir.path(),
            &image,
            shape.size,
            rounds,
            preallocated_max,
            throttle.as_ref(),
        )
    });
    if only == "below" {
        below.iter().for_each(report_below);
        return;
    }
    // The same volume with its journal written out at creation: no block
    // of it is new to the disk, in the first pass to the limit too.
    let preallocated_dir = dir.path().join("preallocated");
    std::fs::create_dir(&preallocated_dir).expect("a directory for the preallocated volume");
    journal.push("--preallocate-journal".into());
    let preallocated = create_rewind(&preallocated_dir, &image, shape.size, &journal);
    let preallocated_log =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("at_limit-preallocated-rewind-blk.log");
    let start = |k: usize| match k {
        0 => serve_rewind_to(
            dir.path(),
            &volume,
            1,
            std::fs::File::create(&log).expect("rewind-blk's log"),
        ),
        1 => start_qsd(dir.path(), &image, false, 1),
        2 => start_qsd(dir.path(), &image, true, 1),
        _ => {
            let log = std::fs::File::create(&preallocated_log).expect("rewind-blk's log");
            let mut server = serve_rewind_to(&preallocated_dir, &preallocated, 1, log);
            server.name = "rewind-blk, preallocated journal";
            server
        }
    };
    // One server at a time (the qsd exports share one image), each for the
    // sequential run and then the random one.
    let mut results = Vec::new();
    let mut io = Vec::new();
    for k in 0..4 {
        let before = throttle.as_ref().map(|t| (t.throttled(), t.disk_ops()));
        let server = match &throttle {
            Some(t) => t.inside(|| start(k)),
            None => start(k),
        };
        let s = run(&server, sequential, shape.size, 20 + k as u64);
        let r = run(&server, random, shape.size, 10 + k as u64);
        if let (Some(t), Some((throttled, disk))) = (&throttle, before) {
            let (t_now, d_now) = (t.throttled(), t.disk_ops());
            let secs = (s.elapsed + r.elapsed).as_secs_f64();
            io.push((
                server.name,
                (t_now.reads - throttled.reads) as f64 / secs,
                (t_now.writes - throttled.writes) as f64 / secs,
                (d_now.reads - disk.reads) as f64 / secs,
                (d_now.writes - disk.writes) as f64 / secs,
            ));
        }
        results.push((server.name, r, s));
    }
    let qsd_median = results[1].1.median_interval();
    println!();
    println!("1 MiB sequential writes, depth 8, MiB/s per interval:");
    for (name, _, s) in &results {
        let row: Vec<String> = s.intervals.iter().map(|i| format!("{i:.0}")).collect();
        println!("  {name}: {}", row.join(" "));
    }
    println!("4 KiB random writes, depth 32, IOPS per interval:");
    for (name, r, _) in &results {
        let row: Vec<String> = r.intervals.iter().map(|i| format!("{i:.0}")).collect();
        println!("  {name}: {}", row.join(" "));
    }
    println!(
        "device{}: {:.0} MiB/s sequential (dd of 1 MiB blocks, oflag=direct)",
        if throttle.is_some() {
            " (throttled)"
        } else {
            ""
        },
        device_rate(dir.path(), shape.size / 4, throttle.as_ref())
    );
    for (name, r, s) in &results {
        for (what, o) in [("sequential", s), ("random", r)] {
            if let Some((at, ret)) = o.first_error {
                println!(
                    "{name}: {} errors in the {what} run, the first {:.1} s in (ret {ret})",
                    o.errors,
                    at.as_secs_f64()
                );
            }
        }
    }
    println!(
        "slowest requests (when the worst one completed, since its run's start; the slow ones \
         per interval):"
    );
    for (name, r, s) in &results {
        for (what, o) in [("sequential", s), ("random", r)] {
            let per_interval: Vec<String> = o.slow_intervals.iter().map(usize::to_string).collect();
            println!(
                "  {name}, {what}: worst {} ms at {:.1} s, {} of {} over {} ms ({})",
                ms(o.max_latency),
                o.max_latency_at.as_secs_f64(),
                o.slow,
                o.ops,
                SLOW.as_millis(),
                per_interval.join(" ")
            );
        }
    }
    for log in [&log, &preallocated_log] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        println!(
            "rewind-blk's log: {} warnings, {} errors ({})",
            text.lines().filter(|l| l.contains(" WARN ")).count(),
            text.lines().filter(|l| l.contains(" ERROR ")).count(),
            log.display()
        );
    }
    println!();
    println!("| server | 4 KiB QD32 IOPS | median interval | lowest interval | lowest / qsd median | p99 | max latency | errors | 1 MiB seq QD8 MiB/s | its max latency | its errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, r, s) in &results {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2}x | {} ms | {} ms | {} | {:.0} | {} ms | {} |",
            r.rate(),
            r.median_interval(),
            r.min_interval(),
            r.min_interval() / qsd_median,
            ms(r.p99),
            ms(r.max_latency),
            r.errors,
            s.rate() * (LARGE >> 20) as f64,
            ms(s.max_latency),
            s.errors,
        );
    }
    below.iter().for_each(report_below);
    if !io.is_empty() {
        println!();
        println!("IO per second over both runs of each server: counted by the throttle (its cgroup's), and the disk's whole (anyone's, the kernel's writeback included):");
        println!();
        println!(
            "| server | throttled reads/s | throttled writes/s | disk reads/s | disk writes/s |"
        );
        println!("|---|---|---|---|---|");
        for (name, tr, tw, dr, dw) in &io {
            println!("| {name} | {tr:.0} | {tw:.0} | {dr:.0} | {dw:.0} |");
        }
    }
}
