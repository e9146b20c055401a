//! Point-in-time access against a model: random histories of writes,
//! zeroes, flushes, bookmarks and reverts, with the clock moving, folds at
//! random moments and crashes at random points (some in the middle of a
//! fold). After every step, for every lsn the model knows:
//! - inside the window, view(lsn) equals the model's disk at that lsn, and
//!   so does view(time of that record);
//! - before the window, view(lsn) is refused with an error naming it;
//! - nothing still inside the configured window was folded;
//! - one materialized image equals its view; the live disk equals the
//!   model's newest state.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
use rewind_journal::{
    Clock, Error, ManualClock, OpenOptions, PointInTime, RetryPolicy, Volume, VolumeSettings,
};

const SECTORS: u64 = 64;
const DISK: usize = (SECTORS * 512) as usize;
const WINDOW_SECS: u64 = 10;
const START_NS: u64 = 1_700_000_000_000_000_000;
const EIO: i32 = 5;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Zeroes {
        sector: u64,
        sectors: u64,
    },
    Flush,
    Bookmark,
    /// Revert to the lsn this far back (a fraction of the reachable range).
    Revert {
        back: u8,
    },
    Advance {
        secs: u64,
    },
    Fold,
    Crash {
        seed: u64,
        mid_fold: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SECTORS, 1..=16u64).prop_map(|(s, n)| (s, n.min(SECTORS - s)));
    prop_oneof![
        8 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        1 => range.prop_map(|(sector, sectors)| Op::Zeroes { sector, sectors }),
        2 => Just(Op::Flush),
        1 => Just(Op::Bookmark),
        1 => any::<u8>().prop_map(|back| Op::Revert { back }),
        3 => (1..=6u64).prop_map(|secs| Op::Advance { secs }),
        2 => Just(Op::Fold),
        2 => (any::<u64>(), any::<bool>()).prop_map(|(seed, mid_fold)| Op::Crash { seed, mid_fold }),
    ]
}

#[derive(Debug, Clone)]
enum Change {
    Data {
        offset: usize,
        data: Option<Vec<u8>>,
        len: usize,
    },
    Revert {
        to: u64,
    },
}

/// Every acknowledged change with its lsn and time, in lsn order.
#[derive(Debug, Default)]
struct Model {
    changes: Vec<(u64, u64, Change)>,
}

impl Model {
    fn state_at(&self, lsn: u64) -> Vec<u8> {
        let mut disk = vec![0u8; DISK];
        let last_revert = self
            .changes
            .iter()
            .rev()
            .find(|(l, _, c)| *l <= lsn && matches!(c, Change::Revert { .. }));
        let from = match last_revert {
            Some(&(l, _, Change::Revert { to })) => {
                disk = self.state_at(to);
                l
            }
            _ => 0,
        };
        for (_, _, c) in self
            .changes
            .iter()
            .filter(|(l, _, _)| *l > from && *l <= lsn)
        {
            if let Change::Data { offset, data, len } = c {
                match data {
                    Some(d) => disk[*offset..*offset + len].copy_from_slice(d),
                    None => disk[*offset..*offset + len].fill(0),
                }
            }
        }
        disk
    }

    /// The newest change at or before `ns`.
    fn lsn_at_time(&self, ns: u64) -> u64 {
        self.changes
            .iter()
            .filter(|(_, t, _)| *t <= ns)
            .map(|(l, _, _)| *l)
            .max()
            .unwrap_or(0)
    }
}

struct Harness {
    fs: FaultStorage,
    clock: Arc<ManualClock>,
    volume: Option<Volume>,
}

impl Harness {
    fn options(&self) -> OpenOptions {
        OpenOptions {
            clock: self.clock.clone(),
            retry: RetryPolicy {
                max_hold: Duration::from_millis(5),
                first_backoff: Duration::from_millis(1),
            },
            fold_interval: None,
            ..OpenOptions::default()
        }
    }

    fn open(&mut self) -> u64 {
        let (v, report) =
            Volume::open(self.fs.arc(), Path::new(DIR), self.options()).expect("recovery");
        self.volume = Some(v);
        report.next_lsn - 1
    }

    fn v(&self) -> &Volume {
        self.volume.as_ref().expect("open")
    }
}

fn settings() -> VolumeSettings {
    VolumeSettings {
        size: SECTORS * 512,
        window: Duration::from_secs(WINDOW_SECS),
        ..small_settings()
    }
}

fn check(h: &Harness, model: &Model, probe: u64) {
    let v = h.v();
    let timeline = v.timeline();
    assert!(
        read(v, 0, DISK) == model.state_at(u64::MAX),
        "live disk differs from the model"
    );
    let now = h.clock.now_ns();
    let expiry = now - WINDOW_SECS * 1_000_000_000;
    for &(lsn, ts, _) in &model.changes {
        let at = PointInTime::Lsn(lsn);
        if lsn < timeline.start_lsn {
            assert!(
                ts < expiry,
                "lsn {lsn} written at {ts} is inside the window (from {expiry}) but was folded"
            );
            let err = v.view(&at).expect_err("a view before the window");
            assert!(matches!(err, Error::OutsideWindow { .. }), "{err}");
            continue;
        }
        let view = v.view(&at).expect("view inside the window");
        let mut got = vec![0u8; DISK];
        view.read(0, &mut got).expect("view read");
        assert!(
            got == model.state_at(lsn),
            "view at lsn {lsn} differs from the model"
        );
        if timeline.window_start_ns <= ts {
            let by_time = v.view(&PointInTime::Time(ts)).expect("view by time");
            let want = model.lsn_at_time(ts);
            let mut got = vec![0u8; DISK];
            by_time.read(0, &mut got).expect("read");
            assert!(got == model.state_at(want), "view at time {ts} differs");
        }
    }
    // One materialized image, at a lsn picked by the case.
    let reachable: Vec<u64> = model
        .changes
        .iter()
        .map(|c| c.0)
        .filter(|&l| l >= timeline.start_lsn)
        .collect();
    if !reachable.is_empty() {
        let lsn = reachable[probe as usize % reachable.len()];
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("image.raw");
        v.materialize(&PointInTime::Lsn(lsn), &out, &mut |_, _| {})
            .expect("materialize");
        assert!(
            std::fs::read(&out).expect("image") == model.state_at(lsn),
            "materialized image at lsn {lsn} differs"
        );
    }
}

fn run_case(ops: Vec<Op>, probe: u64) {
    let fs = FaultStorage::new();
    create(&fs, &settings());
    let mut h = Harness {
        fs,
        clock: Arc::new(ManualClock::new(START_NS)),
        volume: None,
    };
    h.open();
    let mut model = Model::default();
    // Lsns a completed flush (or a bookmark or revert, which flush) covers.
    let mut covered = 0;
    let mut last = 0;
    let mut bookmarks = 0;
    for op in ops {
        let now = h.clock.now_ns();
        match op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let (offset, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                let data = pattern(seed, len);
                last = h.v().write(offset as u64, &data).expect("write");
                model.changes.push((
                    last,
                    now,
                    Change::Data {
                        offset,
                        data: Some(data),
                        len,
                    },
                ));
            }
            Op::Zeroes { sector, sectors } => {
                let (offset, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                last = h
                    .v()
                    .write_zeroes(offset as u64, len as u64, true)
                    .expect("zeroes");
                model.changes.push((
                    last,
                    now,
                    Change::Data {
                        offset,
                        data: None,
                        len,
                    },
                ));
            }
            Op::Flush => {
                h.v().flush().expect("flush");
                covered = last;
            }
            Op::Bookmark => {
                bookmarks += 1;
                let name = format!("b{bookmarks}");
                let b = h.v().bookmark(&name, false).expect("bookmark");
                covered = last;
                let via_name = h
                    .v()
                    .resolve(&PointInTime::Bookmark(name))
                    .expect("resolve");
                assert_eq!(via_name, b.lsn);
            }
            Op::Revert { back } => {
                let start = h.v().timeline().start_lsn;
                let top = h.v().last_lsn();
                let to = top - (top - start) * u64::from(back) / 255;
                last = h.v().revert(&PointInTime::Lsn(to)).expect("revert");
                model.changes.push((last, now, Change::Revert { to }));
                covered = last;
            }
            Op::Advance { secs } => h.clock.advance(secs * 1_000_000_000),
            Op::Fold => {
                h.v().fold_now().expect("fold");
            }
            Op::Crash { seed, mid_fold } => {
                if mid_fold {
                    // The fold writes base.img, then its sync fails: the
                    // machine loses power with base.img half updated.
                    h.fs.inject(Fault::always(FaultOp::Sync, EIO).on_paths_containing("base.img"));
                    let _ = h.v().fold_now();
                }
                let image = h.fs.crash(seed);
                h.volume = None;
                h.fs = image;
                let recovered = h.open();
                assert!(
                    recovered >= covered,
                    "recovered up to lsn {recovered}, but lsn {covered} was flushed"
                );
                model.changes.retain(|c| c.0 <= recovered);
                last = model.changes.last().map_or(0, |c| c.0);
                covered = last.min(covered);
            }
        }
        check(&h, &model, probe);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn views_folds_reverts_and_crashes_agree_with_the_model(
        ops in prop::collection::vec(op(), 1..40),
        probe in any::<u64>(),
    ) {
        run_case(ops, probe);
    }
}
