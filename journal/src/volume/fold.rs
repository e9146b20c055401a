//! The applier: folds records that left the history window into base.img.
//!
//! A fold takes whole segments from the old end of the journal, up to the
//! newest lsn F it may fold, and:
//! 1. makes their records durable (written back a piece at a time, then
//!    fdatasync; they are complete, as the completion prefix covers F);
//! 2. durably raises the horizon to F in `super`: from then on no state
//!    before F may be read, because base.img is about to change;
//! 3. replays records base_lsn+1..=F into a fresh map (coalescing: only the
//!    newest data of each sector is written) and writes it to base.img,
//!    writes that back to the disk a piece at a time, then fdatasyncs
//!    base.img: the durability point, before step 4 as ever;
//! 4. durably sets base_lsn = F and drops the segments from `super`;
//! 5. removes extents with lsn <= F from the live map (base.img holds them
//!    now), trims the record index, and retires the segments.
//!
//! Every piece copied and every piece written back counts as progress,
//! which a write held at the hard limit waits on (pool.rs): on a disk that
//! does few IOs a second, writing back a segment's thousands of scattered
//! records into base.img takes many seconds, none of them idle. A fold
//! that completes nothing (a device that does not answer) shows none, and
//! the held writes fail after the hold time.
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
use std::time::{Duration, Instant};

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

/// How often forced folds are logged: a full journal folds a piece every
/// few hundred milliseconds, which would be as many warnings (the
/// `forced_folds` counter and its metric count every one).
const FORCED_FOLD_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Forced folds not logged yet.
#[derive(Debug, Default)]
pub(super) struct ForcedFoldLog {
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl ForcedFoldLog {
    /// Notes a forced fold at `now`. Returns how many forced folds a line
    /// logged now covers (this one included), or None while the last line
    /// is less than [`FORCED_FOLD_LOG_INTERVAL`] old.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        self.due(now)
    }

    /// Takes the forced folds not logged yet once the last line is
    /// [`FORCED_FOLD_LOG_INTERVAL`] old; None if there are none or not yet.
    fn due(&mut self, now: Instant) -> Option<u64> {
        let recent = self
            .logged_at
            .is_some_and(|at| now.saturating_duration_since(at) < FORCED_FOLD_LOG_INTERVAL);
        if self.unlogged == 0 || recent {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl Inner {
    /// Logs the forced folds held back since the last such line once it is
    /// a minute old, so the end of a run of them is reported too (the
    /// applier calls this on each pass).
    pub(super) fn log_held_forced_folds(&self) {
        let due = lock(&self.forced_fold_log).due(Instant::now());
        if let Some(folds) = due {
            self.warn_forced_folds(folds);
        }
    }

    /// The one line for `folds` forced folds.
    fn warn_forced_folds(&self, folds: u64) {
        let (_, start_ns) = self.window_start(&lock(&self.index));
        tracing::warn!(
            event = crate::events::FORCED_FOLD,
            volume = %self.config.uuid,
            dir = %self.dir.display(),
            folds,
            "journal at its hard limit of {} bytes: folded records newer than the {:?} \
             window ({folds} forced folds since the last such line, at most one a minute); \
             history now starts at {}",
            self.config.journal_max,
            self.window(),
            crate::point::format_ns(start_ns)
        );
    }

    /// Runs one fold if anything may be folded.
    pub(super) fn fold(&self) -> Result<Option<FoldReport>> {
        self.fold_at_most(usize::MAX)
    }

    /// Runs one fold of at most `most` segments (at least one) if anything
    /// may be folded. The applier folds in such pieces, so that space comes
    /// back a piece at a time while the writers go on.
    pub(super) fn fold_at_most(&self, most: usize) -> Result<Option<FoldReport>> {
        let _one = lock(&self.fold_lock);
        // A failed volume's segments may hold pages a failed sync dropped:
        // a later sync would pass without them (`sync_journal_file`).
        self.check_failed()?;
        let started = Instant::now();
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
            for (i, seg) in used.iter().enumerate().take(most.max(1)) {
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
                event = crate::events::FORCED_FOLD_OUT_OF_SYNC,
                volume = %self.config.uuid,
                dir = %self.dir.display(),
                "journal at its hard limit: folding records up to lsn {upto} that the replica \
                 has not acknowledged (it holds lsn {replica_hold}); their chunks are marked \
                 out of sync for its resync"
            );
        }

        let journal_bytes = count as u64 * self.config.segment_size;
        let _pacing = self.pacer.folding(journal_bytes, started);
        let mut progress = FoldProgress {
            fold: folded[0].seq,
            at: 0,
            journal_bytes,
            started,
            total: 0,
            done: 0,
        };
        for seg in folded {
            self.write_back_segment(seg, &mut progress)?;
            self.sync_journal_file(&*seg.file, || segment_name(seg.id))?;
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
        // Each byte is copied, then written back.
        progress.total = 2 * runs.iter().map(|r| r.sectors * SECTOR).sum::<u64>();
        let bytes = self.write_runs(&runs, folded, &mut progress)?;
        self.write_back_runs(&runs, &mut progress)?;
        // The durability point of base.img (metadata and the device's
        // cache included), before the fold commits: its data is mostly on
        // the disk already, so this is short.
        // Not retried (see `sync_journal_file`): a failure ends this fold,
        // and the next one writes its runs into base.img again from the
        // journal, which still holds them.
        self.base
            .sync_data()
            .map_err(Error::io(|| "syncing base.img"))?;

        let folded = self.pool.commit_fold(count, upto, upto_ns)?;
        self.map.remove_upto(upto);
        lock(&self.index).trim(upto);
        self.pool.retire(folded);
        self.pacer.record_fold(journal_bytes, started.elapsed());
        self.folded_bytes
            .fetch_add(journal_bytes, Ordering::Relaxed);
        self.fold_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);

        let report = FoldReport {
            segments: count,
            base_lsn: upto,
            extents: runs.len() as u64,
            bytes,
            forced,
        };
        if forced {
            self.forced_folds.fetch_add(1, Ordering::Relaxed);
            let due = lock(&self.forced_fold_log).note(Instant::now());
            if let Some(folds) = due {
                self.warn_forced_folds(folds);
            }
        } else {
            tracing::debug!(volume = %self.config.uuid, dir = %self.dir.display(), ?report, "folded");
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
    ///
    /// Pieces of at least `SPLICE_MIN` are copied from the segment's page
    /// cache into base.img's in the kernel, one copy of the bytes. The
    /// others are read in the order they lie in their segments,
    /// neighbours in one request ([`plan_reads`]), with the
    /// kernel asked to read `READ_AHEAD` bytes ahead of the request in
    /// progress: so a segment of small random writes is read as one long
    /// sequential stream with many requests in flight, not one cold 4 KiB
    /// read at a time. The writes of each `WRITE_BATCH` of reads go to
    /// base.img in disk order (starting base.img's writeback during the
    /// fold, and writing in journal order, were both measured slower).
    ///
    /// Each piece written counts as progress ([`FoldProgress`]).
    fn write_runs(
        &self,
        runs: &[Run],
        folded: &[Arc<Segment>],
        progress: &mut FoldProgress,
    ) -> Result<u64> {
        let mut progressed = |len: u64| self.fold_progressed(progress, len);
        let mut bytes = 0;
        let mut copies = Vec::new();
        for run in runs {
            let at = run.start * SECTOR;
            let len = run.sectors * SECTOR;
            match run.target {
                Target::Zero => {
                    self.retrying("zeroing base.img", || self.base.write_zeroes(at, len))
                        .map_err(Error::io(|| format!("zeroing base.img at {at}")))?;
                    progressed(len);
                }
                Target::Journal { segment, sector } => {
                    let seg = folded.iter().position(|s| s.id == segment).ok_or_else(|| {
                        Error::io(|| format!("folding into base.img at {at}"))(
                            std::io::Error::other(format!(
                                "a record of {} is newer than the fold",
                                segment_name(segment)
                            )),
                        )
                    })?;
                    copies.push(Transfer {
                        seg,
                        from: u64::from(sector) * SECTOR,
                        to: at,
                        len,
                    });
                }
            }
            bytes += len;
        }
        // Large copies go from page cache to page cache in the kernel, a
        // piece at a time (each counted as progress); small ones through
        // the batches below, which read many of them in one request.
        let (spliced, copies): (Vec<_>, Vec<_>) =
            copies.into_iter().partition(|c| c.len >= SPLICE_MIN);
        for copy in spliced {
            let seg = &folded[copy.seg];
            let mut done = 0;
            while done < copy.len {
                let len = (copy.len - done).min(READ_SIZE);
                let (from, to) = (copy.from + done, copy.to + done);
                self.retrying("copying a segment into base.img", || {
                    seg.file.copy_range_to(self.base.as_ref(), from, to, len)
                })
                .map_err(Error::io(|| {
                    format!("copying {} into base.img at {to}", segment_name(seg.id))
                }))?;
                progressed(len);
                done += len;
            }
        }
        let reads = plan_reads(copies);
        let mut buf = Vec::new();
        let mut advised = 0;
        let mut first = 0;
        while first < reads.len() {
            // A batch of reads in journal order, at least one.
            let mut end = first + 1;
            let mut len = reads[first].len;
            while end < reads.len() && len + reads[end].len <= WRITE_BATCH {
                len += reads[end].len;
                end += 1;
            }
            let batch = &reads[first..end];
            // Keep the kernel reading ahead of us.
            let mut ahead = 0;
            for (j, next) in reads.iter().enumerate().skip(first) {
                ahead += next.len;
                if ahead > READ_AHEAD + len {
                    break;
                }
                if j >= advised {
                    let file = &folded[next.seg].file;
                    if let Err(e) = file.will_need(next.from, next.len) {
                        tracing::debug!(error = %e, "could not start readahead");
                    }
                    advised = j + 1;
                }
            }
            buf.resize(len as usize, 0);
            // (place in base.img, place in `buf`, length) of every copy.
            let mut writes = Vec::new();
            let mut at = 0;
            for read in batch {
                let seg = &folded[read.seg];
                let into = &mut buf[at as usize..(at + read.len) as usize];
                self.retrying("reading a segment to fold", || {
                    seg.file.read_exact_at(into, read.from)
                })
                .map_err(Error::io(|| format!("reading {}", segment_name(seg.id))))?;
                writes.extend(
                    read.copies
                        .iter()
                        .map(|c| (c.to, at + c.from - read.from, c.len)),
                );
                at += read.len;
            }
            // Written in disk order: the file system places and writes
            // back a sorted batch better than a scattered one.
            writes.sort_unstable();
            for (to, from, len) in writes {
                let piece = &buf[from as usize..(from + len) as usize];
                self.retrying("writing base.img", || self.base.write_all_at(&[piece], to))
                    .map_err(Error::io(|| format!("writing base.img at {to}")))?;
                progressed(len);
            }
            first = end;
        }
        Ok(bytes)
    }

    /// Writes what [`Inner::write_runs`] put in base.img back to the
    /// disk, in disk order, a piece of at most `WRITE_BACK_RUNS` runs and
    /// `WRITE_BACK_BYTES` bytes at a time, each counted as progress: a
    /// fold of many scattered runs on a slow disk spends most of its time
    /// here, and a write held at the hard limit must see it move. The
    /// fdatasync that follows stays the durability point.
    ///
    /// An error fails the fold rather than being retried: the kernel
    /// reports a failed write-back once and may leave the pages clean, so
    /// a second attempt (or the fdatasync) could succeed without the data
    /// on the disk. The applier's next fold writes it all again.
    fn write_back_runs(&self, runs: &[Run], progress: &mut FoldProgress) -> Result<()> {
        for piece in plan_write_back(runs) {
            self.base
                .write_back_range(piece.from, piece.len)
                .map_err(Error::io(|| {
                    format!("writing base.img back at {}", piece.from)
                }))?;
            self.fold_progressed(progress, piece.bytes);
        }
        Ok(())
    }

    /// Writes a segment about to be folded back to the disk a piece at a
    /// time, each counted as progress (see [`Inner::write_back_runs`],
    /// errors included), ahead of its fdatasync. Usually little is left:
    /// a segment's writeback starts when the writer moves past it.
    fn write_back_segment(&self, seg: &Segment, progress: &mut FoldProgress) -> Result<()> {
        let size = self.config.segment_size;
        let mut at = 0;
        while at < size {
            let len = (size - at).min(WRITE_BACK_BYTES);
            // Waiting for the write-back reports its error as fdatasync
            // would, once: a failure is a failed sync of the segment.
            if let Err(e) = seg.file.write_back_range(at, len) {
                let reason = format!("writing {} back failed: {e}", segment_name(seg.id));
                return Err(self.fail(reason));
            }
            progress.at += len;
            self.pool.note_fold_progress(progress.fold, progress.at);
            at += len;
        }
        Ok(())
    }

    /// The fold moved `len` more bytes of its runs on: a write held at the
    /// hard limit waits on while this happens, and the pacer takes the
    /// rate of a fold under way from it.
    fn fold_progressed(&self, progress: &mut FoldProgress, len: u64) {
        progress.done += len;
        progress.at += len;
        self.pool.note_fold_progress(progress.fold, progress.at);
        let freed =
            progress.journal_bytes as f64 * progress.done as f64 / progress.total.max(1) as f64;
        self.pacer.record_live(freed, progress.started.elapsed());
    }
}

/// How far a fold has got. For the held writers, `at` bytes along its
/// work: segments written back, runs copied into base.img and written
/// back; the pool counts it per `fold` (the seq of its first segment), so
/// that an attempt after a failed one shows progress only where it goes
/// further. For the pacer, `done` of the `total` bytes of its runs (each
/// counts twice, once copied and once written back), read as
/// `journal_bytes` of segments freed in proportion, in a fold begun at
/// `started`.
struct FoldProgress {
    fold: u64,
    at: u64,
    journal_bytes: u64,
    started: Instant,
    total: u64,
    done: u64,
}

/// A piece of a folded segment to copy into base.img.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Transfer {
    /// Index of the segment among those folded.
    seg: usize,
    /// Byte offsets in the segment and in base.img.
    from: u64,
    to: u64,
    len: u64,
}

/// One read of a segment, and the copies it serves.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    seg: usize,
    from: u64,
    len: u64,
    copies: Vec<Transfer>,
}

/// Largest read of a segment in one request.
const READ_SIZE: u64 = 4 << 20;
/// Copies from this size on go from the segment's page cache to
/// base.img's without a buffer (`StorageFile::copy_range_to`): one copy of the
/// bytes instead of two. Smaller ones are read together in batches.
const SPLICE_MIN: u64 = 256 << 10;
/// Pieces of a segment this close are read in one request, the gap
/// included: cheaper than a second request.
const READ_GAP: u64 = 128 << 10;
/// How far ahead of the read in progress the kernel reads.
const READ_AHEAD: u64 = 32 << 20;
/// Reads are gathered into batches of this many bytes, whose writes go to
/// base.img in disk order.
const WRITE_BATCH: u64 = 16 << 20;
/// Runs written back to the disk at most in one piece: on a disk of 1000
/// IOs a second, scattered 4 KiB runs take about a quarter of a second,
/// far less than the seconds a held write waits for progress, and a fast
/// disk still gets hundreds of writes at once.
const WRITE_BACK_RUNS: usize = 256;
/// Bytes written back to the disk at most in one piece.
const WRITE_BACK_BYTES: u64 = 8 << 20;

/// A piece of base.img to write back to the disk: `[from, from + len)`,
/// which holds `bytes` of runs (the clean pages between them cost nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WriteBack {
    from: u64,
    len: u64,
    bytes: u64,
}

/// Cuts the runs, in disk order, into pieces to write back of at most
/// `WRITE_BACK_RUNS` runs and `WRITE_BACK_BYTES` bytes (a longer run is
/// split).
fn plan_write_back(runs: &[Run]) -> Vec<WriteBack> {
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for run in runs {
        let (at, len) = (run.start * SECTOR, run.sectors * SECTOR);
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(WRITE_BACK_BYTES);
            spans.push((at + done, piece));
            done += piece;
        }
    }
    spans.sort_unstable();
    let mut pieces: Vec<WriteBack> = Vec::new();
    let mut in_last = 0;
    for (at, len) in spans {
        if let Some(last) = pieces.last_mut() {
            if in_last < WRITE_BACK_RUNS && last.bytes + len <= WRITE_BACK_BYTES {
                last.len = at + len - last.from;
                last.bytes += len;
                in_last += 1;
                continue;
            }
        }
        pieces.push(WriteBack {
            from: at,
            len,
            bytes: len,
        });
        in_last = 1;
    }
    pieces
}

/// Sorts the copies by their place in the journal and groups neighbours
/// into reads of at most `READ_SIZE` (a longer copy is split), so that
/// each segment is read front to back.
fn plan_reads(mut copies: Vec<Transfer>) -> Vec<Read> {
    copies.sort_unstable_by_key(|c| (c.seg, c.from));
    let mut reads: Vec<Read> = Vec::new();
    for copy in copies {
        let mut done = 0;
        while done < copy.len {
            let len = (copy.len - done).min(READ_SIZE);
            let piece = Transfer {
                from: copy.from + done,
                to: copy.to + done,
                len,
                ..copy
            };
            done += len;
            if let Some(read) = reads.last_mut() {
                let end = read.from + read.len;
                let joins = read.seg == piece.seg
                    && piece.from >= end
                    && piece.from - end <= READ_GAP
                    && piece.from + piece.len - read.from <= READ_SIZE;
                if joins {
                    read.len = piece.from + piece.len - read.from;
                    read.copies.push(piece);
                    continue;
                }
            }
            reads.push(Read {
                seg: piece.seg,
                from: piece.from,
                len: piece.len,
                copies: vec![piece],
            });
        }
    }
    reads
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn forced_folds_are_logged_at_most_once_a_minute_with_their_count_and_the_held_ones_later() {
        let mut log = ForcedFoldLog::default();
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(log.note(at(0)), Some(1), "the first one at once");
        assert_eq!(log.note(at(1)), None);
        assert_eq!(log.note(at(59)), None);
        assert_eq!(
            log.note(at(60)),
            Some(3),
            "a minute later, with the two held"
        );
        assert_eq!(log.note(at(61)), None);
        assert_eq!(log.note(at(200)), Some(2));
        assert_eq!(log.due(at(201)), None, "nothing held");
        assert_eq!(log.note(at(230)), None);
        assert_eq!(log.due(at(259)), None, "the last line is not a minute old");
        assert_eq!(
            log.due(at(260)),
            Some(1),
            "the held one, once folds stopped"
        );
        assert_eq!(log.due(at(400)), None);
        assert_eq!(log.note(at(401)), Some(1), "a new run warns at once");
    }

    fn transfer(seg: usize, from: u64, to: u64, len: u64) -> Transfer {
        Transfer { seg, from, to, len }
    }

    /// Every sector a list of transfers moves: (segment, from, to).
    fn sectors(transfers: impl IntoIterator<Item = Transfer>) -> BTreeSet<(usize, u64, u64)> {
        let mut out = BTreeSet::new();
        for t in transfers {
            for s in 0..t.len / SECTOR {
                out.insert((t.seg, t.from + s * SECTOR, t.to + s * SECTOR));
            }
        }
        out
    }

    #[test]
    fn neighbours_in_a_segment_are_read_together_in_journal_order() {
        let k = 4096;
        let copies = vec![
            transfer(1, 512, 9 * k, k),
            transfer(0, 10 * k, 0, k),
            transfer(0, k, 5 * k, k),
            // Just past the gap from the one before it: a read of its own.
            transfer(0, 11 * k + READ_GAP + 512, 7 * k, k),
        ];
        let reads = plan_reads(copies);
        let spans: Vec<(usize, u64, u64, usize)> = reads
            .iter()
            .map(|r| (r.seg, r.from, r.len, r.copies.len()))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, k, 10 * k, 2),
                (0, 11 * k + READ_GAP + 512, k, 1),
                (1, 512, k, 1)
            ]
        );
    }

    #[test]
    fn a_long_run_is_read_in_pieces() {
        let reads = plan_reads(vec![transfer(0, 4096, 0, 3 * READ_SIZE + 512)]);
        let lens: Vec<u64> = reads.iter().map(|r| r.len).collect();
        assert_eq!(lens, vec![READ_SIZE, READ_SIZE, READ_SIZE, 512]);
        assert_eq!(reads[3].copies[0].to, 3 * READ_SIZE);
    }

    #[test]
    fn runs_are_written_back_in_bounded_pieces_in_disk_order() {
        let run = |start: u64, sectors: u64| Run {
            start,
            sectors,
            target: Target::Zero,
        };
        // Scattered 4 KiB runs, out of order: pieces of WRITE_BACK_RUNS.
        let runs: Vec<Run> = (0..600u64).rev().map(|i| run(i * 16, 8)).collect();
        let pieces = plan_write_back(&runs);
        let counts: Vec<u64> = pieces.iter().map(|p| p.bytes / 4096).collect();
        assert_eq!(counts, vec![256, 256, 88]);
        assert_eq!(pieces[0].from, 0);
        assert_eq!(pieces[0].len, (255 * 16 + 8) * SECTOR);
        assert_eq!(pieces[1].from, 256 * 16 * SECTOR);
        // A long run is cut at WRITE_BACK_BYTES.
        let long = plan_write_back(&[run(8, 2 * WRITE_BACK_BYTES / SECTOR + 1)]);
        let spans: Vec<(u64, u64)> = long.iter().map(|p| (p.from, p.len)).collect();
        assert_eq!(
            spans,
            vec![
                (8 * SECTOR, WRITE_BACK_BYTES),
                (8 * SECTOR + WRITE_BACK_BYTES, WRITE_BACK_BYTES),
                (8 * SECTOR + 2 * WRITE_BACK_BYTES, SECTOR)
            ]
        );
        assert!(plan_write_back(&[]).is_empty());
    }

    proptest! {
        #[test]
        fn every_run_is_written_back_once_in_bounded_ordered_pieces(
            raw in prop::collection::vec((0u64..1 << 20, 1u64..=40_000), 0..400)
        ) {
            // Runs of a fold never overlap in base.img.
            let mut runs = Vec::new();
            let mut taken = BTreeSet::new();
            for (slot, sectors) in raw {
                let start = slot * 50_000;
                if taken.insert(slot) {
                    runs.push(Run { start, sectors, target: Target::Zero });
                }
            }
            let pieces = plan_write_back(&runs);
            for pair in pieces.windows(2) {
                prop_assert!(pair[0].from + pair[0].len <= pair[1].from);
            }
            for p in &pieces {
                prop_assert!(p.bytes > 0 && p.bytes <= p.len && p.bytes <= WRITE_BACK_BYTES);
                let touched = runs
                    .iter()
                    .filter(|r| r.start * SECTOR < p.from + p.len && (r.start + r.sectors) * SECTOR > p.from)
                    .count();
                prop_assert!(touched <= WRITE_BACK_RUNS, "{} runs in a piece", touched);
            }
            let total: u64 = runs.iter().map(|r| r.sectors * SECTOR).sum();
            prop_assert_eq!(pieces.iter().map(|p| p.bytes).sum::<u64>(), total);
            for r in &runs {
                let (at, end) = (r.start * SECTOR, (r.start + r.sectors) * SECTOR);
                // Every byte of the run lies in a piece.
                let covered: u64 = pieces
                    .iter()
                    .map(|p| end.min(p.from + p.len).saturating_sub(at.max(p.from)))
                    .sum();
                prop_assert_eq!(covered, end - at);
            }
        }

        #[test]
        fn the_plan_moves_every_sector_once_in_bounded_ordered_reads(
            raw in prop::collection::vec((0usize..3, 0u64..400, 1u64..=128), 0..60)
        ) {
            // Runs of a fold never overlap in base.img or in the journal:
            // give each its own place in both.
            let mut copies = Vec::new();
            let mut at = 0;
            let mut seen = BTreeSet::new();
            for (seg, slot, len) in raw {
                if !seen.insert((seg, slot)) {
                    continue;
                }
                let len = len * SECTOR;
                // Slots of 64 KiB: neighbours join, others do not.
                copies.push(transfer(seg, slot * (64 << 10), at, len));
                at += len + SECTOR;
            }
            let reads = plan_reads(copies.clone());
            let mut moved = Vec::new();
            for pair in reads.windows(2) {
                prop_assert!((pair[0].seg, pair[0].from + pair[0].len) <= (pair[1].seg, pair[1].from));
            }
            for r in &reads {
                prop_assert!(r.len <= READ_SIZE && r.len > 0);
                for c in &r.copies {
                    prop_assert_eq!(c.seg, r.seg);
                    prop_assert!(r.from <= c.from && c.from + c.len <= r.from + r.len);
                    moved.push(*c);
                }
            }
            prop_assert_eq!(sectors(moved.iter().copied()).len() as u64,
                moved.iter().map(|c| c.len / SECTOR).sum::<u64>(), "no sector twice");
            prop_assert_eq!(sectors(moved), sectors(copies));
        }
    }
}
