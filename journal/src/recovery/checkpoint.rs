//! The checkpoint file: the record index and the extent map as of one
//! durable lsn C, and the segments holding records `base_lsn + 1 ..= C`,
//! so that recovery checks only the records after C (FORMAT.md
//! "Checkpoint" has the layout).
//!
//! The map is stored although the entries determine it: replaying 3.7
//! million records into it took 2.4 s of a 3.5 s open; loading its
//! extents takes a fraction of that. Each extent is checked against the
//! entry of the record that wrote it.
//!
//! Decoding checks everything the file alone can tell (magic, version,
//! checksums, volume, lengths, every field); whether it agrees with the
//! journal is recovery's part (recovery.rs, `checkpoint_start`).

use std::io;

use crc_fast::{CrcAlgorithm, Digest};
use uuid::Uuid;

use crate::extent_map::{Target, Written};
use crate::format::{check_bookmark_name, crc32c, MAX_BOOKMARK_NAME};
use crate::record_index::{Bookmark, Effect, Entry, RecordIndex, Snapshot};
use crate::storage::StorageFile;

/// `<vol>/checkpoint`, written with write-to-temporary, fsync, rename,
/// fsync of the directory: a crash leaves the old file or the new one,
/// never a mix. One file rather than two checksummed slots because its size
/// follows the journal's (32 bytes a record): slots would have to be
/// preallocated for the largest journal, and either way a torn or stale
/// file only costs a full recovery.
pub const CHECKPOINT_FILE: &str = "checkpoint";
const MAGIC: &[u8; 8] = b"RWNDCKP\0";
/// The checkpoint's own version: a file of another is ignored (a full
/// recovery), never an error.
pub const CHECKPOINT_VERSION: u16 = 1;
const HEADER: usize = 128;
const HEADER_CRC_AT: usize = 124;
const SEGMENT: usize = 32;
const BOOKMARK: usize = 16 + MAX_BOOKMARK_NAME;
const ENTRY: usize = 32;
const EXTENT: usize = 32;

const KIND_MARK: u8 = 0;
const KIND_FLUSH: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_JOURNAL: u8 = 3;
const KIND_REVERT: u8 = 4;

/// A segment holding records `first_lsn..=last_lsn` of the checkpoint (the
/// last one may hold more, written after C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Covered {
    pub file_id: u32,
    pub seq: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
}

/// A decoded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// C: every record up to it is in `index`.
    pub lsn: u64,
    /// Oldest first; they hold `index.base_lsn() + 1 ..= lsn`, in order.
    pub segments: Vec<Covered>,
    pub index: RecordIndex,
    /// The extent map at `lsn`, in disk order.
    pub extents: Vec<Written>,
}

/// Why a checkpoint file is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("it is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("it does not start with the checkpoint magic")]
    Magic,
    #[error("its header checksum does not match")]
    HeaderChecksum,
    #[error("it has version {0}; this build reads version {CHECKPOINT_VERSION}")]
    Version(u16),
    #[error("it belongs to volume {0}")]
    Foreign(Uuid),
    #[error("it is {found} bytes where its header says {expected}")]
    Length { found: usize, expected: u64 },
    #[error("its checksum does not match")]
    Checksum,
    #[error("{0}")]
    Inconsistent(String),
}

/// What a checkpoint is taken from.
#[derive(Debug)]
pub struct Taken<'a> {
    pub volume: Uuid,
    pub base_timestamp: u64,
    pub segments: &'a [Covered],
    /// Those with lsn <= the snapshot's last.
    pub bookmarks: &'a [Bookmark],
    /// The entries `base_lsn + 1 ..= C`.
    pub entries: &'a Snapshot,
    /// The extent map at C, in disk order.
    pub extents: &'a [Written],
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Bytes the encoding hands on at a time.
const PIECE: usize = 1 << 20;

/// Hands the file's bytes to `out` in order, in pieces of about [`PIECE`]
/// bytes, so that the encoding of a large journal (32 bytes a record and
/// 32 an extent) is never whole in memory; returns its length.
pub fn encode_to(t: &Taken, out: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<u64> {
    let base_lsn = t.entries.base_lsn();
    let lsn = t.entries.last_lsn();
    let count = lsn - base_lsn;
    let len = HEADER
        + t.segments.len() * SEGMENT
        + t.bookmarks.len() * BOOKMARK
        + count as usize * ENTRY
        + t.extents.len() * EXTENT
        + 4;
    let mut b = Vec::with_capacity(PIECE + HEADER + BOOKMARK);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(t.volume.as_bytes());
    put_u64(&mut b, lsn);
    put_u64(&mut b, base_lsn);
    put_u64(&mut b, t.base_timestamp);
    put_u32(&mut b, t.segments.len() as u32);
    put_u32(&mut b, t.bookmarks.len() as u32);
    put_u64(&mut b, count);
    put_u64(&mut b, len as u64);
    put_u64(&mut b, t.extents.len() as u64);
    b.resize(HEADER_CRC_AT, 0);
    let crc = crc32c(&b);
    put_u32(&mut b, crc);
    let mut file_crc = Digest::new(CrcAlgorithm::Crc32Iscsi);
    // Hands `b` on once it holds a piece.
    let mut sent = |b: &mut Vec<u8>, last: bool| -> io::Result<()> {
        if b.len() >= PIECE || last {
            file_crc.update(b);
            out(b)?;
            b.clear();
        }
        Ok(())
    };
    for s in t.segments {
        put_u32(&mut b, s.file_id);
        put_u32(&mut b, 0);
        put_u64(&mut b, s.seq);
        put_u64(&mut b, s.first_lsn);
        put_u64(&mut b, s.last_lsn);
        sent(&mut b, false)?;
    }
    for m in t.bookmarks {
        put_u64(&mut b, m.lsn);
        b.push(u8::from(m.app_consistent));
        b.push(m.name.len() as u8);
        b.extend_from_slice(&[0; 6]);
        let at = b.len();
        b.extend_from_slice(m.name.as_bytes());
        b.resize(at + MAX_BOOKMARK_NAME, 0);
        sent(&mut b, false)?;
    }
    for l in base_lsn + 1..=lsn {
        let e = t.entries.entry(l);
        let (kind, x, a, c) = match e.effect {
            Effect::Mark => (KIND_MARK, 0, 0, 0),
            Effect::Flush => (KIND_FLUSH, 0, 0, 0),
            Effect::Revert { to } => (KIND_REVERT, 0, to, 0),
            Effect::Data {
                start,
                sectors,
                target: Target::Zero,
            } => (KIND_ZERO, 0, start, sectors),
            Effect::Data {
                start,
                sectors,
                target: Target::Journal { segment, sector },
            } => (
                KIND_JOURNAL,
                segment,
                start,
                u64::from(sector) << 32 | sectors,
            ),
        };
        put_u64(&mut b, e.timestamp);
        put_u32(&mut b, u32::from(kind));
        put_u32(&mut b, x);
        put_u64(&mut b, a);
        put_u64(&mut b, c);
        sent(&mut b, false)?;
    }
    for x in t.extents {
        let (kind, segment, sector) = match x.target {
            Target::Zero => (KIND_ZERO, 0, 0),
            Target::Journal { segment, sector } => (KIND_JOURNAL, segment, sector),
        };
        put_u64(&mut b, x.start);
        put_u64(&mut b, x.lsn);
        // Extents never cross a shard, which spans fewer than 2^32 sectors.
        put_u32(&mut b, x.sectors as u32);
        put_u32(&mut b, u32::from(kind));
        put_u32(&mut b, segment);
        put_u32(&mut b, sector);
        sent(&mut b, false)?;
    }
    sent(&mut b, true)?;
    // A CRC-32C comes back in the low half of the u64.
    out(&(file_crc.finalize() as u32).to_le_bytes())?;
    Ok(len as u64)
}

/// The file's bytes, whole.
#[cfg(test)]
pub fn encode(t: &Taken) -> Vec<u8> {
    let mut b = Vec::new();
    encode_to(t, &mut |piece| {
        b.extend_from_slice(piece);
        Ok(())
    })
    .expect("a Vec takes every piece");
    b
}

fn inconsistent(why: String) -> Invalid {
    Invalid::Inconsistent(why)
}

/// What a checkpoint's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    lsn: u64,
    base_lsn: u64,
    base_timestamp: u64,
    segments: u64,
    bookmarks: u64,
    /// Records: `lsn - base_lsn`.
    count: u64,
    extents: u64,
    /// Bytes of the whole file.
    len: u64,
}

/// Checks the header a checkpoint file of `volume` starts with (at least
/// its first [`HEADER`] bytes); see [`Invalid`] for what it rejects. The
/// file must then be `len` bytes long: [`decode`] checks the rest.
fn decode_header(b: &[u8], volume: Uuid) -> Result<Header, Invalid> {
    if b.len() < HEADER {
        return Err(Invalid::Short(b.len()));
    }
    if &b[0..8] != MAGIC {
        return Err(Invalid::Magic);
    }
    if crc32c(&b[..HEADER_CRC_AT]) != u32_at(b, HEADER_CRC_AT) {
        return Err(Invalid::HeaderChecksum);
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != CHECKPOINT_VERSION {
        return Err(Invalid::Version(version));
    }
    let mut found = [0u8; 16];
    found.copy_from_slice(&b[16..32]);
    let found = Uuid::from_bytes(found);
    if found != volume {
        return Err(Invalid::Foreign(found));
    }
    let h = Header {
        lsn: u64_at(b, 32),
        base_lsn: u64_at(b, 40),
        base_timestamp: u64_at(b, 48),
        segments: u64::from(u32_at(b, 56)),
        bookmarks: u64::from(u32_at(b, 60)),
        count: u64_at(b, 64),
        len: u64_at(b, 72),
        extents: u64_at(b, 80),
    };
    if b[10..16]
        .iter()
        .chain(&b[88..HEADER_CRC_AT])
        .any(|&x| x != 0)
    {
        return Err(inconsistent("reserved header bytes are not zero".into()));
    }
    let want = (HEADER as u64 + 4)
        .checked_add(h.segments * SEGMENT as u64)
        .and_then(|n| n.checked_add(h.bookmarks * BOOKMARK as u64))
        .and_then(|n| n.checked_add(h.count.checked_mul(ENTRY as u64)?))
        .and_then(|n| n.checked_add(h.extents.checked_mul(EXTENT as u64)?));
    if want != Some(h.len) {
        return Err(inconsistent(format!(
            "its header says {} bytes, which its counts do not add up to",
            h.len
        )));
    }
    // Below u64::MAX, `lsn` and every lsn up to it has a next one: the
    // decoding goes up to `lsn + 1`, and recovery on from there.
    if h.base_lsn.checked_add(h.count) != Some(h.lsn) || h.lsn == u64::MAX {
        return Err(inconsistent(format!(
            "it holds {} records after lsn {} but claims lsn {}",
            h.count, h.base_lsn, h.lsn
        )));
    }
    Ok(h)
}

/// The bytes of the checkpoint `file` of `volume`, read whole only once
/// its header is valid, gives the file's length, and holds at most
/// `records` records (a journal's records each take at least a header
/// sector of it) and `extents` map extents (each at least a sector of the
/// disk): a damaged or foreign file never sizes what is read.
pub fn read(
    file: &dyn StorageFile,
    volume: Uuid,
    records: u64,
    extents: u64,
) -> Result<Vec<u8>, String> {
    let size = file.size().map_err(|e| format!("reading it failed: {e}"))?;
    let mut b = vec![0u8; HEADER.min(usize::try_from(size).unwrap_or(HEADER))];
    file.read_exact_at(&mut b, 0)
        .map_err(|e| format!("reading it failed: {e}"))?;
    let h = decode_header(&b, volume).map_err(|e| e.to_string())?;
    // Each covered segment and each bookmark has a record of its own.
    if h.count > records || h.segments > h.count || h.bookmarks > h.count || h.extents > extents {
        return Err(format!(
            "its header claims {} records in {} segments, {} bookmarks and {} extents, more \
             than this volume can hold ({records} records, {extents} extents)",
            h.count, h.segments, h.bookmarks, h.extents
        ));
    }
    let len = usize::try_from(h.len).ok().filter(|_| h.len == size);
    let Some(len) = len else {
        return Err(format!(
            "it is {size} bytes where its header says {}",
            h.len
        ));
    };
    b.resize(len, 0);
    file.read_exact_at(&mut b[HEADER..], HEADER as u64)
        .map_err(|e| format!("reading it failed: {e}"))?;
    Ok(b)
}

/// Reads a checkpoint of `volume`; see [`Invalid`] for what it rejects.
pub fn decode(b: &[u8], volume: Uuid) -> Result<Checkpoint, Invalid> {
    let Header {
        lsn,
        base_lsn,
        base_timestamp,
        segments,
        bookmarks,
        count,
        extents,
        len,
    } = decode_header(b, volume)?;
    if b.len() as u64 != len {
        return Err(Invalid::Length {
            found: b.len(),
            expected: len,
        });
    }
    let body = b.len() - 4;
    if crc32c(&b[..body]) != u32_at(b, body) {
        return Err(Invalid::Checksum);
    }
    let mut at = HEADER;
    let segments = decode_segments(b, &mut at, segments, base_lsn, lsn)?;
    let marks = decode_bookmarks(b, &mut at, bookmarks, base_lsn, lsn)?;
    let index = decode_entries(b, at, (base_lsn, base_timestamp, lsn), &segments, marks)?;
    let at = at + count as usize * ENTRY;
    let extents = decode_extents(&b[at..at + extents as usize * EXTENT], &index)?;
    Ok(Checkpoint {
        lsn,
        segments,
        index,
        extents,
    })
}

/// The map's extents: in disk order, each part of what the entry of its
/// lsn wrote.
fn decode_extents(b: &[u8], index: &RecordIndex) -> Result<Vec<Written>, Invalid> {
    let mut out: Vec<Written> = Vec::with_capacity(b.len() / EXTENT);
    for e in b.chunks_exact(EXTENT) {
        let (start, lsn) = (u64_at(e, 0), u64_at(e, 8));
        let sectors = u64::from(u32_at(e, 16));
        let (kind, segment, sector) = (u32_at(e, 20), u32_at(e, 24), u32_at(e, 28));
        let bad = || inconsistent(format!("the map extent at sector {start} is not valid"));
        let after = out.last().map_or(0, |x| x.start + x.sectors);
        if sectors == 0 || start < after || lsn <= index.base_lsn() || lsn > index.last_lsn() {
            return Err(bad());
        }
        let Effect::Data {
            start: from,
            sectors: n,
            target: wrote,
        } = index.effect(lsn)
        else {
            return Err(bad());
        };
        let end = start.checked_add(sectors).ok_or_else(bad)?;
        if start < from || end > from.saturating_add(n) {
            return Err(bad());
        }
        let target = match (kind, wrote) {
            (k, Target::Zero) if k == u32::from(KIND_ZERO) && segment == 0 && sector == 0 => {
                Target::Zero
            }
            (
                k,
                Target::Journal {
                    segment: s,
                    sector: first,
                },
            ) if k == u32::from(KIND_JOURNAL)
                && s == segment
                && u64::from(sector) == u64::from(first) + (start - from) =>
            {
                Target::Journal { segment, sector }
            }
            _ => return Err(bad()),
        };
        out.push(Written {
            start,
            sectors,
            lsn,
            target,
        });
    }
    Ok(out)
}

fn decode_segments(
    b: &[u8],
    at: &mut usize,
    n: u64,
    base_lsn: u64,
    lsn: u64,
) -> Result<Vec<Covered>, Invalid> {
    let mut out = Vec::with_capacity(n as usize);
    let mut next = base_lsn + 1;
    for _ in 0..n {
        let s = Covered {
            file_id: u32_at(b, *at),
            seq: u64_at(b, *at + 8),
            first_lsn: u64_at(b, *at + 16),
            last_lsn: u64_at(b, *at + 24),
        };
        if u32_at(b, *at + 4) != 0 {
            return Err(inconsistent(
                "a segment entry has reserved bytes set".into(),
            ));
        }
        if s.first_lsn != next || s.last_lsn < s.first_lsn || s.last_lsn > lsn {
            return Err(inconsistent(format!(
                "segment {} claims lsns {}..={}, where {next} was next",
                s.file_id, s.first_lsn, s.last_lsn
            )));
        }
        next = s.last_lsn + 1;
        out.push(s);
        *at += SEGMENT;
    }
    if next != lsn + 1 {
        return Err(inconsistent(format!(
            "its segments end at lsn {}, not at {lsn}",
            next - 1
        )));
    }
    Ok(out)
}

fn decode_bookmarks(
    b: &[u8],
    at: &mut usize,
    n: u64,
    base_lsn: u64,
    lsn: u64,
) -> Result<Vec<Bookmark>, Invalid> {
    let mut out: Vec<Bookmark> = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mark_lsn = u64_at(b, *at);
        let (flags, len) = (b[*at + 8], b[*at + 9] as usize);
        let name = &b[*at + 16..*at + BOOKMARK];
        let after = out.last().map_or(base_lsn, |m| m.lsn);
        let name_ok = len <= MAX_BOOKMARK_NAME && name[len..].iter().all(|&x| x == 0);
        let name = std::str::from_utf8(&name[..len.min(MAX_BOOKMARK_NAME)]).ok();
        let Some(name) = name.filter(|n| name_ok && check_bookmark_name(n).is_ok()) else {
            return Err(inconsistent(format!(
                "bookmark at lsn {mark_lsn} has no valid name"
            )));
        };
        if mark_lsn <= after || mark_lsn > lsn || flags > 1 || b[*at + 10..*at + 16] != [0; 6] {
            return Err(inconsistent(format!(
                "bookmark {name} at lsn {mark_lsn} is out of place"
            )));
        }
        out.push(Bookmark {
            name: name.to_owned(),
            lsn: mark_lsn,
            timestamp_ns: 0,
            app_consistent: flags == 1,
        });
        *at += BOOKMARK;
    }
    Ok(out)
}

fn decode_entries(
    b: &[u8],
    mut at: usize,
    (base_lsn, base_timestamp, lsn): (u64, u64, u64),
    segments: &[Covered],
    marks: Vec<Bookmark>,
) -> Result<RecordIndex, Invalid> {
    let mut index = RecordIndex::new(base_lsn, base_timestamp);
    let mut marks = marks.into_iter().peekable();
    let mut last_ts = 0;
    for l in base_lsn + 1..=lsn {
        let timestamp = u64_at(b, at);
        let kind = u32_at(b, at + 8);
        let x = u32_at(b, at + 12);
        let (a, c) = (u64_at(b, at + 16), u64_at(b, at + 24));
        at += ENTRY;
        let bad = || inconsistent(format!("the entry of lsn {l} is not valid"));
        let effect = match (kind, x, a, c) {
            (k, 0, 0, 0) if k == u32::from(KIND_MARK) => Effect::Mark,
            (k, 0, 0, 0) if k == u32::from(KIND_FLUSH) => Effect::Flush,
            (k, 0, to, 0) if k == u32::from(KIND_REVERT) && to >= base_lsn && to < l => {
                Effect::Revert { to }
            }
            (k, 0, start, sectors) if k == u32::from(KIND_ZERO) && sectors > 0 => Effect::Data {
                start,
                sectors,
                target: Target::Zero,
            },
            (k, segment, start, c) if k == u32::from(KIND_JOURNAL) && c as u32 > 0 => {
                if !segments.iter().any(|s| s.file_id == segment) {
                    return Err(bad());
                }
                Effect::Data {
                    start,
                    sectors: u64::from(c as u32),
                    target: Target::Journal {
                        segment,
                        sector: (c >> 32) as u32,
                    },
                }
            }
            _ => return Err(bad()),
        };
        if timestamp < last_ts {
            return Err(inconsistent(format!("lsn {l} goes back in time")));
        }
        last_ts = timestamp;
        match marks.next_if(|m| m.lsn == l) {
            Some(m) if effect == Effect::Mark => {
                index.push_bookmark(m.name, timestamp, m.app_consistent);
            }
            Some(_) => return Err(bad()),
            None => index.push(Entry { timestamp, effect }),
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOLUME: Uuid = Uuid::from_u128(0x1234_5678);

    /// An index over base lsn 10 with every kind of entry, and its segments.
    fn sample() -> (RecordIndex, Vec<Covered>) {
        let mut index = RecordIndex::new(10, 1000);
        let data = |target| Effect::Data {
            start: 8,
            sectors: 8,
            target,
        };
        let journal = Target::Journal {
            segment: 4,
            sector: 3,
        };
        for (i, effect) in [
            data(journal),
            Effect::Flush,
            data(Target::Zero),
            Effect::Revert { to: 12 },
        ]
        .into_iter()
        .enumerate()
        {
            index.push(Entry {
                timestamp: 2000 + i as u64,
                effect,
            });
        }
        index.push_bookmark("before.upgrade:1".into(), 3000, true);
        index.push(Entry {
            timestamp: 3001,
            effect: data(Target::Journal {
                segment: 7,
                sector: 1,
            }),
        });
        let segments = vec![
            Covered {
                file_id: 4,
                seq: 40,
                first_lsn: 11,
                last_lsn: 14,
            },
            Covered {
                file_id: 7,
                seq: 41,
                first_lsn: 15,
                last_lsn: 16,
            },
        ];
        (index, segments)
    }

    /// The map the sample's records leave.
    fn map_of(index: &RecordIndex) -> Vec<Written> {
        let map = crate::extent_map::ExtentMap::new(1 << 20);
        index
            .snapshot(index.last_lsn())
            .replay_into(&map, index.last_lsn());
        map.written()
    }

    fn encoded() -> Vec<u8> {
        let (index, segments) = sample();
        encode(&Taken {
            volume: VOLUME,
            base_timestamp: 1000,
            segments: &segments,
            bookmarks: index.bookmarks(),
            entries: &index.snapshot(index.last_lsn()),
            extents: &map_of(&index),
        })
    }

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let (index, segments) = sample();
        let c = decode(&encoded(), VOLUME).expect("decodes");
        assert_eq!(c.lsn, 16);
        assert_eq!(c.segments, segments);
        assert_eq!(c.index.base_lsn(), 10);
        assert_eq!(c.index.last_lsn(), 16);
        assert_eq!(c.index.timestamp(10), 1000);
        for lsn in 11..=16 {
            assert_eq!(c.index.effect(lsn), index.effect(lsn), "lsn {lsn}");
            assert_eq!(c.index.timestamp(lsn), index.timestamp(lsn));
        }
        assert_eq!(c.index.bookmarks(), index.bookmarks());
        assert_eq!(c.index.reverts(), index.reverts());
        assert_eq!(c.index.flushes(), 1);
        assert_eq!(c.extents, map_of(&index));
        assert_eq!(c.extents.len(), 1, "lsn 16 over what the revert left");
    }

    #[test]
    fn a_checkpoint_larger_than_a_piece_streams_and_reads_back() {
        // 3 MiB of entries: several pieces of the streamed encoding.
        let n = 3 * PIECE as u64 / ENTRY as u64 + 17;
        let mut index = RecordIndex::new(0, 0);
        for i in 1..=n {
            index.push(Entry {
                timestamp: i,
                effect: if i % 3 == 0 {
                    Effect::Flush
                } else {
                    Effect::Data {
                        start: i * 8,
                        sectors: 8,
                        target: Target::Journal {
                            segment: 1,
                            sector: 8,
                        },
                    }
                },
            });
        }
        let segments = [Covered {
            file_id: 1,
            seq: 1,
            first_lsn: 1,
            last_lsn: n,
        }];
        let extents = map_of(&index);
        let taken = Taken {
            volume: VOLUME,
            base_timestamp: 0,
            segments: &segments,
            bookmarks: &[],
            entries: &index.snapshot(n),
            extents: &extents,
        };
        let mut pieces = Vec::new();
        let mut bytes = Vec::new();
        let len = encode_to(&taken, &mut |piece| {
            pieces.push(piece.len());
            bytes.extend_from_slice(piece);
            Ok(())
        })
        .expect("encodes");
        assert_eq!(len, bytes.len() as u64);
        assert!(pieces.len() > 4, "{pieces:?}");
        assert!(pieces[..pieces.len() - 2].iter().all(|&p| p >= PIECE));
        let c = decode(&bytes, VOLUME).expect("decodes");
        assert_eq!(c.index.last_lsn(), n);
        assert_eq!(c.index.flushes(), n / 3);
        for lsn in [1, n / 2, n] {
            assert_eq!(c.index.effect(lsn), index.effect(lsn), "lsn {lsn}");
        }
        assert_eq!(c.extents, extents);
    }

    #[test]
    fn an_empty_checkpoint_reads_back() {
        let index = RecordIndex::new(5, 9);
        let b = encode(&Taken {
            volume: VOLUME,
            base_timestamp: 9,
            segments: &[],
            bookmarks: &[],
            entries: &index.snapshot(5),
            extents: &[],
        });
        let c = decode(&b, VOLUME).expect("decodes");
        assert_eq!((c.lsn, c.index.base_lsn(), c.segments.len()), (5, 5, 0));
    }

    /// Rewrites the header checksum and the trailer after a change, so the
    /// check behind them is the one that answers.
    fn resealed(mut b: Vec<u8>) -> Vec<u8> {
        let crc = crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..HEADER].copy_from_slice(&crc.to_le_bytes());
        let body = b.len() - 4;
        let crc = crc32c(&b[..body]);
        b[body..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn rejected(b: &[u8]) -> Invalid {
        decode(b, VOLUME).expect_err("must be rejected")
    }

    #[test]
    fn every_damage_is_rejected_with_its_reason() {
        let good = encoded();
        assert_eq!(rejected(&good[..100]), Invalid::Short(100));
        assert_eq!(
            rejected(&good[..good.len() - 1]),
            Invalid::Length {
                found: good.len() - 1,
                expected: good.len() as u64
            }
        );
        let mut b = good.clone();
        b[0] ^= 1;
        assert_eq!(rejected(&b), Invalid::Magic);
        // A flipped bit anywhere: the header's or the whole file's checksum.
        for byte in [
            20,
            40,
            123,
            124,
            HEADER + 3,
            good.len() - 40,
            good.len() - 1,
        ] {
            let mut b = good.clone();
            b[byte] ^= 0x10;
            let why = rejected(&b);
            assert!(
                matches!(why, Invalid::HeaderChecksum | Invalid::Checksum),
                "byte {byte}: {why}"
            );
        }
        let mut b = good.clone();
        b[8] = 9;
        assert_eq!(rejected(&resealed(b)), Invalid::Version(9));
        assert_eq!(
            decode(&good, Uuid::from_u128(7)).expect_err("foreign"),
            Invalid::Foreign(VOLUME)
        );
        let mut b = good.clone();
        b[100] = 1;
        assert!(matches!(rejected(&resealed(b)), Invalid::Inconsistent(_)));
    }

    #[test]
    fn fields_that_disagree_are_rejected() {
        let good = encoded();
        let entry = |lsn: u64| HEADER + 2 * SEGMENT + BOOKMARK + (lsn - 11) as usize * ENTRY;
        let extent = entry(17);
        type Edit = Box<dyn Fn(&mut Vec<u8>)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("claimed lsn", Box::new(|b| b[32] ^= 1)),
            (
                "segments not contiguous",
                Box::new(|b| b[HEADER + SEGMENT + 16] ^= 1),
            ),
            ("unknown kind", Box::new(move |b| b[entry(12) + 8] = 9)),
            (
                "flush with a range",
                Box::new(move |b| b[entry(12) + 16] = 1),
            ),
            (
                "data in an unlisted segment",
                Box::new(move |b| b[entry(11) + 12] = 5),
            ),
            (
                "revert to the future",
                Box::new(move |b| b[entry(14) + 16] = 14),
            ),
            ("time goes back", Box::new(move |b| b[entry(16) + 1] = 0)),
            (
                "bookmark on a data record",
                Box::new(|b| b[HEADER + 2 * SEGMENT] = 11),
            ),
            (
                "bookmark name not allowed",
                Box::new(|b| b[HEADER + 2 * SEGMENT + 16] = b'/'),
            ),
            (
                "extent in another place than its record wrote",
                Box::new(move |b| b[extent + 28] ^= 1),
            ),
            (
                "extent of a record that wrote elsewhere",
                Box::new(move |b| b[extent + 8] = 11),
            ),
            ("extent of a flush", Box::new(move |b| b[extent + 8] = 12)),
            (
                "extent past its record's range",
                Box::new(move |b| b[extent + 16] = 9),
            ),
            (
                "extent of no sectors",
                Box::new(move |b| b[extent + 16] = 0),
            ),
        ];
        for (what, edit) in edits {
            let mut b = good.clone();
            edit(&mut b);
            let why = rejected(&resealed(b));
            assert!(matches!(why, Invalid::Inconsistent(_)), "{what}: {why}");
        }
    }
}
