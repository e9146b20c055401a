//! rewind-blk against qemu-storage-daemon's vhost-user-blk export: the same
//! libblkio client, the same prefilled raw image on the same file system,
//! one queue, workloads alternating between the two servers, the image in
//! the page cache for both.
//!
//! `cargo bench -p rewind-vhost-blk --bench vs_qsd` (REWIND_BENCH_DIR picks
//! the file system, REWIND_BENCH_QUICK=1 makes a small smoke run).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, ReqFlags};
use common::{closed_loop, create_rewind, make_image, serve_rewind, start_qsd, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    depth: usize,
    flush_every: Option<usize>,
}

struct Result {
    iops: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_io: Duration,
}

/// Runs `ops` random 4 KiB requests at the workload's depth.
fn run(server: &Server, w: Workload, ops: usize, blocks: u64, seed: u64) -> Result {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("driver");
    b.set_str("path", server.socket.to_str().expect("path"))
        .expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", 1).expect("queues");
    b.set_i32("queue-size", 256).expect("queue size");
    let mut q: Blkioq = b.start().expect("start").queues.remove(0);
    let region = b.alloc_mem_region(w.depth * BLOCK).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let base = region.addr as *mut u8;
    let mut rng = StdRng::seed_from_u64(seed);
    let cpu_before = server.cpu();
    let t = Instant::now();
    let mut latencies = closed_loop(server.name, &mut q, w.depth, ops, |q, slot, n| {
        // SAFETY: slot < depth, so the buffer lies inside the mapped region.
        let buf = unsafe { base.add(slot * BLOCK) };
        let offset = rng.random_range(0..blocks) * BLOCK as u64;
        if w.flush_every.is_some_and(|every| n % every == every - 1) {
            q.flush(slot, ReqFlags::empty());
        } else if w.write {
            q.write(offset, buf, BLOCK, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf, BLOCK, slot, ReqFlags::empty());
        }
    });
    let elapsed = t.elapsed();
    let cpu = server.cpu().saturating_sub(cpu_before);
    latencies.sort_unstable();
    Result {
        iops: ops as f64 / elapsed.as_secs_f64(),
        p50: latencies[ops / 2],
        p99: latencies[ops * 99 / 100],
        cpu_per_io: cpu / ops as u32,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let (size, ops): (u64, usize) = if quick {
        (64 << 20, 2_000)
    } else {
        (1 << 30, 40_000)
    };
    let base = std::env::var_os("REWIND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("bench dir");
    // The same prefilled image for both: QSD serves it, rewind imports it.
    let image = dir.path().join("disk.raw");
    make_image(&image, size);
    let volume = create_rewind(dir.path(), &image, size, &[]);
    // Warm for both: qsd's image is in the page cache (the bench just
    // wrote it), and the import left none of rewind's base cached.
    let base = volume.join("base.img");
    std::io::copy(
        &mut std::fs::File::open(&base).expect("base.img"),
        &mut std::io::sink(),
    )
    .expect("read base.img into the page cache");
    let rewind = serve_rewind(dir.path(), &volume, 1);
    let qsd = start_qsd(dir.path(), &image, false, 1);
    let blocks = size / BLOCK as u64;
    let workloads = [
        Workload {
            name: "4 KiB random writes, depth 1",
            write: true,
            depth: 1,
            flush_every: None,
        },
        Workload {
            name: "4 KiB random writes, depth 32",
            write: true,
            depth: 32,
            flush_every: None,
        },
        Workload {
            name: "4 KiB random reads, depth 1",
            write: false,
            depth: 1,
            flush_every: None,
        },
        Workload {
            name: "4 KiB random reads, depth 32",
            write: false,
            depth: 32,
            flush_every: None,
        },
        Workload {
            name: "4 KiB random writes + flush every 32, depth 32",
            write: true,
            depth: 32,
            flush_every: Some(32),
        },
    ];
    println!(
        "| workload | rewind-blk IOPS | qemu-storage-daemon IOPS | IOPS ratio | p50 (rewind / qsd) | p99 (rewind / qsd) | server CPU per IO (rewind / qsd) | CPU ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, w) in workloads.iter().enumerate() {
        let ops = if w.depth == 1 { ops / 4 } else { ops };
        let seed = 100 + i as u64;
        // Alternate, best of two, so machine noise falls on both alike.
        let mut best: [Option<Result>; 2] = [None, None];
        for _ in 0..2 {
            for (k, server) in [&rewind, &qsd].into_iter().enumerate() {
                let r = run(server, *w, ops, blocks, seed);
                if best[k].as_ref().is_none_or(|b| r.iops > b.iops) {
                    best[k] = Some(r);
                }
            }
        }
        let [Some(a), Some(b)] = best else {
            unreachable!("two rounds ran")
        };
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x | {} / {} us | {} / {} us | {} / {} us | {:.2}x |",
            w.name,
            a.iops,
            b.iops,
            a.iops / b.iops,
            us(a.p50),
            us(b.p50),
            us(a.p99),
            us(b.p99),
            us(a.cpu_per_io),
            us(b.cpu_per_io),
            a.cpu_per_io.as_secs_f64() / b.cpu_per_io.as_secs_f64().max(1e-9),
        );
    }
}
