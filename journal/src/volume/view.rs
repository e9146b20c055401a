//! Point-in-time views: the disk as it was at one lsn, read while the live
//! volume goes on.
//!
//! A view is built from the record index alone (no data is copied): the
//! records base_lsn+1..=lsn are replayed into a map of its own. It pins the
//! segments it reads (holding their `Arc`s) and registers its lsn, so the
//! applier neither reuses those files nor folds past it; only the hard
//! limit may, and it expires the view first, after which its reads fail
//! with a clear error instead of returning other data.
//!
//! A view of a branch (branch.rs) is the journal's state at the branch's
//! base lsn with the branch's records after it: its map names sectors of
//! the branch's records file as segment [`BRANCH_SEGMENT`]. It pins the
//! journal at the oldest lsn it needs from there, like any view.
//!
//! A writable view takes writes into a scratch overlay: a file in
//! `<vol>/scratch/` with its own map, deleted with the view (and, after a
//! crash, at the next open). The volume itself is never written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLockReadGuard};

use uuid::Uuid;

use super::branch::BRANCH_SEGMENT;
use super::{lock, Inner, PinState, ViewPin};
use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Piece, Pieces, Source, Target};
use crate::format::{check_range, SECTOR};
use crate::pool::segment_name;
use crate::record_index::Entry;
use crate::storage::{Progress, Storage, StorageFile};

const SCRATCH_DIR: &str = "scratch";

/// The disk as it was at one moment. See the module documentation.
pub struct View {
    inner: Arc<Inner>,
    lsn: u64,
    timestamp_ns: u64,
    map: ExtentMap,
    pin: Arc<ViewPin>,
    scratch: Option<Scratch>,
    branch: Option<BranchFile>,
}

/// What a view of a branch reads besides the journal.
#[derive(Debug)]
struct BranchFile {
    name: String,
    file: Arc<dyn StorageFile>,
}

/// A branch's part of a view: the journal's state at `base_lsn`, then
/// `entries` (lsns `base_lsn + 1..`), whose data is in `file`.
pub(super) struct BranchPart {
    pub name: String,
    pub file: Arc<dyn StorageFile>,
    pub base_lsn: u64,
    /// The oldest journal lsn whose state the branch reads (a Revert in
    /// it may go back before its base).
    pub needs_lsn: u64,
    pub entries: Vec<Entry>,
    /// Time of the view's lsn.
    pub timestamp_ns: u64,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("volume", &self.inner.dir)
            .field("branch", &self.branch.as_ref().map(|b| &b.name))
            .field("lsn", &self.lsn)
            .field("timestamp_ns", &self.timestamp_ns)
            .field("read_only", &self.read_only())
            .finish()
    }
}

#[derive(Debug)]
struct Scratch {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    /// Overlay extents: `Journal { sector }` is a sector of the scratch file.
    map: ExtentMap,
    /// (last write's sequence number, end of the scratch file in sectors).
    next: Mutex<(u64, u64)>,
}

impl View {
    pub(super) fn build(inner: Arc<Inner>, lsn: u64, writable: bool) -> Result<View> {
        Self::make(inner, lsn, None, writable)
    }

    /// A view of a branch at `lsn` (a branch lsn, or its base).
    pub(super) fn build_branch(
        inner: Arc<Inner>,
        lsn: u64,
        part: BranchPart,
        writable: bool,
    ) -> Result<View> {
        Self::make(inner, lsn, Some(part), writable)
    }

    fn make(
        inner: Arc<Inner>,
        lsn: u64,
        branch: Option<BranchPart>,
        writable: bool,
    ) -> Result<View> {
        let (pin, snapshot, timestamp_ns) = {
            // No fold runs while the view registers: the next one sees it.
            let _no_fold = lock(&inner.fold_lock);
            let index = lock(&inner.index);
            let (start, _) = inner.window_start(&index);
            match &branch {
                None => {
                    if lsn < start {
                        return Err(Error::InvalidRequest(format!(
                            "lsn {lsn} left the window while the view was being made (it starts at lsn {start})"
                        )));
                    }
                    let pin = inner.pin(lsn, inner.pool.used());
                    (pin, index.snapshot(lsn), index.timestamp(lsn))
                }
                Some(part) => {
                    if part.needs_lsn < start || part.base_lsn > index.last_lsn() {
                        return Err(Error::BranchUnreadable {
                            name: part.name.clone(),
                            reason: format!(
                                "the journal no longer holds the disk as of lsn {} that it \
                                 starts from (its history starts at lsn {start})",
                                part.needs_lsn
                            ),
                        });
                    }
                    let pin = inner.pin(part.needs_lsn, inner.pool.used());
                    let mut snapshot = index.snapshot(part.base_lsn);
                    for entry in part.entries.iter().take((lsn - part.base_lsn) as usize) {
                        snapshot.push(*entry);
                    }
                    (pin, snapshot, part.timestamp_ns)
                }
            }
        };
        let map = ExtentMap::new(inner.config.size);
        snapshot.replay_into(&map, lsn);
        let scratch = if writable {
            Some(Scratch::create(&inner)?)
        } else {
            None
        };
        Ok(View {
            inner,
            lsn,
            timestamp_ns,
            map,
            pin,
            scratch,
            branch: branch.map(|part| BranchFile {
                name: part.name,
                file: part.file,
            }),
        })
    }

    /// The branch the view shows, if it is a branch's.
    pub fn branch(&self) -> Option<&str> {
        self.branch.as_ref().map(|b| b.name.as_str())
    }

    /// The lsn whose state the view shows.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// When that record was written (ns since the epoch).
    pub fn timestamp_ns(&self) -> u64 {
        self.timestamp_ns
    }

    pub fn size(&self) -> u64 {
        self.inner.config.size
    }

    pub fn read_only(&self) -> bool {
        self.scratch.is_none()
    }

    fn state(&self) -> Result<RwLockReadGuard<'_, PinState>> {
        let state = self.pin.state.read().unwrap_or_else(|e| e.into_inner());
        match &state.expired {
            Some(reason) => Err(Error::ViewExpired(reason.clone())),
            None => Ok(state),
        }
    }

    /// Where `[start, start + sectors)` reads from: the overlay first, then
    /// the view's map.
    fn pieces(&self, start: u64, sectors: u64) -> Pieces {
        let mut pieces = Pieces::new();
        let Some(scratch) = &self.scratch else {
            self.map.lookup(start, sectors, &mut pieces);
            return pieces;
        };
        let mut overlay = Pieces::new();
        scratch.map.lookup(start, sectors, &mut overlay);
        for piece in overlay {
            match piece.source {
                Source::Base => self.map.lookup(piece.start, piece.sectors, &mut pieces),
                Source::Journal { sector, .. } => pieces.push(Piece {
                    source: Source::Journal {
                        segment: SCRATCH_SEGMENT,
                        sector,
                    },
                    ..piece
                }),
                Source::Zero => pieces.push(piece),
            }
        }
        pieces
    }

    /// Whether `[offset, offset + len)` may hold anything but zeroes, found
    /// without reading it: false when every piece is a zeroed range or a
    /// hole of base.img.
    pub fn may_hold_data(&self, offset: u64, len: u64) -> Result<bool> {
        check_range(offset, len, self.size()).map_err(Error::InvalidRequest)?;
        // Held while the pieces are looked at: an expired view has none.
        let _state = self.state()?;
        for piece in &self.pieces(offset / SECTOR, len / SECTOR) {
            let data = match piece.source {
                Source::Zero => false,
                Source::Journal { .. } => true,
                Source::Base => self
                    .inner
                    .base
                    .may_hold_data(piece.start * SECTOR, piece.sectors * SECTOR)
                    .map_err(Error::io(|| "looking for data in base.img"))?,
            };
            if data {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size()).map_err(Error::InvalidRequest)?;
        let state = self.state()?;
        let first = offset / SECTOR;
        for piece in &self.pieces(first, buf.len() as u64 / SECTOR) {
            let from = ((piece.start - first) * SECTOR) as usize;
            let out = &mut buf[from..from + (piece.sectors * SECTOR) as usize];
            self.read_piece(&state, piece, out)?;
        }
        Ok(())
    }

    fn read_piece(&self, state: &PinState, piece: &Piece, out: &mut [u8]) -> Result<()> {
        match piece.source {
            Source::Zero => out.fill(0),
            Source::Base => self.inner.read_base(out, piece.start * SECTOR)?,
            Source::Journal { segment, sector } => {
                let at = u64::from(sector) * SECTOR;
                let file = match (&self.scratch, &self.branch, segment) {
                    (Some(scratch), _, SCRATCH_SEGMENT) => scratch.file.clone(),
                    (_, Some(branch), BRANCH_SEGMENT) => branch.file.clone(),
                    _ => state
                        .segments
                        .iter()
                        .find(|s| s.id == segment)
                        .map(|s| s.file.clone())
                        .ok_or_else(|| Error::Io {
                            context: format!("view of lsn {}", self.lsn),
                            source: io::Error::other(format!(
                                "{} is not pinned by the view",
                                segment_name(segment)
                            )),
                        })?,
                };
                self.inner
                    .retrying("reading a view", || file.read_exact_at(out, at))
                    .map_err(Error::io(|| match (&self.branch, segment) {
                        (Some(branch), BRANCH_SEGMENT) => {
                            format!("reading branch {:?} at {at}", branch.name)
                        }
                        _ => format!("reading {} at {at}", segment_name(segment)),
                    }))?;
            }
        }
        Ok(())
    }

    fn scratch(&self) -> Result<&Scratch> {
        self.scratch
            .as_ref()
            .ok_or_else(|| Error::ReadOnly(format!("the view of lsn {}", self.lsn)))
    }

    /// Writes into the scratch overlay (writable views only).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size()).map_err(Error::InvalidRequest)?;
        let scratch = self.scratch()?;
        let _live = self.state()?;
        let sectors = data.len() as u64 / SECTOR;
        let (seq, at) = scratch.claim(sectors)?;
        self.inner
            .retrying("writing a scratch overlay", || {
                scratch.file.write_all_at(&[data], at * SECTOR)
            })
            .map_err(Error::io(|| format!("writing {}", scratch.path.display())))?;
        let target = Target::Journal {
            segment: SCRATCH_SEGMENT,
            sector: at as u32,
        };
        scratch.map.insert(offset / SECTOR, sectors, seq, target);
        Ok(())
    }

    /// Makes a range of the overlay read as zeroes (writable views only).
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        check_range(offset, length, self.size()).map_err(Error::InvalidRequest)?;
        let scratch = self.scratch()?;
        let _live = self.state()?;
        let (seq, _) = scratch.claim(0)?;
        scratch
            .map
            .insert(offset / SECTOR, length / SECTOR, seq, Target::Zero);
        Ok(())
    }

    /// Writes a sparse raw image of the view to `output`, a new file; an
    /// incomplete image is removed. Reports `(bytes done, bytes in all)`.
    pub fn materialize(&self, output: &Path, progress: Progress<'_>) -> Result<()> {
        let context = || format!("writing {}", output.display());
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(output)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Error::Exists(output.to_owned()),
                _ => Error::io(context)(e),
            })?;
        let written = self
            .copy_into(&out, progress)
            .and_then(|()| out.sync_all().map_err(Error::io(context)));
        if written.is_err() {
            drop(out);
            let _ = std::fs::remove_file(output);
        }
        written
    }

    /// Copies base.img's data in one sparse pass (as `cp --sparse` would),
    /// then lays the journal's pieces over it. Progress counts both passes.
    fn copy_into(&self, out: &File, progress: Progress<'_>) -> Result<()> {
        let context = || "writing the image".to_string();
        let size = self.size();
        out.set_len(size).map_err(Error::io(context))?;
        let state = self.state()?;
        let pieces = self.pieces(0, size / SECTOR);
        let changed: u64 = pieces
            .iter()
            .filter(|p| p.source != Source::Base)
            .map(|p| p.sectors * SECTOR)
            .sum();
        let total = size + changed;
        self.inner
            .retrying("copying base.img", || {
                self.inner
                    .base
                    .copy_to(out, size, &mut |done, _| progress(done, total))
            })
            .map_err(Error::io(|| "copying base.img"))?;
        let mut done = size;
        let mut buf = Vec::new();
        for piece in pieces.iter().filter(|p| p.source != Source::Base) {
            let (at, len) = (piece.start * SECTOR, piece.sectors * SECTOR);
            if piece.source == Source::Zero {
                crate::storage::zero_range(out, at, len).map_err(Error::io(context))?;
            } else {
                let mut copied = 0;
                while copied < len {
                    let n = (len - copied).min(COPY_CHUNK);
                    buf.resize(n as usize, 0);
                    let part = Piece {
                        start: piece.start + copied / SECTOR,
                        sectors: n / SECTOR,
                        source: piece.source.advanced(copied / SECTOR),
                    };
                    self.read_piece(&state, &part, &mut buf)?;
                    out.write_all_at(&buf, at + copied)
                        .map_err(Error::io(context))?;
                    copied += n;
                }
            }
            done += len;
            progress(done, total);
        }
        progress(total, total);
        Ok(())
    }
}

const COPY_CHUNK: u64 = 1 << 20;
/// The segment id that names the scratch file in a writable view's pieces
/// (real segment ids never get this high: `super` lists at most 8187;
/// [`BRANCH_SEGMENT`] is the one below it).
const SCRATCH_SEGMENT: u32 = u32::MAX;

impl Scratch {
    fn create(inner: &Inner) -> Result<Scratch> {
        let dir = inner.dir.join(SCRATCH_DIR);
        let path = dir.join(format!("{}.img", Uuid::new_v4()));
        let context = || format!("creating {}", path.display());
        inner
            .storage
            .create_dir_all(&dir)
            .map_err(Error::io(context))?;
        let file = inner
            .storage
            .create_new(&path)
            .map_err(Error::io(context))?;
        Ok(Scratch {
            storage: inner.storage.clone(),
            path,
            file,
            map: ExtentMap::new(inner.config.size),
            next: Mutex::new((0, 0)),
        })
    }

    /// Claims `sectors` at the end of the scratch file and the next write
    /// number (newer writes win in the overlay map).
    fn claim(&self, sectors: u64) -> Result<(u64, u64)> {
        let mut next = lock(&self.next);
        let at = next.1;
        if at + sectors > u64::from(u32::MAX) {
            return Err(Error::InvalidRequest(
                "the scratch overlay is full (2 TiB of writes); drop the view".into(),
            ));
        }
        next.0 += 1;
        next.1 += sectors;
        Ok((next.0, at))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = self.storage.remove_file(&self.path) {
            tracing::warn!(
                event = crate::events::SCRATCH_NOT_REMOVED,
                file = %self.path.display(),
                error = %e,
                "could not remove a scratch overlay"
            );
        }
    }
}

/// Removes scratch overlays a crash left behind (no view survives a restart).
pub(super) fn remove_scratch_files(storage: &dyn Storage, dir: &Path) -> Result<()> {
    let scratch = dir.join(SCRATCH_DIR);
    if !storage.exists(&scratch) {
        return Ok(());
    }
    let names = storage
        .list_dir(&scratch)
        .map_err(Error::io(|| format!("listing {}", scratch.display())))?;
    for name in names {
        let path = scratch.join(name);
        storage
            .remove_file(&path)
            .map_err(Error::io(|| format!("removing {}", path.display())))?;
    }
    Ok(())
}
