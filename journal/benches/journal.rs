//! Benchmarks of the volume engine, each against a plain-file baseline run
//! on the same file system in the same run, reported as a ratio.
//!
//! `cargo bench -p rewind-journal [-- NAME...]` runs all benchmarks, or
//! those whose name contains a NAME (append-4k, append-64k, reads, map,
//! recovery, memory, write-amp). Set
//! REWIND_BENCH_DIR to choose the file system (default: the system temp
//! dir) and REWIND_BENCH_QUICK=1 for a small smoke run;
//! REWIND_BENCH_RECOVERY_MIB sets the recovery group's journal size,
//! REWIND_BENCH_MEMORY_RECORDS the memory group's writes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::{File, OpenOptions as FsOpen};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{bench_dir, evict, groups, header, mib_s, quick, row};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rewind_journal::{
    BaseImage, ExtentMap, LayoutChoice, OpenOptions, OsStorage, Pieces, Target, Volume,
    VolumeSettings,
};

/// Counts live heap bytes, to measure the extent map's and the record
/// index's memory.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The highest LIVE since it was last set (to LIVE, before a measurement).
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Config {
    dir: PathBuf,
    write_bytes: u64,
    read_disk: u64,
    reads: usize,
    map_extents: u64,
    recovery_bytes: u64,
    memory_records: u64,
    /// Durable writes of the write-amp group: one flush each, and one
    /// flush every 32.
    fua_writes: u64,
    batched_writes: u64,
    /// The disk they write to at random.
    write_amp_disk: u64,
}

fn config() -> Config {
    let dir = bench_dir();
    let recovery_mib = std::env::var("REWIND_BENCH_RECOVERY_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let memory_records = std::env::var("REWIND_BENCH_MEMORY_RECORDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let mut c = config_for(dir);
    if let Some(mib) = recovery_mib {
        c.recovery_bytes = mib << 20;
    }
    if let Some(records) = memory_records {
        c.memory_records = records;
    }
    c
}

fn config_for(dir: PathBuf) -> Config {
    if quick() {
        Config {
            dir,
            write_bytes: 32 << 20,
            read_disk: 32 << 20,
            reads: 20_000,
            map_extents: 100_000,
            recovery_bytes: 64 << 20,
            memory_records: 50_000,
            fua_writes: 2_000,
            batched_writes: 20_000,
            write_amp_disk: 64 << 20,
        }
    } else {
        Config {
            dir,
            write_bytes: 512 << 20,
            read_disk: 256 << 20,
            reads: 200_000,
            map_extents: 1_000_000,
            recovery_bytes: 1 << 30,
            memory_records: 1 << 20,
            fua_writes: 20_000,
            batched_writes: 200_000,
            write_amp_disk: 1 << 30,
        }
    }
}

fn settings(size: u64, journal: u64) -> VolumeSettings {
    let journal_max = (journal * 2).max(1 << 30);
    VolumeSettings {
        journal_max,
        journal_warn: journal_max,
        ..VolumeSettings::new(size)
    }
}

fn new_volume(dir: &Path, size: u64, journal: u64) -> Volume {
    let storage = OsStorage::shared();
    let s = settings(size, journal);
    Volume::create(storage.as_ref(), dir, &s, BaseImage::Empty, &mut |_, _| {}).expect("create");
    Volume::open(storage, dir, OpenOptions::default())
        .expect("open")
        .0
}

fn plain_file(path: &Path, len: u64) -> File {
    let f = FsOpen::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("plain file");
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len).expect("fallocate");
    f
}

/// Best of three runs of each, alternating, so that noise from the machine
/// falls on both alike. Each closure returns the time it measured.
fn compare(
    mut ours: impl FnMut() -> Duration,
    mut baseline: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let (mut a, mut b) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        a = a.min(ours());
        b = b.min(baseline());
    }
    (a, b)
}

fn bench_appends(c: &Config, block: usize) {
    let count = c.write_bytes / block as u64;
    let data = vec![0x5au8; block];
    let disk = 1u64 << 30;
    let (ours, plain) = compare(
        || {
            let dir = c.dir.join(format!("append-{block}"));
            let v = new_volume(&dir, disk, c.write_bytes);
            let t = Instant::now();
            for i in 0..count {
                v.write((i * block as u64) % disk, &data).expect("write");
            }
            v.flush().expect("flush");
            let d = t.elapsed();
            v.close().expect("close");
            std::fs::remove_dir_all(&dir).expect("cleanup");
            d
        },
        || {
            let path = c.dir.join("plain-append");
            let f = plain_file(&path, c.write_bytes);
            let t = Instant::now();
            for i in 0..count {
                f.write_all_at(&data, i * block as u64).expect("pwrite");
            }
            f.sync_data().expect("sync");
            let d = t.elapsed();
            std::fs::remove_file(&path).expect("cleanup");
            d
        },
    );
    row(
        &format!("append {} KiB x {count}, then flush", block / 1024),
        format!("{:.0} MiB/s", mib_s(c.write_bytes, ours)),
        format!("{:.0} MiB/s (pwrite)", mib_s(c.write_bytes, plain)),
        Some(plain.as_secs_f64() / ours.as_secs_f64()),
    );
}

fn bench_random_reads(c: &Config) {
    let blocks = c.read_disk / 4096;
    let mut rng = StdRng::seed_from_u64(7);
    let mut order: Vec<u64> = (0..blocks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let data = vec![0xa5u8; 4096];
    // Every block written once, in random order: one extent per block.
    let dir = c.dir.join("reads");
    let v = new_volume(&dir, c.read_disk, c.read_disk + (c.read_disk >> 3));
    for &b in &order {
        v.write(b * 4096, &data).expect("write");
    }
    v.flush().expect("flush");
    let path = c.dir.join("plain-reads");
    let f = plain_file(&path, c.read_disk);
    for &b in &order {
        f.write_all_at(&data, b * 4096).expect("pwrite");
    }
    f.sync_data().expect("sync");
    let probes: Vec<u64> = (0..c.reads).map(|_| rng.random_range(0..blocks)).collect();
    let mut buf = vec![0u8; 4096];
    let mut buf2 = vec![0u8; 4096];
    let (ours, plain) = compare(
        || {
            let t = Instant::now();
            for &b in &probes {
                v.read(b * 4096, &mut buf).expect("read");
            }
            t.elapsed()
        },
        || {
            let t = Instant::now();
            for &b in &probes {
                f.read_exact_at(&mut buf2, b * 4096).expect("pread");
            }
            t.elapsed()
        },
    );
    let per = |d: Duration| d.as_nanos() as f64 / c.reads as f64;
    row(
        &format!(
            "random 4 KiB reads, {} extents, page cache warm",
            v.stats().extents
        ),
        format!("{:.0} ns/read", per(ours)),
        format!("{:.0} ns/read (pread)", per(plain)),
        Some(plain.as_secs_f64() / ours.as_secs_f64()),
    );
    // The same extents in a bare map: how much of a read is the lookup.
    let map = ExtentMap::new(c.read_disk);
    for (lsn, &b) in order.iter().enumerate() {
        let target = Target::Journal {
            segment: (b >> 13) as u32,
            sector: (b & 8191) as u32 * 8,
        };
        map.insert(b * 8, 8, lsn as u64 + 1, target);
    }
    let mut out = Pieces::new();
    let t = Instant::now();
    for &b in &probes {
        out.clear();
        map.lookup(b * 8, 8, &mut out);
        std::hint::black_box(&out);
    }
    println!(
        "| of which the extent map lookup | {:.0} ns/read | | |",
        per(t.elapsed())
    );
    v.close().expect("close");
    std::fs::remove_dir_all(&dir).expect("cleanup");
    std::fs::remove_file(&path).expect("cleanup");
}

fn bench_extent_map(c: &Config) {
    let n = c.map_extents;
    // 8-sector extents 16 sectors apart, so none merge; inserted in random order.
    let disk = n * 16 * 512;
    let mut rng = StdRng::seed_from_u64(9);
    let mut order: Vec<u64> = (0..n).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let before = LIVE.load(Ordering::Relaxed);
    let map = ExtentMap::new(disk);
    let t = Instant::now();
    for (lsn, &i) in order.iter().enumerate() {
        let target = Target::Journal {
            segment: (i >> 13) as u32,
            sector: (i & 8191) as u32 * 9,
        };
        map.insert(i * 16, 8, lsn as u64 + 1, target);
    }
    let build = t.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(map.len() as u64, n);
    let probes: Vec<u64> = (0..1_000_000)
        .map(|_| rng.random_range(0..n * 16))
        .collect();
    let mut out = Pieces::new();
    let t = Instant::now();
    for &s in &probes {
        out.clear();
        map.lookup(s, 8, &mut out);
        std::hint::black_box(&out);
    }
    let lookup = t.elapsed();
    println!(
        "| extent map, {n} extents | {:.1} bytes/extent, {:.0} ns/insert | {:.0} ns per 8-sector lookup | goal <= 64 bytes/extent |",
        bytes as f64 / n as f64,
        build.as_nanos() as f64 / n as f64,
        lookup.as_nanos() as f64 / probes.len() as f64,
    );
}

/// Heap bytes per record of a volume (the record index, the extent map
/// and whatever else grows with the records) and of the extent map alone,
/// after the same random 4 KiB writes; and the growth of the process's
/// RssAnon over the volume's writes (the allocator's slack included; the
/// index's page file is page cache, not in it). The volume takes no
/// checkpoints, whose buffers would come and go during the count; it runs
/// first, so that no memory the map freed is reused under its RssAnon.
fn bench_memory(c: &Config) {
    let n = c.memory_records;
    // 64 blocks of the disk per record, so that few writes overlap: the
    // map holds about one extent per record, as on a disk written once.
    let blocks = n * 64;
    let mut rng = StdRng::seed_from_u64(17);
    let offsets: Vec<u64> = (0..n).map(|_| rng.random_range(0..blocks)).collect();
    let dir = c.dir.join("memory");
    let storage = OsStorage::shared();
    let s = settings(blocks * 4096, n * 4608);
    Volume::create(storage.as_ref(), &dir, &s, BaseImage::Empty, &mut |_, _| {}).expect("create");
    let options = OpenOptions {
        checkpoint_every: None,
        ..OpenOptions::default()
    };
    let v = Volume::open(storage, &dir, options).expect("open").0;
    let data = vec![0x6bu8; 4096];
    let before = LIVE.load(Ordering::Relaxed);
    let rss_before = rss_anon();
    for &block in &offsets {
        v.write(block * 4096, &data).expect("write");
    }
    let volume = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let rss = rss_anon().saturating_sub(rss_before);
    v.close().expect("close");
    std::fs::remove_dir_all(&dir).expect("cleanup");

    let before = LIVE.load(Ordering::Relaxed);
    let map = ExtentMap::new(blocks * 4096);
    for (lsn, &block) in offsets.iter().enumerate() {
        let target = Target::Journal {
            segment: (lsn >> 13) as u32,
            sector: (lsn & 8191) as u32 * 9,
        };
        map.insert(block * 8, 8, lsn as u64 + 1, target);
    }
    let bytes_map = LIVE.load(Ordering::Relaxed) - before;
    let extents = map.len();
    drop(map);
    let per = |b: usize| b as f64 / n as f64;
    println!(
        "| memory, {n} random 4 KiB writes ({extents} extents) | {:.1} bytes/record (volume heap), of which extent map {:.1}, record index and the rest {:.1}; RssAnon {:.1} bytes/record | | goal <= 32 bytes/record |",
        per(volume),
        per(bytes_map),
        per(volume.saturating_sub(bytes_map)),
        per(rss),
    );
}

/// The process's anonymous resident memory, in bytes.
fn rss_anon() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|kb| {
            kb.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .expect("RssAnon in /proc/self/status")
        * 1024
}

/// Opens the volume in `dir` without taking checkpoints (they would run
/// behind the next measurement); returns how long the open took and how
/// many records came from a checkpoint.
fn timed_open(dir: &Path) -> (Duration, u64) {
    let options = OpenOptions {
        checkpoint_every: None,
        ..OpenOptions::default()
    };
    let t = Instant::now();
    let (v, report) = Volume::open(OsStorage::shared(), dir, options).expect("open");
    let d = t.elapsed();
    assert_eq!(report.next_lsn, v.last_lsn() + 1);
    (d, report.records_from_checkpoint)
}

/// Empties the page cache as a reboot would (`sync; echo 3 >
/// /proc/sys/vm/drop_caches`) where allowed (root); else evicts `files`.
fn drop_caches(files: &[PathBuf]) {
    rustix::fs::sync();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        files.iter().for_each(|p| evict(p));
    }
}

fn bench_recovery(c: &Config) {
    let dir = c.dir.join("recovery");
    // As large as the journal (at least 1 GiB): a full journal of random
    // writes, as on a busy volume at its default limit.
    let disk = c.recovery_bytes.max(1 << 30);
    let v = new_volume(&dir, disk, c.recovery_bytes);
    let mut rng = StdRng::seed_from_u64(11);
    let data = vec![0x3cu8; 4096];
    let records = c.recovery_bytes / 4608;
    for _ in 0..records {
        v.write(rng.random_range(0..disk / 4096) * 4096, &data)
            .expect("write");
    }
    // The first rows measure without the checkpoint.
    v.checkpoint().expect("checkpoint");
    v.close().expect("close");
    let checkpoint = dir.join("checkpoint");
    let aside = dir.join("checkpoint.aside");
    std::fs::rename(&checkpoint, &aside).expect("set the checkpoint aside");
    let journal = dir.join("journal");
    let segments: Vec<PathBuf> = std::fs::read_dir(&journal)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    let total: u64 = segments
        .iter()
        .map(|p| std::fs::metadata(p).expect("stat").len())
        .sum();
    for cold in [false, true] {
        let (recover, read) = compare(
            || {
                if cold {
                    segments.iter().for_each(|p| evict(p));
                }
                let (d, from) = timed_open(&dir);
                assert_eq!(from, 0, "no checkpoint: the full recovery");
                d
            },
            || {
                if cold {
                    segments.iter().for_each(|p| evict(p));
                }
                let mut buf = vec![0u8; 8 << 20];
                let t = Instant::now();
                for p in &segments {
                    let f = File::open(p).expect("open");
                    let mut at = 0;
                    let len = f.metadata().expect("stat").len();
                    while at < len {
                        let n = (len - at).min(buf.len() as u64) as usize;
                        f.read_exact_at(&mut buf[..n], at).expect("read");
                        at += n as u64;
                    }
                }
                t.elapsed()
            },
        );
        row(
            &format!(
                "recovery, {records} x 4 KiB records, {} MiB of segments, {}",
                total >> 20,
                if cold { "cold cache" } else { "warm cache" }
            ),
            format!("{:.0} MiB/s", mib_s(total, recover)),
            format!("{:.0} MiB/s (sequential read)", mib_s(total, read)),
            Some(read.as_secs_f64() / recover.as_secs_f64()),
        );
    }
    bench_reopen_with_checkpoint(&dir, &segments, records, total);
    memory_after_restart(&dir, &segments, records);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Memory of a volume reopened cold, with its checkpoint and without:
/// heap in use right after the open and 2 s later (the applier pages the
/// index out after an open from a checkpoint), and the most heap in use
/// during the open, each over the records.
fn memory_after_restart(dir: &Path, segments: &[PathBuf], records: u64) {
    let checkpoint = dir.join("checkpoint");
    let aside = dir.join("checkpoint.aside");
    for with_checkpoint in [true, false] {
        if with_checkpoint {
            std::fs::copy(&aside, &checkpoint).expect("checkpoint back");
        } else {
            let _ = std::fs::remove_file(&checkpoint);
        }
        let mut files = segments.to_vec();
        files.push(checkpoint.clone());
        drop_caches(&files);
        let options = OpenOptions {
            checkpoint_every: None,
            ..OpenOptions::default()
        };
        let heap = LIVE.load(Ordering::Relaxed);
        PEAK.store(heap, Ordering::Relaxed);
        let (v, report) = Volume::open(OsStorage::shared(), dir, options).expect("open");
        assert_eq!(report.records_from_checkpoint > 0, with_checkpoint);
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(heap);
        let opened = LIVE.load(Ordering::Relaxed).saturating_sub(heap);
        std::thread::sleep(Duration::from_secs(2));
        let settled = LIVE.load(Ordering::Relaxed).saturating_sub(heap);
        v.close().expect("close");
        let per = |b: usize| b as f64 / records as f64;
        row(
            &format!(
                "memory after a cold restart, {records} x 4 KiB records, {}",
                if with_checkpoint {
                    "from the checkpoint"
                } else {
                    "full recovery"
                }
            ),
            format!(
                "heap {:.1} bytes/record after the open, {:.1} 2 s later, at most {:.1} during it",
                per(opened),
                per(settled),
                per(peak)
            ),
            String::new(),
            None,
        );
    }
}

/// The same journal with its checkpoint (set aside as
/// `checkpoint.aside`), against the full recovery.
fn bench_reopen_with_checkpoint(dir: &Path, segments: &[PathBuf], records: u64, total: u64) {
    let checkpoint = dir.join("checkpoint");
    let aside = dir.join("checkpoint.aside");
    let size = std::fs::metadata(&aside).expect("stat").len();
    let mut files = segments.to_vec();
    files.push(checkpoint.clone());
    for cold in [false, true] {
        let (with, without) = compare(
            || {
                std::fs::copy(&aside, &checkpoint).expect("checkpoint back");
                if cold {
                    drop_caches(&files);
                }
                let (d, from) = timed_open(dir);
                assert!(from > 0, "the checkpoint was used");
                d
            },
            || {
                let _ = std::fs::remove_file(&checkpoint);
                if cold {
                    drop_caches(segments);
                }
                let (d, from) = timed_open(dir);
                assert_eq!(from, 0);
                d
            },
        );
        row(
            &format!(
                "reopen with checkpoint ({} MiB), {records} x 4 KiB records, {} MiB of segments, {}",
                size >> 20,
                total >> 20,
                if cold {
                    "cold cache (drop_caches)"
                } else {
                    "warm cache"
                }
            ),
            format!("{:.0} ms", with.as_secs_f64() * 1e3),
            format!("{:.0} ms (full recovery)", without.as_secs_f64() * 1e3),
            Some(without.as_secs_f64() / with.as_secs_f64()),
        );
    }
}

/// The sectors-written counter of the block device holding a directory
/// (field 7 of `/sys/dev/block/MAJOR:MINOR/stat`; a partition has its own).
struct Device {
    name: String,
    stat: PathBuf,
}

impl Device {
    /// `None` where the file system has no block device of its own
    /// (tmpfs, overlayfs, a btrfs subvolume: a device number without an
    /// entry in /sys/dev/block).
    fn of(dir: &Path) -> Option<Device> {
        let dev = rustix::fs::stat(dir).expect("stat").st_dev;
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            rustix::fs::major(dev),
            rustix::fs::minor(dev)
        ));
        let name = std::fs::canonicalize(&sys)
            .ok()
            .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .unwrap_or_else(|| sys.display().to_string());
        let stat = sys.join("stat");
        stat.exists().then_some(Device { name, stat })
    }

    /// Bytes written to the device since it appeared.
    fn written(&self) -> u64 {
        let stat = std::fs::read_to_string(&self.stat).expect("device stat");
        let sectors: u64 = stat
            .split_whitespace()
            .nth(6)
            .and_then(|f| f.parse().ok())
            .expect("sectors written");
        sectors * 512
    }

    /// Bytes the device wrote while `run` ran, and how long it ran. Every
    /// dirty page of the machine is written back first (sync), so that
    /// none from before lands in the measurement.
    fn measure(&self, run: impl FnOnce()) -> (u64, Duration) {
        rustix::fs::sync();
        let before = self.written();
        let t = Instant::now();
        run();
        let d = t.elapsed();
        (self.written() - before, d)
    }
}

/// A volume for the write-amp group whose journal takes `bytes` without
/// a fold: a journal limit of twice that, and with `preallocated` a
/// preallocated journal (`create --preallocate-journal`: every file
/// written out before the volume opens, as a segment file is once
/// recycled, not fallocated-unwritten).
fn write_amp_volume(
    dir: &Path,
    disk: u64,
    bytes: u64,
    preallocated: bool,
    layout: LayoutChoice,
) -> Volume {
    let storage = OsStorage::shared();
    let mut s = settings(disk, bytes);
    if preallocated {
        // Room for the segments written, the reserve and the applier's
        // early zone (at most 16), so that the pool never folds early.
        let segments = bytes.div_ceil(s.segment_size) + 1;
        s.journal_max = s.journal_max.max((segments + 20) * s.segment_size);
        s.journal_warn = s.journal_max;
        s.preallocate_journal = true;
    }
    Volume::create(storage.as_ref(), dir, &s, BaseImage::Empty, &mut |_, _| {}).expect("create");
    let options = OpenOptions {
        layout,
        ..OpenOptions::default()
    };
    Volume::open(storage, dir, options).expect("open").0
}

/// Device bytes per durable 4 KiB random write: at QD1 with each write
/// made durable before the next (a FUA write, or writethrough), and with
/// a flush every 32 writes. Rewind (segments in each layout: new segment
/// files, then a preallocated journal's) against the same pattern on a preallocated plain file
/// with pwrite + fdatasync (what qemu-storage-daemon does on a raw image),
/// written in full first, and, to show what ext4's unwritten extents
/// cost, fallocated only. Same file system; least of three runs each
/// (other processes' writes on the device only add). No fold runs.
fn bench_write_amplification(c: &Config) {
    let Some(dev) = Device::of(&c.dir) else {
        println!(
            "| write-amp: no block device of its own under {} (set REWIND_BENCH_DIR) | | | |",
            c.dir.display()
        );
        return;
    };
    let disk = c.write_amp_disk;
    for (writes, every) in [(c.fua_writes, 1), (c.batched_writes, 32)] {
        let mut rng = StdRng::seed_from_u64(23);
        let offsets: Vec<u64> = (0..writes)
            .map(|_| rng.random_range(0..disk / 4096) * 4096)
            .collect();
        let data = vec![0x77u8; 4096];
        let rewind = |preallocated: bool, layout: LayoutChoice| {
            let dir = c.dir.join("write-amp");
            // A record and a Flush record's header each, at most.
            let v = write_amp_volume(&dir, disk, writes * 5120, preallocated, layout);
            let m = dev.measure(|| {
                for (i, &at) in offsets.iter().enumerate() {
                    v.write(at, &data).expect("write");
                    if (i as u64 + 1).is_multiple_of(every) {
                        v.flush().expect("flush");
                    }
                }
            });
            assert_eq!(v.stats().folded_bytes, 0, "no fold in the measurement");
            v.close().expect("close");
            std::fs::remove_dir_all(&dir).expect("cleanup");
            m
        };
        let plain = |written: bool| {
            let path = c.dir.join("plain-write-amp");
            let f = plain_file(&path, disk);
            if written {
                let fill = vec![0u8; 1 << 20];
                for at in (0..disk).step_by(fill.len()) {
                    f.write_all_at(&fill, at).expect("prefill");
                }
                f.sync_data().expect("sync");
            }
            let m = dev.measure(|| {
                for (i, &at) in offsets.iter().enumerate() {
                    f.write_all_at(&data, at).expect("pwrite");
                    if (i as u64 + 1).is_multiple_of(every) {
                        f.sync_data().expect("fdatasync");
                    }
                }
            });
            drop(f);
            std::fs::remove_file(&path).expect("cleanup");
            m
        };
        // Slots: new segments, written segments; inline: the same; then
        // the written file and the fallocated file.
        let mut best = [(u64::MAX, Duration::ZERO); 6];
        for _ in 0..3 {
            best[0] = best[0].min(rewind(false, LayoutChoice::Slots));
            best[1] = best[1].min(rewind(true, LayoutChoice::Slots));
            best[2] = best[2].min(rewind(false, LayoutChoice::Inline));
            best[3] = best[3].min(rewind(true, LayoutChoice::Inline));
            best[4] = best[4].min(plain(true));
            best[5] = best[5].min(plain(false));
        }
        // What the device writes anyway over as long as the longest run.
        let longest = best.iter().map(|m| m.1).max().expect("runs");
        let (idle, _) = dev.measure(|| std::thread::sleep(longest));
        let per = |bytes: u64| bytes as f64 / writes as f64;
        let cell = |(bytes, d): (u64, Duration)| {
            format!(
                "{:.0} B/write, {:.2}x the payload ({:.1} s)",
                per(bytes),
                per(bytes) / 4096.0,
                d.as_secs_f64()
            )
        };
        let pattern = if every == 1 {
            "each followed by a flush (QD1, FUA)".to_owned()
        } else {
            format!("a flush every {every}")
        };
        for (segments, ours) in [
            ("slots, new segment files", best[0]),
            ("slots, a preallocated journal", best[1]),
            ("inline, new segment files", best[2]),
            ("inline, a preallocated journal", best[3]),
        ] {
            row(
                &format!(
                    "device bytes per durable write ({}), {writes} random 4 KiB writes, {pattern}; {segments}",
                    dev.name
                ),
                cell(ours),
                format!("{} (pwrite, fdatasync; file written in full)", cell(best[4])),
                Some(best[4].0 as f64 / ours.0 as f64),
            );
        }
        println!(
            "| the baseline on a file fallocated, never written (unwritten extents, as new segment files) | | {} | |",
            cell(best[5])
        );
        println!(
            "| idle device writes over {:.1} s (not subtracted) | {:.0} B/write | | |",
            longest.as_secs_f64(),
            per(idle)
        );
    }
}

fn main() {
    let Some(wanted) = groups() else {
        return;
    };
    let c = config();
    println!("bench dir: {}", c.dir.display());
    header();
    if wanted("append-4k") {
        bench_appends(&c, 4096);
    }
    if wanted("append-64k") {
        bench_appends(&c, 65536);
    }
    if wanted("reads") {
        bench_random_reads(&c);
    }
    if wanted("map") {
        bench_extent_map(&c);
    }
    if wanted("recovery") {
        bench_recovery(&c);
    }
    if wanted("memory") {
        bench_memory(&c);
    }
    if wanted("write-amp") {
        bench_write_amplification(&c);
    }
    std::fs::remove_dir_all(&c.dir).expect("cleanup");
}
