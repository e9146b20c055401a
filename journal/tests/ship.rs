//! Shipping records from a primary to a replica volume: the replica holds
//! the same disk at every lsn it acknowledged, refuses anything malformed
//! without appending, and survives a reopen.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use rewind_journal::fault::FaultStorage;
use rewind_journal::{
    Clock, Error, ManualClock, OpenOptions, PointInTime, Role, ShippedRecord, Volume,
};

const REPLICA: &str = "/replica";

fn new_replica(fs: &FaultStorage, primary: &Volume, options: OpenOptions) -> Volume {
    Volume::create_replica(
        fs,
        Path::new(REPLICA),
        &small_settings(),
        primary.config().uuid,
    )
    .expect("create replica");
    open_replica(fs, options)
}

fn open_replica(fs: &FaultStorage, options: OpenOptions) -> Volume {
    Volume::open(fs.arc(), Path::new(REPLICA), options)
        .expect("open replica")
        .0
}

/// Options on `clock`: a primary's whose time the test moves, and its
/// replica's, whose host's clock agrees.
fn on_clock(clock: &Arc<ManualClock>) -> OpenOptions {
    OpenOptions {
        clock: clock.clone(),
        ..options()
    }
}

/// Ships everything durable on `from` to `to` in batches of about
/// `batch` bytes; returns the replica's durable lsn.
fn ship(from: &Volume, to: &Volume, batch: usize) -> u64 {
    let mut acked = to.durable_lsn();
    loop {
        let got = from.read_shipped(to.last_lsn() + 1, batch).expect("read");
        if got.records.is_empty() {
            return acked;
        }
        assert_eq!(got.records[0].lsn(), to.last_lsn() + 1);
        acked = to.apply_shipped(&got.records).expect("apply");
        assert_eq!(acked, to.last_lsn(), "a batch is durable when applied");
    }
}

fn disk_at(v: &Volume, lsn: u64) -> Vec<u8> {
    let view = v.view(&PointInTime::Lsn(lsn)).expect("view");
    let mut buf = vec![0u8; v.size() as usize];
    view.read(0, &mut buf).expect("read view");
    buf
}

/// A new primary whose clock the test moves (to let records leave the
/// window).
fn clocked_primary() -> (FaultStorage, Volume, Arc<ManualClock>) {
    let fs = FaultStorage::new();
    create(&fs, &small_settings());
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let primary = Volume::open(fs.arc(), Path::new(DIR), on_clock(&clock))
        .expect("open")
        .0;
    (fs, primary, clock)
}

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Zero { sector: u64, sectors: u64 },
    Flush,
    Bookmark,
    Revert,
    Epoch,
    Ship { batch: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..2000, 1u64..300, any::<u8>())
            .prop_map(|(sector, sectors, seed)| Op::Write { sector, sectors, seed }),
        1 => (0u64..2000, 1u64..100).prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        2 => Just(Op::Flush),
        1 => Just(Op::Bookmark),
        1 => Just(Op::Revert),
        1 => Just(Op::Epoch),
        2 => prop_oneof![Just(600usize), Just(64 << 10), Just(1 << 20)]
            .prop_map(|batch| Op::Ship { batch }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the primary does, the replica holds the same disk at every
    /// lsn once shipped, and the same again after a reopen.
    #[test]
    fn a_replica_holds_the_primary_at_every_lsn(ops in prop::collection::vec(op(), 1..40)) {
        let (fs, primary) = new_volume();
        let mut replica = new_replica(&fs, &primary, options());
        let mut bookmarks = 0;
        for op in &ops {
            match *op {
                Op::Write { sector, sectors, seed } => {
                    let sectors = sectors.min(2048 - sector);
                    primary.write(sector * 512, &pattern(seed, (sectors * 512) as usize)).expect("write");
                }
                Op::Zero { sector, sectors } => {
                    let sectors = sectors.min(2048 - sector);
                    primary.discard(sector * 512, sectors * 512).expect("discard");
                }
                Op::Flush => primary.flush().expect("flush"),
                Op::Bookmark => {
                    bookmarks += 1;
                    primary.bookmark(&format!("b{bookmarks}"), bookmarks % 2 == 0).expect("bookmark");
                }
                Op::Revert => {
                    let to = primary.last_lsn() / 2;
                    if to >= primary.timeline().start_lsn {
                        primary.revert(&PointInTime::Lsn(to)).expect("revert");
                    }
                }
                Op::Epoch => { primary.raise_epoch().expect("epoch"); }
                Op::Ship { batch } => { ship(&primary, &replica, batch); }
            }
        }
        primary.flush().expect("flush");
        let acked = ship(&primary, &replica, 64 << 10);
        prop_assert_eq!(acked, primary.durable_lsn());
        prop_assert_eq!(replica.epoch(), primary.epoch());
        prop_assert_eq!(replica.epoch_history(), primary.epoch_history());
        prop_assert_eq!(replica.bookmarks(), primary.bookmarks());
        let every = (acked / 6).max(1);
        let points: Vec<u64> = (0..=acked).step_by(every as usize).chain([acked]).collect();
        for &lsn in &points {
            prop_assert!(disk_at(&replica, lsn) == disk_at(&primary, lsn), "lsn {}", lsn);
        }
        drop(replica);
        replica = open_replica(&fs, options());
        prop_assert_eq!(replica.role(), Role::Replica);
        prop_assert_eq!(replica.epoch(), primary.epoch());
        prop_assert_eq!(replica.epoch_history(), primary.epoch_history());
        prop_assert!(replica.last_lsn() >= acked);
        for &lsn in &points {
            prop_assert!(disk_at(&replica, lsn) == disk_at(&primary, lsn), "lsn {} after reopen", lsn);
        }
    }
}

/// A primary with a few records, flushed, and a replica that has none.
fn pair() -> (FaultStorage, Volume, Volume, Vec<ShippedRecord>) {
    let (fs, primary) = new_volume();
    let replica = new_replica(&fs, &primary, options());
    for i in 0..4u8 {
        primary
            .write(u64::from(i) * 4096, &pattern(i, 4096))
            .expect("write");
    }
    primary.flush().expect("flush");
    let records = primary.read_shipped(1, 1 << 20).expect("read").records;
    assert_eq!(
        records.len(),
        4,
        "four writes (the flush record is not yet durable)"
    );
    (fs, primary, replica, records)
}

fn refused(replica: &Volume, records: &[ShippedRecord], why: &str) {
    let err = replica.apply_shipped(records).expect_err(why);
    assert!(
        matches!(err, Error::BadShipped { .. }) && err.to_string().contains(why),
        "{err}"
    );
    assert_eq!(replica.last_lsn(), 0, "nothing appended after: {err}");
}

#[test]
fn malformed_records_are_refused_and_nothing_is_appended() {
    let (_fs, _primary, replica, records) = pair();

    let mut flipped = records.clone();
    flipped[2].header[30] ^= 1;
    refused(&replica, &flipped, "header checksum fails");

    let mut payload = records.clone();
    payload[3].payload[100] ^= 0x40;
    refused(&replica, &payload, "payload checksum fails");

    let mut short = records.clone();
    short[1].payload.truncate(512);
    refused(
        &replica,
        &short,
        "512 payload bytes arrived for a 4096-byte payload",
    );

    let mut swapped = records.clone();
    swapped.swap(1, 2);
    refused(&replica, &swapped, "lsn 3 arrived where 2 was due");

    refused(&replica, &records[1..], "lsn 2 arrived where 1 was due");

    replica.apply_shipped(&records).expect("intact records");
    assert_eq!(replica.last_lsn(), 4);
    replica.flush().expect("flush");
    assert_eq!(replica.last_lsn(), 4, "a replica's flush appends no record");
    let err = replica.apply_shipped(&records).expect_err("a replay");
    assert!(
        err.to_string().contains("lsn 1 arrived where 5 was due"),
        "{err}"
    );
}

/// A primary whose clock runs ahead of its replica's, by a day here,
/// still replicates: the replica takes the records at the primary's times
/// (refusing them would stop replication, and a failover with it, until
/// its own clock caught up), and its timeline is the primary's.
#[test]
fn records_from_a_clock_ahead_of_the_replicas_are_taken_at_their_times() {
    const DAY_NS: u64 = 86_400_000_000_000;
    let (fs, primary, clock) = clocked_primary();
    // The replica's clock stays where the primary's starts.
    let replica_clock = Arc::new(ManualClock::new(clock.now_ns()));
    let replica = new_replica(&fs, &primary, on_clock(&replica_clock));
    clock.advance(DAY_NS);
    primary.write(0, &pattern(1, 4096)).expect("write");
    clock.advance(1);
    primary.write(4096, &pattern(2, 4096)).expect("write");
    primary.flush().expect("flush");
    let records = primary.read_shipped(1, 1 << 20).expect("read").records;
    assert_eq!(records.len(), 2);
    assert_eq!(replica.apply_shipped(&records).expect("a day ahead"), 2);
    // A header's time field: bytes 24..32.
    let times = |v: &Volume| {
        let shipped = v.read_shipped(1, 1 << 20).expect("read").records;
        shipped
            .iter()
            .map(|r| u64::from_le_bytes(r.header[24..32].try_into().expect("8 bytes")))
            .collect::<Vec<_>>()
    };
    assert_eq!(times(&replica), times(&primary));
    assert!(times(&replica)[0] >= replica_clock.now_ns() + DAY_NS);
}

#[test]
fn an_older_epoch_is_refused() {
    let (fs, primary, replica, records) = pair();
    replica.apply_shipped(&records).expect("epoch 1");
    primary.raise_epoch().expect("raise");
    primary.write(0, &pattern(9, 512)).expect("write");
    primary.flush().expect("flush");
    let newer = primary.read_shipped(5, 1 << 20).expect("read").records;
    replica.apply_shipped(&newer).expect("epoch 2");
    assert_eq!(replica.epoch(), 2);

    // A copy of the primary from before the raise writes on at epoch 1.
    let stale = {
        drop(replica);
        let stale_fs = fs.clone();
        let v = open_replica(&stale_fs, options());
        assert_eq!(v.epoch(), 2, "the raise is durable at the replica");
        v
    };
    let (_fs2, old_primary) = new_volume();
    for i in 0..12u8 {
        old_primary.write(0, &pattern(i, 512)).expect("write");
    }
    old_primary.flush().expect("flush");
    let old = old_primary.read_shipped(7, 1 << 20).expect("read").records;
    let err = stale.apply_shipped(&old[..1]).expect_err("older epoch");
    assert!(
        err.to_string()
            .contains("carries epoch 1 but this volume is at epoch 2"),
        "{err}"
    );
}

#[test]
fn folding_waits_for_the_replica_and_what_is_folded_cannot_be_read() {
    let (_fs, primary, replica, records) = pair();
    primary.hold_for_replica(Some(0));
    // Nothing left the hour-long window: only the hard limit folds.
    let big = pattern(7, 32 << 10);
    for i in 0..2500u64 {
        primary.write((i % 32) * (32 << 10), &big).expect("write");
    }
    primary.flush().expect("flush");
    assert!(
        primary.stats().forced_folds > 0,
        "the hard limit forced folds"
    );
    let map = primary
        .out_of_sync()
        .expect("the forced fold says it passed the hold");
    assert_eq!(map.from_lsn, 0);
    // Every write went to the first MiB, in 32 KiB pieces.
    assert_eq!(map.marked_bytes(), 1 << 20);
    assert!(map.any_in(0, 4096) && !map.any_in(1 << 20, 1 << 16));
    let err = primary.read_shipped(1, 1 << 20).expect_err("folded");
    assert!(matches!(err, Error::Folded { lsn: 1, .. }), "{err}");
    drop((replica, records));
}

#[test]
fn a_held_volume_folds_only_what_the_replica_holds() {
    let (_fs, primary, clock) = clocked_primary();
    for i in 0..40u8 {
        primary
            .write(u64::from(i) * 4096, &pattern(i, 4096))
            .expect("write");
    }
    primary.flush().expect("flush");
    clock.advance(2 * 3600 * 1_000_000_000);
    primary.hold_for_replica(Some(2));
    assert!(
        primary.fold_now().expect("fold").is_none(),
        "every segment holds a record past the hold"
    );
    primary.hold_for_replica(Some(30));
    let folded = primary.fold_now().expect("fold").expect("a fold");
    assert!(folded.base_lsn <= 30 && folded.base_lsn > 2, "{folded:?}");
    assert_eq!(primary.out_of_sync(), None, "not forced");
    let err = primary.read_shipped(1, 1 << 20).expect_err("folded");
    assert!(matches!(err, Error::Folded { lsn: 1, .. }), "{err}");
    let next = primary
        .read_shipped(folded.base_lsn + 1, 1 << 20)
        .expect("read after the fold");
    assert_eq!(next.records[0].lsn(), folded.base_lsn + 1);
}

/// Copies `primary`'s disk at `lsn` into the replica's base.img from
/// `from` on, chunk by chunk, as the resync sender does; stops after
/// `limit` bytes.
fn resync_copy(primary: &Volume, replica: &Volume, lsn: u64, from: u64, limit: u64) -> u64 {
    const CHUNK: u64 = 64 << 10;
    let view = primary.view(&PointInTime::Lsn(lsn)).expect("view");
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = from;
    while at < primary.size() && at < from.saturating_add(limit) {
        let len = CHUNK.min(primary.size() - at);
        let chunk = &mut buf[..len as usize];
        view.read(at, chunk).expect("read");
        if chunk.iter().all(|&b| b == 0) {
            replica.resync_zero(at, len).expect("zero");
        } else {
            replica.resync_write(at, chunk).expect("write");
        }
        at += len;
    }
    at
}

#[test]
fn a_resync_takes_the_disk_at_the_sync_point_and_survives_a_crash() {
    let (fs, primary, clock) = clocked_primary();
    for i in 0..40u8 {
        primary
            .write(u64::from(i) * 8192, &pattern(i, 8192))
            .expect("write");
    }
    primary.raise_epoch().expect("epoch 2");
    primary.flush().expect("flush");
    // Fold the first records into base.img: the journal alone cannot
    // rebuild the disk now.
    clock.advance(2 * 3600 * 1_000_000_000);
    assert!(primary.fold_now().expect("fold").is_some());
    for i in 0..8u8 {
        primary
            .write(u64::from(i) * 4096 + 700 * 512, &pattern(i ^ 0x33, 4096))
            .expect("write");
    }
    primary.flush().expect("flush");
    let replica = new_replica(&fs, &primary, on_clock(&clock));
    let err = primary.read_shipped(1, 1 << 20).expect_err("folded");
    assert!(matches!(err, Error::Folded { .. }), "{err}");

    let sync = primary.durable_lsn();
    let history: Vec<_> = primary.epoch_history();
    let sync_ns = primary
        .view(&PointInTime::Lsn(sync))
        .expect("view")
        .timestamp_ns();
    replica
        .begin_resync(sync, sync_ns, history.clone())
        .expect("begin");
    let half = resync_copy(&primary, &replica, sync, 0, primary.size() / 2);
    replica.resync_checkpoint(sync, half).expect("checkpoint");
    let more = resync_copy(&primary, &replica, sync, half, 128 << 10);
    assert!(more > half);
    // The replica crashes before the next checkpoint.
    drop(replica);
    let replica = open_replica(&fs, on_clock(&clock));
    let state = replica.resync_state().expect("the resync resumes");
    assert_eq!((state.sync_lsn, state.next_offset), (sync, half));
    let err = replica.view(&PointInTime::Lsn(0)).expect_err("resyncing");
    assert!(matches!(err, Error::Resyncing { .. }), "{err}");
    resync_copy(&primary, &replica, sync, state.next_offset, u64::MAX);
    replica.finish_resync(sync).expect("finish");
    assert_eq!(replica.epoch(), 2);
    assert_eq!(replica.epoch_history(), history);

    // Then it follows the journal from the sync point.
    primary.write(0, &pattern(99, 4096)).expect("write");
    primary.flush().expect("flush");
    let acked = ship(&primary, &replica, 1 << 20);
    assert_eq!(acked, primary.durable_lsn());
    for lsn in [sync, acked] {
        assert!(
            disk_at(&replica, lsn) == disk_at(&primary, lsn),
            "lsn {lsn}"
        );
    }
    drop(replica);
    let replica = open_replica(&fs, on_clock(&clock));
    assert_eq!(replica.resync_state(), None);
    assert!(disk_at(&replica, acked) == disk_at(&primary, acked));
}

#[test]
fn a_diff_resync_sends_only_what_changed_and_keeps_the_rest_from_the_replica() {
    let (fs, primary, clock) = clocked_primary();
    // Both sides hold the first writes (some in the replica's journal).
    for i in 0..32u8 {
        primary
            .write(u64::from(i) * 32768, &pattern(i, 32768))
            .expect("write");
    }
    primary.flush().expect("flush");
    let replica = new_replica(&fs, &primary, on_clock(&clock));
    ship(&primary, &replica, 1 << 20);
    // The replica falls behind what the primary's journal keeps.
    for i in 0..4u8 {
        primary
            .write(u64::from(i) * 65536 + 4096, &pattern(i ^ 0x77, 4096))
            .expect("write");
    }
    primary.flush().expect("flush");
    clock.advance(2 * 3600 * 1_000_000_000);
    primary.fold_now().expect("fold").expect("a fold");
    primary.fold_now().expect("fold");
    let err = primary
        .read_shipped(replica.last_lsn() + 1, 1 << 20)
        .expect_err("folded");
    assert!(matches!(err, Error::Folded { .. }), "{err}");

    const CHUNK: u64 = 65536;
    let sync = primary.durable_lsn();
    let view = primary.view(&PointInTime::Lsn(sync)).expect("view");
    replica
        .begin_resync(sync, view.timestamp_ns(), primary.epoch_history())
        .expect("begin");
    let (mut sent, mut kept) = (0, 0);
    let (mut theirs, mut ours) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    for at in (0..primary.size()).step_by(CHUNK as usize) {
        view.read(at, &mut theirs).expect("primary");
        replica.resync_read_old(at, &mut ours).expect("replica");
        if ours == theirs {
            replica.resync_keep(at, CHUNK).expect("keep");
            kept += 1;
        } else {
            replica.resync_write(at, &theirs).expect("write");
            sent += 1;
        }
    }
    assert_eq!(
        sent, 4,
        "only the chunks written while the replica was behind"
    );
    assert_eq!(kept, primary.size() / CHUNK - 4);
    replica.finish_resync(sync).expect("finish");
    assert!(disk_at(&replica, sync) == disk_at(&primary, sync));
    primary.write(512, &pattern(1, 512)).expect("write");
    primary.flush().expect("flush");
    let acked = ship(&primary, &replica, 1 << 20);
    assert!(disk_at(&replica, acked) == disk_at(&primary, acked));
}

#[test]
fn changed_after_names_what_a_peer_lacks_of_the_live_disk() {
    let (_fs, v) = new_volume();
    let size = v.size();
    v.write(4096, &[1; 4096]).expect("write");
    let held = v.last_lsn();
    assert_eq!(v.changed_after(held), Vec::<(u64, u64)>::new());
    v.write(8192, &[2; 1024]).expect("write");
    v.write_zeroes(8704, 4096, false).expect("zero");
    v.flush().expect("flush");
    v.write(65536, &[3; 512]).expect("write");
    // Overlapping and touching ranges merge; a flush changes nothing.
    assert_eq!(
        v.changed_after(held),
        vec![(8192, 4608), (65536, 512)],
        "sorted and merged"
    );
    assert_eq!(v.changed_after(0), vec![(4096, 8704), (65536, 512)]);
    v.revert(&PointInTime::Lsn(held)).expect("revert");
    assert_eq!(
        v.changed_after(held),
        vec![(0, size)],
        "a revert: the whole disk"
    );
}
