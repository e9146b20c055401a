//! Resync: a replica takes its primary's disk as of one lsn S (the sync
//! point) into base.img, then follows the journal from S + 1 (DESIGN.md,
//! "Folding with replicas, and resync").
//!
//! For a new replica (and one behind what its primary's journal still
//! holds) shipping records is not enough: the primary's base.img holds
//! data no record carries. The primary reads its disk as of S through a
//! view; the replica writes what differs straight into its own base.img.
//!
//! Crash safety: `<vol>/resync` (JSON, written atomically) names S and how
//! far base.img is known to hold S's data (`next_offset`, raised only
//! after base.img is synced). While it exists the volume is *resyncing*:
//! no point in time is readable (base.img is a mix of old and new), the
//! applier does not fold, and no record is taken. Finishing syncs
//! base.img, then commits `super` with base_lsn = S and no segment, then
//! removes the file; a crash in between leaves the file, so the resync is
//! resumed and finished again, which is idempotent.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{lock, Inner, Volume};
use crate::clock::warn_if_ahead;
use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Pieces, Source};
use crate::format::{check_range, SECTOR};
use crate::meta::{compact_epochs, read_small_file, EpochStart, Role, MAX_VOLUME_FILE};
use crate::record_index::RecordIndex;

pub const RESYNC_FILE: &str = "resync";
/// Bytes `<vol>/resync` may have: its epoch history becomes volume.json's
/// when the resync ends, and volume.json holds it, and more, in at most
/// this.
const MAX_RESYNC_FILE: u64 = MAX_VOLUME_FILE;

/// A resync under way: what `<vol>/resync` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncState {
    /// The lsn whose disk base.img is taking.
    pub sync_lsn: u64,
    /// Its time (ns since the Unix epoch).
    pub sync_ns: u64,
    /// The primary's epoch history up to the sync point.
    pub epoch_history: Vec<EpochStart>,
    /// base.img holds the sync point's data below this offset (durably).
    pub next_offset: u64,
}

impl Inner {
    fn resync_path(&self) -> PathBuf {
        self.dir.join(RESYNC_FILE)
    }

    fn store_resync(&self, state: &ResyncState) -> Result<()> {
        let path = self.resync_path();
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::BadMetadata {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.storage
            .write_file_atomic(&path, &bytes)
            .map_err(Error::io(|| format!("writing {}", path.display())))
    }

    /// Reads a resync left by an earlier run, if any.
    pub(super) fn load_resync(&self) -> Result<Option<ResyncState>> {
        let path = self.resync_path();
        let Some(bytes) = self.read_if_there(&path, MAX_RESYNC_FILE, "a resync file")? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::BadMetadata {
                path,
                reason: e.to_string(),
            })
    }

    /// The content of a small file of the volume, if it exists
    /// ([`read_small_file`]).
    pub(super) fn read_if_there(
        &self,
        path: &std::path::Path,
        max: u64,
        what: &str,
    ) -> Result<Option<Vec<u8>>> {
        if !self.storage.exists(path) {
            return Ok(None);
        }
        read_small_file(self.storage.as_ref(), path, max, what).map(Some)
    }

    /// Fails while a resync is under way: nothing is readable then.
    pub(super) fn check_not_resyncing(&self) -> Result<()> {
        match &*lock(&self.resync) {
            Some(state) => Err(Error::Resyncing {
                sync_lsn: state.sync_lsn,
                done: state.next_offset,
                size: self.config.size,
            }),
            None => Ok(()),
        }
    }

    fn resync_target(&self, offset: u64, length: u64) -> Result<()> {
        check_range(offset, length, self.config.size).map_err(Error::InvalidRequest)?;
        if lock(&self.resync).is_none() {
            return Err(Error::InvalidRequest("no resync is under way".into()));
        }
        Ok(())
    }
}

impl Volume {
    /// The resync under way, if any (one a crash interrupted included).
    pub fn resync_state(&self) -> Option<ResyncState> {
        lock(&self.inner.resync).clone()
    }

    /// Starts taking the disk as of `sync_lsn` (written at `sync_ns`, in
    /// the epochs `epoch_history` lists) into base.img, from offset 0. The
    /// volume's history ends here: views expire, nothing is readable and
    /// nothing folds until [`Volume::finish_resync`].
    pub fn begin_resync(
        &self,
        sync_lsn: u64,
        sync_ns: u64,
        epoch_history: Vec<EpochStart>,
    ) -> Result<()> {
        let inner = &self.inner;
        inner.check_failed()?;
        if self.role() == Role::Primary {
            return Err(Error::InvalidRequest(
                "this volume is a primary: a resync would replace its disk and history".into(),
            ));
        }
        if sync_lsn == u64::MAX {
            return Err(Error::InvalidRequest(format!(
                "a resync to lsn {sync_lsn}: no lsn could follow it"
            )));
        }
        warn_if_ahead(
            sync_ns,
            inner.clock.now_ns(),
            &inner.config.uuid,
            "a resync's sync point",
        );
        let _no_fold = lock(&inner.fold_lock);
        let state = ResyncState {
            sync_lsn,
            sync_ns,
            epoch_history,
            next_offset: 0,
        };
        inner.store_resync(&state)?;
        *lock(&inner.resync) = Some(state);
        inner.expire_views_before(u64::MAX);
        tracing::warn!(
            event = crate::events::RESYNC_STARTED,
            volume = %inner.config.uuid,
            dir = %inner.dir.display(),
            sync_lsn,
            "resync: taking the primary's disk as of lsn {sync_lsn}; no point in time is \
             readable until it ends"
        );
        Ok(())
    }

    /// Writes the sync point's `data` at `offset` of base.img.
    pub fn resync_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let inner = &self.inner;
        inner.resync_target(offset, data.len() as u64)?;
        inner
            .retrying("resync: writing base.img", || {
                inner.base.write_all_at(&[data], offset)
            })
            .map_err(Error::io(|| {
                format!("resync: writing base.img at {offset}")
            }))
    }

    /// Reads `buf.len()` bytes at `offset` of the disk as it was before
    /// the resync began (what a diff resync compares with the sync point).
    /// Meaningful only for ranges not yet taken: base.img changes as the
    /// resync goes, while the journal and its map stay as they were.
    pub fn resync_read_old(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.resync_target(offset, buf.len() as u64)?;
        self.read(offset, buf)
    }

    /// Keeps the disk's data before the resync at `offset..offset + length`
    /// (it equals the sync point's there): copies into base.img what of it
    /// the journal holds.
    pub fn resync_keep(&self, offset: u64, length: u64) -> Result<()> {
        let inner = &self.inner;
        inner.resync_target(offset, length)?;
        let mut pieces = Pieces::new();
        inner
            .map
            .lookup(offset / SECTOR, length / SECTOR, &mut pieces);
        let mut buf = Vec::new();
        for piece in &pieces {
            let (at, len) = (piece.start * SECTOR, piece.sectors * SECTOR);
            match piece.source {
                Source::Base => continue, // already in base.img
                Source::Zero => {
                    inner
                        .retrying("resync: zeroing base.img", || {
                            inner.base.write_zeroes(at, len)
                        })
                        .map_err(Error::io(|| format!("resync: zeroing base.img at {at}")))?;
                    continue;
                }
                Source::Journal { .. } => {}
            }
            buf.resize(len as usize, 0);
            inner.read_piece(
                piece,
                piece.start,
                &mut buf,
                |id| inner.pool.segment(id),
                false,
            )?;
            inner
                .retrying("resync: writing base.img", || {
                    inner.base.write_all_at(&[&buf], at)
                })
                .map_err(Error::io(|| format!("resync: writing base.img at {at}")))?;
        }
        Ok(())
    }

    /// Makes `length` bytes at `offset` of base.img zero (a hole where the
    /// filesystem can).
    pub fn resync_zero(&self, offset: u64, length: u64) -> Result<()> {
        let inner = &self.inner;
        inner.resync_target(offset, length)?;
        inner
            .retrying("resync: zeroing base.img", || {
                inner.base.write_zeroes(offset, length)
            })
            .map_err(Error::io(|| {
                format!("resync: zeroing base.img at {offset}")
            }))
    }

    /// Durably notes that base.img holds the data of sync point `sync_lsn`
    /// below `next_offset`, so an interrupted resync resumes there.
    pub fn resync_checkpoint(&self, sync_lsn: u64, next_offset: u64) -> Result<()> {
        let inner = &self.inner;
        let mut state = self.resync_to(sync_lsn)?;
        // Not retried (`Inner::sync_journal_file`): the resync fails and
        // starts again from its last durable checkpoint.
        inner
            .base
            .sync_data()
            .map_err(Error::io(|| "resync: syncing base.img"))?;
        state.next_offset = next_offset.min(inner.config.size);
        inner.store_resync(&state)?;
        *lock(&inner.resync) = Some(state);
        Ok(())
    }

    /// Ends the resync to `sync_lsn`: base.img is the disk at that sync
    /// point S, the journal starts empty after S, and the epoch is S's.
    pub fn finish_resync(&self, sync_lsn: u64) -> Result<()> {
        let inner = &self.inner;
        let state = self.resync_to(sync_lsn)?;
        // Checked before anything is committed: a resync file written by
        // an earlier build may name any lsn.
        let next_lsn = state.sync_lsn.checked_add(1).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "a resync to lsn {}: no lsn could follow it",
                state.sync_lsn
            ))
        })?;
        // Not retried, as above.
        inner
            .base
            .sync_data()
            .map_err(Error::io(|| "resync: syncing base.img"))?;
        let (s, ns) = (state.sync_lsn, state.sync_ns);
        let epoch = state.epoch_history.last().map_or(1, |e| e.epoch);
        {
            let _no_fold = lock(&inner.fold_lock);
            let mut c = lock(&inner.cursor);
            let mut index = lock(&inner.index);
            let used = inner.pool.used().len();
            let dropped = inner.pool.commit_fold(used, s, ns)?;
            c.active = None;
            c.next_lsn = next_lsn;
            c.proved_lsn = s;
            c.proof_owed = false;
            c.last_timestamp = ns;
            let pages = index.pages();
            *index = RecordIndex::new(s, ns);
            if let Some(pages) = pages {
                index.page_to(pages);
            }
            inner.map.replace_with(ExtentMap::new(inner.config.size));
            inner.completion.reset(s);
            inner.durable_lsn.store(s, Ordering::Release);
            inner.last_data_lsn.store(s, Ordering::Release);
            inner.epoch.store(epoch, Ordering::Release);
            drop(index);
            drop(c);
            inner.pool.retire(dropped);
        }
        inner.persist(|config| {
            config.epoch = epoch;
            config.epoch_history = state.epoch_history.clone();
            // The primary's is bounded; a resync file need not be.
            compact_epochs(&mut config.epoch_history);
        })?;
        let path = inner.resync_path();
        inner
            .storage
            .remove_file(&path)
            .and_then(|()| inner.storage.sync_dir(&inner.dir))
            .map_err(Error::io(|| format!("removing {}", path.display())))?;
        *lock(&inner.resync) = None;
        tracing::info!(
            volume = %inner.config.uuid,
            dir = %inner.dir.display(),
            sync_lsn = s,
            "resync done"
        );
        Ok(())
    }

    /// The resync under way, which must be the one to `sync_lsn` (a caller
    /// from an older session must not move a newer resync).
    fn resync_to(&self, sync_lsn: u64) -> Result<ResyncState> {
        match self.resync_state() {
            Some(state) if state.sync_lsn == sync_lsn => Ok(state),
            Some(state) => Err(Error::InvalidRequest(format!(
                "the resync under way is to lsn {}, not {sync_lsn}",
                state.sync_lsn
            ))),
            None => Err(Error::InvalidRequest("no resync is under way".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::fault::FaultStorage;
    use crate::storage::Storage;
    use crate::{BaseImage, OpenOptions, VolumeSettings};

    fn settings() -> VolumeSettings {
        VolumeSettings {
            segment_size: 64 << 10,
            journal_max: 64 << 20,
            journal_warn: 48 << 20,
            ..VolumeSettings::new(1 << 20)
        }
    }

    fn open(fs: &FaultStorage) -> Volume {
        Volume::open(fs.arc(), Path::new("/vol"), OpenOptions::default())
            .expect("open")
            .0
    }

    fn replica(fs: &FaultStorage) -> Volume {
        Volume::create_replica(fs, Path::new("/vol"), &settings(), uuid::Uuid::new_v4())
            .expect("create");
        open(fs)
    }

    fn history() -> Vec<EpochStart> {
        vec![EpochStart {
            epoch: 1,
            first_lsn: 1,
            node: 0,
        }]
    }

    #[test]
    fn a_resync_to_the_last_lsn_there_is_keeps_nothing() {
        let fs = FaultStorage::new();
        let v = replica(&fs);
        let err = v
            .begin_resync(u64::MAX, 1, history())
            .expect_err("no lsn follows u64::MAX");
        assert!(err.to_string().contains("no lsn could follow it"), "{err}");
        assert_eq!(v.resync_state(), None);
        assert!(!fs.exists(&Path::new("/vol").join(RESYNC_FILE)));

        // One left by an earlier build is refused before anything is
        // committed, and stays to be replaced by the next resync.
        let state = ResyncState {
            sync_lsn: u64::MAX,
            sync_ns: 1,
            epoch_history: history(),
            next_offset: v.size(),
        };
        v.inner.store_resync(&state).expect("store");
        *lock(&v.inner.resync) = Some(state.clone());
        let err = v.finish_resync(u64::MAX).expect_err("no lsn follows it");
        assert!(err.to_string().contains("no lsn could follow it"), "{err}");
        assert_eq!(v.stats().base_lsn, 0);
        assert_eq!(v.resync_state(), Some(state));
        v.begin_resync(0, 1, history()).expect("a sound resync");
        v.finish_resync(0).expect("finished");
        assert_eq!(v.resync_state(), None);
    }

    #[test]
    fn a_primary_takes_no_resync_and_no_shipped_records() {
        let fs = FaultStorage::new();
        Volume::create(
            &fs,
            Path::new("/vol"),
            &settings(),
            BaseImage::Empty,
            &mut |_, _| {},
        )
        .expect("create");
        let v = open(&fs);
        v.write(0, &[7; 512]).expect("write");
        v.flush().expect("flush");
        let last = v.last_lsn();
        let err = v.begin_resync(1, 1, history()).expect_err("a primary");
        assert!(
            err.to_string().contains("this volume is a primary"),
            "{err}"
        );
        assert_eq!(v.resync_state(), None);
        let records = v.read_shipped(1, 1 << 20).expect("read").records;
        let err = v.apply_shipped(&records).expect_err("a primary");
        assert!(
            err.to_string().contains("this volume is a primary"),
            "{err}"
        );
        assert_eq!(v.last_lsn(), last);
        let mut data = [0; 512];
        v.read(0, &mut data).expect("read");
        assert_eq!(data, [7; 512]);
    }
}
