//! Roles: promotion and demotion are durable, survive a crash at any of
//! their steps (the same call again completes them), and the epochs a copy
//! raises carry its node tag.

mod common;

use common::*;
use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
use rewind_journal::{
    AttachRecord, EpochStart, Role, Seal, Storage, Volume, KEEP_EPOCHS, MAX_EPOCHS,
};
use uuid::Uuid;

fn replica(fs: &FaultStorage) -> Volume {
    Volume::create_replica(
        fs,
        std::path::Path::new(DIR),
        &small_settings(),
        Uuid::new_v4(),
    )
    .expect("create replica");
    open(fs)
}

#[test]
fn promotion_and_demotion_are_durable_and_tagged_with_the_copy() {
    let fs = FaultStorage::new();
    let v = replica(&fs);
    assert_eq!(v.role(), Role::Replica);
    let node = v.node();
    assert_ne!(node, 0, "a new copy has a tag");
    let start = v.promote().expect("promote");
    assert_eq!(
        start,
        EpochStart {
            epoch: 2,
            first_lsn: 1,
            node
        }
    );
    v.write(0, &pattern(1, 4096)).expect("write as the primary");
    let seal = v.demote(true).expect("demote").expect("a seal");
    assert_eq!(
        seal,
        Seal {
            epoch: 2,
            lsn: v.last_lsn()
        }
    );
    assert_eq!(v.durable_lsn(), seal.lsn, "the trailing flush is durable");
    v.close().expect("close");

    let v = open(&fs);
    assert_eq!(v.role(), Role::Replica);
    assert_eq!(v.sealed(), Some(seal));
    assert_eq!(v.node(), node, "the tag is kept");
    assert_eq!(v.epoch_history().last(), Some(&start));
    // A demotion without a seal forgets the old one.
    v.promote().expect("promote again");
    assert_eq!(v.sealed(), None);
    assert_eq!(v.demote(false).expect("demote"), None);
    assert_eq!(v.sealed(), None);
}

#[test]
fn a_promotion_or_demotion_that_crashes_at_any_step_completes_when_run_again() {
    let mut outcomes = [0usize; 2];
    for op in [FaultOp::Write, FaultOp::Sync, FaultOp::SyncDir] {
        for skip in 0.. {
            let fs = FaultStorage::new();
            let v = replica(&fs);
            fs.inject(Fault {
                op,
                path_contains: None,
                skip,
                count: None,
                errno: libc::EROFS,
            });
            let promoted = v.promote();
            let crashes = [fs.process_crash(), fs.crash(skip)];
            fs.clear_faults();
            drop(v);
            for (i, crashed) in crashes.into_iter().enumerate() {
                let what = format!("{op:?} failing after {skip}, crash {i}");
                let v = open(&crashed);
                if promoted.is_ok() {
                    assert_eq!(v.role(), Role::Primary, "{what}: it returned");
                }
                let done = v.role() == Role::Primary;
                outcomes[usize::from(done)] += 1;
                if !done {
                    // Never half a primary: the role is the replica's, and
                    // the same call makes it the primary (an epoch raised
                    // before the crash stays in the history, unused).
                    let start = v.promote().expect(&what);
                    assert_eq!(v.epoch_history().last(), Some(&start), "{what}");
                }
                assert_eq!(v.role(), Role::Primary, "{what}");
                let seal = v.demote(true).expect(&what).expect("a seal");
                v.close().expect(&what);
                let v = open(&crashed);
                assert_eq!(
                    (v.role(), v.sealed()),
                    (Role::Replica, Some(seal)),
                    "{what}"
                );
            }
            if promoted.is_ok() {
                break;
            }
        }
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

#[test]
fn a_replica_takes_the_node_tag_of_the_copy_that_raised_an_epoch() {
    let (fs, primary) = new_volume();
    primary.write(0, &pattern(2, 4096)).expect("write");
    primary.raise_epoch().expect("raise");
    let history = primary.epoch_history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].node, 0, "epoch 1 is every copy's");
    assert_eq!(history[1].node, primary.node());
    // The tag is in the Epoch record: recovery finds it without volume.json.
    primary.close().expect("close");
    let json = std::path::Path::new(DIR).join("volume.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs.contents(&json).expect("volume.json")).expect("json");
    config["epoch"] = serde_json::json!(1);
    config["epoch_history"] = serde_json::json!([{"epoch": 1, "first_lsn": 1, "node": 0}]);
    fs.set_contents(&json, serde_json::to_vec(&config).expect("json"));
    let v = open(&fs);
    assert_eq!(v.epoch_history(), history);
}

/// The failover bench once saw a seal wait for two records its replica
/// never got: `sync_all` returned the last lsn while a flush running beside
/// it (the sender's) had its Flush record reserved but not yet durable, and
/// nothing flushed again. What `sync_all` returns must be durable.
#[test]
fn sync_all_returns_an_lsn_that_is_durable_while_other_flushes_run() {
    let fs = FaultStorage::new();
    let v = std::sync::Arc::new(replica(&fs));
    v.promote().expect("promote");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (v, stop) = (v.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                v.flush().expect("flush beside");
            }
        })
    };
    for i in 0..2000u64 {
        v.write((i % 64) * 4096, &pattern((i % 251) as u8, 4096))
            .expect("write");
        let lsn = v.sync_all().expect("sync_all");
        let durable = v.durable_lsn();
        assert!(
            durable >= lsn,
            "round {i}: sync_all returned lsn {lsn}, but only {durable} is durable"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().expect("the flusher");
}

/// The volume.json of the volume at `DIR`.
fn volume_json(fs: &FaultStorage) -> Vec<u8> {
    let file = fs
        .open(&std::path::Path::new(DIR).join("volume.json"))
        .expect("open volume.json");
    let mut bytes = vec![0; file.size().expect("size") as usize];
    file.read_exact_at(&mut bytes, 0).expect("read volume.json");
    bytes
}

/// Rewrites the volume.json of the closed volume at `DIR` with `change`
/// made to it.
fn edit_volume_json(fs: &FaultStorage, change: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_slice(&volume_json(fs)).expect("volume.json");
    change(&mut json);
    let mut bytes = serde_json::to_vec_pretty(&json).expect("json");
    bytes.push(b'\n');
    fs.write_file_atomic(&std::path::Path::new(DIR).join("volume.json"), &bytes)
        .expect("write volume.json");
}

/// `count` epoch history entries, each written at its widest.
fn wide_history(count: usize) -> serde_json::Value {
    let wide = EpochStart {
        epoch: u64::MAX,
        first_lsn: u64::MAX,
        node: u64::MAX,
    };
    serde_json::to_value(vec![wide; count]).expect("json")
}

/// Raises `count` epochs; where each began.
fn raise(v: &Volume, count: usize) -> Vec<EpochStart> {
    (0..count)
        .map(|_| {
            let epoch = v.raise_epoch().expect("raise the epoch");
            let start = *v.epoch_history().last().expect("an epoch");
            assert_eq!(start.epoch, epoch);
            start
        })
        .collect()
}

/// Every role change raises an epoch, however many came before: past
/// MAX_EPOCHS the history forgets its oldest, keeps the newest as they
/// were, and the volume opens with them. A cut to before the oldest kept
/// is refused (which epoch was in force there is forgotten).
#[test]
fn raising_past_the_most_epochs_forgets_the_oldest_and_keeps_the_newest() {
    let (fs, v) = new_volume();
    v.write(0, &pattern(1, 4096)).expect("write");
    v.flush().expect("flush");
    let early = v.last_lsn();
    let mut all = v.epoch_history();
    all.extend(raise(&v, MAX_EPOCHS));
    assert_eq!(v.epoch(), MAX_EPOCHS as u64 + 1);
    let kept = v.epoch_history();
    assert_eq!(kept.len(), KEEP_EPOCHS);
    assert_eq!(kept[..], all[all.len() - KEEP_EPOCHS..]);

    // Fence, demote, promote: all raise (or keep) the epoch as before.
    all.extend(raise(&v, 10));
    v.demote(true).expect("demote");
    let promoted = v.promote().expect("promote past the cap");
    assert_eq!(promoted.epoch, MAX_EPOCHS as u64 + 12);
    all.push(promoted);
    let kept = v.epoch_history();
    assert_eq!(kept[..], all[all.len() - KEEP_EPOCHS - 11..]);
    let lsn = v.last_lsn();
    drop(v);

    let v = open(&fs);
    assert_eq!(v.epoch_history(), kept);
    assert_eq!((v.epoch(), v.last_lsn()), (promoted.epoch, lsn));
    assert_eq!(read(&v, 0, 4096), pattern(1, 4096));
    let refused = v
        .cut_to_branch(early, "before")
        .expect_err("a cut before the oldest epoch kept")
        .to_string();
    assert!(
        refused.contains(&format!(
            "cannot cut at lsn {early}: it is before epoch {}, the oldest",
            kept[0].epoch
        )),
        "{refused}"
    );
    assert!(v.branches().is_empty());
    assert_eq!((v.last_lsn(), v.epoch_history()), (lsn, kept.clone()));
    // A cut after it forgets only the epochs that began after the cut.
    let at = kept[5].first_lsn;
    v.cut_to_branch(at, "after")
        .expect("cut")
        .expect("a branch");
    assert_eq!(v.epoch_history()[..], kept[..6]);
    assert_eq!(v.epoch(), kept[5].epoch);
}

#[test]
fn a_volume_json_an_open_would_refuse_is_not_written() {
    const MAX_VOLUME_FILE: usize = 1 << 20;
    let (fs, v) = new_volume();
    drop(v);
    // As many entries as keep volume.json just under its cap (hand
    // written: a history past 4096 epochs forgets the oldest).
    let size = |count| {
        edit_volume_json(&fs, |json| json["epoch_history"] = wide_history(count));
        volume_json(&fs).len()
    };
    let (one, two) = (size(1), size(2));
    let count = 1 + (MAX_VOLUME_FILE - 64 - one) / (two - one);
    assert!(size(count) <= MAX_VOLUME_FILE - 64);
    let v = open(&fs);
    let before = volume_json(&fs);
    let record = AttachRecord {
        client: "c".repeat(64),
        epoch: 1,
        left_lsn: None,
    };
    let e = v.note_attach(record).expect_err("past the cap");
    let text = e.to_string();
    assert!(
        matches!(e, rewind_journal::Error::NotStored { .. }),
        "{text}"
    );
    assert!(text.contains("a volume.json is at most 1048576"), "{text}");
    assert_eq!(volume_json(&fs), before);
    assert!(v.attach_records().is_empty());
    drop(v);
    assert!(open(&fs).attach_records().is_empty());
}
