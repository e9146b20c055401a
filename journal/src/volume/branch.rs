//! Read-only branches: the records a cut took off the end of the journal
//! (DESIGN.md, "Divergence and rejoin").
//!
//! After a failover the old primary holds records after the common point
//! C that the new primary never got; to follow the new primary it must
//! take *its* records at lsns C+1, C+2, ... [`Volume::cut_to_branch`]
//! copies the records after C into a branch, then ends the journal at C.
//! A branch can be listed, viewed, exported and materialized at any of its
//! moments (`branch:NAME`, `branch:NAME@T`): the disk as of C (the
//! journal's state) with the branch's records after it.
//!
//! On disk (FORMAT.md, "Branches"): `<vol>/branches/NAME.records` holds a
//! copy of each record (header re-encoded with the payload's offset in
//! that file) and `<vol>/branches/NAME.json` describes it; the JSON is
//! written last, so a branch without it is an interrupted copy.
//!
//! Crash safety of a cut: `<vol>/cut` (JSON: name, C, the last lsn) is
//! written first. Then the branch is copied and synced, then its JSON
//! written. Only then does the journal change: the header slots after C's
//! in the segment holding C are erased (zeroed, synced), the segments
//! after it leave `super`'s list, the epoch history forgets epochs that
//! began after C, branches based after C are marked lost; then `cut` is
//! removed. At open, a `cut` whose branch is complete makes recovery end
//! the journal at C and the steps above run again (each is idempotent);
//! one whose branch is not complete is rolled back (the partial copy
//! removed, the journal untouched). So a crash never loses the records:
//! they are in the journal, or in a complete branch.
//!
//! Why erasing is enough: recovery accepts a record only at the next lsn
//! in a header slot of its segment's current use (in an inline use, right
//! after the record before it, with the use's nonce). With every header
//! after C's erased in C's segment, and the later segments unlisted (their files
//! are recycled with a new sequence number, or removed), no record after
//! C is found again, even when new records take lsns C+1.. in a fresh
//! segment (appends after a cut, as after an open, never go on in the
//! segment holding C).
//!
//! The branch needs the journal's state at C (and before it, down to the
//! target of a Revert it holds): a branch holds the applier off it like a
//! live view does, so the journal keeps it unless the hard limit forces a
//! fold past it; the branch is then listed as not readable and its views
//! fail with [`Error::BranchUnreadable`]. Drop a branch once it is
//! exported to let the journal fold again.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::view::{BranchPart, View};
use super::{lock, Cursor, Inner, ViewPin, Volume};
use crate::error::{Error, Result};
use crate::extent_map::ExtentMap;
use crate::format::{
    crc32c, le_u32, le_u64, HeaderProblem, Layout, RecordHeader, RecordKind, FORMAT_VERSION,
    RECORD_HEADER_SIZE, SECTOR, SEGMENT_HEADER_SIZE,
};
use crate::meta::{read_small_file, EpochStart, MAX_VOLUME_FILE};
use crate::point::{check_branch_name, format_ns, PointInTime};
use crate::pool::{segment_name, Segment, JOURNAL_DIR};
use crate::record_index::{Bookmark, Effect, Entry};
use crate::storage::write_direct_parts;
use crate::storage::{Storage, StorageFile};

pub const BRANCHES_DIR: &str = "branches";
/// The intent file of a cut under way.
pub const CUT_FILE: &str = "cut";
const RECORDS_EXT: &str = "records";
const META_EXT: &str = "json";
const MAGIC: [u8; 8] = *b"RWNDBRN\0";
/// Bytes of the records file's header sector that are used.
const FILE_HEADER_USED: usize = 44;
/// The segment id that names a branch's records file in a view's map.
pub(super) const BRANCH_SEGMENT: u32 = u32::MAX - 1;
/// Bytes of records read from the journal per batch while copying.
const COPY_BATCH: usize = 4 << 20;
/// Bytes of header slots read per call while erasing.
const ERASE_CHUNK: u64 = 1 << 20;
/// Bytes a branch's description may have: besides a name and numbers it
/// lists epochs, which volume.json's epoch history holds (each in more
/// bytes) in at most this.
const MAX_META_FILE: u64 = MAX_VOLUME_FILE;
/// Bytes the cut file may have: a branch name and two lsns take a few
/// hundred.
const MAX_CUT_FILE: u64 = 4096;

/// A branch, as [`Volume::branches`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchInfo {
    pub name: String,
    /// The lsn C it starts from: the journal's disk at C is its base.
    pub base_lsn: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
    /// Times (ns since the Unix epoch) of its first and last records.
    pub first_ns: u64,
    pub last_ns: u64,
    /// The epochs its records carry, in order.
    pub epochs: Vec<u64>,
    pub records: u64,
    /// Bytes its records file takes.
    pub bytes: u64,
    /// Whether its views can be made: false once the journal no longer
    /// holds the state at `base_lsn` (a fold the hard limit forced, a
    /// later cut before it, a resync) or its files are damaged.
    pub readable: bool,
    /// Why it is not readable.
    pub problem: Option<String>,
}

/// `<vol>/branches/NAME.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchMeta {
    format_version: u16,
    uuid: Uuid,
    name: String,
    base_lsn: u64,
    /// Time of record `base_lsn`.
    base_ns: u64,
    /// The oldest journal lsn whose state the branch reads.
    needs_lsn: u64,
    first_lsn: u64,
    last_lsn: u64,
    first_ns: u64,
    last_ns: u64,
    epochs: Vec<u64>,
    records: u64,
    /// Length of the records file.
    file_size: u64,
    /// Why the journal's state this branch starts from is gone for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lost: Option<String>,
}

/// `<vol>/cut`: a cut under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CutIntent {
    name: String,
    common_lsn: u64,
    last_lsn: u64,
}

/// A branch the open volume knows.
#[derive(Debug)]
pub(super) struct Branch {
    name: String,
    meta: std::result::Result<BranchMeta, String>,
    /// Holds the applier off the journal state the branch reads, like a
    /// view; `None` when that state is gone.
    pin: Option<Arc<ViewPin>>,
}

/// How many of `history`'s epochs a cut at `common` keeps: those that
/// began at or before it. Epoch 1 began with the volume, without a record,
/// and stays whatever the cut. Any other first entry is what compaction
/// left (journal/FORMAT.md, "volume.json") and began with an Epoch
/// record: a cut before it would leave no entry for the epoch in force at
/// `common`, so it is refused. Relating two histories never asks for one
/// (its common point is at or after the entry both hold).
fn epochs_kept_by_cut(history: &[EpochStart], common: u64) -> std::result::Result<usize, String> {
    let keep = history
        .iter()
        .position(|e| e.first_lsn > common)
        .unwrap_or(history.len());
    match history.first() {
        Some(first) if keep == 0 && first.epoch == 1 => Ok(1),
        Some(first) if keep == 0 => Err(format!(
            "cannot cut at lsn {common}: it is before epoch {}, the oldest this volume's epoch \
             history still lists (it began at lsn {}), so which epoch was in force there is \
             forgotten",
            first.epoch, first.first_lsn
        )),
        _ => Ok(keep),
    }
}

fn branches_dir(dir: &Path) -> PathBuf {
    dir.join(BRANCHES_DIR)
}

fn meta_path(dir: &Path, name: &str) -> PathBuf {
    branches_dir(dir).join(format!("{name}.{META_EXT}"))
}

fn records_path(dir: &Path, name: &str) -> PathBuf {
    branches_dir(dir).join(format!("{name}.{RECORDS_EXT}"))
}

/// Reads a JSON file of at most `max` bytes ([`read_small_file`]).
fn read_json<T: for<'de> Deserialize<'de>>(
    storage: &dyn Storage,
    path: &Path,
    max: u64,
    what: &str,
) -> Result<T> {
    let bytes = read_small_file(storage, path, max, what)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadMetadata {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn write_json<T: Serialize>(storage: &dyn Storage, path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::BadMetadata {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    storage
        .write_file_atomic(path, &bytes)
        .map_err(Error::io(|| format!("writing {}", path.display())))
}

fn remove_if_there(storage: &dyn Storage, path: &Path) -> Result<()> {
    match storage.remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(|| format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn sync_dir(storage: &dyn Storage, dir: &Path) -> Result<()> {
    storage
        .sync_dir(dir)
        .map_err(Error::io(|| format!("syncing {}", dir.display())))
}

/// A branch's description, checked against the volume; `Err` says why it
/// cannot be used.
fn load_meta(
    storage: &dyn Storage,
    dir: &Path,
    name: &str,
    uuid: Uuid,
) -> std::result::Result<BranchMeta, String> {
    let meta: BranchMeta = read_json(
        storage,
        &meta_path(dir, name),
        MAX_META_FILE,
        "a branch description",
    )
    .map_err(|e| e.to_string())?;
    if meta.format_version != FORMAT_VERSION {
        return Err(format!(
            "its description has format version {}; this build reads version {FORMAT_VERSION}",
            meta.format_version
        ));
    }
    if meta.uuid != uuid || meta.name != name {
        return Err(format!(
            "its description names branch {:?} of volume {}",
            meta.name, meta.uuid
        ));
    }
    // Each record takes a header sector at least, after the file's own:
    // so a damaged count cannot size what reading the branch allocates.
    let most = (meta.file_size / SECTOR).saturating_sub(1);
    let consistent = meta.base_lsn.checked_add(1) == Some(meta.first_lsn)
        && meta.last_lsn.checked_sub(meta.base_lsn) == Some(meta.records)
        && (1..=most).contains(&meta.records);
    if !consistent {
        return Err(format!(
            "its description is inconsistent: base lsn {}, lsns {}..={}, {} records in a \
             {}-byte file (restore the description, or drop the branch)",
            meta.base_lsn, meta.first_lsn, meta.last_lsn, meta.records, meta.file_size
        ));
    }
    Ok(meta)
}

/// The lsn a cut left under way ends the journal at, before recovery: a
/// cut whose branch is complete is finished after recovery
/// ([`Inner::finish_cut`]); one whose branch is not is rolled back here;
/// one whose branch's description is damaged makes the open fail.
pub(super) fn pending_cut(storage: &dyn Storage, dir: &Path, uuid: Uuid) -> Result<Option<u64>> {
    let path = dir.join(CUT_FILE);
    if !storage.exists(&path) {
        return Ok(None);
    }
    let intent: CutIntent = read_json(storage, &path, MAX_CUT_FILE, "a cut file")?;
    check_branch_name(&intent.name).map_err(|reason| Error::BadMetadata {
        path: path.clone(),
        reason,
    })?;
    let meta = meta_path(dir, &intent.name);
    if storage.exists(&meta) {
        check_cut_branch(storage, dir, uuid, &intent)?;
        tracing::warn!(
            event = crate::events::CUT_INTERRUPTED,
            volume = %uuid,
            dir = %dir.display(),
            branch = intent.name,
            "finishing a cut interrupted at lsn {}",
            intent.common_lsn
        );
        return Ok(Some(intent.common_lsn));
    }
    remove_if_there(storage, &records_path(dir, &intent.name))?;
    tracing::warn!(
        event = crate::events::CUT_INTERRUPTED,
        volume = %uuid,
        dir = %dir.display(),
        branch = intent.name,
        "a cut at lsn {} was interrupted before its branch was complete; the journal keeps \
         its records",
        intent.common_lsn
    );
    storage
        .remove_file(&path)
        .map_err(Error::io(|| format!("removing {}", path.display())))?;
    sync_dir(storage, dir)?;
    Ok(None)
}

/// Checks that the description of the branch a cut under way makes is
/// that cut's. It is written (atomically) only once the branch's records
/// are synced, and from then on the cut may have ended the journal at its
/// lsn (steps 4-5): one that does not load, or names another cut, is
/// damage, and rolling the cut back would leave the records after that
/// lsn in neither the journal nor a branch.
fn check_cut_branch(
    storage: &dyn Storage,
    dir: &Path,
    uuid: Uuid,
    intent: &CutIntent,
) -> Result<()> {
    let why = match load_meta(storage, dir, &intent.name, uuid) {
        Ok(m) if (m.base_lsn, m.last_lsn) == (intent.common_lsn, intent.last_lsn) => return Ok(()),
        Ok(m) => format!(
            "it describes lsns {}..={}, the cut under way moves {}..={}",
            m.first_lsn,
            m.last_lsn,
            intent.common_lsn.saturating_add(1),
            intent.last_lsn
        ),
        Err(why) => why,
    };
    Err(Error::BadMetadata {
        path: meta_path(dir, &intent.name),
        reason: format!(
            "{why}; a cut at lsn {} ({CUT_FILE} in the volume) is under way and may have ended \
             the journal there, so the records after it may be only in this branch. Nothing \
             was changed: restore the description, and the next open finishes the cut",
            intent.common_lsn
        ),
    })
}

/// The records of a branch, read back and checked (payloads too).
struct Scanned {
    /// Entries of lsns `base_lsn + 1 ..= last_lsn`.
    entries: Vec<Entry>,
    bookmarks: Vec<Bookmark>,
}

impl Volume {
    /// Moves every record after `common_lsn` into a new read-only branch
    /// `name` and ends the journal at `common_lsn`: afterwards
    /// `last_lsn() == durable_lsn() == common_lsn`, reads see the disk as
    /// of `common_lsn`, and the next record placed (a write, or
    /// `apply_shipped` of a primary's record `common_lsn + 1`) gets lsn
    /// `common_lsn + 1`. Returns `None` when nothing follows `common_lsn`
    /// (also when this very cut is done already); the journal is durable
    /// up to its end then too.
    ///
    /// The caller has stopped all writers. Views of moments after
    /// `common_lsn` expire. The epoch history forgets epochs that began
    /// after `common_lsn` (they are the branch's), and the volume's epoch
    /// becomes the one in force at `common_lsn`. Crash-safe: see the
    /// module documentation. An IO error once the journal began to change
    /// stops the volume; its next open finishes the cut.
    pub fn cut_to_branch(&self, common_lsn: u64, name: &str) -> Result<Option<BranchInfo>> {
        check_branch_name(name).map_err(Error::InvalidRequest)?;
        let inner = &self.inner;
        inner.check_failed()?;
        inner.check_not_resyncing()?;
        let _no_fold = lock(&inner.fold_lock);
        let mut c = lock(&inner.cursor);
        let last = c.next_lsn - 1;
        if inner.completion.wait_for(last).is_err() {
            inner.check_failed()?;
        }
        let base = inner.pool.base();
        let start = base.lsn.max(base.horizon_lsn);
        if common_lsn < start {
            return Err(Error::Folded {
                lsn: common_lsn,
                base_lsn: start,
            });
        }
        if common_lsn > last {
            return Err(Error::InvalidRequest(format!(
                "cannot cut at lsn {common_lsn}: the journal ends at lsn {last}"
            )));
        }
        // Every record up to the end is durable before anything changes:
        // the journal holds the branch's records until the branch does.
        if let Err(e) = inner.pool.sync_dirty() {
            let reason = format!("syncing the journal failed: {e}");
            return Err(inner.fail(reason));
        }
        inner.durable_lsn.fetch_max(last, Ordering::AcqRel);
        if let Some(existing) = inner.branch_summary(name) {
            let same = existing
                .as_ref()
                .is_ok_and(|m| m.base_lsn == common_lsn && common_lsn == last);
            if same {
                return Ok(None);
            }
            return Err(Error::BranchExists {
                name: name.to_owned(),
                existing: match existing {
                    Ok(m) => format!("lsns {}..={}", m.first_lsn, m.last_lsn),
                    Err(why) => why,
                },
            });
        }
        if common_lsn == last {
            return Ok(None);
        }
        let history = lock(&inner.persisted).epoch_history.clone();
        epochs_kept_by_cut(&history, common_lsn).map_err(Error::InvalidRequest)?;

        let intent = CutIntent {
            name: name.to_owned(),
            common_lsn,
            last_lsn: last,
        };
        let storage = inner.storage.as_ref();
        write_json(storage, &inner.dir.join(CUT_FILE), &intent)?;
        let copied = self.copy_tail(name, common_lsn, last).and_then(|meta| {
            write_json(storage, &meta_path(&inner.dir, name), &meta)?;
            Ok(meta)
        });
        if let Err(e) = copied {
            // Nothing changed in the journal: undo (the next open would,
            // or finish the cut if the description got in place).
            let undone = remove_if_there(storage, &meta_path(&inner.dir, name))
                .and_then(|()| remove_if_there(storage, &records_path(&inner.dir, name)))
                .and_then(|()| sync_dir(storage, &branches_dir(&inner.dir)))
                .and_then(|()| remove_if_there(storage, &inner.dir.join(CUT_FILE)))
                .and_then(|()| sync_dir(storage, &inner.dir));
            if let Err(undo) = undone {
                tracing::error!(
                    event = crate::events::CUT_UNDO_FAILED,
                    volume = %inner.config.uuid,
                    dir = %inner.dir.display(),
                    error = %undo,
                    "could not undo an interrupted cut; the next open will"
                );
            }
            return Err(e);
        }
        if let Err(e) = inner.truncate(&mut c, common_lsn, name) {
            let reason = format!(
                "cutting the journal at lsn {common_lsn} failed ({e}); reopen the volume to \
                 finish the cut"
            );
            return Err(inner.fail(reason));
        }
        drop(c);
        inner.load_branches()?;
        tracing::info!(
            volume = %inner.config.uuid,
            dir = %inner.dir.display(),
            branch = name,
            "cut the journal at lsn {common_lsn}: lsns {}..={last} are in the branch",
            common_lsn + 1
        );
        Ok(inner.branch_info(name))
    }

    /// The branches, by name.
    pub fn branches(&self) -> Vec<BranchInfo> {
        let names: Vec<String> = lock(&self.inner.branches)
            .iter()
            .map(|b| b.name.clone())
            .collect();
        names
            .iter()
            .filter_map(|n| self.inner.branch_info(n))
            .collect()
    }

    /// Removes a branch and its files.
    pub fn drop_branch(&self, name: &str) -> Result<()> {
        check_branch_name(name).map_err(Error::InvalidRequest)?;
        let inner = &self.inner;
        let storage = inner.storage.as_ref();
        let mut branches = lock(&inner.branches);
        let Some(at) = branches.iter().position(|b| b.name == name) else {
            return Err(Error::UnknownBranch {
                name: name.to_owned(),
            });
        };
        // The description first: without it the records are a leftover,
        // which the next open removes.
        let dir = branches_dir(&inner.dir);
        remove_if_there(storage, &meta_path(&inner.dir, name))?;
        sync_dir(storage, &dir)?;
        branches.remove(at);
        remove_if_there(storage, &records_path(&inner.dir, name))?;
        sync_dir(storage, &dir)?;
        tracing::info!(
            volume = %inner.config.uuid,
            dir = %inner.dir.display(),
            branch = name,
            "dropped the branch"
        );
        Ok(())
    }

    /// Copies the journal's records `common + 1..=last` (durable) into a
    /// new records file of branch `name` and syncs it; returns the
    /// branch's description.
    fn copy_tail(&self, name: &str, common: u64, last: u64) -> Result<BranchMeta> {
        let inner = &self.inner;
        let storage = inner.storage.as_ref();
        let path = records_path(&inner.dir, name);
        let dir = branches_dir(&inner.dir);
        let context = || format!("writing {}", path.display());
        storage.create_dir_all(&dir).map_err(Error::io(context))?;
        sync_dir(storage, &inner.dir)?;
        // Left by a copy a crash interrupted: no description, so no branch.
        remove_if_there(storage, &path)?;
        let file = storage.create_new(&path).map_err(Error::io(context))?;
        let mut meta = BranchMeta {
            format_version: FORMAT_VERSION,
            uuid: inner.config.uuid,
            name: name.to_owned(),
            base_lsn: common,
            base_ns: lock(&inner.index).timestamp(common),
            needs_lsn: common,
            first_lsn: common + 1,
            last_lsn: last,
            first_ns: 0,
            last_ns: 0,
            epochs: Vec::new(),
            records: 0,
            file_size: 0,
            lost: None,
        };
        let head = file_header(inner.config.uuid, common);
        inner
            .retrying("writing a branch", || file.write_all_at(&[&head], 0))
            .map_err(Error::io(context))?;
        let mut pos = SECTOR;
        let mut next = common + 1;
        while next <= last {
            let batch = self.read_shipped(next, COPY_BATCH)?;
            if batch.records.is_empty() {
                return Err(Error::InvalidRequest(format!(
                    "record {next} could not be read back from the journal"
                )));
            }
            for r in &batch.records {
                let damaged = |reason: String| Error::DamagedSegment {
                    path: inner.dir.join(JOURNAL_DIR),
                    reason: format!("record {next}, copied into branch {name:?}: {reason}"),
                };
                let h = RecordHeader::decode(&r.header)
                    .map_err(|p| damaged(format!("{p:?} header")))?;
                if h.lsn != next || crc32c(&r.payload) != h.payload_crc {
                    return Err(damaged("its lsn or payload checksum is wrong".into()));
                }
                let len = r.payload.len() as u64;
                let payload_offset = if len == 0 { 0 } else { pos + SECTOR };
                if (payload_offset + len) / SECTOR > u64::from(u32::MAX) {
                    return Err(Error::InvalidRequest(format!(
                        "the records after lsn {common} exceed the 2 TiB a branch holds"
                    )));
                }
                let header = RecordHeader {
                    seq: 0,
                    payload_offset,
                    ..h
                }
                .encode();
                inner
                    .retrying("writing a branch", || {
                        file.write_all_at(&[&header, &r.payload], pos)
                    })
                    .map_err(Error::io(context))?;
                if meta.records == 0 {
                    meta.first_ns = h.timestamp;
                }
                meta.last_ns = h.timestamp;
                if meta.epochs.last() != Some(&h.epoch) {
                    meta.epochs.push(h.epoch);
                }
                if h.kind == RecordKind::Revert {
                    meta.needs_lsn = meta.needs_lsn.min(h.offset);
                }
                meta.records += 1;
                pos += SECTOR + len;
                next += 1;
            }
        }
        // Not retried (see `sync_journal_file`): the branch is not made.
        file.sync_data().map_err(Error::io(context))?;
        sync_dir(storage, &dir)?;
        meta.file_size = pos;
        Ok(meta)
    }
}

/// The first sector of a records file.
fn file_header(uuid: Uuid, base_lsn: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..32].copy_from_slice(uuid.as_bytes());
    b[32..40].copy_from_slice(&base_lsn.to_le_bytes());
    let crc = crc32c(&b[..40]);
    b[40..FILE_HEADER_USED].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A view of branch `name` at `at` (its end when `None`).
pub(super) fn view(
    inner: &Arc<Inner>,
    name: &str,
    at: Option<&PointInTime>,
    writable: bool,
) -> Result<View> {
    let (meta, file, scanned) = inner.open_branch(name)?;
    let lsn = inner.resolve_in(&meta, &scanned, at)?;
    let timestamp_ns = match lsn.checked_sub(meta.first_lsn) {
        Some(i) => scanned.entries[i as usize].timestamp,
        None => meta.base_ns,
    };
    let part = BranchPart {
        name: name.to_owned(),
        file,
        base_lsn: meta.base_lsn,
        needs_lsn: meta.needs_lsn,
        entries: scanned.entries,
        timestamp_ns,
    };
    View::build_branch(inner.clone(), lsn, part, writable)
}

impl Inner {
    /// The lsn of branch `name` that `at` names (its end when `None`).
    pub(super) fn resolve_branch(&self, name: &str, at: Option<&PointInTime>) -> Result<u64> {
        let (meta, _, scanned) = self.open_branch(name)?;
        self.resolve_in(&meta, &scanned, at)
    }

    fn resolve_in(
        &self,
        meta: &BranchMeta,
        scanned: &Scanned,
        at: Option<&PointInTime>,
    ) -> Result<u64> {
        let requested = || match at {
            Some(at) => format!("branch:{}@{at}", meta.name),
            None => format!("branch:{}", meta.name),
        };
        let outside = || Error::OutsideWindow {
            requested: requested(),
            start: format_ns(meta.base_ns),
            end: format_ns(meta.last_ns),
            start_lsn: meta.base_lsn,
            last_lsn: meta.last_lsn,
        };
        let lsn = match at {
            None => meta.last_lsn,
            Some(PointInTime::Lsn(lsn)) => *lsn,
            Some(PointInTime::Bookmark(name)) => scanned
                .bookmarks
                .iter()
                .find(|b| b.name == *name)
                .map(|b| b.lsn)
                .ok_or_else(|| {
                    Error::NoSuchBookmark(format!("{name} (in branch {})", meta.name))
                })?,
            Some(PointInTime::Branch { .. }) => {
                return Err(Error::InvalidRequest(format!(
                    "{} names a moment of another branch",
                    requested()
                )))
            }
            Some(point @ (PointInTime::Time(_) | PointInTime::Ago(_))) => {
                let now = self.clock.now_ns();
                let ns = point.timestamp(now).ok_or_else(outside)?;
                if ns > now {
                    return Err(Error::InvalidRequest(format!(
                        "{point} is in the future (now is {})",
                        format_ns(now)
                    )));
                }
                if ns < meta.base_ns {
                    return Err(outside());
                }
                let later = scanned.entries.partition_point(|e| e.timestamp <= ns);
                meta.base_lsn + later as u64
            }
        };
        if lsn < meta.base_lsn || lsn > meta.last_lsn {
            return Err(outside());
        }
        Ok(lsn)
    }

    /// Branch `name`'s description, records file and checked records, if
    /// it is readable.
    fn open_branch(&self, name: &str) -> Result<(BranchMeta, Arc<dyn StorageFile>, Scanned)> {
        self.check_not_resyncing()?;
        let unreadable = |reason: String| Error::BranchUnreadable {
            name: name.to_owned(),
            reason,
        };
        let meta =
            {
                let branches = lock(&self.branches);
                let branch = branches.iter().find(|b| b.name == name).ok_or_else(|| {
                    Error::UnknownBranch {
                        name: name.to_owned(),
                    }
                })?;
                if let Some(problem) = self.branch_problem(branch) {
                    return Err(unreadable(problem));
                }
                branch.meta.clone().map_err(unreadable)?
            };
        let path = records_path(&self.dir, name);
        let file = self
            .storage
            .open(&path)
            .map_err(|e| unreadable(format!("opening {}: {e}", path.display())))?;
        let scanned = self
            .scan_branch(&meta, file.as_ref())
            .map_err(|e| unreadable(format!("{}: {e}", path.display())))?;
        Ok((meta, file, scanned))
    }

    /// Reads a branch's records file back, checking every header and
    /// payload against each other and the description; `Err` says where
    /// it is damaged.
    fn scan_branch(
        &self,
        meta: &BranchMeta,
        file: &dyn StorageFile,
    ) -> std::result::Result<Scanned, String> {
        let io = |at: u64| move |e: std::io::Error| format!("reading at offset {at}: {e}");
        let size = file.size().map_err(io(0))?;
        if size != meta.file_size {
            return Err(format!(
                "the file has {size} bytes; the branch's description says {}",
                meta.file_size
            ));
        }
        let mut head = [0u8; SECTOR as usize];
        self.retrying("reading a branch", || file.read_exact_at(&mut head, 0))
            .map_err(io(0))?;
        if head != file_header(meta.uuid, meta.base_lsn) {
            let version = u16::from_le_bytes([head[8], head[9]]);
            return Err(
                match head[0..8] == MAGIC && crc32c(&head[..40]) == le_u32(&head, 40) {
                    true if version != FORMAT_VERSION => format!(
                        "format version {version}; this build reads version {FORMAT_VERSION}"
                    ),
                    true => format!(
                        "its header names base lsn {} of volume {}",
                        le_u64(&head, 32),
                        Uuid::from_slice(&head[16..32]).unwrap_or_default()
                    ),
                    false => "its header is damaged".into(),
                },
            );
        }
        let mut scanned = Scanned {
            entries: Vec::with_capacity(meta.records as usize),
            bookmarks: Vec::new(),
        };
        let mut pos = SECTOR;
        let mut payload = Vec::new();
        let mut time = meta.base_ns;
        for lsn in meta.first_lsn..=meta.last_lsn {
            let bad = |why: String| format!("record {lsn} at offset {pos}: {why}");
            let mut slot = [0u8; RECORD_HEADER_SIZE as usize];
            if pos + RECORD_HEADER_SIZE > size {
                return Err(bad("the file ends before it".into()));
            }
            self.retrying("reading a branch", || file.read_exact_at(&mut slot, pos))
                .map_err(io(pos))?;
            let h = RecordHeader::decode(&slot).map_err(|p| {
                bad(match p {
                    HeaderProblem::Garbage => "no intact record header".into(),
                    HeaderProblem::Version(v) => format!("on-disk format version {v}"),
                    HeaderProblem::Kind(k) => format!("unknown kind {k}"),
                })
            })?;
            let len = u64::from(h.payload_len);
            let expected_offset = if len == 0 { 0 } else { pos + SECTOR };
            if h.lsn != lsn || h.seq != 0 || h.payload_offset != expected_offset {
                return Err(bad(format!(
                    "the header names lsn {} (sequence {}, payload at {})",
                    h.lsn, h.seq, h.payload_offset
                )));
            }
            h.check(self.config.size).map_err(&bad)?;
            if h.timestamp < time {
                return Err(bad("its time goes back".into()));
            }
            if h.kind == RecordKind::Revert && h.offset < meta.needs_lsn {
                return Err(bad(format!(
                    "it reverts to lsn {}, before the lsn {} the branch keeps",
                    h.offset, meta.needs_lsn
                )));
            }
            if len > 0 {
                if pos + SECTOR + len > size {
                    return Err(bad("the file ends inside its payload".into()));
                }
                payload.resize(len as usize, 0);
                let at = pos + SECTOR;
                self.retrying("reading a branch", || file.read_exact_at(&mut payload, at))
                    .map_err(io(at))?;
                if crc32c(&payload) != h.payload_crc {
                    return Err(bad("its payload checksum fails".into()));
                }
            }
            let effect = Effect::of(&h, BRANCH_SEGMENT);
            if h.kind == RecordKind::Bookmark {
                let name = payload.get(..h.length as usize).unwrap_or_default();
                scanned.bookmarks.push(Bookmark {
                    name: String::from_utf8_lossy(name).into_owned(),
                    lsn,
                    timestamp_ns: h.timestamp,
                    app_consistent: crate::format::bookmark_app_consistent(&payload),
                });
            }
            scanned.entries.push(Entry {
                timestamp: h.timestamp,
                effect,
            });
            time = h.timestamp;
            pos += SECTOR + len;
        }
        if pos != size {
            return Err(format!(
                "{} bytes follow its last record",
                size.saturating_sub(pos)
            ));
        }
        Ok(scanned)
    }

    /// Why a known branch cannot be read now, if it cannot.
    fn branch_problem(&self, branch: &Branch) -> Option<String> {
        let meta = match &branch.meta {
            Err(why) => return Some(why.clone()),
            Ok(meta) => meta,
        };
        if let Some(lost) = &meta.lost {
            return Some(lost.clone());
        }
        let expired = |pin: &ViewPin| {
            let state = pin.state.read().unwrap_or_else(|e| e.into_inner());
            state.expired.is_some()
        };
        match &branch.pin {
            Some(pin) if !expired(pin) => None,
            _ => Some(format!(
                "the journal no longer holds the disk as of lsn {} that it starts from (the \
                 hard limit forced a fold past it, or a resync replaced it)",
                meta.needs_lsn
            )),
        }
    }

    /// What `branches()` says of branch `name`.
    fn branch_info(&self, name: &str) -> Option<BranchInfo> {
        let branches = lock(&self.branches);
        let branch = branches.iter().find(|b| b.name == name)?;
        let mut problem = self.branch_problem(branch);
        if problem.is_none() {
            if let Some(resync) = &*lock(&self.resync) {
                problem = Some(format!("a resync to lsn {} is under way", resync.sync_lsn));
            }
        }
        let Ok(m) = &branch.meta else {
            return Some(BranchInfo {
                name: name.to_owned(),
                base_lsn: 0,
                first_lsn: 0,
                last_lsn: 0,
                first_ns: 0,
                last_ns: 0,
                epochs: Vec::new(),
                records: 0,
                bytes: 0,
                readable: false,
                problem,
            });
        };
        Some(BranchInfo {
            name: name.to_owned(),
            base_lsn: m.base_lsn,
            first_lsn: m.first_lsn,
            last_lsn: m.last_lsn,
            first_ns: m.first_ns,
            last_ns: m.last_ns,
            epochs: m.epochs.clone(),
            records: m.records,
            bytes: m.file_size,
            readable: problem.is_none(),
            problem,
        })
    }

    /// A known branch's description (`Err`: why it is damaged).
    fn branch_summary(&self, name: &str) -> Option<std::result::Result<BranchMeta, String>> {
        let branches = lock(&self.branches);
        branches
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.meta.clone())
    }

    /// Reads the branches from `<vol>/branches` (at open, and after a
    /// cut), removing what an interrupted copy, drop or write left.
    pub(super) fn load_branches(&self) -> Result<()> {
        let storage = self.storage.as_ref();
        let dir = branches_dir(&self.dir);
        let mut found = Vec::new();
        if storage.exists(&dir) {
            let names = storage
                .list_dir(&dir)
                .map_err(Error::io(|| format!("listing {}", dir.display())))?;
            let described: Vec<&str> = names
                .iter()
                .filter_map(|n| n.strip_suffix(&format!(".{META_EXT}")))
                .collect();
            for file in &names {
                let leftover = match file.strip_suffix(&format!(".{RECORDS_EXT}")) {
                    Some(name) => !described.contains(&name),
                    None => !file.ends_with(&format!(".{META_EXT}")),
                };
                if leftover {
                    let path = dir.join(file);
                    tracing::info!(file = %path.display(), "removing what an interrupted branch operation left");
                    remove_if_there(storage, &path)?;
                }
            }
            for name in described {
                let meta = match check_branch_name(name) {
                    Ok(()) => load_meta(storage, &self.dir, name, self.config.uuid),
                    Err(why) => Err(why),
                };
                if let Err(why) = &meta {
                    tracing::error!(
                        event = crate::events::BRANCH_DAMAGED,
                        volume = %self.config.uuid,
                        dir = %self.dir.display(),
                        branch = name,
                        "branch damaged: {why}"
                    );
                }
                found.push((name.to_owned(), meta));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let index = lock(&self.index);
        let (start, _) = self.window_start(&index);
        let holds = |m: &BranchMeta| {
            m.lost.is_none() && m.needs_lsn >= start && m.base_lsn <= index.last_lsn()
        };
        let branches = found
            .into_iter()
            .map(|(name, meta)| {
                let pin = match &meta {
                    Ok(m) if holds(m) => Some(self.pin(m.needs_lsn, Vec::new())),
                    _ => None,
                };
                Branch { name, meta, pin }
            })
            .collect();
        drop(index);
        *lock(&self.branches) = branches;
        Ok(())
    }

    /// Ends the journal at `common` (its records after it are in branch
    /// `name`, complete and synced), on disk and in memory, then removes
    /// the intent file. Called under the fold lock and the cursor lock.
    fn truncate(&self, c: &mut Cursor, common: u64, name: &str) -> Result<()> {
        self.expire_views_after(common, name);
        self.cut_segments(common)?;
        let (snapshot, timestamp, last_data) = {
            let mut index = lock(&self.index);
            index.truncate(common);
            let base = index.base_lsn();
            let last_data = (base + 1..=common)
                .rev()
                .find(|&l| index.effect(l) != Effect::Flush)
                .unwrap_or(base);
            (index.snapshot(common), index.timestamp(common), last_data)
        };
        let map = ExtentMap::new(self.config.size);
        snapshot.replay_into(&map, common);
        self.map.replace_with(map);
        c.next_lsn = common + 1;
        c.last_timestamp = timestamp;
        // The next record goes to a fresh segment, never after the erased
        // slots of the one holding `common`.
        c.active = None;
        c.proved_lsn = common;
        c.proof_owed = false;
        self.completion.reset(common);
        self.durable_lsn.store(common, Ordering::Release);
        self.last_data_lsn.store(last_data, Ordering::Release);
        self.finish_metadata(common)
    }

    /// Finishes a cut a crash interrupted (at open, after recovery ended
    /// the journal at `common`).
    pub(super) fn finish_cut(&self, common: u64) -> Result<()> {
        self.cut_segments(common)?;
        self.finish_metadata(common)
    }

    /// The last steps of a cut at `common`: the epoch history, branches
    /// based after `common`, then the intent file.
    fn finish_metadata(&self, common: u64) -> Result<()> {
        let history = lock(&self.persisted).epoch_history.clone();
        // cut_to_branch checked this before it cut anything.
        let keep = epochs_kept_by_cut(&history, common).map_err(Error::InvalidRequest)?;
        let in_force = keep.checked_sub(1).and_then(|i| history.get(i));
        if let Some(&EpochStart { epoch, .. }) = in_force.filter(|_| keep < history.len()) {
            self.persist(|config| {
                config.epoch_history.truncate(keep);
                config.epoch = epoch;
            })?;
            self.epoch.store(epoch, Ordering::Release);
            tracing::warn!(
                event = crate::events::EPOCHS_CUT,
                volume = %self.config.uuid,
                dir = %self.dir.display(),
                "the epochs that began after lsn {common} went with the cut; the epoch is {epoch} again"
            );
        }
        self.mark_lost_after(common)?;
        let storage = self.storage.as_ref();
        let path = self.dir.join(CUT_FILE);
        remove_if_there(storage, &path)?;
        sync_dir(storage, &self.dir)
    }

    /// Marks durably every branch based after `common` as lost: the
    /// journal's state it starts from went into the new branch.
    fn mark_lost_after(&self, common: u64) -> Result<()> {
        let storage = self.storage.as_ref();
        let dir = branches_dir(&self.dir);
        if !storage.exists(&dir) {
            return Ok(());
        }
        let names = storage
            .list_dir(&dir)
            .map_err(Error::io(|| format!("listing {}", dir.display())))?;
        for name in names
            .iter()
            .filter_map(|n| n.strip_suffix(&format!(".{META_EXT}")))
        {
            let Ok(mut meta) = load_meta(storage, &self.dir, name, self.config.uuid) else {
                continue;
            };
            if meta.base_lsn > common && meta.lost.is_none() {
                meta.lost = Some(format!(
                    "the journal was cut at lsn {common}, before lsn {} that it starts from",
                    meta.base_lsn
                ));
                write_json(storage, &meta_path(&self.dir, name), &meta)?;
            }
        }
        Ok(())
    }

    /// Makes views of moments after `common` fail from now on: their
    /// records moved to branch `name`.
    fn expire_views_after(&self, common: u64, name: &str) {
        for pin in lock(&self.views)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
        {
            if pin.lsn > common {
                let mut state = pin.state.write().unwrap_or_else(|e| e.into_inner());
                state.expired = Some(format!(
                    "the journal was cut at lsn {common}; lsn {} is in branch {name:?} now",
                    pin.lsn
                ));
                state.segments.clear();
            }
        }
    }

    /// Ends the segments at `common`: erases the record headers after it
    /// in the segment holding it, and takes the later segments off
    /// `super`'s list (they are recycled or removed once unpinned).
    fn cut_segments(&self, common: u64) -> Result<()> {
        let used = self.pool.used();
        let mut first = self.pool.base().lsn + 1;
        let mut keep = 0;
        for seg in &used {
            let last = seg.last_lsn.load(Ordering::Acquire);
            if first > common || last < first {
                break;
            }
            keep += 1;
            if last >= common {
                self.erase_after(seg, first, common)?;
                seg.last_lsn.store(common, Ordering::Release);
                break;
            }
            first = last + 1;
        }
        let cut = self.pool.cut(keep)?;
        self.pool.retire(cut);
        Ok(())
    }

    /// Zeroes every record header of `seg`'s current use after `common`'s
    /// (its records from `first` on), then syncs it.
    fn erase_after(&self, seg: &Segment, first: u64, common: u64) -> Result<()> {
        let name = segment_name(seg.id);
        let path = self.dir.join(JOURNAL_DIR).join(&name);
        let io = |what: &'static str| {
            let path = path.clone();
            move |e| Error::io(|| format!("{what} {}", path.display()))(e)
        };
        let size = self.config.segment_size;
        let layout = seg.layout();
        // Where the records kept end: the payloads (slots) or the records
        // (inline), and where `common`'s header is.
        let mut top = SEGMENT_HEADER_SIZE;
        let mut common_at = 0;
        let mut lsn = first;
        while lsn <= common {
            let upto = common.min(lsn + ERASE_CHUNK / RECORD_HEADER_SIZE - 1);
            let read = self
                .retrying("reading a segment to cut it", || {
                    seg.read_headers(size, first, lsn..=upto)
                })
                .map_err(io("reading"))?;
            let found = read.map_err(|m| Error::DamagedSegment {
                path: path.clone(),
                reason: format!("record {} is not in its header slot at {}", m.lsn, m.offset),
            })?;
            for (h, at) in found {
                let end = match layout {
                    Layout::Slots => h.payload_offset + u64::from(h.payload_len),
                    Layout::Inline { .. } => h.inline_end(at),
                };
                top = top.max(end);
                common_at = at;
            }
            lsn = upto + 1;
        }
        // The headers that may follow: slots below `common`'s down to the
        // payloads, or inline anything past the records kept.
        let (low, mut hi) = match layout {
            Layout::Slots => (top.div_ceil(SECTOR) * SECTOR, common_at),
            Layout::Inline { .. } => (top, size),
        };
        let mut buf = Vec::new();
        while hi > low {
            let lo = hi.saturating_sub(ERASE_CHUNK).max(low);
            buf.resize((hi - lo) as usize, 0);
            self.retrying("reading a segment to cut it", || {
                seg.file.read_exact_at(&mut buf, lo)
            })
            .map_err(io("reading"))?;
            for at in (0..hi - lo).step_by(RECORD_HEADER_SIZE as usize) {
                let sector = &buf[at as usize..(at + RECORD_HEADER_SIZE) as usize];
                let ours =
                    RecordHeader::decode(sector).is_ok_and(|h| h.seq == seg.seq && layout.owns(&h));
                if !ours {
                    continue;
                }
                let erased = self.retrying("erasing a record header", || match layout {
                    Layout::Slots => seg.file.write_all_at(&[&[0u8; 512]], lo + at),
                    // An inline use's pages are written only around the
                    // page cache (format.rs).
                    Layout::Inline { .. } => {
                        write_direct_parts(seg.file.as_ref(), &[&[0u8; 512]], lo + at)
                    }
                });
                erased.map_err(io("erasing record headers in"))?;
            }
            hi = lo;
        }
        self.sync_journal_file(&*seg.file, || name.clone())
    }
}
