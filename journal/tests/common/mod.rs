//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rewind_journal::fault::FaultStorage;
use rewind_journal::{
    BaseImage, ManualClock, OpenOptions, OsStorage, RetryPolicy, Storage, Volume, VolumeSettings,
};

pub const DIR: &str = "/vol";

/// A small volume: 1 MiB disk, 64 KiB segments, so tests cross segments.
pub fn small_settings() -> VolumeSettings {
    VolumeSettings {
        size: 1 << 20,
        segment_size: 64 << 10,
        journal_max: 64 << 20,
        journal_warn: 48 << 20,
        reserve_segments: 2,
        ..VolumeSettings::new(1 << 20)
    }
}

pub fn create(storage: &dyn Storage, settings: &VolumeSettings) {
    Volume::create(
        storage,
        Path::new(DIR),
        settings,
        BaseImage::Empty,
        &mut |_, _| {},
    )
    .expect("create volume");
}

pub fn options() -> OpenOptions {
    OpenOptions {
        clock: Arc::new(ManualClock::new(1_700_000_000_000_000_000)),
        retry: RetryPolicy {
            max_hold: Duration::from_millis(200),
            first_backoff: Duration::from_millis(1),
        },
        // Tests fold with `fold_now`; the hard limit still folds by itself.
        fold_interval: None,
        ..OpenOptions::default()
    }
}

/// An empty volume on the real file system, at `tmp`/vol.
pub fn create_with(tmp: &Path, settings: &VolumeSettings) -> PathBuf {
    let dir = tmp.join("vol");
    Volume::create(
        OsStorage::shared().as_ref(),
        &dir,
        settings,
        BaseImage::Empty,
        &mut |_, _| {},
    )
    .expect("create");
    dir
}

pub fn open(storage: &FaultStorage) -> Volume {
    Volume::open(storage.arc(), Path::new(DIR), options())
        .expect("open volume")
        .0
}

pub fn new_volume() -> (FaultStorage, Volume) {
    let fs = FaultStorage::new();
    create(&fs, &small_settings());
    let v = open(&fs);
    (fs, v)
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

pub fn read(v: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    v.read(offset, &mut buf).expect("read");
    buf
}

/// Polls `cond` until it holds, failing after 10 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// The path of segment file `id` of the volume in `dir` (a real one).
pub fn segment_file(dir: &Path, id: u32) -> PathBuf {
    dir.join("journal").join(format!("{id:08}.seg"))
}

/// Flips a bit of the byte at `at` in the file at `path` (a real one).
pub fn flip(path: &Path, at: u64) {
    xor_byte(path, at, 0x10);
}

/// Xors the byte at `at` of the file at `path` (a real one) with `mask`.
pub fn xor_byte(path: &Path, at: u64, mask: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= mask;
    f.write_all_at(&b, at).expect("write");
}
