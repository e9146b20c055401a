//! Replication through a fault-injecting proxy between two real
//! `rewind-blk` daemons: delays, stalls, cuts, a corrupted byte and
//! reordered chunks on the wire. After each fault the link must come back
//! by itself and the replica must hold exactly the primary's disk at the
//! lsn it acknowledged: nothing lost, nothing wrong appended.

mod common;

use std::time::{Duration, Instant};

use common::client::{pattern, Client};
use common::proxy::Proxy;
use common::replication::*;
use common::{wait_until, TestVolume};
use rand::RngCore;
use serde_json::Value;

/// A primary that reaches its replica through a proxy.
fn start(primary_vol: TestVolume, primary_extra: &[&str]) -> (Pair, Proxy) {
    let mut proxy = None;
    let pair = Pair::start_routed(primary_vol, primary_extra, &mut |replica_port| {
        let started = Proxy::start(replica_port);
        let port = started.port();
        proxy = Some(started);
        port
    });
    (pair, proxy.expect("the pair was routed through the proxy"))
}

/// `count` writes of `len` bytes from `offset` on (random data: it does
/// not compress), then a flush.
fn write_round(client: &mut Client, offset: u64, count: u64, len: usize) {
    let mut data = vec![0u8; len];
    for i in 0..count {
        rand::rng().fill_bytes(&mut data);
        assert_eq!(client.write(0, offset + i * len as u64, &data), 0);
    }
    assert_eq!(client.flush(0), 0);
}

/// Waits for the replica to catch up, then checks that both disks are the
/// same at the acknowledged lsn; returns it.
fn converged(pair: &Pair) -> u64 {
    let acked = pair.caught_up();
    assert!(
        pair.replica.materialize(acked) == pair.primary.materialize(acked),
        "the disks differ at lsn {acked}"
    );
    acked
}

/// A libblkio client of the primary (its socket file appears only once it
/// accepts).
fn connect(pair: &Pair) -> Client {
    Client::connect(&pair.primary.vol.socket, 1)
}

fn state(node: &Node) -> Value {
    node.replication()
}

/// The replica's TLS layer refused what came in (a bad record MAC, a
/// record out of sequence, a garbled record header), and closed the
/// session.
fn refused_by_tls(pair: &Pair) {
    let status = state(&pair.replica);
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("reading from the primary: network:"),
        "{status}"
    );
}

#[test]
fn a_slow_link_delays_the_replica_but_it_converges() {
    let (pair, proxy) = start(TestVolume::create(SIZE), &[]);
    let mut client = connect(&pair);
    write_round(&mut client, 0, 8, 64 << 10);
    let before = converged(&pair);

    proxy.delay(Duration::from_millis(50));
    let (mut most_records, mut most_seconds) = (0, 0.0f64);
    for round in 1..5u64 {
        write_round(&mut client, round * (1 << 20), 8, 64 << 10);
        // Half a MiB that does not compress, in chunks of at most 64 KiB
        // held 50 ms each: the replica is behind for a while.
        let status = state(&pair.primary);
        most_records = most_records.max(status["lag_records"].as_u64().expect("lag_records"));
        most_seconds = most_seconds.max(status["rpo_seconds"].as_f64().expect("rpo_seconds"));
    }
    assert!(
        most_records > 0 && most_seconds > 0.0,
        "no lag seen through a 50 ms delay: {most_records} records, {most_seconds} s"
    );
    let acked = converged(&pair);
    assert!(acked > before);
    assert_eq!(proxy.connections(), 1, "a delay is no reason to reconnect");
    let status = state(&pair.primary);
    assert_eq!(status["lag_records"], 0, "{status}");
    assert_eq!(status["rpo_seconds"], 0.0, "{status}");
}

#[test]
fn a_stalled_link_is_dropped_after_silence_and_comes_back() {
    let (pair, proxy) = start(TestVolume::create(SIZE), &[]);
    let mut client = connect(&pair);
    write_round(&mut client, 0, 8, 64 << 10);
    converged(&pair);
    let connections = proxy.connections();

    proxy.stall(true);
    let stalled = Instant::now();
    write_round(&mut client, 1 << 20, 8, 64 << 10);
    wait_until(
        "the primary to give up on the silent link",
        Duration::from_secs(20),
        || {
            let status = state(&pair.primary);
            status["state"] != "streaming" && status["last_error"].is_string()
        },
    );
    let noticed = stalled.elapsed();
    let status = state(&pair.primary);
    let error = status["last_error"].as_str().expect("last_error");
    assert!(error.contains("silent"), "{status}");
    // The last answer may have come up to a heartbeat before the stall.
    assert!(
        noticed >= Duration::from_secs(1),
        "the link went down {noticed:?} into the stall: {status}"
    );
    wait_until("the primary to dial again", Duration::from_secs(20), || {
        proxy.connections() > connections
    });

    proxy.stall(false);
    write_round(&mut client, 2 << 20, 8, 64 << 10);
    converged(&pair);
}

#[test]
fn a_link_cut_in_the_middle_of_a_batch_reconnects_and_converges() {
    let (pair, proxy) = start(TestVolume::create(SIZE), &[]);
    let mut client = connect(&pair);
    write_round(&mut client, 0, 8, 64 << 10);
    converged(&pair);
    let sent = proxy.bytes_to_replica();

    let cut = std::thread::scope(|s| {
        // Cut once 3.5 MiB of the writes below went over: inside a batch
        // (about 1 MiB each), while the writer goes on.
        let cutter = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if proxy.bytes_to_replica() > sent + (7 << 19) {
                    proxy.cut();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        });
        for round in 0..8u64 {
            write_round(&mut client, (4 + round * 2) << 20, 2, 1 << 20);
        }
        cutter.join().expect("the cutter")
    });
    assert!(cut, "the writes never reached the replica");
    converged(&pair);
    assert!(
        proxy.connections() >= 2,
        "{} connections",
        proxy.connections()
    );
}

#[test]
fn a_corrupted_byte_closes_the_link_which_comes_back() {
    let (pair, proxy) = start(TestVolume::create(SIZE), &[]);
    let mut client = connect(&pair);
    write_round(&mut client, 0, 8, 64 << 10);
    converged(&pair);
    let connections = proxy.connections();

    // Far enough into the records below to land inside a TLS record.
    proxy.corrupt_next(100_000);
    write_round(&mut client, 1 << 20, 4, 1 << 20);
    wait_until("the corruption", Duration::from_secs(20), || {
        !proxy.corruption_pending()
    });
    wait_until(
        "the link to be dialled again",
        Duration::from_secs(20),
        || proxy.connections() > connections,
    );
    write_round(&mut client, 8 << 20, 4, 64 << 10);
    converged(&pair);
    refused_by_tls(&pair);
}

#[test]
fn reordered_chunks_close_the_link_which_comes_back() {
    let (pair, proxy) = start(TestVolume::create(SIZE), &[]);
    let mut client = connect(&pair);
    write_round(&mut client, 0, 8, 64 << 10);
    converged(&pair);
    let connections = proxy.connections();

    proxy.reorder_next();
    write_round(&mut client, 1 << 20, 4, 1 << 20);
    wait_until("the reordering", Duration::from_secs(20), || {
        !proxy.reorder_pending()
    });
    wait_until(
        "the link to be dialled again",
        Duration::from_secs(20),
        || proxy.connections() > connections,
    );
    write_round(&mut client, 8 << 20, 4, 64 << 10);
    converged(&pair);
    refused_by_tls(&pair);
}

#[test]
fn a_link_cut_during_the_initial_resync_resumes_it() {
    // 32 MiB of data at 16 MiB/s: the resync takes about 2 s.
    let (pair, proxy) = start(imported(&[(0, 32 << 20)]), &["--replication-rate", "16M"]);
    wait_until("8 MiB of resync", Duration::from_secs(30), || {
        proxy.bytes_to_replica() > 8 << 20
    });
    let resync = resync_status(&pair.primary);
    proxy.cut();
    let done = resync["done_bytes"].as_u64().expect("a resync under way");
    assert!(done < 32 << 20, "the resync was over: {resync}");

    let mut client = connect(&pair);
    assert_eq!(client.write(0, 40 << 20, &pattern(7, 256 << 10)), 0);
    assert_eq!(client.flush(0), 0);
    converged(&pair);
    assert!(
        proxy.connections() >= 2,
        "{} connections",
        proxy.connections()
    );
}
