//! The volume API: data, persistence, pool, limits, imports, bad input, faults.

mod common;

use std::path::Path;

use common::*;
use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
use rewind_journal::{
    BaseImage, Error, ImportMethod, ImportMode, OpenOptions, OsStorage, PayloadBuffer, Storage,
    Volume, VolumeSettings, Written,
};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

#[test]
fn writes_zeroes_and_discards_read_back_and_survive_reopen() {
    let (fs, v) = new_volume();
    assert_eq!(
        read(&v, 0, 8192),
        vec![0u8; 8192],
        "a new disk reads as zeroes"
    );
    let a = pattern(1, 64 << 10);
    v.write(0, &a).expect("write");
    v.write(4096, &pattern(2, 1024)).expect("overwrite");
    v.write_zeroes(8192, 2048, false).expect("zeroes");
    v.discard(16384, 4096).expect("discard");
    let mut want = a.clone();
    want[4096..5120].copy_from_slice(&pattern(2, 1024));
    want[8192..10240].fill(0);
    want[16384..20480].fill(0);
    assert_eq!(read(&v, 0, want.len()), want);
    v.close().expect("close");

    let (v, report) = Volume::open(fs.arc(), Path::new(DIR), options()).expect("reopen");
    assert_eq!(read(&v, 0, want.len()), want);
    assert_eq!(report.next_lsn, v.last_lsn() + 1);
    assert!(report.records >= 4, "{report}");
    assert_eq!(report.discarded, None);
}

#[test]
fn writes_larger_than_a_record_are_split_and_cross_segments() {
    let (fs, v) = new_volume();
    let big = pattern(7, 256 << 10); // 64 KiB segments hold at most ~31 KiB records
    v.write(512, &big).expect("big write");
    assert_eq!(read(&v, 512, big.len()), big);
    assert!(v.stats().segments_used >= 4);
    v.close().expect("close");
    let v = open(&fs);
    assert_eq!(read(&v, 512, big.len()), big);
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let (_fs, v) = new_volume();
    let size = v.size();
    let cases: Vec<(&str, Result<u64, Error>)> = vec![
        ("unaligned offset", v.write(100, &[0u8; 512])),
        ("unaligned length", v.write(0, &[0u8; 100])),
        ("empty", v.write(0, &[])),
        ("past the end", v.write(size, &[0u8; 512])),
        ("straddles the end", v.write(size - 512, &[0u8; 1024])),
        (
            "overflowing zeroes",
            v.write_zeroes(u64::MAX - 511, 1024, false),
        ),
        ("overflowing discard", v.discard(512, u64::MAX - 511)),
    ];
    for (what, result) in cases {
        match result {
            Err(Error::InvalidRequest(reason)) => assert!(!reason.is_empty(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    let mut buf = vec![0u8; 1024];
    assert!(matches!(
        v.read(size - 512, &mut buf),
        Err(Error::InvalidRequest(_))
    ));
    assert_eq!(v.last_lsn(), 0, "nothing was journaled");
}

#[test]
fn a_volume_opens_once_at_a_time() {
    let (fs, v) = new_volume();
    let err = Volume::open(fs.arc(), Path::new(DIR), options()).unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err}");
    drop(v);
    open(&fs);
}

/// Every change of volume.json (an epoch raise here; a promotion, a
/// client's attach record, an open that tags the node alike) replaces the
/// file by rename: the open lock is on `super`, which is never replaced,
/// so it holds on.
#[test]
fn a_volume_stays_locked_after_volume_json_is_rewritten() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create_with(tmp.path(), &small_settings());
    let (v, _) = Volume::open(OsStorage::shared(), &dir, options()).expect("open");
    let again = || Volume::open(OsStorage::shared(), &dir, options());
    assert!(matches!(again(), Err(Error::Locked(_))), "locked at first");
    v.raise_epoch().expect("epoch"); // rewrites volume.json
    match again() {
        Err(Error::Locked(_)) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second open of a volume that is open succeeded"),
    }
    v.close().expect("close");
    again().expect("open once closed");
}

#[test]
fn create_refuses_a_used_directory_and_open_a_non_volume() {
    let fs = FaultStorage::new();
    create(&fs, &small_settings());
    let err = Volume::create(
        &fs,
        Path::new(DIR),
        &small_settings(),
        BaseImage::Empty,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Exists(_)), "{err}");
    fs.create_dir_all(Path::new("/other")).expect("mkdir");
    let err = Volume::open(fs.arc(), Path::new("/other"), options()).unwrap_err();
    assert!(err.to_string().contains("not a rewind volume"), "{err}");
}

#[test]
fn replayed_writes_leave_the_disk_correct() {
    let (fs, v) = new_volume();
    let a = pattern(1, 4096);
    let b = pattern(2, 2048);
    v.write(0, &a).expect("a");
    v.write(1024, &b).expect("b, overlapping");
    // The backend restarted and the client submitted `b` again.
    v.write(1024, &b).expect("b replayed");
    let mut want = a.clone();
    want[1024..3072].copy_from_slice(&b);
    assert_eq!(read(&v, 0, 4096), want);
    v.flush().expect("flush");
    drop(v);
    let v = open(&fs.crash(1));
    assert_eq!(read(&v, 0, 4096), want);
}

#[test]
fn the_pool_grows_keeps_its_reserve_and_reports_it() {
    let (_fs, v) = new_volume();
    let s = v.stats();
    assert_eq!((s.segments_used, s.segments_free), (0, 2));
    assert_eq!(s.journal_bytes, 2 * (64 << 10));
    assert_eq!((s.oldest_record_ns, s.last_lsn), (None, 0));
    for i in 0..40u64 {
        v.write((i % 8) * 32768, &pattern(i as u8, 16384))
            .expect("write");
    }
    // The writes outran the pool's thread, which may have raised the
    // reserve (pool.rs): never below the configured two.
    wait_until("the reserve to refill", || {
        let s = v.stats();
        s.segments_free == s.reserve_target
    });
    let s = v.stats();
    assert!(s.reserve_target >= 2, "{s:?}");
    assert!(s.segments_used >= 10, "{s:?}");
    assert_eq!(
        s.journal_bytes,
        (s.segments_used + s.segments_free) * (64 << 10)
    );
    assert_eq!(s.last_lsn, 40);
    assert!(s.oldest_record_ns.is_some() && s.oldest_record_ns <= s.newest_record_ns);
    assert!(!s.over_warning);
}

#[test]
fn at_the_hard_limit_the_applier_folds_early_and_no_write_fails() {
    let fs = FaultStorage::new();
    let mut settings = small_settings();
    settings.journal_max = 8 * (64 << 10);
    settings.journal_warn = 4 * (64 << 10);
    create(&fs, &settings);
    let v = open(&fs);
    let mut model = vec![0u8; 32 * 16384];
    // About 25 segments of writes into an 8-segment journal, all inside the
    // one-hour window (the clock does not move).
    for i in 0..100usize {
        let off = (i % 32) * 16384;
        let data = pattern(i as u8, 16384);
        v.write(off as u64, &data)
            .expect("no write fails at the limit");
        model[off..off + 16384].copy_from_slice(&data);
    }
    let s = v.stats();
    assert!(s.over_warning, "{s:?}");
    assert!(s.journal_bytes <= 8 * (64 << 10), "{s:?}");
    assert!(s.forced_folds > 0, "the early folds are counted: {s:?}");
    assert!(s.base_lsn > 0, "{s:?}");
    assert!(
        s.window_start_ns > v.timeline().window_end_ns - s.window_configured.as_nanos() as u64,
        "the effective window shrank below the configured one: {s:?}"
    );
    assert_eq!(s.failed, None);
    assert_eq!(read(&v, 0, model.len()), model);
    v.close().expect("close");
    let v = open(&fs);
    assert_eq!(read(&v, 0, model.len()), model, "after reopening");
}

/// An 8-segment volume whose writes into base.img each take `base_write`
/// (a slow disk), held up to `max_hold` on errors.
fn slow_fold_volume(
    base_write: std::time::Duration,
    max_hold: std::time::Duration,
) -> (FaultStorage, Volume) {
    let (fs, v) = eight_segment_volume(max_hold);
    fs.slow_down(FaultOp::Write, "base.img", base_write);
    (fs, v)
}

/// Writes `count` 4 KiB blocks, neighbours far apart on the disk (so each
/// is a run of its own in a fold), checking that none fails; returns how
/// long each took and whether a forced fold had finished before it.
fn scattered_writes(
    v: &Volume,
    model: &mut [u8],
    count: usize,
) -> Vec<(std::time::Duration, bool)> {
    (0..count)
        .map(|i| {
            let off = (i * 37 % 256) * 4096;
            let data = pattern(i as u8, 4096);
            let folded_before = v.stats().forced_folds > 0;
            let started = std::time::Instant::now();
            v.write(off as u64, &data)
                .expect("a slow fold holds or paces writes, it never fails them");
            model[off..off + 4096].copy_from_slice(&data);
            (started.elapsed(), folded_before)
        })
        .collect()
}

#[test]
fn at_the_hard_limit_a_fold_slower_than_the_hold_time_holds_writes_and_fails_none() {
    // Folding a segment of 13 scattered 4 KiB records takes over 1.3 s,
    // three times as long as a write may be held while nothing moves
    // (which a write seen moving every 100 ms is far from, even when its
    // thread is late to run).
    let max_hold = std::time::Duration::from_millis(400);
    let (fs, v) = slow_fold_volume(std::time::Duration::from_millis(100), max_hold);
    let mut model = vec![0u8; 1 << 20];
    // The journal holds about 104 records.
    let took = scattered_writes(&v, &mut model, 130);
    let longest = took.iter().map(|t| t.0).max().expect("writes");
    assert!(
        longest > max_hold,
        "a write was held longer than the hold time: {longest:?}"
    );
    let s = v.stats();
    assert!(s.forced_folds >= 1, "{s:?}");
    assert_eq!(s.failed, None);
    fs.clear_faults();
    assert_eq!(read(&v, 0, model.len()), model);
    v.close().expect("close");
    let v = open(&fs);
    assert_eq!(read(&v, 0, model.len()), model, "after reopening");
}

#[test]
fn at_the_hard_limit_writes_are_paced_to_the_fold_instead_of_stopped() {
    // A fold of a segment takes about 330 ms: unpaced, a writer would
    // reach the hard limit and wait that long each time.
    let base_write = std::time::Duration::from_millis(25);
    let (fs, v) = slow_fold_volume(base_write, std::time::Duration::from_secs(10));
    let mut model = vec![0u8; 1 << 20];
    let took = scattered_writes(&v, &mut model, 200);
    // Once one fold has been measured, the writes are paced.
    let paced: Vec<std::time::Duration> = took.iter().filter(|t| t.1).map(|t| t.0).collect();
    assert!(
        paced.len() >= 50,
        "{} writes after the first fold",
        paced.len()
    );
    let longest = paced.iter().max().expect("paced writes");
    assert!(
        *longest < std::time::Duration::from_millis(200),
        "no write stopped for a fold: {longest:?}"
    );
    let slowed = paced.iter().filter(|d| **d >= base_write / 5).count();
    assert!(
        slowed >= paced.len() / 2,
        "{slowed} of {} writes slowed",
        paced.len()
    );
    assert!(v.stats().forced_folds >= 5, "{:?}", v.stats());
    fs.clear_faults();
    assert_eq!(read(&v, 0, model.len()), model);
}

/// A volume of at most 8 segments whose folds cannot finish (base.img
/// refuses writes), opened with `max_hold` as the retry bound.
fn full_journal_volume(max_hold: std::time::Duration) -> (FaultStorage, Volume) {
    let (fs, v) = eight_segment_volume(max_hold);
    fs.inject(Fault::always(FaultOp::Write, EIO).on_paths_containing("base.img"));
    (fs, v)
}

/// A volume of at most 8 segments, opened with `max_hold` as the retry
/// bound.
fn eight_segment_volume(max_hold: std::time::Duration) -> (FaultStorage, Volume) {
    let fs = FaultStorage::new();
    let mut settings = small_settings();
    settings.journal_max = 8 * (64 << 10);
    settings.journal_warn = 4 * (64 << 10);
    create(&fs, &settings);
    let mut options = options();
    options.retry.max_hold = max_hold;
    let (v, _) = Volume::open(fs.arc(), Path::new(DIR), options).expect("open");
    (fs, v)
}

/// Writes 16 KiB blocks until one fails; returns that error and how many
/// were acknowledged.
fn write_until_refused(v: &Volume) -> (Error, u64) {
    for i in 0..1000u64 {
        if let Err(e) = v.write((i % 32) * 16384, &pattern(i as u8, 16384)) {
            return (e, i);
        }
    }
    panic!("an 8-segment journal took 1000 writes of 16 KiB");
}

#[test]
fn at_the_hard_limit_with_no_fold_possible_a_write_fails_as_journal_full() {
    let (_fs, v) = full_journal_volume(std::time::Duration::from_millis(200));
    let (err, acked) = write_until_refused(&v);
    assert!(matches!(err, Error::JournalFull { .. }), "{err}");
    assert!(err.to_string().contains("524288"), "names the limit: {err}");
    assert!(acked >= 20, "the journal filled first: {acked} writes");
    // Nothing acknowledged is lost, and reads go on.
    for i in 0..acked.min(32) {
        let newest = (i..acked).step_by(32).last().expect("written");
        assert_eq!(read(&v, i * 16384, 16384), pattern(newest as u8, 16384));
    }
}

#[test]
fn releasing_held_requests_fails_a_write_waiting_at_the_hard_limit_at_once() {
    // Without the release the write would wait out `max_hold`, and so
    // would closing the volume, for the applier's failing fold.
    let max_hold = std::time::Duration::from_secs(120);
    let (_fs, v) = full_journal_volume(max_hold);
    let started = std::time::Instant::now();
    let (err, _) = std::thread::scope(|s| {
        let writer = s.spawn(|| write_until_refused(&v));
        // Stats do not wait for the writer, which holds the write cursor.
        wait_until("the journal to fill", || {
            let stats = v.stats();
            stats.journal_bytes == stats.journal_max && stats.segments_free == 0
        });
        let _released = v.release_held();
        writer.join().expect("writer")
    });
    assert!(matches!(err, Error::JournalFull { .. }), "{err}");
    drop(v);
    assert!(started.elapsed() < max_hold / 10, "{:?}", started.elapsed());
}

#[test]
fn extra_free_segments_are_released_down_to_the_reserve() {
    let (fs, v) = new_volume();
    // Unflushed writes over about seven segments.
    for i in 0..20u64 {
        v.write((i % 32) * 16384, &pattern(i as u8, 16384))
            .expect("write");
    }
    drop(v);
    // A crash that loses one of the first records ends the log in the first
    // segment: every later segment comes back as a free one.
    let crashed = (0..64)
        .map(|seed| fs.crash(seed))
        .find(|c| {
            let (_, report) = Volume::open(c.arc(), Path::new(DIR), options()).expect("open");
            report.next_lsn <= 3 && report.discarded.is_some()
        })
        .expect("some crash loses an early record");
    let v = open(&crashed);
    let files = || {
        let listed = crashed.list_dir(Path::new("/vol/journal")).expect("ls");
        listed.len() as u64
    };
    // The pool's thread counts a segment out before its file is gone (or
    // in, after making one): the two agree once it is done.
    wait_until("the pool to shrink to its reserve and settle", || {
        let s = v.stats();
        s.segments_free == s.reserve_target && files() == s.segments_used + s.segments_free
    });
    let s = v.stats();
    assert!(s.segments_used <= 1, "{s:?}");
    assert_eq!(files(), s.segments_used + s.segments_free);
}

#[test]
fn writethrough_writes_survive_any_crash_without_a_flush() {
    let (fs, v) = new_volume();
    v.set_writethrough(true);
    for i in 0..10u64 {
        v.write(i * 4096, &pattern(i as u8, 4096)).expect("write");
    }
    assert!(v.stats().writethrough);
    for seed in 0..8 {
        let crashed = fs.crash(seed);
        let v = open(&crashed);
        for i in 0..10u64 {
            assert_eq!(
                read(&v, i * 4096, 4096),
                pattern(i as u8, 4096),
                "seed {seed}"
            );
        }
    }
}

#[test]
fn flushed_writes_survive_and_unflushed_ones_are_whole_or_absent() {
    let (fs, v) = new_volume();
    v.write(0, &pattern(1, 8192)).expect("write");
    v.flush().expect("flush");
    let durable = v.stats().durable_lsn;
    assert!(durable >= 1);
    v.write(8192, &pattern(2, 8192)).expect("unflushed");
    for seed in 0..32 {
        let v = open(&fs.crash(seed));
        assert_eq!(read(&v, 0, 8192), pattern(1, 8192), "seed {seed}");
        let tail = read(&v, 8192, 8192);
        assert!(
            tail == pattern(2, 8192) || tail == vec![0u8; 8192],
            "seed {seed}: torn data visible"
        );
    }
}

#[test]
fn transient_io_errors_are_retried_and_invisible() {
    let (fs, v) = new_volume();
    fs.inject(Fault::once_after(FaultOp::Write, 0, EIO));
    fs.inject(Fault::once_after(FaultOp::Write, 0, ENOSPC));
    v.write(0, &pattern(3, 4096)).expect("retried write");
    fs.inject(Fault::once_after(FaultOp::Read, 0, EIO));
    assert_eq!(read(&v, 0, 4096), pattern(3, 4096));
    v.flush().expect("flush");
    assert_eq!(v.stats().failed, None);
}

#[test]
fn a_write_that_keeps_failing_stops_the_volume_until_reopen() {
    let (fs, v) = new_volume();
    v.write(0, &pattern(1, 4096)).expect("write");
    v.flush().expect("flush");
    fs.inject(Fault::always(FaultOp::Write, EIO).on_paths_containing(".seg"));
    let err = v.write(4096, &pattern(2, 4096)).unwrap_err();
    assert!(matches!(err, Error::Failed(_)), "{err}");
    assert!(err.to_string().contains("reopen"), "{err}");
    // Later writes and flushes fail at once; reads still work.
    assert!(matches!(v.write(8192, &[1u8; 512]), Err(Error::Failed(_))));
    assert!(matches!(v.flush(), Err(Error::Failed(_))));
    assert_eq!(read(&v, 0, 4096), pattern(1, 4096));
    assert!(v.stats().failed.is_some());
    fs.clear_faults();
    drop(v);
    let v = open(&fs);
    assert_eq!(read(&v, 0, 4096), pattern(1, 4096));
    assert_eq!(
        read(&v, 4096, 4096),
        vec![0u8; 4096],
        "the failed write is not there"
    );
    v.write(4096, &pattern(4, 4096)).expect("writes work again");
}

#[test]
fn release_held_fails_a_request_held_on_an_io_error_at_once() {
    const HOLD: std::time::Duration = std::time::Duration::from_secs(120);
    let fs = FaultStorage::new();
    create(&fs, &small_settings());
    let options = OpenOptions {
        retry: rewind_journal::RetryPolicy {
            max_hold: HOLD,
            ..Default::default()
        },
        ..options()
    };
    let v = Volume::open(fs.arc(), Path::new(DIR), options)
        .expect("open")
        .0;
    fs.inject(Fault::always(FaultOp::Write, EIO).on_paths_containing(".seg"));
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        let held = s.spawn(|| v.write(0, &pattern(1, 4096)));
        wait_until("the write to be held", || v.stats().held_requests == 1);
        let released = v.release_held();
        let err = held.join().expect("writer").unwrap_err();
        assert!(matches!(err, Error::Failed(_)), "{err}");
        drop(released);
    });
    assert!(start.elapsed() < HOLD, "the write was not released");
    assert_eq!(v.stats().held_requests, 0, "no longer held");
}

#[test]
fn a_failed_sync_fails_the_flush_and_stops_the_volume() {
    let (fs, v) = new_volume();
    v.write(0, &pattern(1, 4096)).expect("write");
    // The segment written: the pool syncs the new ones it prepares.
    fs.inject(Fault::once_after(FaultOp::Sync, 0, EIO).on_paths_containing("00000000.seg"));
    let err = v.flush().unwrap_err();
    assert!(
        err.to_string().contains("syncing the journal failed"),
        "{err}"
    );
    assert!(matches!(v.write(0, &[0u8; 512]), Err(Error::Failed(_))));
}

#[test]
fn growth_failures_are_retried_in_the_background() {
    let (fs, v) = new_volume();
    // Preparing new segments fails for a while; the reserve carries writes.
    fs.inject(Fault::always(FaultOp::Allocate, ENOSPC));
    v.write(0, &pattern(1, 16384))
        .expect("write on the reserve");
    fs.clear_faults();
    wait_until("the reserve to refill", || v.stats().segments_free == 2);
    for i in 0..20u64 {
        v.write((i % 16) * 16384, &pattern(i as u8, 16384))
            .expect("write");
    }
}

#[test]
fn concurrent_writers_and_readers_see_consistent_data() {
    let (fs, v) = new_volume();
    let v = std::sync::Arc::new(v);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                let base = u64::from(t) * 262144;
                for round in 0..50u8 {
                    let off = base + u64::from(round % 16) * 16384;
                    let data = pattern(t.wrapping_mul(50).wrapping_add(round), 16384);
                    v.write(off, &data).expect("write");
                    assert_eq!(read(&v, off, 16384), data);
                    if round % 10 == 0 {
                        v.flush().expect("flush");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    v.flush().expect("flush");
    let expect: Vec<Vec<u8>> = (0..4u8)
        .flat_map(|t| (34..50u8).map(move |r| (t, r)))
        .map(|(t, r)| pattern(t.wrapping_mul(50).wrapping_add(r), 16384))
        .collect();
    drop(v);
    let v = open(&fs.crash(3));
    for (t, chunk) in expect.chunks(16).enumerate() {
        for (k, data) in chunk.iter().enumerate() {
            let round = 34 + k as u64;
            let off = t as u64 * 262144 + (round % 16) * 16384;
            assert_eq!(&read(&v, off, 16384), data, "thread {t} round {round}");
        }
    }
}

fn raw_image(dir: &Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk.raw");
    let mut data = pattern(9, len);
    data[len / 2..len / 2 + 65536].fill(0); // a zero run, to exercise sparse copies
    std::fs::write(&path, &data).expect("write image");
    (path, data)
}

#[test]
fn importing_an_image_clones_or_moves_it_with_progress() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let storage = OsStorage::shared();
    let (src, data) = raw_image(tmp.path(), 1 << 20);
    for (name, mode) in [("clone", ImportMode::Clone), ("move", ImportMode::Move)] {
        let dir = tmp.path().join(name);
        let mut last = (0, 0);
        let mut settings = VolumeSettings::new(2 << 20);
        settings.segment_size = 1 << 20;
        let config = Volume::create(
            storage.as_ref(),
            &dir,
            &settings,
            BaseImage::Import { path: &src, mode },
            &mut |done, total| last = (done, total),
        )
        .expect("import");
        assert_eq!(last, (1 << 20, 1 << 20), "{name}: progress reaches the end");
        assert_eq!(config.size, 2 << 20, "the volume keeps its larger size");
        let (v, _) = Volume::open(storage.clone(), &dir, OpenOptions::default()).expect("open");
        assert_eq!(read(&v, 0, data.len()), data, "{name}");
        assert_eq!(
            read(&v, 1 << 20, 4096),
            vec![0u8; 4096],
            "{name}: extension is zero"
        );
        assert_eq!(src.exists(), mode == ImportMode::Clone, "{name}");
        if mode == ImportMode::Clone {
            v.write(0, &[0xEE; 512]).expect("write");
            v.close().expect("close");
            assert_eq!(
                std::fs::read(&src).expect("src"),
                data,
                "the source is untouched"
            );
        }
    }
}

#[test]
fn a_fold_of_large_runs_on_disk_copies_them_into_base_img_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let storage = OsStorage::shared();
    let mut settings = VolumeSettings::new(8 << 20);
    settings.segment_size = 1 << 20;
    Volume::create(
        storage.as_ref(),
        &dir,
        &settings,
        BaseImage::Empty,
        &mut |_, _| {},
    )
    .expect("create");
    let clock = std::sync::Arc::new(rewind_journal::ManualClock::new(1_000));
    let open = || {
        let options = OpenOptions {
            clock: clock.clone(),
            ..options()
        };
        Volume::open(storage.clone(), &dir, options)
            .expect("open")
            .0
    };
    let v = open();
    let mut model = vec![0u8; 8 << 20];
    let mut write = |v: &Volume, at: usize, data: Vec<u8>| {
        v.write(at as u64, &data).expect("write");
        model[at..at + data.len()].copy_from_slice(&data);
    };
    // Sequential 512 KiB writes: runs of megabytes, copied in the
    // kernel; an unaligned small write splits one into two large pieces
    // and a small one; a lone 4 KiB write stays below the splice size.
    for i in 0..8 {
        write(
            &v,
            (1 << 20) + i * (512 << 10),
            pattern(i as u8 + 1, 512 << 10),
        );
    }
    write(&v, (2 << 20) + 1536, pattern(20, 3584));
    write(&v, 7 << 20, pattern(21, 4096));
    v.flush().expect("flush");
    // Past the window, idle: everything folds, the active segment too.
    clock.set(1_000 + 7_200 * 1_000_000_000);
    v.fold_now().expect("fold").expect("folded");
    assert_eq!(v.stats().base_lsn, v.stats().last_lsn, "{:?}", v.stats());
    assert_eq!(read(&v, 0, model.len()), model);
    v.close().expect("close");
    let base = std::fs::read(dir.join("base.img")).expect("base.img");
    assert!(base == model, "base.img holds every write");
    let v = open();
    assert_eq!(read(&v, 0, model.len()), model, "after reopening");
    v.close().expect("close");
}

#[test]
fn importing_an_image_larger_than_the_volume_is_refused_and_gives_it_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let storage = OsStorage::shared();
    let (src, data) = raw_image(tmp.path(), 1 << 20);
    let mut settings = VolumeSettings::new(512 << 10);
    settings.segment_size = 1 << 20;
    let err = Volume::create(
        storage.as_ref(),
        &tmp.path().join("v"),
        &settings,
        BaseImage::Import {
            path: &src,
            mode: ImportMode::Move,
        },
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("at most the volume size"), "{err}");
    assert_eq!(std::fs::read(&src).expect("still there"), data);
    assert!(!tmp.path().join("v").exists(), "nothing was created");
}

#[test]
fn the_copying_import_reproduces_the_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, data) = raw_image(tmp.path(), 1 << 20);
    let fs = FaultStorage::new();
    fs.create_dir_all(Path::new("/v")).expect("mkdir");
    let method = fs
        .import(
            &src,
            Path::new("/v/base.img"),
            ImportMode::Clone,
            &mut |_, _| {},
        )
        .expect("import");
    assert_eq!(method, ImportMethod::Copied);
    assert_eq!(fs.contents(Path::new("/v/base.img")).expect("file"), data);
}

#[test]
fn the_time_index_maps_times_to_lsns_and_survives_recovery() {
    let fs = FaultStorage::new();
    create(&fs, &small_settings());
    let clock = std::sync::Arc::new(rewind_journal::ManualClock::new(1_000));
    let options = || OpenOptions {
        clock: clock.clone(),
        ..options()
    };
    let (v, _) = Volume::open(fs.arc(), Path::new(DIR), options()).expect("open");
    assert_eq!(v.lsn_at(u64::MAX), Some(0), "only the initial image yet");
    assert_eq!(v.lsn_at(998), None, "before the volume's first open");
    let mut lsns = Vec::new();
    for t in [2_000u64, 3_000, 3_000, 5_000] {
        clock.set(t);
        lsns.push(v.write(0, &pattern(t as u8, 512)).expect("write"));
    }
    // A clock that goes back does not make timestamps decrease.
    clock.set(4_000);
    let last = v.write(512, &[1u8; 512]).expect("write");
    let check = |v: &Volume, newest: u64| {
        assert_eq!(v.lsn_at(1_999), Some(0));
        assert_eq!(v.lsn_at(2_000), Some(lsns[0]));
        assert_eq!(v.lsn_at(2_999), Some(lsns[0]));
        assert_eq!(v.lsn_at(3_000), Some(lsns[2]));
        assert_eq!(v.lsn_at(4_999), Some(lsns[2]));
        assert_eq!(v.lsn_at(5_000), Some(newest));
        assert_eq!(v.stats().oldest_record_ns, Some(2_000));
    };
    check(&v, last);
    // The flush record is indexed too, stamped no earlier than the last write.
    v.flush().expect("flush");
    assert_eq!(v.last_lsn(), last + 1);
    drop(v);
    clock.set(9_000);
    let (v, _) = Volume::open(fs.arc(), Path::new(DIR), options()).expect("reopen");
    check(&v, last + 1);
}

#[test]
fn raising_the_epoch_is_durable_and_survives_a_crash_before_volume_json() {
    let (fs, v) = new_volume();
    assert_eq!(v.epoch(), 1);
    let before = v.write(0, &pattern(1, 4096)).expect("write");
    // volume.json as it was before the raise, to put back after a crash.
    let old_json = fs
        .contents(&Path::new(DIR).join("volume.json"))
        .expect("volume.json");
    assert_eq!(v.raise_epoch().expect("raise"), 2);
    assert_eq!(v.epoch(), 2);
    assert_eq!(v.stats().epoch, 2);
    let epoch_lsn = v.last_lsn();
    assert!(epoch_lsn > before);
    v.write(4096, &pattern(2, 4096))
        .expect("write at the new epoch");
    drop(v);

    let v = open(&fs);
    assert_eq!(v.epoch(), 2, "volume.json says so");
    assert_eq!(read(&v, 4096, 4096), pattern(2, 4096));
    drop(v);

    // A crash after the Epoch record was synced, before volume.json was
    // replaced: the record says it.
    fs.set_contents(&Path::new(DIR).join("volume.json"), old_json);
    let v = open(&fs);
    assert_eq!(v.epoch(), 2, "recovered from the Epoch record");
    assert_eq!(v.raise_epoch().expect("raise again"), 3);
    drop(v);
    assert_eq!(open(&fs).epoch(), 3);
}

/// Drops `path`'s clean pages from the page cache. With `until_gone`,
/// asks again until none is left: a page the kernel is still reading
/// (readahead an earlier cached read started) cannot be dropped yet, and
/// would be cached a moment later. (Not for a segment: the pages around
/// its header slots stay mapped.)
fn evict(path: &Path, until_gone: bool) {
    let f = std::fs::File::open(path).expect("open to evict");
    f.sync_all().expect("sync before evicting");
    let len = f.metadata().expect("stat").len();
    for _ in 0..10_000 {
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
        if !until_gone || !any_page_cached(&f, len) {
            return;
        }
        std::thread::yield_now();
    }
    panic!("{} stays in the page cache", path.display());
}

/// Whether a page of the first `len` bytes of `f` is in the page cache
/// (mincore: a read would start readahead of the pages it asks about).
fn any_page_cached(f: &std::fs::File, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(len) = usize::try_from(len) else {
        return true;
    };
    if len == 0 {
        return false;
    }
    let mut resident = vec![0u8; len.div_ceil(4096)];
    // SAFETY: maps `len` bytes of an open file read-only, asks which pages
    // are resident into a vector of one byte per page, and unmaps; nothing
    // reads through the mapping.
    let asked = unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        let r = libc::mincore(addr, len, resident.as_mut_ptr());
        libc::munmap(addr, len);
        r
    };
    assert_eq!(asked, 0, "mincore");
    resident.iter().any(|&b| b & 1 != 0)
}

#[test]
fn cached_reads_are_served_and_reads_that_would_wait_for_the_disk_are_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let storage = OsStorage::shared();
    let (src, mut want) = raw_image(tmp.path(), 1 << 20);
    let dir = tmp.path().join("v");
    let mut settings = VolumeSettings::new(1 << 20);
    settings.segment_size = 1 << 20;
    Volume::create(
        storage.as_ref(),
        &dir,
        &settings,
        BaseImage::Import {
            path: &src,
            mode: ImportMode::Clone,
        },
        &mut |_, _| {},
    )
    .expect("create");
    let (v, _) = Volume::open(storage.clone(), &dir, options()).expect("open");
    let new = pattern(3, 64 << 10);
    v.write(128 << 10, &new).expect("write");
    v.flush().expect("flush");
    want[128 << 10..192 << 10].copy_from_slice(&new);
    // Reopened, so that this process maps no page of the segment (the
    // write stored into its mapping, and fadvise cannot evict mapped
    // pages).
    v.close().expect("close");
    let (v, _) = Volume::open(storage.clone(), &dir, options()).expect("reopen");

    // The import leaves the base uncached (storage.rs, `settle`):
    // read it in, so that everything is in the page cache.
    std::fs::read(dir.join("base.img")).expect("read the base in");
    let mut buf = vec![0u8; 256 << 10];
    assert!(v.read_cached(0, &mut buf).expect("cached read"));
    assert_eq!(buf, want[..256 << 10], "journal and base pieces");

    // A read of evicted pages reports false. Its RWF_NOWAIT read starts
    // readahead, which the disk can finish within the call (between one
    // read in two hundred and one in sixteen here on an idle host; five in
    // a row once in a CI run): such a read is served, so each is tried
    // until one is refused, evicting first.
    let refused = |offset: u64, len: usize| {
        (0..200).any(|_| {
            evict(&dir.join("base.img"), true);
            for entry in std::fs::read_dir(dir.join("journal")).expect("journal dir") {
                evict(&entry.expect("entry").path(), false);
            }
            !v.read_cached(offset, &mut vec![0u8; len])
                .expect("cold read")
        })
    };
    let base_only = 512 << 10..576 << 10;
    let mut cold = vec![0u8; base_only.len()];
    assert!(
        refused(base_only.start as u64, cold.len()),
        "a read of evicted base.img pages would wait for the disk"
    );
    assert!(
        refused(128 << 10, 64 << 10),
        "a read of an evicted segment would wait for the disk"
    );
    // The waiting read brings the pages in; then they are served cached.
    assert_eq!(
        read(&v, base_only.start as u64, cold.len()),
        want[base_only.clone()]
    );
    assert!(v
        .read_cached(base_only.start as u64, &mut cold)
        .expect("read"));
    assert_eq!(cold, want[base_only]);
    assert!(
        v.read_cached(2 << 20, &mut cold).is_err(),
        "past the end is refused as a read is"
    );
    v.close().expect("close");
}

#[test]
fn a_write_returns_only_once_every_write_recorded_before_it_is_written() {
    // Recovery ends the log at the first record missing: a write recorded
    // after one still being written must not be acknowledged before it,
    // or a crash of the process would lose it.
    let (fs, v) = new_volume();
    for i in 0..2u64 {
        v.write(i * 16384, &pattern(i as u8, 16384)).expect("write");
    }
    // Lsn 3 is the last 16 KiB record segment 0 holds; lsn 4 opens segment 1.
    let slow = std::time::Duration::from_millis(500);
    fs.slow_down(FaultOp::Write, "00000000.seg", slow);
    std::thread::scope(|s| {
        let first = s.spawn(|| v.write(2 * 16384, &pattern(2, 16384)).expect("write"));
        wait_until("lsn 3 to be recorded", || v.last_lsn() == 3);
        let started = std::time::Instant::now();
        let lsn = v.write(3 * 16384, &pattern(3, 16384)).expect("write");
        let took = started.elapsed();
        assert_eq!(lsn, 4);
        assert!(
            took >= slow / 2,
            "lsn 4 returned after {took:?}, before lsn 3 was written"
        );
        assert_eq!(first.join().expect("join"), 3);
    });
    fs.clear_faults();
    for i in 0..4u64 {
        assert_eq!(read(&v, i * 16384, 16384), pattern(i as u8, 16384));
    }
}

#[test]
fn a_write_recorded_behind_one_still_being_written_is_done_only_once_that_one_is() {
    let (fs, v) = new_volume();
    // The first write stalls in the storage after its record is placed
    // (in the first segment, which only the writer writes to).
    fs.slow_down(
        FaultOp::Write,
        "00000000.seg",
        std::time::Duration::from_secs(1),
    );
    std::thread::scope(|s| {
        let first = s.spawn(|| v.write(0, &pattern(1, 4096)).expect("first write"));
        wait_until("the first write to sleep in the storage", || {
            fs.stalled() > 0
        });
        assert_eq!(v.stats().last_lsn, 1, "placed");
        fs.clear_faults();
        let mut buf = PayloadBuffer::new();
        buf.payload_mut(4096).copy_from_slice(&pattern(2, 4096));
        let second = v
            .write_buffer_unordered(8192, &mut buf)
            .expect("second write");
        assert_eq!(second, Written::AfterOthers(2), "recorded, not yet done");
        assert!(!first.is_finished());
        v.wait_written(2).expect("wait");
        // Returned once the first record is written (it reads back).
        assert_eq!(read(&v, 0, 4096), pattern(1, 4096));
        assert_eq!(first.join().expect("first thread"), 1);
    });
    // With nothing before it in flight, a write is done at once.
    let mut buf = PayloadBuffer::new();
    buf.payload_mut(4096).copy_from_slice(&pattern(3, 4096));
    assert_eq!(
        v.write_buffer_unordered(16384, &mut buf).expect("third"),
        Written::InOrder(3)
    );
    drop(v);
    let v = open(&fs.process_crash());
    assert_eq!(read(&v, 0, 4096), pattern(1, 4096));
    assert_eq!(read(&v, 8192, 4096), pattern(2, 4096));
    assert_eq!(read(&v, 16384, 4096), pattern(3, 4096));
}
