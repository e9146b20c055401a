//! Finding the headers of records by lsn in a segment use.
//!
//! In a slots use the header of the k-th record (from 0) is at a fixed
//! place: slot k from the segment's end. In an inline use it follows the
//! records before it, so the writer (and any lookup on its way) notes
//! where every `MARK_EVERY`-th header is, and a lookup walks forward from
//! the nearest note below it (or the first record), through a window. The
//! notes cost 16 bytes per `MARK_EVERY` records.

use std::io;
use std::ops::RangeInclusive;
use std::sync::PoisonError;

use super::Segment;
use crate::format::{Layout, RecordHeader, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};

/// Where the header of one record is: (lsn, offset in the segment).
pub(super) type Mark = (u64, u64);

const MARK_EVERY: u64 = 32;
/// Bytes read at a time while walking an inline use.
const WINDOW: u64 = 256 << 10;

/// A record whose header is not where the journal put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Misplaced {
    pub lsn: u64,
    /// Where it was looked for.
    pub offset: u64,
}

impl Segment {
    /// Notes that the header of record `lsn`, the `k`-th (from 0) of this
    /// inline use, is at `offset`.
    pub fn note_header(&self, k: u64, lsn: u64, offset: u64) {
        if k.is_multiple_of(MARK_EVERY) {
            let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
            // In order: the writer appends, a lookup may fill in.
            let at = marks.partition_point(|&(l, _)| l < lsn);
            if marks.get(at).is_none_or(|&(l, _)| l != lsn) {
                marks.insert(at, (lsn, offset));
            }
        }
    }

    /// The headers of records `lsns` of this use, whose first record is
    /// `first`, with their offsets, in lsn order. Each is checked: its
    /// lsn, its sequence number and its layout's version and nonce.
    pub fn read_headers(
        &self,
        segment_size: u64,
        first: u64,
        lsns: RangeInclusive<u64>,
    ) -> io::Result<Result<Vec<(RecordHeader, u64)>, Misplaced>> {
        let (from, upto) = (*lsns.start(), *lsns.end());
        if from < first || upto < from {
            return Ok(Err(Misplaced {
                lsn: from,
                offset: 0,
            }));
        }
        let layout = self.layout();
        let ours = |h: &RecordHeader, lsn: u64| h.lsn == lsn && h.seq == self.seq && layout.owns(h);
        let mut found = Vec::with_capacity((upto - from + 1) as usize);
        match layout {
            Layout::Slots => {
                let slot = |lsn: u64| {
                    let k = lsn - first + 1;
                    segment_size.checked_sub(RECORD_HEADER_SIZE * k)
                };
                let (Some(low), Some(high)) = (slot(upto), slot(from)) else {
                    return Ok(Err(Misplaced {
                        lsn: upto,
                        offset: 0,
                    }));
                };
                // Slots grow down: the newest of the range is the lowest.
                let mut slots = vec![0u8; (high + RECORD_HEADER_SIZE - low) as usize];
                self.file.read_exact_at(&mut slots, low)?;
                for lsn in from..=upto {
                    let at = high - RECORD_HEADER_SIZE * (lsn - from);
                    let i = (at - low) as usize;
                    match RecordHeader::decode(&slots[i..i + RECORD_HEADER_SIZE as usize]) {
                        Ok(h) if ours(&h, lsn) => found.push((h, at)),
                        _ => return Ok(Err(Misplaced { lsn, offset: at })),
                    }
                }
            }
            Layout::Inline { .. } => {
                let mark = {
                    let marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
                    let below = marks.partition_point(|&(lsn, _)| lsn <= from);
                    below.checked_sub(1).map(|i| marks[i])
                };
                // Without a note (the use was recovered), from its start.
                let (mut lsn, mut at) = mark.unwrap_or((first, SEGMENT_HEADER_SIZE));
                let mut window = Window::default();
                while lsn <= upto {
                    let Some(sector) = window.bytes(self, segment_size, at)? else {
                        return Ok(Err(Misplaced { lsn, offset: at }));
                    };
                    let h = match RecordHeader::decode(sector) {
                        Ok(h) if ours(&h, lsn) => h,
                        _ => return Ok(Err(Misplaced { lsn, offset: at })),
                    };
                    self.note_header(lsn - first, lsn, at);
                    if lsn >= from {
                        found.push((h, at));
                    }
                    at = h.inline_end(at);
                    lsn += 1;
                }
            }
        }
        Ok(Ok(found))
    }
}

/// A forward-moving view of a segment file.
#[derive(Default)]
struct Window {
    buf: Vec<u8>,
    start: u64,
}

impl Window {
    /// The header sector at `at`; `None` past the segment's end.
    fn bytes(&mut self, seg: &Segment, segment_size: u64, at: u64) -> io::Result<Option<&[u8]>> {
        let end = at + RECORD_HEADER_SIZE;
        if end > segment_size {
            return Ok(None);
        }
        if at < self.start || end > self.start + self.buf.len() as u64 {
            let len = WINDOW.min(segment_size - at);
            self.buf.resize(len as usize, 0);
            self.start = at;
            if let Err(e) = seg.file.read_exact_at(&mut self.buf, at) {
                self.buf.clear();
                return Err(e);
            }
        }
        let i = (at - self.start) as usize;
        Ok(Some(&self.buf[i..i + RECORD_HEADER_SIZE as usize]))
    }
}
