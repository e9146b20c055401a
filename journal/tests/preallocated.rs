//! A preallocated journal (`preallocate_journal`) on a real file system:
//! every segment file the limit allows is written out at creation, so
//! the journal never writes into a newly allocated or unwritten block, and
//! the pool keeps its files when their records are folded.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{create_with, options, pattern, read, segment_file, small_settings};
use rewind_journal::{
    BaseImage, ManualClock, OpenOptions, OsStorage, Storage, Volume, VolumeConfig, VolumeSettings,
};

const SEGMENT: u64 = 1 << 20;
const SEGMENTS: u64 = 8;

fn settings(preallocate_journal: bool) -> VolumeSettings {
    VolumeSettings {
        segment_size: SEGMENT,
        journal_max: SEGMENTS * SEGMENT,
        journal_warn: SEGMENTS * SEGMENT,
        window: Duration::from_secs(60),
        preallocate_journal,
        ..small_settings()
    }
}

fn create(tmp: &Path, preallocate_journal: bool) -> PathBuf {
    create_with(tmp, &settings(preallocate_journal))
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("journal"))
        .expect("journal dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

fn fully_written(dir: &Path, id: u32) -> bool {
    let f = OsStorage.open(&segment_file(dir, id)).expect("segment");
    f.fully_written(0, SEGMENT).expect("FIEMAP")
}

#[test]
fn creation_writes_out_every_segment_the_limit_allows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("vol");
    let mut reported = Vec::new();
    let config = Volume::create(
        OsStorage::shared().as_ref(),
        &dir,
        &settings(true),
        BaseImage::Empty,
        &mut |done, total| reported.push((done, total)),
    )
    .expect("create");
    assert!(config.preallocate_journal);
    let limit = SEGMENTS * SEGMENT;
    assert_eq!(reported.last(), Some(&(limit, limit)), "{reported:?}");

    let names = segment_files(&dir);
    assert_eq!(names.len() as u64, SEGMENTS, "{names:?}");
    for id in 0..SEGMENTS as u32 {
        assert!(fully_written(&dir, id), "segment {id} has unwritten blocks");
    }
    // The setting survives in volume.json.
    let json = std::fs::read_to_string(dir.join("volume.json")).expect("volume.json");
    let stored: VolumeConfig = serde_json::from_str(&json).expect("parse");
    assert!(stored.preallocate_journal, "{json}");

    // The volume opens over its prepared files and reads what it wrote.
    let (v, _) = Volume::open(OsStorage::shared(), &dir, options()).expect("open");
    v.write(4096, &pattern(3, 8192)).expect("write");
    v.flush().expect("flush");
    assert_eq!(read(&v, 4096, 8192), pattern(3, 8192));
    v.close().expect("close");
    assert_eq!(segment_files(&dir), names);
}

/// Writes past a few segments, lets them leave the window and folds them:
/// the journal's files before and after.
fn files_around_a_fold(preallocate_journal: bool) -> (Vec<String>, Vec<String>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path(), preallocate_journal);
    let before = segment_files(&dir);
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let open = OpenOptions {
        clock: clock.clone(),
        ..options()
    };
    let (v, _) = Volume::open(OsStorage::shared(), &dir, open).expect("open");
    // Four segments of 64 KiB records.
    for i in 0..64u64 {
        v.write((i % 16) * 65536, &pattern(i as u8, 65536))
            .expect("write");
    }
    v.flush().expect("flush");
    clock.advance(Duration::from_secs(120).as_nanos() as u64);
    v.write(0, &pattern(99, 4096))
        .expect("write after the window");
    v.fold_now().expect("fold").expect("something to fold");
    assert_eq!(read(&v, 0, 4096), pattern(99, 4096));
    v.close().expect("close");
    (before, segment_files(&dir))
}

#[test]
fn a_preallocated_pool_keeps_the_files_a_fold_frees() {
    let (before, after) = files_around_a_fold(true);
    assert_eq!(before.len() as u64, SEGMENTS);
    assert_eq!(after, before, "the very files written out at creation");
    let (before, after) = files_around_a_fold(false);
    assert!(before.is_empty(), "{before:?}");
    assert!(
        (after.len() as u64) < SEGMENTS,
        "a plain pool removes the files beyond its reserve: {after:?}"
    );
}

#[test]
fn open_replaces_a_spare_a_crash_cut_short_and_removes_strays() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path(), true);
    // As if the preallocation stopped in the middle of the last file.
    let last = segment_file(&dir, SEGMENTS as u32 - 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .and_then(|f| f.set_len(SEGMENT / 2))
        .expect("cut short");
    // Not a name the pool gives (it would open it as 00000003.seg).
    let stray = dir.join("journal").join("3.seg");
    std::fs::copy(segment_file(&dir, 3), &stray).expect("stray copy");

    let (v, _) = Volume::open(OsStorage::shared(), &dir, options()).expect("open");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while v.stats().journal_bytes < SEGMENTS * SEGMENT {
        assert!(std::time::Instant::now() < deadline, "{:?}", v.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    v.close().expect("close");
    // Removed at open, and made again, whole, by the pool's thread.
    assert_eq!(std::fs::metadata(&last).expect("last").len(), SEGMENT);
    assert!(!stray.exists(), "a file under another name is removed");
    let names = segment_files(&dir);
    assert_eq!(names.len() as u64, SEGMENTS, "{names:?}");
    for name in names {
        let id: u32 = name.trim_end_matches(".seg").parse().expect("id");
        assert!(fully_written(&dir, id), "{name} has unwritten blocks");
    }
}

#[test]
fn large_writes_go_straight_to_the_device_though_the_files_fill_the_limit() {
    // Bulk segments (FORMAT.md) need the journal's records far from the
    // limit; the preallocated files occupy all of it from the start.
    const BLOCK: u64 = 64 << 10;
    let settings = VolumeSettings {
        size: 64 << 20,
        journal_max: 128 << 20,
        journal_warn: 64 << 20,
        ..settings(true)
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create_with(tmp.path(), &settings);
    let (v, _) = Volume::open(OsStorage::shared(), &dir, options()).expect("open");
    let mut i = 0;
    while !v.bulk_writes() {
        assert!(i < 256 + 16, "still not bulk after {i} writes");
        v.write(i * BLOCK, &pattern(i as u8, BLOCK as usize))
            .expect("write");
        i += 1;
    }
    let s = v.stats();
    assert!(!s.over_warning, "spares are not counted: {s:?}");
    assert_eq!(read(&v, 0, BLOCK as usize), pattern(0, BLOCK as usize));
    v.close().expect("close");
}
