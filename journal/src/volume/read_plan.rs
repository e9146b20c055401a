//! Reads the caller carries out itself: which bytes of which file fill
//! which part of a read's buffer. The daemon submits them to the kernel
//! (io_uring) and takes the next request meanwhile.
//!
//! Invariant: every file a plan names stays open, and every journal
//! segment it names stays out of reuse, until the plan is dropped (it
//! holds an `Arc` to each, which the pool waits for before it recycles a
//! folded segment). So a plan read after a fold still finds the bytes it
//! was made for, as [`Volume::read`] does.

use std::os::fd::RawFd;
use std::sync::Arc;

use smallvec::SmallVec;

use super::{Inner, Volume};
use crate::error::{Error, Result};
use crate::extent_map::{Pieces, Source};
use crate::format::{check_range, SECTOR};
use crate::pool::Segment;
use crate::storage::StorageFile;

/// One file read of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRead {
    /// Where its bytes go in the read's buffer.
    pub at: usize,
    pub len: usize,
    /// Open while the plan lives.
    pub fd: RawFd,
    /// The file opened with O_DIRECT, if it can be (open while the plan
    /// lives).
    pub direct_fd: Option<RawFd>,
    /// Where they are in that file.
    pub offset: u64,
}

/// Where every byte of one read is, with the files pinned.
#[derive(Debug, Default)]
pub struct ReadPlan {
    reads: SmallVec<[FileRead; 2]>,
    /// Parts of the buffer that read as zeroes: (at, len).
    zeroes: SmallVec<[(usize, usize); 1]>,
    files: SmallVec<[Arc<dyn StorageFile>; 2]>,
    segments: SmallVec<[Arc<Segment>; 2]>,
}

impl ReadPlan {
    /// The file reads, in buffer order.
    pub fn reads(&self) -> &[FileRead] {
        &self.reads
    }

    /// The parts of the read no file holds, which read as zeroes: (at, len).
    pub fn zeroes(&self) -> &[(usize, usize)] {
        &self.zeroes
    }
}

impl Volume {
    /// Plans a read of `len` bytes at `offset` (both multiples of 512), for
    /// a caller that reads the files itself; None where the storage has no
    /// file descriptors (in-memory test storage). Reading the plan's files
    /// and zeroing its holes gives what [`Volume::read`] gives.
    pub fn plan_read(&self, offset: u64, len: u64) -> Result<Option<ReadPlan>> {
        self.inner.plan_read(offset, len)
    }
}

impl Inner {
    fn plan_read(&self, offset: u64, len: u64) -> Result<Option<ReadPlan>> {
        check_range(offset, len, self.config.size).map_err(Error::InvalidRequest)?;
        let mut pieces = Pieces::new();
        self.map.lookup(offset / SECTOR, len / SECTOR, &mut pieces);
        let first = offset / SECTOR;
        let mut plan = ReadPlan::default();
        for piece in &pieces {
            let at = ((piece.start - first) * SECTOR) as usize;
            let len = (piece.sectors * SECTOR) as usize;
            let base = (self.base.clone(), piece.start * SECTOR);
            let (file, offset) = match piece.source {
                Source::Zero => {
                    plan.zeroes.push((at, len));
                    continue;
                }
                Source::Journal { segment, sector } => match self.pool.segment(segment) {
                    Some(seg) => {
                        let file = seg.file.clone();
                        plan.segments.push(seg);
                        (file, u64::from(sector) * SECTOR)
                    }
                    // Folded since the lookup: base.img holds the data now.
                    None => base,
                },
                Source::Base => base,
            };
            let Some(fd) = file.raw_fd() else {
                return Ok(None);
            };
            plan.reads.push(FileRead {
                at,
                len,
                fd,
                direct_fd: file.direct_fd(),
                offset,
            });
            if !plan.files.iter().any(|f| Arc::ptr_eq(f, &file)) {
                plan.files.push(file);
            }
        }
        Ok(Some(plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::FaultStorage;
    use crate::storage::OsStorage;
    use crate::{BaseImage, ManualClock, OpenOptions, VolumeSettings};
    use std::os::unix::fs::FileExt;

    fn settings() -> VolumeSettings {
        VolumeSettings {
            segment_size: 1 << 20,
            journal_max: 16 << 20,
            journal_warn: 8 << 20,
            window: std::time::Duration::from_secs(60),
            ..VolumeSettings::new(1 << 20)
        }
    }

    /// Carries out `plan` with pread, as the daemon's ring does.
    fn carry_out(plan: &ReadPlan, len: usize) -> Vec<u8> {
        let mut buf = vec![0xee; len];
        for &(at, n) in plan.zeroes() {
            buf[at..at + n].fill(0);
        }
        for r in plan.reads() {
            // SAFETY: the plan keeps the descriptor open; ManuallyDrop
            // keeps this File from closing it.
            let file = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(r.fd)
            });
            file.read_exact_at(&mut buf[r.at..r.at + r.len], r.offset)
                .expect("read");
        }
        buf
    }

    #[test]
    fn a_plan_reads_what_read_reads_before_and_after_a_fold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = OsStorage::shared();
        Volume::create(
            storage.as_ref(),
            dir.path(),
            &settings(),
            BaseImage::Empty,
            &mut |_, _| {},
        )
        .expect("create");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
        let options = OpenOptions {
            clock: clock.clone(),
            ..OpenOptions::default()
        };
        let (volume, _) = Volume::open(storage, dir.path(), options).expect("open");
        volume.write(4096, &[7; 8192]).expect("write");
        volume.write(8192, &[9; 512]).expect("write");
        let planned_at = volume.last_lsn();
        // Journal, journal, base (zeroes that base.img holds as a hole).
        let plan = volume.plan_read(0, 16384).expect("plan").expect("fds");
        let mut want = vec![0u8; 16384];
        volume.read(0, &mut want).expect("read");
        assert_eq!(carry_out(&plan, 16384), want);
        assert!(plan.reads().len() >= 2, "{plan:?}");

        // A plan made before a fold keeps its segments: still the same bytes.
        // The planned records leave the window, the journal moves on past
        // their segment (1.5 MiB), and those writes leave it too.
        clock.advance(120_000_000_000);
        for _ in 0..24 {
            volume.write(65536, &[1; 65536]).expect("write");
        }
        clock.advance(120_000_000_000);
        volume.write(65536, &[2; 512]).expect("write");
        volume.flush().expect("flush");
        volume.fold_now().expect("fold");
        assert!(volume.stats().base_lsn >= planned_at, "folded");
        assert_eq!(carry_out(&plan, 16384), want);
        drop(plan);
        let after = volume.plan_read(0, 16384).expect("plan").expect("fds");
        assert_eq!(carry_out(&after, 16384), want);
    }

    #[test]
    fn storage_without_descriptors_plans_nothing_and_bad_ranges_are_refused() {
        let fs = FaultStorage::new();
        Volume::create(
            &fs,
            std::path::Path::new("/v"),
            &settings(),
            BaseImage::Empty,
            &mut |_, _| {},
        )
        .expect("create");
        let (volume, _) =
            Volume::open(fs.arc(), std::path::Path::new("/v"), OpenOptions::default())
                .expect("open");
        assert!(volume.plan_read(0, 4096).expect("plan").is_none());
        assert!(volume.plan_read(100, 4096).is_err(), "unaligned");
        assert!(volume.plan_read(1 << 20, 512).is_err(), "past the end");
    }
}
