//! On-disk layout of segment headers and journal records (see FORMAT.md).
//!
//! Everything is little-endian and sector-aligned. A segment holds payloads
//! growing up from its start, like any log, and their record headers in
//! 512-byte slots growing down from its end. A payload whose length is a
//! multiple of 4 KiB starts on a 4 KiB boundary, so guest pages map to whole
//! file pages (no partial-page writes or reads in the page cache) and
//! O_DIRECT works.

use uuid::Uuid;

/// Version of the on-disk format; `open` refuses any other.
pub const FORMAT_VERSION: u16 = 2;
/// Unit of alignment for every structure in a segment and of guest IO.
pub const SECTOR: u64 = 512;
/// Bytes at the start of each segment taken by its header.
pub const SEGMENT_HEADER_SIZE: u64 = SECTOR;
/// Bytes of the slot holding each record's header.
pub const RECORD_HEADER_SIZE: u64 = SECTOR;
/// Page size that payloads of whole pages are aligned to.
pub const PAGE: u64 = 4096;

const SEGMENT_MAGIC: [u8; 8] = *b"RWNDSEG\0";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RWJR");
const RECORD_HEADER_USED: usize = 76;
const SEGMENT_HEADER_USED: usize = 52;
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
    pub fn encode(&self) -> [u8; RECORD_HEADER_SIZE as usize] {
        let mut b = [0u8; RECORD_HEADER_SIZE as usize];
        let (kind, flags) = self.kind.code();
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
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
        let crc = crc32c(&b[..72]);
        b[72..RECORD_HEADER_USED].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header sector (at least `RECORD_HEADER_USED` bytes).
    pub fn decode(b: &[u8]) -> Result<Self, HeaderProblem> {
        if b.len() < RECORD_HEADER_USED || le_u32(b, 0) != RECORD_MAGIC {
            return Err(HeaderProblem::Garbage);
        }
        if crc32c(&b[..72]) != le_u32(b, 72) {
            return Err(HeaderProblem::Garbage);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != FORMAT_VERSION {
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
        })
    }
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

/// The header sector at the start of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub volume: Uuid,
    pub seq: u64,
    pub segment_size: u64,
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
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..32].copy_from_slice(self.volume.as_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.segment_size.to_le_bytes());
        let crc = crc32c(&b[..48]);
        b[48..SEGMENT_HEADER_USED].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, SegmentHeaderProblem> {
        if b.len() < SEGMENT_HEADER_USED || b[0..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderProblem::Garbage);
        }
        if crc32c(&b[..48]) != le_u32(b, 48) {
            return Err(SegmentHeaderProblem::Garbage);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(SegmentHeaderProblem::Version(version));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(SegmentHeader {
            volume: Uuid::from_bytes(uuid),
            seq: le_u64(b, 32),
            segment_size: le_u64(b, 40),
        })
    }
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
        }
    }

    #[test]
    fn record_header_round_trips() {
        let h = sample();
        assert_eq!(RecordHeader::decode(&h.encode()), Ok(h));
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
        let h = SegmentHeader {
            volume: Uuid::new_v4(),
            seq: 99,
            segment_size: 1 << 26,
        };
        let good = h.encode();
        assert_eq!(SegmentHeader::decode(&good), Ok(h));
        for bit in 0..SEGMENT_HEADER_USED * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::decode(&b).is_err(), "bit {bit}");
        }
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
}
