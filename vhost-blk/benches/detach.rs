//! IOPS of a detached primary (`--on-storage-error detach`: every request
//! forwarded to the replica over the replication link) against the same
//! primary before its storage failed, with the same libblkio client: 4 KiB
//! random writes and reads at iodepth 1 and 32 on one queue, over a 64 MiB
//! disk (warm: the page cache holds both sides). Both daemons run on this
//! machine and talk over loopback with mutual TLS, so the forwarded numbers
//! are a floor set by the round trip and the replica's one-at-a-time
//! apply, not by a network. The primary's journal sits on a tmpfs that the
//! bench fills to make it detach (as vhost-blk/tests/detach.rs does); its
//! window is 1 s, so the normal runs fold as they go.
//!
//! `cargo bench -p rewind-vhost-blk --bench detach` (10 s per workload;
//! REWIND_BENCH_QUICK=1 makes a 1 s smoke run). Needs root (the tmpfs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use common::replication::{Pair, SIZE};
use common::tmpfs::TmpfsJournal;
use common::{wait_until, TestVolume};
use rand::Rng;
use serde_json::Value;

const BLOCK: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    depth: usize,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4 KiB random writes, QD1",
        write: true,
        depth: 1,
    },
    Workload {
        name: "4 KiB random writes, QD32",
        write: true,
        depth: 32,
    },
    Workload {
        name: "4 KiB random reads, QD1",
        write: false,
        depth: 1,
    },
    Workload {
        name: "4 KiB random reads, QD32",
        write: false,
        depth: 32,
    },
];

/// What one run measured.
struct Measured {
    iops: f64,
    mean_ms: f64,
    errors: u64,
}

/// Runs `w` against `socket` for `time`.
fn measure(socket: &Path, w: Workload, time: Duration) -> Measured {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("driver");
    blkio
        .set_str("path", socket.to_str().expect("utf-8 path"))
        .expect("path");
    blkio.connect().expect("connect");
    blkio.set_i32("num-queues", 1).expect("num-queues");
    blkio.set_i32("queue-size", 256).expect("queue-size");
    let mut started = blkio.start().expect("start");
    let blocks = blkio.get_u64("capacity").expect("capacity") / BLOCK as u64;
    let region = blkio.alloc_mem_region(w.depth * BLOCK).expect("alloc");
    blkio.map_mem_region(&region).expect("map");
    let queue = &mut started.queues[0];
    let mut rng = rand::rng();
    let mut done = [const { MaybeUninit::<Completion>::uninit() }; 32];
    let mut submitted_at = vec![Instant::now(); w.depth];
    let (mut completed, mut errors, mut latency) = (0u64, 0u64, Duration::ZERO);
    let submit = |queue: &mut blkio::Blkioq, slot: usize, rng: &mut rand::rngs::ThreadRng| {
        let buf = (region.addr + slot * BLOCK) as *mut u8;
        let offset = rng.random_range(0..blocks) * BLOCK as u64;
        // The slot index travels as the request's user data.
        if w.write {
            queue.write(offset, buf, BLOCK, slot, ReqFlags::empty());
        } else {
            queue.read(offset, buf, BLOCK, slot, ReqFlags::empty());
        }
    };
    let start = Instant::now();
    for (slot, at) in submitted_at.iter_mut().enumerate() {
        *at = Instant::now();
        submit(queue, slot, &mut rng);
    }
    let mut in_flight = w.depth;
    while in_flight > 0 {
        let n = queue
            .do_io(&mut done, 1, None, None)
            .unwrap_or_else(|e| panic!("do_io: {}", e.message()));
        for c in &done[..n] {
            // SAFETY: do_io initialized the first n completions.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            completed += 1;
            latency += submitted_at[slot].elapsed();
            if c.ret != 0 {
                errors += 1;
            }
            if start.elapsed() < time {
                submitted_at[slot] = Instant::now();
                submit(queue, slot, &mut rng);
            } else {
                in_flight -= 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Measured {
        iops: completed as f64 / elapsed,
        mean_ms: latency.as_secs_f64() * 1e3 / completed.max(1) as f64,
        errors,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let time = Duration::from_secs(if quick { 1 } else { 10 });
    // A short window keeps the journal well under its 1 GiB limit (the
    // applier folds what leaves it), so the normal runs neither fill the
    // tmpfs nor hit the limit.
    let volume = TestVolume::create_with(SIZE, &["--segment-size", "4M", "--window", "1s"]);
    let tmpfs = TmpfsJournal::over(&volume, 2 << 30);
    let pair = Pair::start_with(volume, &["--on-storage-error", "detach"]);
    let socket = pair.primary.vol.socket.clone();
    let normal: Vec<Measured> = WORKLOADS
        .iter()
        .map(|w| measure(&socket, *w, time))
        .collect();
    // No wait for the replica: what it lags behind is the detach's
    // catch-up, as when a disk fails under load.

    // Fill the journal's filesystem and write until a segment is needed.
    tmpfs.fill();
    let started = Instant::now();
    let mut errors_across = 0;
    wait_until("the primary to detach", Duration::from_secs(120), || {
        errors_across += measure(&socket, WORKLOADS[1], Duration::from_millis(200)).errors;
        !pair.primary.replication()["detached"].is_null()
    });
    let detached_after = started.elapsed();
    let forwarded: Vec<Measured> = WORKLOADS
        .iter()
        .map(|w| measure(&socket, *w, time))
        .collect();
    let status: Value = pair.primary.replication()["detached"].clone();

    println!(
        "| {:.0} s per workload, one queue, 64 MiB disk | normal IOPS | mean | detached IOPS | mean | detached / normal |",
        time.as_secs_f64()
    );
    println!("|---|---|---|---|---|---|");
    for ((w, n), d) in WORKLOADS.iter().zip(&normal).zip(&forwarded) {
        println!(
            "| {} | {:.0} | {:.3} ms | {:.0} | {:.3} ms | {:.2}x |",
            w.name,
            n.iops,
            n.mean_ms,
            d.iops,
            d.mean_ms,
            d.iops / n.iops
        );
    }
    println!(
        "detached within {:.1} s of the filesystem filling up ({} requests forwarded)",
        detached_after.as_secs_f64(),
        status["forwarded_requests"]
    );
    let errors: u64 = errors_across
        + normal
            .iter()
            .chain(&forwarded)
            .map(|m| m.errors)
            .sum::<u64>();
    assert_eq!(errors, 0, "the client saw IO errors");
}
