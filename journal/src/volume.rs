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
//!   waiting flushes (group commit), then a Flush record marks the cut.
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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::completion::Completion;
use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Piece, Pieces, Source, Target};
use crate::format::{
    check_range, payload_position, RecordHeader, RecordKind, RECORD_HEADER_SIZE, SECTOR,
    SEGMENT_HEADER_SIZE,
};
use crate::meta::{VolumeConfig, VolumeSettings, VOLUME_FILE};
use crate::pool::{segment_name, write_header, Pool, PoolSetup, Segment, JOURNAL_DIR};
use crate::recovery::{recover, RecoveryReport};
use crate::storage::{ImportMode, LockGuard, Progress, Storage};
use crate::superblock::Superblock;
use crate::time_index::TimeIndex;

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

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub clock: Arc<dyn Clock>,
    /// Every write is durable before it returns (virtio-blk with WCE off).
    pub writethrough: bool,
    pub retry: RetryPolicy,
    /// Open a damaged journal anyway, ending it at the damage, even where
    /// a Flush record proves that data past it had been flushed.
    pub truncate_damaged: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            clock: Arc::new(SystemClock),
            writethrough: false,
            retry: RetryPolicy::default(),
            truncate_damaged: false,
        }
    }
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
    pub reserve_target: u64,
    /// Bytes the pool's segment files occupy.
    pub journal_bytes: u64,
    pub journal_max: u64,
    pub journal_warn: u64,
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
}

#[derive(Debug)]
struct Cursor {
    next_lsn: u64,
    last_timestamp: u64,
    active: Option<Arc<Segment>>,
    /// Where the next header slot of `active` is (slots grow down).
    slot: u64,
    /// End of the payloads in `active` (payloads grow up).
    top: u64,
    times: TimeIndex,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: VolumeConfig,
    clock: Arc<dyn Clock>,
    retry: RetryPolicy,
    base: Arc<dyn crate::storage::StorageFile>,
    pool: Arc<Pool>,
    map: ExtentMap,
    cursor: Mutex<Cursor>,
    /// Highest lsn of a record that changes the disk (what a flush covers).
    last_data_lsn: AtomicU64,
    completion: Completion,
    durable_lsn: AtomicU64,
    sync_lock: Mutex<()>,
    writethrough: AtomicBool,
    warned: AtomicBool,
    failure: OnceLock<String>,
    max_payload: u64,
}

/// An open volume. All methods take `&self` and may be called from many
/// threads. Dropping it does not flush: call [`Volume::close`] for that.
#[derive(Debug)]
pub struct Volume {
    inner: Arc<Inner>,
    maintainer: Option<JoinHandle<()>>,
    _lock: LockGuard,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let config = VolumeConfig::new(settings);
        Superblock::create(storage, dir, config.uuid)?;
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
        let lock_guard = storage.lock(&dir.join(VOLUME_FILE)).map_err(|e| {
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
        let recovered = recover(
            storage.as_ref(),
            dir,
            &config,
            sb.state(),
            options.truncate_damaged,
        )?;
        let report = recovered.report.clone();
        tracing::info!(volume = %dir.display(), "{report}");

        // What recovery read may be only in the page cache: make it durable
        // before anything is appended after it.
        for seg in &recovered.used {
            seg.file
                .sync_data()
                .map_err(Error::io(|| format!("syncing segment {}", seg.id)))?;
        }
        let journal_dir = dir.join(JOURNAL_DIR);
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
        let listed: Vec<String> = sb
            .state()
            .segments
            .iter()
            .map(|s| segment_name(s.file_id))
            .collect();
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
        })?);
        remove_orphans(storage.as_ref(), &journal_dir, &listed)?;
        pool.fill_reserve()?;

        let next_lsn = report.next_lsn;
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            max_payload: config.max_record_payload(),
            config,
            clock: options.clock,
            retry: options.retry,
            base,
            pool: pool.clone(),
            map: recovered.map,
            cursor: Mutex::new(Cursor {
                next_lsn,
                last_timestamp: recovered.times.bounds().map_or(0, |b| b.1),
                // Never append after a crashed run's tail: start a fresh segment.
                active: None,
                slot: 0,
                top: 0,
                times: recovered.times,
            }),
            last_data_lsn: AtomicU64::new(recovered.last_data_lsn),
            completion: Completion::new(next_lsn - 1),
            durable_lsn: AtomicU64::new(next_lsn - 1),
            sync_lock: Mutex::new(()),
            writethrough: AtomicBool::new(options.writethrough),
            warned: AtomicBool::new(false),
            failure: OnceLock::new(),
        });
        let maintainer = std::thread::Builder::new()
            .name("rewind-pool".into())
            .spawn(move || pool.maintain())
            .map_err(Error::io(|| "starting the pool thread"))?;
        Ok((
            Volume {
                inner,
                maintainer: Some(maintainer),
                _lock: lock_guard,
            },
            report,
        ))
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

    /// Writes `data` at `offset` (both multiples of 512); returns the lsn of
    /// its (last) record.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let inner = &self.inner;
        check_range(offset, data.len() as u64, inner.config.size).map_err(Error::InvalidRequest)?;
        let mut lsn = 0;
        let mut at = offset;
        for chunk in data.chunks(inner.max_payload as usize) {
            lsn = inner.append(RecordKind::Write, at, chunk.len() as u64, chunk)?;
            at += chunk.len() as u64;
        }
        inner.after_write()?;
        Ok(lsn)
    }

    /// Makes `[offset, offset + length)` read as zeroes.
    pub fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<u64> {
        self.zero(RecordKind::WriteZeroes { unmap }, offset, length)
    }

    /// Discards `[offset, offset + length)`; it then reads as zeroes.
    pub fn discard(&self, offset: u64, length: u64) -> Result<u64> {
        self.zero(RecordKind::Discard, offset, length)
    }

    fn zero(&self, kind: RecordKind, offset: u64, length: u64) -> Result<u64> {
        let inner = &self.inner;
        check_range(offset, length, inner.config.size).map_err(Error::InvalidRequest)?;
        let lsn = inner.append(kind, offset, length, &[])?;
        inner.after_write()?;
        Ok(lsn)
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        check_range(offset, buf.len() as u64, inner.config.size).map_err(Error::InvalidRequest)?;
        let mut pieces = Pieces::new();
        inner
            .map
            .lookup(offset / SECTOR, buf.len() as u64 / SECTOR, &mut pieces);
        let first = offset / SECTOR;
        for piece in &pieces {
            inner.read_piece(piece, first, buf)?;
        }
        Ok(())
    }

    /// Makes every write that returned before this call durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Flushes and stops the pool's thread.
    pub fn close(mut self) -> Result<()> {
        let flushed = self.inner.flush();
        self.stop_maintainer();
        flushed
    }

    fn stop_maintainer(&mut self) {
        self.inner.pool.shutdown();
        if let Some(handle) = self.maintainer.take() {
            if handle.join().is_err() {
                tracing::error!("the pool thread panicked");
            }
        }
    }

    /// The newest lsn whose record is at or before `timestamp_ns`.
    pub fn lsn_at(&self, timestamp_ns: u64) -> Option<u64> {
        lock(&self.inner.cursor).times.lsn_at(timestamp_ns)
    }

    pub fn last_lsn(&self) -> u64 {
        lock(&self.inner.cursor).next_lsn - 1
    }

    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let (last_lsn, bounds) = {
            let c = lock(&inner.cursor);
            (c.next_lsn - 1, c.times.bounds())
        };
        let counts = inner.pool.counts();
        Stats {
            uuid: inner.config.uuid,
            size: inner.config.size,
            epoch: inner.config.epoch,
            segment_size: inner.config.segment_size,
            segments_used: counts.used,
            segments_free: counts.free,
            reserve_target: u64::from(inner.config.reserve_segments),
            journal_bytes: counts.bytes,
            journal_max: inner.pool.journal_max(),
            journal_warn: inner.config.journal_warn,
            over_warning: counts.bytes >= inner.config.journal_warn,
            base_lsn: inner.pool.base_lsn(),
            last_lsn,
            durable_lsn: inner.durable_lsn.load(Ordering::Acquire),
            oldest_record_ns: bounds.map(|b| b.0),
            newest_record_ns: bounds.map(|b| b.1),
            extents: inner.map.len(),
            writethrough: self.writethrough(),
            failed: inner.failure.get().cloned(),
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

/// Removes journal files `super` does not list: leftovers of a preparation
/// or release that a crash interrupted.
fn remove_orphans(storage: &dyn Storage, journal: &Path, listed: &[String]) -> Result<()> {
    let names = storage
        .list_dir(journal)
        .map_err(Error::io(|| format!("listing {}", journal.display())))?;
    let mut removed = false;
    for name in names {
        if name.ends_with(".seg") && !listed.contains(&name) {
            let path = journal.join(&name);
            tracing::info!(file = %path.display(), "removing a segment file the pool does not list");
            storage
                .remove_file(&path)
                .map_err(Error::io(|| format!("removing {}", path.display())))?;
            removed = true;
        }
    }
    if removed {
        storage
            .sync_dir(journal)
            .map_err(Error::io(|| format!("syncing {}", journal.display())))?;
    }
    Ok(())
}

/// Places a record whose header goes in the slot at `slot`, in a segment
/// whose payloads end at `top`: `Some(None)` without payload,
/// `Some(Some(offset))` with, `None` if it does not fit.
fn place(slot: u64, top: u64, len: u64) -> Option<Option<u64>> {
    if slot < top {
        return None;
    }
    if len == 0 {
        return Some(None);
    }
    payload_position(top, len, slot).map(Some)
}

impl Inner {
    fn check_failed(&self) -> Result<()> {
        match self.failure.get() {
            Some(reason) => Err(Error::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Stops the volume taking writes: something on disk can no longer be
    /// made durable in order.
    fn fail(&self, reason: String) {
        tracing::error!(volume = %self.dir.display(), "{reason}; the volume stops taking writes");
        let _ = self.failure.set(reason);
        self.completion.fail();
    }

    /// Runs `op`, retrying EIO and ENOSPC with backoff up to the policy's bound.
    fn retrying<T>(&self, what: &str, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        let mut first_error: Option<Instant> = None;
        let mut backoff = self.retry.first_backoff;
        loop {
            match op() {
                Err(e) if retryable(&e) => {
                    let since = *first_error.get_or_insert_with(|| {
                        tracing::warn!(
                            volume = %self.dir.display(),
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

    fn append(&self, kind: RecordKind, offset: u64, length: u64, payload: &[u8]) -> Result<u64> {
        self.check_failed()?;
        let payload_crc = crc32c::crc32c(payload);
        let len = payload.len() as u64;
        let mut sealed = None;
        let (header, slot, segment) = {
            let mut c = lock(&self.cursor);
            let placed = c
                .active
                .clone()
                .and_then(|seg| Some((seg, place(c.slot, c.top, len)?)));
            let (segment, payload_offset) = match placed {
                Some(found) => found,
                None => {
                    let segment = self.pool.take_next()?;
                    sealed = c.active.replace(segment.clone());
                    c.slot = self.config.segment_size - RECORD_HEADER_SIZE;
                    c.top = SEGMENT_HEADER_SIZE;
                    self.warn_if_over_threshold();
                    // Payloads are capped so that one always fits a fresh segment.
                    let offset = place(c.slot, c.top, len).ok_or_else(|| {
                        Error::InvalidRequest(format!("a {len}-byte record cannot fit a segment"))
                    })?;
                    (segment, offset)
                }
            };
            let lsn = c.next_lsn;
            let timestamp = self.clock.now_ns().max(c.last_timestamp);
            c.next_lsn += 1;
            c.last_timestamp = timestamp;
            c.times.push(timestamp);
            if kind != RecordKind::Flush {
                self.last_data_lsn.store(lsn, Ordering::Release);
            }
            let header = RecordHeader {
                kind,
                seq: segment.seq,
                lsn,
                timestamp,
                epoch: self.config.epoch,
                offset,
                length,
                payload_len: len as u32,
                payload_crc,
                payload_offset: payload_offset.unwrap_or(0),
            };
            let slot = c.slot;
            if let Some(at) = payload_offset {
                c.top = at + len;
            }
            // Below `top` means full: `place` refuses the next record.
            c.slot = slot.saturating_sub(RECORD_HEADER_SIZE);
            (header, slot, segment)
        };
        if let Some(full) = sealed {
            self.seal(&full);
        }
        // Both are in the page cache before the write is acknowledged, so a
        // crash of this process (not of the machine) loses nothing.
        let head = header.encode();
        let written = self.retrying("appending to the journal", || {
            if !payload.is_empty() {
                segment
                    .file
                    .write_all_at(&[payload], header.payload_offset)?;
            }
            segment.file.write_all_at(&[&head], slot)
        });
        if let Err(e) = written {
            let reason = format!("journal append of lsn {} failed: {e}", header.lsn);
            self.fail(reason.clone());
            return Err(Error::Failed(reason));
        }
        segment.dirty.store(true, Ordering::Release);
        let (start, sectors) = (offset / SECTOR, length / SECTOR);
        match kind {
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
            RecordKind::Flush => {}
        }
        self.completion.complete(header.lsn);
        Ok(header.lsn)
    }

    /// The writer moved past `full`: start its writeback, which the next
    /// flush will need.
    fn seal(&self, full: &Segment) {
        if let Err(e) = full.file.start_writeback() {
            tracing::debug!(segment = full.id, error = %e, "could not start writeback");
        }
    }

    fn warn_if_over_threshold(&self) {
        let bytes = self.pool.counts().bytes;
        let over = bytes >= self.config.journal_warn;
        if over && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                volume = %self.dir.display(),
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
        let covered = {
            let _sync = lock(&self.sync_lock);
            if self.durable_lsn.load(Ordering::Acquire) >= target {
                return Ok(()); // another flush synced for us
            }
            let upto = self.completion.prefix();
            if let Err(e) = self.pool.sync_dirty() {
                let reason = format!("syncing the journal failed: {e}");
                self.fail(reason.clone());
                return Err(Error::Failed(reason));
            }
            self.durable_lsn.store(upto, Ordering::Release);
            upto
        };
        // Proof for recovery that everything up to `covered` was durable.
        self.append(RecordKind::Flush, covered, 0, &[])?;
        Ok(())
    }

    fn read_piece(&self, piece: &Piece, first: u64, buf: &mut [u8]) -> Result<()> {
        let from = ((piece.start - first) * SECTOR) as usize;
        let out = &mut buf[from..from + (piece.sectors * SECTOR) as usize];
        match piece.source {
            Source::Zero => out.fill(0),
            Source::Base => {
                let at = piece.start * SECTOR;
                self.retrying("reading base.img", || self.base.read_exact_at(out, at))
                    .map_err(Error::io(|| format!("reading {BASE_FILE} at {at}")))?;
            }
            Source::Journal { segment, sector } => {
                let seg = self.pool.segment(segment).ok_or_else(|| Error::Io {
                    context: format!("segment {segment}"),
                    source: io::Error::other("the extent map points to a released segment"),
                })?;
                let at = u64::from(sector) * SECTOR;
                self.retrying("reading the journal", || seg.file.read_exact_at(out, at))
                    .map_err(Error::io(|| {
                        format!("reading {} at {at}", segment_name(segment))
                    }))?;
            }
        }
        Ok(())
    }
}
