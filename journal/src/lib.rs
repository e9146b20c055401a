//! rewind's volume engine: a disk is a base image plus a time-indexed,
//! crash-safe journal of every write since.
//!
//! A guest write is one sequential append to the journal; reads go through an
//! in-memory extent map to the journal or base.img. Every record carries its
//! lsn and time, so any lsn prefix of the journal is a crash-consistent state
//! of the disk. The on-disk format is in FORMAT.md next to this crate.
//!
//! ```no_run
//! use rewind_journal::{BaseImage, OpenOptions, OsStorage, Volume, VolumeSettings};
//! # fn main() -> Result<(), rewind_journal::Error> {
//! let storage = OsStorage::shared();
//! let dir = std::path::Path::new("/var/lib/rewind/vm1");
//! Volume::create(storage.as_ref(), dir, &VolumeSettings::new(1 << 30), BaseImage::Empty, &mut |_, _| {})?;
//! let (volume, report) = Volume::open(storage, dir, OpenOptions::default())?;
//! println!("{report}");
//! volume.write(0, &[0xab; 4096])?;
//! volume.flush()?;
//! let mut buf = [0u8; 4096];
//! volume.read(0, &mut buf)?;
//! volume.close()?;
//! # Ok(()) }
//! ```

mod clock;
mod completion;
mod error;
pub mod events;
mod extent_map;
pub mod fault;
mod format;
mod meta;
mod pace;
mod payload_buffer;
mod point;
mod pool;
mod record_index;
mod recovery;
mod storage;
mod superblock;
mod volume;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use extent_map::{ExtentMap, Piece, Pieces, Source, Target};
pub use format::{FORMAT_VERSION, LARGE_PAYLOAD, MAX_BOOKMARK_NAME, SECTOR};
pub use meta::{
    AttachRecord, EpochStart, Role, Seal, VolumeConfig, VolumeSettings, KEEP_EPOCHS, MAX_EPOCHS,
};
pub use payload_buffer::PayloadBuffer;
pub use point::{format_ns, PointInTime};
pub use record_index::Bookmark;
pub use recovery::{Discarded, LogEnd, RecoveryReport};
pub use storage::{page_cache_holds, ImportMethod, ImportMode, OsStorage, Storage, StorageFile};
pub use volume::{
    BaseImage, BranchInfo, FileRead, FoldReport, LayoutChoice, OpenOptions, OutOfSync, ReadPlan,
    ReleaseHeld, ResyncState, RetryPolicy, ShipBatch, ShippedRecord, Stats, Timeline, View, Volume,
    Written, OUT_OF_SYNC_CHUNK, SHIPPED_HEADER_SIZE,
};
