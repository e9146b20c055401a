//! rewind-blk at its journal's hard limit against qemu-storage-daemon (its
//! defaults, and with `cache.direct=on,aio=io_uring`): the same libblkio
//! client, the same prefilled raw image on the same file system, one
//! queue, over a volume whose journal limit is a quarter of the volume.
//! Each server in turn takes 1 MiB sequential writes at depth 8 (rewind
//! reaches its limit within the run), then 4 KiB random writes at depth 32
//! for a fixed time (most of it at the limit, folding). Reported: the rate
//! per interval (a twelfth of each run), the lowest interval against qsd's
//! median, the longest latency, IO errors (there must be none), and the
//! device's own sequential write rate (`dd oflag=direct`) for scale.
//!
//! `cargo bench -p rewind-vhost-blk --bench at_limit` (REWIND_BENCH_DIR
//! picks the file system, REWIND_BENCH_SECONDS the length of the random
//! run, REWIND_BENCH_QUICK=1 makes a small smoke run of about 30 s).

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use common::{create_rewind, make_image, serve_rewind, start_qsd, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SMALL: usize = 4096;
const LARGE: usize = 1 << 20;
/// Intervals a run's IOPS are reported in.
const INTERVALS: usize = 12;

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
    p99: Duration,
    errors: usize,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn median_interval(&self) -> f64 {
        let mut v = self.intervals.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
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
    let mut latencies = Vec::new();
    let mut errors = 0;
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
            }
            latencies.push(started[c.user_data].elapsed());
            let at = (now.as_nanos() / interval.as_nanos().max(1)) as usize;
            if let Some(count) = counts.get_mut(at) {
                *count += 1;
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
        max_latency: latencies.last().copied().unwrap_or_default(),
        p99: latencies
            .get(latencies.len() * 99 / 100)
            .copied()
            .unwrap_or_default(),
        errors,
    }
}

/// The file system's sequential write rate with the page cache out of the
/// way: `bytes` in 1 MiB direct writes, then the file is removed.
fn device_rate(dir: &Path, bytes: u64) -> f64 {
    let file = dir.join("dd.raw");
    let t = Instant::now();
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={}", bytes >> 20), "oflag=direct"])
        .args(["conv=fdatasync", "status=none"])
        .output()
        .expect("dd");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
    (bytes >> 20) as f64 / took.as_secs_f64()
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
    let image = dir.path().join("disk.raw");
    make_image(&image, shape.size);
    let volume = create_rewind(
        dir.path(),
        &image,
        shape.size,
        &[
            "--journal-max".into(),
            shape.journal_max.to_string(),
            "--segment-size".into(),
            shape.segment_size.to_string(),
        ],
    );
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
    let start = |k: usize| match k {
        0 => serve_rewind(dir.path(), &volume, 1),
        1 => start_qsd(dir.path(), &image, false, 1),
        _ => start_qsd(dir.path(), &image, true, 1),
    };
    // One server at a time (the qsd exports share one image), each for the
    // random run and then the sequential one.
    let mut results = Vec::new();
    for k in 0..3 {
        let server = start(k);
        let s = run(&server, sequential, shape.size, 20 + k as u64);
        let r = run(&server, random, shape.size, 10 + k as u64);
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
        "device: {:.0} MiB/s sequential (dd of 1 MiB blocks, oflag=direct)",
        device_rate(dir.path(), shape.size / 4)
    );
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
}
