//! The live disk's extent map: for every sector range, where its newest data is.
//!
//! Invariants:
//! - extents in a shard never overlap and never cross the shard's bounds;
//! - a sector not covered by any extent reads from base.img;
//! - an extent only ever replaces data with a lower lsn, so concurrent
//!   writers may update the map in any order and the newest record wins,
//!   exactly as recovery (which replays in lsn order) rebuilds it.
//!
//! The disk is cut into contiguous shards, each behind its own RwLock, so
//! readers never block each other and writers to different regions do not
//! contend. Locks are held only for the in-memory update, never across IO.
//! [`shard`] says how a shard lays out its extents.

mod shard;

use std::ops::Range;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use smallvec::SmallVec;

use shard::Shard;

use crate::format::SECTOR;

/// Where an extent's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Reads as zeroes (write-zeroes or discard).
    Zero,
    /// In segment file `segment`, starting at sector `sector` of that file.
    Journal { segment: u32, sector: u32 },
}

impl Target {
    /// The target of the sector `sectors` further on.
    pub fn advanced(self, sectors: u64) -> Target {
        match self {
            Target::Zero => Target::Zero,
            Target::Journal { segment, sector } => Target::Journal {
                segment,
                // Extents never outgrow their segment, which is at most 1 GiB.
                sector: sector + sectors as u32,
            },
        }
    }
}

/// Where a read of a range goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Base,
    Zero,
    Journal { segment: u32, sector: u32 },
}

impl Source {
    /// The source of the sector `sectors` further on.
    pub fn advanced(self, sectors: u64) -> Source {
        match self {
            Source::Journal { segment, sector } => Source::Journal {
                segment,
                // Pieces never outgrow their segment, which is at most 1 GiB.
                sector: sector + sectors as u32,
            },
            other => other,
        }
    }
}

/// A run of sectors with one source, as returned by [`ExtentMap::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub sectors: u64,
    pub source: Source,
}

/// The pieces of one lookup; a typical read has one or two.
pub type Pieces = SmallVec<[Piece; 4]>;

/// An extent and the lsn of the record that wrote it, as a checkpoint
/// keeps the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub start: u64,
    pub sectors: u64,
    pub lsn: u64,
    pub target: Target,
}

/// 20 bytes; with its 4-byte start a map entry is 24 bytes in a full leaf.
/// `len` is the length less one (extents are never empty and span at most
/// a shard, `MAX_SHARD_SECTORS`, so it fits in 31 bits), with
/// `IN_JOURNAL` set for a journal target; `segment` and `sector` are that
/// target's, and zero for [`Target::Zero`]. Packed to 4 bytes so that the
/// lsn does not pad it to 24.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct Extent {
    lsn: u64,
    len: u32,
    segment: u32,
    sector: u32,
}

/// The flag of a journal target in [`Extent`]'s `len`.
const IN_JOURNAL: u32 = 1 << 31;

impl Extent {
    /// What unused leaf slots hold.
    const NONE: Extent = Extent {
        lsn: 0,
        len: 0,
        segment: 0,
        sector: 0,
    };

    /// `sectors` (1..=MAX_SHARD_SECTORS) holding `target`, written at `lsn`.
    fn new(sectors: u64, lsn: u64, target: Target) -> Extent {
        debug_assert!((1..=MAX_SHARD_SECTORS).contains(&sectors));
        let len = (sectors - 1) as u32;
        let (len, segment, sector) = match target {
            Target::Zero => (len, 0, 0),
            Target::Journal { segment, sector } => (len | IN_JOURNAL, segment, sector),
        };
        Extent {
            lsn,
            len,
            segment,
            sector,
        }
    }

    fn sectors(self) -> u64 {
        u64::from(self.len & !IN_JOURNAL) + 1
    }

    fn lsn(self) -> u64 {
        self.lsn
    }

    fn target(self) -> Target {
        if self.len & IN_JOURNAL == 0 {
            Target::Zero
        } else {
            Target::Journal {
                segment: self.segment,
                sector: self.sector,
            }
        }
    }
}

#[derive(Debug)]
pub struct ExtentMap {
    shards: Box<[RwLock<Shard>]>,
    shard_sectors: u64,
    total_sectors: u64,
}

const SHARDS: u64 = 64;
const MIN_SHARD_SECTORS: u64 = 2048;
/// Shards keep starts and lengths in u32: huge disks get more shards.
const MAX_SHARD_SECTORS: u64 = 1 << 31;

fn read(s: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    s.read().unwrap_or_else(|e| e.into_inner())
}

fn write(s: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    s.write().unwrap_or_else(|e| e.into_inner())
}

impl ExtentMap {
    pub fn new(disk_bytes: u64) -> Self {
        let total_sectors = disk_bytes / SECTOR;
        let shard_sectors = total_sectors
            .div_ceil(SHARDS)
            .clamp(MIN_SHARD_SECTORS, MAX_SHARD_SECTORS);
        let count = total_sectors.div_ceil(shard_sectors).max(1);
        ExtentMap {
            shards: (0..count)
                .map(|i| RwLock::new(Shard::new(i * shard_sectors)))
                .collect(),
            shard_sectors,
            total_sectors,
        }
    }

    /// Calls `f(shard, start, sectors)` for each shard-bounded part of a range.
    fn split(&self, start: u64, sectors: u64, mut f: impl FnMut(&RwLock<Shard>, u64, u64)) {
        let end = start.saturating_add(sectors).min(self.total_sectors);
        let mut at = start;
        while at < end {
            let index = at / self.shard_sectors;
            let part_end = ((index + 1) * self.shard_sectors).min(end);
            f(&self.shards[index as usize], at, part_end - at);
            at = part_end;
        }
    }

    /// Records that `[start, start + sectors)` now holds `target`, written at
    /// `lsn`. Parts already holding newer data (higher lsn) keep it.
    pub fn insert(&self, start: u64, sectors: u64, lsn: u64, target: Target) {
        self.split(start, sectors, |shard, s, n| {
            insert_in_shard(&mut write(shard), s, s + n, lsn, target.advanced(s - start));
        });
    }

    /// [`ExtentMap::insert`] of only the part in `shards` (shards are
    /// independent), so that threads loading into different shards never
    /// contend.
    fn insert_in(&self, shards: &Range<usize>, start: u64, sectors: u64, lsn: u64, target: Target) {
        let from = start.max(shards.start as u64 * self.shard_sectors);
        let to = start
            .saturating_add(sectors)
            .min(shards.end as u64 * self.shard_sectors);
        if from < to {
            self.insert(from, to - from, lsn, target.advanced(from - start));
        }
    }

    /// Appends to `out` the pieces covering `[start, start + sectors)` in order.
    pub fn lookup(&self, start: u64, sectors: u64, out: &mut Pieces) {
        self.split(start, sectors, |shard, s, n| {
            lookup_in_shard(&read(shard), s, s + n, out);
        });
    }

    /// Forgets every extent written at or before `lsn`: base.img now holds
    /// that data, so those sectors read from there.
    pub fn remove_upto(&self, lsn: u64) {
        for shard in self.shards.iter() {
            write(shard).retain(|x| x.lsn() > lsn);
        }
    }

    /// Replaces the content with `other`'s (a map of the same disk), one
    /// shard at a time.
    pub fn replace_with(&self, other: ExtentMap) {
        for (mine, theirs) in self.shards.iter().zip(other.shards.into_vec()) {
            *write(mine) = theirs.into_inner().unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Calls `f(start, sectors, target)` for every extent, in disk order.
    pub fn for_each(&self, mut f: impl FnMut(u64, u64, Target)) {
        for shard in self.shards.iter() {
            for (start, x) in read(shard).iter() {
                f(start, x.sectors(), x.target());
            }
        }
    }

    /// Every extent with its lsn, in disk order. Each shard is read at one
    /// moment; writers to the others go on meanwhile.
    pub fn written(&self) -> Vec<Written> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = read(shard);
            out.reserve(shard.len());
            out.extend(shard.iter().map(|(start, x)| Written {
                start,
                sectors: x.sectors(),
                lsn: x.lsn(),
                target: x.target(),
            }));
        }
        out
    }

    /// Inserts `extents` (sorted by start, not overlapping) on up to
    /// `threads` threads, each into its own shards.
    pub fn load(&self, extents: &[Written], threads: usize) {
        let shards = self.shards.len();
        let threads = threads.clamp(1, shards);
        let part = |i: usize| {
            let first = (shards * i / threads) as u64 * self.shard_sectors;
            let end = (shards * (i + 1) / threads) as u64 * self.shard_sectors;
            (first..end, shards * i / threads..shards * (i + 1) / threads)
        };
        let fill = |i: usize| {
            let (sectors, shards) = part(i);
            // Sorted by start: those starting before the part's end, from
            // the first that ends after its start.
            let from = extents.partition_point(|x| x.start + x.sectors <= sectors.start);
            for x in &extents[from..] {
                if x.start >= sectors.end {
                    break;
                }
                self.insert_in(&shards, x.start, x.sectors, x.lsn, x.target);
            }
        };
        std::thread::scope(|scope| {
            for i in 1..threads {
                scope.spawn(move || fill(i));
            }
            fill(0);
        });
    }

    /// Sectors of the disk.
    pub fn sectors(&self) -> u64 {
        self.total_sectors
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Extents of `map` overlapping `[s, e)`, by start. Extents do not overlap,
/// so walking back from the last one starting before `e` finds them all
/// with a single search.
fn overlapping(map: &Shard, s: u64, e: u64) -> SmallVec<[(u64, Extent); 4]> {
    let mut found: SmallVec<[(u64, Extent); 4]> = map
        .before(e)
        .take_while(|&(k, x)| k + x.sectors() > s)
        .collect();
    found.reverse();
    found
}

fn put(map: &mut Shard, start: u64, end: u64, lsn: u64, target: Target) {
    // Within one shard, which spans at most MAX_SHARD_SECTORS.
    map.insert(start, Extent::new(end - start, lsn, target));
}

fn insert_in_shard(map: &mut Shard, s: u64, e: u64, lsn: u64, target: Target) {
    let mut cursor = s; // new data goes in [cursor, next newer extent)
    for (k, x) in overlapping(map, s, e) {
        let xe = k + x.sectors();
        if x.lsn() > lsn {
            // Newer data stays; the new range flows around it.
            let xs = k.max(s);
            if cursor < xs {
                put(map, cursor, xs, lsn, target.advanced(cursor - s));
            }
            cursor = xe.min(e);
            continue;
        }
        map.remove(k);
        if k < s {
            put(map, k, s, x.lsn(), x.target());
        }
        if xe > e {
            put(map, e, xe, x.lsn(), x.target().advanced(e - k));
        }
    }
    if cursor < e {
        put(map, cursor, e, lsn, target.advanced(cursor - s));
    }
}

fn lookup_in_shard(map: &Shard, s: u64, e: u64, out: &mut Pieces) {
    // Walk back from the last extent starting before `e` (one search),
    // pushing pieces in reverse, then put them in order.
    let first = out.len();
    let mut at = e; // everything in [at, e) is covered
    for (k, x) in map.before(e) {
        let xe = k + x.sectors();
        if xe <= s {
            break;
        }
        let (xs, pe) = (k.max(s), xe.min(e));
        if pe < at {
            out.push(Piece {
                start: pe,
                sectors: at - pe,
                source: Source::Base,
            });
        }
        let source = match x.target().advanced(xs - k) {
            Target::Zero => Source::Zero,
            Target::Journal { segment, sector } => Source::Journal { segment, sector },
        };
        out.push(Piece {
            start: xs,
            sectors: pe - xs,
            source,
        });
        at = xs;
    }
    if s < at {
        out.push(Piece {
            start: s,
            sectors: at - s,
            source: Source::Base,
        });
    }
    out[first..].reverse();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Per sector: (lsn, what a read returns, as (segment, sector) or zero/base).
    fn model_apply(model: &mut [(u64, Source)], start: u64, n: u64, lsn: u64, t: Target) {
        for i in start..(start + n).min(model.len() as u64) {
            let slot = &mut model[i as usize];
            if slot.0 < lsn {
                *slot = (
                    lsn,
                    match t.advanced(i - start) {
                        Target::Zero => Source::Zero,
                        Target::Journal { segment, sector } => Source::Journal { segment, sector },
                    },
                );
            }
        }
    }

    fn flatten(pieces: &[Piece]) -> Vec<Source> {
        let mut v = Vec::new();
        for p in pieces {
            for i in 0..p.sectors {
                v.push(match p.source {
                    Source::Journal { segment, sector } => Source::Journal {
                        segment,
                        sector: sector + i as u32,
                    },
                    other => other,
                });
            }
        }
        v
    }

    proptest! {
        #[test]
        fn matches_a_per_sector_model(
            ops in prop::collection::vec((0u64..6000, 1u64..900, any::<bool>()), 1..60),
            rotation in 0u64..1009,
            probe in (0u64..6000, 1u64..3000),
        ) {
            // 6000 sectors over several shards (2048 sectors each).
            let map = ExtentMap::new(6000 * SECTOR);
            let mut model = vec![(0u64, Source::Base); 6000];
            // Distinct lsns arriving out of order, as from concurrent writers.
            for (i, &(start, n, zero)) in ops.iter().enumerate() {
                let lsn = 1 + (i as u64 * 7919 + rotation) % 1009;
                let t = if zero { Target::Zero } else { Target::Journal { segment: i as u32, sector: 1 } };
                map.insert(start, n, lsn, t);
                model_apply(&mut model, start, n, lsn, t);
            }
            let (s, n) = probe;
            let e = (s + n).min(6000);
            let mut pieces = Pieces::new();
            map.lookup(s, n, &mut pieces);
            let want: Vec<Source> = model[s as usize..e as usize].iter().map(|x| x.1).collect();
            prop_assert_eq!(flatten(&pieces), want);
            let mut at = s;
            for p in &pieces {
                prop_assert_eq!(p.start, at);
                at += p.sectors;
            }
        }
    }

    #[test]
    fn extents_keep_their_fields_at_the_edges() {
        let targets = [
            Target::Zero,
            Target::Journal {
                segment: 0,
                sector: 0,
            },
            Target::Journal {
                segment: u32::MAX,
                sector: u32::MAX,
            },
        ];
        for target in targets {
            for sectors in [1, 2, MAX_SHARD_SECTORS - 1, MAX_SHARD_SECTORS] {
                for lsn in [0, 1, u64::MAX] {
                    let x = Extent::new(sectors, lsn, target);
                    assert_eq!((x.sectors(), x.lsn(), x.target()), (sectors, lsn, target));
                }
            }
        }
        assert_eq!(std::mem::size_of::<Extent>(), 20);
        // A whole shard of a disk large enough for the biggest shards.
        let map = ExtentMap::new(SHARDS * MAX_SHARD_SECTORS * SECTOR);
        assert_eq!(map.shard_sectors, MAX_SHARD_SECTORS);
        map.insert(MAX_SHARD_SECTORS, MAX_SHARD_SECTORS, u64::MAX, targets[2]);
        assert_eq!(
            map.written(),
            [Written {
                start: MAX_SHARD_SECTORS,
                sectors: MAX_SHARD_SECTORS,
                lsn: u64::MAX,
                target: targets[2],
            }]
        );
    }

    #[test]
    fn a_loaded_copy_is_the_same_map() {
        let map = ExtentMap::new(64 * 2048 * SECTOR);
        for i in 1..2000u64 {
            let target = match i % 3 {
                0 => Target::Zero,
                _ => Target::Journal {
                    segment: i as u32,
                    sector: 8,
                },
            };
            map.insert((i * 7919) % (64 * 2048), 1 + i % 3000, i, target);
        }
        let copy = map.written();
        assert!(copy
            .windows(2)
            .all(|w| w[0].start + w[0].sectors <= w[1].start));
        for threads in [1, 2, 5] {
            let loaded = ExtentMap::new(64 * 2048 * SECTOR);
            loaded.load(&copy, threads);
            assert_eq!(loaded.written(), copy, "{threads} threads");
        }
    }

    #[test]
    fn overwrites_replace_and_split_extents() {
        let map = ExtentMap::new(1 << 20);
        map.insert(
            0,
            100,
            1,
            Target::Journal {
                segment: 1,
                sector: 1,
            },
        );
        map.insert(10, 10, 2, Target::Zero);
        let mut out = Pieces::new();
        map.lookup(0, 120, &mut out);
        assert_eq!(
            out.as_slice(),
            &[
                Piece {
                    start: 0,
                    sectors: 10,
                    source: Source::Journal {
                        segment: 1,
                        sector: 1
                    }
                },
                Piece {
                    start: 10,
                    sectors: 10,
                    source: Source::Zero
                },
                Piece {
                    start: 20,
                    sectors: 80,
                    source: Source::Journal {
                        segment: 1,
                        sector: 21
                    }
                },
                Piece {
                    start: 100,
                    sectors: 20,
                    source: Source::Base
                },
            ]
        );
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn a_huge_disk_keeps_exact_extents_past_u32_sectors() {
        // 100 TiB: more than 64 shards, so each fits u32 starts.
        let sectors = (100u64 << 40) / SECTOR;
        let map = ExtentMap::new(sectors * SECTOR);
        assert!(map.shards.len() > SHARDS as usize);
        let whole = Target::Journal {
            segment: 3,
            sector: 8,
        };
        // The whole disk discarded, then one write across a shard boundary.
        map.insert(0, sectors, 1, Target::Zero);
        let boundary = map.shard_sectors * 40;
        map.insert(boundary - 4, 8, 2, whole);
        let mut out = Pieces::new();
        map.lookup(boundary - 8, 16, &mut out);
        let want = [
            (boundary - 8, 4, Source::Zero),
            (
                boundary - 4,
                4,
                Source::Journal {
                    segment: 3,
                    sector: 8,
                },
            ),
            (
                boundary,
                4,
                Source::Journal {
                    segment: 3,
                    sector: 12,
                },
            ),
            (boundary + 4, 4, Source::Zero),
        ];
        let got: Vec<_> = out.iter().map(|p| (p.start, p.sectors, p.source)).collect();
        assert_eq!(got, want);
        out.clear();
        map.lookup(sectors - 1, 1, &mut out);
        assert_eq!(out[0].source, Source::Zero);
    }

    #[test]
    fn older_data_never_replaces_newer() {
        let map = ExtentMap::new(1 << 20);
        map.insert(10, 10, 5, Target::Zero);
        map.insert(
            0,
            30,
            4,
            Target::Journal {
                segment: 2,
                sector: 1,
            },
        );
        let mut out = Pieces::new();
        map.lookup(0, 30, &mut out);
        assert_eq!(
            out[1],
            Piece {
                start: 10,
                sectors: 10,
                source: Source::Zero
            }
        );
        assert_eq!(
            out[2],
            Piece {
                start: 20,
                sectors: 10,
                source: Source::Journal {
                    segment: 2,
                    sector: 21
                }
            }
        );
    }
}
