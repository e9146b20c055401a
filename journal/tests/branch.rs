//! Read-only branches: a cut moves the records after a common point into a
//! branch and ends the journal there. The journal then reads as of that
//! point and takes another primary's records at the same lsns; the branch
//! reads every moment of the old tail, across restarts and crashes.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
use rewind_journal::{
    format_ns, BranchInfo, Clock, Error, ManualClock, OpenOptions, PointInTime, Volume,
    VolumeSettings,
};

/// Operations touch only the start of the 1 MiB disk; the rest stays zero.
const REGION: usize = 256 << 10;
const SECTORS: u64 = (REGION / 512) as u64;
const SECOND: u64 = 1_000_000_000;

fn clocked_options(clock: &Arc<ManualClock>) -> OpenOptions {
    OpenOptions {
        clock: clock.clone(),
        ..options()
    }
}

fn open_clocked(fs: &FaultStorage, clock: &Arc<ManualClock>) -> Volume {
    Volume::open(fs.arc(), Path::new(DIR), clocked_options(clock))
        .expect("open volume")
        .0
}

fn new_clocked() -> (FaultStorage, Volume, Arc<ManualClock>) {
    let fs = FaultStorage::new();
    create(&fs, &small_settings());
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let v = open_clocked(&fs, &clock);
    (fs, v, clock)
}

fn point(text: &str) -> PointInTime {
    text.parse().expect(text)
}

/// The region as a view at `at` shows it; the rest of the disk must be zero.
fn view_region(v: &Volume, at: &str) -> Vec<u8> {
    let view = v.view(&point(at)).expect(at);
    let mut buf = vec![0u8; v.size() as usize];
    view.read(0, &mut buf).expect("read view");
    assert!(
        buf[REGION..].iter().all(|&b| b == 0),
        "{at}: past the region"
    );
    buf.truncate(REGION);
    buf
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Zero {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Flush,
    Bookmark,
    /// Back to the moment this many operations ago.
    Revert {
        back: usize,
    },
    Epoch,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS, 1..=120u64).prop_map(|(s, n)| (s, n.min(SECTORS - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<u8>())
            .prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        1 => range().prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => Just(Op::Flush),
        1 => Just(Op::Bookmark),
        1 => (1usize..8).prop_map(|back| Op::Revert { back }),
        1 => Just(Op::Epoch),
    ]
}

/// The disk after an operation: its last lsn, time and content.
#[derive(Debug, Clone)]
struct Moment {
    lsn: u64,
    ns: u64,
    disk: Vec<u8>,
    /// The bookmark the operation took, if it was one, and its lsn.
    bookmark: Option<(String, u64)>,
}

/// A volume and the model of every moment it went through, one per
/// operation; each operation runs a second after the previous one.
struct Model {
    moments: Vec<Moment>,
    bookmarks: u32,
}

impl Model {
    fn new(v: &Volume) -> Model {
        Model {
            moments: vec![Moment {
                lsn: v.last_lsn(),
                ns: 0,
                disk: vec![0; REGION],
                bookmark: None,
            }],
            bookmarks: 0,
        }
    }

    fn disk(&self) -> Vec<u8> {
        self.moments.last().expect("a moment").disk.clone()
    }

    fn run(&mut self, v: &Volume, clock: &ManualClock, op: &Op) {
        clock.advance(SECOND);
        let mut disk = self.disk();
        let mut bookmark = None;
        match *op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let data = pattern(seed, (sectors * 512) as usize);
                v.write(sector * 512, &data).expect("write");
                let at = (sector * 512) as usize;
                disk[at..at + data.len()].copy_from_slice(&data);
            }
            Op::Zero { sector, sectors } | Op::Discard { sector, sectors } => {
                let (at, len) = (sector * 512, sectors * 512);
                match op {
                    Op::Zero { .. } => v.write_zeroes(at, len, false),
                    _ => v.discard(at, len),
                }
                .expect("zero");
                disk[at as usize..(at + len) as usize].fill(0);
            }
            Op::Flush => v.flush().expect("flush"),
            Op::Bookmark => {
                self.bookmarks += 1;
                let name = format!("b{}", self.bookmarks);
                let lsn = v.bookmark(&name, false).expect("bookmark").lsn;
                bookmark = Some((name, lsn));
            }
            Op::Revert { back } => {
                let to = &self.moments[self.moments.len().saturating_sub(back + 1)];
                v.revert(&PointInTime::Lsn(to.lsn)).expect("revert");
                disk = to.disk.clone();
            }
            Op::Epoch => {
                v.raise_epoch().expect("epoch");
            }
        }
        self.moments.push(Moment {
            lsn: v.last_lsn(),
            ns: clock.now_ns(),
            disk,
            bookmark,
        });
    }
}

/// Checks that branch `name`, cut at moment `cut`, reads every moment
/// of the model after it, by lsn, time and bookmark.
fn check_branch(v: &Volume, name: &str, model: &Model, cut: usize) -> Result<(), TestCaseError> {
    let moments = &model.moments[cut..];
    let base = &moments[0];
    let info = branch(v, name);
    prop_assert!(info.readable, "{:?}", info);
    prop_assert_eq!(info.base_lsn, base.lsn);
    prop_assert_eq!(info.first_lsn, base.lsn + 1);
    prop_assert_eq!(info.last_lsn, model.moments.last().expect("moment").lsn);
    prop_assert_eq!(info.records, info.last_lsn - base.lsn);
    let end = format!("branch:{name}");
    prop_assert!(view_region(v, &end) == model.disk(), "{}", end);
    for (i, m) in moments.iter().enumerate() {
        let at = format!("branch:{name}@lsn:{}", m.lsn);
        prop_assert!(view_region(v, &at) == m.disk, "{}", at);
        if i > 0 {
            let at = format!("branch:{name}@{}", format_ns(m.ns));
            prop_assert_eq!(v.resolve(&point(&at)).expect("resolve"), m.lsn);
            prop_assert!(view_region(v, &at) == m.disk, "{}", at);
        }
        if let Some((b, lsn)) = m.bookmark.as_ref().filter(|_| i > 0) {
            let at = format!("branch:{name}@bookmark:{b}");
            prop_assert_eq!(v.resolve(&point(&at)).expect("resolve"), *lsn);
            prop_assert!(view_region(v, &at) == m.disk, "{}", at);
        }
    }
    Ok(())
}

fn branch(v: &Volume, name: &str) -> BranchInfo {
    v.branches()
        .into_iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("branch {name} is not listed"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the journal held, a cut at any moment leaves the journal
    /// at that moment and the branch reading every later one; new records
    /// take the lsns after the cut; a reopen keeps both.
    #[test]
    fn a_cut_keeps_every_moment_of_the_tail(
        ops in prop::collection::vec(op(), 1..30),
        at in 0.0f64..1.0,
        after in prop::collection::vec(op(), 0..6),
    ) {
        let (fs, v, clock) = new_clocked();
        let mut model = Model::new(&v);
        for op in &ops {
            model.run(&v, &clock, op);
        }
        let cut = (at * model.moments.len() as f64) as usize;
        let common = model.moments[cut].lsn;
        let epoch_at_cut = v
            .epoch_history()
            .iter()
            .enumerate()
            // The first epoch is every copy's start, not a record's.
            .filter(|(i, e)| *i == 0 || e.first_lsn <= common)
            .map(|(_, e)| e.epoch)
            .max()
            .unwrap_or(1);
        let last = v.last_lsn();
        let got = v.cut_to_branch(common, "tail").expect("cut");
        prop_assert_eq!(got.is_some(), common < last);
        prop_assert_eq!(v.last_lsn(), common);
        prop_assert_eq!(v.durable_lsn(), common);
        prop_assert!(read(&v, 0, REGION) == model.moments[cut].disk);
        prop_assert_eq!(v.epoch(), epoch_at_cut);
        prop_assert!(v.epoch_history().iter().skip(1).all(|e| e.first_lsn <= common));
        prop_assert!(v.bookmarks().iter().all(|b| b.lsn <= common));
        if common == last {
            prop_assert!(v.branches().is_empty());
            return Ok(());
        }
        check_branch(&v, "tail", &model, cut)?;

        // The journal goes on from the cut; the branch does not change.
        let mut tail = Model {
            moments: model.moments[..=cut].to_vec(),
            bookmarks: model.bookmarks,
        };
        for op in &after {
            tail.run(&v, &clock, op);
        }
        prop_assert_eq!(v.last_lsn(), tail.moments.last().expect("moment").lsn);
        prop_assert!(read(&v, 0, REGION) == tail.disk());
        v.close().expect("close");

        let v = open_clocked(&fs, &clock);
        prop_assert!(read(&v, 0, REGION) == tail.disk());
        // Closing may have added a Flush record.
        prop_assert!(v.last_lsn() >= tail.moments.last().expect("moment").lsn);
        for m in &tail.moments {
            prop_assert!(view_region(&v, &format!("lsn:{}", m.lsn)) == m.disk, "lsn {}", m.lsn);
        }
        check_branch(&v, "tail", &model, cut)?;
    }
}

/// A primary that wrote `common` records, flushed, and the same volume as
/// a failover leaves it on another host: a copy that raised the epoch.
fn diverged(common_writes: u8) -> (FaultStorage, Volume, FaultStorage, Volume) {
    let (fs, a) = new_volume();
    for i in 0..common_writes {
        a.write(u64::from(i) * 8192, &pattern(i, 8192))
            .expect("write");
    }
    a.flush().expect("flush");
    let fs_b = fs.process_crash();
    let b = open(&fs_b);
    b.raise_epoch().expect("failover raises the epoch");
    (fs, a, fs_b, b)
}

/// Ships every durable record of `from` after `to`'s end to `to`.
fn ship(from: &Volume, to: &Volume) {
    loop {
        let got = from
            .read_shipped(to.last_lsn() + 1, 256 << 10)
            .expect("read");
        if got.records.is_empty() {
            return;
        }
        to.apply_shipped(&got.records).expect("apply");
    }
}

fn whole(v: &Volume) -> Vec<u8> {
    read(v, 0, v.size() as usize)
}

#[test]
fn the_old_primary_takes_the_new_primarys_records_at_the_same_lsns() {
    let (fs, a, _fs_b, b) = diverged(5);
    let common = a.last_lsn();
    assert_eq!(
        b.epoch_history().last().map(|e| (e.epoch, e.first_lsn)),
        Some((2, common + 1)),
        "B's epoch record"
    );
    // A's tail, never shipped: writes over and beside the common data.
    for i in 0..40u8 {
        a.write(u64::from(i % 9) * 8192 + 512, &pattern(100 + i, 12288))
            .expect("write");
    }
    a.discard(0, 4096).expect("discard");
    let bookmark = a.bookmark("old-tail", true).expect("bookmark");
    let old_tail = whole(&a);
    let old_last = a.last_lsn();
    // B's own records after the failover.
    for i in 0..30u8 {
        b.write(u64::from(i % 7) * 16384, &pattern(200 + i, 4096))
            .expect("write");
    }
    b.flush().expect("flush");
    b.write_zeroes(65536, 8192, true).expect("zeroes");
    b.flush().expect("flush");

    let name = format!("e1-{}", common + 1);
    let info = a
        .cut_to_branch(common, &name)
        .expect("cut")
        .expect("a tail");
    assert_eq!(
        (info.base_lsn, info.first_lsn, info.last_lsn),
        (common, common + 1, old_last)
    );
    assert_eq!(info.epochs, vec![1]);
    assert!(info.readable && info.problem.is_none());
    assert_eq!(a.branches(), vec![info.clone()]);

    // A replica now, as the daemon's rejoin leaves it: only a replica
    // takes shipped records.
    a.demote(false).expect("demote");
    ship(&b, &a);
    assert_eq!(a.last_lsn(), b.durable_lsn());
    assert_eq!(a.epoch(), 2);
    assert_eq!(a.epoch_history(), b.epoch_history());
    assert!(whole(&a) == whole(&b));
    assert!(view_whole(&a, &format!("branch:{name}")) == old_tail);

    // The journal's records after the cut are B's, whatever the recovery.
    let last = a.last_lsn();
    drop(a);
    for (i, crashed) in [fs.process_crash(), fs.crash(1), fs.crash(2)]
        .into_iter()
        .enumerate()
    {
        let a = open(&crashed);
        assert_eq!(a.last_lsn(), last, "crash {i}: B's records were synced");
        assert_eq!(a.epoch(), 2);
        for lsn in (0..=last).step_by(3).chain([last]) {
            assert!(
                view_whole(&a, &format!("lsn:{lsn}")) == view_whole(&b, &format!("lsn:{lsn}")),
                "crash {i}: lsn {lsn}"
            );
        }
        assert!(view_whole(&a, &format!("branch:{name}")) == old_tail);
        assert_eq!(
            a.resolve(&point(&format!("branch:{name}@bookmark:old-tail")))
                .expect("bookmark in the branch"),
            bookmark.lsn
        );
        assert!(a.bookmarks().is_empty(), "the tail's bookmark went with it");
        // And it follows B on.
        b.write(0, &pattern(9, 4096)).expect("write");
        b.flush().expect("flush");
        ship(&b, &a);
        assert!(whole(&a) == whole(&b));
    }
}

fn view_whole(v: &Volume, at: &str) -> Vec<u8> {
    let view = v.view(&point(at)).expect(at);
    let mut buf = vec![0u8; v.size() as usize];
    view.read(0, &mut buf).expect("read view");
    buf
}

/// A volume whose journal holds `common` lsns and a tail after them, all
/// durable; returns the disk at the common point and at the end.
fn with_tail(fs: &FaultStorage) -> (Volume, u64, Vec<u8>, Vec<u8>) {
    create(fs, &small_settings());
    let v = open(fs);
    for i in 0..6u8 {
        v.write(u64::from(i) * 20480, &pattern(i, 20480))
            .expect("write");
    }
    v.flush().expect("flush");
    let common = v.last_lsn();
    let at_common = whole(&v);
    // A tail across segments (64 KiB each), with a revert to before the
    // common point and an epoch.
    for i in 0..10u8 {
        v.write(u64::from(i) * 4096, &pattern(50 + i, 24576))
            .expect("write");
    }
    v.revert(&PointInTime::Lsn(common - 2)).expect("revert");
    v.raise_epoch().expect("epoch");
    v.write(1 << 19, &pattern(77, 4096)).expect("write");
    v.bookmark("end", false).expect("bookmark");
    v.flush().expect("flush");
    let at_end = whole(&v);
    (v, common, at_common, at_end)
}

/// Checks a volume after a cut at `common` is done: the journal at the
/// common point, the branch complete.
fn check_cut(v: &Volume, common: u64, at_common: &[u8], at_end: &[u8], what: &str) {
    assert_eq!(v.last_lsn(), common, "{what}");
    assert!(whole(v) == at_common, "{what}: journal at the cut");
    assert_eq!(v.epoch(), 1, "{what}");
    let info = branch(v, "tail");
    assert!(info.readable, "{what}: {info:?}");
    assert_eq!(v.branches().len(), 1, "{what}");
    assert!(view_whole(v, "branch:tail") == at_end, "{what}: branch end");
    assert!(
        view_whole(v, &format!("branch:tail@lsn:{common}")) == at_common,
        "{what}"
    );
}

#[test]
fn a_cut_that_fails_or_crashes_at_any_step_is_done_or_not_begun() {
    let mut outcomes = (0, 0);
    for op in [FaultOp::Write, FaultOp::Sync, FaultOp::SyncDir] {
        for skip in 0.. {
            let fs = FaultStorage::new();
            let (v, common, at_common, at_end) = with_tail(&fs);
            fs.inject(Fault {
                op,
                path_contains: None,
                skip,
                count: None,
                // Not retried: the step fails at once.
                errno: libc::EROFS,
            });
            let cut = v.cut_to_branch(common, "tail");
            let crashes = [fs.process_crash(), fs.crash(skip), fs.crash(skip + 1000)];
            fs.clear_faults();
            drop(v);
            let what = format!("{op:?} failing after {skip}");
            for (i, crashed) in crashes.into_iter().enumerate() {
                let what = format!("{what}, crash {i}");
                let v = open(&crashed);
                let done = v.last_lsn() == common;
                if cut.is_ok() {
                    assert!(done, "{what}: the cut returned");
                }
                if !done {
                    // Not begun: the journal whole, no half branch; the
                    // same call again does it.
                    assert!(whole(&v) == at_end, "{what}: the tail is in the journal");
                    assert!(v.branches().is_empty(), "{what}: no half branch");
                    assert_eq!(v.epoch(), 2, "{what}");
                    v.cut_to_branch(common, "tail").expect("again");
                }
                check_cut(&v, common, &at_common, &at_end, &what);
                // Nothing is left behind: the journal goes on, and so
                // after a reopen.
                v.write(0, &pattern(1, 4096)).expect("write after");
                v.flush().expect("flush after");
                v.close().expect("close");
                let v = open(&crashed);
                assert_eq!(v.last_lsn(), common + 2, "{what}: a write and a flush");
                assert!(view_whole(&v, "branch:tail") == at_end, "{what}");
                outcomes.0 += usize::from(done);
                outcomes.1 += usize::from(!done);
            }
            if cut.is_ok() {
                break;
            }
        }
    }
    assert!(outcomes.0 > 0 && outcomes.1 > 0, "{outcomes:?}");
}

#[test]
fn a_cut_that_did_not_begin_completes_when_called_again() {
    let fs = FaultStorage::new();
    let (v, common, at_common, at_end) = with_tail(&fs);
    // Fails while copying the branch: nothing changed in the journal.
    fs.inject(Fault::once_after(FaultOp::Sync, 0, libc::EROFS).on_paths_containing("branches"));
    assert!(v.cut_to_branch(common, "tail").is_err());
    assert!(v.branches().is_empty());
    assert!(whole(&v) == at_end);
    let info = v
        .cut_to_branch(common, "tail")
        .expect("again")
        .expect("a tail");
    assert_eq!(info.base_lsn, common);
    assert!(whole(&v) == at_common);
    assert!(view_whole(&v, "branch:tail") == at_end);
    // Done: the same call again finds nothing after the common point.
    assert_eq!(v.cut_to_branch(common, "tail").expect("idempotent"), None);
}

#[test]
fn a_branch_reads_across_a_revert_and_an_epoch_and_survives_restarts() {
    let fs = FaultStorage::new();
    let (v, common, at_common, at_end) = with_tail(&fs);
    let info = v.cut_to_branch(common, "tail").expect("cut").expect("tail");
    assert_eq!(info.epochs, vec![1, 2]);
    assert_eq!(v.epoch(), 1, "the epoch raised in the tail went with it");
    let listed = v.branches();
    v.close().expect("close");
    for _ in 0..2 {
        let v = open(&fs);
        assert_eq!(v.branches(), listed);
        assert!(whole(&v) == at_common);
        assert!(view_whole(&v, "branch:tail") == at_end);
        // A writable view of a branch writes into a scratch overlay only.
        let scratch = v.view_writable(&point("branch:tail")).expect("writable");
        assert_eq!(scratch.branch(), Some("tail"));
        scratch.write(0, &[7u8; 4096]).expect("scratch write");
        drop(scratch);
        assert!(view_whole(&v, "branch:tail") == at_end);
        v.close().expect("close");
    }
}

#[test]
fn materialize_exports_a_branch_moment() {
    let fs = FaultStorage::new();
    let (v, common, at_common, at_end) = with_tail(&fs);
    v.cut_to_branch(common, "tail").expect("cut");
    let dir = tempfile::tempdir().expect("tempdir");
    let end = dir.path().join("end.img");
    let lsn = v
        .materialize(&point("branch:tail"), &end, &mut |_, _| {})
        .expect("materialize");
    assert_eq!(lsn, branch(&v, "tail").last_lsn);
    assert!(std::fs::read(&end).expect("image") == at_end);
    let base = dir.path().join("base.img");
    v.materialize(
        &point(&format!("branch:tail@lsn:{common}")),
        &base,
        &mut |_, _| {},
    )
    .expect("materialize");
    assert!(std::fs::read(&base).expect("image") == at_common);
}

#[test]
fn refusals_are_clear() {
    let fs = FaultStorage::new();
    let (v, common, _, _) = with_tail(&fs);
    let last = v.last_lsn();
    for bad in ["", "a b", "x@y", "a/b", &"n".repeat(129)] {
        assert!(
            matches!(v.cut_to_branch(common, bad), Err(Error::InvalidRequest(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        v.cut_to_branch(last + 1, "t"),
        Err(Error::InvalidRequest(m)) if m.contains("ends at lsn")
    ));
    assert_eq!(v.cut_to_branch(last, "t").expect("nothing follows"), None);
    assert!(matches!(
        v.view(&point("branch:nope")),
        Err(Error::UnknownBranch { name }) if name == "nope"
    ));
    assert!(matches!(
        v.drop_branch("nope"),
        Err(Error::UnknownBranch { .. })
    ));

    v.cut_to_branch(common, "tail").expect("cut");
    v.write(0, &pattern(3, 4096)).expect("write");
    assert!(matches!(
        v.cut_to_branch(common, "tail"),
        Err(Error::BranchExists { name, .. }) if name == "tail"
    ));
    for at in [
        format!("branch:tail@lsn:{}", common - 1),
        format!("branch:tail@lsn:{}", last + 1),
        "branch:tail@2000-01-01T00:00:00Z".to_owned(),
    ] {
        assert!(
            matches!(v.view(&point(&at)), Err(Error::OutsideWindow { .. })),
            "{at}"
        );
    }
    assert!(matches!(
        v.view(&point("branch:tail@bookmark:none")),
        Err(Error::NoSuchBookmark(_))
    ));
    // A branch's moments are not the journal's: no revert to them.
    assert!(matches!(
        v.revert(&point("branch:tail")),
        Err(Error::InvalidRequest(m)) if m.contains("branch")
    ));
}

#[test]
fn a_branch_holds_the_fold_until_dropped() {
    let (fs, v, clock) = new_clocked();
    for i in 0..20u8 {
        v.write(u64::from(i) * 4096, &pattern(i, 24576))
            .expect("write");
    }
    let common = v.last_lsn() - 8;
    let at_end = whole(&v);
    v.cut_to_branch(common, "tail").expect("cut");
    for i in 0..20u8 {
        v.write(u64::from(i) * 4096, &pattern(i + 1, 24576))
            .expect("write");
    }
    v.flush().expect("flush");
    clock.advance(7200 * SECOND);
    v.write(0, &[1u8; 512]).expect("write");
    v.fold_now().expect("fold");
    assert!(v.stats().base_lsn <= common, "the branch holds the fold");
    assert!(view_whole(&v, "branch:tail") == at_end);
    v.close().expect("close");

    let v = open_clocked(&fs, &clock);
    v.fold_now().expect("fold");
    assert!(v.stats().base_lsn <= common, "after a restart too");
    assert!(branch(&v, "tail").readable);
    v.drop_branch("tail").expect("drop");
    assert!(v.branches().is_empty());
    assert!(v.fold_now().expect("fold").is_some());
    assert!(v.stats().base_lsn > common, "dropped: the journal folds");
    v.close().expect("close");
    let v = open_clocked(&fs, &clock);
    assert!(v.branches().is_empty());
    assert!(matches!(
        v.drop_branch("tail"),
        Err(Error::UnknownBranch { .. })
    ));
}

#[test]
fn a_fold_the_hard_limit_forces_past_a_branch_makes_it_unreadable() {
    let fs = FaultStorage::new();
    let settings = VolumeSettings {
        journal_max: 8 * (64 << 10),
        journal_warn: 4 * (64 << 10),
        ..small_settings()
    };
    create(&fs, &settings);
    let v = open(&fs);
    for i in 0..4u8 {
        v.write(u64::from(i) * 4096, &pattern(i, 24576))
            .expect("write");
    }
    let common = v.last_lsn() - 2;
    v.cut_to_branch(common, "tail").expect("cut");
    assert!(branch(&v, "tail").readable);
    // Far more than the journal holds: the hard limit folds past the cut.
    for i in 0..200u64 {
        v.write((i % 40) * 24576, &pattern(i as u8, 24576))
            .expect("write");
    }
    wait_until("a forced fold", || v.stats().base_lsn > common);
    let info = branch(&v, "tail");
    assert!(!info.readable);
    assert!(
        info.problem
            .as_deref()
            .is_some_and(|p| p.contains("no longer holds")),
        "{info:?}"
    );
    assert!(matches!(
        v.view(&point("branch:tail")),
        Err(Error::BranchUnreadable { .. })
    ));
    v.close().expect("close");
    let v = open(&fs);
    assert!(!branch(&v, "tail").readable, "after a restart too");
    v.drop_branch("tail")
        .expect("an unreadable branch can be dropped");
}

#[test]
fn a_cut_before_a_branchs_base_makes_it_lost() {
    let fs = FaultStorage::new();
    let (v, common, at_common, _) = with_tail(&fs);
    let last = v.last_lsn();
    v.cut_to_branch(last - 1, "late")
        .expect("cut")
        .expect("tail");
    v.cut_to_branch(common, "early")
        .expect("cut")
        .expect("tail");
    assert!(whole(&v) == at_common);
    let late = branch(&v, "late");
    assert!(!late.readable);
    assert!(
        late.problem
            .as_deref()
            .is_some_and(|p| p.contains("cut at lsn")),
        "{late:?}"
    );
    assert!(branch(&v, "early").readable);
    v.close().expect("close");
    let v = open(&fs);
    assert!(!branch(&v, "late").readable, "durably");
}

#[test]
fn a_cut_into_folded_history_is_refused() {
    let (_fs, v, clock) = new_clocked();
    for i in 0..12u8 {
        v.write(u64::from(i) * 4096, &pattern(i, 24576))
            .expect("write");
    }
    v.flush().expect("flush");
    clock.advance(7200 * SECOND);
    v.write(0, &[1u8; 512]).expect("write");
    v.fold_now().expect("fold").expect("folded");
    let base = v.stats().base_lsn;
    assert!(matches!(
        v.cut_to_branch(base - 1, "t"),
        Err(Error::Folded { lsn, .. }) if lsn == base - 1
    ));
}

#[test]
fn damaged_branch_files_are_reported_not_read() {
    let fs = FaultStorage::new();
    let (v, common, _, _) = with_tail(&fs);
    v.cut_to_branch(common, "tail").expect("cut");
    v.close().expect("close");
    let records = Path::new(DIR).join("branches/tail.records");
    let good = fs.contents(&records).expect("records file");

    // A flipped byte in a payload, in a header, a truncated file.
    for (what, damage) in [
        ("payload checksum", 2048usize),
        ("no intact record header", 512 + 30),
    ] {
        let mut bytes = good.clone();
        bytes[damage] ^= 0x10;
        fs.set_contents(&records, bytes);
        let v = open(&fs);
        let err = v.view(&point("branch:tail")).expect_err(what);
        assert!(
            matches!(&err, Error::BranchUnreadable { reason, .. } if reason.contains(what)),
            "{what}: {err}"
        );
        v.close().expect("close");
    }
    fs.set_contents(&records, good[..good.len() - 512].to_vec());
    let v = open(&fs);
    let err = v.view(&point("branch:tail")).expect_err("short");
    assert!(err.to_string().contains("bytes"), "{err}");
    v.close().expect("close");

    // A damaged description: listed, not readable, can be dropped.
    let json = Path::new(DIR).join("branches/tail.json");
    fs.set_contents(&json, b"{ not json".to_vec());
    let v = open(&fs);
    let info = branch(&v, "tail");
    assert!(!info.readable && info.problem.is_some(), "{info:?}");
    assert!(matches!(
        v.view(&point("branch:tail")),
        Err(Error::BranchUnreadable { .. })
    ));
    assert!(matches!(
        v.cut_to_branch(v.last_lsn(), "tail"),
        Err(Error::BranchExists { .. })
    ));
    v.drop_branch("tail").expect("drop");
    assert!(v.branches().is_empty());
    assert!(fs.contents(&records).is_none(), "its files are gone");
    v.close().expect("close");
}

/// A description is JSON without a checksum: counts that read huge make
/// the branch unreadable (reading it allocates by the count, which the
/// file's size bounds), never abort the process.
#[test]
fn a_branch_description_with_a_huge_record_count_is_an_error_not_a_crash() {
    let fs = FaultStorage::new();
    let (v, common, _, _) = with_tail(&fs);
    v.cut_to_branch(common, "tail").expect("cut");
    v.close().expect("close");
    let json = Path::new(DIR).join("branches/tail.json");
    let text = fs.contents(&json).expect("description");
    let mut meta: serde_json::Value = serde_json::from_slice(&text).expect("json");
    let base = meta["base_lsn"].as_u64().expect("base");
    for (last, records) in [(base + (1 << 60), 1 << 60), (u64::MAX, u64::MAX - base)] {
        meta["last_lsn"] = last.into();
        meta["records"] = records.into();
        fs.set_contents(&json, serde_json::to_vec(&meta).expect("json"));
        let v = open(&fs);
        let err = v.view(&point("branch:tail")).expect_err("a wrong count");
        assert!(err.to_string().contains("inconsistent"), "{err}");
        v.close().expect("close");
    }
    meta["base_lsn"] = u64::MAX.into();
    fs.set_contents(&json, serde_json::to_vec(&meta).expect("json"));
    let v = open(&fs);
    assert!(
        v.view(&point("branch:tail")).is_err(),
        "base lsn at the end"
    );
    v.close().expect("close");
}

/// A cut whose volume.json write (step 6) failed has ended the journal at
/// the common point; its branch alone holds the records after it. A
/// damaged description then makes open refuse, naming it, rather than
/// roll the cut back (which would drop those records for good); restored,
/// the next open finishes the cut.
#[test]
fn a_damaged_branch_description_of_a_cut_under_way_makes_open_refuse() {
    let fs = FaultStorage::new();
    let (v, common, at_common, at_end) = with_tail(&fs);
    fs.inject(Fault::always(FaultOp::Write, libc::EIO).on_paths_containing("volume.tmp"));
    assert!(v.cut_to_branch(common, "tail").is_err());
    drop(v);
    fs.clear_faults();
    assert!(
        fs.contents(&Path::new(DIR).join("cut")).is_some(),
        "the cut is under way"
    );

    let json = Path::new(DIR).join("branches/tail.json");
    let good = fs.contents(&json).expect("description");
    let text = String::from_utf8(good.clone()).expect("utf8");
    let flipped = text.replacen("\"records\": ", "\"records\": 1", 1);
    for damaged in [flipped.into_bytes(), b"{ not json".to_vec()] {
        assert_ne!(damaged, good);
        fs.set_contents(&json, damaged);
        match Volume::open(fs.arc(), Path::new(DIR), options()) {
            Err(Error::BadMetadata { path, reason }) => {
                assert_eq!(path, json, "{reason}");
                assert!(reason.contains("restore the description"), "{reason}");
            }
            Err(e) => panic!("{e}"),
            Ok((v, _)) => panic!("opened at lsn {} of {common}", v.last_lsn()),
        }
    }
    fs.set_contents(&json, good);
    let v = open(&fs);
    check_cut(&v, common, &at_common, &at_end, "restored");
    v.close().expect("close");
}
