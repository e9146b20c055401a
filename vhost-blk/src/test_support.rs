//! Volumes for unit tests: in memory, on the engine's fault-injecting storage.

use std::path::Path;

use rewind_journal::fault::FaultStorage;
use rewind_journal::{BaseImage, OpenOptions, Volume, VolumeSettings};

/// A new volume of `size` bytes on `fs`, with 1 MiB segments.
pub fn volume_on(fs: &FaultStorage, size: u64, options: OpenOptions) -> Volume {
    let settings = VolumeSettings {
        segment_size: 1 << 20,
        journal_max: 64 << 20,
        journal_warn: 32 << 20,
        ..VolumeSettings::new(size)
    };
    volume_with(fs, &settings, options)
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
