//! Replication between two real `rewind-blk` daemons over TCP on loopback
//! with mutual TLS: a libblkio client writes on the primary, and the
//! replica must hold the same disk at every lsn it acknowledged.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::{pattern, Client};
use common::replication::*;
use common::{wait_until, TestVolume};
use serde_json::{json, Value};

#[test]
fn the_replica_holds_the_primary_at_every_lsn() {
    let pair = Pair::start(&[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    let mut checkpoints = Vec::new();
    for round in 0..6u8 {
        for i in 0..8u64 {
            let data = pattern(round * 8 + i as u8, 64 << 10);
            assert_eq!(
                client.write(0, (u64::from(round) * 8 + i) * (256 << 10), &data),
                0
            );
        }
        assert_eq!(client.flush(0), 0);
        if round == 2 {
            pair.primary.ctl("bookmark", json!({"name": "middle"}));
        }
        checkpoints.push(
            pair.primary.ctl("status", Value::Null)["durable_lsn"]
                .as_u64()
                .expect("lsn"),
        );
    }
    // A revert is replicated as a record too.
    drop(client);
    wait_until("the client to detach", Duration::from_secs(30), || {
        pair.primary.ctl("status", Value::Null)["attached"].is_null()
    });
    pair.primary.ctl("drain", Value::Null);
    let reverted = pair.primary.ctl("revert", json!({"at": "bookmark:middle"}));
    pair.primary.ctl("resume", Value::Null);
    checkpoints.push(reverted["lsn"].as_u64().expect("revert lsn"));

    let acked = pair.caught_up();
    assert!(acked >= *checkpoints.last().expect("lsns"));
    let status = pair.primary.replication();
    assert_eq!(status["state"], "streaming", "{status}");
    assert_eq!(status["role"], "primary");
    assert_eq!(status["lag_records"], 0, "{status}");
    assert_eq!(status["rpo_seconds"], 0.0, "{status}");
    assert!(status["bytes_sent"].as_u64().expect("bytes") > 0);
    let replica = pair.replica.ctl("status", Value::Null);
    assert_eq!(replica["role"], "replica");
    assert_eq!(
        replica["state"], "drained",
        "a replica serves no guest: {replica}"
    );
    assert_eq!(replica["replication"]["state"], "streaming", "{replica}");

    for &lsn in &checkpoints {
        assert!(
            pair.replica.materialize(lsn) == pair.primary.materialize(lsn),
            "the disks differ at lsn {lsn}"
        );
    }
    let timeline = |n: &Node| n.ctl("timeline", Value::Null)["bookmarks"].clone();
    assert_eq!(timeline(&pair.replica), timeline(&pair.primary));
    // Records its primary never wrote cannot be added to a replica.
    let refused = pair
        .replica
        .try_ctl("bookmark", json!({"name": "x"}))
        .expect_err("replica");
    assert!(refused.to_string().contains("is a replica"), "{refused}");
}

#[test]
fn a_replica_killed_mid_stream_resumes_from_its_durable_lsn() {
    let mut pair = Pair::start(&[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    let write_round = |client: &mut Client, seed: u8| {
        for i in 0..32u64 {
            assert_eq!(
                client.write(0, i * (128 << 10), &pattern(seed ^ i as u8, 128 << 10)),
                0
            );
        }
        assert_eq!(client.flush(0), 0);
    };
    write_round(&mut client, 1);
    pair.caught_up();
    pair.replica.kill();
    // The primary goes on while the replica is away.
    write_round(&mut client, 2);
    wait_until(
        "the primary to see the loss",
        Duration::from_secs(30),
        || pair.primary.replication()["state"] != "streaming",
    );
    pair.replica.restart();
    write_round(&mut client, 3);
    pair.caught_up();
    // A clean stop in the middle of the stream writes nothing of the
    // replica's own (its lsns are the primary's).
    pair.replica.stop();
    write_round(&mut client, 4);
    pair.replica.restart();
    write_round(&mut client, 5);
    let acked = pair.caught_up();
    assert_eq!(
        pair.replica.materialize(acked),
        pair.primary.materialize(acked)
    );
}

#[test]
fn sync_mode_holds_flushes_for_the_replica_then_degrades() {
    let mut pair = Pair::start(&["--replication-mode", "sync", "--sync-timeout", "1s"]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    assert_eq!(client.write(0, 0, &pattern(1, 4096)), 0);
    assert_eq!(client.flush(0), 0);
    assert!(
        pair.replica_holds_what_is_durable(),
        "a completed flush in sync mode: the replica holds it"
    );

    pair.replica.kill();
    assert_eq!(client.write(0, 4096, &pattern(2, 4096)), 0);
    let started = Instant::now();
    assert_eq!(client.flush(0), 0);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the flush waited out --sync-timeout before degrading ({:?})",
        started.elapsed()
    );
    let status = pair.primary.replication();
    assert_eq!(status["state"], "degraded", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("degraded"),
        "{status}"
    );

    pair.replica.restart();
    wait_until(
        "sync replication to resume",
        Duration::from_secs(30),
        || pair.primary.replication()["state"] == "streaming",
    );
    assert_eq!(client.write(0, 8192, &pattern(3, 4096)), 0);
    assert_eq!(client.flush(0), 0);
    assert!(
        pair.replica_holds_what_is_durable(),
        "a completed flush in sync mode: the replica holds it"
    );
}

#[test]
fn a_fenced_primary_is_refused_by_its_replica() {
    let mut pair = Pair::start(&[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    assert_eq!(client.write(0, 0, &pattern(1, 65536)), 0);
    assert_eq!(client.flush(0), 0);
    drop(client);
    pair.caught_up();
    // A copy of the primary as it is now, at epoch 1.
    pair.primary.stop();
    let stale = TestVolume::create(SIZE);
    std::fs::remove_dir_all(&stale.path).expect("remove");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&pair.primary.vol.path)
        .arg(&stale.path)
        .status()
        .expect("cp");
    assert!(copied.success());

    pair.primary.restart();
    assert_eq!(pair.primary.ctl("fence", Value::Null)["epoch"], 2);
    wait_until(
        "the replica to take epoch 2",
        Duration::from_secs(30),
        || pair.replica.ctl("status", Value::Null)["epoch"] == 2,
    );
    pair.primary.stop();

    // The old copy comes back and keeps trying to ship at epoch 1.
    let old = Node::start(stale, pair.primary.args.clone());
    wait_until(
        "the stale primary to be refused",
        Duration::from_secs(30),
        || old.replication()["state"] == "outdated",
    );
    let status = old.replication();
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("epoch 1, older than this replica's 2"),
        "{status}"
    );
    let replica = pair.replica.replication();
    let error = replica["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("it was fenced"), "{replica}");
    assert_eq!(pair.replica.ctl("status", Value::Null)["epoch"], 2);
}

#[test]
fn a_new_replica_of_an_imported_volume_takes_its_data_and_no_zeroes() {
    // 3 MiB of data in a 64 MiB image: the rest is holes.
    let extents = [
        (0, 1 << 20),
        (20 << 20, 1 << 20),
        ((40 << 20) + 4096, 1 << 20),
    ];
    let pair = Pair::start_with(imported(&extents), &[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    assert_eq!(client.write(0, 10 << 20, &pattern(5, 256 << 10)), 0);
    assert_eq!(client.flush(0), 0);
    let acked = pair.caught_up();
    assert_eq!(
        pair.replica.materialize(acked),
        pair.primary.materialize(acked)
    );
    let status = pair.primary.replication();
    let sent = status["bytes_sent"].as_u64().expect("bytes_sent");
    // The data chunks (1 MiB each: 4 of them, the extent at 40 MiB + 4 KiB
    // spans two) and the records; no zero chunk goes over.
    assert!(sent > 3 << 20 && sent < 6 << 20, "{status}");
    assert_eq!(status["resync"], Value::Null, "{status}");
}

#[test]
fn a_resync_holds_its_rate_and_resumes_after_a_kill_of_the_replica() {
    const RATE: u64 = 5 << 20;
    let pair_vol = imported(&[(0, 64 << 20)]);
    let mut pair = Pair::start_with(
        pair_vol,
        &["--replication-rate", "5M", "--compress", "none"],
    );
    let sent = |node: &Node| {
        node.replication()["bytes_sent"]
            .as_u64()
            .expect("bytes_sent")
    };
    wait_until("the resync to start", Duration::from_secs(30), || {
        sent(&pair.primary) > 0
    });
    let (t0, b0) = (Instant::now(), sent(&pair.primary));
    wait_until("10 s of resync", Duration::from_secs(30), || {
        t0.elapsed() >= Duration::from_secs(10)
    });
    let (elapsed, bytes) = (t0.elapsed(), sent(&pair.primary) - b0);
    let rate = bytes as f64 / elapsed.as_secs_f64();
    assert!(
        (rate - RATE as f64).abs() < RATE as f64 * 0.1,
        "{rate:.0} bytes/s over {elapsed:?}, limit {RATE}"
    );
    // Kill the replica past its third checkpoint (16 MiB each).
    wait_until("48 MiB resynced", Duration::from_secs(30), || {
        resync_status(&pair.replica)["done_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 48 << 20
    });
    let before = sent(&pair.primary);
    pair.replica.kill();
    pair.replica.restart();
    // What `rewindctl replication --wait` shows: the resumed resync's
    // progress, then the link caught up.
    let mut seen = Vec::new();
    let link = rewind_ctl::wait_streaming(
        &pair.primary.control,
        Duration::from_secs(60),
        &mut |done, total| seen.push((done, total)),
    )
    .expect("caught up");
    assert_eq!(link["state"], "streaming");
    assert!(
        seen.iter()
            .any(|&(done, total)| total == 64 << 20 && done >= 48 << 20),
        "progress resumed past 48 MiB: {seen:?}"
    );
    let acked = pair.caught_up();
    // Resumed at 48 MiB: about 16 MiB more, not the whole disk again.
    let again = sent(&pair.primary) - before;
    assert!(again < 24 << 20, "{again} bytes sent after the restart");
    assert_eq!(
        pair.replica.materialize(acked),
        pair.primary.materialize(acked)
    );
}

/// Writes block after block (4 KiB, block i holding `pattern(i)`) on the
/// primary, each followed by a flush, counting the flushes that completed
/// (the independent log), until the primary is gone.
fn write_until_killed(socket: std::path::PathBuf, flushed: Arc<AtomicU64>) {
    let mut client = Client::connect(&socket, 1);
    for block in 0u64.. {
        let limit = Duration::from_secs(30);
        let written = client.write_within(block * 4096, &pattern(block as u8, 4096), limit);
        if written != Some(0) || client.flush_within(limit) != Some(0) {
            return;
        }
        flushed.store(block + 1, Ordering::SeqCst);
    }
}

/// Kills the primary (-9) while a client writes and flushes on it; returns
/// the blocks whose flush completed and the replica's image at its newest
/// lsn.
fn kill_primary_under_flushed_load(pair: &mut Pair) -> (u64, Vec<u8>) {
    // Past the initial resync: a replica killed in the middle of one holds
    // no readable state (it says so).
    pair.caught_up();
    let flushed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (socket, flushed) = (pair.primary.vol.socket.clone(), flushed.clone());
        std::thread::spawn(move || write_until_killed(socket, flushed))
    };
    wait_until("200 flushed writes", Duration::from_secs(60), || {
        flushed.load(Ordering::SeqCst) >= 200
    });
    pair.primary.kill();
    let covered = flushed.load(Ordering::SeqCst);
    writer
        .join()
        .expect("the writer ends once the primary is gone");
    wait_until(
        "the replica to see the primary gone",
        Duration::from_secs(30),
        || pair.replica.replication()["state"] == "disconnected",
    );
    let status = pair.replica.replication();
    assert!(
        status["outdated"]
            .as_str()
            .unwrap_or_default()
            .starts_with("unknown"),
        "a replica that lost its primary without a seal says so: {status}"
    );
    let last = pair.replica.ctl("status", Value::Null)["last_lsn"]
        .as_u64()
        .expect("lsn");
    (covered, pair.replica.materialize(last))
}

fn block(image: &[u8], i: u64) -> &[u8] {
    &image[(i * 4096) as usize..((i + 1) * 4096) as usize]
}

#[test]
fn after_a_kill_of_a_sync_primary_the_replica_holds_every_flushed_write() {
    let mut pair = Pair::start(&["--replication-mode", "sync"]);
    let (covered, image) = kill_primary_under_flushed_load(&mut pair);
    for i in 0..covered {
        assert!(
            block(&image, i) == pattern(i as u8, 4096),
            "block {i} of the {covered} whose flush completed is not on the replica"
        );
    }
}

#[test]
fn after_a_kill_of_an_async_primary_the_replica_holds_a_prefix_of_the_writes() {
    let mut pair = Pair::start(&[]);
    let (_, image) = kill_primary_under_flushed_load(&mut pair);
    // The writes were sequential: a crash-consistent state is blocks 0..k
    // written and nothing after.
    let blocks = image.len() as u64 / 4096;
    let k = (0..blocks)
        .find(|&i| block(&image, i) != pattern(i as u8, 4096))
        .unwrap_or(blocks);
    assert!(k > 0, "the replica holds some of the writes");
    for i in k..blocks {
        assert!(
            block(&image, i).iter().all(|&b| b == 0),
            "block {i} is written but block {k} before it is not: not a prefix"
        );
    }
}

#[test]
fn verify_finds_the_two_sides_equal_until_one_is_damaged() {
    let pair = Pair::start_with(imported(&[(0, 2 << 20)]), &[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    assert_eq!(client.write(0, 8 << 20, &pattern(3, 512 << 10)), 0);
    assert_eq!(client.flush(0), 0);
    let acked = pair.caught_up();
    let verify = || {
        rewind_ctl::verify(
            &pair.primary.control,
            &pair.replica.control,
            None,
            &mut |_, _| {},
        )
        .expect("verify")
    };
    let same = verify();
    assert_eq!(same["equal"], true, "{same}");
    assert_eq!(same["lsn"], acked);
    assert_eq!(same["chunks"], 64);

    // Damage the replica's copy of the imported data (behind its daemon's
    // back, as a failing disk would).
    let base = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.replica.vol.path.join("base.img"))
        .expect("base.img");
    std::os::unix::fs::FileExt::write_all_at(&base, &[0xee; 512], (1 << 20) + 4096)
        .expect("damage");
    let damaged = verify();
    assert_eq!(damaged["equal"], false, "{damaged}");
    assert_eq!(
        damaged["differing"],
        json!([{"offset": 1 << 20, "length": 1 << 20}]),
        "{damaged}"
    );
}

#[test]
fn after_a_forced_fold_a_behind_replica_is_sent_only_the_chunks_that_changed() {
    let primary_vol =
        TestVolume::create_with(SIZE, &["--segment-size", "1M", "--journal-max", "8M"]);
    let mut pair = Pair::start_with(primary_vol, &["--compress", "none"]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    // 8 MiB fill the journal: each MiB is on the replica before the next,
    // so no fold takes one the replica lacks (a slow replica did, once).
    for i in 0..8u64 {
        assert_eq!(
            client.write(0, i * (1 << 20), &pattern(i as u8, 1 << 20)),
            0
        );
        assert_eq!(client.flush(0), 0);
        pair.caught_up();
    }
    pair.replica.kill();
    // 24 MiB over the same 2 MiB while the replica is away: the 8 MiB
    // journal must fold records the replica never got.
    for round in 0..12u8 {
        for i in 0..2u64 {
            let data = pattern(round ^ (i as u8) ^ 0x55, 1 << 20);
            assert_eq!(client.write(0, (40 << 20) + i * (1 << 20), &data), 0);
        }
        assert_eq!(client.flush(0), 0);
    }
    let status = pair.primary.ctl("status", Value::Null);
    assert!(
        status["forced_folds"].as_u64().expect("forced_folds") > 0,
        "{status}"
    );
    let link = pair.primary.replication();
    assert_eq!(
        link["out_of_sync_bytes"],
        2 << 20,
        "the folded chunks are marked: {link}"
    );
    let before = link["bytes_sent"].as_u64().expect("sent");
    pair.replica.restart();
    let acked = pair.caught_up();
    let link = pair.primary.replication();
    assert_eq!(link["last_resync"]["mode"], "out-of-sync map", "{link}");
    assert_eq!(link["last_resync"]["data_bytes"], 2 << 20, "{link}");
    assert_eq!(link["out_of_sync_bytes"], 0, "the map is cleared: {link}");
    let sent = link["bytes_sent"].as_u64().expect("sent") - before;
    // The two changed MiB (and a few records), not the 10 MiB the disk holds.
    assert!(
        (2 << 20..3 << 20).contains(&sent),
        "{sent} bytes sent to bring the replica back"
    );
    assert_eq!(
        pair.replica.materialize(acked),
        pair.primary.materialize(acked)
    );
}

/// A pair in sync mode that holds flushes for a lost replica (`suspend`
/// after 500 ms), a client of `queues` queues whose first write and flush
/// the replica holds, and the replica killed.
fn sync_pair_without_its_replica(queues: i32) -> (Pair, Client) {
    let mut pair = Pair::start(&[
        "--replication-mode",
        "sync",
        "--sync-timeout",
        "500ms",
        "--on-replica-loss",
        "suspend",
    ]);
    let mut client = Client::connect(&pair.primary.vol.socket, queues);
    assert_eq!(client.write(0, 0, &pattern(1, 4096)), 0);
    assert_eq!(client.flush(0), 0);
    pair.caught_up();
    pair.replica.kill();
    (pair, client)
}

#[test]
fn sync_mode_suspends_without_the_replica_and_degrades_only_once_fence_peer_succeeds() {
    // suspend: a flush waits past --sync-timeout until the replica is back.
    let (mut pair, mut client) = sync_pair_without_its_replica(1);
    assert_eq!(
        client.write_within(4096, &pattern(2, 4096), Duration::from_secs(10)),
        Some(0)
    );
    assert_eq!(
        client.flush_within(Duration::from_secs(2)),
        None,
        "held past --sync-timeout"
    );
    assert_ne!(pair.primary.replication()["state"], "degraded");
    pair.replica.restart();
    pair.caught_up();
    assert!(pair.replica_holds_what_is_durable());
    drop(client);

    // degrade, but only once --fence-peer succeeds.
    let hook_dir = tempfile::tempdir().expect("tempdir");
    let marker = hook_dir.path().join("peer-fenced");
    let hook = format!("test -e {}", marker.display());
    let mut pair = Pair::start(&[
        "--replication-mode",
        "sync",
        "--sync-timeout",
        "500ms",
        "--fence-peer",
        &hook,
    ]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    pair.caught_up();
    pair.replica.kill();
    assert_eq!(
        client.write_within(0, &pattern(3, 4096), Duration::from_secs(10)),
        Some(0)
    );
    assert_eq!(
        client.flush_within(Duration::from_secs(2)),
        None,
        "the hook failed: held"
    );
    let status = pair.primary.replication();
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("--fence-peer failed"),
        "{status}"
    );
    std::fs::write(&marker, b"").expect("marker");
    assert_eq!(
        client.flush_within(Duration::from_secs(10)),
        Some(0),
        "the hook succeeded: degraded"
    );
    assert_eq!(pair.primary.replication()["state"], "degraded");
}

/// A fence while sync replication holds a flush for a lost replica, with
/// another queue's flush taken behind that sync: the fence releases both
/// (they fail) and completes, though the second reaches its wait for the
/// replica only after the release.
#[test]
fn a_fence_releases_flushes_queued_behind_a_held_sync() {
    let (pair, mut client) = sync_pair_without_its_replica(2);
    assert_eq!(client.write(0, 0, &pattern(2, 4096)), 0);
    assert_eq!(
        client.flush_within(Duration::from_secs(2)),
        None,
        "held past --sync-timeout"
    );
    // Queue 1's flush waits behind the held sync.
    assert_eq!(client.write(1, 4096, &pattern(3, 4096)), 0);
    client.submit_flush(1);
    // Two readings in a row: not queue 1's write, a moment before done.
    let mut seen = 0;
    wait_until("both flushes taken", Duration::from_secs(10), || {
        let both = pair.primary.ctl("status", Value::Null)["io"]["in_flight"] == 2;
        seen = if both { seen + 1 } else { 0 };
        seen == 2
    });
    let fenced = pair
        .primary
        .try_ctl("fence", json!({"timeout_ms": 10_000}))
        .expect("the fence completes");
    assert_eq!(fenced["state"], "fenced", "{fenced}");
    let limit = Duration::from_secs(10);
    let failed = (
        client.complete_within(0, limit),
        client.complete_within(1, limit),
    );
    assert!(
        matches!(failed, (Some(a), Some(b)) if a != 0 && b != 0),
        "both flushes failed: {failed:?}"
    );
}

#[test]
fn a_resync_resumes_after_a_kill_of_the_primary() {
    let mut pair = Pair::start_with(
        imported(&[(0, 64 << 20)]),
        &["--replication-rate", "8M", "--compress", "none"],
    );
    // Past the replica's second checkpoint (16 MiB each).
    wait_until("36 MiB resynced", Duration::from_secs(60), || {
        resync_status(&pair.replica)["done_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 36 << 20
    });
    pair.primary.kill();
    pair.primary.restart();
    let link = rewind_ctl::wait_streaming(
        &pair.primary.control,
        Duration::from_secs(60),
        &mut |_, _| {},
    )
    .expect("caught up");
    // The restarted primary sent what the replica lacked from its last
    // checkpoint (32 MiB on), not the whole disk again.
    let sent = link["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(sent < 40 << 20, "{sent} bytes sent after the restart");
    let acked = pair.caught_up();
    assert_eq!(
        pair.replica.materialize(acked),
        pair.primary.materialize(acked)
    );
}

#[test]
fn a_revert_to_before_the_replicas_history_resyncs_it() {
    let mut pair = Pair::start(&[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    assert_eq!(client.write(0, 0, &pattern(1, 1 << 20)), 0);
    assert_eq!(client.flush(0), 0);
    pair.primary.ctl("bookmark", json!({"name": "early"}));
    assert_eq!(client.write(0, 0, &pattern(2, 1 << 20)), 0);
    assert_eq!(client.flush(0), 0);
    // A new replica: its history starts after the bookmark.
    pair.replica.kill();
    let uuid = volume_uuid(&pair.primary.vol.path);
    pair.replica = Node::start(replica_volume(&uuid), pair.replica.args.clone());
    pair.caught_up();
    let early = pair.replica.try_ctl(
        "materialize",
        json!({"at": "bookmark:early", "output": "/nonexistent"}),
    );
    assert!(
        early.is_err(),
        "the bookmark is before the replica's history"
    );

    drop(client);
    wait_until("the client to detach", Duration::from_secs(30), || {
        pair.primary.ctl("status", Value::Null)["attached"].is_null()
    });
    pair.primary.ctl("drain", Value::Null);
    pair.primary.ctl("revert", json!({"at": "bookmark:early"}));
    pair.primary.ctl("resume", Value::Null);
    let acked = pair.caught_up();
    assert_eq!(
        pair.replica.materialize(acked),
        pair.primary.materialize(acked)
    );
    let status = pair.primary.replication();
    assert_eq!(status["state"], "streaming", "{status}");
    // No out-of-sync map tells what changed: the two sides compared hashes.
    assert_eq!(status["last_resync"]["mode"], "hash diff", "{status}");
}

/// A primary whose epoch history forgot its first epochs (it begins at
/// epoch 3000, written by hand here) still gets a new replica: the two
/// histories cannot be related, but a replica that holds no record loses
/// nothing to the full resync that gives it the primary's history; then
/// the stream goes on.
#[test]
fn a_new_replica_of_a_primary_whose_history_forgot_its_first_epochs_is_resynced() {
    let vol = TestVolume::create(SIZE);
    let path = vol.path.join("volume.json");
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("volume.json");
    config["epoch"] = 3000.into();
    config["epoch_history"] = json!([{"epoch": 3000, "first_lsn": 1, "node": 7}]);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("write");
    let pair = Pair::start_with(vol, &[]);
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    assert_eq!(client.write(0, 0, &pattern(1, 65536)), 0);
    assert_eq!(client.flush(0), 0);
    let acked = pair.caught_up();
    let status = pair.primary.replication();
    assert_eq!(status["last_resync"]["mode"], "full", "{status}");
    assert_eq!(client.write(0, 1 << 20, &pattern(2, 65536)), 0);
    assert_eq!(client.flush(0), 0);
    let later = pair.caught_up();
    assert!(later > acked);
    let replica = pair.replica.ctl("status", Value::Null);
    assert_eq!(replica["epoch"], 3000, "{replica}");
    assert_eq!(
        replica["epoch_history"],
        pair.primary.ctl("status", Value::Null)["epoch_history"]
    );
    assert_eq!(
        pair.replica.materialize(later),
        pair.primary.materialize(later)
    );
}

/// A resync interrupted (the replica killed) while the primary's epoch
/// history then forgets its oldest epochs (4096 fences: the history passes
/// MAX_EPOCHS and keeps the newest 2048, all begun after the sync point)
/// is not resumed: no kept epoch began by its sync point, so a begin could
/// list none and the replica would refuse it on every reconnect. The
/// primary starts a new resync instead, and the replica catches up.
#[test]
fn a_resync_interrupted_before_the_primary_forgot_its_epochs_restarts_and_finishes() {
    let mut pair = Pair::start_with(
        imported(&[(0, 64 << 20)]),
        &["--replication-rate", "8M", "--compress", "none"],
    );
    wait_until("20 MiB resynced", Duration::from_secs(60), || {
        resync_status(&pair.replica)["done_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 20 << 20
    });
    if let Some(mut server) = pair.replica.server.take() {
        server.kill();
    }
    let started = Instant::now();
    for _ in 0..4096 {
        pair.primary.ctl("fence", json!({"timeout_ms": 1000}));
    }
    eprintln!("4096 fences took {:?}", started.elapsed());
    let status = pair.primary.ctl("status", Value::Null);
    let history = status["epoch_history"].as_array().expect("history");
    assert_eq!(history.len(), 2048, "compacted");
    pair.replica.restart();
    let link = rewind_ctl::wait_streaming(
        &pair.primary.control,
        Duration::from_secs(60),
        &mut |_, _| {},
    );
    let replica = pair.replica.try_ctl("replication", Value::Null);
    assert!(
        link.is_ok(),
        "the replica never caught up: primary link {:?}; replica {:?}",
        pair.primary.replication(),
        replica
    );
    let acked = pair.caught_up();
    assert_eq!(
        pair.replica.ctl("status", Value::Null)["epoch_history"],
        pair.primary.ctl("status", Value::Null)["epoch_history"]
    );
    assert_eq!(
        pair.replica.materialize(acked),
        pair.primary.materialize(acked)
    );
}
