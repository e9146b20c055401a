//! One shard of the extent map: its extents, sorted by start, in a two-level
//! layout built for lookups whose nodes are not in the CPU cache.
//!
//! A read looks up a random extent and then copies 4 KiB of page cache,
//! which evicts most of the map between lookups. A B-tree descent then
//! misses the cache at every level, one miss after the other (std's
//! BTreeMap: 280 ns a lookup between reads, 77 ns without them). Here a
//! lookup searches the shard's directory (the first start of every leaf,
//! small and read by every lookup in the shard), then prefetches the one
//! leaf it names as a whole, so that the leaf's cache lines load in
//! parallel: about 120 ns between reads (timed around each lookup in a
//! build of `cargo bench -p rewind-journal -- reads`; BENCHMARKS.md).
//!
//! Invariants:
//! - `firsts[i] == leaves[i].starts[0]`, and `firsts` is strictly increasing;
//! - no leaf is empty; a leaf's starts are strictly increasing and its
//!   unused slots hold [`UNUSED`], so a search needs no length;
//! - starts are sector offsets from the shard's `base`, below `u32::MAX`.

use super::Extent;

/// Extents per leaf: their starts fill 4 cache lines, the whole leaf 24.
const LEAF: usize = 64;
/// A leaf this small is merged into a neighbour that has room.
const MERGE_BELOW: usize = LEAF / 8;
/// The start of an unused slot: above every real start.
const UNUSED: u32 = u32::MAX;

#[derive(Debug)]
#[repr(C, align(64))]
struct Leaf {
    starts: [u32; LEAF],
    extents: [Extent; LEAF],
}

impl Leaf {
    fn empty() -> Box<Leaf> {
        Box::new(Leaf {
            starts: [UNUSED; LEAF],
            extents: [Extent::NONE; LEAF],
        })
    }

    /// A leaf with one extent.
    fn holding(start: u32, extent: Extent) -> Box<Leaf> {
        let mut leaf = Leaf::empty();
        leaf.insert_at(0, start, extent);
        leaf
    }

    fn len(&self) -> usize {
        self.starts.partition_point(|&s| s != UNUSED)
    }

    /// Asks the CPU to load the whole leaf: its cache lines then arrive
    /// together, where the search and the read of the extent found would
    /// wait for them one after the other.
    fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let leaf = (self as *const Leaf).cast::<i8>();
            for offset in (0..std::mem::size_of::<Leaf>()).step_by(64) {
                // SAFETY: a prefetch is a hint that cannot fault, and
                // `offset` stays inside this leaf; SSE is part of x86_64.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(leaf.wrapping_add(offset)) };
            }
        }
    }

    /// Slots holding a start below `key`.
    fn below(&self, key: u32) -> usize {
        self.starts.partition_point(|&s| s < key)
    }

    fn insert_at(&mut self, at: usize, start: u32, extent: Extent) {
        let len = self.len();
        self.starts.copy_within(at..len, at + 1);
        self.extents.copy_within(at..len, at + 1);
        self.starts[at] = start;
        self.extents[at] = extent;
    }

    fn remove_at(&mut self, at: usize) {
        let len = self.len();
        self.starts.copy_within(at + 1..len, at);
        self.extents.copy_within(at + 1..len, at);
        self.starts[len - 1] = UNUSED;
    }

    /// Moves the upper half into a new leaf.
    fn split(&mut self) -> Box<Leaf> {
        let mut upper = Leaf::empty();
        let half = LEAF / 2;
        upper.starts[..LEAF - half].copy_from_slice(&self.starts[half..]);
        upper.extents[..LEAF - half].copy_from_slice(&self.extents[half..]);
        self.starts[half..].fill(UNUSED);
        upper
    }

    /// Appends `other`'s entries, which all start after this leaf's.
    fn absorb(&mut self, other: &Leaf) {
        let (len, more) = (self.len(), other.len());
        self.starts[len..len + more].copy_from_slice(&other.starts[..more]);
        self.extents[len..len + more].copy_from_slice(&other.extents[..more]);
    }
}

#[derive(Debug)]
pub(super) struct Shard {
    /// The first sector of the shard; starts are kept relative to it.
    base: u64,
    firsts: Vec<u32>,
    #[allow(clippy::vec_box, reason = "a split moves pointers, not 1.8 KiB leaves")]
    leaves: Vec<Box<Leaf>>,
}

impl Shard {
    /// An empty shard starting at sector `base`; it must span fewer than
    /// `u32::MAX` sectors.
    pub(super) fn new(base: u64) -> Self {
        Shard {
            base,
            firsts: Vec::new(),
            leaves: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.leaves.iter().map(|leaf| leaf.len()).sum()
    }

    /// A relative start; `start` lies in the shard.
    fn key(&self, start: u64) -> u32 {
        (start - self.base) as u32
    }

    /// The leaf that holds, or would hold, `key`.
    fn leaf_for(&self, key: u32) -> usize {
        self.firsts.partition_point(|&f| f <= key).saturating_sub(1)
    }

    /// Adds an extent at `start`, where none starts yet.
    pub(super) fn insert(&mut self, start: u64, extent: Extent) {
        let key = self.key(start);
        if self.leaves.is_empty() {
            self.firsts.push(key);
            self.leaves.push(Leaf::holding(key, extent));
            return;
        }
        let mut i = self.leaf_for(key);
        if self.leaves[i].len() == LEAF && key > self.leaves[i].starts[LEAF - 1] {
            if self.leaves.get(i + 1).is_some_and(|next| next.len() < LEAF) {
                // The front of the next leaf, which has room.
                i += 1;
            } else {
                // Past a full leaf's end, as sequential writes come: a new
                // leaf, so that such runs leave full leaves behind.
                self.firsts.insert(i + 1, key);
                self.leaves.insert(i + 1, Leaf::holding(key, extent));
                return;
            }
        } else if self.leaves[i].len() == LEAF && !self.shift_out(i) {
            let upper = self.leaves[i].split();
            self.firsts.insert(i + 1, upper.starts[0]);
            self.leaves.insert(i + 1, upper);
            if key >= self.firsts[i + 1] {
                i += 1;
            }
        }
        let leaf = &mut self.leaves[i];
        let at = leaf.below(key);
        debug_assert!(
            leaf.starts[at] != key,
            "an extent already starts at {start}"
        );
        leaf.insert_at(at, key, extent);
        self.firsts[i] = leaf.starts[0];
    }

    /// Moves an end extent of the full leaf `i`, which is to take a key
    /// between its first and last start, into a neighbour with room, if
    /// one has: leaves then fill up before they split, and hold more
    /// extents each (random inserts: 41 bytes an extent with splits alone).
    /// Either way the key still belongs in leaf `i`.
    fn shift_out(&mut self, i: usize) -> bool {
        if self.leaves.get(i + 1).is_some_and(|next| next.len() < LEAF) {
            let (start, x) = (
                self.leaves[i].starts[LEAF - 1],
                self.leaves[i].extents[LEAF - 1],
            );
            self.leaves[i].remove_at(LEAF - 1);
            self.leaves[i + 1].insert_at(0, start, x);
            self.firsts[i + 1] = start;
            return true;
        }
        if i > 0 && self.leaves[i - 1].len() < LEAF {
            let (start, x) = (self.leaves[i].starts[0], self.leaves[i].extents[0]);
            self.leaves[i].remove_at(0);
            let len = self.leaves[i - 1].len();
            self.leaves[i - 1].insert_at(len, start, x);
            // The key goes first in leaf `i` or after its new first start;
            // the caller sets `firsts[i]` once it is in.
            self.firsts[i] = self.leaves[i].starts[0];
            return true;
        }
        false
    }

    /// Removes the extent starting at `start`, which must exist.
    pub(super) fn remove(&mut self, start: u64) {
        let key = self.key(start);
        let i = self.leaf_for(key);
        let Some(leaf) = self.leaves.get_mut(i) else {
            return;
        };
        let at = leaf.below(key);
        if leaf.starts.get(at) != Some(&key) {
            debug_assert!(false, "no extent starts at {start}");
            return;
        }
        leaf.remove_at(at);
        let len = leaf.len();
        if len == 0 {
            self.firsts.remove(i);
            self.leaves.remove(i);
            return;
        }
        self.firsts[i] = leaf.starts[0];
        if len < MERGE_BELOW {
            self.merge_small(i, len);
        }
    }

    /// Merges the small leaf `i` into a neighbour with room for it.
    fn merge_small(&mut self, i: usize, len: usize) {
        if i > 0 && self.leaves[i - 1].len() + len <= LEAF {
            let small = self.leaves.remove(i);
            self.firsts.remove(i);
            self.leaves[i - 1].absorb(&small);
        } else if i + 1 < self.leaves.len() && self.leaves[i + 1].len() + len <= LEAF {
            let next = self.leaves.remove(i + 1);
            self.firsts.remove(i + 1);
            self.leaves[i].absorb(&next);
        }
    }

    /// The extents starting before `end`, from the last one backwards.
    pub(super) fn before(&self, end: u64) -> Before<'_> {
        let key = u32::try_from(end - self.base).unwrap_or(UNUSED);
        let leaf = self.firsts.partition_point(|&f| f < key);
        let at = match leaf.checked_sub(1) {
            Some(i) => {
                let found = &self.leaves[i];
                found.prefetch();
                found.below(key)
            }
            None => 0,
        };
        Before {
            shard: self,
            leaf,
            at,
        }
    }

    /// Every extent, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, Extent)> + '_ {
        self.leaves.iter().flat_map(move |leaf| {
            let len = leaf.len();
            leaf.starts[..len]
                .iter()
                .zip(&leaf.extents[..len])
                .map(move |(&s, &x)| (self.base + u64::from(s), x))
        })
    }

    /// Keeps the extents `keep` accepts, packed into full leaves.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Extent) -> bool) {
        let kept: Vec<(u64, Extent)> = self.iter().filter(|(_, x)| keep(x)).collect();
        self.firsts.clear();
        self.leaves.clear();
        for chunk in kept.chunks(LEAF) {
            let mut leaf = Leaf::empty();
            for (slot, &(start, x)) in chunk.iter().enumerate() {
                leaf.starts[slot] = self.key(start);
                leaf.extents[slot] = x;
            }
            self.firsts.push(leaf.starts[0]);
            self.leaves.push(leaf);
        }
    }
}

/// Walks a shard's extents backwards from a position; see [`Shard::before`].
#[derive(Debug)]
pub(super) struct Before<'a> {
    shard: &'a Shard,
    /// One past the leaf being walked.
    leaf: usize,
    /// One past the next slot to yield in that leaf.
    at: usize,
}

impl Iterator for Before<'_> {
    type Item = (u64, Extent);

    fn next(&mut self) -> Option<(u64, Extent)> {
        while self.at == 0 {
            self.leaf = self.leaf.checked_sub(1)?;
            self.at = match self.leaf.checked_sub(1) {
                Some(i) => self.shard.leaves[i].len(),
                None => return None,
            };
        }
        let leaf = &self.shard.leaves[self.leaf - 1];
        self.at -= 1;
        let start = self.shard.base + u64::from(leaf.starts[self.at]);
        Some((start, leaf.extents[self.at]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent_map::Target;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn extent(n: u64) -> Extent {
        Extent::new(1, n, Target::Zero)
    }

    fn check(shard: &Shard, model: &BTreeMap<u64, u64>) -> Result<(), TestCaseError> {
        let all: Vec<(u64, u64)> = shard.iter().map(|(s, x)| (s, x.lsn())).collect();
        let want: Vec<(u64, u64)> = model.iter().map(|(&s, &l)| (s, l)).collect();
        prop_assert_eq!(&all, &want);
        prop_assert_eq!(shard.len(), model.len());
        for (i, leaf) in shard.leaves.iter().enumerate() {
            prop_assert!(leaf.len() > 0);
            prop_assert_eq!(shard.firsts[i], leaf.starts[0]);
        }
        Ok(())
    }

    proptest! {
        /// Inserts, removes, walks and retains against a BTreeMap, with
        /// enough extents for leaves to split and merge.
        #[test]
        fn behaves_like_a_sorted_map(
            ops in prop::collection::vec((any::<bool>(), 0u64..3000), 1..1500),
            probes in prop::collection::vec(1000u64..4001, 1..20),
            cut in 0u64..1500,
        ) {
            let base = 1000;
            let mut shard = Shard::new(base);
            let mut model = BTreeMap::new();
            for (i, &(add, at)) in ops.iter().enumerate() {
                let start = base + at;
                match (add, model.contains_key(&start)) {
                    (true, false) => {
                        shard.insert(start, extent(i as u64));
                        model.insert(start, i as u64);
                    }
                    (false, true) => {
                        shard.remove(start);
                        model.remove(&start);
                    }
                    _ => {}
                }
            }
            check(&shard, &model)?;
            for end in probes {
                let got: Vec<u64> = shard.before(end).map(|(s, _)| s).collect();
                let want: Vec<u64> = model.range(..end).rev().map(|(&s, _)| s).collect();
                prop_assert_eq!(got, want);
            }
            shard.retain(|x| x.lsn() >= cut);
            model.retain(|_, &mut l| l >= cut);
            check(&shard, &model)?;
        }
    }

    #[test]
    fn leaves_split_when_full_and_merge_when_small() {
        let mut shard = Shard::new(0);
        let n = LEAF as u64 * 4;
        for s in 0..n {
            shard.insert(s * 2, extent(s));
        }
        assert_eq!(shard.leaves.len(), 4, "ascending inserts fill their leaves");
        shard.insert(3, extent(0));
        assert_eq!(
            shard.leaves.len(),
            5,
            "an insert into a full leaf splits it"
        );
        assert_eq!(shard.leaves[0].len(), LEAF / 2 + 1);
        for s in 1..n {
            shard.remove(s * 2);
        }
        assert_eq!(shard.leaves.len(), 1, "small leaves merge");
        let left: Vec<u64> = shard.before(u64::from(u32::MAX)).map(|(s, _)| s).collect();
        assert_eq!(left, [3, 0]);
    }

    #[test]
    fn a_full_leaf_passes_an_end_extent_to_a_neighbour_with_room() {
        let mut shard = Shard::new(0);
        // Leaves of 64, 64 and 1 extents: starts 0, 10, .. 1280.
        for s in 0..=2 * LEAF as u64 {
            shard.insert(s * 10, extent(s));
        }
        let lens = |shard: &Shard| shard.leaves.iter().map(|l| l.len()).collect::<Vec<_>>();
        assert_eq!(lens(&shard), [LEAF, LEAF, 1]);
        // Into the full middle leaf: its last extent (1270) moves right.
        shard.insert(645, extent(0));
        assert_eq!(lens(&shard), [LEAF, LEAF, 2]);
        // Past the end of a full leaf: the front of the next, with room.
        shard.insert(1265, extent(0));
        assert_eq!(lens(&shard), [LEAF, LEAF, 3]);
        assert_eq!(shard.firsts[2], 1265);
        // Room only to the left: the middle leaf's first extent moves there.
        for s in 0..LEAF as u64 - 3 {
            shard.insert(100_000 + s, extent(0));
        }
        shard.remove(0);
        assert_eq!(lens(&shard), [LEAF - 1, LEAF, LEAF]);
        shard.insert(647, extent(0));
        assert_eq!(lens(&shard), [LEAF, LEAF, LEAF]);
        assert_eq!(shard.firsts[1], 645);
        let starts: Vec<u64> = shard.iter().map(|(s, _)| s).collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]));
        for (i, leaf) in shard.leaves.iter().enumerate() {
            assert_eq!(shard.firsts[i], leaf.starts[0]);
        }
        // No room anywhere: a split.
        shard.insert(1, extent(0));
        assert_eq!(shard.leaves.len(), 4);
    }
}
