//! Taking checkpoints (the format and how recovery uses one: recovery.rs
//! and recovery/checkpoint.rs).
//!
//! A checkpoint holds the record index up to the durable lsn C and the
//! segments holding those records. The applier takes one when the journal
//! grew by `OpenOptions::checkpoint_every` bytes of segments since the last
//! (and by at least 16 times that checkpoint's size, which bounds the
//! bytes checkpoints add to 1/16 of those appended), and `close` takes one
//! when anything is new; neither below `checkpoint_every` bytes of journal,
//! which a full recovery reads quickly.
//!
//! Invariants of what is written:
//! - C is durable (every record up to it was fdatasynced), so no crash
//!   takes a record the checkpoint stands for;
//! - volume.json already names the epoch of record C, so recovery needs
//!   none of the Epoch records it stands for (only the segment holding C
//!   and later ones are scanned);
//! - the index, base and segments are read under the fold lock, so they
//!   describe one state. A fold or a cut after that makes the file older
//!   than the journal: recovery trims what was folded, and finds what a
//!   cut erased missing from the segments (checkpoint_rejected).

use std::sync::atomic::Ordering;

use super::{lock, Inner, Volume};
use crate::error::{Error, Result};
use crate::format::{RecordHeader, RECORD_HEADER_SIZE};
use crate::pool::segment_name;
use crate::record_index::{Bookmark, Snapshot};
use crate::recovery::checkpoint::{encode, Covered, Taken, CHECKPOINT_FILE};

/// The last checkpoint this volume wrote or recovered from.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Checkpointed {
    /// The lsn it holds records up to (0: none).
    pub lsn: u64,
    /// Its size in bytes (0 when not known).
    pub bytes: u64,
}

/// When a checkpoint is considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Occasion {
    /// The applier's round.
    Periodic,
    /// `Volume::close`, after its flush.
    Close,
}

/// The live state contradicts itself: no checkpoint of it is written.
fn inconsistent(why: String) -> Error {
    Error::Io {
        context: "taking a checkpoint".into(),
        source: std::io::Error::other(why),
    }
}

/// A checkpoint's content, read under the fold lock.
struct State {
    base_timestamp: u64,
    segments: Vec<Covered>,
    bookmarks: Vec<Bookmark>,
    entries: Snapshot,
}

impl Volume {
    /// Writes a checkpoint of the durable records now (flushing first), so
    /// that the next open verifies only the records after them; returns the
    /// lsn it holds records up to, or `None` when there is nothing new or
    /// the state does not allow one (a resync or an epoch change under
    /// way, a failed volume).
    pub fn checkpoint(&self) -> Result<Option<u64>> {
        self.inner.take_checkpoint()
    }
}

impl Inner {
    /// Takes a checkpoint if `occasion` calls for one (see the module
    /// documentation); a failure is logged, never passed on.
    pub(super) fn checkpoint_if_due(&self, occasion: Occasion) {
        let Some(every) = self.checkpoint_every else {
            return;
        };
        let last = *lock(&self.checkpointed);
        let used = self.pool.used();
        let size = self.config.segment_size;
        let journal = used.len() as u64 * size;
        let uncovered = used
            .iter()
            .filter(|s| s.last_lsn.load(Ordering::Acquire) > last.lsn)
            .count() as u64
            * size;
        let due = match occasion {
            Occasion::Periodic => uncovered >= every.max(last.bytes.saturating_mul(16)),
            Occasion::Close => uncovered > 0,
        };
        if !due || journal < every {
            return;
        }
        if let Err(e) = self.take_checkpoint() {
            tracing::warn!(
                event = crate::events::CHECKPOINT_FAILED,
                volume = %self.config.uuid,
                dir = %self.dir.display(),
                error = %e,
                "writing a checkpoint failed; the next open verifies more of the journal"
            );
        }
    }

    pub(super) fn take_checkpoint(&self) -> Result<Option<u64>> {
        self.flush()?;
        // Held throughout: one checkpoint at a time, never an older one
        // after a newer.
        let mut last = lock(&self.checkpointed);
        let Some(state) = self.checkpoint_state(last.lsn)? else {
            return Ok(None);
        };
        let lsn = state.entries.last_lsn();
        let bytes = encode(&Taken {
            volume: self.config.uuid,
            base_timestamp: state.base_timestamp,
            segments: &state.segments,
            bookmarks: &state.bookmarks,
            entries: &state.entries,
        });
        drop(state);
        let path = self.dir.join(CHECKPOINT_FILE);
        self.storage
            .write_file_atomic(&path, &bytes)
            .map_err(Error::io(|| format!("writing {}", path.display())))?;
        *last = Checkpointed {
            lsn,
            bytes: bytes.len() as u64,
        };
        tracing::debug!(volume = %self.config.uuid, lsn, bytes = bytes.len(), "checkpoint written");
        Ok(Some(lsn))
    }

    /// What a checkpoint of the durable records holds, if it would hold
    /// more than the one at lsn `after`.
    fn checkpoint_state(&self, after: u64) -> Result<Option<State>> {
        let _no_fold = lock(&self.fold_lock);
        if lock(&self.resync).is_some() || self.failure.get().is_some() {
            return Ok(None);
        }
        let durable = self.durable_lsn.load(Ordering::Acquire);
        let used = self.pool.used();
        let index = lock(&self.index);
        let base = index.base_lsn();
        let lsn = durable.min(index.last_lsn());
        if lsn <= after.max(base) {
            return Ok(None);
        }
        let mut segments = Vec::new();
        let mut first = base + 1;
        for s in &used {
            if first > lsn {
                break;
            }
            let last = s.last_lsn.load(Ordering::Acquire);
            if last < first {
                return Err(inconsistent(format!(
                    "segment {} ends at lsn {last}, before lsn {first} that it should hold",
                    segment_name(s.id)
                )));
            }
            segments.push(Covered {
                file_id: s.id,
                seq: s.seq,
                first_lsn: first,
                last_lsn: last.min(lsn),
            });
            first = last + 1;
        }
        let Some(holder) = segments.last().copied().filter(|_| first > lsn) else {
            return Err(inconsistent(format!(
                "the journal's segments end before its durable lsn {lsn}"
            )));
        };
        let state = State {
            base_timestamp: index.timestamp(base),
            segments,
            bookmarks: index
                .bookmarks()
                .iter()
                .filter(|b| b.lsn <= lsn)
                .cloned()
                .collect(),
            entries: index.snapshot(lsn),
        };
        drop(index);
        // Record C itself says its epoch (the highest up to it); recovery
        // does not read the Epoch records before its segment, so
        // volume.json must name that epoch already.
        let file = &used[state.segments.len() - 1].file;
        let slot = self.config.segment_size - RECORD_HEADER_SIZE * (lsn - holder.first_lsn + 1);
        let mut b = [0u8; RECORD_HEADER_SIZE as usize];
        file.read_exact_at(&mut b, slot).map_err(Error::io(|| {
            format!("reading {}", segment_name(holder.file_id))
        }))?;
        let epoch = match RecordHeader::decode(&b) {
            Ok(h) if h.lsn == lsn && h.seq == holder.seq => h.epoch,
            _ => {
                return Err(inconsistent(format!(
                    "{} does not hold lsn {lsn} where the journal put it",
                    segment_name(holder.file_id)
                )))
            }
        };
        if epoch > lock(&self.persisted).epoch {
            return Ok(None);
        }
        Ok(Some(state))
    }
}
