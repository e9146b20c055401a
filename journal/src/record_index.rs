//! Every journal record after base_lsn, in memory, by lsn: when it was
//! written and what it did to the disk.
//!
//! This is the metadata point-in-time access is built from: the disk at lsn
//! L is base.img plus the effects of records base_lsn+1..=L, replayed in lsn
//! order ([`Snapshot::replay_into`]). A Revert record resets the disk to an
//! earlier lsn's state, so a replay through one first replays up to its
//! target, then goes on after it.
//!
//! Invariants:
//! - lsns are dense and timestamps never decrease along them, so time -> lsn
//!   is a bisection;
//! - entries live in chunks of `CHUNK`; every chunk but the tail is full and
//!   frozen behind an `Arc`, so a snapshot shares them instead of copying,
//!   and growing never moves what is there; a chunk keeps its entries as
//!   compact columns ([`block`]), about 20 bytes a record; with a page
//!   file ([`pages`]), a frozen chunk lives there instead of in memory;
//! - every revert's target is >= base_lsn (the applier never folds past the
//!   target of a revert it has not folded).

mod block;
mod pages;

use std::collections::VecDeque;
use std::sync::Arc;

use block::Block;
pub use pages::PageFile;
use pages::Paged;

use crate::extent_map::{ExtentMap, Target};
use crate::format::{RecordHeader, RecordKind, SECTOR};

const CHUNK: usize = 4096;

/// Full chunks (640 KiB of memory) that wait to be paged out together, with
/// one sync of the page file: the writer wakes the applier when so many
/// are in memory.
pub const PAGE_OUT_CHUNKS: usize = 8;

/// Full chunks (5 MiB of memory, 6 MiB of file) one page-out writes at
/// most, so that the applier is never long away from its folds; also
/// the backlog past which it pages out even when a fold is urgent.
pub const PAGE_OUT_BATCH: usize = 64;

/// A full chunk. Freezing the tail moves its columns into the `Arc`
/// instead of copying 4096 entries (recovery pushes millions of them).
type Chunk = Arc<Frozen>;

#[derive(Debug)]
struct Frozen {
    /// Flush records in the chunk: folds and cuts count them without
    /// reading a paged chunk back.
    flushes: u64,
    place: Place,
}

#[derive(Debug)]
enum Place {
    Memory(Block),
    Paged(Paged),
}

impl Frozen {
    fn memory(full: Block) -> Chunk {
        Arc::new(Frozen {
            flushes: full.flushes(),
            place: Place::Memory(full),
        })
    }

    fn get(&self, i: usize) -> Entry {
        match &self.place {
            Place::Memory(block) => block.get(i),
            Place::Paged(paged) => paged.get(i),
        }
    }

    /// A copy of the first `len` entries with room for `capacity`.
    fn prefix(&self, len: usize, capacity: usize) -> Block {
        match &self.place {
            Place::Memory(block) => block.prefix(len, capacity),
            Place::Paged(paged) => {
                let mut block = Block::with_capacity(capacity);
                for i in 0..len {
                    block.push(paged.get(i));
                }
                block
            }
        }
    }
}

/// Full chunks of an index still in memory, on their way to its page
/// file: taken under the index's lock ([`RecordIndex::to_page_out`]),
/// written without it ([`PageOut::write`]), and put in place under it
/// again ([`RecordIndex::paged_out`]), so that no writer waits for the
/// file.
#[derive(Debug)]
pub struct PageOut {
    pages: Arc<PageFile>,
    /// Each chunk with the lsn of its first entry.
    chunks: Vec<(u64, Chunk)>,
    /// What `write` made of them, in the same order.
    paged: Vec<Paged>,
}

impl PageOut {
    /// Writes the chunks to the page file and syncs it; on an error (a
    /// warning, once) they stay in memory, to be tried again.
    pub fn write(&mut self) {
        let blocks: Vec<&Block> = self
            .chunks
            .iter()
            .filter_map(|(_, chunk)| match &chunk.place {
                Place::Memory(block) => Some(block),
                Place::Paged(_) => None,
            })
            .collect();
        if blocks.len() == self.chunks.len() {
            self.paged = self.pages.page_out(&blocks).unwrap_or_default();
        }
    }
}

/// What one record did to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing (a bookmark).
    Mark,
    /// A durable cut point; changes nothing.
    Flush,
    /// `sectors` sectors from sector `start` now hold `target`.
    Data {
        start: u64,
        sectors: u64,
        target: Target,
    },
    /// The disk returns to its state at lsn `to`.
    Revert { to: u64 },
}

impl Effect {
    /// What the record `h` did; a Write's data is at sector `sector` of
    /// journal file `file` (a segment, or a branch's records file).
    pub fn of(h: &RecordHeader, file: u32) -> Effect {
        let data = |target| Effect::Data {
            start: h.offset / SECTOR,
            sectors: h.length / SECTOR,
            target,
        };
        match h.kind {
            RecordKind::Write => data(Target::Journal {
                segment: file,
                sector: (h.payload_offset / SECTOR) as u32,
            }),
            RecordKind::WriteZeroes { .. } | RecordKind::Discard => data(Target::Zero),
            RecordKind::Flush => Effect::Flush,
            RecordKind::Revert => Effect::Revert { to: h.offset },
            RecordKind::Bookmark | RecordKind::Epoch => Effect::Mark,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub timestamp: u64,
    pub effect: Effect,
}

/// A named moment in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark {
    pub name: String,
    /// The bookmark record's own lsn: the disk as of every record before it.
    pub lsn: u64,
    pub timestamp_ns: u64,
    /// Taken while the guest's filesystems were frozen (the flags byte of
    /// its payload, format.rs).
    pub app_consistent: bool,
}

/// Entries `base_lsn + 1 ..= last_lsn()`.
#[derive(Debug)]
pub struct RecordIndex {
    base_lsn: u64,
    base_timestamp: u64,
    /// Lsn of the first entry of the first chunk (<= base_lsn + 1: the first
    /// chunk may still hold folded entries).
    chunks_lsn: u64,
    frozen: VecDeque<Chunk>,
    tail: Block,
    /// (lsn, target) of every Revert record, in lsn order.
    reverts: Vec<(u64, u64)>,
    bookmarks: Vec<Bookmark>,
    flushes: u64,
    /// Where full chunks go, if anywhere.
    pages: Option<Arc<PageFile>>,
}

impl RecordIndex {
    /// An empty index over base.img as of `base_lsn`, written at `base_timestamp`.
    pub fn new(base_lsn: u64, base_timestamp: u64) -> Self {
        RecordIndex {
            base_lsn,
            base_timestamp,
            chunks_lsn: base_lsn + 1,
            frozen: VecDeque::new(),
            tail: Block::with_capacity(CHUNK),
            reverts: Vec::new(),
            bookmarks: Vec::new(),
            flushes: 0,
            pages: None,
        }
    }

    /// Pages full chunks to `pages` from now on ([`PageOut`]), those there
    /// now included.
    pub fn page_to(&mut self, pages: Arc<PageFile>) {
        self.pages = Some(pages);
    }

    /// Pages out every full chunk in memory, waiting for the file; false
    /// if some stay in memory (the file failed).
    pub fn page_out_now(&mut self) -> bool {
        while let Some(mut out) = self.to_page_out(1) {
            out.write();
            let failed = out.paged.is_empty();
            self.paged_out(out);
            if failed {
                return false;
            }
        }
        true
    }

    /// Whether the last push filled a chunk.
    pub fn froze_a_chunk(&self) -> bool {
        self.tail.len() == 0 && !self.frozen.is_empty()
    }

    /// Full chunks in memory since the last page-out.
    pub fn unpaged_chunks(&self) -> usize {
        self.frozen
            .iter()
            .rev()
            .take_while(|c| matches!(c.place, Place::Memory(_)))
            .count()
    }

    /// The oldest full chunks still in memory, at most
    /// [`PAGE_OUT_BATCH`], if the index has a page file and at least
    /// `min` are waiting. Chunks are paged in order, so those waiting are
    /// the last ones, and stay so.
    pub fn to_page_out(&self, min: usize) -> Option<PageOut> {
        let pages = self.pages.clone()?;
        let waiting = self.unpaged_chunks();
        if waiting < min.max(1) {
            return None;
        }
        let first = self.frozen.len() - waiting;
        let chunks: Vec<(u64, Chunk)> = (first..self.frozen.len())
            .take(PAGE_OUT_BATCH)
            .map(|i| {
                let lsn = self.chunks_lsn + (i * CHUNK) as u64;
                (lsn, Arc::clone(&self.frozen[i]))
            })
            .collect();
        Some(PageOut {
            pages,
            chunks,
            paged: Vec::new(),
        })
    }

    /// Puts what `out` wrote in place of the chunks it was made from,
    /// where those are still in the index (a fold or a cut may have taken
    /// them meanwhile; their slots are freed).
    pub fn paged_out(&mut self, out: PageOut) {
        for ((lsn, chunk), paged) in out.chunks.into_iter().zip(out.paged) {
            let Some(at) = lsn.checked_sub(self.chunks_lsn) else {
                continue;
            };
            let place = self
                .frozen
                .get_mut((at / CHUNK as u64) as usize)
                .filter(|c| Arc::ptr_eq(c, &chunk));
            if let Some(place) = place {
                *place = Arc::new(Frozen {
                    flushes: chunk.flushes,
                    place: Place::Paged(paged),
                });
            }
        }
    }

    /// The page file of `page_to`, if any.
    pub fn pages(&self) -> Option<Arc<PageFile>> {
        self.pages.clone()
    }

    pub fn base_lsn(&self) -> u64 {
        self.base_lsn
    }

    /// The same index with another time for the base state.
    pub fn with_base_timestamp(mut self, ns: u64) -> Self {
        self.base_timestamp = ns;
        self
    }

    /// Highest lsn indexed (base_lsn if none).
    pub fn last_lsn(&self) -> u64 {
        self.chunks_lsn + (self.frozen.len() * CHUNK + self.tail.len()) as u64 - 1
    }

    /// Adds the entry of lsn `last_lsn() + 1`.
    pub fn push(&mut self, entry: Entry) {
        let lsn = self.last_lsn() + 1;
        match entry.effect {
            Effect::Revert { to } => self.reverts.push((lsn, to)),
            Effect::Flush => self.flushes += 1,
            Effect::Mark | Effect::Data { .. } => {}
        }
        self.tail.push(entry);
        if self.tail.len() == CHUNK {
            let full = std::mem::replace(&mut self.tail, Block::with_capacity(CHUNK));
            self.frozen.push_back(Frozen::memory(full));
        }
    }

    /// Adds a bookmark record (its entry, its name and its flag, together:
    /// a reader of the index never sees the bookmark without its flag).
    pub fn push_bookmark(
        &mut self,
        name: String,
        timestamp: u64,
        app_consistent: bool,
    ) -> Bookmark {
        let bookmark = Bookmark {
            name,
            lsn: self.last_lsn() + 1,
            timestamp_ns: timestamp,
            app_consistent,
        };
        self.push(Entry {
            timestamp,
            effect: Effect::Mark,
        });
        self.bookmarks.push(bookmark.clone());
        bookmark
    }

    fn entry(&self, lsn: u64) -> Entry {
        locate(self.chunks_lsn, self.frozen.iter(), &self.tail, lsn)
    }

    /// What record `lsn` (base_lsn < lsn <= last_lsn()) did.
    pub fn effect(&self, lsn: u64) -> Effect {
        self.entry(lsn).effect
    }

    /// Time of lsn `lsn` (base_lsn..=last_lsn()).
    pub fn timestamp(&self, lsn: u64) -> u64 {
        if lsn <= self.base_lsn {
            self.base_timestamp
        } else {
            self.entry(lsn).timestamp
        }
    }

    /// The newest lsn whose record was written at or before `timestamp`
    /// (base_lsn if every record is later).
    pub fn lsn_at(&self, timestamp: u64) -> u64 {
        let (mut lo, mut hi) = (self.base_lsn + 1, self.last_lsn() + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.entry(mid).timestamp <= timestamp {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo - 1
    }

    /// Bytes of data the records `after + 1..=upto` put in the journal.
    pub fn journal_bytes(&self, after: u64, upto: u64) -> u64 {
        let first = after.max(self.base_lsn) + 1;
        (first..=upto.min(self.last_lsn()))
            .map(|lsn| match self.entry(lsn).effect {
                Effect::Data {
                    sectors,
                    target: Target::Journal { .. },
                    ..
                } => sectors * SECTOR,
                _ => 0,
            })
            .sum()
    }

    /// Times of the oldest and newest records, if any.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let last = self.last_lsn();
        (last > self.base_lsn).then(|| (self.timestamp(self.base_lsn + 1), self.timestamp(last)))
    }

    pub fn bookmarks(&self) -> &[Bookmark] {
        &self.bookmarks
    }

    pub fn bookmark(&self, name: &str) -> Option<&Bookmark> {
        self.bookmarks.iter().find(|b| b.name == name)
    }

    /// The newest lsn of a record other than Flush (base_lsn if none).
    pub fn last_data_lsn(&self) -> u64 {
        (self.base_lsn + 1..=self.last_lsn())
            .rev()
            .find(|&lsn| self.entry(lsn).effect != Effect::Flush)
            .unwrap_or(self.base_lsn)
    }

    /// Flush records in the index.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// Reverts (lsn, target) in the index, in lsn order.
    pub fn reverts(&self) -> &[(u64, u64)] {
        &self.reverts
    }

    /// The entries up to `upto` (<= last_lsn()), for use without the lock.
    pub fn snapshot(&self, upto: u64) -> Snapshot {
        let needed = (upto + 1).saturating_sub(self.chunks_lsn) as usize;
        let whole = (needed / CHUNK).min(self.frozen.len());
        let frozen: Vec<Chunk> = self.frozen.iter().take(whole).cloned().collect();
        let rest = needed - whole * CHUNK;
        let tail = if whole < self.frozen.len() {
            self.frozen[whole].prefix(rest, rest)
        } else {
            self.tail.prefix(rest, rest)
        };
        Snapshot {
            base_lsn: self.base_lsn,
            chunks_lsn: self.chunks_lsn,
            frozen,
            tail,
            reverts: self
                .reverts
                .iter()
                .copied()
                .filter(|r| r.0 <= upto)
                .collect(),
        }
    }

    /// Flush records among `first..=last` (within the chunks): whole
    /// chunks by their count, the ends entry by entry.
    fn flushes_in(&self, first: u64, last: u64) -> u64 {
        let mut flushes = 0;
        let mut lsn = first;
        while lsn <= last {
            let i = (lsn - self.chunks_lsn) as usize;
            let chunk_last = lsn + (CHUNK - 1 - i % CHUNK) as u64;
            match self.frozen.get(i / CHUNK) {
                Some(chunk) if i.is_multiple_of(CHUNK) && chunk_last <= last => {
                    flushes += chunk.flushes;
                    lsn = chunk_last + 1;
                }
                _ => {
                    flushes += u64::from(self.entry(lsn).effect == Effect::Flush);
                    lsn += 1;
                }
            }
        }
        flushes
    }

    /// Forgets every record after `lsn` (>= base_lsn): a cut moved them to
    /// a branch (volume/branch.rs), and the next record pushed is `lsn + 1`.
    pub fn truncate(&mut self, lsn: u64) {
        let lsn = lsn.max(self.base_lsn);
        if lsn >= self.last_lsn() {
            return;
        }
        self.flushes -= self.flushes_in(lsn + 1, self.last_lsn());
        let keep = (lsn + 1 - self.chunks_lsn) as usize;
        let whole = keep / CHUNK;
        if whole < self.frozen.len() {
            // The new tail is the start of a frozen chunk.
            self.tail = self.frozen[whole].prefix(keep % CHUNK, CHUNK);
            self.frozen.truncate(whole);
        } else {
            self.tail.truncate(keep % CHUNK);
        }
        self.reverts.retain(|r| r.0 <= lsn);
        self.bookmarks.retain(|b| b.lsn <= lsn);
    }

    /// Forgets every record up to `base_lsn`, now folded into base.img.
    pub fn trim(&mut self, base_lsn: u64) {
        if base_lsn <= self.base_lsn {
            return;
        }
        self.flushes -= self.flushes_in(self.base_lsn + 1, base_lsn.min(self.last_lsn()));
        self.base_timestamp = self.timestamp(base_lsn);
        self.base_lsn = base_lsn;
        while self.chunks_lsn + CHUNK as u64 <= base_lsn + 1 && !self.frozen.is_empty() {
            self.frozen.pop_front();
            self.chunks_lsn += CHUNK as u64;
        }
        if self.frozen.is_empty() && self.last_lsn() == base_lsn {
            self.tail.truncate(0);
            self.chunks_lsn = base_lsn + 1;
        }
        self.reverts.retain(|r| r.0 > base_lsn);
        self.bookmarks.retain(|b| b.lsn > base_lsn);
    }
}

fn locate<'a>(
    chunks_lsn: u64,
    mut frozen: impl Iterator<Item = &'a Chunk>,
    tail: &Block,
    lsn: u64,
) -> Entry {
    let i = (lsn - chunks_lsn) as usize;
    match frozen.nth(i / CHUNK) {
        Some(chunk) => chunk.get(i % CHUNK),
        None => tail.get(i % CHUNK),
    }
}

/// The records base_lsn + 1 ..= upto at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    base_lsn: u64,
    chunks_lsn: u64,
    frozen: Vec<Chunk>,
    tail: Block,
    reverts: Vec<(u64, u64)>,
}

impl Snapshot {
    pub fn entry(&self, lsn: u64) -> Entry {
        locate(self.chunks_lsn, self.frozen.iter(), &self.tail, lsn)
    }

    /// The lsn whose state base.img held when the snapshot was taken.
    pub fn base_lsn(&self) -> u64 {
        self.base_lsn
    }

    /// Highest lsn the snapshot holds.
    pub fn last_lsn(&self) -> u64 {
        self.chunks_lsn + (self.frozen.len() * CHUNK + self.tail.len()) as u64 - 1
    }

    /// Adds the entry of lsn `last_lsn() + 1`: a branch's records after
    /// the journal's state they start from (volume/branch.rs).
    pub fn push(&mut self, entry: Entry) {
        if let Effect::Revert { to } = entry.effect {
            self.reverts.push((self.last_lsn() + 1, to));
        }
        self.tail.push(entry);
        if self.tail.len() == CHUNK {
            let full = std::mem::replace(&mut self.tail, Block::with_capacity(CHUNK));
            self.frozen.push(Frozen::memory(full));
        }
    }

    /// Inserts into the empty `map` where the disk's data is at lsn `upto`
    /// (base_lsn up to the snapshot's end); sectors it leaves out read from
    /// base.img.
    pub fn replay_into(&self, map: &ExtentMap, upto: u64) {
        self.replay_where(map, upto, &|_, _| true);
    }

    /// [`Snapshot::replay_into`] of only the records whose range
    /// (start, sectors) `keep` accepts.
    pub fn replay_where(&self, map: &ExtentMap, upto: u64, keep: &dyn Fn(u64, u64) -> bool) {
        let first = match self.reverts.iter().rev().find(|r| r.0 <= upto) {
            Some(&(lsn, to)) => {
                // Targets are always before the revert itself (checked
                // when it is written and when it is read back).
                self.replay_where(map, to.min(lsn - 1), keep);
                lsn + 1
            }
            None => self.base_lsn + 1,
        };
        for lsn in first..=upto {
            if let Effect::Data {
                start,
                sectors,
                target,
            } = self.entry(lsn).effect
            {
                if keep(start, sectors) {
                    map.insert(start, sectors, lsn, target);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent_map::{Pieces, Source};

    fn data(timestamp: u64, start: u64, segment: u32) -> Entry {
        Entry {
            timestamp,
            effect: Effect::Data {
                start,
                sectors: 1,
                target: Target::Journal { segment, sector: 1 },
            },
        }
    }

    #[test]
    fn finds_the_newest_lsn_at_or_before_a_time() {
        let mut t = RecordIndex::new(10, 50);
        assert_eq!(t.lsn_at(5), 10);
        for i in 0..10_000u64 {
            t.push(Entry {
                timestamp: 100 + i / 3 * 10, // runs of three equal timestamps
                effect: Effect::Flush,
            });
        }
        assert_eq!(t.bounds(), Some((100, 100 + 3333 * 10)));
        assert_eq!(t.lsn_at(99), 10);
        assert_eq!(t.lsn_at(100), 13);
        assert_eq!(t.lsn_at(109), 13);
        assert_eq!(t.lsn_at(110), 16);
        assert_eq!(t.lsn_at(u64::MAX), 10 + 10_000);
        assert_eq!(t.flushes(), 10_000);
    }

    #[test]
    fn trimming_keeps_lsns_and_times_of_what_remains() {
        let mut t = RecordIndex::new(0, 0);
        for i in 1..=10_000u64 {
            t.push(data(i * 10, i % 7, 1));
        }
        t.trim(5000);
        assert_eq!(t.base_lsn(), 5000);
        assert_eq!(t.timestamp(5000), 50_000);
        assert_eq!(t.timestamp(5001), 50_010);
        assert_eq!(t.lsn_at(60_000), 6000);
        assert_eq!(t.lsn_at(1), 5000);
        t.trim(10_000);
        assert_eq!(t.bounds(), None);
        assert_eq!(t.last_lsn(), 10_000);
        t.push(data(200_000, 0, 2));
        assert_eq!(t.last_lsn(), 10_001);
        assert_eq!(t.lsn_at(200_000), 10_001);
    }

    #[test]
    fn truncating_drops_what_follows_and_lsns_go_on_from_there() {
        let mut t = RecordIndex::new(0, 0);
        for i in 1..=10_000u64 {
            let effect = match i {
                9000 => Effect::Revert { to: 10 },
                _ if i % 10 == 0 => Effect::Flush,
                _ => data(0, i % 7, 1).effect,
            };
            t.push(Entry {
                timestamp: i,
                effect,
            });
            if i % 1000 == 0 {
                t.push_bookmark(format!("b{i}"), i, false);
            }
        }
        let last = t.last_lsn();
        for cut in [last, 9000, 8999, 4097, 4096, 4095, 5] {
            t.truncate(cut);
            assert_eq!(t.last_lsn(), cut);
            assert_eq!(t.lsn_at(u64::MAX), cut);
            assert!(t.bookmarks().iter().all(|b| b.lsn <= cut));
            assert!(t.reverts().iter().all(|r| r.0 <= cut));
            let flushes = (1..=cut).filter(|&l| t.effect(l) == Effect::Flush).count() as u64;
            assert_eq!(t.flushes(), flushes, "cut at {cut}");
        }
        assert_eq!(t.reverts(), &[] as &[(u64, u64)]);
        t.push(data(77, 3, 9));
        assert_eq!(t.last_lsn(), 6);
        assert_eq!(t.timestamp(6), 77);
        for i in 0..2 * CHUNK as u64 {
            t.push(data(100 + i, 0, 2));
        }
        assert_eq!(
            t.timestamp(6 + 2 * CHUNK as u64),
            100 + 2 * CHUNK as u64 - 1
        );
    }

    #[test]
    fn a_snapshot_grows_past_its_end_and_replays_through_reverts() {
        let mut t = RecordIndex::new(0, 0);
        for i in 1..=CHUNK as u64 + 3 {
            t.push(data(i, 0, 1));
        }
        let mut snap = t.snapshot(CHUNK as u64 - 2);
        let branch_first = snap.last_lsn() + 1;
        for _ in 0..CHUNK + 5 {
            snap.push(data(9, 1, 7));
        }
        snap.push(Entry {
            timestamp: 9,
            effect: Effect::Revert { to: 3 },
        });
        let last = snap.last_lsn();
        assert_eq!(last, CHUNK as u64 - 2 + CHUNK as u64 + 6);
        assert_eq!(snap.entry(branch_first).effect, data(0, 1, 7).effect);
        let source = |upto: u64, sector: u64| {
            let map = ExtentMap::new(4 * 512);
            snap.replay_into(&map, upto);
            let mut p = Pieces::new();
            map.lookup(sector, 1, &mut p);
            p[0].source
        };
        let seg = |segment| Source::Journal { segment, sector: 1 };
        assert_eq!(source(last - 1, 1), seg(7));
        assert_eq!(source(last, 0), seg(1));
        assert_eq!(source(last, 1), Source::Base, "reverted to lsn 3");
    }

    #[test]
    fn a_paged_index_reads_as_one_in_memory_and_frees_what_it_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let pages = PageFile::new(crate::storage::unnamed_file(dir.path()).unwrap());
        let mut memory = RecordIndex::new(0, 0);
        let mut paged = RecordIndex::new(0, 0);
        let entry = |i: u64| match i % 9 {
            0 => Entry {
                timestamp: i,
                effect: Effect::Flush,
            },
            _ => data(i, i % 1000, (i / 100) as u32),
        };
        // Entries of lsns `lsns`, made of `salt + lsn`.
        let push = |both: [&mut RecordIndex; 2], lsns: std::ops::RangeInclusive<u64>, salt| {
            for i in lsns {
                both[0].push(entry(salt + i));
                both[1].push(entry(salt + i));
            }
        };
        // Two chunks full before the page file, then three more after it.
        let n = 5 * CHUNK as u64 + 17;
        push([&mut memory, &mut paged], 1..=2 * CHUNK as u64 + 5, 0);
        paged.page_to(Arc::clone(&pages));
        assert_eq!(paged.unpaged_chunks(), 2);
        paged.page_out_now();
        assert_eq!((paged.unpaged_chunks(), pages.slots_in_use()), (0, 2));
        push([&mut memory, &mut paged], 2 * CHUNK as u64 + 6..=n, 0);
        assert_eq!(paged.unpaged_chunks(), 3, "paged out later, not by push");
        assert!(paged.to_page_out(4).is_none(), "fewer than asked for");
        let mut out = paged.to_page_out(1).expect("three chunks to page out");
        out.write();
        assert!(paged.page_out_now());
        // A page-out of chunks paged meanwhile changes nothing, and frees
        // the slots it wrote.
        assert_eq!(pages.slots_in_use(), 8);
        paged.paged_out(out);
        assert_eq!((paged.unpaged_chunks(), pages.slots_in_use()), (0, 5));
        assert!(paged
            .frozen
            .iter()
            .all(|c| matches!(c.place, Place::Paged(_))));
        let same = |a: &RecordIndex, b: &RecordIndex| {
            assert_eq!(a.last_lsn(), b.last_lsn());
            assert_eq!(a.flushes(), b.flushes());
            for lsn in a.base_lsn() + 1..=a.last_lsn() {
                assert_eq!(a.entry(lsn), b.entry(lsn), "lsn {lsn}");
            }
        };
        same(&memory, &paged);
        assert_eq!(paged.lsn_at(3 * CHUNK as u64), 3 * CHUNK as u64);
        // The snapshot shares chunk 3, which the cut below drops from the
        // index: its slot stays taken while the snapshot holds it.
        let snapshot = paged.snapshot(4 * CHUNK as u64 + 3);
        memory.truncate(3 * CHUNK as u64 + 10);
        paged.truncate(3 * CHUNK as u64 + 10);
        same(&memory, &paged);
        assert_eq!(pages.slots_in_use(), 4, "chunk 4 freed, chunk 3 held");
        // Entries other than those cut, in slots freed or new.
        let next = 3 * CHUNK as u64 + 11..=5 * CHUNK as u64;
        push([&mut memory, &mut paged], next, 1 << 30);
        paged.page_out_now();
        assert_eq!(
            pages.slots_in_use(),
            6,
            "chunks 0-2, the old 3, a new 3 and 4"
        );
        let shared = 3 * CHUNK as u64 + 100;
        assert_eq!(snapshot.entry(shared), entry(shared), "not overwritten");
        drop(snapshot);
        assert_eq!(pages.slots_in_use(), 5);
        same(&memory, &paged);
        // Folding frees the slots of the chunks it passes.
        memory.trim(2 * CHUNK as u64 + 1);
        paged.trim(2 * CHUNK as u64 + 1);
        same(&memory, &paged);
        assert_eq!(pages.slots_in_use(), 3);
        // Flushes counted by whole chunks agree with counting each entry,
        // after trims that end inside a chunk.
        for base in [
            2 * CHUNK as u64 + 700,
            3 * CHUNK as u64 + 1,
            4 * CHUNK as u64 - 3,
        ] {
            paged.trim(base);
            let each = (base + 1..=paged.last_lsn())
                .filter(|&l| paged.entry(l).effect == Effect::Flush)
                .count() as u64;
            assert_eq!(paged.flushes(), each, "after a trim to {base}");
        }
    }

    #[test]
    fn replay_follows_reverts() {
        let mut t = RecordIndex::new(0, 0);
        t.push(data(1, 0, 1)); // lsn 1: sector 0 <- segment 1
        t.push(data(2, 0, 2)); // lsn 2: sector 0 <- segment 2
        t.push(Entry {
            timestamp: 3,
            effect: Effect::Revert { to: 1 },
        }); // lsn 3: back to lsn 1
        t.push(data(4, 1, 4)); // lsn 4: sector 1 <- segment 4
        t.push(Entry {
            timestamp: 5,
            effect: Effect::Revert { to: 2 },
        }); // lsn 5: undo the revert: back to lsn 2
        let source = |upto: u64, sector: u64| {
            let map = ExtentMap::new(4 * 512);
            t.snapshot(upto).replay_into(&map, upto);
            let mut p = Pieces::new();
            map.lookup(sector, 1, &mut p);
            p[0].source
        };
        let seg = |segment| Source::Journal { segment, sector: 1 };
        assert_eq!(source(0, 0), Source::Base);
        assert_eq!(source(2, 0), seg(2));
        assert_eq!(source(3, 0), seg(1));
        assert_eq!(source(4, 1), seg(4));
        assert_eq!(source(5, 0), seg(2));
        assert_eq!(source(5, 1), Source::Base);
    }
}
