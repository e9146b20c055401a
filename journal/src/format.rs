//! On-disk layout of segment headers and journal records (see FORMAT.md).
//!
//! Everything is little-endian and sector-aligned. A segment use has one
//! of two layouts ([`Layout`]), named by its header's version:
//! - **slots** (version 2): payloads grow up from the segment's start, like
//!   any log, and their record headers sit in 512-byte slots growing down
//!   from its end. A payload whose length is a multiple of 4 KiB starts on
//!   a 4 KiB boundary, so guest pages map to whole file pages (no
//!   partial-page writes or reads in the page cache) and O_DIRECT works.
//!   Written through the page cache: suits writes that are not each made
//!   durable.
//! - **inline** (version 3): each record's header sits right before its
//!   payload, records back to back from the segment's start, each written
//!   with one O_DIRECT request. A durable 4 KiB write is then one 4.5 KiB
//!   device write and a cache flush, where slots cost two pages. A large
//!   payload of whole pages ([`LARGE_PAYLOAD`]) starts at the next page
//!   boundary past its header, the bytes between written as zeroes.

use uuid::Uuid;

/// Version of the on-disk format; `open` refuses any other (but
/// [`INLINE_VERSION`] in segment and record headers, and
/// [`LARGE_INLINE_VERSION`] in record headers).
pub const FORMAT_VERSION: u16 = 2;
/// Version of the headers of an inline segment use and its records.
pub const INLINE_VERSION: u16 = 3;
/// Version of an inline record header whose payload is large
/// ([`LARGE_PAYLOAD`]): the same fields as [`INLINE_VERSION`], the payload
/// on the first page boundary past the header. A build that predates it
/// refuses the journal instead of taking the record for the log's end.
pub const LARGE_INLINE_VERSION: u16 = 4;
/// The versions a segment header may have.
pub const SEGMENT_VERSIONS: &[u16] = &[FORMAT_VERSION, INLINE_VERSION];
/// The versions a record header may have.
pub const RECORD_VERSIONS: &[u16] = &[FORMAT_VERSION, INLINE_VERSION, LARGE_INLINE_VERSION];
/// Unit of alignment for every structure in a segment and of guest IO.
pub const SECTOR: u64 = 512;
/// Bytes at the start of each segment taken by its header.
pub const SEGMENT_HEADER_SIZE: u64 = SECTOR;
/// Bytes of the slot holding each record's header.
pub const RECORD_HEADER_SIZE: u64 = SECTOR;
/// Page size that payloads of whole pages are aligned to.
pub const PAGE: u64 = 4096;
/// Payloads of whole pages from this size up are large: an inline record
/// places one at the first page boundary past its header
/// (`Layout::place`), so that a run of such records starts and ends each
/// on a page and their direct writes are aligned to the file system's
/// blocks (ext4 runs direct writes into unwritten extents one at a time
/// where they are not block-aligned). The writer gives large writes far
/// from the journal's limit inline segments of their own (volume.rs,
/// `Mode::Bulk`).
pub const LARGE_PAYLOAD: u64 = 64 << 10;

const SEGMENT_MAGIC: [u8; 8] = *b"RWNDSEG\0";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RWJR");
const RECORD_HEADER_USED: usize = 76;
/// Version 3 adds `durable_lsn` and `nonce` before the checksum.
const INLINE_RECORD_HEADER_USED: usize = 92;
const SEGMENT_HEADER_USED: usize = 52;
/// Version 3 adds `nonce` before the checksum.
const INLINE_SEGMENT_HEADER_USED: usize = 60;
const FLAG_UNMAP: u8 = 1;
/// Longest bookmark name, in bytes; the name is the record's payload.
pub const MAX_BOOKMARK_NAME: usize = 128;
/// Byte of a bookmark's payload holding its flags: just past the longest
/// name, so no name reaches it. Bookmarks written before the flags existed
/// hold zero there (no flag), and older readers, which read only the name,
/// ignore it.
const BOOKMARK_FLAGS_AT: usize = MAX_BOOKMARK_NAME;
/// Bookmark flag: the guest's filesystems were frozen (through its agent)
/// while the bookmark was taken.
const BOOKMARK_APP_CONSISTENT: u8 = 1;

/// CRC-32C (Castagnoli, as iSCSI uses), the checksum of every on-disk
/// structure.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes);
    // A 32-bit CRC comes back in the low half of the u64.
    crc as u32
}

/// What a record does to the disk (or to the journal's metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Payload is the data written at `offset`.
    Write,
    /// `length` bytes at `offset` read as zeroes; `unmap` allows deallocation.
    WriteZeroes { unmap: bool },
    /// `length` bytes at `offset` are discarded (they read as zeroes).
    Discard,
    /// Durable cut: every record with lsn <= `offset` was synced before this
    /// record was written.
    Flush,
    /// A named moment; the payload is the name (`length` bytes of it).
    Bookmark,
    /// The disk becomes what it was at lsn `offset` (an earlier record).
    Revert,
    /// The fencing epoch becomes `offset`; this record and every later one
    /// carry it. `length` is the node tag of the volume copy that raised
    /// it (0 before node tags existed), so two copies that raise the same
    /// epoch at the same lsn still tell their histories apart.
    Epoch,
}

impl RecordKind {
    fn code(self) -> (u8, u8) {
        match self {
            RecordKind::Write => (1, 0),
            RecordKind::WriteZeroes { unmap } => (2, if unmap { FLAG_UNMAP } else { 0 }),
            RecordKind::Discard => (3, 0),
            RecordKind::Flush => (4, 0),
            RecordKind::Bookmark => (5, 0),
            RecordKind::Revert => (6, 0),
            RecordKind::Epoch => (7, 0),
        }
    }

    fn from_code(kind: u8, flags: u8) -> Option<Self> {
        match kind {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::WriteZeroes {
                unmap: flags & FLAG_UNMAP != 0,
            }),
            3 => Some(RecordKind::Discard),
            4 => Some(RecordKind::Flush),
            5 => Some(RecordKind::Bookmark),
            6 => Some(RecordKind::Revert),
            7 => Some(RecordKind::Epoch),
            _ => None,
        }
    }
}

/// The header of one journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    /// Sequence number of the segment use this record was written in; a
    /// record left over from an earlier use of a recycled file never matches.
    pub seq: u64,
    pub lsn: u64,
    /// Nanoseconds since the Unix epoch; never decreases along the lsns.
    pub timestamp: u64,
    pub epoch: u64,
    /// Byte offset on the disk; for `Flush`, the lsn it covers; for
    /// `Revert`, the lsn whose state the disk returns to.
    pub offset: u64,
    /// Bytes of the disk affected (0 for `Flush` and `Revert`; the name's
    /// length for `Bookmark`; the node tag for `Epoch`).
    pub length: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
    /// Byte offset of the payload in the segment (0 without payload).
    pub payload_offset: u64,
    /// Set in the records of an inline segment use (version 3 headers).
    pub inline: Option<InlineStamp>,
}

/// What a record header of an inline segment use adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InlineStamp {
    /// The segment use's nonce (its header's): a sector of guest data in
    /// a payload cannot pass for a header without it.
    pub nonce: u64,
    /// Every record with lsn <= it was durable before this one was
    /// written: what a Flush record proves, carried by the next record.
    pub durable_lsn: u64,
}

/// Why a header sector is not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Wrong magic or header checksum: garbage, zeroes or a torn write.
    Garbage,
    /// A valid header written by another format version.
    Version(u16),
    /// A valid header of a kind this version does not know.
    Kind(u8),
}

impl RecordHeader {
    /// The header sector: version 3 with an inline stamp, 2 without.
    pub fn encode(&self) -> [u8; RECORD_HEADER_SIZE as usize] {
        let mut b = [0u8; RECORD_HEADER_SIZE as usize];
        let (kind, flags) = self.kind.code();
        let version = match self.inline {
            Some(_) if large_payload(u64::from(self.payload_len)) => LARGE_INLINE_VERSION,
            Some(_) => INLINE_VERSION,
            None => FORMAT_VERSION,
        };
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&version.to_le_bytes());
        b[6] = kind;
        b[7] = flags;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.lsn.to_le_bytes());
        b[24..32].copy_from_slice(&self.timestamp.to_le_bytes());
        b[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.length.to_le_bytes());
        b[56..60].copy_from_slice(&self.payload_len.to_le_bytes());
        b[60..64].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[64..72].copy_from_slice(&self.payload_offset.to_le_bytes());
        let crc_at = match self.inline {
            Some(stamp) => {
                b[72..80].copy_from_slice(&stamp.durable_lsn.to_le_bytes());
                b[80..88].copy_from_slice(&stamp.nonce.to_le_bytes());
                INLINE_RECORD_HEADER_USED - 4
            }
            None => RECORD_HEADER_USED - 4,
        };
        let crc = crc32c(&b[..crc_at]);
        b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header sector (at least `RECORD_HEADER_USED` bytes; a
    /// version 3 header needs `INLINE_RECORD_HEADER_USED`).
    pub fn decode(b: &[u8]) -> Result<Self, HeaderProblem> {
        if b.len() < RECORD_HEADER_USED || le_u32(b, 0) != RECORD_MAGIC {
            return Err(HeaderProblem::Garbage);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        // Where the checksum is depends on the version it covers.
        let inline = matches!(version, INLINE_VERSION | LARGE_INLINE_VERSION);
        let used = match inline {
            true => INLINE_RECORD_HEADER_USED,
            false => RECORD_HEADER_USED,
        };
        if b.len() < used || crc32c(&b[..used - 4]) != le_u32(b, used - 4) {
            return Err(HeaderProblem::Garbage);
        }
        if version != FORMAT_VERSION && !inline {
            return Err(HeaderProblem::Version(version));
        }
        let kind = RecordKind::from_code(b[6], b[7]).ok_or(HeaderProblem::Kind(b[6]))?;
        Ok(RecordHeader {
            kind,
            seq: le_u64(b, 8),
            lsn: le_u64(b, 16),
            timestamp: le_u64(b, 24),
            epoch: le_u64(b, 32),
            offset: le_u64(b, 40),
            length: le_u64(b, 48),
            payload_len: le_u32(b, 56),
            payload_crc: le_u32(b, 60),
            payload_offset: le_u64(b, 64),
            inline: inline.then(|| InlineStamp {
                durable_lsn: le_u64(b, 72),
                nonce: le_u64(b, 80),
            }),
        })
    }

    /// Where an inline record whose header is at `at` ends: past its
    /// payload, wherever `Layout::place_found` allows it.
    pub fn inline_end(&self, at: u64) -> u64 {
        let header_end = at.saturating_add(RECORD_HEADER_SIZE);
        match self.payload_len {
            0 => header_end,
            len => self
                .payload_offset
                .saturating_add(u64::from(len))
                .max(header_end),
        }
    }

    /// The lsn this record proves durable (a Flush record's, or an inline
    /// record's `durable_lsn`), if any.
    pub fn proves_durable(&self) -> Option<u64> {
        match (self.kind, self.inline) {
            (RecordKind::Flush, _) => Some(self.offset),
            (_, Some(stamp)) if stamp.durable_lsn > 0 => Some(stamp.durable_lsn),
            _ => None,
        }
    }
}

/// Whether a payload of `len` bytes is large: whole pages, `LARGE_PAYLOAD`
/// or more.
fn large_payload(len: u64) -> bool {
    len >= LARGE_PAYLOAD && len.is_multiple_of(PAGE)
}

/// Where a payload of `len` bytes goes when payloads so far end at `top`,
/// given that its header goes in the slot at `slot`; `None` if it does not
/// fit below that slot.
pub fn payload_position(top: u64, len: u64, slot: u64) -> Option<u64> {
    let align = if len.is_multiple_of(PAGE) {
        PAGE
    } else {
        SECTOR
    };
    let at = top.div_ceil(align).checked_mul(align)?;
    (at.checked_add(len)? <= slot).then_some(at)
}

/// How a segment use places its records (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Headers in slots from the end down, payloads from the start up.
    Slots,
    /// Each header right before its payload; every header of the use
    /// carries `nonce`.
    Inline { nonce: u64 },
}

/// Where the journal stands in a segment use: `slot` is where the next
/// header goes (slots) or the segment's end (inline), `top` where the
/// payloads (slots) or records (inline) written so far end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub slot: u64,
    pub top: u64,
}

/// A record placed by [`Layout::place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub header: u64,
    pub payload: Option<u64>,
    /// Where the next record goes.
    pub next: Position,
}

impl Layout {
    /// Where the first record of a segment of `size` bytes goes.
    pub fn start(self, size: u64) -> Position {
        match self {
            Layout::Slots => Position {
                slot: size - RECORD_HEADER_SIZE,
                top: SEGMENT_HEADER_SIZE,
            },
            Layout::Inline { .. } => Position {
                slot: size,
                top: SEGMENT_HEADER_SIZE,
            },
        }
    }

    /// Places a record with a payload of `len` bytes at `at`; `None` if
    /// it does not fit the segment.
    pub fn place(self, at: Position, len: u64) -> Option<Placed> {
        let Position { slot, top } = at;
        match self {
            Layout::Slots => {
                if slot < top {
                    return None;
                }
                let payload = match len {
                    0 => None,
                    _ => Some(payload_position(top, len, slot)?),
                };
                Some(Placed {
                    header: slot,
                    payload,
                    next: Position {
                        // Below `top` means full: the next place fails.
                        slot: slot.saturating_sub(RECORD_HEADER_SIZE),
                        top: payload.map_or(top, |p| p + len),
                    },
                })
            }
            Layout::Inline { .. } => {
                let header_end = top.checked_add(RECORD_HEADER_SIZE)?;
                let payload = match len {
                    0 => None,
                    _ if large_payload(len) => Some(header_end.div_ceil(PAGE).checked_mul(PAGE)?),
                    _ => Some(header_end),
                };
                let end = match payload {
                    Some(at) => at.checked_add(len)?,
                    None => header_end,
                };
                (end <= slot).then_some(Placed {
                    header: top,
                    payload,
                    next: Position { slot, top: end },
                })
            }
        }
    }

    /// The place of a record found at `at` with header `h`: where `place`
    /// puts it; or, inline, a payload right after its header, where
    /// versions before large payloads were page-aligned put every one.
    pub fn place_found(self, at: Position, h: &RecordHeader) -> Option<Placed> {
        let len = u64::from(h.payload_len);
        let placed = self.place(at, len);
        if let Some(p) = placed.filter(|p| p.payload.unwrap_or(0) == h.payload_offset) {
            return Some(p);
        }
        let header_end = at.top.checked_add(RECORD_HEADER_SIZE)?;
        let end = header_end.checked_add(len)?;
        let earlier = matches!(self, Layout::Inline { .. })
            && len > 0
            && h.payload_offset == header_end
            && end <= at.slot;
        earlier.then_some(Placed {
            header: at.top,
            payload: Some(header_end),
            next: Position {
                slot: at.slot,
                top: end,
            },
        })
    }

    /// Where the header of the record at `at` goes (whatever its size).
    pub fn header_at(self, at: Position) -> u64 {
        match self {
            Layout::Slots => at.slot,
            Layout::Inline { .. } => at.top,
        }
    }

    /// `header_at`, if even a record without payload fits there.
    pub fn next_header(self, at: Position) -> Option<u64> {
        self.place(at, 0).map(|p| p.header)
    }

    /// Bytes a segment at `at` still has for records, headers included.
    pub fn room(self, at: Position) -> u64 {
        match self {
            Layout::Slots => (at.slot + RECORD_HEADER_SIZE).saturating_sub(at.top),
            Layout::Inline { .. } => at.slot.saturating_sub(at.top),
        }
    }

    /// Whether a header sector of an unknown kind or version
    /// ([`HeaderProblem::Version`], [`HeaderProblem::Kind`]) claims to be a
    /// record of use `seq` of this layout: the sequence number (bytes
    /// 8..16 in every version), and for an inline use its nonce where
    /// inline records keep it (bytes 80..88). Only then is it an error:
    /// anything else is left from an earlier use of the file, guest data
    /// included, as any other foreign header.
    pub fn claims(self, b: &[u8], seq: u64) -> bool {
        if b.len() < RECORD_HEADER_USED {
            return false;
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        let inline = matches!(version, INLINE_VERSION | LARGE_INLINE_VERSION);
        let of_use = le_u64(b, 8) == seq;
        match self {
            Layout::Slots => of_use && !inline,
            Layout::Inline { nonce } => {
                of_use && b.len() >= INLINE_RECORD_HEADER_USED && le_u64(b, 80) == nonce
            }
        }
    }

    /// Whether a record header belongs to a use of this layout: its
    /// version and nonce.
    pub fn owns(self, h: &RecordHeader) -> bool {
        match (self, h.inline) {
            (Layout::Slots, None) => true,
            (Layout::Inline { nonce }, Some(stamp)) => stamp.nonce == nonce,
            _ => false,
        }
    }
}

/// The header sector at the start of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub volume: Uuid,
    pub seq: u64,
    pub segment_size: u64,
    /// Version 2 for slots, 3 (with the nonce) for inline.
    pub layout: Layout,
}

/// Why a segment header sector is not valid for this volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentHeaderProblem {
    Garbage,
    Version(u16),
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_SIZE as usize] {
        let mut b = [0u8; SEGMENT_HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[16..32].copy_from_slice(self.volume.as_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.segment_size.to_le_bytes());
        let crc_at = match self.layout {
            Layout::Slots => {
                b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                SEGMENT_HEADER_USED - 4
            }
            Layout::Inline { nonce } => {
                b[8..10].copy_from_slice(&INLINE_VERSION.to_le_bytes());
                b[48..56].copy_from_slice(&nonce.to_le_bytes());
                INLINE_SEGMENT_HEADER_USED - 4
            }
        };
        let crc = crc32c(&b[..crc_at]);
        b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, SegmentHeaderProblem> {
        if b.len() < SEGMENT_HEADER_USED || b[0..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderProblem::Garbage);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        let used = match version {
            INLINE_VERSION => INLINE_SEGMENT_HEADER_USED,
            _ => SEGMENT_HEADER_USED,
        };
        if b.len() < used || crc32c(&b[..used - 4]) != le_u32(b, used - 4) {
            return Err(SegmentHeaderProblem::Garbage);
        }
        let layout = match version {
            FORMAT_VERSION => Layout::Slots,
            INLINE_VERSION => Layout::Inline {
                nonce: le_u64(b, 48),
            },
            _ => return Err(SegmentHeaderProblem::Version(version)),
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(SegmentHeader {
            volume: Uuid::from_bytes(uuid),
            seq: le_u64(b, 32),
            segment_size: le_u64(b, 40),
            layout,
        })
    }
}

/// Whether a sector that is not a valid segment header may be the header
/// of use `seq` torn while the writer rewrote it for inline records
/// (`choose_layout` in volume.rs): that rewrite changes only the version,
/// the nonce and the checksum, so the magic, volume, sequence number and
/// size read as before. Nothing in such a segment was flushed: a flush
/// syncs the rewritten header with the records. A damaged header can look
/// the same (a version 2 one with bit 0 of its version flipped, or a
/// version 3 one damaged in its nonce or checksum): recovery tells a
/// version 2 one by the slots records of its use (`check_header` in
/// recovery.rs), and an inline one only by a record that proves a flush.
pub fn torn_header_rewrite(b: &[u8], volume: Uuid, seq: u64, segment_size: u64) -> bool {
    // A tear before the version leaves the old header whole; after it,
    // the version reads 3.
    b.len() == SEGMENT_HEADER_SIZE as usize
        && b[0..8] == SEGMENT_MAGIC
        && u16::from_le_bytes([b[8], b[9]]) == INLINE_VERSION
        && b[10..16].iter().all(|&x| x == 0)
        && b[16..32] == *volume.as_bytes()
        && le_u64(b, 32) == seq
        && le_u64(b, 40) == segment_size
        && b[INLINE_SEGMENT_HEADER_USED..].iter().all(|&x| x == 0)
}

/// Checks that `[offset, offset + length)` is a non-empty, sector-aligned
/// range inside a disk of `disk_size` bytes.
pub fn check_range(offset: u64, length: u64, disk_size: u64) -> Result<(), String> {
    if !offset.is_multiple_of(SECTOR) || !length.is_multiple_of(SECTOR) {
        return Err(format!(
            "offset {offset} and length {length} must be multiples of {SECTOR}"
        ));
    }
    if length == 0 {
        return Err("length is zero".into());
    }
    match offset.checked_add(length) {
        Some(end) if end <= disk_size => Ok(()),
        _ => Err(format!(
            "range {offset}+{length} ends past the disk's {disk_size} bytes"
        )),
    }
}

impl RecordHeader {
    /// Checks that the header describes something a volume of `disk_size`
    /// bytes could have written.
    pub fn check(&self, disk_size: u64) -> Result<(), String> {
        let payload = u64::from(self.payload_len);
        if (payload == 0) != (self.payload_offset == 0)
            || !self.payload_offset.is_multiple_of(SECTOR)
        {
            return Err(format!(
                "payload of {payload} bytes at offset {}",
                self.payload_offset
            ));
        }
        if self.inline.is_some_and(|s| s.durable_lsn >= self.lsn) {
            return Err("record claims to have been durable before it was written".into());
        }
        match self.kind {
            RecordKind::Bookmark => check_bookmark(payload, self.length),
            RecordKind::Write if payload != self.length => {
                Err(format!("payload {payload} != length {}", self.length))
            }
            RecordKind::Write => check_range(self.offset, self.length, disk_size),
            _ if payload != 0 => Err(format!("unexpected payload of {payload} bytes")),
            RecordKind::WriteZeroes { .. } | RecordKind::Discard => {
                check_range(self.offset, self.length, disk_size)
            }
            RecordKind::Flush if self.length != 0 || self.offset >= self.lsn => {
                Err("flush record covers lsns after itself".into())
            }
            RecordKind::Flush => Ok(()),
            RecordKind::Revert if self.length != 0 || self.offset >= self.lsn => {
                Err("revert record returns to an lsn not before itself".into())
            }
            RecordKind::Revert => Ok(()),
            RecordKind::Epoch if self.offset != self.epoch => {
                Err("epoch record disagrees with its own epoch".into())
            }
            RecordKind::Epoch => Ok(()),
        }
    }
}

/// A bookmark's payload is one sector holding its name.
fn check_bookmark(payload: u64, name_len: u64) -> Result<(), String> {
    if payload != SECTOR || name_len == 0 || name_len > MAX_BOOKMARK_NAME as u64 {
        return Err(format!(
            "bookmark name of {name_len} bytes in a {payload}-byte payload"
        ));
    }
    Ok(())
}

/// A bookmark record's payload: one sector holding the name, zeroes, and
/// the flags byte at `BOOKMARK_FLAGS_AT`. The name must have passed
/// `check_bookmark_name`.
pub fn bookmark_payload(name: &str, app_consistent: bool) -> [u8; SECTOR as usize] {
    let mut payload = [0u8; SECTOR as usize];
    payload[..name.len()].copy_from_slice(name.as_bytes());
    if app_consistent {
        payload[BOOKMARK_FLAGS_AT] = BOOKMARK_APP_CONSISTENT;
    }
    payload
}

/// Whether a bookmark's payload says it is application-consistent (false
/// for a payload too short to hold the flags: a damaged record never
/// claims it).
pub fn bookmark_app_consistent(payload: &[u8]) -> bool {
    payload
        .get(BOOKMARK_FLAGS_AT)
        .is_some_and(|flags| flags & BOOKMARK_APP_CONSISTENT != 0)
}

/// Checks a bookmark name: 1 to 128 bytes of letters, digits, `.`, `_`,
/// `-` and `:`, so it can be typed as `bookmark:NAME` anywhere.
pub fn check_bookmark_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':');
    if name.is_empty() || name.len() > MAX_BOOKMARK_NAME || !name.chars().all(allowed) {
        return Err(format!(
            "bookmark name {name:?} must be 1 to {MAX_BOOKMARK_NAME} letters, digits, '.', '_', '-' or ':'"
        ));
    }
    Ok(())
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_crc32c() {
        // The catalogue's check value, and the RFC 3720 (iSCSI) test vectors.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xff; 32]), 0x62a8_ab43);
        assert_eq!(crc32c(&[]), 0);
    }

    fn sample() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::WriteZeroes { unmap: true },
            seq: 7,
            lsn: 42,
            timestamp: 1_700_000_000_000_000_000,
            epoch: 3,
            offset: 4096,
            length: 8192,
            payload_len: 0,
            payload_crc: 0,
            payload_offset: 0,
            inline: None,
        }
    }

    fn inline_sample() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Write,
            payload_len: 8192,
            payload_crc: 0xdead_beef,
            payload_offset: 1024,
            inline: Some(InlineStamp {
                nonce: 0x0123_4567_89ab_cdef,
                durable_lsn: 40,
            }),
            ..sample()
        }
    }

    #[test]
    fn record_header_round_trips() {
        for h in [sample(), inline_sample()] {
            assert_eq!(RecordHeader::decode(&h.encode()), Ok(h));
        }
        assert_eq!(u16::from_le_bytes([sample().encode()[4], 0]), 2);
        assert_eq!(u16::from_le_bytes([inline_sample().encode()[4], 0]), 3);
    }

    #[test]
    fn every_flipped_bit_in_an_inline_record_header_is_detected() {
        let good = inline_sample().encode();
        for bit in 0..INLINE_RECORD_HEADER_USED * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&b).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn what_a_record_proves_durable() {
        let flush = RecordHeader {
            kind: RecordKind::Flush,
            offset: 41,
            length: 0,
            ..sample()
        };
        assert_eq!(flush.proves_durable(), Some(41));
        assert_eq!(sample().proves_durable(), None);
        assert_eq!(inline_sample().proves_durable(), Some(40));
        let nothing_durable_yet = RecordHeader {
            inline: Some(InlineStamp {
                nonce: 1,
                durable_lsn: 0,
            }),
            ..sample()
        };
        assert_eq!(nothing_durable_yet.proves_durable(), None);
    }

    #[test]
    fn a_layout_owns_only_headers_of_its_version_and_nonce() {
        let inline = Layout::Inline {
            nonce: 0x0123_4567_89ab_cdef,
        };
        assert!(Layout::Slots.owns(&sample()));
        assert!(!Layout::Slots.owns(&inline_sample()));
        assert!(inline.owns(&inline_sample()));
        assert!(!inline.owns(&sample()));
        assert!(!Layout::Inline { nonce: 5 }.owns(&inline_sample()));
    }

    #[test]
    fn inline_records_go_back_to_back_and_end_at_the_segment_end() {
        let layout = Layout::Inline { nonce: 1 };
        let at = layout.start(65536);
        assert_eq!(layout.room(at), 65536 - 512);
        let a = layout.place(at, 4096).unwrap();
        assert_eq!((a.header, a.payload), (512, Some(1024)));
        let b = layout.place(a.next, 0).unwrap();
        assert_eq!((b.header, b.payload), (5120, None));
        let c = layout.place(b.next, 1536).unwrap();
        assert_eq!((c.header, c.payload), (5632, Some(6144)));
        assert_eq!(c.next.top, 7680);
        // Exactly to the end fits; a sector more does not.
        let last = Position {
            slot: 65536,
            top: 65536 - 512 - 4096,
        };
        assert_eq!(layout.place(last, 4096).unwrap().next.top, 65536);
        assert_eq!(layout.place(last, 4608), None);
        assert_eq!(
            layout.room(Position {
                slot: 65536,
                top: 65536
            }),
            0
        );
    }

    #[test]
    fn slot_records_put_headers_at_the_end_and_payloads_at_the_start() {
        let at = Layout::Slots.start(65536);
        let a = Layout::Slots.place(at, 4096).unwrap();
        assert_eq!((a.header, a.payload), (65024, Some(4096)));
        let b = Layout::Slots.place(a.next, 0).unwrap();
        assert_eq!((b.header, b.payload), (64512, None));
        assert_eq!(b.next.top, 8192);
        assert_eq!(Layout::Slots.place(b.next, 65536), None);
    }

    #[test]
    fn every_flipped_bit_in_a_record_header_is_detected() {
        let good = sample().encode();
        for bit in 0..RECORD_HEADER_USED * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                RecordHeader::decode(&b),
                Err(HeaderProblem::Garbage),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn other_versions_and_kinds_are_named() {
        let mut b = sample().encode();
        b[4] = 9;
        let crc = crc32c(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(RecordHeader::decode(&b), Err(HeaderProblem::Version(9)));

        let mut b = sample().encode();
        b[6] = 200;
        let crc = crc32c(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(RecordHeader::decode(&b), Err(HeaderProblem::Kind(200)));
    }

    #[test]
    fn zeroes_and_short_buffers_are_garbage() {
        assert_eq!(
            RecordHeader::decode(&[0u8; 512]),
            Err(HeaderProblem::Garbage)
        );
        assert_eq!(RecordHeader::decode(&[0u8; 3]), Err(HeaderProblem::Garbage));
        assert_eq!(
            SegmentHeader::decode(&[0u8; 512]),
            Err(SegmentHeaderProblem::Garbage)
        );
    }

    #[test]
    fn segment_header_round_trips_and_detects_flips() {
        for (layout, used) in [
            (Layout::Slots, SEGMENT_HEADER_USED),
            (Layout::Inline { nonce: 77 }, INLINE_SEGMENT_HEADER_USED),
        ] {
            let h = SegmentHeader {
                volume: Uuid::new_v4(),
                seq: 99,
                segment_size: 1 << 26,
                layout,
            };
            let good = h.encode();
            assert_eq!(SegmentHeader::decode(&good), Ok(h));
            for bit in 0..used * 8 {
                let mut b = good;
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(SegmentHeader::decode(&b).is_err(), "bit {bit}");
            }
        }
    }

    #[test]
    fn a_header_torn_while_rewritten_for_inline_records_is_recognized() {
        let (seq, size) = (12, 1 << 26);
        let header = |volume, layout| {
            SegmentHeader {
                volume,
                seq,
                segment_size: size,
                layout,
            }
            .encode()
        };
        // Enough volumes that some new checksums end in the old header's
        // zero bytes, so a tear there leaves the whole new header.
        let mut new_before_its_end = 0;
        for id in 0..2048u128 {
            let volume = Uuid::from_u128(id);
            let old = header(volume, Layout::Slots);
            let new = header(volume, Layout::Inline { nonce: 99 });
            // Torn anywhere: the new bytes up to there, the old ones after.
            for at in 0..=old.len() {
                let mut torn = old;
                torn[..at].copy_from_slice(&new[..at]);
                match SegmentHeader::decode(&torn) {
                    Ok(_) if torn == new => {
                        new_before_its_end += usize::from(at < INLINE_SEGMENT_HEADER_USED)
                    }
                    Ok(_) => assert_eq!(torn, old, "{volume} torn at {at}"),
                    Err(_) => assert!(
                        torn_header_rewrite(&torn, volume, seq, size),
                        "{volume} torn at {at}"
                    ),
                }
            }
        }
        assert!(new_before_its_end > 0);
        let volume = Uuid::from_u128(7);
        let old = header(volume, Layout::Slots);
        assert!(!torn_header_rewrite(&old, volume, seq + 1, size));
        assert!(!torn_header_rewrite(&[0u8; 512], volume, seq, size));
        // Damage to a header that stays version 2 is damage.
        let mut damaged = old;
        damaged[49] ^= 1;
        assert!(SegmentHeader::decode(&damaged).is_err());
        assert!(!torn_header_rewrite(&damaged, volume, seq, size));
    }

    #[test]
    fn bookmark_flags_sit_past_the_longest_name() {
        let longest = "n".repeat(MAX_BOOKMARK_NAME);
        for app in [false, true] {
            let payload = bookmark_payload(&longest, app);
            assert_eq!(&payload[..MAX_BOOKMARK_NAME], longest.as_bytes());
            assert_eq!(bookmark_app_consistent(&payload), app);
        }
        // Written before the flags existed: the name, then zeroes.
        let mut old = [0u8; SECTOR as usize];
        old[..4].copy_from_slice(b"pre1");
        assert!(!bookmark_app_consistent(&old));
        assert!(!bookmark_app_consistent(&[]));
        assert_eq!(&bookmark_payload("pre1", false), &old);
    }

    #[test]
    fn whole_page_payloads_are_page_aligned_and_others_sector_aligned() {
        assert_eq!(payload_position(512, 4096, 65024), Some(4096));
        assert_eq!(payload_position(5120, 8192, 65024), Some(8192));
        assert_eq!(payload_position(5120, 1536, 65024), Some(5120));
        assert_eq!(payload_position(60000, 8192, 65024), None);
        assert_eq!(payload_position(u64::MAX - 10, 512, u64::MAX), None);
    }

    #[test]
    fn inline_large_payloads_of_whole_pages_start_on_the_next_page() {
        let inline = Layout::Inline { nonce: 1 };
        let at = |top| Position { slot: 1 << 26, top };
        let payload_and_end = |top, len| {
            let p = inline.place(at(top), len).expect("fits");
            assert_eq!(p.header, top);
            (p.payload, p.next.top)
        };
        // Small, or not whole pages: right after the header.
        assert_eq!(payload_and_end(512, 4096), (Some(1024), 5120));
        let odd = LARGE_PAYLOAD + 512;
        assert_eq!(payload_and_end(512, odd), (Some(1024), 1024 + odd));
        assert_eq!(payload_and_end(512, 0), (None, 1024));
        // Large: on the next page, so the record after starts on one and
        // its whole request is page-aligned.
        let large = LARGE_PAYLOAD;
        assert_eq!(payload_and_end(512, large), (Some(4096), 4096 + large));
        assert_eq!(payload_and_end(8192, large), (Some(12288), 12288 + large));
        // Past the segment's end: no place.
        let near_end = Position {
            slot: 8192 + large,
            top: 8192,
        };
        assert_eq!(inline.place(near_end, large), None);
        // Slots keep their placement.
        assert_eq!(Layout::Slots.start(1 << 26).top, 512);
    }

    #[test]
    fn a_found_inline_record_is_placed_where_it_was_written_then_or_now() {
        let inline = Layout::Inline { nonce: 1 };
        let at = Position {
            slot: 1 << 26,
            top: 8192,
        };
        let found = |payload_offset| RecordHeader {
            payload_len: LARGE_PAYLOAD as u32,
            payload_offset,
            inline: Some(InlineStamp {
                nonce: 1,
                durable_lsn: 0,
            }),
            ..sample()
        };
        // Now: on the next page.
        let now = inline.place_found(at, &found(12288)).expect("now");
        assert_eq!(now.next.top, 12288 + LARGE_PAYLOAD);
        assert_eq!(found(12288).inline_end(8192), now.next.top);
        // Before large payloads were page-aligned: right after the header.
        let then = inline.place_found(at, &found(8704)).expect("then");
        assert_eq!(
            (then.payload, then.next.top),
            (Some(8704), 8704 + LARGE_PAYLOAD)
        );
        assert_eq!(found(8704).inline_end(8192), then.next.top);
        // Anywhere else: not a place the journal ever used.
        assert_eq!(inline.place_found(at, &found(16384)), None);
        assert_eq!(inline.place_found(at, &found(8192)), None);
        assert_eq!(Layout::Slots.place_found(at, &found(8704)), None);
        // Version 4 names a large payload, so that a build placing every
        // payload right after its header refuses the record.
        let version = |h: RecordHeader| {
            let b = h.encode();
            assert_eq!(RecordHeader::decode(&b), Ok(h));
            u16::from_le_bytes([b[4], b[5]])
        };
        assert_eq!(version(found(12288)), LARGE_INLINE_VERSION);
        let small = RecordHeader {
            payload_len: 4096,
            ..found(8704)
        };
        assert_eq!(version(small), INLINE_VERSION);
    }
}
