//! A volume: base.img plus the journal of every write since.
//!
//! Data path (any number of threads at once):
//! - an append computes its checksums, then takes the cursor lock only to
//!   reserve an lsn, a timestamp and a place in the current segment; the
//!   write itself, the extent map update (per shard) and the completion
//!   mark happen outside it;
//! - a read looks its range up in the extent map (per-shard read locks, no
//!   IO under them) and reads each piece from base.img or a segment;
//! - a flush waits for the contiguous prefix of completed lsns to cover
//!   every write it must, then one thread syncs the dirty segments for all
//!   waiting flushes (group commit), then a Flush record marks the cut (in
//!   an inline segment, the next record's header does).
//!
//! Segments are written in one of two layouts (format.rs): header slots
//! through the page cache, or inline with O_DIRECT where the guest makes
//! its writes durable one by one (`choose_layout`).
//!
//! History: the applier (fold.rs) folds records older than the window into
//! base.img and releases their segments; point-in-time views (view.rs) are
//! built from the record index. A revert is a record too: it resets the
//! live map to a view's under the cursor lock.
//!
//! Errors: EIO and ENOSPC on the volume's files are retried with backoff for
//! up to `RetryPolicy::max_hold`, so a transient fault shows as latency. If
//! an append still fails, its lsn is a hole that no flush can cover: the
//! volume stops taking writes (reads go on) until it is reopened, and
//! recovery then ends the log at the hole. A failed sync is never retried
//! (after a failed fsync the kernel may have dropped the dirty pages), so it
//! too stops the volume.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::completion::Completion;
use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Piece, Pieces, Source, Target};
use crate::format::{
    check_bookmark_name, check_range, crc32c, InlineStamp, Layout, Position, RecordHeader,
    RecordKind, SegmentHeader, LARGE_PAYLOAD, PAGE, RECORD_HEADER_SIZE, SECTOR,
};
use crate::meta::{EpochStart, Role, VolumeConfig, VolumeSettings, VOLUME_FILE};
use crate::pace::Pacer;
use crate::payload_buffer::PayloadBuffer;
use crate::point::PointInTime;
use crate::pool::{segment_name, write_header, Pool, PoolSetup, Segment, Spare, JOURNAL_DIR};
use crate::record_index::{Bookmark, Effect, Entry, RecordIndex, PAGE_OUT_BATCH, PAGE_OUT_CHUNKS};
use crate::recovery::{recover, RecoveryReport};
use crate::storage::{
    aligned_zeroes, write_direct_parts, ImportMode, LockGuard, Progress, Storage, StorageFile,
    ALIGNED_ZEROES,
};
use crate::superblock::{SuperState, Superblock, SUPER_FILE};

mod branch;
mod checkpoint;
mod fold;
mod out_of_sync;
mod read_plan;
mod resync;
mod role;
mod ship;
mod view;

pub use branch::BranchInfo;
pub use fold::FoldReport;
pub use out_of_sync::{OutOfSync, OUT_OF_SYNC_CHUNK};
pub use read_plan::{FileRead, ReadPlan};
pub use resync::ResyncState;
pub use ship::{ShipBatch, ShippedRecord, SHIPPED_HEADER_SIZE};
pub use view::View;

pub const BASE_FILE: &str = "base.img";

/// What a new volume's base.img starts as.
#[derive(Debug, Clone, Copy)]
pub enum BaseImage<'a> {
    /// All zeroes (a sparse file).
    Empty,
    /// An existing raw image; the volume's size must be at least its size.
    Import { path: &'a Path, mode: ImportMode },
}

/// How long an IO error on the volume's files is retried before it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_hold: Duration,
    pub first_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Well under the ~30 s after which guests start resetting devices.
    fn default() -> Self {
        RetryPolicy {
            max_hold: Duration::from_secs(10),
            first_backoff: Duration::from_millis(1),
        }
    }
}

/// 256 MiB: a tail of that size verifies in well under a second warm, and
/// a checkpoint (32 bytes a record) is at most 1/16 of what it spares.
const DEFAULT_CHECKPOINT_EVERY: u64 = 256 << 20;

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub clock: Arc<dyn Clock>,
    /// Every write is durable before it returns (virtio-blk with WCE off).
    pub writethrough: bool,
    pub retry: RetryPolicy,
    /// Open a damaged journal anyway, ending it at the damage, even where
    /// a Flush record proves that data past it had been flushed.
    pub truncate_damaged: bool,
    /// How often the applier looks for records that left the window; with
    /// `None` it folds only when the hard limit presses (and on
    /// [`Volume::fold_now`]).
    pub fold_interval: Option<Duration>,
    /// Checkpoint the record index after this many bytes of new segments
    /// (and at close), so that an open verifies only the records after
    /// the checkpoint (volume/checkpoint.rs); a journal smaller than this
    /// gets none. `None`: never.
    pub checkpoint_every: Option<u64>,
    /// How new segment uses place their records (format.rs, `Layout`).
    pub layout: LayoutChoice,
}

/// Which layout the writer gives a segment as it moves into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayoutChoice {
    /// Inline where the writes are mostly made durable one by one (the
    /// segment before had a sync for every two writes or fewer, or the
    /// volume is in writethrough mode) and the file system takes O_DIRECT;
    /// slots otherwise.
    #[default]
    Auto,
    Slots,
    /// Inline wherever the file system takes O_DIRECT.
    Inline,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            clock: Arc::new(SystemClock),
            writethrough: false,
            retry: RetryPolicy::default(),
            truncate_damaged: false,
            fold_interval: Some(Duration::from_secs(1)),
            checkpoint_every: Some(DEFAULT_CHECKPOINT_EVERY),
            layout: LayoutChoice::Auto,
        }
    }
}

/// A write recorded by [`Volume::write_buffer_unordered`], and its (last)
/// record's lsn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Every record up to its own is written: it may be reported done.
    InOrder(u64),
    /// A record placed before its own is still being written: it may be
    /// reported done once [`Volume::wait_written`] returns.
    AfterOthers(u64),
}

/// A snapshot of a volume's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub uuid: Uuid,
    pub size: u64,
    pub epoch: u64,
    pub segment_size: u64,
    pub segments_used: u64,
    pub segments_free: u64,
    /// Free segments the pool keeps prepared now: `reserve_segments`, or
    /// more while the writer outruns the pool's thread (pool.rs).
    pub reserve_target: u64,
    /// Bytes the pool's segment files occupy.
    pub journal_bytes: u64,
    pub journal_max: u64,
    pub journal_warn: u64,
    /// The pool's files, less a preallocated pool's spares, reach
    /// `journal_warn`.
    pub over_warning: bool,
    pub base_lsn: u64,
    /// Highest lsn appended (0 if none).
    pub last_lsn: u64,
    /// Every lsn up to here survives a crash.
    pub durable_lsn: u64,
    /// Timestamps (ns since the epoch) of the oldest and newest records.
    pub oldest_record_ns: Option<u64>,
    pub newest_record_ns: Option<u64>,
    pub extents: usize,
    pub writethrough: bool,
    /// Why the volume stopped taking writes, if it did.
    pub failed: Option<String>,
    /// History the volume is set to keep.
    pub window_configured: Duration,
    /// History it keeps now: from `window_start_ns` to now.
    pub window_effective: Duration,
    /// The oldest moment a view, materialize or revert can reach.
    pub window_start_ns: u64,
    /// Folds the hard limit forced before records left the window; each
    /// one shrank the effective window below the configured one.
    pub forced_folds: u64,
    pub segments_retired: u64,
    /// Journal bytes the applier folded into base.img since the open, and
    /// the time it spent folding them (its throughput is their ratio).
    pub folded_bytes: u64,
    pub fold_nanos: u64,
    /// Requests held now, retrying an EIO or ENOSPC on the volume's files.
    pub held_requests: u64,
}

/// The history a volume holds, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    pub window_configured: Duration,
    pub window_effective: Duration,
    /// Oldest and newest moments reachable (the newest is now).
    pub window_start_ns: u64,
    pub window_end_ns: u64,
    /// Lsns reachable: the disk as of any lsn in `start_lsn..=last_lsn`.
    pub start_lsn: u64,
    pub last_lsn: u64,
    pub bookmarks: Vec<Bookmark>,
    pub flush_points: u64,
    pub journal_bytes: u64,
    pub journal_max: u64,
    pub forced_folds: u64,
}

#[derive(Debug)]
struct Cursor {
    next_lsn: u64,
    last_timestamp: u64,
    active: Option<Arc<Segment>>,
    /// How `active` places its records, and where the next one goes.
    layout: Layout,
    at: Position,
    /// Records placed in `active`.
    records: u64,
    /// How `active` takes its records.
    mode: Mode,
    /// What the writer learns of the workload for `choose_layout`.
    workload: Workload,
    /// The highest lsn a record placed so far proves durable (a Flush
    /// record's, or an inline header's `durable_lsn`; at open, the
    /// recovered end), and whether a flush left a higher one to the next
    /// record (`flush` in an inline segment).
    proved_lsn: u64,
    proof_owed: bool,
    /// Inline: `active` holds no unwritten extents below it (`zero_ahead`).
    zeroed_to: u64,
    /// Slots: which payloads of `active` go in as stores into its mapping.
    stores: StoreCheck,
}

/// Where the payloads of a slots segment use may be written as stores into
/// the file's mapping (`StorageFile::write_mapped_at`): they take no file
/// lock, so several queues' copies run side by side where pwrite queues
/// them behind ext4's inode lock. But a store into a page the page cache
/// does not hold reads the page from the disk first, where pwrite of a
/// whole page does not, and a store that fails is a SIGBUS, not an error
/// to retry: a stretch of a recycled segment whose pages were evicted, or
/// of a file not preallocated, is written with pwrite
/// (`StorageFile::stores_read_nothing`). Checked a stretch ahead at a
/// time (one or two system calls a MiB) from the payload's first whole
/// page: the page it starts in, if it starts inside one, holds the bytes
/// before it, written moments ago (an earlier payload, or the segment's
/// header). A page evicted since the check costs a read of it (and of
/// the pages around it: readahead, which also zeroes the pages of
/// unwritten extents in large folios; MADV_RANDOM, one page a fault, made
/// warm 4 KiB writes 1.7x slower here).
#[derive(Debug, Default, Clone, Copy)]
struct StoreCheck {
    /// End of the stretch checked last.
    to: u64,
    /// Whether stores there read nothing (`StorageFile::stores_read_nothing`).
    read_nothing: bool,
}

/// How far ahead of a payload `StoreCheck` looks.
const STORE_CHECK_AHEAD: u64 = 1 << 20;

/// Largest payload written as stores. A store faults each page of the
/// mapping in on its own, where one pwrite copies a large payload into
/// large folios in one call.
const STORE_MAX: u64 = 64 << 10;

impl StoreCheck {
    /// Whether the payload at `[at, at + len)` of `segment`, whose header
    /// goes in the slot at `slot`, goes in as a store.
    fn may_store(&mut self, segment: &Segment, at: u64, len: u64, slot: u64) -> bool {
        if len > STORE_MAX {
            return false;
        }
        let end = at + len;
        if end <= self.to {
            return self.read_nothing;
        }
        let page = rustix::param::page_size() as u64;
        let from = at.next_multiple_of(page);
        if from >= end {
            // All in the page it starts in.
            self.to = end;
            self.read_nothing = true;
            return true;
        }
        // Not into the header slots' pages, which are written in their
        // own way.
        let slots = slot - slot % page;
        self.to = (from + STORE_CHECK_AHEAD).min(slots).max(end);
        self.read_nothing = segment.file.stores_read_nothing(from, self.to - from);
        self.read_nothing
    }
}

/// A live view's claim on history: the applier does not fold past `lsn`
/// unless the hard limit forces it, and then expires the view first.
#[derive(Debug)]
struct ViewPin {
    lsn: u64,
    /// Reads hold it shared for their whole duration, so expiring waits
    /// for them.
    state: std::sync::RwLock<PinState>,
}

#[derive(Debug)]
struct PinState {
    /// Why reads of the view fail, once it is expired.
    expired: Option<String>,
    /// The segments the view reads; holding them keeps them from reuse.
    segments: Vec<Arc<Segment>>,
}

/// A record's payload as `write_reserved` gets it.
enum Payload<'a> {
    Bytes(&'a [u8]),
    /// With room in front for the header: an inline record is sent from
    /// there without another copy.
    Framed(&'a mut PayloadBuffer),
}

impl Payload<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Bytes(bytes) => bytes,
            Payload::Framed(buf) => buf.payload(),
        }
    }
}

/// A record placed in the journal, not yet written.
#[derive(Debug)]
struct Reserved {
    header: RecordHeader,
    slot: u64,
    segment: Arc<Segment>,
    /// The segment the journal moved on from, if it did.
    sealed: Option<Arc<Segment>>,
    /// Whether the payload goes in as a store into the segment's mapping
    /// (`StoreCheck`).
    stored: bool,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    config: VolumeConfig,
    /// What volume.json holds now: `config` plus the epoch and epoch
    /// history as they changed since the open. Written under this lock.
    persisted: Mutex<VolumeConfig>,
    /// `persisted.role` is `Replica`: read on every flush, which must not
    /// wait behind a volume.json write holding `persisted`.
    replica: AtomicBool,
    clock: Arc<dyn Clock>,
    retry: RetryPolicy,
    /// The fencing epoch records are written with. Changes only under the
    /// cursor lock (`raise_epoch`).
    epoch: AtomicU64,
    /// Live [`ReleaseHeld`] guards: while any exists, requests held on an
    /// IO error give up instead of retrying.
    releasing: AtomicU64,
    base: Arc<dyn crate::storage::StorageFile>,
    pool: Arc<Pool>,
    map: ExtentMap,
    cursor: Mutex<Cursor>,
    /// Every record after base_lsn. Lock order: cursor, then index.
    index: Mutex<RecordIndex>,
    views: Mutex<Vec<Weak<ViewPin>>>,
    /// One fold at a time.
    fold_lock: Mutex<()>,
    forced_folds: AtomicU64,
    forced_fold_log: Mutex<fold::ForcedFoldLog>,
    /// See `Stats::folded_bytes` and `Stats::fold_nanos`.
    folded_bytes: AtomicU64,
    fold_nanos: AtomicU64,
    /// Requests inside `retrying` after an error.
    held_requests: AtomicU64,
    shutdown: AtomicBool,
    /// Highest lsn of a record other than Flush (what a flush covers).
    last_data_lsn: AtomicU64,
    completion: Completion,
    durable_lsn: AtomicU64,
    sync_lock: Mutex<()>,
    writethrough: AtomicBool,
    warned: AtomicBool,
    failure: OnceLock<String>,
    max_payload: u64,
    /// The applier folds past this lsn only when the hard limit forces it:
    /// a replica has not made the records after it durable (`NO_HOLD`: no
    /// replica holds history).
    replica_hold: AtomicU64,
    /// A resync under way (resync.rs): nothing is readable, nothing folds.
    resync: Mutex<Option<ResyncState>>,
    /// Slows guest writes down as the pool nears its hard limit (pace.rs).
    pacer: Pacer,
    /// Chunks a forced fold took from the replica (out_of_sync.rs).
    out_of_sync: Mutex<Option<OutOfSync>>,
    /// Read-only branches a cut made (branch.rs).
    branches: Mutex<Vec<branch::Branch>>,
    checkpoint_every: Option<u64>,
    /// The last checkpoint; held while one is taken (checkpoint.rs).
    checkpointed: Mutex<checkpoint::Checkpointed>,
    layout_choice: LayoutChoice,
    /// False once the journal's file system refused an O_DIRECT write:
    /// segments then keep the slots layout.
    direct_writes: AtomicBool,
    /// Syncs of the journal so far (`flush`), for `choose_layout`.
    syncs: AtomicU64,
    /// Whether the active segment is in `Mode::Bulk`.
    bulk: AtomicBool,
    /// The machine's memory, in bytes, for `wanted_mode`.
    memory: u64,
}

/// How far ahead of the records of an inline segment `zero_ahead` keeps
/// the file written, and how much it zeroes at a time: each chunk costs
/// the sync after it a commit of ext4's journal (about 7 ms here), so
/// chunks are large. Durable 4 KiB writes into a new file, against one
/// written before (a Python check of the pattern): 0.77x with 1 MiB
/// chunks, 0.91x with 8 MiB.
const ZERO_AHEAD: u64 = 8 << 20;
// A chunk is written in one request.
const _: () = assert!(ZERO_AHEAD <= ALIGNED_ZEROES);

/// Data records a verdict of `Workload` looks back on at most.
const WORKLOAD_WINDOW: u64 = 256;

/// Payload bytes a verdict of `Workload` looks back on at most: large
/// writes get their verdict within a fraction of a segment.
const WORKLOAD_WINDOW_BYTES: u64 = 32 << 20;

/// How the active segment takes its records (`choose_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// Header slots, payloads through the page cache.
    #[default]
    Slots,
    /// Inline records written with O_DIRECT, zeroed ahead (`zero_ahead`)
    /// so that a sync after each record commits no extent conversion.
    Durable,
    /// Inline records written with O_DIRECT, not zeroed: large writes far
    /// from the journal's limit. They go around the page cache (whose
    /// copy into new pages, one writer at a time, is a buffered journal's
    /// cost at a device's sequential rate), and several go to the device
    /// at once (the daemon runs them on its IO threads:
    /// `Volume::bulk_writes`). Where the page cache would not spare the
    /// fold a read of them from the disk (`bulk_pays`).
    Bulk,
}

/// What the writer learns of the workload, judged over windows of
/// `WORKLOAD_WINDOW` data records or `WORKLOAD_WINDOW_BYTES` of payload,
/// whichever comes first: whether the guest makes its writes durable one
/// by one (a FUA write, or a write and a flush, each: `Mode::Durable`
/// suits that, slots suit writes made durable in batches, or not at
/// all), and whether its writes are large (`Mode::Bulk`).
#[derive(Debug, Default)]
struct Workload {
    /// Data records in the current window, their payload bytes, those of
    /// `LARGE_PAYLOAD` or more, and `Inner::syncs` at its start.
    records: u64,
    bytes: u64,
    large: u64,
    syncs_at: u64,
    /// The last verdicts: a sync for every two data records or fewer;
    /// three records in four large. Each turns back only past a second
    /// threshold (one sync in four records; one large in two), so that
    /// they do not flap in between.
    one_by_one: bool,
    bulk: bool,
    /// Windows in a row whose verdicts disagreed with the active
    /// segment's mode; at two, `switch`: the writer moves to a new segment.
    disagreed: u8,
    switch: bool,
}

impl Workload {
    /// Counts a data record of `payload` bytes, `syncs` being
    /// `Inner::syncs` now; true where it closed a window (the verdicts
    /// are new: `judge` them).
    fn count(&mut self, syncs: u64, payload: u64) -> bool {
        self.records += 1;
        self.bytes += payload;
        self.large += u64::from(payload >= LARGE_PAYLOAD);
        if self.records < WORKLOAD_WINDOW && self.bytes < WORKLOAD_WINDOW_BYTES {
            return false;
        }
        let synced = syncs - self.syncs_at;
        if synced * 2 >= self.records {
            self.one_by_one = true;
        } else if synced * 4 < self.records {
            self.one_by_one = false;
        }
        if self.large * 4 >= self.records * 3 {
            self.bulk = true;
        } else if self.large * 2 < self.records {
            self.bulk = false;
        }
        self.records = 0;
        self.bytes = 0;
        self.large = 0;
        self.syncs_at = syncs;
        true
    }

    /// Notes, at the end of a window, whether the mode its verdicts want
    /// differs from the active segment's.
    fn judge(&mut self, disagrees: bool) {
        if !disagrees {
            self.disagreed = 0;
            return;
        }
        self.disagreed = self.disagreed.saturating_add(1);
        if self.disagreed >= 2 {
            self.switch = true;
        }
    }

    /// The writer moved to a segment in the mode the verdicts want.
    fn switched(&mut self) {
        self.disagreed = 0;
        self.switch = false;
    }
}

/// Whether large writes should go around the page cache (`Mode::Bulk`)
/// with `held` bytes in a pool limited to `journal_max`, on a machine of
/// `memory` bytes. Through the page cache, the fold copies records still
/// in it without reading the disk: worth its cost (one copy per write,
/// and dirty-page throttling at a device's sequential rate) only for
/// records folded soon, while still cached. So direct while the pool
/// holds at most a quarter of its limit, and always when the journal is
/// at least half the memory: its records leave the page cache long before
/// they are folded (vhost-blk/BENCHMARKS.md, "Large writes stay direct in
/// a journal larger than the page cache": a 16 GiB journal past a quarter
/// fell from about 2 GB/s to 96-173 MiB/s through the page cache).
fn bulk_pays(held: u64, journal_max: u64, memory: u64) -> bool {
    held <= journal_max / 4 || journal_max >= memory / 2
}

/// The machine's memory in bytes (`sysinfo`).
fn memory() -> u64 {
    let info = rustix::system::sysinfo();
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

/// `replica_hold` when no replica holds history back.
const NO_HOLD: u64 = u64::MAX;

/// Counts a request in `Inner::held_requests` from its first retried
/// error until it returns.
struct HeldRequest<'a>(&'a AtomicU64, std::cell::Cell<bool>);

impl HeldRequest<'_> {
    fn start(&self) {
        if !self.1.replace(true) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for HeldRequest<'_> {
    fn drop(&mut self) {
        if self.1.get() {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// See [`Volume::release_held`].
#[derive(Debug)]
pub struct ReleaseHeld<'a> {
    volume: &'a Volume,
}

impl Drop for ReleaseHeld<'_> {
    fn drop(&mut self) {
        self.volume.inner.releasing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open volume. All methods take `&self` and may be called from many
/// threads. Dropping it does not flush: call [`Volume::close`] for that.
#[derive(Debug)]
pub struct Volume {
    inner: Arc<Inner>,
    maintainer: Option<JoinHandle<()>>,
    applier: Option<JoinHandle<()>>,
    /// The flock on `<vol>/super` that keeps a second open out.
    _lock: LockGuard,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `lock(m)`, or with `wait` false only if nobody holds it.
fn lock_or_skip<T>(m: &Mutex<T>, wait: bool) -> Option<MutexGuard<'_, T>> {
    if wait {
        return Some(lock(m));
    }
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == libc_eio() || code == libc_enospc())
}

fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}

fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

impl Volume {
    /// Creates a volume in `dir` (which must not exist or be empty).
    pub fn create(
        storage: &dyn Storage,
        dir: &Path,
        settings: &VolumeSettings,
        base: BaseImage<'_>,
        progress: Progress<'_>,
    ) -> Result<VolumeConfig> {
        Self::create_as(storage, dir, VolumeConfig::new(settings), base, progress)
    }

    /// Creates an empty replica of the primary volume `primary` in `dir`:
    /// the same identity, its own window and journal limits; it receives
    /// the primary's records (`apply_shipped`).
    pub fn create_replica(
        storage: &dyn Storage,
        dir: &Path,
        settings: &VolumeSettings,
        primary: Uuid,
    ) -> Result<VolumeConfig> {
        let config = VolumeConfig {
            uuid: primary,
            role: Role::Replica,
            ..VolumeConfig::new(settings)
        };
        Self::create_as(storage, dir, config, BaseImage::Empty, &mut |_, _| {})
    }

    fn create_as(
        storage: &dyn Storage,
        dir: &Path,
        config: VolumeConfig,
        base: BaseImage<'_>,
        progress: Progress<'_>,
    ) -> Result<VolumeConfig> {
        let settings = &config.settings();
        settings.validate()?;
        // Check an image before anything is created or moved.
        if let BaseImage::Import { path, .. } = base {
            check_image(path, settings)?;
        }
        if storage.exists(dir) {
            let entries = storage
                .list_dir(dir)
                .map_err(Error::io(|| format!("listing {}", dir.display())))?;
            if !entries.is_empty() {
                return Err(Error::Exists(dir.to_owned()));
            }
        }
        let journal = dir.join(JOURNAL_DIR);
        storage
            .create_dir_all(&journal)
            .map_err(Error::io(|| format!("creating {}", journal.display())))?;
        let base_path = dir.join(BASE_FILE);
        let base_err = || format!("creating {}", base_path.display());
        match base {
            BaseImage::Empty => {
                let f = storage
                    .create_new(&base_path)
                    .map_err(Error::io(base_err))?;
                f.set_len(settings.size)
                    .and_then(|()| f.sync_data())
                    .map_err(Error::io(base_err))?;
                progress(settings.size, settings.size);
            }
            BaseImage::Import { path, mode } => {
                let method = storage
                    .import(path, &base_path, mode, progress)
                    .map_err(Error::io(|| format!("importing {}", path.display())))?;
                let f = storage.open(&base_path).map_err(Error::io(base_err))?;
                if f.size().map_err(Error::io(base_err))? < settings.size {
                    f.set_len(settings.size)
                        .and_then(|()| f.sync_data())
                        .map_err(Error::io(base_err))?;
                }
                tracing::info!(?method, image = %path.display(), "imported base image");
            }
        }
        Superblock::create(storage, dir, config.uuid)?;
        if config.preallocate_journal {
            crate::pool::preallocate(
                storage,
                dir,
                config.uuid,
                config.segment_size,
                config.journal_max,
                progress,
            )?;
        }
        // volume.json last: its presence marks a complete volume.
        config.store(storage, dir)?;
        Ok(config)
    }

    /// Opens a volume, recovering its journal.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: OpenOptions,
    ) -> Result<(Volume, RecoveryReport)> {
        let config = VolumeConfig::load(storage.as_ref(), dir)?;
        // `super`, the one file of a volume that is only ever rewritten in
        // place: a lock on a file replaced by rename (volume.json) stays
        // on the old file, and the next open would lock the new one.
        let lock_guard = storage.lock(&dir.join(SUPER_FILE)).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                Error::Locked(dir.to_owned())
            } else {
                Error::io(|| format!("locking {}", dir.display()))(e)
            }
        })?;
        let sb = Superblock::open(storage.as_ref(), dir, config.uuid)?;
        let base_path = dir.join(BASE_FILE);
        let base = storage
            .open(&base_path)
            .map_err(Error::io(|| format!("opening {}", base_path.display())))?;
        // `create` makes base.img the disk's size. Another size is a
        // damaged volume.json (or base.img): trusted, it would size the
        // extent map and judge every record's range.
        let base_len = base
            .size()
            .map_err(Error::io(|| format!("reading {}", base_path.display())))?;
        if base_len != config.size {
            return Err(Error::BadMetadata {
                path: dir.join(VOLUME_FILE),
                reason: format!(
                    "it gives the disk {} bytes, but {} has {base_len}",
                    config.size,
                    base_path.display()
                ),
            });
        }
        let cut = branch::pending_cut(storage.as_ref(), dir, config.uuid)?;
        remove_checkpoint_leftover(storage.as_ref(), dir)?;
        let journal_dir = dir.join(JOURNAL_DIR);
        let unlisted = unlisted_names(storage.as_ref(), &journal_dir, sb.state())?;
        for name in &unlisted {
            let path = journal_dir.join(name);
            check_unlisted(storage.as_ref(), dir, &path, sb.state(), &config)?;
        }
        let recovered = recover(
            storage.as_ref(),
            dir,
            &config,
            sb.state(),
            options.truncate_damaged,
            cut,
        )?;
        let report = recovered.report.clone();
        tracing::info!(volume = %config.uuid, dir = %dir.display(), "{report}");

        // What recovery read may be only in the page cache: make it durable
        // before anything is appended after it.
        for seg in &recovered.used {
            seg.file
                .sync_data()
                .map_err(Error::io(|| format!("syncing segment {}", seg.id)))?;
        }
        let mut next_seq = sb.state().next_seq;
        let mut free = Vec::new();
        for (id, file) in recovered.stale {
            let Some(file) = file else { continue };
            let path = journal_dir.join(segment_name(id));
            write_header(file.as_ref(), config.uuid, next_seq, config.segment_size)
                .map_err(Error::io(|| format!("preparing {}", path.display())))?;
            free.push(Arc::new(Segment::new(id, next_seq, file)));
            next_seq += 1;
        }
        let listed = sb.state().segments.len() as u64;
        let spares = unlisted_files(storage.as_ref(), &journal_dir, unlisted, listed, &config)?;
        let pool = Arc::new(Pool::new(PoolSetup {
            storage: storage.clone(),
            volume_dir: dir.to_owned(),
            volume: config.uuid,
            segment_size: config.segment_size,
            journal_max: config.journal_max,
            reserve: config.reserve_segments,
            sb,
            used: recovered.used,
            free,
            next_seq,
            max_wait: options.retry.max_hold,
            preallocated: config.preallocate_journal,
            spares,
        })?);
        pool.fill_reserve()?;
        let mut index = recovered.index;
        if index.base_lsn() == 0 && pool.base().timestamp == 0 {
            // First open: the initial image is the disk from now on (or
            // from the first record, if something wrote before).
            let start = index
                .bounds()
                .map_or(options.clock.now_ns(), |b| b.0)
                .saturating_sub(1);
            pool.set_base_timestamp(start)?;
            index = index.with_base_timestamp(start);
        }

        // An Epoch record is durable before volume.json names its epoch; a
        // crash in between leaves the record to say it.
        let mut config = config;
        if recovered.epoch > config.epoch {
            for start in &recovered.epoch_starts {
                config.start_epoch(*start);
            }
            config.epoch = recovered.epoch;
            config.store(storage.as_ref(), dir)?;
        }
        if config.node == 0 {
            // Made before node tags: this copy gets one now.
            config.node = crate::meta::new_node_tag();
            config.store(storage.as_ref(), dir)?;
        }
        let epoch = config.epoch;
        let next_lsn = report.next_lsn;
        let base_lsn = index.base_lsn();
        view::remove_scratch_files(storage.as_ref(), dir)?;
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            storage: storage.clone(),
            max_payload: config.max_record_payload(),
            persisted: Mutex::new(config.clone()),
            replica: AtomicBool::new(config.role == Role::Replica),
            config,
            clock: options.clock,
            retry: options.retry,
            epoch: AtomicU64::new(epoch),
            releasing: AtomicU64::new(0),
            base,
            pool: pool.clone(),
            map: recovered.map,
            cursor: Mutex::new(Cursor {
                next_lsn,
                last_timestamp: index.timestamp(next_lsn - 1),
                // Never append after a crashed run's tail: start a fresh segment.
                active: None,
                layout: Layout::Slots,
                at: Position { slot: 0, top: 0 },
                records: 0,
                mode: Mode::Slots,
                workload: Workload::default(),
                proved_lsn: next_lsn - 1,
                proof_owed: false,
                zeroed_to: 0,
                stores: StoreCheck::default(),
            }),
            index: Mutex::new(index),
            views: Mutex::new(Vec::new()),
            fold_lock: Mutex::new(()),
            forced_folds: AtomicU64::new(0),
            forced_fold_log: Mutex::default(),
            folded_bytes: AtomicU64::new(0),
            fold_nanos: AtomicU64::new(0),
            held_requests: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            last_data_lsn: AtomicU64::new(recovered.last_data_lsn),
            completion: Completion::new(next_lsn - 1),
            durable_lsn: AtomicU64::new(next_lsn - 1),
            sync_lock: Mutex::new(()),
            writethrough: AtomicBool::new(options.writethrough),
            warned: AtomicBool::new(false),
            failure: OnceLock::new(),
            replica_hold: AtomicU64::new(NO_HOLD),
            resync: Mutex::new(None),
            pacer: Pacer::default(),
            out_of_sync: Mutex::new(None),
            branches: Mutex::new(Vec::new()),
            checkpoint_every: options.checkpoint_every,
            checkpointed: Mutex::new(checkpoint::Checkpointed {
                lsn: base_lsn + report.records_from_checkpoint,
                bytes: 0,
                retry_at: None,
            }),
            layout_choice: options.layout,
            direct_writes: AtomicBool::new(true),
            syncs: AtomicU64::new(0),
            bulk: AtomicBool::new(false),
            memory: memory(),
        });
        *lock(&inner.resync) = inner.load_resync()?;
        *lock(&inner.out_of_sync) = inner.load_out_of_sync()?;
        if let Some(common) = cut {
            inner.finish_cut(common)?;
        }
        inner.load_branches()?;
        let maintainer = std::thread::Builder::new()
            .name("rewind-pool".into())
            .spawn(move || pool.maintain())
            .map_err(Error::io(|| "starting the pool thread"))?;
        let mut volume = Volume {
            inner: inner.clone(),
            maintainer: Some(maintainer),
            applier: None,
            _lock: lock_guard,
        };
        volume.applier = Some(
            std::thread::Builder::new()
                .name("rewind-applier".into())
                .spawn(move || inner.apply_loop(options.fold_interval))
                .map_err(Error::io(|| "starting the applier thread"))?,
        );
        Ok((volume, report))
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.inner.config
    }

    pub fn size(&self) -> u64 {
        self.inner.config.size
    }

    /// Whether every write is made durable before it returns.
    pub fn writethrough(&self) -> bool {
        self.inner.writethrough.load(Ordering::Acquire)
    }

    /// Switches between writeback (false) and writethrough (true).
    pub fn set_writethrough(&self, on: bool) {
        self.inner.writethrough.store(on, Ordering::Release);
    }

    /// Whether the segment being written takes large writes straight to
    /// the device (inline records written with O_DIRECT, not through the
    /// page cache): several of them at once, on as many threads, then
    /// reach it side by side, where through the page cache they would
    /// queue behind one copy. Large writes mostly, far from the journal's
    /// limit.
    pub fn bulk_writes(&self) -> bool {
        self.inner.bulk.load(Ordering::Acquire)
    }

    /// Writes `data` at `offset` (both multiples of 512); returns the lsn of
    /// its (last) record.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let lsn = self.write_deferred(offset, data)?;
        self.inner.after_write()?;
        Ok(lsn)
    }

    /// Like [`Volume::write`], but never syncs, even in writethrough mode:
    /// the caller flushes before it reports the write done. The daemon
    /// does so on another thread, so the writes behind it are not held up
    /// and concurrent ones share a sync.
    pub fn write_deferred(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let inner = &self.inner;
        check_range(offset, data.len() as u64, inner.config.size).map_err(Error::InvalidRequest)?;
        let mut lsn = 0;
        let mut at = offset;
        // Paced once for all its records: a turn is at most `MAX_DELAY`.
        let records = (data.len() as u64).div_ceil(inner.max_payload).max(1);
        inner.pace(data.len() as u64 + (records - 1) * RECORD_HEADER_SIZE);
        for chunk in data.chunks(inner.max_payload as usize) {
            let length = chunk.len() as u64;
            lsn = inner.append(RecordKind::Write, at, length, Payload::Bytes(chunk))?;
            at += chunk.len() as u64;
        }
        Ok(lsn)
    }

    /// [`Volume::write_deferred`] of `buf`'s payload, which an inline
    /// record sends to the device from where it is (see [`PayloadBuffer`]).
    pub fn write_buffer_deferred(&self, offset: u64, buf: &mut PayloadBuffer) -> Result<u64> {
        match self.write_buffer_unordered(offset, buf)? {
            Written::InOrder(lsn) => Ok(lsn),
            Written::AfterOthers(lsn) => self.wait_written(lsn).map(|()| lsn),
        }
    }

    /// [`Volume::write_buffer_deferred`] that does not wait for the records
    /// placed before its own to be written too (other threads write them
    /// side by side): the caller must [`Volume::wait_written`] for an
    /// [`Written::AfterOthers`] before it reports the write done, and may
    /// take other work meanwhile. Otherwise one writer that stalls (a
    /// page fault, a preemption) holds every other writer's thread.
    pub fn write_buffer_unordered(&self, offset: u64, buf: &mut PayloadBuffer) -> Result<Written> {
        let inner = &self.inner;
        let len = buf.payload().len() as u64;
        if len == 0 || len > inner.max_payload {
            // No record, or several: only the first would have room in front.
            return self
                .write_deferred(offset, buf.payload())
                .map(Written::InOrder);
        }
        check_range(offset, len, inner.config.size).map_err(Error::InvalidRequest)?;
        inner.pace(len);
        let lsn = inner.append_unordered(RecordKind::Write, offset, len, Payload::Framed(buf))?;
        Ok(if inner.completion.prefix() >= lsn {
            Written::InOrder(lsn)
        } else {
            Written::AfterOthers(lsn)
        })
    }

    /// Waits until every record up to `lsn` is written (see
    /// [`Volume::write_buffer_unordered`]).
    pub fn wait_written(&self, lsn: u64) -> Result<()> {
        self.inner.wait_written(lsn)
    }

    /// Whether every record up to `lsn` is written, without waiting.
    pub fn is_written(&self, lsn: u64) -> bool {
        self.inner.completion.prefix() >= lsn
    }

    /// Makes `[offset, offset + length)` read as zeroes.
    pub fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<u64> {
        let lsn = self.write_zeroes_deferred(offset, length, unmap)?;
        self.inner.after_write()?;
        Ok(lsn)
    }

    /// [`Volume::write_zeroes`] that never syncs (see [`Volume::write_deferred`]).
    pub fn write_zeroes_deferred(&self, offset: u64, length: u64, unmap: bool) -> Result<u64> {
        self.zero(RecordKind::WriteZeroes { unmap }, offset, length)
    }

    /// Discards `[offset, offset + length)`; it then reads as zeroes.
    pub fn discard(&self, offset: u64, length: u64) -> Result<u64> {
        let lsn = self.discard_deferred(offset, length)?;
        self.inner.after_write()?;
        Ok(lsn)
    }

    /// [`Volume::discard`] that never syncs (see [`Volume::write_deferred`]).
    pub fn discard_deferred(&self, offset: u64, length: u64) -> Result<u64> {
        self.zero(RecordKind::Discard, offset, length)
    }

    fn zero(&self, kind: RecordKind, offset: u64, length: u64) -> Result<u64> {
        let inner = &self.inner;
        check_range(offset, length, inner.config.size).map_err(Error::InvalidRequest)?;
        inner.pace(0);
        inner.append(kind, offset, length, Payload::Bytes(&[]))
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_live(offset, buf, false).map(drop)
    }

    /// Reads like [`Volume::read`] if every byte it needs is in memory (the
    /// page cache); false, with `buf` unspecified, where it would wait for
    /// the disk. The daemon serves such reads on the queue's own thread.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.inner.read_live(offset, buf, true)
    }

    /// Makes every write that returned before this call durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Flushes and stops the pool's thread.
    pub fn close(mut self) -> Result<()> {
        let flushed = self
            .inner
            .flush()
            .and_then(|()| self.inner.prove_durable(true));
        if flushed.is_ok() {
            self.inner.checkpoint_if_due(checkpoint::Occasion::Close);
        }
        self.stop_maintainer();
        flushed
    }

    fn stop_maintainer(&mut self) {
        self.inner.shutdown.store(true, Ordering::Release);
        self.inner.pool.wake_applier();
        if let Some(handle) = self.applier.take() {
            if handle.join().is_err() {
                tracing::error!(
                    event = crate::events::THREAD_PANICKED,
                    "the applier thread panicked"
                );
            }
        }
        self.inner.pool.shutdown();
        if let Some(handle) = self.maintainer.take() {
            if handle.join().is_err() {
                tracing::error!(
                    event = crate::events::THREAD_PANICKED,
                    "the pool thread panicked"
                );
            }
        }
    }

    /// The newest lsn whose record is at or before `timestamp_ns`, if that
    /// moment is inside the window.
    pub fn lsn_at(&self, timestamp_ns: u64) -> Option<u64> {
        let index = lock(&self.inner.index);
        let (_, start_ns) = self.inner.window_start(&index);
        (timestamp_ns >= start_ns).then(|| index.lsn_at(timestamp_ns))
    }

    /// The lsn a point in time names, if it is inside the window (for a
    /// branch point, the branch's lsn).
    pub fn resolve(&self, at: &PointInTime) -> Result<u64> {
        match at {
            PointInTime::Branch { name, at } => self.inner.resolve_branch(name, at.as_deref()),
            _ => self.inner.resolve(at),
        }
    }

    /// Records a named moment (durably: it flushes). The name must be new
    /// among the bookmarks in the window. `app_consistent` says the guest's
    /// filesystems were frozen meanwhile (the caller froze them through
    /// the guest agent); the record keeps it.
    pub fn bookmark(&self, name: &str, app_consistent: bool) -> Result<Bookmark> {
        check_bookmark_name(name).map_err(Error::InvalidRequest)?;
        // Here, not where records are placed: a replica takes its primary's
        // bookmarks whatever its own, longer, history holds.
        if lock(&self.inner.index).bookmark(name).is_some() {
            return Err(Error::InvalidRequest(format!(
                "a bookmark named {name:?} already exists"
            )));
        }
        let payload = crate::format::bookmark_payload(name, app_consistent);
        let lsn = self.inner.append(
            RecordKind::Bookmark,
            0,
            name.len() as u64,
            Payload::Bytes(&payload),
        )?;
        self.inner.flush()?;
        let index = lock(&self.inner.index);
        Ok(Bookmark {
            name: name.to_owned(),
            lsn,
            timestamp_ns: index.timestamp(lsn),
            app_consistent,
        })
    }

    /// The bookmarks in the window, oldest first.
    pub fn bookmarks(&self) -> Vec<Bookmark> {
        lock(&self.inner.index).bookmarks().to_vec()
    }

    /// A read-only view of the disk as it was at `at` (in a branch, for a
    /// branch point).
    pub fn view(&self, at: &PointInTime) -> Result<View> {
        if let PointInTime::Branch { name, at } = at {
            return branch::view(&self.inner, name, at.as_deref(), false);
        }
        View::build(self.inner.clone(), self.inner.resolve(at)?, false)
    }

    /// A view of the disk at `at` that takes writes into a scratch overlay,
    /// thrown away with the view; the volume itself (or the branch) is
    /// never changed.
    pub fn view_writable(&self, at: &PointInTime) -> Result<View> {
        if let PointInTime::Branch { name, at } = at {
            return branch::view(&self.inner, name, at.as_deref(), true);
        }
        View::build(self.inner.clone(), self.inner.resolve(at)?, true)
    }

    /// Writes a sparse raw image of the disk as it was at `at` to `output`
    /// (a new file), reporting `(bytes done, bytes in all)`.
    pub fn materialize(
        &self,
        at: &PointInTime,
        output: &Path,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let view = self.view(at)?;
        view.materialize(output, progress)?;
        Ok(view.lsn())
    }

    /// Makes the live disk what it was at `at`, as a new Revert record (no
    /// history is lost: a view before the revert still sees the old data,
    /// and a revert to a moment before this one undoes it). Writes that
    /// race with it wait; callers drain the guest first. Returns the
    /// revert record's lsn once it is durable.
    pub fn revert(&self, at: &PointInTime) -> Result<u64> {
        let inner = &self.inner;
        inner.check_failed()?;
        let mut c = lock(&inner.cursor);
        let to = inner.resolve(at)?;
        // Every record before the revert must be in the map it replaces.
        if inner.completion.wait_for(c.next_lsn - 1).is_err() {
            inner.check_failed()?;
        }
        let reserved = inner.reserve(&mut c, RecordKind::Revert, to, 0, &[], crc32c(&[]), None)?;
        let lsn = reserved.header.lsn;
        let snapshot = lock(&inner.index).snapshot(lsn);
        inner.write_reserved(reserved, Payload::Bytes(&[]))?;
        let map = ExtentMap::new(inner.config.size);
        snapshot.replay_into(&map, lsn);
        inner.map.replace_with(map);
        drop(c);
        tracing::info!(volume = %inner.config.uuid, dir = %inner.dir.display(), to, lsn, "reverted the disk");
        inner.flush()?;
        Ok(lsn)
    }

    /// Whether this copy serves a guest or receives a primary's records.
    pub fn role(&self) -> Role {
        if self.inner.replica.load(Ordering::Acquire) {
            Role::Replica
        } else {
            Role::Primary
        }
    }

    /// Where each epoch began, oldest first.
    pub fn epoch_history(&self) -> Vec<EpochStart> {
        lock(&self.inner.persisted).epoch_history.clone()
    }

    /// The fencing epoch new records carry.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// Raises the fencing epoch by one (DESIGN.md, "Drain and fence"): a
    /// durable Epoch record, after which every record carries the new
    /// epoch, then volume.json. Returns the new epoch.
    pub fn raise_epoch(&self) -> Result<u64> {
        self.inner.start_epoch(|_| {}).map(|start| start.epoch)
    }

    /// While the returned guard lives, requests held retrying an EIO or
    /// ENOSPC fail at their next retry (within a second), and those that
    /// meet one fail at once, instead of waiting out
    /// `RetryPolicy::max_hold`: the operator gave up on the storage (a
    /// drain with abort, a fence). So do writes waiting at the journal's
    /// hard limit for the applier to free a segment (within 100 ms).
    pub fn release_held(&self) -> ReleaseHeld<'_> {
        self.inner.releasing.fetch_add(1, Ordering::AcqRel);
        ReleaseHeld { volume: self }
    }

    /// Folds what left the window now, instead of waiting for the applier.
    pub fn fold_now(&self) -> Result<Option<FoldReport>> {
        self.inner.fold()
    }

    /// The history this volume holds.
    pub fn timeline(&self) -> Timeline {
        let inner = &self.inner;
        let now = inner.clock.now_ns();
        let (start_lsn, start_ns, last_lsn, bookmarks, flush_points) = {
            let index = lock(&inner.index);
            let (start_lsn, start_ns) = inner.window_start(&index);
            (
                start_lsn,
                start_ns,
                index.last_lsn(),
                index.bookmarks().to_vec(),
                index.flushes(),
            )
        };
        Timeline {
            window_configured: inner.window(),
            window_effective: Duration::from_nanos(now.saturating_sub(start_ns)),
            window_start_ns: start_ns,
            window_end_ns: now,
            start_lsn,
            last_lsn,
            bookmarks,
            flush_points,
            journal_bytes: inner.pool.counts().bytes,
            journal_max: inner.pool.journal_max(),
            forced_folds: inner.forced_folds.load(Ordering::Relaxed),
        }
    }

    /// The newest lsn handed out. Read from the record index rather than
    /// the write cursor, which a write waiting for a segment holds.
    pub fn last_lsn(&self) -> u64 {
        lock(&self.inner.index).last_lsn()
    }

    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let (last_lsn, bounds, start_ns) = {
            let index = lock(&inner.index);
            let start_ns = inner.window_start(&index).1;
            (index.last_lsn(), index.bounds(), start_ns)
        };
        let now = inner.clock.now_ns();
        let counts = inner.pool.counts();
        Stats {
            uuid: inner.config.uuid,
            size: inner.config.size,
            epoch: inner.epoch.load(Ordering::Acquire),
            segment_size: inner.config.segment_size,
            segments_used: counts.used,
            segments_free: counts.free,
            reserve_target: counts.reserve,
            journal_bytes: counts.bytes,
            journal_max: inner.pool.journal_max(),
            journal_warn: inner.config.journal_warn,
            over_warning: counts.held >= inner.config.journal_warn,
            base_lsn: inner.pool.base().lsn,
            last_lsn,
            durable_lsn: inner.durable_lsn.load(Ordering::Acquire),
            oldest_record_ns: bounds.map(|b| b.0),
            newest_record_ns: bounds.map(|b| b.1),
            extents: inner.map.len(),
            writethrough: self.writethrough(),
            failed: inner.failure.get().cloned(),
            window_configured: inner.window(),
            window_effective: Duration::from_nanos(now.saturating_sub(start_ns)),
            window_start_ns: start_ns,
            forced_folds: inner.forced_folds.load(Ordering::Relaxed),
            segments_retired: counts.retired,
            folded_bytes: inner.folded_bytes.load(Ordering::Relaxed),
            fold_nanos: inner.fold_nanos.load(Ordering::Relaxed),
            held_requests: inner.held_requests.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop_maintainer();
    }
}

/// An image to import must fit the volume in whole blocks.
fn check_image(path: &Path, settings: &VolumeSettings) -> Result<()> {
    let image = std::fs::metadata(path)
        .map_err(Error::io(|| format!("reading {}", path.display())))?
        .len();
    if image % u64::from(settings.block_size) != 0 || image > settings.size {
        return Err(Error::InvalidSettings(format!(
            "image {} has {image} bytes: it must be a multiple of the block size {} \
             and at most the volume size {}",
            path.display(),
            settings.block_size,
            settings.size
        )));
    }
    Ok(())
}

/// Removes the temporary file of a checkpoint a crash interrupted.
fn remove_checkpoint_leftover(storage: &dyn Storage, dir: &Path) -> Result<()> {
    let tmp = dir
        .join(crate::recovery::checkpoint::CHECKPOINT_FILE)
        .with_extension("tmp");
    match storage.remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io(|| format!("removing {}", tmp.display()))(e))
        }
        _ => Ok(()),
    }
}

/// The names of the segment files in `journal` that `super` (`sb`) does
/// not list, in order.
fn unlisted_names(storage: &dyn Storage, journal: &Path, sb: &SuperState) -> Result<Vec<String>> {
    let listed: Vec<String> = sb
        .segments
        .iter()
        .map(|s| segment_name(s.file_id))
        .collect();
    let mut names = storage
        .list_dir(journal)
        .map_err(Error::io(|| format!("listing {}", journal.display())))?;
    names.retain(|name| name.ends_with(".seg") && !listed.contains(name));
    names.sort();
    Ok(names)
}

/// Of the segment files `super` does not list (`unlisted`, once checked
/// by [`check_unlisted`]; `listed` is how many it does list): a
/// preallocated pool's spares (pool.rs), those of the segment size under
/// their own names, as many as the limit leaves room for; every other one
/// is removed (an interrupted preparation, a folded or cut segment, or a
/// spare cut short). A spare whose writing out a crash interrupted keeps
/// its unwritten blocks: slower to write, never wrong.
fn unlisted_files(
    storage: &dyn Storage,
    journal: &Path,
    unlisted: Vec<String>,
    listed: u64,
    config: &VolumeConfig,
) -> Result<Vec<Spare>> {
    let mut room = if config.preallocate_journal {
        (config.journal_max / config.segment_size).saturating_sub(listed)
    } else {
        0
    };
    let mut spares = Vec::new();
    let mut removed = false;
    for name in unlisted {
        let path = journal.join(&name);
        // Only the pool's own names: a spare is opened again by its id.
        let id = name
            .strip_suffix(".seg")
            .and_then(|id| id.parse::<u32>().ok());
        let id = id.filter(|&id| id < u32::MAX && segment_name(id) == name);
        if let Some(id) = id.filter(|_| room > 0) {
            let file = storage
                .open(&path)
                .map_err(Error::io(|| format!("opening {}", path.display())))?;
            if file.size().is_ok_and(|size| size == config.segment_size) {
                spares.push(Spare { id, file });
                room -= 1;
                continue;
            }
        }
        tracing::info!(file = %path.display(), "removing a segment file the pool does not list");
        storage
            .remove_file(&path)
            .map_err(Error::io(|| format!("removing {}", path.display())))?;
        removed = true;
    }
    if removed {
        storage
            .sync_dir(journal)
            .map_err(Error::io(|| format!("syncing {}", journal.display())))?;
    }
    Ok(spares)
}

/// Refuses to open if the unlisted segment file at `path` holds records
/// of a use `sb` has not handed out: its header names this volume and a
/// sequence number at or past `sb.next_seq`, and its first record is of
/// that use. The writer only moves into a segment a durable `super` lists
/// (pool.rs), so a newer copy of `super` listed it and was lost (a
/// damaged copy, superblock.rs): removing or reusing the file would drop
/// durable records. A crash leaves no such file: one a preparation headed
/// but never listed has no record of its use, and folded, cut or released
/// ones have sequence numbers below `next_seq`.
fn check_unlisted(
    storage: &dyn Storage,
    dir: &Path,
    path: &Path,
    sb: &SuperState,
    config: &VolumeConfig,
) -> Result<()> {
    let context = || format!("reading {}", path.display());
    let file = storage.open(path).map_err(Error::io(context))?;
    let mut sector = [0u8; SECTOR as usize];
    // `None`: the file ends first.
    let mut read_at = |at: u64| match file.read_exact_at(&mut sector, at) {
        Ok(()) => Ok(Some(sector)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(Error::io(context)(e)),
    };
    let header = read_at(0)?.and_then(|b| SegmentHeader::decode(&b).ok());
    let Some(h) = header.filter(|h| {
        h.volume == config.uuid && h.seq >= sb.next_seq && h.segment_size == config.segment_size
    }) else {
        return Ok(());
    };
    let first = h.layout.header_at(h.layout.start(config.segment_size));
    let record = read_at(first)?.and_then(|b| RecordHeader::decode(&b).ok());
    let Some(r) = record.filter(|r| r.seq == h.seq && h.layout.owns(r)) else {
        return Ok(());
    };
    Err(Error::BadMetadata {
        path: dir.join(SUPER_FILE),
        reason: format!(
            "it does not list {}, which holds records from lsn {} of segment use {} (this \
             copy of super hands out uses from {}): the newer copy, which listed it, is \
             lost. Nothing was removed; restore super, or move the file out of the journal \
             to open the volume without those records",
            path.display(),
            r.lsn,
            h.seq,
            sb.next_seq
        ),
    })
}

impl Inner {
    /// Raises the epoch by one: a durable Epoch record, after which every
    /// record carries the new epoch, then volume.json with `change` made
    /// in the same write (a promotion names its role there).
    fn start_epoch(&self, change: impl FnOnce(&mut VolumeConfig)) -> Result<EpochStart> {
        self.check_failed()?;
        let node = lock(&self.persisted).node;
        let mut c = lock(&self.cursor);
        let epoch = self.epoch.load(Ordering::Acquire) + 1;
        // Under the cursor lock: no record is placed between the raise and
        // the Epoch record, so epochs never decrease along the lsns.
        self.epoch.store(epoch, Ordering::Release);
        let reserved = self
            .reserve(
                &mut c,
                RecordKind::Epoch,
                epoch,
                node,
                &[],
                crc32c(&[]),
                None,
            )
            .inspect_err(|_| self.epoch.store(epoch - 1, Ordering::Release))?;
        let start = EpochStart {
            epoch,
            first_lsn: reserved.header.lsn,
            node,
        };
        self.write_reserved(reserved, Payload::Bytes(&[]))?;
        drop(c);
        self.flush()?;
        self.persist(|config| {
            config.start_epoch(start);
            change(config);
        })?;
        tracing::info!(volume = %self.config.uuid, dir = %self.dir.display(), epoch, "raised the epoch");
        Ok(start)
    }

    /// Changes what volume.json holds and writes it.
    fn persist(&self, change: impl FnOnce(&mut VolumeConfig)) -> Result<()> {
        let mut persisted = lock(&self.persisted);
        let mut next = persisted.clone();
        change(&mut next);
        next.store(self.storage.as_ref(), &self.dir)?;
        self.replica
            .store(next.role == Role::Replica, Ordering::Release);
        *persisted = next;
        Ok(())
    }

    fn check_failed(&self) -> Result<()> {
        match self.failure.get() {
            Some(reason) => Err(Error::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Stops the volume taking writes: something on disk can no longer be
    /// made durable in order. Returns the error its callers report.
    fn fail(&self, reason: String) -> Error {
        tracing::error!(
            event = crate::events::VOLUME_FAILED,
            volume = %self.config.uuid,
            dir = %self.dir.display(),
            "{reason}; the volume stops taking writes"
        );
        let _ = self.failure.set(reason.clone());
        self.completion.fail();
        Error::Failed(reason)
    }

    /// Syncs a journal file the volume's durability stands on (a segment);
    /// a failure fails the volume. Never retried, here or in `retrying`:
    /// Linux marks the pages a failed write-back could not write clean (or
    /// drops them), so a second fdatasync reports success without their
    /// data on the disk (PostgreSQL's "fsyncgate"), and every later sync
    /// of the file would be a lie too.
    fn sync_journal_file(
        &self,
        file: &dyn StorageFile,
        name: impl FnOnce() -> String,
    ) -> Result<()> {
        file.sync_data().map_err(|e| {
            let reason = format!("syncing {} failed: {e}", name());
            self.fail(reason)
        })
    }

    /// Runs `op`, retrying EIO and ENOSPC with backoff up to the policy's
    /// bound; not once held requests are released or the volume is closing
    /// (the applier's folds retry here too, and closing waits for them).
    /// Not for syncs (`sync_journal_file`).
    fn retrying<T>(&self, what: &str, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        let mut first_error: Option<Instant> = None;
        let mut backoff = self.retry.first_backoff;
        let _held = HeldRequest(&self.held_requests, std::cell::Cell::new(false));
        loop {
            match op() {
                Err(e) if retryable(&e) => {
                    if self.releasing.load(Ordering::Acquire) > 0
                        || self.shutdown.load(Ordering::Acquire)
                    {
                        return Err(e);
                    }
                    _held.start();
                    let since = *first_error.get_or_insert_with(|| {
                        tracing::warn!(
                            event = crate::events::STORAGE_ERROR,
                            volume = %self.config.uuid,
                            dir = %self.dir.display(),
                            "{what}: {e}; holding the request and retrying for up to {:?}",
                            self.retry.max_hold
                        );
                        Instant::now()
                    });
                    if since.elapsed() >= self.retry.max_hold {
                        return Err(e);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// The layout of `segment`'s use, which the writer (at `c`, still in
    /// the segment before) moves into: for inline, its first chunk is
    /// zeroed (`zero_ahead`) and its header written again, as version 3
    /// with a new nonce, before any record. Returns the layout and how far
    /// the segment is zeroed.
    fn choose_layout(&self, c: &Cursor, segment: &Segment) -> Result<(Mode, Layout, u64)> {
        let mode = self.wanted_mode(&c.workload);
        if mode == Mode::Slots {
            segment.set_layout(Layout::Slots);
            return Ok((mode, Layout::Slots, 0));
        }
        // Never 0, so that no zeroed sector passes for one of its headers.
        let nonce = Uuid::new_v4().as_u64_pair().0 | 1;
        let layout = Layout::Inline { nonce };
        let header = SegmentHeader {
            volume: self.config.uuid,
            seq: segment.seq,
            segment_size: self.config.segment_size,
            layout,
        }
        .encode();
        // Nothing syncs after each bulk record: no zeroes ahead of them.
        let mut zeroed_to = match mode {
            Mode::Bulk => self.config.segment_size,
            Mode::Slots | Mode::Durable => 0,
        };
        let written = self
            .zero_ahead(&mut zeroed_to, segment, 0)
            .and_then(|()| write_direct_parts(segment.file.as_ref(), &[&header], 0));
        match written {
            Ok(()) => {
                segment.set_layout(layout);
                Ok((mode, layout, zeroed_to))
            }
            // Nothing was written: this file system cannot.
            Err(e)
                if e.kind() == io::ErrorKind::Unsupported
                    || e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                tracing::info!(
                    volume = %self.config.uuid,
                    error = %e,
                    "the journal's file system takes no O_DIRECT writes: segments keep header slots"
                );
                self.direct_writes.store(false, Ordering::Release);
                segment.set_layout(Layout::Slots);
                Ok((Mode::Slots, Layout::Slots, 0))
            }
            Err(e) => {
                let path = self.dir.join(JOURNAL_DIR).join(segment_name(segment.id));
                let reason = format!("preparing {} for inline records: {e}", path.display());
                Err(self.fail(reason))
            }
        }
    }

    /// The mode the workload's verdicts want for a segment.
    fn wanted_mode(&self, workload: &Workload) -> Mode {
        if !self.direct_writes.load(Ordering::Acquire) {
            return Mode::Slots;
        }
        let durable = self.writethrough.load(Ordering::Acquire) || workload.one_by_one;
        match self.layout_choice {
            LayoutChoice::Slots => Mode::Slots,
            LayoutChoice::Inline => Mode::Durable,
            LayoutChoice::Auto if durable => Mode::Durable,
            LayoutChoice::Auto
                if workload.bulk
                    && bulk_pays(
                        self.pool.counts().held,
                        self.config.journal_max,
                        self.memory,
                    ) =>
            {
                Mode::Bulk
            }
            LayoutChoice::Auto => Mode::Slots,
        }
    }

    /// Writes zeroes where the inline segment `segment` still has
    /// unwritten extents (a new file is preallocated) up to `ZERO_AHEAD`
    /// past `end`, the end of the record being placed. A direct write into
    /// an unwritten extent converts it, and the next fdatasync must commit
    /// that to the file system's journal: on ext4 that halves the rate of
    /// durable 4 KiB writes. Zeroing a chunk ahead costs one conversion
    /// per chunk instead. Under the cursor lock, so no record is placed in
    /// a chunk before it is zeroed; every record placed before lies below
    /// `zeroed_to`, which moves a chunk at a time.
    fn zero_ahead(&self, zeroed_to: &mut u64, segment: &Segment, end: u64) -> io::Result<()> {
        let size = self.config.segment_size;
        let want = end.saturating_add(ZERO_AHEAD).min(size);
        while *zeroed_to < want {
            let chunk_end = (*zeroed_to + ZERO_AHEAD).min(size);
            // Never the first page: it holds the segment's header, written
            // (whole, by the page cache) when the segment was prepared.
            let at = (*zeroed_to).max(PAGE);
            let len = chunk_end.saturating_sub(at);
            self.retrying("zeroing a journal segment", || {
                // A range written before (a recycled file) needs nothing.
                if len == 0 || segment.file.fully_written(at, len)? {
                    return Ok(());
                }
                segment.file.write_direct_at(aligned_zeroes(len), at)
            })?;
            *zeroed_to = chunk_end;
        }
        Ok(())
    }

    /// Appends a Flush record for the durable lsn where a flush in an
    /// inline segment left its proof to the next record and none came
    /// (at close, and when the guest is idle), if it fits the segment
    /// being written: never waits for space. Without `wait` (the applier)
    /// it gives up where a lock is taken: a writer waiting for space at
    /// the hard limit holds the cursor until the applier frees some.
    fn prove_durable(&self, wait: bool) -> Result<()> {
        let Some(_sync) = lock_or_skip(&self.sync_lock, wait) else {
            return Ok(());
        };
        self.check_failed()?;
        let durable = self.durable_lsn.load(Ordering::Acquire);
        let Some(mut c) = lock_or_skip(&self.cursor, wait) else {
            return Ok(());
        };
        let owed = c.proof_owed && c.proved_lsn < durable;
        let fits = c.active.is_some() && !c.workload.switch && c.layout.place(c.at, 0).is_some();
        if !owed || !fits {
            return Ok(());
        }
        let reserved = self.reserve(
            &mut c,
            RecordKind::Flush,
            durable,
            0,
            &[],
            crc32c(&[]),
            None,
        )?;
        drop(c);
        self.write_reserved(reserved, Payload::Bytes(&[]))?;
        Ok(())
    }

    fn append(
        &self,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: Payload<'_>,
    ) -> Result<u64> {
        let lsn = self.append_unordered(kind, offset, length, payload)?;
        self.wait_written(lsn)?;
        Ok(lsn)
    }

    /// `append` without its wait (see [`Volume::write_buffer_unordered`]).
    fn append_unordered(
        &self,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: Payload<'_>,
    ) -> Result<u64> {
        self.check_failed()?;
        let bytes = payload.bytes();
        let payload_crc = crc32c(bytes);
        let reserved = self.reserve(
            &mut lock(&self.cursor),
            kind,
            offset,
            length,
            bytes,
            payload_crc,
            None,
        )?;
        self.write_reserved(reserved, payload)
    }

    /// Returns once every record up to `lsn` is written: recovery ends the
    /// log at the first one missing, so a record written past a hole would
    /// be lost to a crash of this process, and its write must not be
    /// acknowledged before. Records complete out of order where several
    /// threads append (queues, bulk writes on IO threads), so the wait is
    /// short: the writes before are under way.
    fn wait_written(&self, lsn: u64) -> Result<()> {
        if self.completion.wait_for(lsn).is_err() {
            self.check_failed()?;
        }
        Ok(())
    }

    /// Places the next record: its lsn, timestamp, header slot and payload
    /// position, and its entry in the record index. `stamp` is the
    /// record's (time, epoch) when it has them already (a replica places
    /// its primary's records, ship.rs checks them first); `None` stamps it
    /// now, in this volume's epoch.
    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &self,
        c: &mut Cursor,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: &[u8],
        payload_crc: u32,
        stamp: Option<(u64, u64)>,
    ) -> Result<Reserved> {
        let len = payload.len() as u64;
        let mut sealed = None;
        // A segment whose layout no longer suits the writes is left with
        // its room unused: a change of workload costs at most a segment.
        let placed = c
            .active
            .clone()
            .filter(|_| !c.workload.switch)
            .and_then(|seg| Some((seg, c.layout.place(c.at, len)?)));
        let (segment, placed) = match placed {
            Some(found) => found,
            None => {
                let released = || self.releasing.load(Ordering::Acquire) > 0;
                let segment = self.pool.take_next(released)?;
                let (mode, layout, zeroed_to) = self.choose_layout(c, &segment)?;
                self.bulk.store(mode == Mode::Bulk, Ordering::Release);
                sealed = c.active.replace(segment.clone());
                c.mode = mode;
                c.layout = layout;
                c.at = layout.start(self.config.segment_size);
                c.zeroed_to = zeroed_to;
                c.stores = StoreCheck::default();
                c.records = 0;
                c.workload.switched();
                self.warn_if_over_threshold();
                // Payloads are capped so that one always fits a fresh segment.
                let placed = layout.place(c.at, len).ok_or_else(|| {
                    Error::InvalidRequest(format!("a {len}-byte record cannot fit a segment"))
                })?;
                (segment, placed)
            }
        };
        if let Layout::Inline { .. } = c.layout {
            if let Err(e) = self.zero_ahead(&mut c.zeroed_to, &segment, placed.next.top) {
                let path = self.dir.join(JOURNAL_DIR).join(segment_name(segment.id));
                let reason = format!("zeroing {} ahead of its records: {e}", path.display());
                return Err(self.fail(reason));
            }
        }
        let payload_offset = placed.payload;
        let stored = match (c.layout, payload_offset) {
            (Layout::Slots, Some(at)) => c.stores.may_store(&segment, at, len, placed.header),
            _ => false,
        };
        let lsn = c.next_lsn;
        // Stamped once placed: a write that waited for a segment gets the
        // time it got one.
        let (timestamp, epoch) = stamp.unwrap_or_else(|| {
            let now = self.clock.now_ns().max(c.last_timestamp);
            (now, self.epoch.load(Ordering::Acquire))
        });
        let data = |target| Effect::Data {
            start: offset / SECTOR,
            sectors: length / SECTOR,
            target,
        };
        let effect = match kind {
            RecordKind::Write => data(Target::Journal {
                segment: segment.id,
                sector: (payload_offset.unwrap_or(0) / SECTOR) as u32,
            }),
            RecordKind::WriteZeroes { .. } | RecordKind::Discard => data(Target::Zero),
            RecordKind::Flush => Effect::Flush,
            RecordKind::Bookmark | RecordKind::Epoch => Effect::Mark,
            RecordKind::Revert => Effect::Revert { to: offset },
        };
        let page_out_due = {
            let mut index = lock(&self.index);
            if kind == RecordKind::Bookmark {
                let name = String::from_utf8_lossy(&payload[..length as usize]).into_owned();
                let app_consistent = crate::format::bookmark_app_consistent(payload);
                index.push_bookmark(name, timestamp, app_consistent);
            } else {
                index.push(Entry { timestamp, effect });
            }
            index.froze_a_chunk() && index.unpaged_chunks() >= PAGE_OUT_CHUNKS
        };
        if page_out_due {
            self.pool.wake_applier();
        }
        c.next_lsn += 1;
        c.last_timestamp = timestamp;
        segment.last_lsn.store(lsn, Ordering::Release);
        // A bookmark is flushed like data: it must survive a power loss.
        if kind != RecordKind::Flush {
            self.last_data_lsn.store(lsn, Ordering::Release);
        }
        let durable_lsn = self.durable_lsn.load(Ordering::Acquire);
        let inline = match c.layout {
            Layout::Inline { nonce } => {
                segment.note_header(c.records, lsn, placed.header);
                c.proved_lsn = c.proved_lsn.max(durable_lsn);
                Some(InlineStamp { nonce, durable_lsn })
            }
            Layout::Slots => None,
        };
        if kind == RecordKind::Flush {
            c.proved_lsn = c.proved_lsn.max(offset);
        }
        if c.proved_lsn >= durable_lsn {
            c.proof_owed = false;
        }
        let header = RecordHeader {
            kind,
            seq: segment.seq,
            lsn,
            timestamp,
            epoch,
            offset,
            length,
            payload_len: len as u32,
            payload_crc,
            payload_offset: payload_offset.unwrap_or(0),
            inline,
        };
        c.records += 1;
        if matches!(effect, Effect::Data { .. }) && self.layout_choice == LayoutChoice::Auto {
            let syncs = self.syncs.load(Ordering::Acquire);
            if c.workload.count(syncs, len) {
                let wanted = self.wanted_mode(&c.workload);
                c.workload.judge(wanted != c.mode);
            }
        }
        c.at = placed.next;
        self.pool.set_active_left(c.layout.room(c.at));
        Ok(Reserved {
            header,
            slot: placed.header,
            segment,
            sealed,
            stored,
        })
    }

    /// Writes a reserved record, updates the live map and marks it complete.
    fn write_reserved(&self, r: Reserved, mut payload: Payload<'_>) -> Result<u64> {
        let Reserved {
            header,
            slot,
            segment,
            sealed,
            stored,
        } = r;
        if let Some(full) = sealed {
            self.pool.seal(full);
        }
        // Both are in the page cache (or on the disk) before the write is
        // acknowledged, so a crash of this process (not of the machine)
        // loses nothing.
        let head = header.encode();
        let written = self.retrying("appending to the journal", || match header.inline {
            None => {
                let file = segment.file.as_ref();
                match payload.bytes() {
                    [] => {}
                    bytes if stored => file.write_mapped_at(bytes, header.payload_offset)?,
                    bytes => file.write_all_at(&[bytes], header.payload_offset)?,
                }
                file.write_mapped_at(&head, slot)
            }
            // Header and payload in one request, with the zeroes between
            // them where a large payload starts on the next page.
            Some(_) => {
                let gap = match payload.bytes() {
                    [] => 0,
                    _ => (header.payload_offset - (slot + RECORD_HEADER_SIZE)) as usize,
                };
                let file = segment.file.as_ref();
                match &mut payload {
                    Payload::Framed(buf) => file.write_direct_at(buf.framed(&head, gap), slot),
                    Payload::Bytes(bytes) => {
                        let parts = [&head[..], &[0u8; PAGE as usize][..gap], bytes];
                        write_direct_parts(file, &parts, slot)
                    }
                }
            }
        });
        if let Err(e) = written {
            let reason = format!("journal append of lsn {} failed: {e}", header.lsn);
            return Err(self.fail(reason));
        }
        segment.dirty.store(true, Ordering::Release);
        let (start, sectors) = (header.offset / SECTOR, header.length / SECTOR);
        match header.kind {
            RecordKind::Write => {
                let sector = (header.payload_offset / SECTOR) as u32;
                let target = Target::Journal {
                    segment: segment.id,
                    sector,
                };
                self.map.insert(start, sectors, header.lsn, target);
            }
            RecordKind::WriteZeroes { .. } | RecordKind::Discard => {
                self.map.insert(start, sectors, header.lsn, Target::Zero);
            }
            // A revert changes the map under the cursor lock (`revert`).
            RecordKind::Flush | RecordKind::Bookmark | RecordKind::Revert | RecordKind::Epoch => {}
        }
        self.completion.complete(header.lsn);
        Ok(header.lsn)
    }

    /// Waits for the turn of a guest write of `payload` bytes when the
    /// pool nears its hard limit (pace.rs); at once otherwise.
    fn pace(&self, payload: u64) {
        let Some(headroom) = self.pool.headroom() else {
            return;
        };
        let cost = payload + RECORD_HEADER_SIZE;
        let wait = self.pacer.turn(cost, headroom, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    fn warn_if_over_threshold(&self) {
        let bytes = self.pool.counts().held;
        let over = bytes >= self.config.journal_warn;
        if over && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                event = crate::events::JOURNAL_WARN_THRESHOLD,
                volume = %self.config.uuid,
                dir = %self.dir.display(),
                "journal pool at {bytes} bytes, past the warning threshold of {} (limit {})",
                self.config.journal_warn,
                self.config.journal_max
            );
        } else if !over {
            self.warned.store(false, Ordering::Relaxed);
        }
    }

    fn after_write(&self) -> Result<()> {
        if self.writethrough.load(Ordering::Acquire) {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.check_failed()?;
        let target = self.last_data_lsn.load(Ordering::Acquire);
        if self.durable_lsn.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        if self.completion.wait_for(target).is_err() {
            return self.check_failed();
        }
        let _sync = lock(&self.sync_lock);
        // The sync before ours may have failed: ours would pass without
        // what it lost (`sync_journal_file`).
        self.check_failed()?;
        if self.durable_lsn.load(Ordering::Acquire) >= target {
            return Ok(()); // another flush synced for us
        }
        let upto = self.completion.prefix();
        if let Err(e) = self.pool.sync_dirty() {
            let reason = format!("syncing the journal failed: {e}");
            return Err(self.fail(reason));
        }
        self.durable_lsn.fetch_max(upto, Ordering::AcqRel);
        self.syncs.fetch_add(1, Ordering::AcqRel);
        // A replica writes only its primary's records (lsns must match).
        if self.replica.load(Ordering::Acquire) {
            return Ok(());
        }
        // In an inline segment the next record's header carries the proof
        // (`InlineStamp::durable_lsn`): a Flush record would cost a device
        // write of its own. Not when that record may open a segment with
        // header slots (nor at close, nor when the guest stays idle:
        // `prove_durable`).
        {
            let mut c = lock(&self.cursor);
            let next_inline = matches!(c.layout, Layout::Inline { .. })
                && c.active.is_some()
                && !c.workload.switch;
            if next_inline {
                c.proof_owed = true;
                return Ok(());
            }
        }
        // Proof for recovery that everything up to `upto` was durable,
        // appended before the sync lock is let go: whoever syncs next
        // (`sync_all` sealing the volume) finds it written.
        self.append(RecordKind::Flush, upto, 0, Payload::Bytes(&[]))?;
        Ok(())
    }

    /// Reads `buf` at `offset` through the live map; with `cached_only`,
    /// only from the page cache: false where that would wait for the disk.
    fn read_live(&self, offset: u64, buf: &mut [u8], cached_only: bool) -> Result<bool> {
        check_range(offset, buf.len() as u64, self.config.size).map_err(Error::InvalidRequest)?;
        let mut pieces = Pieces::new();
        self.map
            .lookup(offset / SECTOR, buf.len() as u64 / SECTOR, &mut pieces);
        let first = offset / SECTOR;
        for piece in &pieces {
            if !self.read_piece(piece, first, buf, |id| self.pool.segment(id), cached_only)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads `piece` of a read that starts at sector `first` into `buf`;
    /// `segment` finds the journal files the piece may name. With
    /// `cached_only`, false where the read would wait for the disk.
    fn read_piece(
        &self,
        piece: &Piece,
        first: u64,
        buf: &mut [u8],
        segment: impl Fn(u32) -> Option<Arc<Segment>>,
        cached_only: bool,
    ) -> Result<bool> {
        let from = ((piece.start - first) * SECTOR) as usize;
        let out = &mut buf[from..from + (piece.sectors * SECTOR) as usize];
        let at_base = piece.start * SECTOR;
        match piece.source {
            Source::Zero => {
                out.fill(0);
                Ok(true)
            }
            Source::Journal {
                segment: id,
                sector,
            } => match segment(id) {
                Some(seg) => {
                    let at = u64::from(sector) * SECTOR;
                    if cached_only {
                        return Ok(seg.file.read_cached_at(out, at));
                    }
                    self.retrying("reading the journal", || seg.file.read_exact_at(out, at))
                        .map_err(Error::io(|| {
                            format!("reading {} at {at}", segment_name(id))
                        }))?;
                    Ok(true)
                }
                // Folded since the lookup: base.img holds the data now.
                None => self.read_base_piece(out, at_base, cached_only),
            },
            Source::Base => self.read_base_piece(out, at_base, cached_only),
        }
    }

    fn read_base_piece(&self, out: &mut [u8], at: u64, cached_only: bool) -> Result<bool> {
        if cached_only {
            return Ok(self.base.read_cached_at(out, at));
        }
        self.read_base(out, at).map(|()| true)
    }

    fn read_base(&self, out: &mut [u8], at: u64) -> Result<()> {
        self.retrying("reading base.img", || self.base.read_exact_at(out, at))
            .map_err(Error::io(|| format!("reading {BASE_FILE} at {at}")))
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.window_secs)
    }

    /// The oldest lsn whose state can still be read, and its time.
    fn window_start(&self, index: &RecordIndex) -> (u64, u64) {
        let horizon = self.pool.base().horizon_lsn.max(index.base_lsn());
        (horizon, index.timestamp(horizon))
    }

    /// The lsn `at` names, checked to be inside the window.
    fn resolve(&self, at: &PointInTime) -> Result<u64> {
        self.check_not_resyncing()?;
        let index = lock(&self.index);
        let (start_lsn, start_ns) = self.window_start(&index);
        let last = index.last_lsn();
        let now = self.clock.now_ns();
        let outside = |what: String| Error::OutsideWindow {
            requested: what,
            start: crate::point::format_ns(start_ns),
            end: crate::point::format_ns(now),
            start_lsn,
            last_lsn: last,
        };
        let lsn = match at {
            PointInTime::Lsn(lsn) => *lsn,
            PointInTime::Bookmark(name) => index
                .bookmark(name)
                .map(|b| b.lsn)
                .ok_or_else(|| Error::NoSuchBookmark(name.clone()))?,
            // A branch's lsns are not this journal's: only views take them.
            PointInTime::Branch { .. } => {
                return Err(Error::InvalidRequest(format!(
                    "{at} is a moment of a branch, not of the journal; view, export or \
                     materialize it"
                )))
            }
            PointInTime::Time(_) | PointInTime::Ago(_) => {
                let ns = at.timestamp(now).ok_or_else(|| outside(at.to_string()))?;
                if ns > now {
                    return Err(Error::InvalidRequest(format!(
                        "{at} is in the future (now is {})",
                        crate::point::format_ns(now)
                    )));
                }
                if ns < start_ns {
                    return Err(outside(at.to_string()));
                }
                index.lsn_at(ns)
            }
        };
        if lsn < start_lsn || lsn > last {
            return Err(outside(at.to_string()));
        }
        Ok(lsn)
    }

    /// Registers a view of lsn `lsn` reading `segments`; the applier will
    /// not fold past it.
    fn pin(&self, lsn: u64, segments: Vec<Arc<Segment>>) -> Arc<ViewPin> {
        let pin = Arc::new(ViewPin {
            lsn,
            state: std::sync::RwLock::new(PinState {
                expired: None,
                segments,
            }),
        });
        let mut views = lock(&self.views);
        views.retain(|w| w.strong_count() > 0);
        views.push(Arc::downgrade(&pin));
        pin
    }

    /// The oldest lsn a live view reads.
    fn oldest_pin(&self) -> Option<u64> {
        lock(&self.views)
            .iter()
            .filter_map(Weak::upgrade)
            .map(|p| p.lsn)
            .min()
    }

    /// Makes every view older than `lsn` fail its reads from now on, after
    /// the reads in progress finish.
    fn expire_views_before(&self, lsn: u64) {
        for pin in lock(&self.views).iter().filter_map(Weak::upgrade) {
            if pin.lsn < lsn {
                let reason = format!(
                    "the journal reached its hard limit and folded past lsn {}; \
                     this view (lsn {}) no longer exists",
                    lsn, pin.lsn
                );
                tracing::warn!(event = crate::events::VIEW_EXPIRED, volume = %self.config.uuid, "{reason}");
                let mut state = pin.state.write().unwrap_or_else(|e| e.into_inner());
                state.expired = Some(reason);
                state.segments.clear();
            }
        }
    }

    /// Moves the record index's full chunks to its page file, writing
    /// without the index's lock; while the pool is past its limit, only
    /// once a batch's worth waits (the fold comes first).
    fn page_out_index(&self) {
        let min = if self.pool.overflow() > 0 {
            PAGE_OUT_BATCH
        } else {
            1
        };
        let Some(mut out) = lock(&self.index).to_page_out(min) else {
            return;
        };
        out.write();
        lock(&self.index).paged_out(out);
    }

    /// The background applier: folds what left the window every
    /// `interval`, and at once when the pool is under pressure.
    fn apply_loop(&self, interval: Option<Duration>) {
        let pause = interval.unwrap_or(Duration::from_secs(3600));
        let mut due = interval.is_some();
        let mut backoff = self.retry.first_backoff;
        // The next lsn at the last pass: unchanged means the guest is idle
        // (a cursor held, perhaps by a writer waiting for space this
        // applier must free, means it is not).
        let mut next_lsn = None;
        while !self.shutdown.load(Ordering::Acquire) {
            self.page_out_index();
            let now = lock_or_skip(&self.cursor, false).map(|c| c.next_lsn);
            if now.is_some() && now == next_lsn {
                if let Err(e) = self.prove_durable(false) {
                    tracing::debug!(error = %e, "no Flush record for an idle journal");
                }
            }
            next_lsn = now;
            if due || self.pool.overflow() > 0 {
                match self.fold_at_most(self.pool.fold_piece()) {
                    // One piece done: look for the next at once.
                    Ok(Some(_)) => {
                        backoff = self.retry.first_backoff;
                        continue;
                    }
                    Ok(None) => {}
                    // Nothing more to fold on a failed volume.
                    Err(Error::Failed(_)) => break,
                    Err(e) => {
                        tracing::error!(
                            event = crate::events::FOLD_FAILED,
                            volume = %self.config.uuid,
                            dir = %self.dir.display(),
                            error = %e,
                            "fold failed; retrying"
                        );
                        // A fold starts over from the journal: not in a
                        // busy loop while the disk keeps failing.
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
            self.checkpoint_if_due(checkpoint::Occasion::Periodic);
            self.log_held_forced_folds();
            self.pool.wait_for_applier_work(pause);
            due = interval.is_some();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::OsStorage;

    #[test]
    fn large_writes_go_direct_where_the_page_cache_spares_the_fold_nothing() {
        const GIB: u64 = 1 << 30;
        // A journal much smaller than the memory: direct up to a quarter
        // of its limit, then through the page cache.
        assert!(bulk_pays(0, 4 * GIB, 32 * GIB));
        assert!(bulk_pays(GIB, 4 * GIB, 32 * GIB));
        assert!(!bulk_pays(GIB + 1, 4 * GIB, 32 * GIB));
        assert!(!bulk_pays(4 * GIB, 4 * GIB, 32 * GIB));
        // Half the memory or more: direct however full.
        assert!(bulk_pays(16 * GIB, 16 * GIB, 32 * GIB));
        assert!(bulk_pays(100 * GIB, 100 * GIB, 32 * GIB));
        assert!(!bulk_pays(16 * GIB - 1, 16 * GIB - 1, 32 * GIB));
        // The machine's own memory is read.
        assert!(memory() > 0);
    }

    #[test]
    fn payloads_are_stored_where_a_stretch_checked_ahead_reads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mib = 1 << 20;
        let size = 4 * mib;
        let file = OsStorage
            .create_new(&dir.path().join("seg"))
            .expect("create");
        file.allocate(size).expect("allocate");
        let segment = Segment::new(0, 1, file.clone());
        let slot = size - RECORD_HEADER_SIZE;
        let mut check = StoreCheck::default();
        assert!(
            check.may_store(&segment, 4096, 4096, slot),
            "preallocated, never written"
        );
        assert_eq!(check.to, 4096 + STORE_CHECK_AHEAD, "a stretch ahead");
        assert!(
            !check.may_store(&segment, 8192, STORE_MAX + 4096, slot),
            "too large for stores, wherever it goes"
        );
        assert!(check.may_store(&segment, 8192, STORE_MAX, slot));
        // Written around the page cache inside the stretch, as a recycled
        // segment whose pages were evicted: the answer holds until the
        // stretch ends (one check a stretch).
        let old = vec![1u8; (2 * mib) as usize];
        write_direct_parts(file.as_ref(), &[&old], 8192).expect("direct write");
        assert!(check.may_store(&segment, 8192, 4096, slot));
        assert_eq!(check.to, 4096 + STORE_CHECK_AHEAD, "not checked again");
        assert!(
            !check.may_store(&segment, 4096 + STORE_CHECK_AHEAD, 4096, slot),
            "past it: written, not cached"
        );
        // A payload inside the page the last one ended in needs no check;
        // one that starts inside a page is checked from its next page.
        let mut check = StoreCheck::default();
        assert!(check.may_store(&segment, 3 * mib + 512, 1024, slot));
        assert_eq!(check.to, 3 * mib + 1536);
        assert!(
            check.may_store(&segment, 3 * mib + 1536, 8192, slot),
            "from the next whole page: unwritten"
        );
        // The stretch stops below the header slots' pages, unless the
        // payload itself reaches them.
        assert_eq!(check.to, slot - slot % 4096);
        assert!(check.may_store(&segment, slot - 8192, 8192, slot));
        assert_eq!(check.to, slot);
    }

    /// Feeds `w` one window of data records, the `i`th with a payload of
    /// `payload(i)` bytes and a sync after it where `synced(i)`, while the
    /// active segment is in `active` mode (the verdicts judged as
    /// `wanted_mode` does far from the limit); returns whether it asked
    /// for a switch.
    fn feed(
        w: &mut Workload,
        syncs: &mut u64,
        mut payload: impl FnMut(u64) -> u64,
        synced: impl Fn(u64) -> bool,
        active: Mode,
    ) -> bool {
        for i in 0.. {
            *syncs += u64::from(synced(i));
            if w.count(*syncs, payload(i)) {
                let wanted = match (w.one_by_one, w.bulk) {
                    (true, _) => Mode::Durable,
                    (false, true) => Mode::Bulk,
                    (false, false) => Mode::Slots,
                };
                w.judge(wanted != active);
                return w.switch;
            }
        }
        unreachable!("a window closes")
    }

    #[test]
    fn a_mode_switches_after_two_windows_that_disagree_and_not_in_between() {
        let small = |_| 4096;
        let never = |_| false;
        let mut w = Workload::default();
        let mut syncs = 0;
        // Buffered writes: slots agree.
        assert!(!feed(&mut w, &mut syncs, small, never, Mode::Slots));
        // A sync per write: one window is not enough, two are.
        assert!(!feed(&mut w, &mut syncs, small, |_| true, Mode::Slots));
        assert!(feed(&mut w, &mut syncs, small, |_| true, Mode::Slots));
        // In the new (durable) segment, a sync per three writes keeps the
        // verdict (no flapping between the thresholds).
        w.switched();
        for _ in 0..4 {
            assert!(!feed(
                &mut w,
                &mut syncs,
                small,
                |i| i % 3 == 0,
                Mode::Durable
            ));
        }
        // A sync per eight writes turns it, two windows later.
        assert!(!feed(
            &mut w,
            &mut syncs,
            small,
            |i| i % 8 == 0,
            Mode::Durable
        ));
        assert!(feed(
            &mut w,
            &mut syncs,
            small,
            |i| i % 8 == 0,
            Mode::Durable
        ));
    }

    #[test]
    fn large_writes_want_bulk_segments_within_two_windows_of_bytes() {
        let never = |_| false;
        let mut w = Workload::default();
        let mut syncs = 0;
        // 1 MiB writes: a window is 32 of them, not 256.
        let mut records = 0;
        let mut counted = |i| {
            records = i + 1;
            1 << 20
        };
        assert!(!feed(&mut w, &mut syncs, &mut counted, never, Mode::Slots));
        assert_eq!(records, WORKLOAD_WINDOW_BYTES >> 20);
        assert!(feed(&mut w, &mut syncs, |_| 1 << 20, never, Mode::Slots));
        // Two large in three keep it (no flapping between the thresholds).
        w.switched();
        let mixed = |i| if i % 3 == 2 { 4096 } else { LARGE_PAYLOAD };
        for _ in 0..4 {
            assert!(!feed(&mut w, &mut syncs, mixed, never, Mode::Bulk));
        }
        // One in three turns it back, two windows later; and large writes
        // made durable one by one want durable segments, not bulk ones.
        let few = |i| if i % 3 == 0 { LARGE_PAYLOAD } else { 4096 };
        assert!(!feed(&mut w, &mut syncs, few, never, Mode::Bulk));
        assert!(feed(&mut w, &mut syncs, few, never, Mode::Bulk));
        w.switched();
        let large = |_| 1 << 20;
        assert!(!feed(&mut w, &mut syncs, large, |_| true, Mode::Slots));
        assert!(feed(&mut w, &mut syncs, large, |_| true, Mode::Slots));
        assert!(w.one_by_one && w.bulk);
    }
}
