//! A chunk of the record index, kept as compact columns: about 20 bytes a
//! record instead of the 40 of an [`Entry`].
//!
//! - Times: a delta in u32 (4.29 s of nanoseconds) against the first time
//!   of its run of 256 slots (each run's base a u64): narrow as long as 256
//!   records come within 4.29 s, about 60 a second; a block whose times
//!   spread further, or go back (only data from a damaged disk could),
//!   turns wide, a u64 each, and stays so.
//! - Effects: 16 bytes each ([`Packed`]); an effect too large for that
//!   (a disk past 512 TiB, a write past 1 GiB) is kept whole in `spilled`,
//!   which the packed slot points into.
//!
//! - A full block paged to a file (pages.rs) is encoded wide: 24 bytes a
//!   record, in the page cache rather than the heap.
//!
//! Invariants: `times` and `effects` have the same length; `spilled` holds
//! the effects of the slots whose kind is `SPILLED`, in slot order, and
//! such a slot's second word is its position in `spilled`.

use super::{Effect, Entry};
use crate::extent_map::Target;

const MARK: u64 = 0;
const FLUSH: u64 = 1;
const ZERO: u64 = 2;
const JOURNAL: u64 = 3;
const REVERT: u64 = 4;
const SPILLED: u64 = 5;
const KIND_BITS: u32 = 3;
/// A journal write's length in sectors: below 2^21 (1 GiB).
const SECTORS_BITS: u32 = 21;
/// A journal write's first disk sector: below 2^40 (512 TiB).
const START_BITS: u32 = 64 - KIND_BITS - SECTORS_BITS;
/// A zero range's first disk sector: below 2^61.
const ZERO_START_BITS: u32 = 64 - KIND_BITS;

/// One effect in two words; the kind in the low bits of the first.
/// - Mark, Flush: nothing else;
/// - Zero: start above the kind; sectors in the second word;
/// - Journal: sectors, then start, above the kind; segment in the low and
///   sector in the high half of the second word;
/// - Revert: its target lsn in the second word;
/// - Spilled: its position in `spilled` in the second word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u64, u64);

impl Packed {
    /// `effect` in two words, if it fits.
    fn of(effect: Effect) -> Option<Packed> {
        match effect {
            Effect::Mark => Some(Packed(MARK, 0)),
            Effect::Flush => Some(Packed(FLUSH, 0)),
            Effect::Revert { to } => Some(Packed(REVERT, to)),
            Effect::Data {
                start,
                sectors,
                target: Target::Zero,
            } => (start >> ZERO_START_BITS == 0)
                .then_some(Packed(ZERO | start << KIND_BITS, sectors)),
            Effect::Data {
                start,
                sectors,
                target: Target::Journal { segment, sector },
            } => (start >> START_BITS == 0 && sectors >> SECTORS_BITS == 0).then_some(Packed(
                JOURNAL | sectors << KIND_BITS | start << (KIND_BITS + SECTORS_BITS),
                u64::from(segment) | u64::from(sector) << 32,
            )),
        }
    }

    fn kind(self) -> u64 {
        self.0 & ((1 << KIND_BITS) - 1)
    }

    /// The effect, unless spilled (or not a kind `of` makes).
    fn effect(self) -> Option<Effect> {
        let Packed(a, b) = self;
        match self.kind() {
            MARK => Some(Effect::Mark),
            FLUSH => Some(Effect::Flush),
            REVERT => Some(Effect::Revert { to: b }),
            ZERO => Some(Effect::Data {
                start: a >> KIND_BITS,
                sectors: b,
                target: Target::Zero,
            }),
            JOURNAL => Some(Effect::Data {
                start: a >> (KIND_BITS + SECTORS_BITS),
                sectors: (a >> KIND_BITS) & ((1 << SECTORS_BITS) - 1),
                target: Target::Journal {
                    segment: b as u32,
                    sector: (b >> 32) as u32,
                },
            }),
            _ => None,
        }
    }
}

/// Slots of a block that share one base time.
const RUN: usize = 256;

/// The timestamps of a block.
#[derive(Debug, Clone)]
enum Times {
    /// Slot `i` is at `bases[i / RUN] + deltas[i]`; a base is the first
    /// time of its run of slots.
    Narrow {
        bases: Vec<u64>,
        deltas: Vec<u32>,
    },
    Wide(Vec<u64>),
}

impl Times {
    fn narrow(capacity: usize) -> Times {
        Times::Narrow {
            bases: Vec::with_capacity(capacity.div_ceil(RUN)),
            deltas: Vec::with_capacity(capacity),
        }
    }

    fn get(&self, i: usize) -> u64 {
        match self {
            Times::Narrow { bases, deltas } => bases[i / RUN] + u64::from(deltas[i]),
            Times::Wide(all) => all[i],
        }
    }

    fn push(&mut self, timestamp: u64) {
        match self {
            Times::Narrow { bases, deltas } => {
                if deltas.len() % RUN == 0 {
                    bases.push(timestamp);
                }
                let delta = bases
                    .last()
                    .and_then(|&base| timestamp.checked_sub(base))
                    .and_then(|d| u32::try_from(d).ok());
                match delta {
                    Some(d) => deltas.push(d),
                    None => {
                        let mut all: Vec<u64> = Vec::with_capacity(deltas.capacity());
                        all.extend(
                            deltas
                                .iter()
                                .enumerate()
                                .map(|(i, &d)| bases[i / RUN] + u64::from(d)),
                        );
                        all.push(timestamp);
                        *self = Times::Wide(all);
                    }
                }
            }
            Times::Wide(all) => all.push(timestamp),
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            Times::Narrow { bases, deltas } => {
                deltas.truncate(len);
                bases.truncate(len.div_ceil(RUN));
            }
            Times::Wide(all) => all.truncate(len),
        }
    }

    fn prefix(&self, len: usize, capacity: usize) -> Times {
        match self {
            Times::Narrow { bases, deltas } => {
                let mut copy = Times::narrow(capacity);
                if let Times::Narrow {
                    bases: b,
                    deltas: d,
                } = &mut copy
                {
                    b.extend_from_slice(&bases[..len.div_ceil(RUN)]);
                    d.extend_from_slice(&deltas[..len]);
                }
                copy
            }
            Times::Wide(all) => {
                let mut a = Vec::with_capacity(capacity);
                a.extend_from_slice(&all[..len]);
                Times::Wide(a)
            }
        }
    }
}

/// Up to `capacity` entries, in lsn order.
#[derive(Debug, Clone)]
pub(super) struct Block {
    times: Times,
    effects: Vec<Packed>,
    /// (slot, effect) of the effects too large to pack.
    spilled: Vec<(usize, Effect)>,
}

impl Block {
    pub(super) fn with_capacity(capacity: usize) -> Block {
        Block {
            times: Times::narrow(capacity),
            effects: Vec::with_capacity(capacity),
            spilled: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.effects.len()
    }

    pub(super) fn push(&mut self, entry: Entry) {
        self.times.push(entry.timestamp);
        let packed = Packed::of(entry.effect).unwrap_or_else(|| {
            self.spilled.push((self.effects.len(), entry.effect));
            Packed(SPILLED, self.spilled.len() as u64 - 1)
        });
        self.effects.push(packed);
    }

    /// Entry `i` (< len()).
    pub(super) fn get(&self, i: usize) -> Entry {
        let packed = self.effects[i];
        let effect = packed.effect().unwrap_or_else(|| {
            // A spilled slot: the only kind `effect` does not decode.
            self.spilled[packed.1 as usize].1
        });
        Entry {
            timestamp: self.times.get(i),
            effect,
        }
    }

    /// Keeps the first `len` entries.
    pub(super) fn truncate(&mut self, len: usize) {
        self.times.truncate(len);
        self.effects.truncate(len);
        // Slot order: the spilled ones past `len` are a suffix.
        self.spilled.retain(|&(slot, _)| slot < len);
    }

    /// A copy of the first `len` entries with room for `capacity`.
    pub(super) fn prefix(&self, len: usize, capacity: usize) -> Block {
        let mut effects = Vec::with_capacity(capacity);
        effects.extend_from_slice(&self.effects[..len]);
        Block {
            times: self.times.prefix(len, capacity),
            effects,
            spilled: self
                .spilled
                .iter()
                .copied()
                .filter(|&(slot, _)| slot < len)
                .collect(),
        }
    }

    /// Flush records among the entries.
    pub(super) fn flushes(&self) -> u64 {
        self.effects.iter().filter(|p| p.kind() == FLUSH).count() as u64
    }

    /// The effects too large to pack, by slot.
    pub(super) fn spilled(&self) -> &[(usize, Effect)] {
        &self.spilled
    }

    /// Writes the block's entries to `out` (`encoded_len(len())` bytes):
    /// every time as a u64, then every packed effect as two u64s, little
    /// endian. Spilled effects are not in it ([`decode`] takes them apart).
    pub(super) fn encode(&self, out: &mut [u8]) {
        let len = self.len();
        let (times, effects) = out.split_at_mut(len * 8);
        for (i, t) in times.chunks_exact_mut(8).enumerate() {
            t.copy_from_slice(&self.times.get(i).to_le_bytes());
        }
        for (e, &Packed(a, b)) in effects.chunks_exact_mut(16).zip(&self.effects) {
            e[..8].copy_from_slice(&a.to_le_bytes());
            e[8..].copy_from_slice(&b.to_le_bytes());
        }
    }

    /// Heap bytes held, for the memory figures of the tests.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let times = match &self.times {
            Times::Narrow { bases, deltas } => bases.capacity() * 8 + deltas.capacity() * 4,
            Times::Wide(all) => all.capacity() * 8,
        };
        times
            + self.effects.capacity() * std::mem::size_of::<Packed>()
            + self.spilled.capacity() * std::mem::size_of::<(usize, Effect)>()
    }
}

/// Bytes of the encoding of `len` entries ([`Block::encode`]).
pub(super) const fn encoded_len(len: usize) -> usize {
    len * 24
}

/// Entry `i` of the encoding of `len` entries, read through `word` (the
/// little-endian u64 at a byte offset of it), whose spilled effects are
/// `spilled` ([`Block::spilled`]). Nothing here detects damage: the
/// encoding has no checksum, so changed bytes read as other entries; only
/// a spilled slot that `spilled` does not hold is noticed, and reads as a
/// Mark rather than failing.
pub(super) fn decode(
    word: impl Fn(usize) -> u64,
    len: usize,
    i: usize,
    spilled: &[(usize, Effect)],
) -> Entry {
    let effect_at = len * 8 + i * 16;
    let packed = Packed(word(effect_at), word(effect_at + 8));
    Entry {
        timestamp: word(i * 8),
        effect: packed.effect().unwrap_or_else(|| {
            spilled
                .get(packed.1 as usize)
                .map_or(Effect::Mark, |&(_, effect)| effect)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(start: u64, sectors: u64, segment: u32, sector: u32) -> Effect {
        Effect::Data {
            start,
            sectors,
            target: Target::Journal { segment, sector },
        }
    }

    fn zero(start: u64, sectors: u64) -> Effect {
        Effect::Data {
            start,
            sectors,
            target: Target::Zero,
        }
    }

    #[test]
    fn effects_round_trip_packed_or_spilled() {
        let max_start = (1 << START_BITS) - 1;
        let max_sectors = (1 << SECTORS_BITS) - 1;
        let packed = [
            Effect::Mark,
            Effect::Flush,
            Effect::Revert { to: 0 },
            Effect::Revert { to: u64::MAX },
            zero(0, 1),
            zero((1 << ZERO_START_BITS) - 1, u64::MAX),
            journal(0, 1, 0, 0),
            journal(max_start, max_sectors, u32::MAX, u32::MAX),
            journal(12345, 8, 7, 2_097_151),
        ];
        for e in packed {
            let p = Packed::of(e).expect("fits");
            assert_ne!(p.kind(), SPILLED);
            assert_eq!(p.effect(), Some(e));
        }
        let spilled = [
            journal(max_start + 1, 1, 1, 1),
            journal(0, max_sectors + 1, 1, 1),
            journal(u64::MAX, u64::MAX, u32::MAX, u32::MAX),
            zero(1 << ZERO_START_BITS, 1),
            zero(u64::MAX, u64::MAX),
        ];
        for e in spilled {
            assert_eq!(Packed::of(e), None, "{e:?}");
        }
        let mut block = Block::with_capacity(4);
        let all: Vec<Entry> = packed
            .iter()
            .chain(&spilled)
            .enumerate()
            .map(|(i, &effect)| Entry {
                timestamp: i as u64,
                effect,
            })
            .collect();
        for &e in &all {
            block.push(e);
        }
        for (i, &e) in all.iter().enumerate() {
            assert_eq!(block.get(i), e);
        }
        let cut = packed.len() + 2;
        let copy = block.prefix(cut, 16);
        block.truncate(cut);
        for b in [&block, &copy] {
            assert_eq!(b.len(), cut);
            assert_eq!(b.spilled.len(), 2);
            for (i, &e) in all[..cut].iter().enumerate() {
                assert_eq!(b.get(i), e);
            }
        }
        block.push(all[cut + 2]);
        assert_eq!(block.get(cut), all[cut + 2], "spilled again after a cut");
        let mut encoded = vec![0; encoded_len(block.len())];
        block.encode(&mut encoded);
        let word = |at: usize| {
            let mut w = [0; 8];
            w.copy_from_slice(&encoded[at..at + 8]);
            u64::from_le_bytes(w)
        };
        for i in 0..block.len() {
            let decoded = decode(word, block.len(), i, block.spilled());
            assert_eq!(decoded, block.get(i), "slot {i} encoded");
        }
    }

    #[test]
    fn each_run_of_slots_has_its_own_base() {
        let mut block = Block::with_capacity(4096);
        // Runs an hour apart, records a millisecond apart within a run.
        let time = |i: u64| (i / RUN as u64) * 3_600_000_000_000 + (i % RUN as u64) * 1_000_000;
        for i in 0..1000 {
            block.push(Entry {
                timestamp: time(i),
                effect: Effect::Flush,
            });
        }
        assert!(matches!(block.times, Times::Narrow { .. }));
        let check = |b: &Block| {
            for i in 0..b.len() {
                assert_eq!(b.get(i).timestamp, time(i as u64), "slot {i}");
            }
        };
        check(&block);
        for cut in [900, 768, 767, 256, 1, 0] {
            block.truncate(cut);
            check(&block.prefix(cut, 16));
            for i in cut as u64..cut as u64 + 300 {
                block.push(Entry {
                    timestamp: time(i),
                    effect: Effect::Flush,
                });
            }
            check(&block);
            block.truncate(cut);
        }
        assert!(matches!(block.times, Times::Narrow { .. }));
    }

    #[test]
    fn times_stay_narrow_within_u32_and_widen_past_it() {
        let at = |t: u64| Entry {
            timestamp: t,
            effect: Effect::Flush,
        };
        let base = u64::MAX - (1 << 40);
        let mut block = Block::with_capacity(8);
        for t in [base, base, base + 1, base + u64::from(u32::MAX)] {
            block.push(at(t));
        }
        assert!(matches!(block.times, Times::Narrow { .. }));
        assert_eq!(block.heap_bytes(), 8 + 8 * 4 + 8 * 16);
        block.push(at(base + u64::from(u32::MAX) + 1));
        assert!(matches!(block.times, Times::Wide(_)), "a delta past u32");
        block.push(at(u64::MAX));
        let want = [
            base,
            base,
            base + 1,
            base + u64::from(u32::MAX),
            base + u64::from(u32::MAX) + 1,
            u64::MAX,
        ];
        for (i, &t) in want.iter().enumerate() {
            assert_eq!(block.get(i).timestamp, t);
            assert_eq!(block.prefix(i + 1, 8).get(i).timestamp, t);
        }
        // Times going back (a damaged disk) widen the block instead of
        // wrapping.
        let mut back = Block::with_capacity(2);
        back.push(at(10));
        back.push(at(3));
        assert!(matches!(back.times, Times::Wide(_)));
        assert_eq!((back.get(0).timestamp, back.get(1).timestamp), (10, 3));
        // An emptied block starts its deltas from its new first time.
        let mut narrow = Block::with_capacity(2);
        narrow.push(at(5));
        narrow.truncate(0);
        narrow.push(at(u64::MAX));
        assert_eq!(narrow.get(0).timestamp, u64::MAX);
        assert!(matches!(narrow.times, Times::Narrow { .. }));
    }
}
