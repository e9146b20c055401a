//! rewind-blk on a disk larger than the page cache (issue 16) against
//! qemu-storage-daemon in two configurations: its defaults (`driver=file` +
//! `driver=raw`: buffered IO, thread-pool AIO) and "qsd best"
//! (`cache.direct=on,aio=io_uring`), with fio's O_DIRECT figure on the same
//! file as the device's limit. The same libblkio client and the same
//! prefilled raw image, which rewind imports as its base: the cold reads
//! of every server and of fio read that copy (`vol/base.img`, which they
//! do not write), so all read the same blocks of the disk; the writes go
//! to the original (`disk.raw`). Every server offers 4 queues. Each
//! workload runs 3 rounds, the servers alternating (the order rotates each
//! round), each with a random pattern of its own; medians are reported,
//! and rewind's ratios to the others paired by round (the median of each
//! round's ratio), which a disk whose speed drifts between rounds moves
//! less. Before each cold run the page cache is dropped (`sync`, then
//! `echo 3 > /proc/sys/vm/drop_caches`, as root: the bench fails without
//! it); the reads touch a fraction of the image.
//!
//! `cargo bench -p rewind-vhost-blk --bench cold` (REWIND_BENCH_DIR picks
//! the file system, default the temporary directory; REWIND_BENCH_GIB the
//! image size, default 8; REWIND_BENCH_ROUNDS the rounds, default 3;
//! REWIND_BENCH_ONLY runs only the workloads whose name contains it;
//! REWIND_BENCH_QUICK=1 makes a small smoke run: 256 MiB, one round).

mod common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use common::{closed_loop, make_image, start_qsd, start_rewind, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Queues every server offers (the client uses one or all of them).
const QUEUES: usize = 4;
/// Flushes the write+flush workload leaves in flight at most.
const MAX_FLUSHES: usize = 64;
/// The paced write+flush row's writes a second: below what each server
/// reaches unpaced here (qsd default about 5k, rewind-blk about 8k), so
/// its p99 compares the servers' tails at the same load, not at the load
/// each one's own speed sets.
const PACED_WRITES: u32 = 4000;
const SERVERS: [&str; 3] = ["rewind-blk", "qsd default", "qsd best"];

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    RandomRead,
    SequentialRead,
    RandomWrite,
    /// One write in flight; when it completes a flush is queued (not
    /// awaited) and the next write is submitted.
    WriteThenFlush,
    /// Random writes with FUA: each completes once durable (libblkio
    /// sends a write and a flush for it; virtio-blk has no FUA bit).
    FuaWrite,
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    pattern: Pattern,
    block: usize,
    queues: usize,
    /// Per queue.
    depth: usize,
    cold: bool,
    /// Requests in all (writes only, for WriteThenFlush).
    ops: usize,
    /// WriteThenFlush only: writes submitted at most this many a second
    /// (the next one waits for its turn), so that every server answers the
    /// same offered load and their tails compare at equal work.
    pace: Option<u32>,
}

#[derive(Clone, Copy)]
struct Outcome {
    iops: f64,
    mibps: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_io: Duration,
    /// Share of the machine's CPU time (all CPUs) that was busy during the
    /// run: client, server and kernel together (fio's: from its start to
    /// its end, its setup included).
    machine_busy: f64,
}

/// The machine's busy and total CPU time so far, in clock ticks
/// (/proc/stat's first line: user, nice, system, idle, iowait, irq,
/// softirq, steal). Busy is what ran here (user to softirq but idle and
/// iowait); steal, time the hypervisor gave to others, is not.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .expect("/proc/stat's cpu line")
        .split_whitespace()
        .take(8)
        .map(|t| t.parse().expect("/proc/stat tick count"))
        .collect();
    assert_eq!(ticks.len(), 8, "/proc/stat's cpu line: {ticks:?}");
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    (busy, ticks.iter().sum())
}

/// The busy share between two [`machine_ticks`] readings (iowait may go
/// down, so the differences saturate).
fn busy_since(before: (u64, u64)) -> f64 {
    let (busy, total) = machine_ticks();
    busy.saturating_sub(before.0) as f64 / total.saturating_sub(before.1).max(1) as f64
}

fn drop_caches() {
    let ok = Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(ok, "sync failed");
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .unwrap_or_else(|e| panic!("cannot drop the page cache (the cold rows need root): {e}"));
}

fn connect(server: &Server, queues: usize) -> (Blkio, Vec<Blkioq>) {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("driver");
    b.set_str("path", server.socket.to_str().expect("path"))
        .expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", queues as i32).expect("queues");
    b.set_i32("queue-size", 256).expect("queue size");
    let qs = b.start().expect("start").queues;
    (b, qs)
}

/// One queue's share of a read or write workload; returns its latencies.
fn drive(
    name: &str,
    q: &mut Blkioq,
    w: Workload,
    base: usize,
    ops: usize,
    size: u64,
    seed: u64,
) -> Vec<Duration> {
    let base = base as *mut u8;
    let blocks = size / w.block as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next = 0u64;
    closed_loop(name, q, w.depth, ops, |q, slot, _| {
        // SAFETY: slot < depth, so the buffer lies inside this queue's part
        // of the mapped region.
        let buf = unsafe { base.add(slot * w.block) };
        let block = if w.pattern == Pattern::SequentialRead {
            next = (next + 1) % blocks;
            next
        } else {
            rng.random_range(0..blocks)
        };
        let offset = block * w.block as u64;
        if w.pattern == Pattern::RandomWrite {
            q.write(offset, buf, w.block, slot, ReqFlags::empty());
        } else if w.pattern == Pattern::FuaWrite {
            q.write(offset, buf, w.block, slot, ReqFlags::FUA);
        } else {
            q.read(offset, buf, w.block, slot, ReqFlags::empty());
        }
    })
}

/// QD1 writes, each followed by a flush that is queued but not awaited;
/// returns the writes' latencies (the run ends when the last flush is done).
fn write_then_flush(
    name: &str,
    q: &mut Blkioq,
    base: usize,
    ops: usize,
    size: u64,
    seed: u64,
    pace: Option<u32>,
) -> Vec<Duration> {
    const WRITE: usize = usize::MAX;
    let interval = pace.map(|per_second| Duration::from_secs(1) / per_second);
    let buf = base as *mut u8;
    let blocks = size / 4096;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut latencies = Vec::with_capacity(ops);
    let mut flushes = 0;
    let mut done: Vec<MaybeUninit<Completion>> = (0..MAX_FLUSHES + 1)
        .map(|_| MaybeUninit::uninit())
        .collect();
    let mut one: Vec<MaybeUninit<Completion>> = vec![MaybeUninit::uninit()];
    let mut started = Instant::now();
    let mut turn = started;
    q.write(
        rng.random_range(0..blocks) * 4096,
        buf,
        4096,
        WRITE,
        ReqFlags::empty(),
    );
    let mut writing = true;
    while writing || flushes > 0 {
        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
        let mut wrote = false;
        for c in &done[..n] {
            // SAFETY: do_io initialized the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "{name} failed a request");
            if c.user_data == WRITE {
                latencies.push(started.elapsed());
                wrote = true;
            } else {
                flushes -= 1;
            }
        }
        if !wrote {
            continue;
        }
        // Only flushes are in flight now; never more than MAX_FLUSHES of
        // them (the ring is 256).
        while flushes == MAX_FLUSHES {
            let m = q.do_io(&mut one, 1, None, None).expect("do_io");
            for f in &one[..m] {
                // SAFETY: do_io initialized it.
                let f = unsafe { f.assume_init_read() };
                assert_eq!(f.ret, 0, "{name} failed a flush");
                flushes -= 1;
            }
        }
        q.flush(flushes, ReqFlags::empty());
        flushes += 1;
        writing = latencies.len() < ops;
        if writing {
            // A paced write waits for its turn, on a fixed schedule so that
            // a late wake-up is made up by the next turn (one turn at most,
            // no bursts); the flushes in flight complete meanwhile and are
            // reaped by the next do_io.
            if let Some(interval) = interval {
                let now = Instant::now();
                turn = (turn + interval).max(now.checked_sub(interval).unwrap_or(now));
                std::thread::sleep(turn.saturating_duration_since(now));
            }
            started = Instant::now();
            q.write(
                rng.random_range(0..blocks) * 4096,
                buf,
                4096,
                WRITE,
                ReqFlags::empty(),
            );
        }
    }
    latencies
}

/// Runs `w` against `server` through a fresh libblkio connection.
fn run(server: &Server, w: Workload, size: u64, seed: u64) -> Outcome {
    let (mut b, queues) = connect(server, w.queues);
    let per_queue = w.depth * w.block;
    let region = b.alloc_mem_region(w.queues * per_queue).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let base = region.addr;
    let cpu_before = server.cpu();
    let machine_before = machine_ticks();
    let t = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let threads: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                let ops = w.ops / w.queues;
                let base = base + i * per_queue;
                let seed = seed * 16 + i as u64;
                s.spawn(move || {
                    if w.pattern == Pattern::WriteThenFlush {
                        write_then_flush(server.name, &mut q, base, ops, size, seed, w.pace)
                    } else {
                        drive(server.name, &mut q, w, base, ops, size, seed)
                    }
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("client thread"))
            .collect()
    });
    let elapsed = t.elapsed();
    let machine_busy = busy_since(machine_before);
    let cpu = server.cpu().saturating_sub(cpu_before);
    latencies.sort_unstable();
    let n = latencies.len();
    Outcome {
        iops: n as f64 / elapsed.as_secs_f64(),
        mibps: (n * w.block) as f64 / elapsed.as_secs_f64() / (1 << 20) as f64,
        p50: latencies[n / 2],
        p99: latencies[n * 99 / 100],
        cpu_per_io: cpu / n as u32,
        machine_busy,
    }
}

/// fio's figure for the workload on the same file system, O_DIRECT (the
/// write rows: buffered writes with fdatasync after each, as the
/// guest's flush asks); None for the warm writes.
fn fio(w: Workload, image: &Path, dir: &Path, seconds: u64, write_size: u64) -> Option<Outcome> {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=device", "--output-format=json", "--time_based"])
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--bs={}", w.block));
    match w.pattern {
        Pattern::RandomRead | Pattern::SequentialRead => {
            let rw = if w.pattern == Pattern::RandomRead {
                "randread"
            } else {
                "read"
            };
            cmd.args([
                "--direct=1",
                "--ioengine=io_uring",
                "--readonly",
                "--norandommap",
            ])
            .arg(format!("--rw={rw}"))
            .arg(format!("--iodepth={}", w.queues * w.depth))
            .arg(format!("--filename={}", image.display()));
        }
        Pattern::WriteThenFlush | Pattern::FuaWrite => {
            cmd.args([
                "--rw=randwrite",
                "--ioengine=psync",
                "--iodepth=1",
                "--fdatasync=1",
            ])
            .arg(format!("--size={write_size}"))
            .arg(format!(
                "--filename={}",
                dir.join("fio-write.raw").display()
            ));
        }
        Pattern::RandomWrite => return None,
    }
    if w.pace.is_some() {
        // fio has no such figure: the device row is the unpaced one.
        return None;
    }
    let machine_before = machine_ticks();
    let out = cmd.output().expect("fio (apt-get install fio)");
    let machine_busy = busy_since(machine_before);
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let job = &v["jobs"][0];
    let side = if matches!(w.pattern, Pattern::WriteThenFlush | Pattern::FuaWrite) {
        &job["write"]
    } else {
        &job["read"]
    };
    let iops = side["iops"].as_f64().expect("fio iops");
    let pct = |p: &str| {
        Duration::from_nanos(
            side["clat_ns"]["percentile"][p]
                .as_u64()
                .unwrap_or_default(),
        )
    };
    Some(Outcome {
        iops,
        mibps: side["bw_bytes"].as_f64().expect("fio bw") / (1 << 20) as f64,
        p50: pct("50.000000"),
        p99: pct("99.000000"),
        cpu_per_io: Duration::ZERO,
        machine_busy,
    })
}

/// Rewind's ratios to the others paired by round (each round's own
/// runs, minutes apart), medians over the rounds: on a disk whose speed
/// drifts between rounds these say more than the ratio of the medians.
#[derive(Clone, Copy)]
struct Paired {
    qsd_default: f64,
    qsd_best: f64,
    device: Option<f64>,
    /// Rewind's p99 latency over qsd default's.
    p99_qsd_default: f64,
}

/// The median over the rounds of `key` of `rewind`'s outcome over
/// `other`'s.
fn paired_median(rewind: &[Outcome], other: &[Outcome], key: impl Fn(&Outcome) -> f64) -> f64 {
    let mut ratios: Vec<f64> = rewind
        .iter()
        .zip(other)
        .map(|(r, o)| key(r) / key(o))
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

fn median(mut v: Vec<Outcome>) -> Outcome {
    let mid = v.len() / 2;
    let pick = |v: &mut Vec<Outcome>, key: fn(&Outcome) -> f64| {
        v.sort_by(|a, b| key(a).total_cmp(&key(b)));
        v[mid]
    };
    Outcome {
        iops: pick(&mut v, |o| o.iops).iops,
        mibps: pick(&mut v, |o| o.mibps).mibps,
        p50: pick(&mut v, |o| o.p50.as_secs_f64()).p50,
        p99: pick(&mut v, |o| o.p99.as_secs_f64()).p99,
        cpu_per_io: pick(&mut v, |o| o.cpu_per_io.as_secs_f64()).cpu_per_io,
        machine_busy: pick(&mut v, |o| o.machine_busy).machine_busy,
    }
}

/// The row's figure: MiB/s for 1 MiB requests, IOPS otherwise.
fn figure(w: &Workload, o: &Outcome) -> f64 {
    if w.block >= 1 << 20 {
        o.mibps
    } else {
        o.iops
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let size: u64 = if quick {
        256 << 20
    } else {
        env("REWIND_BENCH_GIB").unwrap_or(8) << 30
    };
    let rounds = env("REWIND_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 }) as usize;
    let only = std::env::var("REWIND_BENCH_ONLY").ok();
    // Requests per run: (random 4 KiB reads, 1 MiB reads, QD1 writes, QD32
    // writes). The random reads and the QD1 writes run about as long as
    // fio's device figure (5 s at 50k and 4k IOPS), not a fraction of a
    // second; the warm writes a second or more, while all rounds of both
    // warm rows together (4.6 GiB in 3 rounds) stay well below the
    // journal's default limit (the 8 GiB disk), near which writes are
    // paced to the fold: the at_limit bench measures that.
    let (rr, seq, wf, ww) = if quick {
        (2_000, 32, 200, 4_000)
    } else {
        (250_000, 2_048, 20_000, 200_000)
    };
    let (fio_seconds, fio_write_size) = if quick { (1, 64 << 20) } else { (5, 1 << 30) };
    let workload = |name, pattern, block, queues, depth, cold, ops| Workload {
        name,
        pattern,
        block,
        queues,
        depth,
        cold,
        ops,
        pace: None,
    };
    use Pattern::*;
    let workloads = [
        workload(
            "4 KiB random reads, cold, 1 queue QD32",
            RandomRead,
            4096,
            1,
            32,
            true,
            rr,
        ),
        workload(
            "4 KiB random reads, cold, 4 queues x QD8",
            RandomRead,
            4096,
            4,
            8,
            true,
            rr,
        ),
        workload(
            "1 MiB sequential reads, cold, QD8 (MiB/s)",
            SequentialRead,
            1 << 20,
            1,
            8,
            true,
            seq,
        ),
        workload(
            "4 KiB write + flush queued after each, QD1",
            WriteThenFlush,
            4096,
            1,
            1,
            false,
            wf,
        ),
        Workload {
            pace: Some(PACED_WRITES),
            ..workload(
                "4 KiB write + flush queued after each, QD1, paced to 4000/s",
                WriteThenFlush,
                4096,
                1,
                1,
                false,
                wf,
            )
        },
        workload(
            "4 KiB random writes with FUA (awaited), QD1",
            FuaWrite,
            4096,
            1,
            1,
            false,
            wf,
        ),
        workload(
            "4 KiB random writes, warm, 1 queue QD32",
            RandomWrite,
            4096,
            1,
            32,
            false,
            ww,
        ),
        workload(
            "4 KiB random writes, warm, 4 queues x QD8",
            RandomWrite,
            4096,
            4,
            8,
            false,
            ww,
        ),
    ];
    let base = std::env::var_os("REWIND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("bench dir");
    let image = dir.path().join("disk.raw");
    let t = Instant::now();
    make_image(&image, size);
    let rewind = start_rewind(dir.path(), &image, size, QUEUES);
    // The raw image rewind's reads come from while its journal is empty.
    let base = dir.path().join("vol").join("base.img");
    assert_eq!(
        std::fs::metadata(&base).map(|m| m.len()).ok(),
        Some(size),
        "rewind's base image {}",
        base.display()
    );
    println!(
        "{} MiB image and rewind's import in {:.1} s; rewind-blk pid {}, {rounds} round(s)",
        size >> 20,
        t.elapsed().as_secs_f64(),
        rewind.child.id()
    );
    let mut rows: Vec<(Workload, [Outcome; 3], Option<Outcome>, Paired)> = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !w.name.contains(o.as_str())) {
            continue;
        }
        let file = if w.cold { &base } else { &image };
        let mut results: [Vec<Outcome>; 3] = Default::default();
        let mut device = Vec::new();
        for round in 0..rounds {
            for k in (0..3).map(|k| (k + round) % 3) {
                // A seed of each server's own: none reads the offsets
                // another has just read (a cache under this machine's disk
                // would favour the later readers).
                let seed = 100 * (i as u64 + 1) + 10 * round as u64 + k as u64;
                if w.cold {
                    drop_caches();
                }
                let o = match k {
                    0 => run(&rewind, *w, size, seed),
                    _ => run(&start_qsd(dir.path(), file, k == 2, QUEUES), *w, size, seed),
                };
                println!(
                    "  round {round}, {}, {}: {:.0}, p50 {:.1} us, p99 {:.1} us, machine CPU {:.0}% busy",
                    w.name,
                    SERVERS[k],
                    figure(w, &o),
                    o.p50.as_secs_f64() * 1e6,
                    o.p99.as_secs_f64() * 1e6,
                    o.machine_busy * 100.0
                );
                results[k].push(o);
            }
            if w.cold {
                drop_caches();
            }
            if let Some(o) = fio(*w, file, dir.path(), fio_seconds, fio_write_size) {
                println!(
                    "  round {round}, {}, device: {:.0}, machine CPU {:.0}% busy",
                    w.name,
                    figure(w, &o),
                    o.machine_busy * 100.0
                );
                device.push(o);
            }
        }
        let paired = Paired {
            qsd_default: paired_median(&results[0], &results[1], |o| figure(w, o)),
            qsd_best: paired_median(&results[0], &results[2], |o| figure(w, o)),
            device: (!device.is_empty())
                .then(|| paired_median(&results[0], &device, |o| figure(w, o))),
            p99_qsd_default: paired_median(&results[0], &results[1], |o| o.p99.as_secs_f64()),
        };
        let [a, b, c] = results.map(median);
        let d = (!device.is_empty()).then(|| median(device));
        rows.push((*w, [a, b, c], d, paired));
    }
    println!();
    println!(
        "| workload | rewind-blk | qsd default | qsd best | device (fio) | rewind / qsd default | rewind / qsd best | rewind / device |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut by_name = HashMap::new();
    for (w, [a, b, c], d, paired) in &rows {
        let f = |o: &Outcome| figure(w, o);
        let dev = d.as_ref().map_or("".into(), |d| format!("{:.0}", f(d)));
        let dev_ratio = d
            .as_ref()
            .map_or("".into(), |d| format!("{:.2}x", f(a) / f(d)));
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {dev} | {:.2}x | {:.2}x | {dev_ratio} |",
            w.name,
            f(a),
            f(b),
            f(c),
            f(a) / f(b),
            f(a) / f(c)
        );
        by_name.insert(w.name, (f(a), f(b), f(c), *a, *b, *paired));
    }
    println!();
    println!("Paired by round (the median over the rounds of each round's ratio):");
    println!();
    println!(
        "| workload | rewind / qsd default | rewind / qsd best | rewind / device | p99: rewind / qsd default |"
    );
    println!("|---|---|---|---|---|");
    for (w, _, _, p) in &rows {
        let dev = p.device.map_or("".into(), |d| format!("{d:.2}x"));
        println!(
            "| {} | {:.2}x | {:.2}x | {dev} | {:.2}x |",
            w.name, p.qsd_default, p.qsd_best, p.p99_qsd_default
        );
    }
    println!();
    println!(
        "| workload | p50 ms (rewind / qsd default / qsd best) | p99 ms (rewind / qsd default / qsd best) | server CPU per IO us (rewind / qsd default / qsd best) | machine CPU busy % (rewind / qsd default / qsd best / device) |"
    );
    println!("|---|---|---|---|---|");
    for (w, o, d, _) in &rows {
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        let busy = |o: &Outcome| format!("{:.0}", o.machine_busy * 100.0);
        println!(
            "| {} | {} / {} / {} | {} / {} / {} | {} / {} / {} | {} / {} / {} / {} |",
            w.name,
            ms(o[0].p50),
            ms(o[1].p50),
            ms(o[2].p50),
            ms(o[0].p99),
            ms(o[1].p99),
            ms(o[2].p99),
            us(o[0].cpu_per_io),
            us(o[1].cpu_per_io),
            us(o[2].cpu_per_io),
            busy(&o[0]),
            busy(&o[1]),
            busy(&o[2]),
            d.as_ref().map_or("-".into(), busy)
        );
    }
    println!();
    println!("Goals (issue 16; ratios paired by round, the ratio of the medians after):");
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    for w in &workloads[..2] {
        if let Some((
            a,
            _,
            c,
            _,
            _,
            p @ Paired {
                device: Some(d), ..
            },
        )) = by_name.get(w.name)
        {
            println!(
                "- {}: {:.2}x qsd best (goal 1.0x, {}; {:.2}x), {:.2}x device (goal 0.8x, {})",
                w.name,
                p.qsd_best,
                met(p.qsd_best >= 1.0),
                a / c,
                d,
                met(*d >= 0.8)
            );
        }
    }
    if let Some((a, _, c, _, _, p)) = by_name.get(workloads[2].name) {
        println!(
            "- {}: {:.2}x qsd best (goal 0.95x, {}; {:.2}x)",
            workloads[2].name,
            p.qsd_best,
            met(p.qsd_best >= 0.95),
            a / c
        );
    }
    if let Some((a, b, _, oa, ob, p)) = by_name.get(workloads[3].name) {
        println!(
            "- {}: {:.2}x qsd default (goal 1.0x, {}; {:.2}x), p99 {:.2}x qsd default's (goal at most 1.0x, {}; medians {:.3} against {:.3} ms)",
            workloads[3].name,
            p.qsd_default,
            met(p.qsd_default >= 1.0),
            a / b,
            p.p99_qsd_default,
            met(p.p99_qsd_default <= 1.0),
            oa.p99.as_secs_f64() * 1e3,
            ob.p99.as_secs_f64() * 1e3,
        );
    }
    if let Some((_, _, _, oa, ob, p)) = by_name.get(workloads[4].name) {
        println!(
            "- {}: p99 {:.2}x qsd default's at the same load (medians {:.3} against {:.3} ms)",
            workloads[4].name,
            p.p99_qsd_default,
            oa.p99.as_secs_f64() * 1e3,
            ob.p99.as_secs_f64() * 1e3,
        );
    }
    if let Some((a, b, _, _, _, p)) = by_name.get(workloads[5].name) {
        println!(
            "- {}: {:.2}x qsd default (goal 1.0x, {}; {:.2}x)",
            workloads[5].name,
            p.qsd_default,
            met(p.qsd_default >= 1.0),
            a / b
        );
    }
    if let (Some(one), Some(four)) = (
        by_name.get(workloads[6].name),
        by_name.get(workloads[7].name),
    ) {
        println!(
            "- warm writes, 4 queues against 1: rewind {:.2}x (goal 1.5x, {}), qsd default {:.2}x, qsd best {:.2}x",
            four.0 / one.0,
            met(four.0 / one.0 >= 1.5),
            four.1 / one.1,
            four.2 / one.2
        );
    }
}
