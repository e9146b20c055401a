//! Benchmarks of the history window: folding, building views,
//! materializing, and guest write latency while a fold runs. Each reports
//! the baseline it is compared against, measured in the same run.
//!
//! `cargo bench -p rewind-journal --bench history [-- fold|view|materialize|latency]`;
//! REWIND_BENCH_QUICK=1 for a small smoke run, REWIND_BENCH_DIR for the
//! file system.

use std::fs::{File, OpenOptions as FsOpen};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{bench_dir, evict, groups, header, mib_s, quick, row};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rewind_journal::{
    BaseImage, ImportMode, ManualClock, OpenOptions, OsStorage, PointInTime, Volume, VolumeSettings,
};

const SEC: u64 = 1_000_000_000;

struct Config {
    dir: PathBuf,
    fold_writes: u64,
    view_records: u64,
    materialize_disk: u64,
    latency_writes: usize,
}

fn config() -> Config {
    let dir = bench_dir();
    if quick() {
        Config {
            dir,
            fold_writes: 4096,
            view_records: 20_000,
            materialize_disk: 256 << 20,
            latency_writes: 2000,
        }
    } else {
        Config {
            dir,
            fold_writes: 65536,
            view_records: 1_000_000,
            materialize_disk: 4 << 30,
            latency_writes: 20_000,
        }
    }
}

/// A volume on a clock the benchmark moves, with a 10 s window and a
/// journal big enough to never fold early.
fn volume(dir: &Path, size: u64, base: BaseImage<'_>) -> (Volume, Arc<ManualClock>) {
    let storage = OsStorage::shared();
    let settings = VolumeSettings {
        window: Duration::from_secs(10),
        journal_max: 16 << 30,
        journal_warn: 16 << 30,
        ..VolumeSettings::new(size)
    };
    Volume::create(storage.as_ref(), dir, &settings, base, &mut |_, _| {}).expect("create");
    let clock = Arc::new(ManualClock::new(1_800_000_000 * SEC));
    let options = OpenOptions {
        clock: clock.clone(),
        fold_interval: None,
        ..OpenOptions::default()
    };
    let (v, _) = Volume::open(storage, dir, options).expect("open");
    (v, clock)
}

fn random_blocks(n: u64, disk: u64, seed: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(0..disk / 4096) * 4096)
        .collect()
}

/// A fold of random 4 KiB writes; `cold`: with the segments out of the
/// page cache first (a full journal on a large disk, where the fold reads
/// from the device).
fn bench_fold(c: &Config, cold: bool) {
    let dir = c.dir.join("fold");
    let disk = 1u64 << 30;
    let (v, clock) = volume(&dir, disk, BaseImage::Empty);
    let offsets = random_blocks(c.fold_writes, disk, 3);
    let data = vec![0x5au8; 4096];
    for &off in &offsets {
        v.write(off, &data).expect("write");
    }
    v.flush().expect("flush");
    clock.advance(3600 * SEC);
    if cold {
        for entry in std::fs::read_dir(dir.join("journal")).expect("segments") {
            evict(&entry.expect("segment").path());
        }
    }
    let t = Instant::now();
    let report = v.fold_now().expect("fold").expect("a fold");
    let fold = t.elapsed();
    assert_eq!(report.base_lsn, v.last_lsn());

    // The same newest blocks, in disk order, written to a plain file.
    let mut blocks = offsets.clone();
    blocks.sort_unstable();
    blocks.dedup();
    let plain = dir.join("plain.img");
    let f = FsOpen::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&plain)
        .expect("plain");
    f.set_len(disk).expect("size");
    let t = Instant::now();
    for &off in &blocks {
        f.write_all_at(&data, off).expect("pwrite");
    }
    f.sync_data().expect("fdatasync");
    let baseline = t.elapsed();
    row(
        &format!(
            "fold {} random 4 KiB writes ({} runs, {} MiB) into base.img, with its fdatasync{}",
            c.fold_writes,
            report.extents,
            report.bytes >> 20,
            if cold { ", segments not cached" } else { "" }
        ),
        format!(
            "{:.0} MiB/s ({:.0} ms)",
            mib_s(report.bytes, fold),
            fold.as_secs_f64() * 1e3
        ),
        format!(
            "{:.0} MiB/s (pwrite of the same blocks in disk order, fdatasync)",
            mib_s(report.bytes, baseline)
        ),
        Some(baseline.as_secs_f64() / fold.as_secs_f64()),
    );
    drop(v);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

fn bench_view(c: &Config) {
    let dir = c.dir.join("view");
    let disk = 16u64 << 30;
    let (v, _clock) = volume(&dir, disk, BaseImage::Empty);
    // Payload-less records: the view is built from metadata only, so their
    // kind does not change the cost, and the journal stays small.
    for off in random_blocks(c.view_records, disk, 5) {
        v.write_zeroes(off, 4096, false).expect("zeroes");
    }
    let last = v.last_lsn();
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let view = v.view(&PointInTime::Lsn(last)).expect("view");
        best = best.min(t.elapsed());
        drop(view);
    }
    row(
        &format!("build a view over {last} records in the window (best of 3)"),
        format!(
            "{:.0} ms ({:.0} ns/record)",
            best.as_secs_f64() * 1e3,
            best.as_nanos() as f64 / last as f64
        ),
        "-".into(),
        None,
    );
    drop(v);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

fn bench_materialize(c: &Config) {
    let dir = c.dir.join("materialize");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let disk = c.materialize_disk;
    // An image with a quarter of its 1 MiB blocks holding data.
    let image = dir.join("source.img");
    {
        let f = File::create(&image).expect("image");
        f.set_len(disk).expect("size");
        let chunk = vec![0xa7u8; 1 << 20];
        for i in (0..disk >> 20).step_by(4) {
            f.write_all_at(&chunk, i << 20).expect("fill");
        }
        f.sync_all().expect("sync");
    }
    let vol = dir.join("vol");
    let (v, _clock) = volume(
        &vol,
        disk,
        BaseImage::Import {
            path: &image,
            mode: ImportMode::Move,
        },
    );
    for off in random_blocks(disk / (1 << 20), disk, 9) {
        v.write(off, &[0x11u8; 4096]).expect("write");
    }
    let base = vol.join("base.img");
    let (mut ours, mut cp) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        let out = dir.join("out.raw");
        let t = Instant::now();
        v.materialize(&PointInTime::Ago(Duration::ZERO), &out, &mut |_, _| {})
            .expect("materialize");
        ours = ours.min(t.elapsed());
        std::fs::remove_file(&out).expect("rm");
        let t = Instant::now();
        let status = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&base)
            .arg(&out)
            .status()
            .expect("cp");
        assert!(status.success());
        File::open(&out).expect("open").sync_all().expect("sync");
        cp = cp.min(t.elapsed());
        std::fs::remove_file(&out).expect("rm");
    }
    row(
        &format!(
            "materialize a {} MiB volume (1/4 data, {} journaled writes), best of 3",
            disk >> 20,
            disk >> 20
        ),
        format!("{:.0} ms", ours.as_secs_f64() * 1e3),
        format!(
            "{:.0} ms (cp --sparse=always of base.img, then fsync)",
            cp.as_secs_f64() * 1e3
        ),
        Some(cp.as_secs_f64() / ours.as_secs_f64()),
    );
    drop(v);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Times `n` random 4 KiB writes one after another.
fn timed_writes(v: &Volume, n: usize, seed: u64) -> Vec<Duration> {
    let data = vec![0x42u8; 4096];
    let mut times: Vec<Duration> = random_blocks(n as u64, v.size(), seed)
        .into_iter()
        .map(|off| {
            let t = Instant::now();
            v.write(off, &data).expect("write");
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    times
}

fn bench_latency(c: &Config) {
    let dir = c.dir.join("latency");
    let disk = 1u64 << 30;
    let (v, clock) = volume(&dir, disk, BaseImage::Empty);
    let data = vec![0x5au8; 4096];
    for off in random_blocks(c.latency_writes as u64 * 8, disk, 13) {
        v.write(off, &data).expect("history");
    }
    v.flush().expect("flush");
    let quiet = timed_writes(&v, c.latency_writes, 17);
    clock.advance(3600 * SEC);
    let (folding, fold_time) = std::thread::scope(|s| {
        let fold = s.spawn(|| {
            let t = Instant::now();
            v.fold_now().expect("fold").expect("a fold");
            t.elapsed()
        });
        let times = timed_writes(&v, c.latency_writes, 19);
        (times, fold.join().expect("fold thread"))
    });
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (with, without) = (percentile(&folding, p), percentile(&quiet, p));
        row(
            &format!(
                "{name} of {} random 4 KiB writes while a fold of {} ms runs",
                c.latency_writes,
                fold_time.as_millis()
            ),
            format!("{:.1} us", with.as_secs_f64() * 1e6),
            format!(
                "{:.1} us (the same writes, no fold)",
                without.as_secs_f64() * 1e6
            ),
            Some(without.as_secs_f64() / with.as_secs_f64()),
        );
    }
    drop(v);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

fn main() {
    let Some(wanted) = groups() else {
        return;
    };
    let c = config();
    header();
    if wanted("fold") {
        bench_fold(&c, false);
        bench_fold(&c, true);
    }
    if wanted("view") {
        bench_view(&c);
    }
    if wanted("materialize") {
        bench_materialize(&c);
    }
    if wanted("latency") {
        bench_latency(&c);
    }
    std::fs::remove_dir_all(&c.dir).expect("cleanup");
}
