//! Drain latency under load: a libblkio client writes 4 KiB blocks at
//! iodepth 32 while `rewindctl drain` (through the control socket) stops
//! the queues; the time is the control request's round trip, from sending
//! the drain to its answer (queues stopped, requests in flight finished,
//! journal flushed). Each drain is resumed and the load runs again before
//! the next. qemu-storage-daemon has no drain command on its vhost-user-blk
//! export to compare with, so the goal is absolute: 100 ms or less.
//!
//! `cargo bench -p rewind-vhost-blk --bench drain` (REWIND_BENCH_QUICK=1
//! makes a small smoke run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::load::Load;
use common::{wait_until, Controlled, TestVolume};
use serde_json::{json, Value};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let drains = if quick { 5 } else { 100 };
    let vol = TestVolume::create("1G");
    let mut daemon = Controlled::start(&vol);
    let load = Load::default();
    let mut round_trips = Vec::new();
    let mut waits = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| load.run(&vol.socket));
        let _abandon = load.stop_on_drop();
        for _ in 0..drains {
            let before = load.completed();
            wait_until("load", Duration::from_secs(60), || {
                load.completed() >= before + 2_000
            });
            let started = Instant::now();
            let drained = daemon.ctl("drain", json!({"timeout_ms": 10_000}));
            round_trips.push(started.elapsed());
            waits.push(Duration::from_micros(
                drained["waited_us"].as_u64().expect("waited_us"),
            ));
            daemon.ctl("resume", Value::Null);
        }
        load.stop();
    });
    assert_eq!(load.errors(), 0, "the client saw IO errors");
    daemon.server.stop();
    let show = |name: &str, mut times: Vec<Duration>| {
        times.sort();
        let n = times.len();
        println!(
            "| {name} | {n} | {:.3} ms | {:.3} ms | {:.3} ms |",
            times[n / 2].as_secs_f64() * 1e3,
            times[(n * 99 / 100).min(n - 1)].as_secs_f64() * 1e3,
            times[n - 1].as_secs_f64() * 1e3,
        );
    };
    println!("| drain under 4 KiB writes at iodepth 32 | drains | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    show(
        "rewindctl drain round trip (stop, finish, flush)",
        round_trips,
    );
    show("daemon's wait for requests in flight", waits);
}
