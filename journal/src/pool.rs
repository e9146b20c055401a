//! The journal's pool of segment files.
//!
//! Segments are fixed-size, preallocated files, used one after the other.
//! Before a segment may receive records it is *prepared*: created,
//! preallocated, given a header with a fresh sequence number, synced, and
//! appended to the list in `super`. So the write path only ever moves to a
//! segment whose place in the journal is already durable, and never waits for
//! allocation while the reserve lasts. A background thread keeps
//! `reserve_segments` prepared segments ready, a batch at a time (one
//! commit of the file system's metadata for the batch), and releases extra
//! ones; the pool never grows past `journal_max`. A writer faster than the
//! thread (large writes at GB/s) can still find the reserve empty: it waits
//! for the batch on its way, or prepares a segment itself if none is; each
//! time, the reserve doubles, up to the early-fold zone's size, and falls
//! back a segment per `RESERVE_DECAY` once the writer stops running it out.
//!
//! Segments leave the journal when the applier folds them into base.img
//! ([`Pool::commit_fold`]); they are *retired*, and recycled into the reserve
//! (new sequence number) or removed once nothing else holds them: a reader
//! in the middle of a read, or a point-in-time view, keeps an `Arc` to every
//! segment it reads, which pins it.
//!
//! A *preallocated* pool (`preallocate_journal`) writes every new file out
//! in full (zeroes) and never removes one: the journal always writes over
//! blocks written before. Files it does not list in `super` are its
//! *spares*: written out at `create` (and by the pool thread up to
//! `journal_max`), kept where a plain pool removes a file, and prepared
//! (a new header, listed) before new files are made. Unlisted, they are
//! never read by recovery, whose look-ahead past the end of the log reads
//! every listed segment's header slots (FORMAT.md).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::{Layout, SegmentHeader};
use crate::storage::{aligned_zeroes, Progress, Storage, StorageFile, ALIGNED_ZEROES};
use crate::superblock::{SegmentRef, SuperState, Superblock};
use folios::FolioPolicy;

mod folios;
mod headers;

pub const JOURNAL_DIR: &str = "journal";

/// A write held this long at the hard limit raises an error-level alarm.
const ALARM_AFTER: Duration = Duration::from_secs(1);

/// A reserve raised by the write path falls back by one segment per this
/// long without the write path running it out again.
const RESERVE_DECAY: Duration = Duration::from_secs(30);

/// Segments a preallocated pool writes out per batch: a batch holds the
/// pool thread (and `create`'s progress) for about a second at 1 GB/s.
const PREALLOCATE_BATCH: u64 = 16;

/// A write waiting at the hard limit.
#[derive(Debug, Clone, Copy)]
struct Held {
    since: Instant,
    /// When the applier's progress was last seen to move, and its value.
    moved: Instant,
    progress: u64,
    alarmed: bool,
}

/// Segments the applier folds ahead of the hard limit on top of the
/// reserve: a sixteenth of the pool, at most 16 (1 GiB of 64 MiB
/// segments). A fold frees nothing until its last segment is done, so the
/// writers need that much room to keep going, paced, while it runs. Small
/// pools get none: their whole journal is the reserve and one segment.
pub(crate) fn early_fold_segments(max_segments: u64) -> u64 {
    (max_segments / 16).min(16)
}

/// One segment file, prepared for use `seq`.
#[derive(Debug)]
pub struct Segment {
    pub id: u32,
    pub seq: u64,
    pub file: Arc<dyn StorageFile>,
    /// Written since it was last synced.
    pub dirty: AtomicBool,
    /// Lsn of the newest record placed in it (0: none yet).
    pub last_lsn: AtomicU64,
    /// Times `Pool::sync_dirty` synced it, after the writer left it too
    /// (`FolioPolicy`).
    syncs: AtomicU64,
    /// How this use places its records: set before its first record
    /// (slots until then, as its prepared header says).
    layout: OnceLock<Layout>,
    /// Inline uses: where some of the headers are, to find one by lsn
    /// (pool/headers.rs).
    marks: Mutex<Vec<headers::Mark>>,
}

impl Segment {
    pub fn new(id: u32, seq: u64, file: Arc<dyn StorageFile>) -> Self {
        Segment {
            id,
            seq,
            file,
            dirty: AtomicBool::new(false),
            last_lsn: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            layout: OnceLock::new(),
            marks: Mutex::new(Vec::new()),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout.get().copied().unwrap_or(Layout::Slots)
    }

    /// Sets the layout of this use, once, before its first record.
    pub fn set_layout(&self, layout: Layout) {
        let _ = self.layout.set(layout);
    }
}

pub fn segment_name(id: u32) -> String {
    format!("{id:08}.seg")
}

#[derive(Debug)]
struct PoolState {
    /// What `super` says base.img holds, as last stored.
    base: Base,
    /// Segments holding records, oldest first.
    used: Vec<Arc<Segment>>,
    /// Prepared segments, in the order the journal will use them.
    free: VecDeque<Arc<Segment>>,
    /// Folded segments waiting for their last reader or view to let go.
    retired: Vec<Arc<Segment>>,
    /// Segments the writer moved past, whose writeback has not been started.
    sealed: Vec<Arc<Segment>>,
    preparing: u64,
    /// Segments taken out of `used` or `free` while `super` is written
    /// without them: still counted against the limit.
    leaving: u64,
    /// A preallocated pool's written-out files `super` does not list.
    spares: Vec<Spare>,
    /// Spares being written out (counted against the limit; the write
    /// path does not wait for them, as it does for `preparing`).
    writing_spares: u64,
    next_seq: u64,
    next_file_id: u32,
    shutdown: bool,
    /// Free segments the pool thread keeps prepared: `Pool::reserve`,
    /// raised (up to `Pool::reserve_cap`) when the write path runs out.
    reserve: u64,
    /// When `reserve` last changed.
    reserve_changed: Instant,
}

impl PoolState {
    /// Doubles the reserve, up to `cap`: the write path found it empty.
    fn raise_reserve(&mut self, cap: u64) {
        self.reserve = (self.reserve * 2).min(cap);
        self.reserve_changed = Instant::now();
    }

    /// Lowers a raised reserve by one segment per `RESERVE_DECAY` since it
    /// last changed, down to `floor`.
    fn decay_reserve(&mut self, floor: u64) {
        if self.reserve > floor && self.reserve_changed.elapsed() >= RESERVE_DECAY {
            self.reserve -= 1;
            self.reserve_changed = Instant::now();
        }
    }

    fn total(&self) -> u64 {
        (self.used.len() + self.free.len() + self.retired.len() + self.spares.len()) as u64
            + self.preparing
            + self.writing_spares
            + self.leaving
    }

    /// `super` for the segments in use and free now, plus `adding`, with
    /// `old`'s base.
    fn listing(&self, old: &SuperState, adding: &[SegmentRef]) -> SuperState {
        let segments = self
            .used
            .iter()
            .chain(self.free.iter())
            .map(|s| SegmentRef {
                file_id: s.id,
                seq: s.seq,
            })
            .chain(adding.iter().copied())
            .collect();
        SuperState {
            generation: 0,
            base_lsn: old.base_lsn,
            base_timestamp: old.base_timestamp,
            horizon_lsn: old.horizon_lsn,
            next_seq: self.next_seq,
            next_file_id: self.next_file_id,
            segments,
        }
    }
}

/// A written-out file of a preallocated pool that `super` does not list.
#[derive(Debug)]
pub struct Spare {
    pub id: u32,
    pub file: Arc<dyn StorageFile>,
}

/// What base.img holds (see [`SuperState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    /// Every record with lsn <= this is folded into base.img.
    pub lsn: u64,
    /// Time of record `lsn` (or of the volume's first open).
    pub timestamp: u64,
    /// base.img may hold changes up to here: no state before it is readable.
    pub horizon_lsn: u64,
}

impl Base {
    fn of(state: &SuperState) -> Base {
        Base {
            lsn: state.base_lsn,
            timestamp: state.base_timestamp,
            horizon_lsn: state.horizon_lsn,
        }
    }
}

/// Sizes of the pool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    pub used: u64,
    pub free: u64,
    /// Folded segments still pinned by a reader or a view.
    pub retired: u64,
    /// Free segments the pool keeps prepared now (raised while the writer
    /// outruns the pool thread).
    pub reserve: u64,
    /// Bytes the segment files occupy.
    pub bytes: u64,
    /// Bytes of the segment files less a preallocated pool's spares (used,
    /// free and retired ones): what the journal takes beyond the files
    /// written out ahead; a plain pool's `bytes`.
    pub held: u64,
}

#[derive(Debug)]
pub struct Pool {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    volume: Uuid,
    segment_size: u64,
    max_segments: u64,
    /// Files written in full, prepared up to the limit, never removed
    /// (module docs).
    preallocated: bool,
    /// The configured reserve (`reserve_segments`): what the pool keeps
    /// prepared when the writer does not outrun it, and what the zone at
    /// the hard limit counts.
    reserve: u64,
    /// The most the reserve is raised to: the early-fold zone, so that
    /// the raised reserve fits in the room the applier keeps.
    reserve_cap: u64,
    /// `super`, written by one thread at a time. Taken before `state` and
    /// never under it, and by the write path only when it must prepare a
    /// segment itself (the reserve ran out): a change of the segment list
    /// is made durable without the writers that need `state` waiting for
    /// its sync. Invariant: every segment in `used` or `free`
    /// is listed in the `super` on disk (one joins them only after the
    /// `super` that lists it is written, still under this lock; one
    /// leaves them before a `super` without it is written).
    sb: Mutex<Superblock>,
    state: Mutex<PoolState>,
    changed: Condvar,
    /// Segments holding records, indexed by file id (ids are small and dense).
    by_id: RwLock<Vec<Option<Arc<Segment>>>>,
    /// How long the write path waits at the hard limit for a segment while
    /// the applier makes no progress.
    max_wait: Duration,
    /// Wakes the applier: the pool needs it to fold early, or it must stop.
    applier: Signal,
    /// Segments the writer may still move into before the hard limit
    /// (`max_segments - used`), kept for the write path's pacing, which
    /// must not take the pool's lock.
    room: AtomicU64,
    /// Bytes left in the segment being written (for the pacing, as `room`).
    active_left: AtomicU64,
    /// Folded segments the applier starts early, before only the reserve
    /// is left, so that it folds beside the writers rather than in front
    /// of them (see [`Pool::early_fold_segments`]).
    early: u64,
    /// Bytes the applier has moved along its folds (one in progress
    /// included): written back to the disk or copied into base.img, a
    /// piece at a time (volume/fold.rs). A writer waiting at the hard
    /// limit keeps waiting while this moves.
    fold_progress: AtomicU64,
    /// Which segments' stores make large folios.
    folios: FolioPolicy,
    /// The fold last reported (the seq of its first segment) and the
    /// furthest any attempt at it got: a fold that failed and starts over
    /// counts no progress until it gets further.
    fold_furthest: Mutex<(u64, u64)>,
}

/// A wake-up call between threads: `notify` sets it, `wait` takes it.
#[derive(Debug, Default)]
struct Signal {
    raised: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    fn notify(&self) {
        *self.raised.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Waits until notified or `timeout` passes; clears the signal.
    fn wait(&self, timeout: Duration) {
        let raised = self.raised.lock().unwrap_or_else(|e| e.into_inner());
        let (mut raised, _) = self
            .cv
            .wait_timeout_while(raised, timeout, |r| !*r)
            .unwrap_or_else(|e| e.into_inner());
        *raised = false;
    }
}

fn register(by_id: &mut Vec<Option<Arc<Segment>>>, seg: &Arc<Segment>) {
    let at = seg.id as usize;
    if by_id.len() <= at {
        by_id.resize(at + 1, None);
    }
    by_id[at] = Some(seg.clone());
}

/// Writes a segment's header and makes it durable.
pub fn write_header(
    file: &dyn StorageFile,
    volume: Uuid,
    seq: u64,
    segment_size: u64,
) -> std::io::Result<()> {
    write_unsynced_header(file, volume, seq, segment_size)?;
    file.sync_data()
}

/// [`write_header`] without its sync (a batch syncs its files together).
fn write_unsynced_header(
    file: &dyn StorageFile,
    volume: Uuid,
    seq: u64,
    segment_size: u64,
) -> std::io::Result<()> {
    let header = SegmentHeader {
        volume,
        seq,
        segment_size,
        layout: Layout::Slots,
    };
    file.write_all_at(&[&header.encode()], 0)
}

/// Writes zeroes over a new file of `size` bytes, so that none of its
/// blocks is allocated or converted by the journal's writes. O_DIRECT
/// where the file system takes it: the page cache would hold on to a copy.
/// (Before the file's header is written: that goes through the page cache.)
fn write_out(file: &dyn StorageFile, size: u64) -> std::io::Result<()> {
    let mut at = 0;
    while at < size {
        let zeroes = aligned_zeroes((size - at).min(ALIGNED_ZEROES));
        match file.write_direct_at(zeroes, at) {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                file.write_all_at(&[zeroes], at)?
            }
            written => written?,
        }
        at += zeroes.len() as u64;
    }
    Ok(())
}

/// What making a pool's files needs to know.
struct FileSetup<'a> {
    storage: &'a dyn Storage,
    /// The journal directory.
    dir: &'a Path,
    volume: Uuid,
    segment_size: u64,
    preallocated: bool,
}

impl FileSetup<'_> {
    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    /// Creates the file of segment `id`, preallocated, and written out in
    /// a preallocated pool; not synced.
    fn new_file(&self, id: u32) -> Result<Arc<dyn StorageFile>> {
        let context = || format!("preparing segment {}", self.path(id).display());
        let file = self
            .storage
            .create_new(&self.path(id))
            .map_err(Error::io(context))?;
        file.allocate(self.segment_size)
            .and_then(|()| match self.preallocated {
                true => write_out(file.as_ref(), self.segment_size),
                false => Ok(()),
            })
            .map_err(Error::io(context))?;
        Ok(file)
    }

    /// The files of `refs`: `spares` for the first of them, new ones for
    /// the rest, each headed for its use, then made durable with the
    /// directory: every file's metadata first, so that the first sync
    /// commits them all.
    fn prepare(&self, refs: &[SegmentRef], spares: &[Spare]) -> Result<Vec<Arc<dyn StorageFile>>> {
        let mut files: Vec<Arc<dyn StorageFile>> = spares.iter().map(|s| s.file.clone()).collect();
        for r in &refs[spares.len()..] {
            files.push(self.new_file(r.file_id)?);
        }
        for (r, file) in refs.iter().zip(&files) {
            write_unsynced_header(file.as_ref(), self.volume, r.seq, self.segment_size).map_err(
                Error::io(|| format!("preparing segment {}", self.path(r.file_id).display())),
            )?;
        }
        self.sync(refs.iter().map(|r| r.file_id).zip(&files))?;
        Ok(files)
    }

    /// Writes out spare files `ids` (no header: they are not segments
    /// until prepared) and makes them durable.
    fn write_spares(&self, ids: std::ops::Range<u32>) -> Result<Vec<Spare>> {
        let spares = ids
            .map(|id| {
                Ok(Spare {
                    id,
                    file: self.new_file(id)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.sync(spares.iter().map(|s| (s.id, &s.file)))?;
        Ok(spares)
    }

    fn sync<'a>(&self, files: impl Iterator<Item = (u32, &'a Arc<dyn StorageFile>)>) -> Result<()> {
        for (id, file) in files {
            file.sync_data().map_err(Error::io(|| {
                format!("preparing segment {}", self.path(id).display())
            }))?;
        }
        self.storage.sync_dir(self.dir).map_err(Error::io(|| {
            format!("preparing segments in {}", self.dir.display())
        }))
    }
}

/// Writes out the spare files of a new preallocated volume
/// (`preallocate_journal`): as many as `journal_max` allows, a batch at a
/// time; `progress` gets the bytes written and the limit. A crash leaves
/// no volume (`volume.json` is written after this): `create` then refuses
/// the directory until it is emptied.
pub fn preallocate(
    storage: &dyn Storage,
    volume_dir: &Path,
    volume: Uuid,
    segment_size: u64,
    journal_max: u64,
    progress: Progress<'_>,
) -> Result<()> {
    let dir = volume_dir.join(JOURNAL_DIR);
    let files = FileSetup {
        storage,
        dir: &dir,
        volume,
        segment_size,
        preallocated: true,
    };
    let count = (journal_max / segment_size) as u32;
    let mut written = 0;
    loop {
        progress(
            u64::from(written) * segment_size,
            u64::from(count) * segment_size,
        );
        if written == count {
            return Ok(());
        }
        let batch = (count - written).min(PREALLOCATE_BATCH as u32);
        files.write_spares(written..written + batch)?;
        written += batch;
    }
}

pub struct PoolSetup {
    pub storage: Arc<dyn Storage>,
    pub volume_dir: PathBuf,
    pub volume: Uuid,
    pub segment_size: u64,
    pub journal_max: u64,
    pub reserve: u32,
    pub sb: Superblock,
    pub used: Vec<Arc<Segment>>,
    pub free: Vec<Arc<Segment>>,
    pub next_seq: u64,
    /// How long the write path waits for the applier to free a segment
    /// when the pool is at its hard limit.
    pub max_wait: Duration,
    /// A preallocated pool (module docs), and its spare files.
    pub preallocated: bool,
    pub spares: Vec<Spare>,
}

impl Pool {
    /// A pool over segments found by recovery; writes `super` to match.
    pub fn new(setup: PoolSetup) -> Result<Self> {
        let mut by_id = Vec::new();
        for seg in &setup.used {
            register(&mut by_id, seg);
        }
        let mut sb = setup.sb;
        // Spares are not listed: no new file may take one's name.
        let spare_ids = setup.spares.iter().map(|s| s.id.saturating_add(1));
        let next_file_id = spare_ids.fold(sb.state().next_file_id, u32::max);
        let state = PoolState {
            base: Base::of(sb.state()),
            used: setup.used,
            free: setup.free.into(),
            retired: Vec::new(),
            sealed: Vec::new(),
            preparing: 0,
            leaving: 0,
            spares: setup.spares,
            writing_spares: 0,
            next_seq: setup.next_seq,
            next_file_id,
            shutdown: false,
            reserve: u64::from(setup.reserve),
            reserve_changed: Instant::now(),
        };
        sb.store(state.listing(sb.state(), &[]))?;
        let max_segments = setup.journal_max / setup.segment_size;
        let room = max_segments.saturating_sub(state.used.len() as u64);
        Ok(Pool {
            storage: setup.storage,
            dir: setup.volume_dir.join(JOURNAL_DIR),
            volume: setup.volume,
            segment_size: setup.segment_size,
            max_segments,
            preallocated: setup.preallocated,
            reserve: u64::from(setup.reserve),
            reserve_cap: early_fold_segments(max_segments).max(u64::from(setup.reserve)),
            sb: Mutex::new(sb),
            state: Mutex::new(state),
            changed: Condvar::new(),
            by_id: RwLock::new(by_id),
            max_wait: setup.max_wait,
            applier: Signal::default(),
            room: AtomicU64::new(room),
            active_left: AtomicU64::new(0),
            early: early_fold_segments(max_segments),
            fold_progress: AtomicU64::new(0),
            folios: FolioPolicy::new(setup.segment_size),
            fold_furthest: Mutex::new((0, 0)),
        })
    }

    /// Publishes `room` after `used` changed (under the state lock).
    fn set_room(&self, st: &PoolState) {
        let room = self.max_segments.saturating_sub(st.used.len() as u64);
        self.room.store(room, Ordering::Release);
    }

    /// Room left before the hard limit, as a fraction of the room the
    /// writers are paced to keep ([`Pool::paced_room`]); `None` outside the
    /// zone where the applier folds early (nothing is paced there). The
    /// write path paces itself by it (pace.rs). Counted in bytes, the
    /// segment being written included, so that it falls smoothly with
    /// every write rather than a segment at a time.
    pub fn headroom(&self) -> Option<f64> {
        let room = self.room.load(Ordering::Acquire);
        if room >= self.zone() {
            return None;
        }
        let left = self
            .active_left
            .load(Ordering::Relaxed)
            .min(self.segment_size);
        let bytes = room * self.segment_size + left;
        Some(bytes as f64 / self.paced_room() as f64)
    }

    /// Segments left below the hard limit at which the applier starts
    /// folding: the reserve, the early zone and the segment being written.
    fn zone(&self) -> u64 {
        self.reserve + self.early + 1
    }

    /// The room, in bytes, the writers are paced to keep at the limit: two
    /// fold pieces. A fold frees nothing until its piece is done, and the
    /// writers, at the applier's pace, use about a piece meanwhile: with
    /// two, the room left when it lands is still about one piece, never
    /// none, so no write has to wait at the hard limit for a whole piece.
    fn paced_room(&self) -> u64 {
        2 * self.fold_piece() as u64 * self.segment_size
    }

    /// The writer has `bytes` left in the segment it writes (between its
    /// payloads and its header slots).
    pub fn set_active_left(&self, bytes: u64) {
        self.active_left.store(bytes, Ordering::Relaxed);
    }

    /// Segments the applier folds at most at a time: a quarter of the
    /// early zone, so that the writers, paced, never run out of room
    /// while one piece is folded.
    pub fn fold_piece(&self) -> usize {
        (self.early / 4).max(1) as usize
    }

    /// The fold of the segments from the one of sequence number `fold`
    /// has got `at` bytes along (written back to the disk or copied into
    /// base.img). Progress only past the furthest an attempt at that fold
    /// got before: a fold that fails and starts over again and again
    /// (say, base.img refuses its writes) moves nothing, and the writes
    /// held at the hard limit fail after `max_wait`.
    pub fn note_fold_progress(&self, fold: u64, at: u64) {
        let mut furthest = self.fold_furthest.lock().unwrap_or_else(|e| e.into_inner());
        if furthest.0 != fold {
            *furthest = (fold, 0);
        }
        if at > furthest.1 {
            self.fold_progress
                .fetch_add(at - furthest.1, Ordering::AcqRel);
            furthest.1 = at;
        }
    }

    /// Wakes the applier's [`Pool::wait_for_applier_work`].
    pub fn wake_applier(&self) {
        self.applier.notify();
    }

    /// The applier's pause: until the pool is under pressure, someone calls
    /// [`Pool::wake_applier`], or `timeout` passes.
    pub fn wait_for_applier_work(&self, timeout: Duration) {
        self.applier.wait(timeout);
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `super`, for a change to it; never taken under [`Pool::lock`].
    fn super_lock(&self) -> MutexGuard<'_, Superblock> {
        self.sb.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `state` as `super` (the caller holds `sb`) and, once it is
    /// durable, makes its base the pool's.
    fn store(&self, sb: &mut Superblock, state: SuperState) -> Result<()> {
        sb.store(state)?;
        self.lock().base = Base::of(sb.state());
        Ok(())
    }

    /// Writes the `super` that lists `adding` too (the caller holds `sb`,
    /// and puts `adding` into `free` before letting it go).
    fn store_adding(&self, sb: &mut Superblock, adding: &[SegmentRef]) -> Result<()> {
        let state = self.lock().listing(sb.state(), adding);
        self.store(sb, state)
    }

    /// Writes `state`, a `super` without the `leaving` segments the caller
    /// just took out of `used` under `st` (and holding `sb`), counting them
    /// against the limit until it is written, without the state lock
    /// meanwhile; returns that lock again.
    fn store_without<'a>(
        &'a self,
        sb: &mut Superblock,
        mut st: MutexGuard<'a, PoolState>,
        leaving: u64,
        state: SuperState,
    ) -> (MutexGuard<'a, PoolState>, Result<()>) {
        st.leaving += leaving;
        drop(st);
        let stored = sb.store(state);
        let mut st = self.lock();
        st.leaving -= leaving;
        if stored.is_ok() {
            st.base = Base::of(sb.state());
        }
        (st, stored)
    }

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    pub fn journal_max(&self) -> u64 {
        self.max_segments * self.segment_size
    }

    pub fn counts(&self) -> PoolCounts {
        let st = self.lock();
        let (used, free) = (st.used.len() as u64, st.free.len() as u64);
        let retired = st.retired.len() as u64;
        PoolCounts {
            used,
            free,
            retired,
            reserve: st.reserve,
            bytes: (used + free + retired + st.spares.len() as u64) * self.segment_size,
            held: (used + free + retired) * self.segment_size,
        }
    }

    /// The segments holding records, oldest first.
    pub fn used(&self) -> Vec<Arc<Segment>> {
        self.lock().used.clone()
    }

    /// Segments the applier must fold so that the reserve and the early
    /// zone fit under the hard limit again (0 when there is room).
    pub fn overflow(&self) -> u64 {
        let st = self.lock();
        (st.used.len() as u64 + self.zone()).saturating_sub(self.max_segments)
    }

    /// What base.img holds, as `super` has it.
    pub fn base(&self) -> Base {
        self.lock().base
    }

    /// Durably sets the time of the initial image (before any fold).
    pub fn set_base_timestamp(&self, ns: u64) -> Result<()> {
        let mut sb = self.super_lock();
        let mut state = sb.state().clone();
        state.base_timestamp = ns;
        self.store(&mut sb, state)
    }

    /// Durably records that base.img may now hold changes up to `lsn`
    /// (before the applier writes them there).
    pub fn set_horizon(&self, lsn: u64) -> Result<()> {
        let mut sb = self.super_lock();
        let mut state = sb.state().clone();
        state.horizon_lsn = state.horizon_lsn.max(lsn);
        self.store(&mut sb, state)
    }

    /// Durably ends the journal's first `count` used segments, now folded
    /// into base.img up to `base_lsn` (written at `base_timestamp`), and
    /// returns them. They stay readable until [`Pool::retire`].
    pub fn commit_fold(
        &self,
        count: usize,
        base_lsn: u64,
        base_timestamp: u64,
    ) -> Result<Vec<Arc<Segment>>> {
        let mut sb = self.super_lock();
        let mut st = self.lock();
        let folded: Vec<Arc<Segment>> = st.used.drain(..count).collect();
        let mut state = st.listing(sb.state(), &[]);
        state.base_lsn = base_lsn;
        state.base_timestamp = base_timestamp;
        state.horizon_lsn = state.horizon_lsn.max(base_lsn);
        let (mut st, stored) = self.store_without(&mut sb, st, folded.len() as u64, state);
        if let Err(e) = stored {
            let mut used = folded;
            used.append(&mut st.used);
            st.used = used;
            return Err(e);
        }
        self.set_room(&st);
        // Retired at once, so that they count against the limit while the
        // caller moves the extent map off them: left uncounted, the pool
        // thread could prepare a segment in their place and overshoot.
        // `folded` and `by_id` pin them until `retire`.
        st.retired.extend(folded.iter().cloned());
        Ok(folded)
    }

    /// Durably ends the journal after its first `keep` used segments (a
    /// cut moved the records of the others to a branch, volume/branch.rs)
    /// and returns the others. They leave `super`'s list, so recovery
    /// never reads them again (a crash before their file is recycled or
    /// removed leaves an unlisted file, which the next open removes), and
    /// are retired like folded ones: [`Pool::retire`] next.
    pub fn cut(&self, keep: usize) -> Result<Vec<Arc<Segment>>> {
        let mut sb = self.super_lock();
        let mut st = self.lock();
        let keep = keep.min(st.used.len());
        let cut: Vec<Arc<Segment>> = st.used.drain(keep..).collect();
        if cut.is_empty() {
            return Ok(cut);
        }
        let state = st.listing(sb.state(), &[]);
        let (mut st, stored) = self.store_without(&mut sb, st, cut.len() as u64, state);
        // The caller holds the writer off: nothing joined `used` meanwhile.
        if let Err(e) = stored {
            st.used.extend(cut);
            return Err(e);
        }
        self.set_room(&st);
        st.retired.extend(cut.iter().cloned());
        drop(st);
        self.changed.notify_all();
        Ok(cut)
    }

    /// Takes folded segments out of reach of new reads; the maintainer
    /// recycles or removes each once nothing else holds it.
    pub fn retire(&self, folded: Vec<Arc<Segment>>) {
        {
            let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
            for seg in &folded {
                if let Some(slot) = by_id.get_mut(seg.id as usize) {
                    *slot = None;
                }
            }
        }
        drop(folded);
        self.changed.notify_all();
    }

    pub fn segment(&self, id: u32) -> Option<Arc<Segment>> {
        let by_id = self.by_id.read().unwrap_or_else(|e| e.into_inner());
        by_id.get(id as usize)?.clone()
    }

    /// Prepares one more free segment. `Ok(false)` if the limit forbids it.
    pub fn prepare(&self) -> Result<bool> {
        self.prepare_batch(1).map(|made| made == 1)
    }

    /// Prepares up to `want` more free segments at once, as many as the
    /// limit allows; returns how many. A batch costs about what one segment
    /// does: the file system commits the new files' metadata, the
    /// directory and the `super` listing them once for all of them, where
    /// one at a time pays three commits each behind the device's queue
    /// (at GB/s of large writes the pool thread could not keep up).
    fn prepare_batch(&self, want: u64) -> Result<u64> {
        let (spares, refs) = {
            let mut st = self.lock();
            let spare_count = st.spares.len() as u64;
            let room = self.max_segments.saturating_sub(st.total());
            let count = want.min(spare_count + room);
            if count == 0 {
                return Ok(0);
            }
            // Spares first: they are written out already.
            let reused = count.min(spare_count);
            let spares = st.spares.split_off((spare_count - reused) as usize);
            let new = (count - reused) as u32;
            let new_ids = st.next_file_id..st.next_file_id + new;
            st.next_file_id += new;
            let ids = spares.iter().map(|s| s.id).chain(new_ids);
            let refs: Vec<SegmentRef> = ids
                .zip(st.next_seq..)
                .map(|(file_id, seq)| SegmentRef { file_id, seq })
                .collect();
            st.next_seq += count;
            st.preparing += count;
            (spares, refs)
        };
        let count = refs.len() as u64;
        let files = match self.files().prepare(&refs, &spares) {
            Ok(files) => files,
            Err(e) => {
                self.lock().preparing -= count;
                // A writer waiting for them prepares its own.
                self.changed.notify_all();
                // Spares too: one whose header cannot be written must not
                // be the one every later attempt takes again (the pool
                // thread writes out new ones).
                for r in &refs {
                    // Best effort: an orphan file is also removed at the next open.
                    let _ = self.storage.remove_file(&self.path(r.file_id));
                }
                return Err(e);
            }
        };
        // Listed in `super` before they join `free`, under `sb` throughout.
        let mut sb = self.super_lock();
        let stored = self.store_adding(&mut sb, &refs);
        let mut st = self.lock();
        st.preparing -= count;
        if let Err(e) = stored {
            // Unlisted still: in a preallocated pool, spares (written out,
            // headed for a use that never began); else orphans, which the
            // next open removes.
            if self.preallocated {
                let ids = refs.iter().map(|r| r.file_id);
                st.spares
                    .extend(ids.zip(files).map(|(id, file)| Spare { id, file }));
            }
            drop(st);
            self.changed.notify_all();
            return Err(e);
        }
        for (r, file) in refs.iter().zip(files) {
            st.free
                .push_back(Arc::new(Segment::new(r.file_id, r.seq, file)));
        }
        drop(st);
        drop(sb);
        self.changed.notify_all();
        Ok(count)
    }

    /// Writes out up to `want` more spare files of a preallocated pool, as
    /// many as the limit allows; returns how many.
    fn write_spares(&self, want: u64) -> Result<u64> {
        let ids = {
            let mut st = self.lock();
            let count = want.min(self.max_segments.saturating_sub(st.total())) as u32;
            st.writing_spares += u64::from(count);
            st.next_file_id += count;
            st.next_file_id - count..st.next_file_id
        };
        let count = ids.len() as u64;
        let written = self.files().write_spares(ids.clone());
        let mut st = self.lock();
        st.writing_spares -= count;
        let result = match written {
            Ok(spares) => {
                st.spares.extend(spares);
                Ok(count)
            }
            Err(e) => {
                drop(st);
                for id in ids {
                    let _ = self.storage.remove_file(&self.path(id));
                }
                Err(e)
            }
        };
        // A writer that ran out prepares one of them.
        self.changed.notify_all();
        result
    }

    fn files(&self) -> FileSetup<'_> {
        FileSetup {
            storage: self.storage.as_ref(),
            dir: &self.dir,
            volume: self.volume,
            segment_size: self.segment_size,
            preallocated: self.preallocated,
        }
    }

    /// Hands the next prepared segment to the write path (if the reserve
    /// ran out: waiting for those being prepared, or preparing one). At the
    /// hard limit it waits for the applier to fold and free a segment: held, as for an IO error, for as
    /// long as the applier makes progress (a slow fold never fails a
    /// write), and for `max_wait` after its last progress (a fold that
    /// cannot proceed, or fails and starts over, does). It stops waiting
    /// early (within 100 ms) once `give_up` returns true.
    pub fn take_next(&self, give_up: impl Fn() -> bool) -> Result<Arc<Segment>> {
        let mut held: Option<Held> = None;
        let mut ran_out = false;
        loop {
            let mut st = self.lock();
            if let Some(seg) = st.free.pop_front() {
                st.used.push(seg.clone());
                self.set_room(&st);
                register(
                    &mut self.by_id.write().unwrap_or_else(|e| e.into_inner()),
                    &seg,
                );
                let overflow = st.used.len() as u64 + self.zone() > self.max_segments;
                drop(st);
                self.folios.activated(&seg);
                self.changed.notify_all();
                if overflow {
                    self.applier.notify();
                }
                if let Some(h) = held.filter(|h| h.alarmed) {
                    tracing::warn!(
                        event = crate::events::JOURNAL_HARD_LIMIT_RELEASED,
                        volume = %self.volume,
                        "journal at its hard limit: a held write got a segment after {:?}",
                        h.since.elapsed()
                    );
                }
                return Ok(seg);
            }
            let room = st.total() < self.max_segments || !st.spares.is_empty();
            // A segment being released (`release_one`) is room coming back.
            let on_their_way = st.preparing > 0 || st.writing_spares > 0 || st.leaving > 0;
            if room || on_their_way {
                if !ran_out {
                    ran_out = true;
                    st.raise_reserve(self.reserve_cap);
                    tracing::warn!(
                        event = crate::events::SEGMENT_RESERVE_EXHAUSTED,
                        volume = %self.volume,
                        reserve = st.reserve,
                        "segment reserve exhausted; the write path waits for a segment \
                         (keeping {} prepared from now)",
                        st.reserve
                    );
                    // The pool thread starts on the larger reserve.
                    self.changed.notify_all();
                }
                if st.preparing > 0 || !room {
                    // Segments are on their way (or spares, the only room
                    // left): wait for them rather than sync one more file
                    // beside them.
                    let _ = self
                        .changed
                        .wait_timeout(st, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner());
                } else {
                    drop(st);
                    self.prepare()?;
                }
                continue;
            }
            let progress = self.fold_progress.load(Ordering::Acquire);
            let h = held.get_or_insert_with(|| {
                tracing::warn!(
                    event = crate::events::JOURNAL_HARD_LIMIT,
                    volume = %self.volume,
                    "journal at its hard limit of {} bytes; holding writes until the applier \
                     frees a segment",
                    self.journal_max()
                );
                let now = Instant::now();
                Held {
                    since: now,
                    moved: now,
                    progress,
                    alarmed: false,
                }
            });
            if progress != h.progress {
                (h.moved, h.progress) = (Instant::now(), progress);
            }
            if h.moved.elapsed() >= self.max_wait || give_up() {
                return Err(Error::JournalFull {
                    used: st.used.len() as u64 * self.segment_size,
                    max: self.journal_max(),
                });
            }
            if !h.alarmed && h.since.elapsed() >= ALARM_AFTER {
                h.alarmed = true;
                tracing::error!(
                    event = crate::events::JOURNAL_HARD_LIMIT_STALLED,
                    volume = %self.volume,
                    "journal at its hard limit of {} bytes: writes held for {:?}, the applier \
                     folds slower than the guest writes (held while it makes progress, \
                     never failed for it)",
                    self.journal_max(),
                    h.since.elapsed()
                );
            }
            self.applier.notify();
            self.changed.notify_all();
            let _ = self
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Syncs every segment written since its last sync.
    pub fn sync_dirty(&self) -> std::io::Result<()> {
        let dirty: Vec<Arc<Segment>> = self
            .lock()
            .used
            .iter()
            .filter(|s| s.dirty.swap(false, Ordering::AcqRel))
            .cloned()
            .collect();
        if dirty.len() > 1 {
            // Queue every file's writeback before waiting on any of them.
            for seg in &dirty {
                if let Err(e) = seg.file.start_writeback() {
                    tracing::debug!(segment = seg.id, error = %e, "could not start writeback");
                }
            }
        }
        for seg in &dirty {
            // Out of the page tables first, so that write-back need not
            // write-protect the stored pages one at a time; stores after
            // this fault theirs back in, dirty. Writes with a flush every
            // 32 ran at 1.6x the IOPS with 0.5x the CPU a write.
            seg.file.unmap_pages();
            if let Err(e) = seg.file.sync_data() {
                dirty
                    .iter()
                    .for_each(|s| s.dirty.store(true, Ordering::Release));
                return Err(e);
            }
            self.folios.synced(seg);
        }
        Ok(())
    }

    /// Releases the newest free segment if there are more than the reserve.
    fn release_one<'a>(
        &'a self,
        st: MutexGuard<'a, PoolState>,
    ) -> (MutexGuard<'a, PoolState>, Result<()>) {
        drop(st);
        let mut sb = self.super_lock();
        let mut st = self.lock();
        if st.free.len() as u64 <= st.reserve {
            return (st, Ok(()));
        }
        let Some(seg) = st.free.pop_back() else {
            return (st, Ok(()));
        };
        st.leaving += 1;
        let state = st.listing(sb.state(), &[]);
        drop(st);
        let stored = self.store(&mut sb, state);
        drop(sb);
        if let Err(e) = stored {
            let mut st = self.lock();
            st.leaving -= 1;
            st.free.push_back(seg);
            return (st, Err(e));
        }
        if self.preallocated {
            let mut st = self.lock();
            st.leaving -= 1;
            st.spares.push(Spare {
                id: seg.id,
                file: seg.file.clone(),
            });
            self.changed.notify_all();
            return (st, Ok(()));
        }
        let path = self.path(seg.id);
        let removed = self
            .storage
            .remove_file(&path)
            .and_then(|()| self.storage.sync_dir(&self.dir))
            .map_err(Error::io(|| format!("releasing {}", path.display())));
        let mut st = self.lock();
        st.leaving -= 1;
        // A writer that found no room while it left waits for this.
        self.changed.notify_all();
        (st, removed)
    }

    /// Brings the reserve to its target now (used at open).
    pub fn fill_reserve(&self) -> Result<()> {
        loop {
            let missing = {
                let st = self.lock();
                st.reserve.saturating_sub(st.free.len() as u64)
            };
            if missing == 0 || self.prepare_batch(missing)? == 0 {
                return Ok(());
            }
        }
    }

    /// Recycles the retired segment at `index` into the reserve, or removes
    /// its file if the reserve is full. Nothing else may hold it. It stays
    /// in `retired`, counted against the limit, until its file is either
    /// ready again or gone.
    fn reuse_retired<'a>(
        &'a self,
        mut st: MutexGuard<'a, PoolState>,
        index: usize,
    ) -> (MutexGuard<'a, PoolState>, Result<()>) {
        // The clone also keeps the pool thread from picking it again.
        let seg = st.retired[index].clone();
        let path = self.path(seg.id);
        let recycle = (st.free.len() as u64 + st.preparing) < st.reserve;
        let seq = st.next_seq;
        if recycle {
            st.next_seq += 1;
        }
        drop(st);
        let done = if recycle {
            write_header(seg.file.as_ref(), self.volume, seq, self.segment_size)
                .map_err(Error::io(|| format!("recycling {}", path.display())))
        } else if self.preallocated {
            Ok(()) // kept as a spare
        } else {
            // Not listed in `super` since the fold: removing it needs no
            // update. Gone already if a removal's directory sync failed.
            let removed = match self.storage.remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            };
            removed
                .and_then(|()| self.storage.sync_dir(&self.dir))
                .map_err(Error::io(|| format!("releasing {}", path.display())))
        };
        if let Err(e) = done {
            return (self.lock(), Err(e));
        }
        if !recycle {
            let mut st = self.lock();
            st.retired.retain(|s| !Arc::ptr_eq(s, &seg));
            if self.preallocated {
                st.spares.push(Spare {
                    id: seg.id,
                    file: seg.file.clone(),
                });
                self.changed.notify_all();
            }
            return (st, Ok(()));
        }
        // Listed in `super` before it joins `free`, under `sb` throughout;
        // counted as retired until then.
        let mut sb = self.super_lock();
        let adding = SegmentRef {
            file_id: seg.id,
            seq,
        };
        let stored = self.store_adding(&mut sb, &[adding]);
        let mut st = self.lock();
        if let Err(e) = stored {
            return (st, Err(e));
        }
        st.retired.retain(|s| !Arc::ptr_eq(s, &seg));
        st.free
            .push_back(Arc::new(Segment::new(seg.id, seq, seg.file.clone())));
        drop(sb);
        self.changed.notify_all();
        (st, Ok(()))
    }

    /// The writer moved past `full`: the background thread starts its
    /// writeback, which the next flush will need, so that neither the write
    /// that crossed into a new segment nor the flush pays for submitting a
    /// whole segment's pages.
    pub fn seal(&self, full: Arc<Segment>) {
        self.lock().sealed.push(full);
        self.changed.notify_all();
    }

    /// The background thread's loop: keeps the reserve at its target,
    /// starts the writeback of sealed segments (their pages out of this
    /// process's page tables first) and recycles retired ones.
    pub fn maintain(&self) {
        let mut st = self.lock();
        while !st.shutdown {
            st.decay_reserve(self.reserve);
            let free = st.free.len() as u64 + st.preparing;
            // The retired vector holds the only reference: nobody reads it.
            let unpinned = st.retired.iter().position(|s| Arc::strong_count(s) == 1);
            let result = if let Some(index) = unpinned {
                let (guard, r) = self.reuse_retired(st, index);
                st = guard;
                r
            } else if free < st.reserve && (st.total() < self.max_segments || !st.spares.is_empty())
            {
                let missing = st.reserve - free;
                drop(st);
                let r = self.prepare_batch(missing).map(drop);
                st = self.lock();
                r
            } else if let Some(full) = st.sealed.pop() {
                drop(st);
                full.file.unmap_pages();
                if let Err(e) = full.file.start_writeback() {
                    tracing::debug!(segment = full.id, error = %e, "could not start writeback");
                }
                st = self.lock();
                Ok(())
            } else if st.free.len() as u64 > st.reserve {
                let (guard, r) = self.release_one(st);
                st = guard;
                r
            } else if self.preallocated && st.total() < self.max_segments {
                drop(st);
                let r = self.write_spares(PREALLOCATE_BATCH).map(drop);
                st = self.lock();
                r
            } else if !st.retired.is_empty() {
                // Pinned by a reader or a view: look again shortly.
                st = self
                    .changed
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                Ok(())
            } else if st.reserve > self.reserve {
                // Raised: look again when it may fall back.
                st = self
                    .changed
                    .wait_timeout(st, RESERVE_DECAY)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                Ok(())
            } else {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                Ok(())
            };
            if let Err(e) = result {
                tracing::error!(
                    event = crate::events::POOL_MAINTENANCE_FAILED,
                    volume = %self.volume,
                    error = %e,
                    "journal pool maintenance failed; retrying in 1s"
                );
                st = self
                    .changed
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }

    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{Fault, FaultOp, FaultStorage};
    use std::path::Path;

    const SEGMENT: u64 = 64 << 10;

    /// A pool of at most three segments with a reserve of one.
    fn small_pool(fs: &FaultStorage) -> Pool {
        pool_of(fs, 3)
    }

    /// A pool of at most `segments` segments with a reserve of one.
    fn pool_of(fs: &FaultStorage, segments: u64) -> Pool {
        pool_new(fs, segments, false, Vec::new())
    }

    /// A preallocated pool over `spares`.
    fn pool_with(fs: &FaultStorage, segments: u64, spares: Vec<Spare>) -> Pool {
        pool_new(fs, segments, true, spares)
    }

    fn pool_new(fs: &FaultStorage, segments: u64, preallocated: bool, spares: Vec<Spare>) -> Pool {
        let dir = Path::new("/v");
        fs.create_dir_all(&dir.join(JOURNAL_DIR)).expect("mkdir");
        let volume = Uuid::new_v4();
        let sb = Superblock::create(fs, dir, volume).expect("super");
        Pool::new(PoolSetup {
            storage: fs.arc(),
            volume_dir: dir.to_owned(),
            volume,
            segment_size: SEGMENT,
            journal_max: segments * SEGMENT,
            reserve: 1,
            sb,
            used: Vec::new(),
            free: Vec::new(),
            next_seq: 1,
            max_wait: Duration::ZERO,
            preallocated,
            spares,
        })
        .expect("pool")
    }

    /// The spare files of a preallocated pool of `segments` at `/v`.
    fn spares(fs: &FaultStorage, segments: u64) -> Vec<Spare> {
        let mut seen = Vec::new();
        let dir = Path::new("/v");
        fs.create_dir_all(&dir.join(JOURNAL_DIR)).expect("mkdir");
        let limit = segments * SEGMENT;
        preallocate(
            fs,
            dir,
            Uuid::new_v4(),
            SEGMENT,
            limit,
            &mut |done, total| seen.push((done, total)),
        )
        .expect("preallocate");
        let batch = PREALLOCATE_BATCH * SEGMENT;
        let mut expected: Vec<_> = (0..limit).step_by(batch as usize).collect();
        expected.push(limit);
        assert_eq!(
            seen,
            expected.iter().map(|&d| (d, limit)).collect::<Vec<_>>()
        );
        (0..segments as u32)
            .map(|id| Spare {
                id,
                file: fs
                    .open(&dir.join(JOURNAL_DIR).join(segment_name(id)))
                    .expect("spare"),
            })
            .collect()
    }

    #[test]
    fn preallocate_writes_out_every_file_the_limit_allows() {
        let fs = FaultStorage::new();
        let segments = PREALLOCATE_BATCH + 3;
        for spare in spares(&fs, segments) {
            assert_eq!(spare.file.size().expect("size"), SEGMENT);
            let mut bytes = vec![0xffu8; SEGMENT as usize];
            spare.file.read_exact_at(&mut bytes, 0).expect("read");
            assert!(bytes.iter().all(|&b| b == 0), "spare {}", spare.id);
        }
    }

    #[test]
    fn a_preallocated_pool_prepares_its_spares_before_new_files() {
        let fs = FaultStorage::new();
        let spares = spares(&fs, 4);
        let pool = pool_with(&fs, 4, spares);
        pool.fill_reserve().expect("reserve");
        pool.take_next(|| false).expect("first");
        pool.take_next(|| false).expect("second");
        let c = pool.counts();
        assert_eq!((c.used, c.free, c.bytes), (2, 0, 4 * SEGMENT));
        let listed = pool.super_lock().state().segments.clone();
        let ids: Vec<u32> = listed.iter().map(|s| s.file_id).collect();
        assert_eq!(ids, [3, 2], "the spares, newest first; no new file");
        assert_eq!(pool.lock().next_file_id, 4);
        // The prepared spare carries its use's header.
        let mut header = [0u8; 512];
        pool.used()[0]
            .file
            .read_exact_at(&mut header, 0)
            .expect("read");
        let h = SegmentHeader::decode(&header).expect("header");
        assert_eq!(h.seq, listed[0].seq);
    }

    #[test]
    fn a_failed_preparation_removes_the_spares_it_took_unless_only_super_failed() {
        let fs = FaultStorage::new();
        let pool = pool_with(&fs, 4, spares(&fs, 4));
        // The header of the second spare fails: both files are removed,
        // so that no later attempt takes a file that keeps failing.
        fs.inject(Fault::once_after(FaultOp::Write, 1, libc::EIO).on_paths_containing(".seg"));
        assert!(pool.prepare_batch(2).is_err());
        fs.clear_faults();
        assert!(!fs.exists(&pool.path(2)) && !fs.exists(&pool.path(3)));
        let st = pool.lock();
        assert_eq!((st.spares.len(), st.preparing, st.total()), (2, 0, 2));
        drop(st);
        // `super` fails: the files, headed but not listed, stay spares.
        fs.inject(Fault::always(FaultOp::Write, libc::EIO).on_paths_containing("super"));
        assert!(pool.prepare_batch(2).is_err());
        fs.clear_faults();
        assert_eq!(pool.lock().spares.len(), 2);
        assert_eq!(pool.prepare_batch(2).expect("batch"), 2);
        assert_eq!(pool.lock().next_file_id, 4, "no new file");
        // The pool thread writes out what the failure removed.
        assert_eq!(pool.write_spares(8).expect("spares"), 2);
        let st = pool.lock();
        let ids: Vec<u32> = st.spares.iter().map(|s| s.id).collect();
        assert_eq!((ids, st.total()), (vec![4, 5], 4));
    }

    #[test]
    fn a_preallocated_pool_keeps_what_it_folds_as_a_spare() {
        let fs = FaultStorage::new();
        let pool = pool_with(&fs, 3, spares(&fs, 3));
        pool.take_next(|| false).expect("first");
        pool.take_next(|| false).expect("second");
        pool.fill_reserve().expect("reserve");
        let folded = pool.commit_fold(1, 1, 1).expect("fold");
        pool.retire(folded);

        // The reserve (one) is full: a plain pool removes the file here
        // (below); a preallocated one keeps it, unlisted.
        let st = pool.lock();
        let (st, kept) = pool.reuse_retired(st, 0);
        kept.expect("kept");
        assert!(st.retired.is_empty());
        assert_eq!(st.spares.iter().map(|s| s.id).collect::<Vec<_>>(), [2]);
        drop(st);
        assert_eq!(pool.counts().bytes, 3 * SEGMENT);
        assert!(fs.exists(&pool.path(2)), "its file stays");
        let listed = pool.super_lock().state().segments.len();
        assert_eq!(listed, 2, "a spare is not listed");
    }

    #[test]
    fn a_preallocated_pool_thread_writes_spares_up_to_the_limit_and_removes_nothing() {
        let fs = FaultStorage::new();
        // Two spares of six (a crash cut the preallocation short).
        let mut spares = spares(&fs, 6);
        for gone in spares.drain(2..) {
            fs.remove_file(&Path::new("/v/journal").join(segment_name(gone.id)))
                .expect("remove");
        }
        let pool = Arc::new(pool_with(&fs, 6, spares));
        pool.lock().reserve = 3; // raised by the writer, say
        let thread = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.maintain())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.counts().bytes < 6 * SEGMENT || pool.counts().free < 3 {
            assert!(Instant::now() < deadline, "not there: {:?}", pool.counts());
            std::thread::sleep(Duration::from_millis(5));
        }
        // The reserve falls back: the free segment above it is unlisted,
        // kept as a spare.
        pool.lock().reserve = 1;
        pool.changed.notify_all();
        while pool.counts().free > 1 {
            assert!(
                Instant::now() < deadline,
                "not released: {:?}",
                pool.counts()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        pool.shutdown();
        thread.join().expect("pool thread");
        assert_eq!(pool.counts().bytes, 6 * SEGMENT);
        assert_eq!(pool.lock().spares.len(), 5);
        for id in 0..6 {
            assert!(fs.exists(&pool.path(id)), "{} removed", segment_name(id));
        }
    }

    #[test]
    fn folded_segments_count_against_the_limit_until_recycled() {
        let fs = FaultStorage::new();
        let pool = small_pool(&fs);
        pool.take_next(|| false).expect("first");
        pool.take_next(|| false).expect("second");
        pool.fill_reserve().expect("reserve");
        assert_eq!(pool.counts().bytes, 3 * SEGMENT);

        let folded = pool.commit_fold(1, 1, 1).expect("fold");
        // Between the fold and `retire` the folded segment still exists.
        assert!(!pool.prepare().expect("prepare"), "the limit holds");
        pool.retire(folded);
        assert!(!pool.prepare().expect("prepare"), "the limit holds");
        let c = pool.counts();
        assert_eq!((c.used, c.free, c.retired), (1, 1, 1));

        // The reserve is full, so the pool thread removes the file.
        let st = pool.lock();
        let (st, removed) = pool.reuse_retired(st, 0);
        removed.expect("removed");
        assert!(st.retired.is_empty());
        drop(st);
        assert_eq!(pool.counts().bytes, 2 * SEGMENT);
        assert!(pool.prepare().expect("prepare"), "room again");
    }

    #[test]
    fn the_write_path_does_not_wait_for_a_super_write() {
        let fs = FaultStorage::new();
        let pool = small_pool(&fs);
        pool.fill_reserve().expect("reserve");
        let base = pool.base();
        // `super` being written (by the pool thread preparing a segment,
        // or the applier ending a fold): the writer still takes the
        // prepared segment, and the index still reads the base. On a
        // thread, so that a writer that waited fails the test, not hangs it.
        let taken = std::thread::scope(|s| {
            let writing = pool.super_lock();
            let (tx, rx) = std::sync::mpsc::channel();
            let pool = &pool;
            s.spawn(move || {
                let taken = pool.take_next(|| false);
                let _ = tx.send((taken, pool.base(), pool.counts().used));
            });
            let taken = rx.recv_timeout(Duration::from_secs(10));
            drop(writing);
            taken
        });
        let (segment, base_seen, used) = taken.expect("no wait for the super write");
        let segment = segment.expect("a prepared segment");
        assert_eq!(pool.used().first().map(|s| s.id), Some(segment.id));
        assert_eq!(base_seen, base);
        assert_eq!(used, 1);
        // What needs `super` goes on once it is free.
        pool.set_horizon(base.horizon_lsn + 5).expect("horizon");
        assert_eq!(pool.base().horizon_lsn, base.horizon_lsn + 5);
    }

    #[test]
    fn the_headroom_falls_with_every_byte_through_the_zone() {
        let fs = FaultStorage::new();
        // Three segments, a reserve of one, no early zone: the zone is the
        // reserve and the segment being written; the room kept is two
        // pieces of one segment.
        let pool = small_pool(&fs);
        assert_eq!(pool.headroom(), None);
        pool.take_next(|| false).expect("first");
        assert_eq!(pool.headroom(), None, "room for the reserve and one more");
        assert_eq!(pool.overflow(), 0);
        pool.take_next(|| false).expect("second");
        pool.set_active_left(SEGMENT);
        assert_eq!(
            pool.headroom(),
            Some(1.0),
            "one segment and a fresh one left"
        );
        assert_eq!(pool.overflow(), 1, "the applier folds from here");
        pool.set_active_left(SEGMENT / 2);
        assert_eq!(pool.headroom(), Some(0.75), "half of the segment written");
        pool.take_next(|| false).expect("third");
        pool.set_active_left(SEGMENT / 4);
        assert_eq!(
            pool.headroom(),
            Some(0.125),
            "a quarter segment to the limit"
        );
        pool.set_active_left(0);
        assert_eq!(pool.headroom(), Some(0.0), "at the hard limit");
        let folded = pool.commit_fold(1, 1, 1).expect("fold");
        assert_eq!(pool.headroom(), Some(0.5), "a fold gives room back");
        pool.retire(folded);
    }

    #[test]
    fn a_reserve_the_writer_runs_out_doubles_up_to_the_early_zone_and_falls_back() {
        let fs = FaultStorage::new();
        // 64 segments: an early zone of 4, so the reserve goes 1, 2, 4.
        let pool = pool_of(&fs, 64);
        pool.fill_reserve().expect("reserve");
        let take_all_then_one = |expected_reserve: u64| {
            while pool.counts().free > 0 {
                pool.take_next(|| false).expect("prepared");
            }
            pool.take_next(|| false)
                .expect("prepared on the write path");
            assert_eq!(pool.lock().reserve, expected_reserve);
            pool.fill_reserve().expect("reserve");
            assert_eq!(pool.counts().free, expected_reserve);
        };
        take_all_then_one(2);
        take_all_then_one(4);
        take_all_then_one(4);

        // The pool thread lowers it a segment per `RESERVE_DECAY` and
        // releases the extra prepared segment.
        std::thread::scope(|s| {
            s.spawn(|| pool.maintain());
            let back_then = Instant::now().checked_sub(RESERVE_DECAY);
            pool.lock().reserve_changed = back_then.expect("a monotonic clock that far back");
            pool.changed.notify_all();
            let deadline = Instant::now() + Duration::from_secs(10);
            while pool.counts().free != 3 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            pool.shutdown();
        });
        assert_eq!(pool.lock().reserve, 3);
        assert_eq!(
            pool.counts().free,
            3,
            "released down to the lowered reserve"
        );
    }

    #[test]
    fn a_batch_of_segments_is_durable_and_listed_before_it_is_handed_out() {
        let fs = FaultStorage::new();
        let pool = pool_of(&fs, 64);
        assert_eq!(pool.prepare_batch(5).expect("batch"), 5);
        assert_eq!(pool.counts().free, 5);
        for seed in 0..16 {
            let crashed = fs.crash(seed);
            let sb = Superblock::open(&crashed, Path::new("/v"), pool.volume).expect("super");
            let listed = &sb.state().segments;
            assert_eq!(listed.len(), 5, "seed {seed}");
            for r in listed {
                let bytes = crashed.contents(&pool.path(r.file_id)).expect("file");
                let header = SegmentHeader::decode(&bytes).expect("a durable header");
                assert_eq!((header.seq, header.volume), (r.seq, pool.volume));
            }
        }
        // As many as the limit leaves, then none.
        assert_eq!(pool.prepare_batch(100).expect("batch"), 59);
        assert_eq!(pool.prepare_batch(1).expect("batch"), 0);
    }

    #[test]
    fn a_batch_that_fails_leaves_no_file_and_nothing_counted() {
        let fs = FaultStorage::new();
        let pool = pool_of(&fs, 64);
        fs.inject(Fault::once_after(FaultOp::Allocate, 2, libc::ENOSPC));
        assert!(pool.prepare_batch(4).is_err());
        fs.clear_faults();
        let files = fs.list_dir(&pool.dir).expect("ls");
        assert!(files.is_empty(), "{files:?}");
        assert_eq!(pool.lock().total(), 0);
        assert_eq!(pool.prepare_batch(4).expect("batch"), 4);
    }

    #[test]
    fn a_writer_that_runs_out_waits_for_the_batch_on_its_way() {
        let fs = FaultStorage::new();
        let pool = pool_of(&fs, 64);
        fs.slow_down(FaultOp::Sync, ".seg", Duration::from_millis(20));
        let batch: Vec<u32> = {
            let st = pool.lock();
            (0..3).map(|i| st.next_file_id + i).collect()
        };
        std::thread::scope(|s| {
            s.spawn(|| pool.prepare_batch(3).expect("batch"));
            while pool.lock().preparing == 0 {
                std::thread::yield_now();
            }
            let taken = pool.take_next(|| false).expect("a segment");
            assert!(batch.contains(&taken.id), "{} from {batch:?}", taken.id);
        });
        let files = fs.list_dir(&pool.dir).expect("ls");
        assert_eq!(files.len(), 3, "none prepared beside the batch: {files:?}");
    }

    #[test]
    fn a_segment_being_released_is_room_for_a_writer_at_the_limit() {
        let fs = FaultStorage::new();
        let pool = pool_of(&fs, 4);
        let _first = pool.take_next(|| false).expect("first");
        let _second = pool.take_next(|| false).expect("second");
        pool.prepare_batch(2).expect("batch");
        {
            let mut st = pool.lock();
            assert_eq!(
                (st.free.len(), st.total()),
                (2, 4),
                "two free, the pool full"
            );
            // As the reserve decays back (the first writer raised it).
            st.reserve = 1;
        }
        // The release of the free segment beyond the reserve stalls in
        // the sync of `super` that unlists it, the segment counted as
        // leaving.
        fs.slow_down(
            FaultOp::Sync,
            crate::superblock::SUPER_FILE,
            Duration::from_millis(200),
        );
        std::thread::scope(|s| {
            s.spawn(|| pool.release_one(pool.lock()).1.expect("released"));
            fs.wait_stalled("the release's sync");
            assert_eq!(pool.lock().leaving, 1);
            let _third = pool.take_next(|| true).expect("the free one");
            // No room but the leaving segment's: a writer that would give
            // up at the hard limit waits for it rather than fail.
            let fourth = pool.take_next(|| true);
            assert!(fourth.is_ok(), "{fourth:?}");
        });
        fs.clear_faults();
    }

    #[test]
    fn a_small_pool_keeps_its_reserve_when_run_out() {
        let fs = FaultStorage::new();
        let pool = small_pool(&fs);
        pool.take_next(|| false)
            .expect("prepared on the write path");
        assert_eq!(pool.lock().reserve, 1, "no early zone to raise it into");
    }

    #[test]
    fn large_pools_fold_early_in_pieces() {
        assert_eq!(early_fold_segments(8), 0);
        assert_eq!(early_fold_segments(64), 4);
        assert_eq!(early_fold_segments(16384), 16);
    }

    #[test]
    fn a_cut_unlists_the_segments_after_those_kept() {
        let fs = FaultStorage::new();
        let pool = small_pool(&fs);
        let first = pool.take_next(|| false).expect("first");
        let second = pool.take_next(|| false).expect("second");
        assert!(pool.cut(2).expect("nothing to cut").is_empty());
        let cut = pool.cut(1).expect("cut");
        assert_eq!(cut.len(), 1);
        assert!(Arc::ptr_eq(&cut[0], &second));
        let listed: Vec<u32> = Superblock::open(&fs, Path::new("/v"), pool.volume)
            .expect("super")
            .state()
            .segments
            .iter()
            .map(|s| s.file_id)
            .collect();
        assert_eq!(listed, vec![first.id], "durably unlisted");
        let c = pool.counts();
        assert_eq!((c.used, c.retired), (1, 1), "counted until recycled");
        pool.retire(cut);
        assert!(pool.segment(second.id).is_none());
        assert!(pool.segment(first.id).is_some());
    }

    #[test]
    fn a_failed_removal_keeps_the_segment_counted_and_is_retried() {
        let fs = FaultStorage::new();
        let pool = small_pool(&fs);
        pool.take_next(|| false).expect("first");
        pool.fill_reserve().expect("reserve");
        let folded = pool.commit_fold(1, 1, 1).expect("fold");
        pool.retire(folded);
        pool.fill_reserve().expect("reserve");

        fs.inject(Fault::always(FaultOp::SyncDir, libc::EIO));
        let (st, removed) = pool.reuse_retired(pool.lock(), 0);
        assert!(removed.is_err());
        assert_eq!(st.retired.len(), 1, "still counted");
        drop(st);
        fs.clear_faults();
        let (st, removed) = pool.reuse_retired(pool.lock(), 0);
        removed.expect("the retry finds the file gone and finishes");
        assert!(st.retired.is_empty());
    }
}
