//! The applier: folds records that left the history window into base.img.
//!
//! A fold takes whole segments from the old end of the journal, up to the
//! newest lsn F it may fold, and:
//! 1. makes their records durable (fdatasync; they are complete, as the
//!    completion prefix covers F);
//! 2. durably raises the horizon to F in `super`: from then on no state
//!    before F may be read, because base.img is about to change;
//! 3. replays records base_lsn+1..=F into a fresh map (coalescing: only the
//!    newest data of each sector is written) and writes it to base.img,
//!    then fdatasyncs base.img;
//! 4. durably sets base_lsn = F and drops the segments from `super`;
//! 5. removes extents with lsn <= F from the live map (base.img holds them
//!    now), trims the record index, and retires the segments.
//!
//! A crash anywhere repeats the fold from the old base_lsn: step 3 writes
//! the same data again (redo is idempotent), and the live disk never reads
//! base.img where the journal still holds newer data.
//!
//! What may be folded: segments whose every record is older than the window
//! (or, when the pool is at its hard limit, the oldest ones regardless:
//! a *forced* fold, reported loudly), never the segment being written, never
//! past a live view's lsn (unless forced: the view is expired first), and
//! never past the target of a Revert that stays in the journal (the revert
//! replays from there).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{lock, Inner};
use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Target};
use crate::format::SECTOR;
use crate::pool::{segment_name, Segment};

/// What one fold did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldReport {
    pub segments: usize,
    /// The new base: every record up to it is in base.img.
    pub base_lsn: u64,
    /// Runs of sectors written to base.img, and their bytes.
    pub extents: u64,
    pub bytes: u64,
    /// The hard limit made it fold records still inside the window.
    pub forced: bool,
}

/// A run of sectors to write into base.img.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    sectors: u64,
    target: Target,
}

/// Largest piece copied from a segment in one read.
const COPY_CHUNK: u64 = 1 << 20;

impl Inner {
    /// Runs one fold if anything may be folded.
    pub(super) fn fold(&self) -> Result<Option<FoldReport>> {
        let _one = lock(&self.fold_lock);
        // A resync is rewriting base.img (resync.rs).
        if lock(&self.resync).is_some() {
            return Ok(None);
        }
        let now = self.clock.now_ns();
        let window = u64::try_from(self.window().as_nanos()).unwrap_or(u64::MAX);
        let expiry = now.saturating_sub(window);
        let used = self.pool.used();
        let active = self.seal_if_idle(expiry, used.last().map(|s| s.id));
        let complete = self.completion.prefix();
        let overflow = self.pool.overflow() as usize;
        let oldest_view = self.oldest_pin();
        let replica_hold = self.replica_hold.load(Ordering::Acquire);

        let (count, upto, forced, snapshot, upto_ns, snapshot_base) = {
            let index = lock(&self.index);
            let mut chosen = (0, index.base_lsn(), false);
            for (i, seg) in used.iter().enumerate() {
                if Some(seg.id) == active {
                    break;
                }
                let end = seg.last_lsn.load(Ordering::Acquire).max(chosen.1);
                if end > complete {
                    break;
                }
                let expired = index.timestamp(end) < expiry;
                let must = i < overflow;
                let revert_needs_it = index.reverts().iter().any(|&(r, to)| r > end && to < end);
                let view_needs_it = oldest_view.is_some_and(|v| v < end);
                let replica_needs_it = replica_hold < end;
                if !(expired || must)
                    || revert_needs_it
                    || ((view_needs_it || replica_needs_it) && !must)
                {
                    break;
                }
                chosen = (i + 1, end, chosen.2 || !expired);
            }
            let (count, upto, forced) = chosen;
            if count == 0 {
                return Ok(None);
            }
            (
                count,
                upto,
                forced,
                index.snapshot(upto),
                index.timestamp(upto),
                index.base_lsn(),
            )
        };
        let folded = &used[..count];
        // Only the hard limit takes a fold past a view (`must`), whether or
        // not its records also left the window.
        if forced || oldest_view.is_some_and(|v| v < upto) {
            self.expire_views_before(upto);
        }
        if upto > replica_hold {
            // Durable before the records leave the journal: a crash after
            // this repeats the fold, and marking again is harmless.
            let from = replica_hold.max(snapshot_base);
            self.mark_out_of_sync(&snapshot, from, upto)?;
            tracing::error!(
                volume = %self.dir.display(),
                "journal at its hard limit: folding records up to lsn {upto} that the replica \
                 has not acknowledged (it holds lsn {replica_hold}); their chunks are marked \
                 out of sync for its resync"
            );
        }

        for seg in folded {
            self.retrying("syncing a segment to fold", || seg.file.sync_data())
                .map_err(Error::io(|| format!("syncing {}", segment_name(seg.id))))?;
        }
        // Synced, so durable (a trailing Flush record among them included).
        self.durable_lsn.fetch_max(upto, Ordering::AcqRel);
        self.pool.set_horizon(upto)?;
        let map = ExtentMap::new(self.config.size);
        snapshot.replay_into(&map, upto);
        let mut runs = Vec::with_capacity(map.len());
        map.for_each(|start, sectors, target| {
            runs.push(Run {
                start,
                sectors,
                target,
            })
        });
        drop(map);
        let runs = coalesce(runs);
        let bytes = self.write_runs(&runs, folded)?;
        self.retrying("syncing base.img", || self.base.sync_data())
            .map_err(Error::io(|| "syncing base.img"))?;

        let folded = self.pool.commit_fold(count, upto, upto_ns)?;
        self.map.remove_upto(upto);
        lock(&self.index).trim(upto);
        self.pool.retire(folded);

        let report = FoldReport {
            segments: count,
            base_lsn: upto,
            extents: runs.len() as u64,
            bytes,
            forced,
        };
        if forced {
            self.forced_folds.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                volume = %self.dir.display(),
                "journal at its hard limit of {} bytes: folded records newer than the \
                 {:?} window; history now starts at {}",
                self.config.journal_max,
                self.window(),
                crate::point::format_ns(upto_ns)
            );
        } else {
            tracing::debug!(volume = %self.dir.display(), ?report, "folded");
        }
        Ok(Some(report))
    }

    /// Seals the segment being written if its newest record is the
    /// journal's newest and has left the window, so it can be folded even
    /// though nothing is written any more. Returns the id of the segment
    /// that must not be folded (the one being written).
    fn seal_if_idle(&self, expiry: u64, newest: Option<u32>) -> Option<u32> {
        // A writer waiting at the hard limit holds the cursor: it is not
        // idle, and the newest segment is the one it wrote.
        let Ok(mut c) = self.cursor.try_lock() else {
            return newest;
        };
        let active = c.active.clone()?;
        let last = active.last_lsn.load(Ordering::Acquire);
        let idle = last != 0 && last + 1 == c.next_lsn;
        if idle && lock(&self.index).timestamp(last) < expiry {
            c.active = None;
            drop(c);
            self.pool.seal(active);
            return None;
        }
        Some(active.id)
    }

    /// Writes each run's data (as of the fold) into base.img; returns bytes.
    fn write_runs(&self, runs: &[Run], folded: &[Arc<Segment>]) -> Result<u64> {
        let mut buf = Vec::new();
        let mut bytes = 0;
        for run in runs {
            let at = run.start * SECTOR;
            let len = run.sectors * SECTOR;
            match run.target {
                Target::Zero => self
                    .retrying("zeroing base.img", || self.base.write_zeroes(at, len))
                    .map_err(Error::io(|| format!("zeroing base.img at {at}")))?,
                Target::Journal { segment, sector } => {
                    let seg = folded.iter().find(|s| s.id == segment).ok_or_else(|| {
                        Error::io(|| format!("folding into base.img at {at}"))(
                            std::io::Error::other(format!(
                                "a record of {} is newer than the fold",
                                segment_name(segment)
                            )),
                        )
                    })?;
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(COPY_CHUNK);
                        buf.resize(n as usize, 0);
                        let from = u64::from(sector) * SECTOR + done;
                        self.retrying("reading a segment to fold", || {
                            seg.file.read_exact_at(&mut buf, from)
                        })
                        .map_err(Error::io(|| format!("reading {}", segment_name(segment))))?;
                        self.retrying("writing base.img", || {
                            self.base.write_all_at(&[&buf], at + done)
                        })
                        .map_err(Error::io(|| format!("writing base.img at {}", at + done)))?;
                        done += n;
                    }
                }
            }
            bytes += len;
        }
        Ok(bytes)
    }
}

/// Merges runs that continue each other on the disk and in the journal
/// (sequential writes), so they are copied with one read and one write.
fn coalesce(runs: Vec<Run>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for run in runs {
        if let Some(last) = out.last_mut() {
            let follows = last.start + last.sectors == run.start;
            let same_place = match (last.target, run.target) {
                (Target::Zero, Target::Zero) => true,
                (
                    Target::Journal { segment, sector },
                    Target::Journal {
                        segment: next_segment,
                        sector: next_sector,
                    },
                ) => {
                    segment == next_segment
                        && u64::from(sector) + last.sectors == u64::from(next_sector)
                }
                _ => false,
            };
            if follows && same_place {
                last.sectors += run.sectors;
                continue;
            }
        }
        out.push(run);
    }
    out
}
