//! At the hard limit, a write held for space waits as long as the fold
//! moves, its write-back to the disk included (a slow disk spends most of a
//! fold of scattered records there), and fails only when the fold
//! completes nothing for the hold time.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
use rewind_journal::{Error, Volume};

const SIZE: usize = 1 << 20;
const BLOCK: usize = 512;

/// A 1 MiB disk whose journal holds at most four 2 MiB segments (2046
/// records of 512 bytes each), with a reserve of one: a fold starts when
/// the third fills, and the writer reaches the hard limit one segment
/// later. Writes are held up to `max_hold`.
fn volume(max_hold: Duration) -> (FaultStorage, Volume) {
    let fs = FaultStorage::new();
    let mut settings = small_settings();
    settings.segment_size = 2 << 20;
    settings.journal_max = 8 << 20;
    settings.journal_warn = 4 << 20;
    settings.reserve_segments = 1;
    create(&fs, &settings);
    let mut options = options();
    options.retry.max_hold = max_hold;
    let (v, _) = Volume::open(fs.arc(), Path::new(DIR), options).expect("open");
    (fs, v)
}

/// Writes block `i` of a sequence whose neighbours lie far apart on the
/// disk, so that each record is a run of its own in a fold.
fn write(v: &Volume, model: &mut [u8], i: usize) -> Result<(), Error> {
    let at = (i * 37 % (SIZE / BLOCK)) * BLOCK;
    let data = pattern(i as u8, BLOCK);
    v.write(at as u64, &data)?;
    model[at..at + BLOCK].copy_from_slice(&data);
    Ok(())
}

/// Writes at full speed until a first forced fold is done (the journal is
/// then full of scattered records, and the pacer has measured a fast
/// applier). Returns the next block to write.
fn first_fold_at_full_speed(v: &Volume, model: &mut [u8]) -> usize {
    let mut i = 0;
    while v.stats().forced_folds == 0 {
        write(v, model, i).expect("no fold is slow yet");
        i += 1;
    }
    i
}

/// Writes the whole disk over and over until a write is refused; returns
/// the error, how long that write took and its data. Whole-disk writes, because
/// the pacer makes a write wait at most 50 ms: small writes it may keep
/// short of the hard limit for as long as a slow fold frees space, 1 MiB
/// ones reach it.
fn write_until_refused(v: &Volume, model: &mut [u8], mut i: usize) -> (Error, Duration, Vec<u8>) {
    loop {
        assert!(i < 100_000, "no write was refused");
        let data = pattern(i as u8, SIZE);
        let started = Instant::now();
        match v.write(0, &data) {
            Ok(_) => model.copy_from_slice(&data),
            Err(e) => return (e, started.elapsed(), data),
        }
        i += 1;
    }
}

/// Every acknowledged write reads back. A whole-disk write is two records
/// here, appended in turn, so a refused one may have left its first
/// (a failed write's blocks are undefined to the guest too).
fn assert_acknowledged(v: &Volume, model: &[u8], refused: &[u8]) {
    let got = read(v, 0, SIZE);
    let record = v.max_record_payload() as usize;
    let as_written = (0..=SIZE.div_ceil(record)).any(|records| {
        let applied = (records * record).min(SIZE);
        got[..applied] == refused[..applied] && got[applied..] == model[applied..]
    });
    assert!(
        as_written,
        "acknowledged writes read back, and at most the first records of the refused one"
    );
}

#[test]
fn a_write_held_at_the_hard_limit_waits_through_a_write_back_longer_than_the_hold() {
    let max_hold = Duration::from_millis(400);
    let (fs, v) = volume(max_hold);
    let mut model = vec![0u8; SIZE];
    let mut i = first_fold_at_full_speed(&v, &mut model);
    // Each write to base.img now takes 0.6 ms to reach the disk: a fold's
    // 2046 scattered runs take about 1.2 s to write back, three times the
    // hold time, in pieces of about 0.15 s.
    fs.slow_write_back("base.img", Duration::from_micros(600));
    let folds = v.stats().forced_folds;
    let mut longest = Duration::ZERO;
    // The fold after next started after the disk turned slow. Whole-disk
    // writes: the pacer lets a write wait at most 50 ms, so a few of them
    // reach the hard limit while the pacer would hold small writes short
    // of it.
    while v.stats().forced_folds < folds + 2 {
        let data = pattern(i as u8, SIZE);
        let started = Instant::now();
        v.write(0, &data)
            .expect("held while the fold moves, never failed");
        longest = longest.max(started.elapsed());
        model.copy_from_slice(&data);
        i += 1;
    }
    assert!(
        longest > max_hold,
        "a write was held through the write-back, longer than the hold time: {longest:?}"
    );
    let s = v.stats();
    assert_eq!(s.failed, None);
    fs.clear_faults();
    assert!(read(&v, 0, SIZE) == model, "reads back what was written");
    v.close().expect("close");
    let v = open(&fs);
    assert!(read(&v, 0, SIZE) == model, "and after reopening");
}

#[test]
fn a_fold_that_completes_nothing_fails_a_held_write_after_the_hold_time() {
    let max_hold = Duration::from_millis(400);
    let (fs, v) = volume(max_hold);
    let mut model = vec![0u8; SIZE];
    let i = first_fold_at_full_speed(&v, &mut model);
    // Now writing base.img back, or syncing it, takes 3 s at a time: the
    // fold shows no progress for over seven times the hold time.
    let stuck = Duration::from_secs(3);
    fs.slow_down(FaultOp::WriteBack, "base.img", stuck);
    fs.slow_down(FaultOp::Sync, "base.img", stuck);
    let (err, took, refused) = write_until_refused(&v, &mut model, i);
    assert!(matches!(err, Error::JournalFull { .. }), "{err}");
    assert!(took >= max_hold, "held for the hold time first: {took:?}");
    assert!(took < stuck, "not for the stuck write-back: {took:?}");
    fs.clear_faults();
    assert_acknowledged(&v, &model, &refused);
    v.close().expect("close");
}

#[test]
fn a_fold_that_fails_and_starts_over_again_and_again_fails_a_held_write_after_the_hold_time() {
    const EIO: i32 = 5;
    let max_hold = Duration::from_millis(400);
    let (fs, v) = volume(max_hold);
    let mut model = vec![0u8; SIZE];
    let i = first_fold_at_full_speed(&v, &mut model);
    // Every fold now copies its runs into base.img and fails to write
    // them back: each attempt does the same work again and gets no
    // further, which is no progress.
    fs.inject(Fault::always(FaultOp::WriteBack, EIO).on_paths_containing("base.img"));
    let (err, took, refused) = write_until_refused(&v, &mut model, i);
    assert!(matches!(err, Error::JournalFull { .. }), "{err}");
    assert!(took >= max_hold, "held for the hold time first: {took:?}");
    assert!(v.stats().forced_folds >= 1, "{:?}", v.stats());
    fs.clear_faults();
    assert_acknowledged(&v, &model, &refused);
    v.close().expect("close");
    assert_acknowledged(&open(&fs), &model, &refused);
}
