//! Checkpoints: an open after one verifies only the records after it, and
//! a torn, damaged or stale one falls back to the full recovery with the
//! same result.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
use rewind_journal::{
    ManualClock, OpenOptions, PointInTime, RecoveryReport, Timeline, Volume, VolumeSettings,
};

const T0: u64 = 1_700_000_000_000_000_000;
const PAGE: usize = 4096;
const EIO: i32 = 5;

fn checkpoint_path() -> PathBuf {
    Path::new(DIR).join("checkpoint")
}

/// Checkpoints only when the test asks (the applier takes none in
/// journals below 1 GiB).
fn clocked_options(clock: &Arc<ManualClock>) -> OpenOptions {
    OpenOptions {
        clock: clock.clone(),
        checkpoint_every: Some(1 << 30),
        ..options()
    }
}

fn open_report(fs: &FaultStorage, clock: &Arc<ManualClock>) -> (Volume, RecoveryReport) {
    Volume::open(fs.arc(), Path::new(DIR), clocked_options(clock)).expect("open")
}

/// Checkpoints every 64 KiB segment (and at close): the small test
/// journals get them.
fn open_checkpointing(fs: &FaultStorage, clock: &Arc<ManualClock>) -> (Volume, RecoveryReport) {
    let options = OpenOptions {
        checkpoint_every: Some(64 << 10),
        ..clocked_options(clock)
    };
    Volume::open(fs.arc(), Path::new(DIR), options).expect("open")
}

/// A volume with a 10 s window on a clock the test moves.
fn new_volume(clock: &Arc<ManualClock>) -> (FaultStorage, Volume) {
    let fs = FaultStorage::new();
    let settings = VolumeSettings {
        window: Duration::from_secs(10),
        ..small_settings()
    };
    create(&fs, &settings);
    let v = open_report(&fs, clock).0;
    (fs, v)
}

/// Writes `n` pages from page `first` on, with a flush, a bookmark and
/// zeroed pages among them.
fn write_some(v: &Volume, first: u64, n: u64, seed: u8) {
    for i in 0..n {
        let page = (first + i * 7) % 200;
        v.write(
            page * PAGE as u64,
            &pattern(seed.wrapping_add(i as u8), PAGE),
        )
        .expect("write");
        if i % 5 == 4 {
            v.flush().expect("flush");
        }
        if i % 11 == 3 {
            v.write_zeroes(((page + 3) % 200) * PAGE as u64, PAGE as u64, true)
                .expect("zeroes");
        }
    }
    v.bookmark(&format!("b{first}-{seed}"), seed.is_multiple_of(2))
        .expect("bookmark");
    v.flush().expect("flush");
}

/// What an open must rebuild: the disk, the history and a past state.
/// (Not the pool's size: each open prepares a fresh segment.)
#[derive(PartialEq, Eq)]
struct Seen {
    disk: Vec<u8>,
    timeline: Timeline,
    past: Vec<u8>,
    last_lsn: u64,
}

impl std::fmt::Debug for Seen {
    /// The history in full, the disks by a hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digest = |b: &[u8]| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.hash(&mut h);
            h.finish()
        };
        write!(
            f,
            "last lsn {}, disk {:x}, past {:x}, {:?}",
            self.last_lsn,
            digest(&self.disk),
            digest(&self.past),
            self.timeline
        )
    }
}

fn seen(v: &Volume) -> Seen {
    let timeline = Timeline {
        journal_bytes: 0,
        ..v.timeline()
    };
    let middle = PointInTime::Lsn((timeline.start_lsn + timeline.last_lsn) / 2);
    let mut past = vec![0u8; 200 * PAGE];
    v.view(&middle)
        .expect("view")
        .read(0, &mut past)
        .expect("read view");
    Seen {
        disk: read(v, 0, 200 * PAGE),
        last_lsn: v.last_lsn(),
        timeline,
        past,
    }
}

/// Opens again with the checkpoint removed: what a full recovery finds.
fn full_recovery(fs: &FaultStorage, clock: &Arc<ManualClock>) -> Seen {
    let copy = fs.process_crash();
    if copy.contents(&checkpoint_path()).is_some() {
        copy.set_contents(&checkpoint_path(), Vec::new());
    }
    let (v, report) = open_report(&copy, clock);
    assert_eq!(report.records_from_checkpoint, 0, "{report}");
    seen(&v)
}

#[test]
fn an_open_after_a_checkpoint_verifies_only_the_records_after_it() {
    let clock = Arc::new(ManualClock::new(T0));
    let (fs, v) = new_volume(&clock);
    write_some(&v, 0, 60, 1);
    let c = v.checkpoint().expect("checkpoint").expect("something new");
    assert_eq!(v.checkpoint().expect("again"), None, "nothing new");
    write_some(&v, 5, 10, 2);
    let last = v.last_lsn();
    let before = seen(&v);
    drop(v); // no close: the checkpoint stays at c

    let (v, report) = open_report(&fs.process_crash(), &clock);
    assert_eq!(report.next_lsn, last + 1, "{report}");
    assert_eq!(report.records, last);
    assert_eq!(report.records_from_checkpoint, c);
    assert_eq!(report.records_verified, last - c);
    assert!(
        report.segments_scanned < 4,
        "only the segment holding lsn {c} and the later ones: {report}"
    );
    assert_eq!(seen(&v), before);
    drop(v);
    assert_eq!(full_recovery(&fs, &clock), before);
}

#[test]
fn a_closed_volume_reopens_from_its_checkpoint_and_goes_on() {
    let clock = Arc::new(ManualClock::new(T0));
    let (fs, v) = new_volume(&clock);
    drop(v);
    let v = open_checkpointing(&fs, &clock).0;
    write_some(&v, 0, 60, 3);
    v.close().expect("close");
    let (v, report) = open_checkpointing(&fs, &clock);
    assert!(
        report.records_verified <= 1,
        "at most the close's Flush record: {report}"
    );
    assert_eq!(
        report.records_from_checkpoint + report.records_verified,
        report.records
    );
    // A revert and more writes, then again.
    v.revert(&PointInTime::Lsn(20)).expect("revert");
    write_some(&v, 1, 30, 4);
    let before = seen(&v);
    v.close().expect("close");
    let (v, report) = open_checkpointing(&fs, &clock);
    assert!(report.records_verified <= 1, "{report}");
    assert_eq!(seen(&v), before);
    drop(v);
    assert_eq!(full_recovery(&fs, &clock), before);
}

#[test]
fn the_applier_takes_checkpoints_as_the_journal_grows() {
    let clock = Arc::new(ManualClock::new(T0));
    let (fs, v) = new_volume(&clock);
    drop(v);
    let options = OpenOptions {
        checkpoint_every: Some(64 << 10),
        fold_interval: Some(Duration::from_millis(10)),
        ..clocked_options(&clock)
    };
    let v = Volume::open(fs.arc(), Path::new(DIR), options)
        .expect("open")
        .0;
    write_some(&v, 0, 60, 14);
    wait_until("a checkpoint", || fs.contents(&checkpoint_path()).is_some());
    let before = seen(&v);
    drop(v);
    let (v, report) = open_report(&fs.process_crash(), &clock);
    assert!(report.records_from_checkpoint > 0, "{report}");
    assert_eq!(seen(&v), before);
}

/// A checkpoint damaged in `damage` makes the open fall back to the full
/// recovery, with the same result.
fn falls_back_when(damage: impl Fn(&FaultStorage)) {
    let clock = Arc::new(ManualClock::new(T0));
    let (fs, v) = new_volume(&clock);
    write_some(&v, 0, 40, 5);
    v.checkpoint().expect("checkpoint").expect("something new");
    write_some(&v, 3, 5, 6);
    let before = seen(&v);
    drop(v);
    let copy = fs.process_crash();
    damage(&copy);
    let (v, report) = open_report(&copy, &clock);
    assert_eq!(report.records_from_checkpoint, 0, "{report}");
    assert_eq!(report.records_verified, report.records);
    assert_eq!(seen(&v), before);
}

#[test]
fn a_truncated_checkpoint_falls_back_to_a_full_recovery() {
    for keep in [0, 50, 200, 1000] {
        falls_back_when(|fs| {
            let mut b = fs.contents(&checkpoint_path()).expect("checkpoint");
            b.truncate(keep.min(b.len() - 1));
            fs.set_contents(&checkpoint_path(), b);
        });
    }
}

#[test]
fn a_flipped_bit_in_a_checkpoint_falls_back_to_a_full_recovery() {
    for at in [3, 30, 130, 600, usize::MAX] {
        falls_back_when(|fs| {
            let mut b = fs.contents(&checkpoint_path()).expect("checkpoint");
            let at = at.min(b.len() - 1);
            b[at] ^= 0x04;
            fs.set_contents(&checkpoint_path(), b);
        });
    }
}

#[test]
fn a_crash_while_a_checkpoint_is_written_leaves_the_previous_one() {
    for seed in 0..8 {
        let clock = Arc::new(ManualClock::new(T0));
        let (fs, v) = new_volume(&clock);
        write_some(&v, 0, 30, 7);
        let first = v.checkpoint().expect("checkpoint");
        write_some(&v, 2, 30, 8);
        // The next one fails at its sync: written, never renamed.
        fs.inject(Fault::once_after(FaultOp::Sync, 0, EIO).on_paths_containing("checkpoint.tmp"));
        assert!(v.checkpoint().is_err(), "the sync failed");
        let flushed = v.bookmarks();
        let crashed = fs.crash(seed);
        drop(v);
        assert!(crashed
            .contents(&checkpoint_path().with_extension("tmp"))
            .is_some());
        let (v, report) = open_report(&crashed, &clock);
        assert_eq!(Some(report.records_from_checkpoint), first, "{report}");
        assert_eq!(v.bookmarks(), flushed, "everything was flushed");
        let after = seen(&v);
        drop(v);
        assert_eq!(after, full_recovery(&crashed, &clock));
        assert!(
            crashed
                .contents(&checkpoint_path().with_extension("tmp"))
                .is_none(),
            "the open removes the leftover"
        );
    }
}

#[test]
fn a_checkpoint_older_than_a_fold_is_trimmed_and_one_older_than_the_journal_is_stale() {
    let clock = Arc::new(ManualClock::new(T0));
    let (fs, v) = new_volume(&clock);
    write_some(&v, 0, 40, 9);
    let old = v.checkpoint().expect("checkpoint").expect("something new");
    let old_copy = fs.contents(&checkpoint_path()).expect("checkpoint");
    clock.advance(20_000_000_000);
    write_some(&v, 4, 40, 10);
    let c = v.checkpoint().expect("checkpoint").expect("something new");
    let folded = v
        .fold_now()
        .expect("fold")
        .expect("the first records left the window");
    assert!(folded.base_lsn < c, "{folded:?}");
    let before = seen(&v);
    drop(v);

    // The checkpoint still holds records the fold left: it is trimmed.
    let (v, report) = open_report(&fs.process_crash(), &clock);
    assert_eq!(
        report.records_from_checkpoint,
        c - folded.base_lsn,
        "{report}"
    );
    assert_eq!(seen(&v), before);
    drop(v);

    // More writes, and a fold past the older checkpoint.
    let (v, _) = open_report(&fs, &clock);
    clock.advance(20_000_000_000);
    write_some(&v, 9, 3, 11);
    let folded = v
        .fold_now()
        .expect("fold")
        .expect("the second records left the window");
    assert!(folded.base_lsn > old, "{folded:?}");
    let before = seen(&v);
    drop(v);

    // The older one stands for records the fold released: stale.
    let copy = fs.process_crash();
    copy.set_contents(&checkpoint_path(), old_copy);
    let (v, report) = open_report(&copy, &clock);
    assert_eq!(report.records_from_checkpoint, 0, "{report}");
    assert_eq!(seen(&v), before);
}

#[test]
fn a_checkpoint_of_a_journal_that_was_cut_is_not_trusted() {
    let clock = Arc::new(ManualClock::new(T0));
    let (fs, v) = new_volume(&clock);
    write_some(&v, 0, 40, 12);
    let cut_at = v.last_lsn() - 20;
    v.checkpoint().expect("checkpoint").expect("something new");
    let copy_of_checkpoint = fs.contents(&checkpoint_path()).expect("checkpoint");
    v.cut_to_branch(cut_at, "gone").expect("cut");
    write_some(&v, 6, 3, 13);
    let before = seen(&v);
    drop(v);
    let copy = fs.process_crash();
    copy.set_contents(&checkpoint_path(), copy_of_checkpoint);
    let (v, report) = open_report(&copy, &clock);
    assert_eq!(report.records_from_checkpoint, 0, "{report}");
    assert_eq!(seen(&v), before);
}
