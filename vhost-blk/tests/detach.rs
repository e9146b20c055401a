//! `--on-storage-error detach` through the real daemons: a primary whose
//! journal sits on a small tmpfs that fills up (ENOSPC preparing a
//! segment) forwards its client's requests to its replica, which takes
//! over as primary. The client sees no error and reads what it wrote; the
//! replica then holds the disk exactly as the client last saw it. With the
//! replica lost too, requests fail after the hold (never silently).
//!
//! Mounting a tmpfs needs root, as the network-namespace tests do.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::client::{pattern, Client};
use common::proxy::Proxy;
use common::replication::*;
use common::tmpfs::TmpfsJournal;
use common::TestVolume;
use serde_json::{json, Value};

/// Writes `count` blocks of `len` bytes from `offset` on, each a
/// different pattern, into the client and the model; every write must
/// succeed.
fn write_blocks(client: &mut Client, model: &mut [u8], offset: u64, count: u64, len: usize) {
    for i in 0..count {
        let at = offset + i * len as u64;
        let data = pattern((at / len as u64) as u8 ^ 0x5a, len);
        assert_eq!(client.write(0, at, &data), 0, "write at {at}");
        model[at as usize..at as usize + len].copy_from_slice(&data);
    }
}

fn read_all(client: &mut Client, size: usize) -> Vec<u8> {
    let mut disk = Vec::with_capacity(size);
    for at in (0..size).step_by(1 << 20) {
        disk.extend(client.read(0, at as u64, 1 << 20));
    }
    disk
}

fn materialize_latest(node: &Node) -> Vec<u8> {
    let last = node.ctl("status", Value::Null)["last_lsn"]
        .as_u64()
        .expect("last_lsn");
    node.materialize(last)
}

#[test]
fn a_primary_whose_journal_filesystem_fills_up_forwards_to_its_replica() {
    let volume = TestVolume::create(SIZE);
    let tmpfs = TmpfsJournal::over(&volume, 256 << 20);
    let pair = Pair::start_with(
        volume,
        &["--on-storage-error", "detach", "--io-error-hold", "2s"],
    );
    let size = 64usize << 20;
    let mut model = vec![0u8; size];
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    write_blocks(&mut client, &mut model, 0, 64, 64 << 10);
    assert_eq!(client.flush(0), 0);
    pair.caught_up();
    let epoch = pair.primary.ctl("status", Value::Null)["epoch"]
        .as_u64()
        .expect("epoch");

    // The journal's prepared segments last a while; the next one cannot
    // be made.
    tmpfs.fill();
    let started = Instant::now();
    write_blocks(&mut client, &mut model, 4 << 20, 512, 64 << 10);
    let status = pair.primary.replication();
    let detached = &status["detached"];
    assert!(
        detached["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("detached: local storage failed (")
                && s.ends_with("evacuate with handover")),
        "{status}"
    );
    assert!(
        detached["reason"]
            .as_str()
            .is_some_and(|r| r.contains("No space left on device")),
        "{status}"
    );
    assert_eq!(detached["peer_epoch"], json!(epoch + 1), "{status}");
    assert!(
        detached["forwarded_requests"].as_u64() > Some(0),
        "{status}"
    );
    eprintln!(
        "32 MiB written across the detach in {:?}; the primary: {:#}",
        started.elapsed(),
        detached
    );

    // Reads come from the replica now, and see every write.
    assert!(
        read_all(&mut client, size) == model,
        "reads after the detach"
    );
    // Zeroes and flushes go through too.
    assert_eq!(client.flush(0), 0);

    let replica = pair.replica.ctl("status", Value::Null);
    assert_eq!(replica["epoch"], json!(epoch + 1), "{replica}");
    assert_eq!(replica["role"], "primary", "{replica}");
    let serving = &pair.replica.replication()["serving_detached"];
    assert!(serving["requests"].as_u64() > Some(0), "{serving}");
    eprintln!("the replica: {serving:#}");
    // The metrics say so too (`rewindctl metrics`).
    let series = |node: &Node, name: &str| {
        let text = node.ctl("metrics", Value::Null)["text"]
            .as_str()
            .expect("text")
            .to_string();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .to_string();
        line.rsplit(' ')
            .next()
            .expect("a value")
            .parse::<f64>()
            .expect("a number")
    };
    assert_eq!(series(&pair.primary, "rewind_detached"), 1.0);
    assert!(series(&pair.primary, "rewind_detached_forwarded_requests_total") > 0.0);
    assert_eq!(series(&pair.replica, "rewind_serving_detached"), 1.0);
    assert!(series(&pair.replica, "rewind_serving_detached_requests_total") > 0.0);
    assert_eq!(series(&pair.replica, "rewind_detached"), 0.0);
    assert!(
        materialize_latest(&pair.replica) == model,
        "the replica holds the disk as the client last saw it"
    );

    // The replica lost too: a request is held, then fails; never a
    // silent success.
    let mut pair = pair;
    pair.replica.kill();
    let data = pattern(7, 4096);
    let result = client.write_within(0, &data, Duration::from_secs(30));
    assert!(
        matches!(result, Some(r) if r != 0),
        "a write with no storage and no replica must fail, not {result:?}"
    );
}

#[test]
fn detach_needs_a_replica_to_forward_to() {
    let volume = TestVolume::create(SIZE);
    let out = Command::new(common::BIN)
        .args(["serve", "--volume"])
        .arg(&volume.path)
        .arg("--socket-path")
        .arg(&volume.socket)
        .args(["--on-storage-error", "detach"])
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--on-storage-error detach forwards guest IO to a replica: it needs --replicate-to"
        ),
        "{stderr}"
    );
}

#[test]
fn a_detached_primary_reconnects_and_resends_what_was_not_answered() {
    let volume = TestVolume::create(SIZE);
    let tmpfs = TmpfsJournal::over(&volume, 256 << 20);
    let mut proxy = None;
    let pair = Pair::start_routed(
        volume,
        &["--on-storage-error", "detach", "--io-error-hold", "20s"],
        &mut |replica_port| {
            let started = Proxy::start(replica_port);
            let port = started.port();
            proxy = Some(started);
            port
        },
    );
    let proxy = proxy.expect("routed through the proxy");
    let size = 64usize << 20;
    let mut model = vec![0u8; size];
    let mut client = Client::connect(&pair.primary.vol.socket, 1);
    write_blocks(&mut client, &mut model, 0, 64, 64 << 10);
    tmpfs.fill();
    write_blocks(&mut client, &mut model, 4 << 20, 512, 64 << 10);
    assert!(
        !pair.primary.replication()["detached"].is_null(),
        "detached"
    );

    // A write goes out, its answer does not come back, the link is cut.
    proxy.stall(true);
    let data = pattern(0x77, 64 << 10);
    let at = 40usize << 20;
    assert_eq!(
        client.write_within(at as u64, &data, Duration::from_millis(300)),
        None,
        "no answer while the link stalls"
    );
    model[at..at + data.len()].copy_from_slice(&data);
    let connections = proxy.connections();
    proxy.cut();
    proxy.stall(false);
    // Resent on the next session, and answered.
    assert_eq!(client.complete(0), 0, "the held write completes");
    assert!(proxy.connections() > connections, "a new session");
    write_blocks(&mut client, &mut model, 48 << 20, 32, 64 << 10);
    assert_eq!(client.flush(0), 0);
    assert!(
        read_all(&mut client, size) == model,
        "reads after the reconnect"
    );
    assert!(
        materialize_latest(&pair.replica) == model,
        "the replica holds every write once, in order"
    );
}
