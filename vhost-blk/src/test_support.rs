//! Volumes for unit tests: in memory, on the engine's fault-injecting
//! storage, or in files.

use std::path::Path;

use rewind_journal::fault::FaultStorage;
use rewind_journal::{BaseImage, OpenOptions, OsStorage, Volume, VolumeSettings};

/// Settings of a test volume of `size` bytes: 1 MiB segments.
fn settings(size: u64) -> VolumeSettings {
    VolumeSettings {
        segment_size: 1 << 20,
        journal_max: 64 << 20,
        journal_warn: 32 << 20,
        ..VolumeSettings::new(size)
    }
}

/// A new volume of `size` bytes on `fs`, with 1 MiB segments.
pub fn volume_on(fs: &FaultStorage, size: u64, options: OpenOptions) -> Volume {
    volume_with(fs, &settings(size), options)
}

/// A new volume of `size` bytes in files under `dir` (the host's file
/// system, whose files the daemon's rings read).
pub fn os_volume(dir: &Path, size: u64) -> Volume {
    os_volume_with(dir, &settings(size))
}

/// A new volume with `settings` in files under `dir`.
pub fn os_volume_with(dir: &Path, settings: &VolumeSettings) -> Volume {
    Volume::create(&OsStorage, dir, settings, BaseImage::Empty, &mut |_, _| {}).expect("create");
    open_os_volume(dir)
}

/// The volume in `dir` on the host's file system, opened again.
pub fn open_os_volume(dir: &Path) -> Volume {
    Volume::open(OsStorage::shared(), dir, OpenOptions::default())
        .expect("open")
        .0
}

/// A new volume with `settings` on `fs`.
pub fn volume_with(fs: &FaultStorage, settings: &VolumeSettings, options: OpenOptions) -> Volume {
    let dir = Path::new("/vol");
    Volume::create(fs, dir, settings, BaseImage::Empty, &mut |_, _| {}).expect("create");
    Volume::open(fs.arc(), dir, options).expect("open").0
}

/// A new volume of `size` bytes on its own storage.
pub fn volume(size: u64) -> Volume {
    volume_on(&FaultStorage::new(), size, OpenOptions::default())
}
