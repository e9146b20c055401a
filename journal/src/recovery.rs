//! Rebuilding a volume's in-memory state from its journal at open.
//!
//! The scan walks the segments in `super` order from lsn base_lsn + 1 and
//! accepts records while each is intact (header and payload checksums, the
//! segment's sequence number, the next lsn, a sane range). Within a segment
//! it stops at the first record that fails; the next segment must then start
//! with the very next lsn, or the log ends. Appends reserve positions in lsn
//! order, so this accepts exactly the contiguous prefix of complete records.
//!
//! Before trusting that end, the rest of the journal is searched for Flush
//! records (and inline records' `durable_lsn`): one that covers a lost lsn
//! proves the loss is damage, not an interrupted write, and recovery
//! refuses to truncate flushed data.
//!
//! A cut under way (volume/branch.rs: `<vol>/cut` names lsn C, and the
//! branch holding the records after C is complete) ends the walk at C:
//! whatever of those records is still in the segments never comes back.
//!
//! Payload checksums are checked on a second thread, behind the scan, by
//! the builder of the extent map. The scan reads on as if they were intact;
//! when one is not, the scan runs again, knowing where, and the builder
//! goes on from the records before it. A torn write left by a crash costs
//! one more pass over the record headers.
//!
//! A checkpoint (checkpoint.rs) that agrees with the journal spares most of
//! this: its record index stands for the records up to its lsn C, and the
//! scan starts at the segment holding C, checking the headers of that
//! segment's records up to C (they must chain up to C: the proof that the
//! journal still holds what the checkpoint says) and everything after C as
//! above. Any disagreement falls back to the full scan, logged as
//! `checkpoint_rejected`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

pub(crate) mod checkpoint;

use crate::error::{Error, Result};
use crate::extent_map::ExtentMap;
use crate::format::{
    crc32c, torn_header_rewrite, HeaderProblem, Layout, Placed, Position, RecordHeader, RecordKind,
    SegmentHeader, SegmentHeaderProblem, RECORD_HEADER_SIZE, RECORD_VERSIONS, SECTOR,
    SEGMENT_HEADER_SIZE, SEGMENT_VERSIONS,
};
use crate::meta::{EpochStart, VolumeConfig};
use crate::pool::{segment_name, Segment, JOURNAL_DIR};
use crate::record_index::{Effect, Entry, PageFile, RecordIndex, PAGE_OUT_BATCH};
use crate::storage::{Storage, StorageFile};
use crate::superblock::SuperState;

/// What recovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records accepted (including flush records).
    pub records: u64,
    pub flush_records: u64,
    /// Records the checkpoint stood for: their headers and payloads were
    /// not read, except in the segment holding its last one.
    pub records_from_checkpoint: u64,
    /// Records whose headers and payloads were read and checked.
    pub records_verified: u64,
    /// The lsn the next append gets.
    pub next_lsn: u64,
    pub segments_scanned: u64,
    pub bytes_scanned: u64,
    /// Where and why the log ended.
    pub end: LogEnd,
    /// Intact records found past the end and dropped because an earlier one
    /// was missing (writes that were in flight at a crash).
    pub discarded: Option<Discarded>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEnd {
    /// Segment file name, or `None` if the pool held no segment.
    pub segment: Option<String>,
    pub offset: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discarded {
    pub records: u64,
    pub lowest_lsn: u64,
    pub highest_lsn: u64,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recovered {} records ({} flush points; {} from the checkpoint, {} verified) \
             from {} segments, next lsn {}; log ends",
            self.records,
            self.flush_records,
            self.records_from_checkpoint,
            self.records_verified,
            self.segments_scanned,
            self.next_lsn
        )?;
        if let Some(seg) = &self.end.segment {
            write!(f, " in {seg} at offset {}", self.end.offset)?;
        }
        write!(f, " ({})", self.end.reason)?;
        if let Some(d) = self.discarded {
            write!(
                f,
                "; dropped {} unflushed records past it (lsns {}..={})",
                d.records, d.lowest_lsn, d.highest_lsn
            )?;
        }
        Ok(())
    }
}

pub struct Recovered {
    /// Segments holding accepted records, in order.
    pub used: Vec<Arc<Segment>>,
    /// Listed segments after the end: (file id, file if it exists). Their
    /// content is stale and must get a new sequence number before reuse.
    pub stale: Vec<(u32, Option<Arc<dyn StorageFile>>)>,
    pub map: ExtentMap,
    pub index: RecordIndex,
    pub last_data_lsn: u64,
    /// The highest epoch a record carries (0 without records).
    pub epoch: u64,
    /// The Epoch records found, oldest first.
    pub epoch_starts: Vec<EpochStart>,
    pub report: RecoveryReport,
}

/// Small enough that a window (one per direction) stays in the core's L2
/// cache between the copy out of the page cache and the checksum over it:
/// with 8 MiB windows warm recovery ran at 0.42x-0.50x of a sequential read,
/// with 256 KiB at 0.58x-0.63x. Kernel readahead keeps cold reads streaming.
const READ_CHUNK: u64 = 256 << 10;
const SEGMENT_FULL: &str = "segment is full";
const EARLIER_USE: &str = "record left from an earlier use of the file";
const CUT: &str = "the journal was cut here; the records after it are in a branch";
const TORN_HEADER: &str =
    "header torn while it was rewritten for inline records (nothing in the segment was flushed)";

/// Reads a segment file through a window, kept between segments. The
/// index builder checks payload checksums in shared windows (see
/// [`PayloadCheck`]); a window still in its hands when the reader moves on
/// is set aside, and a free one taken instead.
struct SegmentReader {
    file: Option<Arc<dyn StorageFile>>,
    end: u64,
    window: Arc<Vec<u8>>,
    /// Earlier windows, some perhaps still shared, for reuse.
    spare: Vec<Arc<Vec<u8>>>,
    start: u64,
    len: usize,
}

impl SegmentReader {
    fn new() -> Self {
        SegmentReader {
            file: None,
            end: 0,
            window: Arc::default(),
            spare: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    fn reset(&mut self, file: &Arc<dyn StorageFile>, segment_size: u64) -> io::Result<()> {
        self.end = file.size()?.min(segment_size);
        self.file = Some(file.clone());
        self.start = 0;
        self.len = 0;
        Ok(())
    }

    /// `n` bytes at `at`, or `None` where the file is too short.
    fn bytes(&mut self, at: u64, n: u64) -> io::Result<Option<&[u8]>> {
        let found = self.locate(at, n)?;
        Ok(found.map(|from| &self.window[from..from + n as usize]))
    }

    /// Where `n` bytes at `at` start in the window, after moving it there
    /// if need be; `None` where the file is too short. The window follows
    /// the direction of travel: payloads are read upwards, header slots
    /// downwards.
    fn locate(&mut self, at: u64, n: u64) -> io::Result<Option<usize>> {
        let Some(end) = at.checked_add(n).filter(|&e| e <= self.end) else {
            return Ok(None);
        };
        let Some(file) = &self.file else {
            return Ok(None);
        };
        if at < self.start || end > self.start + self.len as u64 {
            let span = n.max(READ_CHUNK);
            let (from, to) = if at < self.start {
                (end.saturating_sub(span), end)
            } else {
                (at, (at + span).min(self.end))
            };
            let want = (to - from) as usize;
            let buf = writable(&mut self.window, &mut self.spare);
            if buf.len() < want {
                buf.resize(want, 0);
            }
            // Until the read succeeds the window holds nothing valid.
            self.len = 0;
            file.read_exact_at(&mut buf[..want], from)?;
            self.start = from;
            self.len = want;
        }
        Ok(Some((at - self.start) as usize))
    }

    /// The payload `h` (in header slot `at`) names, to be checked later;
    /// `None` if the file ends inside it.
    fn share_payload(
        &mut self,
        h: &RecordHeader,
        at: RecordAt,
    ) -> io::Result<Option<PayloadCheck>> {
        let len = h.payload_len as usize;
        let found = self.locate(h.payload_offset, u64::from(h.payload_len))?;
        Ok(found.map(|from| PayloadCheck {
            window: self.window.clone(),
            from,
            len,
            crc: h.payload_crc,
            at,
        }))
    }
}

/// `window`, made writable: if the index builder still holds it, it goes to
/// `spare` and a spare window nobody holds (or a new one) takes its place.
fn writable<'a>(window: &'a mut Arc<Vec<u8>>, spare: &mut Vec<Arc<Vec<u8>>>) -> &'a mut Vec<u8> {
    if Arc::strong_count(window) > 1 {
        let free = spare.iter().position(|w| Arc::strong_count(w) == 1);
        let next = free.map_or_else(Arc::default, |i| spare.swap_remove(i));
        spare.push(std::mem::replace(window, next));
    }
    // No weak references exist, so a window held once is not copied here.
    Arc::make_mut(window)
}

/// A payload whose checksum the index builder verifies before it applies
/// the record: checking on the second core while the first reads on is
/// what lets warm recovery keep up with a plain read.
struct PayloadCheck {
    window: Arc<Vec<u8>>,
    from: usize,
    len: usize,
    crc: u32,
    /// Where the record is.
    at: RecordAt,
}

/// A record the scan found: its header, place, and payload to check.
type Found = (RecordHeader, Placed, Option<PayloadCheck>);

/// A record's place: segment file id and header offset.
type RecordAt = (u32, u64);

impl PayloadCheck {
    fn intact(&self) -> bool {
        let bytes = self.window.get(self.from..self.from + self.len);
        bytes.is_some_and(|p| crc32c(p) == self.crc)
    }
}

/// The two windows a segment is read through.
struct SegmentReaders {
    headers: SegmentReader,
    payloads: SegmentReader,
}

impl SegmentReaders {
    fn new() -> Self {
        SegmentReaders {
            headers: SegmentReader::new(),
            payloads: SegmentReader::new(),
        }
    }

    fn reset(&mut self, file: &Arc<dyn StorageFile>, segment_size: u64) -> io::Result<()> {
        self.headers.reset(file, segment_size)?;
        self.payloads.reset(file, segment_size)
    }

    /// The name in an intact bookmark record's payload, and whether it is
    /// application-consistent.
    fn bookmark(&mut self, h: &RecordHeader) -> io::Result<(String, bool)> {
        let bytes = self
            .payloads
            .bytes(h.payload_offset, u64::from(h.payload_len))?
            .unwrap_or_default();
        let name = bytes.get(..h.length as usize).unwrap_or_default();
        Ok((
            String::from_utf8_lossy(name).into_owned(),
            crate::format::bookmark_app_consistent(bytes),
        ))
    }

    /// Whether the payload `h` names is there and intact.
    fn payload_intact(&mut self, h: &RecordHeader) -> io::Result<Option<bool>> {
        if h.payload_len == 0 {
            return Ok(Some(true));
        }
        let bytes = self
            .payloads
            .bytes(h.payload_offset, u64::from(h.payload_len))?;
        Ok(bytes.map(|p| crc32c(p) == h.payload_crc))
    }
}

struct Scanner<'a> {
    storage: &'a dyn Storage,
    config: &'a VolumeConfig,
    sb: &'a SuperState,
    dir: PathBuf,
    /// `<vol>/checkpoint`.
    checkpoint: PathBuf,
    /// `<vol>/super`.
    sb_path: PathBuf,
    truncate_damaged: bool,
    /// The lsn a cut under way ends the journal at.
    cut: Option<u64>,
}

impl Scanner<'_> {
    /// Damage no crash explains: an error, unless told to truncate there.
    fn damaged(&self, id: u32, reason: String) -> Result<String> {
        let err = Error::DamagedSegment {
            path: self.path(id),
            reason: reason.clone(),
        };
        if !self.truncate_damaged {
            return Err(err);
        }
        tracing::error!(
            event = crate::events::JOURNAL_TRUNCATED,
            volume = %self.config.uuid,
            dir = %self.dir.display(),
            "{err}; ending the journal there as told"
        );
        Ok(reason)
    }

    /// The layout of a segment use a checkpoint stands for (its records
    /// are not read): as its header says.
    fn layout_of(
        &self,
        readers: &mut SegmentReaders,
        file: &Arc<dyn StorageFile>,
        id: u32,
        seq: u64,
    ) -> Result<Layout> {
        readers
            .reset(file, self.config.segment_size)
            .map_err(self.io(id))?;
        match self.check_header(&mut readers.headers, id, seq, None)? {
            Ok(layout) => Ok(layout),
            Err(reason) => Err(Error::DamagedSegment {
                path: self.path(id),
                reason,
            }),
        }
    }

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    fn io(&self, id: u32) -> impl FnOnce(io::Error) -> Error + '_ {
        Error::io(move || format!("reading {}", self.path(id).display()))
    }

    /// Checks a segment's header and returns the layout of its use;
    /// `Ok(Err(reason))` if the log cannot go on here. `first_lsn`: the
    /// lsn the use's first record must have, where the caller reads on.
    fn check_header(
        &self,
        reader: &mut SegmentReader,
        id: u32,
        seq: u64,
        first_lsn: Option<u64>,
    ) -> Result<Result<Layout, String>> {
        let Some(b) = reader.bytes(0, SEGMENT_HEADER_SIZE).map_err(self.io(id))? else {
            return self
                .damaged(id, "file is shorter than its header".into())
                .map(Err);
        };
        let torn = torn_header_rewrite(b, self.config.uuid, seq, self.config.segment_size);
        match SegmentHeader::decode(b) {
            Err(SegmentHeaderProblem::Garbage) if torn => {
                // A slots use never rewrites its header (only a use that
                // turns inline does): its first record in the top slot
                // makes this a damaged version 2 header, whose records
                // may have been flushed.
                let size = self.config.segment_size;
                let top = Layout::Slots.header_at(Layout::Slots.start(size));
                let first = reader.bytes(top, RECORD_HEADER_SIZE).map_err(self.io(id))?;
                let slots = first
                    .and_then(|b| RecordHeader::decode(b).ok())
                    .filter(|h| h.seq == seq && Layout::Slots.owns(h) && Some(h.lsn) == first_lsn);
                match slots {
                    Some(h) => self
                        .damaged(
                            id,
                            format!(
                                "header is damaged (its version reads {}, but the segment \
                                 holds lsn {} in header slots)",
                                crate::format::INLINE_VERSION,
                                h.lsn
                            ),
                        )
                        .map(Err),
                    None => Ok(Err(TORN_HEADER.into())),
                }
            }
            Err(SegmentHeaderProblem::Garbage) => {
                self.damaged(id, "header is damaged".into()).map(Err)
            }
            Err(SegmentHeaderProblem::Version(found)) => Err(Error::UnsupportedVersion {
                what: self.path(id).display().to_string(),
                found,
                supported: SEGMENT_VERSIONS,
            }),
            Ok(h) if h.volume != self.config.uuid => Err(Error::ForeignSegment {
                path: self.path(id),
                expected: self.config.uuid,
                found: h.volume,
            }),
            Ok(h) if h.seq != seq => {
                // A use `super` has not handed out, with records: a newer
                // copy of `super` listed it and was lost (volume.rs,
                // `check_unlisted`, has the argument).
                if h.seq >= self.sb.next_seq {
                    let first = h.layout.header_at(h.layout.start(self.config.segment_size));
                    let b = reader
                        .bytes(first, RECORD_HEADER_SIZE)
                        .map_err(self.io(id))?;
                    let record = b.and_then(|b| RecordHeader::decode(b).ok());
                    if let Some(r) = record.filter(|r| r.seq == h.seq && h.layout.owns(r)) {
                        return Err(Error::BadMetadata {
                            path: self.sb_path.clone(),
                            reason: format!(
                                "it lists {} for segment use {seq}, but the file holds \
                                 records from lsn {} of use {} (this copy of super hands out \
                                 uses from {}): the newer copy, which listed it, is lost. \
                                 Nothing was changed; restore super",
                                self.path(id).display(),
                                r.lsn,
                                h.seq,
                                self.sb.next_seq
                            ),
                        });
                    }
                }
                Ok(Err(format!(
                    "segment header has sequence {}, super lists {seq}",
                    h.seq
                )))
            }
            Ok(h) if h.segment_size != self.config.segment_size => self
                .damaged(
                    id,
                    format!(
                        "header says {} bytes, the volume uses {}",
                        h.segment_size, self.config.segment_size
                    ),
                )
                .map(Err),
            Ok(h) => Ok(Ok(h.layout)),
        }
    }

    /// Reads the record the segment use (of `layout`) places at `at`;
    /// `Ok(Err(reason))` if it is not the intact record `expected` of this
    /// use. Its payload is checked as `payloads` says.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        readers: &mut SegmentReaders,
        id: u32,
        layout: Layout,
        at: Position,
        seq: u64,
        expected: u64,
        payloads: &Payloads,
    ) -> Result<Result<Found, String>> {
        let slot = layout.header_at(at);
        let Some(b) = readers
            .headers
            .bytes(slot, RECORD_HEADER_SIZE)
            .map_err(self.io(id))?
        else {
            return Ok(Err("file ends before the segment does".into()));
        };
        let h = match RecordHeader::decode(b) {
            Ok(h) => h,
            Err(HeaderProblem::Garbage) => return Ok(Err("no intact record header".into())),
            Err(_) if !layout.claims(b, seq) => return Ok(Err(EARLIER_USE.into())),
            Err(HeaderProblem::Version(found)) => {
                return Err(Error::UnsupportedVersion {
                    what: format!("record at {} offset {slot}", self.path(id).display()),
                    found,
                    supported: RECORD_VERSIONS,
                })
            }
            Err(HeaderProblem::Kind(kind)) => {
                return Err(Error::BadMetadata {
                    path: self.path(id),
                    reason: format!(
                        "record at offset {slot} has kind {kind}, unknown to this build"
                    ),
                })
            }
        };
        if h.seq != seq || !layout.owns(&h) {
            return Ok(Err(EARLIER_USE.into()));
        }
        if h.lsn != expected {
            return Ok(Err(format!(
                "found lsn {} where {expected} was expected",
                h.lsn
            )));
        }
        if let Err(why) = h.check(self.config.size) {
            return Ok(Err(format!("record describes nothing valid: {why}")));
        }
        if h.kind == RecordKind::Revert && h.offset < self.sb.base_lsn {
            return Ok(Err(format!(
                "revert to lsn {}, before the journal's base {}",
                h.offset, self.sb.base_lsn
            )));
        }
        let len = u64::from(h.payload_len);
        let placed = layout.place_found(at, &h).filter(|p| p.header == slot);
        let Some(placed) = placed else {
            return Ok(Err(format!(
                "payload at offset {} is not where the journal places it",
                h.payload_offset
            )));
        };
        if payloads.damaged.contains(&(id, slot)) {
            return Ok(Err("payload checksum mismatch".into()));
        }
        if len == 0 || h.lsn < payloads.checked_below {
            return Ok(Ok((h, placed, None)));
        }
        match readers
            .payloads
            .share_payload(&h, (id, slot))
            .map_err(self.io(id))?
        {
            Some(check) => Ok(Ok((h, placed, Some(check)))),
            None => Ok(Err("file ends inside the payload".into())),
        }
    }

    /// Intact records of this segment use (of `layout`) with lsn >= `from`
    /// where records after `at` may be: slots from `at.slot` down, above
    /// the payloads (which end at `at.top`); inline, any sector from
    /// `at.top` up (a header without the use's nonce is not one, unless
    /// `layout` is `None`: an inline use whose header was torn, whose
    /// nonce is lost; what is found then can only make `open` refuse).
    #[allow(clippy::too_many_arguments)]
    fn records_past(
        &self,
        readers: &mut SegmentReaders,
        id: u32,
        layout: Option<Layout>,
        at: Position,
        seq: u64,
        from: u64,
        found: &mut Vec<RecordHeader>,
    ) -> Result<()> {
        let ours = |h: &RecordHeader| match layout {
            Some(layout) => layout.owns(h),
            None => h.inline.is_some(),
        };
        let layout = layout.unwrap_or(Layout::Inline { nonce: 0 });
        if let Layout::Inline { .. } = layout {
            let mut pos = at.top;
            while pos + RECORD_HEADER_SIZE <= at.slot {
                let Some(b) = readers
                    .headers
                    .bytes(pos, RECORD_HEADER_SIZE)
                    .map_err(self.io(id))?
                else {
                    break;
                };
                let header = RecordHeader::decode(b).ok().filter(|h| {
                    let here = Position {
                        slot: at.slot,
                        top: pos,
                    };
                    h.seq == seq
                        && ours(h)
                        && h.lsn >= from
                        && layout.place_found(here, h).is_some()
                });
                let Some(h) = header else {
                    pos += RECORD_HEADER_SIZE;
                    continue;
                };
                if readers.payload_intact(&h).map_err(self.io(id))? == Some(true) {
                    found.push(h);
                }
                pos = h.inline_end(pos);
            }
            return Ok(());
        }
        let Position { mut slot, mut top } = at;
        while slot >= top {
            let Some(b) = readers
                .headers
                .bytes(slot, RECORD_HEADER_SIZE)
                .map_err(self.io(id))?
            else {
                break;
            };
            if let Ok(h) = RecordHeader::decode(b) {
                let payload_end = h.payload_offset.saturating_add(u64::from(h.payload_len));
                let below_slot = h.payload_len == 0 || payload_end <= slot;
                if h.seq == seq && h.lsn >= from && below_slot {
                    if readers.payload_intact(&h).map_err(self.io(id))? == Some(true) {
                        found.push(h);
                    }
                    top = top.max(payload_end);
                }
            }
            let Some(next) = slot.checked_sub(RECORD_HEADER_SIZE) else {
                break;
            };
            slot = next;
        }
        Ok(())
    }
}

/// A record the scan accepted, as the index builder needs it.
struct Accepted {
    entry: Entry,
    /// A bookmark's name and whether it is application-consistent.
    bookmark: Option<(String, bool)>,
    /// Its payload, for the builder to check first.
    payload: Option<PayloadCheck>,
}

/// Most records and payload bytes per batch. A batch holds on to the
/// windows its payloads lie in; with a few batches queued, recovery pins
/// some megabytes of windows whatever the size of the writes.
const BATCH: usize = 256;
const BATCH_BYTES: usize = 1 << 20;

/// How one pass of the scan treats payloads. The index builder checks
/// them, after the scan has read on; so when one turns out damaged, the
/// scan runs again, knowing it, and only sends the builder records from
/// there on.
struct Payloads<'a> {
    /// The builder has checked and applied the records below this lsn.
    checked_below: u64,
    /// Where earlier passes found a damaged payload.
    damaged: &'a [RecordAt],
    builder: Batcher,
}

/// Hands accepted records to the index builder thread in batches; the last
/// batch goes when it is dropped.
struct Batcher {
    batch: Vec<Accepted>,
    /// Payload bytes in `batch`.
    bytes: usize,
    tx: SyncSender<Vec<Accepted>>,
}

impl Batcher {
    fn new(tx: SyncSender<Vec<Accepted>>) -> Self {
        Batcher {
            batch: Vec::with_capacity(BATCH),
            bytes: 0,
            tx,
        }
    }

    fn push(&mut self, accepted: Accepted) {
        self.bytes += accepted.payload.as_ref().map_or(0, |p| p.len);
        self.batch.push(accepted);
        if self.batch.len() == BATCH || self.bytes >= BATCH_BYTES {
            self.send();
        }
    }

    fn send(&mut self) {
        self.bytes = 0;
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        // If the builder is gone it panicked; recover() reports that.
        let _ = self.tx.send(batch);
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.send();
    }
}

/// The index builder's work: the extent map and record index of the
/// records it applied.
struct Built {
    map: ExtentMap,
    index: RecordIndex,
    /// The first record whose payload failed its checksum, and its lsn:
    /// the map and index hold the records before it.
    damaged: Option<(RecordAt, u64)>,
}

impl Built {
    fn new(disk: u64, sb: &SuperState) -> Self {
        Built {
            map: ExtentMap::new(disk),
            index: RecordIndex::new(sb.base_lsn, sb.base_timestamp),
            damaged: None,
        }
    }
}

/// Applies the accepted records to `built`, in order, checking each
/// payload first; stops applying at the first damaged one. `page_out`:
/// pages the index out as it grows (a full scan; after a checkpoint, the
/// applier pages it out once the volume is open, so as not to make the
/// open wait for the file).
fn build_index(disk: u64, built: Built, rx: Receiver<Vec<Accepted>>, mut page_out: bool) -> Built {
    let Built {
        mut map, mut index, ..
    } = built;
    let mut damaged = None;
    for batch in rx {
        if damaged.is_some() {
            // The rest only needs receiving, so that the scan can finish.
            continue;
        }
        for a in batch {
            let lsn = index.last_lsn() + 1;
            if let Some(p) = a.payload.filter(|p| !p.intact()) {
                damaged = Some((p.at, lsn));
                break;
            }
            match (a.bookmark, a.entry.effect) {
                (Some((name, app_consistent)), _) => {
                    index.push_bookmark(name, a.entry.timestamp, app_consistent);
                }
                (
                    None,
                    Effect::Data {
                        start,
                        sectors,
                        target,
                    },
                ) => {
                    map.insert(start, sectors, lsn, target);
                    index.push(a.entry);
                }
                (None, Effect::Revert { .. }) => {
                    index.push(a.entry);
                    // Rare: rebuild the map as the revert left the disk.
                    map = ExtentMap::new(disk);
                    index.snapshot(lsn).replay_into(&map, lsn);
                }
                (None, Effect::Mark | Effect::Flush) => index.push(a.entry),
            }
        }
        // A full scan pages out as it goes (one write-back for many
        // chunks), so that a large journal's index is never all in
        // memory; not again once the file has failed.
        if page_out && index.unpaged_chunks() >= PAGE_OUT_BATCH {
            page_out = index.page_out_now();
        }
    }
    if page_out {
        index.page_out_now();
    }
    Built {
        map,
        index,
        damaged,
    }
}

/// What the scan found, apart from the index.
struct Scanned {
    used: Vec<Arc<Segment>>,
    stale: Vec<(u32, Option<Arc<dyn StorageFile>>)>,
    epoch: u64,
    epoch_starts: Vec<EpochStart>,
    report: RecoveryReport,
}

/// Where the scan starts.
struct Resume {
    /// The last lsns of the listed segments before the one it starts at,
    /// which a checkpoint stands for.
    skipped: Vec<u64>,
    /// The lsn the segment it starts at begins with.
    first_lsn: u64,
    /// A checkpoint's lsn, which the records of that segment must reach.
    checkpoint: Option<u64>,
}

/// A scan's start and what the index builder starts from.
struct Start {
    at: Resume,
    /// The builder holds every record below it.
    checked_below: u64,
    built: Built,
    /// Records the checkpoint stands for.
    from_checkpoint: u64,
}

impl Start {
    /// Every record from base_lsn + 1, checked.
    fn full(disk: u64, sb: &SuperState) -> Self {
        Start {
            at: Resume {
                skipped: Vec::new(),
                first_lsn: sb.base_lsn + 1,
                checkpoint: None,
            },
            checked_below: sb.base_lsn + 1,
            built: Built::new(disk, sb),
            from_checkpoint: 0,
        }
    }
}

/// Scans the journal of the volume in `dir`. See the module documentation.
///
/// Reading records and checking their headers (one thread) overlaps with
/// checking their payloads and building the extent map (another), so
/// recovery uses two cores. A damaged payload, found behind the scan, makes
/// it scan again from the start; that pass sends only the records past the
/// damage to the builder, which keeps what it built before it.
/// `cut`: the lsn a cut under way ends the journal at (volume/branch.rs).
pub fn recover(
    storage: &dyn Storage,
    dir: &Path,
    config: &VolumeConfig,
    sb: &SuperState,
    truncate_damaged: bool,
    cut: Option<u64>,
) -> Result<Recovered> {
    let scanner = &Scanner {
        storage,
        config,
        sb,
        dir: dir.join(JOURNAL_DIR),
        checkpoint: dir.join(checkpoint::CHECKPOINT_FILE),
        sb_path: dir.join(crate::superblock::SUPER_FILE),
        truncate_damaged,
        cut,
    };
    // The index pages its full chunks to a file from the start, so that
    // recovery of a large journal does not hold it all in memory.
    let pages = storage
        .create_scratch(dir)
        .map(PageFile::new)
        .inspect_err(|e| {
            tracing::warn!(
                volume = %config.uuid,
                "keeping the whole record index in memory: cannot create its page file in {}: {e}",
                dir.display()
            );
        })
        .ok();
    let paged = |mut start: Start| {
        if let Some(pages) = &pages {
            start.built.index.page_to(Arc::clone(pages));
        }
        start
    };
    let rejected = match scanner.checkpoint_start() {
        Ok(None) => None,
        Ok(Some(start)) => match scanner.recover_from(paged(start)) {
            Ok(recovered) => return Ok(recovered),
            Err(e) => Some(format!("recovery from it failed: {e}")),
        },
        Err(why) => Some(why),
    };
    if let Some(why) = rejected {
        tracing::warn!(
            event = crate::events::CHECKPOINT_REJECTED,
            volume = %config.uuid,
            path = %scanner.checkpoint.display(),
            "not using the checkpoint: {why}; verifying the whole journal"
        );
    }
    scanner.recover_from(paged(Start::full(config.size, sb)))
}

impl Scanner<'_> {
    fn recover_from(&self, start: Start) -> Result<Recovered> {
        let Start {
            at,
            mut checked_below,
            mut built,
            from_checkpoint,
        } = start;
        let config = self.config;
        let page_out = from_checkpoint == 0;
        let mut damaged = Vec::new();
        loop {
            let (tx, rx) = sync_channel(4);
            let (scanned, next) = std::thread::scope(|scope| {
                let builder = std::thread::Builder::new()
                    .name("rewind-recovery".into())
                    .spawn_scoped(scope, || build_index(config.size, built, rx, page_out))
                    .map_err(Error::io(|| "starting the recovery thread"))?;
                let payloads = Payloads {
                    checked_below,
                    damaged: &damaged,
                    builder: Batcher::new(tx),
                };
                let scanned = scan(self, payloads, &at);
                let built = builder.join().map_err(|_| Error::Io {
                    context: "building the extent map".into(),
                    source: io::Error::other("the recovery thread panicked"),
                })?;
                Ok::<_, Error>((scanned, built))
            })?;
            built = next;
            let Some((pos, lsn)) = built.damaged else {
                let scanned = scanned?;
                let mut report = scanned.report;
                report.records = report.next_lsn - 1 - self.sb.base_lsn;
                report.flush_records = built.index.flushes();
                report.records_from_checkpoint = from_checkpoint;
                report.records_verified = report.records - from_checkpoint;
                return Ok(Recovered {
                    used: scanned.used,
                    stale: scanned.stale,
                    last_data_lsn: built.index.last_data_lsn(),
                    map: built.map,
                    index: built.index,
                    epoch: scanned.epoch,
                    epoch_starts: scanned.epoch_starts,
                    report,
                });
            };
            // What the pass found past the damage (even an error) does not count.
            damaged.push(pos);
            checked_below = lsn;
        }
    }

    /// The scan's start from the checkpoint, if there is one and it agrees
    /// with `super` and the segments it names; `Err(why)` if it does not.
    /// The records of the last of those segments are checked by the scan.
    fn checkpoint_start(&self) -> std::result::Result<Option<Start>, String> {
        let file = match self.storage.open(&self.checkpoint) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading it failed: {e}")),
        };
        if let Some(c) = self.cut {
            return Err(format!("a cut to lsn {c} is under way"));
        }
        let records = self.config.journal_max / RECORD_HEADER_SIZE;
        let sectors = self.config.size / SECTOR;
        let bytes = checkpoint::read(file.as_ref(), self.config.uuid, records, sectors)?;
        drop(file);
        let ckpt = checkpoint::decode(&bytes, self.config.uuid).map_err(|e| e.to_string())?;
        drop(bytes);
        let base = self.sb.base_lsn;
        if ckpt.lsn < base {
            return Err(format!(
                "it is stale: it holds lsns up to {}, and the journal was folded up to {base}",
                ckpt.lsn
            ));
        }
        if ckpt.index.base_lsn() > base {
            return Err(format!(
                "its base lsn {} is newer than the journal's {base}",
                ckpt.index.base_lsn()
            ));
        }
        // Folds since it was taken removed whole segments from the front.
        let kept: Vec<checkpoint::Covered> = ckpt
            .segments
            .iter()
            .copied()
            .filter(|s| s.last_lsn > base)
            .collect();
        let Some(&last) = kept.last() else {
            // It stands for nothing the journal still holds.
            return Ok(None);
        };
        if kept[0].first_lsn != base + 1 {
            return Err(format!(
                "its segments start at lsn {}, the journal after lsn {base}",
                kept[0].first_lsn
            ));
        }
        for (i, k) in kept.iter().enumerate() {
            let listed = self.sb.segments.get(i);
            if listed.is_none_or(|s| (s.file_id, s.seq) != (k.file_id, k.seq)) {
                return Err(format!(
                    "it names {} (sequence {}) where super lists {}",
                    segment_name(k.file_id),
                    k.seq,
                    listed.map_or("nothing".into(), |s| format!(
                        "{} (sequence {})",
                        segment_name(s.file_id),
                        s.seq
                    ))
                ));
            }
        }
        let (before, _) = kept.split_at(kept.len() - 1);
        for k in before {
            self.check_covered(k)?;
        }
        let checkpoint::Checkpoint {
            lsn,
            mut index,
            extents,
            ..
        } = ckpt;
        index.trim(base);
        let index = index.with_base_timestamp(self.sb.base_timestamp);
        if index.reverts().iter().any(|&(_, to)| to < base) {
            return Err(format!(
                "a revert it holds goes back before the journal's base lsn {base}"
            ));
        }
        // Extents of records folded since read from base.img now.
        let extents: Vec<_> = extents.into_iter().filter(|x| x.lsn > base).collect();
        let map = ExtentMap::new(self.config.size);
        if extents
            .last()
            .is_some_and(|x| x.start + x.sectors > map.sectors())
        {
            return Err("its map reaches past the end of the disk".into());
        }
        let Some(checked_below) = lsn.checked_add(1) else {
            return Err(format!("its lsn {lsn} has no next one"));
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        map.load(&extents, threads);
        Ok(Some(Start {
            at: Resume {
                skipped: before.iter().map(|k| k.last_lsn).collect(),
                first_lsn: last.first_lsn,
                checkpoint: Some(lsn),
            },
            checked_below,
            built: Built {
                map,
                index,
                damaged: None,
            },
            from_checkpoint: lsn - base,
        }))
    }

    /// Checks that a segment the checkpoint stands for is still the use it
    /// names and holds its first and last records where it says.
    fn check_covered(&self, k: &checkpoint::Covered) -> std::result::Result<(), String> {
        let path = self.path(k.file_id);
        let name = segment_name(k.file_id);
        let file = self
            .storage
            .open(&path)
            .map_err(|e| format!("opening {name} failed: {e}"))?;
        let size = file.size().map_err(|e| format!("{name}: {e}"))?;
        if size < self.config.segment_size {
            return Err(format!("{name} has {size} bytes"));
        }
        let mut b = [0u8; RECORD_HEADER_SIZE as usize];
        file.read_exact_at(&mut b, 0)
            .map_err(|e| format!("reading {name} failed: {e}"))?;
        let layout = match SegmentHeader::decode(&b) {
            Ok(h)
                if h.volume == self.config.uuid
                    && h.seq == k.seq
                    && h.segment_size == self.config.segment_size =>
            {
                h.layout
            }
            _ => return Err(format!("{name}'s header is not that of sequence {}", k.seq)),
        };
        // Slots: the first and last records' headers, at places the lsns
        // give. Inline: the first record's (the last one's place depends
        // on every record before it); each covered segment's first record
        // still chains it to the one before.
        let wanted = match layout {
            Layout::Slots => vec![k.first_lsn, k.last_lsn],
            Layout::Inline { .. } => vec![k.first_lsn],
        };
        for lsn in wanted {
            let at = match layout {
                Layout::Slots => (lsn - k.first_lsn + 1)
                    .checked_mul(RECORD_HEADER_SIZE)
                    .and_then(|n| self.config.segment_size.checked_sub(n))
                    .filter(|&slot| slot >= SEGMENT_HEADER_SIZE),
                Layout::Inline { .. } => Some(SEGMENT_HEADER_SIZE),
            };
            let found = match at {
                Some(at) => file
                    .read_exact_at(&mut b, at)
                    .ok()
                    .and_then(|()| RecordHeader::decode(&b).ok()),
                None => None,
            };
            if found.is_none_or(|h| h.seq != k.seq || h.lsn != lsn || !layout.owns(&h)) {
                return Err(format!("{name} does not hold lsn {lsn} where it says"));
            }
        }
        Ok(())
    }
}

fn scan(scanner: &Scanner, mut payloads: Payloads, at: &Resume) -> Result<Scanned> {
    let Scanner {
        storage,
        config,
        sb,
        truncate_damaged,
        cut,
        ..
    } = *scanner;
    let mut expected = at.first_lsn;
    let mut epoch = 0;
    let mut epoch_starts = Vec::new();
    let mut report = RecoveryReport {
        records: 0,
        flush_records: 0,
        records_from_checkpoint: 0,
        records_verified: 0,
        next_lsn: expected,
        segments_scanned: 0,
        bytes_scanned: 0,
        end: LogEnd {
            segment: None,
            offset: 0,
            reason: "the pool holds no segment".into(),
        },
        discarded: None,
    };
    let mut files = Vec::with_capacity(sb.segments.len());
    for s in &sb.segments {
        match storage.open(&scanner.path(s.file_id)) {
            Ok(f) => files.push(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => files.push(None),
            Err(e) => return Err(scanner.io(s.file_id)(e)),
        }
    }

    let mut readers = SegmentReaders::new();
    // The last lsn of each segment with records, in order.
    let mut last_lsns = at.skipped.clone();
    // The layouts of the segments with records, in order (those a
    // checkpoint stands for are read at the end).
    let mut layouts = Vec::new();
    // The last segment with records, and where its next record would go.
    let mut last_used: Option<(usize, Layout, Position)> = None;
    for (i, s) in sb.segments.iter().enumerate().skip(at.skipped.len()) {
        let name = Some(segment_name(s.file_id));
        let Some(file) = &files[i] else {
            report.end = LogEnd {
                segment: name,
                offset: 0,
                reason: scanner.damaged(s.file_id, "file is missing".into())?,
            };
            break;
        };
        let size = file.size().map_err(scanner.io(s.file_id))?;
        if size < config.segment_size {
            let reason = format!(
                "file has {size} bytes, segments have {}",
                config.segment_size
            );
            scanner.damaged(s.file_id, reason)?;
        }
        readers
            .reset(file, config.segment_size)
            .map_err(scanner.io(s.file_id))?;
        report.segments_scanned += 1;
        let mut layout = Layout::Slots;
        let mut pos = layout.start(config.segment_size);
        let mut count = 0u64;
        let header =
            scanner.check_header(&mut readers.headers, s.file_id, s.seq, Some(expected))?;
        let stop = match header {
            Err(reason) => reason,
            Ok(found) => loop {
                if count == 0 {
                    layout = found;
                    pos = layout.start(config.segment_size);
                }
                if layout.next_header(pos).is_none() {
                    break SEGMENT_FULL.to_string();
                }
                if cut.is_some_and(|c| expected > c) {
                    break CUT.to_string();
                }
                let (h, placed, payload) = match scanner.record(
                    &mut readers,
                    s.file_id,
                    layout,
                    pos,
                    s.seq,
                    expected,
                    &payloads,
                )? {
                    Ok(found) => found,
                    Err(reason) => break reason,
                };
                let effect = Effect::of(&h, s.file_id);
                epoch = epoch.max(h.epoch);
                if h.kind == RecordKind::Epoch {
                    epoch_starts.push(EpochStart {
                        epoch: h.epoch,
                        first_lsn: h.lsn,
                        node: h.length,
                    });
                }
                if h.lsn >= payloads.checked_below {
                    let bookmark = match h.kind {
                        RecordKind::Bookmark => {
                            Some(readers.bookmark(&h).map_err(scanner.io(s.file_id))?)
                        }
                        _ => None,
                    };
                    payloads.builder.push(Accepted {
                        entry: Entry {
                            timestamp: h.timestamp,
                            effect,
                        },
                        bookmark,
                        payload,
                    });
                }
                pos = placed.next;
                report.bytes_scanned += RECORD_HEADER_SIZE + u64::from(h.payload_len);
                expected += 1;
                count += 1;
            },
        };
        let slot = layout.header_at(pos);
        if let Some(c) = at.checkpoint.filter(|&c| expected <= c) {
            // Checked in the first segment scanned, the one holding c.
            return Err(Error::BadMetadata {
                path: scanner.checkpoint.clone(),
                reason: format!(
                    "the journal holds lsns up to {} of the {c} it stands for ({stop})",
                    expected - 1
                ),
            });
        }
        if count == 0 {
            // The log ends where lsn `expected` broke: where the previous
            // segment stopped, unless it was merely full (then here); this
            // segment's problem is told too.
            if report.end.segment.is_some() && report.end.reason != SEGMENT_FULL {
                let here = segment_name(s.file_id);
                report.end.reason = format!(
                    "{}; {here} does not go on with lsn {expected}: {stop}",
                    report.end.reason
                );
            } else {
                report.end = LogEnd {
                    segment: name,
                    offset: slot,
                    reason: stop,
                };
            }
            break;
        }
        last_used = Some((i, layout, pos));
        layouts.push(layout);
        last_lsns.push(expected - 1);
        let at_cut = stop == CUT;
        report.end = LogEnd {
            segment: name,
            offset: slot,
            reason: stop,
        };
        if at_cut {
            break;
        }
    }
    report.next_lsn = expected;

    // Look past the end for intact records, and for proof of flushed loss.
    let from_index = last_used.map_or(0, |(i, _, _)| i);
    let mut past = Vec::new();
    for (i, s) in sb.segments.iter().enumerate().skip(from_index) {
        let Some(file) = &files[i] else { continue };
        readers
            .reset(file, config.segment_size)
            .map_err(scanner.io(s.file_id))?;
        let (layout, start) = match last_used {
            Some((used, layout, at)) if used == i => (Some(layout), at),
            // The use's layout as its header says; slots (as prepared)
            // when the header is not this use's, and inline with any
            // nonce when it was torn on its way to inline.
            _ => {
                let sector = readers
                    .headers
                    .bytes(0, SEGMENT_HEADER_SIZE)
                    .map_err(scanner.io(s.file_id))?
                    .unwrap_or_default();
                let layout = match SegmentHeader::decode(sector) {
                    Ok(h) if h.seq == s.seq && h.volume == config.uuid => Some(h.layout),
                    Err(SegmentHeaderProblem::Garbage)
                        if torn_header_rewrite(sector, config.uuid, s.seq, config.segment_size) =>
                    {
                        None
                    }
                    _ => Some(Layout::Slots),
                };
                let start = layout.unwrap_or(Layout::Inline { nonce: 0 });
                (layout, start.start(config.segment_size))
            }
        };
        scanner.records_past(
            &mut readers,
            s.file_id,
            layout,
            start,
            s.seq,
            expected,
            &mut past,
        )?;
    }
    // Past a cut are the records a branch took: neither lost nor proof.
    past.retain(|h| cut.is_none_or(|c| h.lsn <= c));
    if let (Some(lo), Some(hi)) = (
        past.iter().map(|h| h.lsn).min(),
        past.iter().map(|h| h.lsn).max(),
    ) {
        report.discarded = Some(Discarded {
            records: past.len() as u64,
            lowest_lsn: lo,
            highest_lsn: hi,
        });
    }
    let proof = past
        .iter()
        .filter_map(|h| Some((h, h.proves_durable()?)))
        .filter(|&(_, covered)| covered >= expected)
        .max_by_key(|&(_, covered)| covered);
    if let Some(p) = proof {
        let err = Error::FlushedDataDamaged {
            lsn: expected,
            path: scanner
                .dir
                .join(report.end.segment.clone().unwrap_or_default()),
            offset: report.end.offset,
            reason: report.end.reason.clone(),
            proof_lsn: p.0.lsn,
            covered: p.1,
        };
        if !truncate_damaged {
            return Err(err);
        }
        tracing::error!(
            event = crate::events::JOURNAL_TRUNCATED,
            volume = %config.uuid,
            dir = %scanner.dir.display(),
            "{err}; truncating as allowed"
        );
    }

    let used_count = last_used.map_or(0, |(i, _, _)| i + 1);
    let mut used = Vec::with_capacity(used_count);
    let mut stale = Vec::new();
    let skipped = at.skipped.len();
    for (i, (s, file)) in sb.segments.iter().zip(files).enumerate() {
        match file {
            Some(f) if i < used_count => {
                let layout = match i.checked_sub(skipped) {
                    Some(scanned) => layouts[scanned],
                    None => scanner.layout_of(&mut readers, &f, s.file_id, s.seq)?,
                };
                let seg = Segment::new(s.file_id, s.seq, f);
                seg.set_layout(layout);
                seg.last_lsn.store(last_lsns[i], Ordering::Release);
                used.push(Arc::new(seg));
            }
            file => stale.push((s.file_id, file)),
        }
    }
    Ok(Scanned {
        used,
        stale,
        epoch,
        epoch_starts,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::FaultStorage;

    fn file_of(fs: &FaultStorage, bytes: &[u8]) -> Arc<dyn StorageFile> {
        fs.create_dir_all(Path::new("/v")).expect("mkdir");
        let file = fs.create_new(Path::new("/v/f")).expect("create");
        file.write_all_at(&[bytes], 0).expect("write");
        file
    }

    #[test]
    fn a_window_the_builder_holds_is_set_aside_not_overwritten() {
        let bytes: Vec<u8> = (0..3 * READ_CHUNK).map(|i| ((i * 7) >> 9) as u8).collect();
        let fs = FaultStorage::new();
        let file = file_of(&fs, &bytes);
        let mut reader = SegmentReader::new();
        reader.reset(&file, bytes.len() as u64).expect("reset");
        let chunk = READ_CHUNK as usize;

        // Upwards, a window starts where the bytes asked for do.
        assert_eq!(reader.locate(100, 4096).expect("read"), Some(0));
        let held = reader.window.clone();
        assert_eq!(reader.locate(READ_CHUNK + 8, 4096).expect("read"), Some(0));
        assert!(
            !Arc::ptr_eq(&held, &reader.window),
            "moved to another window"
        );
        assert!(held[..chunk] == bytes[100..chunk + 100], "held, so intact");
        assert!(reader.window[..chunk] == bytes[chunk + 8..2 * chunk + 8]);

        // Once let go, the set-aside window is used again.
        let first = Arc::as_ptr(&held);
        drop(held);
        let held = reader.window.clone();
        assert_eq!(
            reader.locate(2 * READ_CHUNK + 16, 100).expect("read"),
            Some(0)
        );
        assert_eq!(Arc::as_ptr(&reader.window), first);
        assert_eq!(reader.spare.len(), 1);
        assert!(held[..chunk] == bytes[chunk + 8..2 * chunk + 8]);
        assert_eq!(
            reader.locate(3 * READ_CHUNK - 10, 20).expect("read"),
            None,
            "past the end"
        );
    }

    #[test]
    fn a_payload_check_fails_on_a_wrong_checksum_or_range() {
        let window = Arc::new(vec![7u8; 4096]);
        let check = |from, len, crc| PayloadCheck {
            window: window.clone(),
            from,
            len,
            crc,
            at: (0, 0),
        };
        let crc = crc32c(&[7u8; 512]);
        assert!(check(0, 512, crc).intact());
        assert!(check(3584, 512, crc).intact());
        assert!(!check(0, 512, crc ^ 1).intact());
        assert!(!check(3800, 512, crc).intact(), "past the window");
    }
}
