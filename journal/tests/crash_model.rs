//! The journal against a model: a byte array plus the full history of
//! acknowledged changes, with crashes that lose, keep or tear every
//! unsynced write.
//!
//! Checkpoints are taken as an op and at every 64 KiB segment, so crashes
//! land while one is written and recoveries start from one. Each case
//! picks the segments' layout: slots, inline, or chosen by the writer.
//!
//! After each crash and recovery:
//! - everything a completed flush covered is present;
//! - the disk equals the model after exactly the recovered lsn prefix, so no
//!   torn or out-of-order data is visible.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use proptest::prelude::*;
use rewind_journal::fault::FaultStorage;
use rewind_journal::{LayoutChoice, OpenOptions, Volume, VolumeSettings};

const SECTORS: u64 = 64;
const DISK: usize = (SECTORS * 512) as usize;

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Zeroes { sector: u64, sectors: u64 },
    Discard { sector: u64, sectors: u64 },
    Flush,
    Read { sector: u64, sectors: u64 },
    Checkpoint,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS, 1..=16u64).prop_map(|(s, n)| (s, n.min(SECTORS - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        1 => range().prop_map(|(sector, sectors)| Op::Zeroes { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => Just(Op::Flush),
        2 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => Just(Op::Checkpoint),
    ]
}

/// A change the journal acknowledged, with its lsn.
#[derive(Debug, Clone)]
struct Change {
    lsn: u64,
    offset: usize,
    data: Option<Vec<u8>>, // None: zeroes
    len: usize,
}

#[derive(Debug, Default)]
struct History(Vec<Change>);

impl History {
    /// The disk after every change with lsn <= `lsn`.
    fn state_at(&self, lsn: u64) -> Vec<u8> {
        let mut changes: Vec<&Change> = self.0.iter().filter(|c| c.lsn <= lsn).collect();
        changes.sort_by_key(|c| c.lsn);
        let mut disk = vec![0u8; DISK];
        for c in changes {
            match &c.data {
                Some(d) => disk[c.offset..c.offset + c.len].copy_from_slice(d),
                None => disk[c.offset..c.offset + c.len].fill(0),
            }
        }
        disk
    }
}

fn settings() -> VolumeSettings {
    VolumeSettings {
        size: SECTORS * 512,
        ..small_settings()
    }
}

/// Runs one op; returns the change it made, if any.
fn run(v: &Volume, op: &Op) -> Option<Change> {
    let span = |sector: u64, sectors: u64| ((sector * 512) as usize, (sectors * 512) as usize);
    match *op {
        Op::Write {
            sector,
            sectors,
            seed,
        } => {
            let (offset, len) = span(sector, sectors);
            let data = pattern(seed, len);
            let lsn = v.write(offset as u64, &data).expect("write");
            Some(Change {
                lsn,
                offset,
                data: Some(data),
                len,
            })
        }
        Op::Zeroes { sector, sectors } | Op::Discard { sector, sectors } => {
            let (offset, len) = span(sector, sectors);
            let lsn = match op {
                Op::Zeroes { .. } => v.write_zeroes(offset as u64, len as u64, sector % 2 == 0),
                _ => v.discard(offset as u64, len as u64),
            }
            .expect("zeroes");
            Some(Change {
                lsn,
                offset,
                data: None,
                len,
            })
        }
        Op::Flush => {
            v.flush().expect("flush");
            None
        }
        Op::Checkpoint => {
            v.checkpoint().expect("checkpoint");
            None
        }
        Op::Read { .. } => None,
    }
}

fn layout() -> impl Strategy<Value = LayoutChoice> {
    prop_oneof![
        Just(LayoutChoice::Auto),
        Just(LayoutChoice::Slots),
        Just(LayoutChoice::Inline)
    ]
}

fn checkpointing(layout: LayoutChoice) -> OpenOptions {
    OpenOptions {
        checkpoint_every: Some(64 << 10),
        layout,
        ..options()
    }
}

fn open_checkpointing(storage: &FaultStorage, layout: LayoutChoice) -> Volume {
    Volume::open(storage.arc(), Path::new(DIR), checkpointing(layout))
        .expect("open")
        .0
}

fn reopen(storage: &FaultStorage, layout: LayoutChoice) -> (Volume, u64) {
    let (v, report) = Volume::open(storage.arc(), Path::new(DIR), checkpointing(layout))
        .expect("recovery must succeed");
    (v, report.next_lsn - 1)
}

fn check_recovered(v: &Volume, history: &History, recovered: u64, must_have: u64) {
    assert!(
        recovered >= must_have,
        "lost data: recovered up to lsn {recovered}, but lsn {must_have} had to survive"
    );
    let disk = read(v, 0, DISK);
    assert!(
        disk == history.state_at(recovered),
        "disk differs from the model at recovered lsn {recovered}"
    );
}

/// Runs `ops` one by one, checking every read against the model; returns the
/// highest lsn a completed flush covered.
fn run_sequential(v: &Volume, ops: &[Op], history: &mut History, mut covered: u64) -> u64 {
    let mut last = 0;
    for op in ops {
        if let Op::Read { sector, sectors } = *op {
            let want = history.state_at(u64::MAX);
            let (s, e) = ((sector * 512) as usize, ((sector + sectors) * 512) as usize);
            assert!(
                read(v, s as u64, e - s) == want[s..e],
                "live read differs from the model"
            );
        }
        if let Some(c) = run(v, op) {
            last = c.lsn;
            history.0.push(c);
        }
        if matches!(op, Op::Flush) {
            covered = covered.max(last);
        }
    }
    covered
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn sequential_histories_survive_two_crashes(
        first in prop::collection::vec(op(), 1..60),
        second in prop::collection::vec(op(), 1..60),
        seeds in (any::<u64>(), any::<u64>()),
        layout in layout(),
    ) {
        let fs = FaultStorage::new();
        create(&fs, &settings());
        let v = open_checkpointing(&fs, layout);
        let mut history = History::default();
        let covered = run_sequential(&v, &first, &mut history, 0);
        drop(v);

        // The process dies (the machine does not): nothing acknowledged may
        // be lost, flushed or not.
        let last = history.0.iter().map(|c| c.lsn).max().unwrap_or(0);
        let (v, recovered) = reopen(&fs.process_crash(), layout);
        check_recovered(&v, &history, recovered, last);
        drop(v);

        let crashed = fs.crash(seeds.0);
        let (v, recovered) = reopen(&crashed, layout);
        check_recovered(&v, &history, recovered, covered);

        // Whatever was lost is gone from the history; carry on and crash again.
        history.0.retain(|c| c.lsn <= recovered);
        let covered = run_sequential(&v, &second, &mut history, recovered);
        drop(v);
        let (v, recovered) = reopen(&crashed.crash(seeds.1), layout);
        check_recovered(&v, &history, recovered, covered);
    }

    #[test]
    fn concurrent_histories_survive_a_crash_in_flight(
        threads in prop::collection::vec(prop::collection::vec(op(), 1..40), 2..=3),
        crash_after in 0usize..100,
        seed in any::<u64>(),
        layout in layout(),
    ) {
        let fs = FaultStorage::new();
        create(&fs, &settings());
        let v = Arc::new(open_checkpointing(&fs, layout));
        let history = Arc::new(Mutex::new(History::default()));
        let acked_max = Arc::new(AtomicU64::new(0));
        let must_have = Arc::new(AtomicU64::new(0));
        let done_ops = Arc::new(AtomicUsize::new(0));
        let crashed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let total: usize = threads.iter().map(Vec::len).sum();

        let workers: Vec<_> = threads.into_iter().map(|ops| {
            let (v, history, acked_max, must_have, done_ops, crashed) = (
                v.clone(), history.clone(), acked_max.clone(), must_have.clone(),
                done_ops.clone(), crashed.clone(),
            );
            std::thread::spawn(move || {
                for op in ops {
                    // A flush covers the writes acknowledged before it began.
                    let before = acked_max.load(Ordering::SeqCst);
                    if let Some(c) = run(&v, &op) {
                        acked_max.fetch_max(c.lsn, Ordering::SeqCst);
                        history.lock().expect("history").0.push(c);
                    }
                    // Only a flush that finished before the crash must hold.
                    if matches!(op, Op::Flush) && !crashed.load(Ordering::SeqCst) {
                        must_have.fetch_max(before, Ordering::SeqCst);
                    }
                    done_ops.fetch_add(1, Ordering::SeqCst);
                }
            })
        }).collect();

        let at = crash_after.min(total);
        wait_until("ops before the crash", || done_ops.load(Ordering::SeqCst) >= at);
        crashed.store(true, Ordering::SeqCst);
        let image = fs.crash(seed);
        let must_have = must_have.load(Ordering::SeqCst);
        for w in workers {
            w.join().expect("worker");
        }
        drop(v);

        let (v, recovered) = reopen(&image, layout);
        let history = history.lock().expect("history");
        check_recovered(&v, &history, recovered, must_have);
    }
}
