//! Taking checkpoints (the format and how recovery uses one: recovery.rs
//! and recovery/checkpoint.rs).
//!
//! A checkpoint holds the record index and the extent map as of the
//! durable lsn C, and the segments holding those records. The applier takes one when the journal
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
//! - the index, base, segments and map are read under the fold lock, so
//!   they describe one state. The map is the live one as of C: every
//!   record up to C is in it (they completed before the sync that made
//!   them durable), and where later records wrote already, the records up
//!   to C are replayed again ([`map_at`]). A revert after C replaced the
//!   whole map: no checkpoint then, the next one. A fold or a cut after that makes the file older
//!   than the journal: recovery trims what was folded, and finds what a
//!   cut erased missing from the segments (checkpoint_rejected).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{lock, Inner, Volume};
use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Written};
use crate::pool::segment_name;
use crate::record_index::{Bookmark, Snapshot};
use crate::recovery::checkpoint::{encode_to, Covered, Taken, CHECKPOINT_FILE};

/// The last checkpoint this volume wrote or recovered from.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Checkpointed {
    /// The lsn it holds records up to (0: none).
    pub lsn: u64,
    /// Its size in bytes (0 when not known).
    pub bytes: u64,
    /// After a failed one, the applier tries again only from then on.
    pub retry_at: Option<Instant>,
}

/// How long the applier waits after a failed checkpoint (the full disk or
/// the IO error behind it is reported elsewhere; once a minute is enough).
const RETRY_AFTER: Duration = Duration::from_secs(60);

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
    extents: Vec<Written>,
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
        let waiting = last.retry_at.is_some_and(|at| Instant::now() < at);
        if self.failure.get().is_some() || (occasion == Occasion::Periodic && waiting) {
            return;
        }
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
            lock(&self.checkpointed).retry_at = Some(Instant::now() + RETRY_AFTER);
            tracing::warn!(
                event = crate::events::CHECKPOINT_FAILED,
                volume = %self.config.uuid,
                dir = %self.dir.display(),
                error = %e,
                "writing a checkpoint failed (the applier tries again in a minute); the next \
                 open verifies more of the journal"
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
        let taken = Taken {
            volume: self.config.uuid,
            base_timestamp: state.base_timestamp,
            segments: &state.segments,
            bookmarks: &state.bookmarks,
            entries: &state.entries,
            extents: &state.extents,
        };
        let path = self.dir.join(CHECKPOINT_FILE);
        let mut bytes = 0;
        self.storage
            .write_file_atomic_with(&path, &mut |file| {
                let mut at = 0;
                bytes = encode_to(&taken, &mut |piece| {
                    file.write_all_at(&[piece], at)?;
                    at += piece.len() as u64;
                    Ok(())
                })?;
                Ok(())
            })
            .map_err(Error::io(|| format!("writing {}", path.display())))?;
        drop(state);
        *last = Checkpointed {
            lsn,
            bytes,
            retry_at: None,
        };
        tracing::debug!(volume = %self.config.uuid, lsn, bytes, "checkpoint written");
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
        let mut state = State {
            base_timestamp: index.timestamp(base),
            segments,
            bookmarks: index
                .bookmarks()
                .iter()
                .filter(|b| b.lsn <= lsn)
                .cloned()
                .collect(),
            entries: index.snapshot(lsn),
            extents: Vec::new(),
        };
        drop(index);
        // Record C itself says its epoch (the highest up to it); recovery
        // does not read the Epoch records before its segment, so
        // volume.json must name that epoch already.
        let seg = &used[state.segments.len() - 1];
        let read = seg
            .read_headers(self.config.segment_size, holder.first_lsn, lsn..=lsn)
            .map_err(Error::io(|| {
                format!("reading {}", segment_name(holder.file_id))
            }))?;
        let epoch = match read.as_deref() {
            Ok([(h, _)]) => h.epoch,
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
        let copy = self.map.written();
        if lock(&self.index).reverts().iter().any(|r| r.0 > lsn) {
            return Ok(None);
        }
        state.extents = map_at(copy, &state.entries, lsn, self.config.size);
        Ok(Some(state))
    }
}

/// The map at `lsn`, from `copy` of the live one, which holds every record
/// up to `lsn` and maybe parts of later ones: where those wrote, the
/// records up to `lsn` (`entries`) are replayed again. Works in `copy`'s
/// own memory (the map of a large disk is the checkpoint's largest part).
fn map_at(mut copy: Vec<Written>, entries: &Snapshot, lsn: u64, disk: u64) -> Vec<Written> {
    let newer: Vec<Written> = copy.iter().filter(|x| x.lsn > lsn).copied().collect();
    if newer.is_empty() {
        return copy;
    }
    copy.retain(|x| x.lsn <= lsn);
    // Sorted and disjoint, as the map's extents are.
    let first_after = |start: u64| newer.partition_point(|n| n.start + n.sectors <= start);
    let overlaps = |start: u64, sectors: u64| {
        let end = start.saturating_add(sectors);
        newer.get(first_after(start)).is_some_and(|n| n.start < end)
    };
    let redo = ExtentMap::new(disk);
    entries.replay_where(&redo, lsn, &overlaps);
    let mut parts = Vec::new();
    for x in redo.written() {
        let end = x.start + x.sectors;
        for n in newer[first_after(x.start)..]
            .iter()
            .take_while(|n| n.start < end)
        {
            let (s, e) = (x.start.max(n.start), end.min(n.start + n.sectors));
            parts.push(Written {
                start: s,
                sectors: e - s,
                lsn: x.lsn,
                target: x.target.advanced(s - x.start),
            });
        }
    }
    // Both sorted, and `parts` lie where `copy` has nothing: merged from
    // the back into the room at `copy`'s end.
    let Some(&filler) = parts.first() else {
        return copy;
    };
    let kept = copy.len();
    copy.resize(kept + parts.len(), filler);
    let (mut i, mut to) = (kept, copy.len());
    while let Some(&p) = parts.last() {
        to -= 1;
        if i > 0 && copy[i - 1].start > p.start {
            i -= 1;
            copy[to] = copy[i];
        } else {
            copy[to] = p;
            parts.pop();
        }
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent_map::Target;
    use crate::record_index::{Effect, Entry, RecordIndex};

    /// Neighbours one record wrote as one: the same content however split.
    fn joined(extents: Vec<Written>) -> Vec<Written> {
        let mut out: Vec<Written> = Vec::new();
        for x in extents {
            match out.last_mut() {
                Some(p)
                    if p.start + p.sectors == x.start
                        && p.lsn == x.lsn
                        && p.target.advanced(p.sectors) == x.target =>
                {
                    p.sectors += x.sectors
                }
                _ => out.push(x),
            }
        }
        out
    }

    #[test]
    fn the_map_at_an_lsn_undoes_what_later_records_wrote() {
        let disk_sectors = 64 * 2048;
        let mut index = RecordIndex::new(0, 0);
        let live = ExtentMap::new(disk_sectors * crate::format::SECTOR);
        for i in 1..=3000u64 {
            let effect = match i {
                900 => Effect::Revert { to: 300 },
                _ => Effect::Data {
                    start: (i * 7919) % disk_sectors,
                    sectors: 1 + i % 700,
                    target: if i % 4 == 0 {
                        Target::Zero
                    } else {
                        Target::Journal {
                            segment: i as u32,
                            sector: 8,
                        }
                    },
                },
            };
            index.push(Entry {
                timestamp: i,
                effect,
            });
        }
        index.snapshot(3000).replay_into(&live, 3000);
        for lsn in [2999, 2500, 1000, 900] {
            let want = ExtentMap::new(live.sectors() * crate::format::SECTOR);
            index.snapshot(lsn).replay_into(&want, lsn);
            let got = map_at(
                live.written(),
                &index.snapshot(lsn),
                lsn,
                live.sectors() * 512,
            );
            assert!(got
                .windows(2)
                .all(|w| w[0].start + w[0].sectors <= w[1].start));
            assert_eq!(joined(got), joined(want.written()), "at lsn {lsn}");
        }
    }
}
