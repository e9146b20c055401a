//! The history window through the volume API: the pool shrinking back,
//! crashes and faults during a fold, views pinning history, writable views,
//! materialize, bookmarks, reverts and the window's bounds.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
use rewind_journal::{
    Error, ManualClock, OpenOptions, OsStorage, PointInTime, Storage, Volume, VolumeSettings,
};

const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_700_000_000_000_000_000;
const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// A new volume with a 10 s window on a clock the test moves.
fn clocked() -> (FaultStorage, Volume, Arc<ManualClock>) {
    let fs = FaultStorage::new();
    let settings = VolumeSettings {
        window: Duration::from_secs(10),
        ..small_settings()
    };
    create(&fs, &settings);
    let clock = Arc::new(ManualClock::new(T0));
    let v = reopen(&fs, &clock);
    (fs, v, clock)
}

fn reopen(fs: &FaultStorage, clock: &Arc<ManualClock>) -> Volume {
    let options = OpenOptions {
        clock: clock.clone(),
        ..options()
    };
    Volume::open(fs.arc(), Path::new(DIR), options)
        .expect("open")
        .0
}

/// [`clocked`] with 12 blocks of 16 KiB written, then 11 s later: all of
/// them left the window, so a fold takes them.
fn twelve_blocks_out_of_the_window() -> (FaultStorage, Volume, Arc<ManualClock>) {
    let (fs, v, clock) = clocked();
    for i in 0..12u64 {
        v.write(i * 16384, &pattern(i as u8, 16384)).expect("write");
    }
    clock.advance(11 * SEC);
    (fs, v, clock)
}

/// A new empty volume in `dir` on the real file system.
fn create_on_disk(dir: &Path, settings: &VolumeSettings) -> Arc<dyn Storage> {
    let storage = OsStorage::shared();
    Volume::create(
        storage.as_ref(),
        dir,
        settings,
        rewind_journal::BaseImage::Empty,
        &mut |_, _| {},
    )
    .expect("create");
    storage
}

fn lsn(n: u64) -> PointInTime {
    PointInTime::Lsn(n)
}

fn view_bytes(v: &Volume, at: &PointInTime, offset: u64, len: usize) -> Vec<u8> {
    let view = v.view(at).expect("view");
    let mut buf = vec![0u8; len];
    view.read(offset, &mut buf).expect("view read");
    buf
}

#[test]
fn the_pool_shrinks_back_to_its_reserve_after_the_window_passes() {
    let (fs, v, clock) = clocked();
    for i in 0..40u64 {
        v.write((i % 32) * 16384, &pattern(i as u8, 16384))
            .expect("write");
    }
    v.flush().expect("flush");
    let grown = v.stats();
    assert!(grown.segments_used > 5, "{grown:?}");
    assert_eq!(
        v.fold_now().expect("fold"),
        None,
        "nothing left the window yet"
    );

    assert_eq!((grown.folded_bytes, grown.fold_nanos), (0, 0));
    clock.advance(11 * SEC);
    let report = v.fold_now().expect("fold").expect("a fold");
    assert!(!report.forced);
    let folded = v.stats();
    assert_eq!(
        folded.folded_bytes,
        report.segments as u64 * folded.segment_size,
        "the journal bytes the fold freed"
    );
    assert!(folded.fold_nanos > 0, "and the time it took");
    assert_eq!(
        report.base_lsn,
        v.last_lsn(),
        "everything folded: {report:?}"
    );
    // The writes outran the pool thread, so the reserve may be raised
    // (pool.rs): the pool shrinks back to it, not past it.
    wait_until("the pool to shrink back to its reserve", || {
        let s = v.stats();
        s.segments_used == 0 && s.segments_retired == 0 && s.segments_free == s.reserve_target
    });
    // Doubled at most up to the early-fold zone: a sixteenth of the pool,
    // at most 16 segments.
    let reserve = v.stats().reserve_target;
    let cap = (grown.journal_max / grown.segment_size / 16).clamp(2, 16);
    assert!((2..=cap).contains(&reserve), "{reserve} against {cap}");
    let files = fs.list_dir(Path::new("/vol/journal")).expect("ls");
    assert_eq!(files.len() as u64, reserve, "{files:?}");
    for i in 8..40u64 {
        let off = (i % 32) * 16384;
        assert_eq!(read(&v, off, 16384), pattern(i as u8, 16384), "write {i}");
    }
    drop(v);
    let v = reopen(&fs, &clock);
    assert_eq!(
        read(&v, 0, 16384),
        pattern(32, 16384),
        "base.img after reopen"
    );
    v.write(0, &[7u8; 4096]).expect("write after the fold");
    assert_eq!(read(&v, 0, 4096), vec![7u8; 4096]);
}

#[test]
fn a_crash_in_the_middle_of_a_fold_makes_older_states_unreachable_and_loses_nothing() {
    let (fs, v, clock) = clocked();
    let first = v.write(0, &[1u8; 512]).expect("write");
    let second = v.write(4096, &[2u8; 512]).expect("write");
    clock.advance(20 * SEC);
    // base.img gets the fold's writes, but its sync fails: then the process
    // dies, keeping those writes.
    fs.inject(Fault::always(FaultOp::Sync, EIO).on_paths_containing("base.img"));
    assert!(v.fold_now().is_err(), "the fold cannot finish");
    drop(v);
    let fs = fs.process_crash();
    let v = reopen(&fs, &clock);
    // base.img may hold the write at lsn `second`: the disk at `first`
    // (sector 8 zero) can no longer be shown, so it must be refused.
    let err = v
        .view(&lsn(first))
        .expect_err("view before the fold's target");
    assert!(matches!(err, Error::OutsideWindow { .. }), "{err}");
    assert_eq!(
        view_bytes(&v, &lsn(second), 0, 8192)[4096..4608],
        [2u8; 512]
    );
    assert_eq!(read(&v, 0, 512), vec![1u8; 512]);
    assert_eq!(read(&v, 4096, 512), vec![2u8; 512]);
    // The next fold finishes the job.
    v.fold_now().expect("fold").expect("a fold");
    assert_eq!(v.stats().base_lsn, v.last_lsn());
    assert_eq!(read(&v, 4096, 512), vec![2u8; 512]);
}

#[test]
fn eio_and_enospc_during_a_fold_lose_nothing_and_the_fold_retries() {
    for errno in [EIO, ENOSPC] {
        let (fs, v, clock) = clocked();
        for i in 0..12u64 {
            v.write(i * 16384, &pattern(i as u8, 16384)).expect("write");
        }
        clock.advance(11 * SEC);
        fs.inject(Fault::always(FaultOp::Write, errno).on_paths_containing("base.img"));
        let err = v.fold_now().expect_err("base.img refuses writes");
        assert!(err.to_string().contains("base.img"), "{err}");
        assert_eq!(v.stats().base_lsn, 0, "nothing committed");
        for i in 0..12u64 {
            assert_eq!(read(&v, i * 16384, 16384), pattern(i as u8, 16384));
        }
        v.write(0, &[9u8; 512]).expect("guest writes go on");
        fs.clear_faults();
        v.fold_now().expect("fold").expect("a fold");
        assert_eq!(read(&v, 0, 512), vec![9u8; 512]);
        for i in 1..12u64 {
            assert_eq!(read(&v, i * 16384, 16384), pattern(i as u8, 16384));
        }
    }
}

/// A sync of base.img that fails once: Linux drops the fold's writes that
/// could not be written (FaultStorage does the same), and a second sync
/// would report success without them. The fold must not commit on it, or
/// a power loss after the journal let go of those records loses them.
#[test]
fn a_base_img_sync_that_fails_once_makes_the_fold_start_over_and_loses_nothing() {
    let (fs, v, clock) = twelve_blocks_out_of_the_window();
    fs.inject(Fault::once_after(FaultOp::Sync, 0, EIO).on_paths_containing("base.img"));
    let err = v.fold_now().expect_err("the fold's sync failed");
    assert!(err.to_string().contains("base.img"), "{err}");
    assert_eq!(v.stats().base_lsn, 0, "nothing committed");
    v.fold_now().expect("fold").expect("a fold, from the start");
    assert_eq!(v.stats().base_lsn, v.last_lsn());
    for seed in 0..8 {
        let after = reopen(&fs.crash(seed), &clock);
        for i in 0..12u64 {
            assert!(
                read(&after, i * 16384, 16384) == pattern(i as u8, 16384),
                "block {i} after a power loss (seed {seed})"
            );
        }
    }
}

/// The fold syncs the segments it folds, after writing them back: when
/// either fails the journal's own durability is in doubt (no later sync of
/// the file can be trusted), so the volume fails instead of retrying, and
/// folds no more (a second fold's sync would pass).
#[test]
fn a_segment_sync_or_write_back_that_fails_in_a_fold_fails_the_volume() {
    for op in [FaultOp::Sync, FaultOp::WriteBack] {
        let (fs, v, _clock) = twelve_blocks_out_of_the_window();
        // The folded segment: the pool syncs the new ones it prepares.
        fs.inject(Fault::once_after(op, 0, EIO).on_paths_containing("00000000.seg"));
        let err = v.fold_now().expect_err("the segment's sync failed");
        assert!(matches!(err, Error::Failed(_)), "{op:?}: {err}");
        assert!(
            matches!(v.write(0, &[0u8; 512]), Err(Error::Failed(_))),
            "{op:?}: the volume takes no more writes"
        );
        let again = v.fold_now().expect_err("no fold on a failed volume");
        assert!(matches!(again, Error::Failed(_)), "{op:?}: {again}");
        assert_eq!(v.stats().base_lsn, 0, "{op:?}: nothing folded");
    }
}

#[test]
fn a_view_pins_its_history_until_it_is_dropped() {
    let (_fs, v, clock) = clocked();
    let old = v.write(0, &[1u8; 4096]).expect("write");
    for i in 1..20u64 {
        v.write(0, &pattern(i as u8, 16384)).expect("overwrite");
    }
    let view = v.view(&lsn(old)).expect("view");
    clock.advance(11 * SEC);
    let folded = v.fold_now().expect("fold");
    assert!(
        folded.as_ref().is_none_or(|r| r.base_lsn <= old),
        "{folded:?}"
    );
    let mut buf = vec![0u8; 4096];
    view.read(0, &mut buf).expect("read");
    assert_eq!(buf, vec![1u8; 4096], "the view still shows lsn {old}");
    drop(view);
    let report = v
        .fold_now()
        .expect("fold")
        .expect("a fold once the view is gone");
    assert_eq!(report.base_lsn, v.last_lsn());
    assert_eq!(read(&v, 0, 16384), pattern(19, 16384));
}

#[test]
fn a_writable_view_takes_writes_and_throws_them_away() {
    let (fs, v) = new_volume();
    let before = v.write(0, &[1u8; 8192]).expect("write");
    v.write(0, &[2u8; 8192]).expect("write");
    let view = v.view_writable(&lsn(before)).expect("view");
    assert!(!view.read_only());
    view.write(4096, &[3u8; 4096]).expect("write to the view");
    view.write_zeroes(0, 512).expect("zero in the view");
    let mut buf = vec![0u8; 8192];
    view.read(0, &mut buf).expect("read");
    assert_eq!(buf[..512], [0u8; 512]);
    assert_eq!(buf[512..4096], [1u8; 3584]);
    assert_eq!(buf[4096..], [3u8; 4096]);
    assert_eq!(
        read(&v, 0, 8192),
        vec![2u8; 8192],
        "the live disk is untouched"
    );
    let scratch = Path::new("/vol/scratch");
    assert_eq!(fs.list_dir(scratch).expect("ls").len(), 1);
    drop(view);
    assert!(
        fs.list_dir(scratch).expect("ls").is_empty(),
        "overlay removed"
    );

    let ro = v.view(&lsn(before)).expect("view");
    let err = ro.write(0, &[0u8; 512]).expect_err("read-only");
    assert!(matches!(err, Error::ReadOnly(_)), "{err}");
}

#[test]
fn materialize_writes_a_sparse_image_equal_to_the_view() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("vol");
    let mut settings = VolumeSettings::new(64 << 20);
    settings.segment_size = 1 << 20;
    settings.journal_max = 64 << 20;
    settings.journal_warn = 32 << 20;
    let storage = create_on_disk(&dir, &settings);
    let (v, _) = Volume::open(storage, &dir, OpenOptions::default()).expect("open");
    let at = v.write(1 << 20, &pattern(1, 65536)).expect("write");
    v.write_zeroes(1 << 20, 4096, true).expect("zero");
    v.write(40 << 20, &pattern(2, 4096)).expect("write");
    let out = tmp.path().join("at.raw");
    let mut calls = Vec::new();
    let got = v
        .materialize(&lsn(at), &out, &mut |done, all| calls.push((done, all)))
        .expect("materialize");
    assert_eq!(got, at);
    let image = std::fs::read(&out).expect("image");
    assert_eq!(image.len(), 64 << 20);
    assert_eq!(image[1 << 20..(1 << 20) + 65536], pattern(1, 65536)[..]);
    assert!(image[40 << 20..(40 << 20) + 4096].iter().all(|&b| b == 0));
    let (done, all) = *calls.last().expect("progress");
    assert_eq!(done, all, "progress ends at 100%");
    assert!(all >= 64 << 20, "progress counts the whole disk: {all}");
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress never goes back"
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).expect("stat").blocks() * 512;
    assert!(allocated < 1 << 20, "sparse: {allocated} bytes allocated");
    let err = v
        .materialize(&lsn(at), &out, &mut |_, _| {})
        .expect_err("the output exists");
    assert!(matches!(err, Error::Exists(_)), "{err}");
}

#[test]
fn bookmarks_name_moments_and_survive_reopening() {
    let (fs, v, clock) = clocked();
    v.write(0, &[1u8; 512]).expect("write");
    // Nothing else to flush: the bookmark must make itself durable.
    v.flush().expect("flush");
    let b = v.bookmark("before-upgrade", false).expect("bookmark");
    v.write(0, &[2u8; 512]).expect("write");
    // The flag of a bookmark taken with the guest's filesystems frozen.
    let q = v.bookmark("quiesced", true).expect("bookmark");
    assert!(q.app_consistent && !b.app_consistent);
    let dup = v.bookmark("before-upgrade", true).expect_err("same name");
    assert!(dup.to_string().contains("already exists"), "{dup}");
    for bad in ["", "has space", &"x".repeat(129)] {
        let err = v.bookmark(bad, false).expect_err(bad);
        assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    }
    let at = PointInTime::Bookmark("before-upgrade".into());
    assert_eq!(view_bytes(&v, &at, 0, 512), vec![1u8; 512]);
    drop(v);
    // Durable when it returns: any power loss keeps it.
    for seed in 0..16 {
        let v = reopen(&fs.crash(seed), &clock);
        assert_eq!(v.bookmarks(), vec![b.clone(), q.clone()], "crash {seed}");
    }
    let v = reopen(&fs, &clock);
    assert_eq!(v.bookmarks(), vec![b.clone(), q.clone()]);
    assert_eq!(v.timeline().bookmarks, vec![b, q]);
    assert_eq!(view_bytes(&v, &at, 0, 512), vec![1u8; 512]);
    let err = v
        .view(&PointInTime::Bookmark("nope".into()))
        .expect_err("unknown");
    assert!(matches!(err, Error::NoSuchBookmark(_)), "{err}");
    // Once folded, the bookmark leaves with its history.
    clock.advance(11 * SEC);
    v.fold_now().expect("fold");
    assert!(v.bookmarks().is_empty());
}

#[test]
fn a_revert_is_a_record_that_keeps_history_and_can_be_undone() {
    let (fs, v) = new_volume();
    let a = v.write(0, &[1u8; 512]).expect("write");
    let b = v.write(0, &[2u8; 512]).expect("write");
    v.write(512, &[3u8; 512]).expect("write");
    let revert = v.revert(&lsn(a)).expect("revert");
    assert_eq!(read(&v, 0, 1024), [vec![1u8; 512], vec![0u8; 512]].concat());
    // The history before the revert is still there.
    assert_eq!(view_bytes(&v, &lsn(b), 0, 512), vec![2u8; 512]);
    // Undo: revert to just before the revert.
    v.revert(&lsn(revert - 1)).expect("undo");
    assert_eq!(read(&v, 0, 1024), [vec![2u8; 512], vec![3u8; 512]].concat());
    drop(v);
    let v = open(&fs);
    assert_eq!(read(&v, 0, 1024), [vec![2u8; 512], vec![3u8; 512]].concat());
    assert_eq!(view_bytes(&v, &lsn(revert), 0, 512), vec![1u8; 512]);
}

#[test]
fn moments_outside_the_window_are_refused_with_its_bounds() {
    let (_fs, v, clock) = clocked();
    v.write(0, &[1u8; 512]).expect("write");
    clock.advance(30 * SEC);
    // The segment holding lsn 1 is idle and expired: it is sealed and folded.
    assert_eq!(v.fold_now().expect("fold").map(|r| r.base_lsn), Some(1));
    v.write(0, &[2u8; 512]).expect("write");
    let timeline = v.timeline();
    assert_eq!(timeline.start_lsn, 1);
    assert_eq!(timeline.window_configured, Duration::from_secs(10));
    assert!(timeline.window_effective >= Duration::from_secs(10));
    for at in [
        PointInTime::Time(T0 - 1),
        PointInTime::Ago(Duration::from_secs(3600)),
        lsn(0),
        lsn(99),
    ] {
        let err = v.view(&at).expect_err("outside");
        let text = err.to_string();
        assert!(matches!(err, Error::OutsideWindow { .. }), "{text}");
        assert!(text.contains("outside the history window"), "{text}");
        assert!(
            text.contains(&rewind_journal::format_ns(timeline.window_start_ns)),
            "{text}"
        );
    }
    let future = PointInTime::Time(rewind_journal::Clock::now_ns(clock.as_ref()) + 60 * SEC);
    let err = v.view(&future).expect_err("future");
    assert!(err.to_string().contains("in the future"), "{err}");
    assert_eq!(
        view_bytes(&v, &PointInTime::Ago(Duration::ZERO), 0, 512),
        vec![2u8; 512]
    );
}

#[test]
fn a_view_reads_steadily_while_the_live_disk_is_written() {
    let (_fs, v) = new_volume();
    let at = v.write(0, &pattern(1, 65536)).expect("write");
    let view = v.view(&lsn(at)).expect("view");
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for i in 2..200u64 {
                v.write((i % 16) * 4096, &pattern(i as u8, 4096))
                    .expect("live write");
            }
        });
        let mut buf = vec![0u8; 65536];
        while !writer.is_finished() {
            view.read(0, &mut buf).expect("view read");
            assert!(
                buf == pattern(1, 65536),
                "the view changed under live writes"
            );
        }
    });
    assert_eq!(read(&v, 0, 4096), pattern(192, 4096));
}

/// A journal of several index chunks (4096 records each) on a real file
/// system: the applier pages them to an unnamed file in the volume's
/// directory, recovery does the same at the next open, and reads at
/// moments inside them see the disk as it was.
#[test]
fn a_long_journal_pages_its_index_to_a_file_and_reads_the_past_through_it() {
    const PAGE: usize = 4096;
    const PAGES: u64 = 256;
    const WRITES: u64 = 3 * 4096 + 700;
    const MS: u64 = 1_000_000;
    /// The page file's first region (record_index/pages.rs).
    const REGION: u64 = 96 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vol");
    let settings = VolumeSettings {
        size: PAGES * PAGE as u64,
        segment_size: 4 << 20,
        journal_max: 256 << 20,
        journal_warn: 200 << 20,
        ..VolumeSettings::new(PAGES * PAGE as u64)
    };
    let storage = create_on_disk(&dir, &settings);
    let clock = Arc::new(ManualClock::new(T0));
    let open = || {
        let options = OpenOptions {
            clock: clock.clone(),
            // The applier's passes page the index out.
            fold_interval: Some(Duration::from_millis(10)),
            ..options()
        };
        Volume::open(storage.clone(), &dir, options).expect("open")
    };
    // Sizes of the unnamed files this process has open in the directory.
    let page_files = || -> Vec<u64> {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(|e| {
                let fd = e.ok()?.path();
                let target = std::fs::read_link(&fd).ok()?;
                let unnamed = target.to_string_lossy().ends_with("(deleted)");
                (target.starts_with(&dir) && unnamed).then(|| std::fs::metadata(&fd).ok())?
            })
            .map(|m| m.len())
            .collect()
    };
    let seed = |i: u64| (i % 251) as u8;
    let v = open().0;
    for i in 0..WRITES {
        clock.advance(MS);
        v.write((i % PAGES) * PAGE as u64, &pattern(seed(i), PAGE))
            .expect("write");
    }
    wait_until("the applier pages the index out", || {
        page_files() == [REGION]
    });
    // Right after write i, at its moment: its page holds it, and the next
    // write's page still holds what was there before that write.
    let check = |v: &Volume| {
        for i in [5, 4095, 4096, 4100, 8191, 9000, 12_300, WRITES - 2] {
            let at = PointInTime::Time(T0 + (i + 1) * MS);
            let mine = view_bytes(v, &at, (i % PAGES) * PAGE as u64, PAGE);
            assert!(mine == pattern(seed(i), PAGE), "write {i} at its moment");
            let next = i + 1;
            let before = view_bytes(v, &at, (next % PAGES) * PAGE as u64, PAGE);
            let want = match next.checked_sub(PAGES) {
                Some(j) => pattern(seed(j), PAGE),
                None => vec![0; PAGE],
            };
            assert!(before == want, "page of write {next} before it");
        }
    };
    check(&v);
    v.close().expect("close");
    assert_eq!(page_files(), [] as [u64; 0], "gone with the volume");
    // Recovery pages out as it scans; after a checkpoint, the applier
    // pages out what it read, once the volume is open.
    for from_checkpoint in [false, true] {
        let (v, report) = open();
        assert_eq!(report.records_from_checkpoint > 0, from_checkpoint);
        wait_until("the index paged again after the reopen", || {
            page_files() == [REGION]
        });
        check(&v);
        v.checkpoint().expect("checkpoint");
        v.close().expect("close");
    }
}
