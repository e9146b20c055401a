//! Consistency groups against two real `rewind-blk serve` daemons, while a
//! libblkio client writes to both disks in turn: a sequence number to the
//! first disk, then the same number to the second, and so on. A moment
//! that is one moment for both disks shows the same number on both, or
//! one more on the first.

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rewind_journal::PointInTime;
use serde_json::Value;

mod common;

use common::{wait_until, Daemon, REWINDCTL};
const BLOCK: usize = 4096;

/// A vhost-user-blk client of one disk, one request at a time. Its
/// connection (`_blkio`) is dropped last, after the queue using it.
struct Disk {
    queue: Blkioq,
    region: MemoryRegion,
    _blkio: Blkio,
}

impl Disk {
    fn connect(socket: &Path) -> Disk {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("driver");
        blkio
            .set_str("path", socket.to_str().expect("utf-8 path"))
            .expect("path");
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", 1).expect("queues");
        let mut started = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(BLOCK).expect("region");
        blkio.map_mem_region(&region).expect("map");
        let queue = started.queues.pop().expect("a queue");
        Disk {
            queue,
            region,
            _blkio: blkio,
        }
    }

    /// Writes `seq` over the first block; waits for it (a drained disk
    /// holds it) at most 20 s.
    fn write_seq(&mut self, seq: u64) {
        let data: Vec<u8> = seq.to_le_bytes().repeat(BLOCK / 8);
        // SAFETY: libblkio mapped `region` (addr, len) for this client; no
        // request is in flight while the buffer is filled.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, BLOCK) };
        buf.copy_from_slice(&data);
        let addr = self.region.addr as *const u8;
        self.queue.write(0, addr, BLOCK, 0, ReqFlags::empty());
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let mut limit = Duration::from_secs(20);
        let n = self
            .queue
            .do_io(&mut done, 1, Some(&mut limit), None)
            .expect("do_io");
        assert_eq!(n, 1, "write {seq} did not complete within 20 s");
        // SAFETY: do_io initialized the one completion it returned.
        assert_eq!(unsafe { done[0].assume_init_read() }.ret, 0, "write {seq}");
    }
}

/// When a write went out and when it completed, in ns since the epoch.
#[derive(Debug, Clone, Copy)]
struct Span {
    submitted: u64,
    completed: u64,
}

fn now_ns() -> u64 {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    u64::try_from(since.as_nanos()).expect("ns")
}

/// Writes 1, 2, 3... to the first disk, then the same to the second, until
/// stopped; `spans[d][seq - 1]` says when disk `d` got `seq`.
struct Writer {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<[Vec<Span>; 2]>,
}

impl Writer {
    fn start(sockets: [&Path; 2]) -> Writer {
        let mut disks = sockets.map(Disk::connect);
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut spans: [Vec<Span>; 2] = [Vec::new(), Vec::new()];
                let mut seq = 0;
                while !stop.load(Ordering::SeqCst) {
                    seq += 1;
                    for (disk, spans) in disks.iter_mut().zip(&mut spans) {
                        let submitted = now_ns();
                        disk.write_seq(seq);
                        let completed = now_ns();
                        spans.push(Span {
                            submitted,
                            completed,
                        });
                    }
                    done.store(seq, Ordering::SeqCst);
                }
                drop(disks);
                spans
            })
        };
        Writer { done, stop, thread }
    }

    /// Waits until both disks got `seq`.
    fn wait_for(&self, seq: u64) {
        wait_until(&format!("write {seq}"), Duration::from_secs(60), || {
            self.thread.is_finished() || self.done.load(Ordering::SeqCst) >= seq
        });
        assert!(!self.thread.is_finished(), "the writer failed");
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    fn stop(self) -> [Vec<Span>; 2] {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the writer failed")
    }
}

fn rewindctl(controls: &[&Path], args: &[&str]) -> Output {
    let mut command = Command::new(REWINDCTL);
    for control in controls {
        command.arg("--control").arg(control);
    }
    command.args(args).output().expect("run rewindctl")
}

/// `rewindctl ... --json`, which must succeed.
fn json(controls: &[&Path], args: &[&str]) -> Value {
    let out = rewindctl(controls, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn ns(time: &Value) -> u64 {
    match time.as_str().expect("a time").parse() {
        Ok(PointInTime::Time(ns)) => ns,
        other => panic!("{time} is not a time: {other:?}"),
    }
}

/// The sequence number in the first block of the image at `path`.
fn seq_in(path: &Path) -> u64 {
    let image = std::fs::read(path).expect("image");
    let first: [u8; 8] = image[..8].try_into().expect("8 bytes");
    let seq = u64::from_le_bytes(first);
    assert!(
        image[..BLOCK] == seq.to_le_bytes().repeat(BLOCK / 8)[..],
        "a torn block in {}",
        path.display()
    );
    seq
}

fn uuid(control: &Path) -> String {
    json(&[control], &["status"])["volume"]
        .as_str()
        .expect("uuid")
        .to_owned()
}

/// Two daemons, and a writer that wrote 20 numbers to both disks.
fn two_disks_written(dir: &Path) -> (Daemon, Daemon, Writer) {
    let (a, b) = (Daemon::start(dir, "a"), Daemon::start(dir, "b"));
    let writer = Writer::start([&a.socket, &b.socket]);
    writer.wait_for(20);
    (a, b, writer)
}

#[test]
fn a_group_bookmark_is_one_moment_for_both_disks() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b, writer) = two_disks_written(dir.path());
    let controls = [a.control.as_path(), b.control.as_path()];

    let out = rewindctl(&controls, &["bookmark", "pre"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with(&format!(
            "== {}\napp_consistent  false\nlsn ",
            a.control.display()
        )),
        "{table}"
    );
    // Both resumed: the writer goes on.
    writer.wait_for(writer.done() + 20);
    writer.stop();

    let timelines = json(&controls, &["timeline"]);
    let marks: Vec<&Value> = (0..2)
        .map(|i| {
            let bookmarks = timelines[i]["result"]["bookmarks"]
                .as_array()
                .expect("bookmarks");
            assert_eq!(bookmarks.len(), 1, "{bookmarks:?}");
            assert_eq!(bookmarks[0]["name"], "pre");
            &bookmarks[0]
        })
        .collect();
    // Nothing was written between the bookmarks. Each guest write puts a
    // new number in the first block, so a disk that took one between the
    // bookmarks reads differently at its bookmark and at the first or the
    // last bookmark's time. (Records after a bookmark may still be stamped
    // before the other disk's: the bookmark's own Flush record, appended
    // while drained, which changes nothing on the disk.)
    let times: Vec<u64> = marks.iter().map(|m| ns(&m["time"])).collect();
    let first = *times.iter().min().expect("two");
    let last = *times.iter().max().expect("two");
    let at_mark = seqs_at(&controls, "bookmark:pre", &dir.path().join("at-mark"));
    assert!(at_mark[1] >= 20, "{at_mark:?}");
    for (moment, time) in [("first", first), ("last", last)] {
        let at = rewind_journal::format_ns(time);
        let seqs = seqs_at(&controls, &at, &dir.path().join(moment));
        assert_eq!(
            seqs, at_mark,
            "a disk took a write between the bookmarks: at the {moment} bookmark ({at}) the \
             disks hold {seqs:?}, at their bookmarks {at_mark:?} (bookmarks {marks:?})"
        );
    }

    // And both images at the bookmark show one cut of the writer's order.
    let [seq_a, seq_b] = at_mark;
    assert!(
        seq_a == seq_b || seq_a == seq_b + 1,
        "not one moment: {seq_a} on the first disk, {seq_b} on the second"
    );
}

/// The sequence numbers on both disks at `at`, materialized into `dir`.
fn seqs_at(controls: &[&Path; 2], at: &str, dir: &Path) -> [u64; 2] {
    json(
        controls,
        &[
            "materialize",
            "--at",
            at,
            "--output",
            dir.to_str().expect("utf-8"),
        ],
    );
    controls.map(|control| seq_in(&dir.join(format!("{}.img", uuid(control)))))
}

#[test]
fn a_group_materialize_of_a_time_gives_each_disk_at_that_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b, writer) = two_disks_written(dir.path());
    let controls = [a.control.as_path(), b.control.as_path()];
    let t = now_ns();
    writer.wait_for(writer.done() + 20);
    let spans = writer.stop();

    let images = dir.path().join("images");
    let at = rewind_journal::format_ns(t);
    let results = json(
        &controls,
        &[
            "materialize",
            "--at",
            &at,
            "--output",
            images.to_str().expect("utf-8"),
        ],
    );
    for (i, (control, spans)) in controls.iter().zip(&spans).enumerate() {
        let image = images.join(format!("{}.img", uuid(control)));
        assert_eq!(results[i]["control"], control.to_str().expect("utf-8"));
        assert_eq!(
            results[i]["result"]["output"],
            image.to_str().expect("utf-8")
        );
        // The disk at t holds the last write stamped by then: at least
        // every write completed by t, at most every write sent by t.
        let seq = seq_in(&image);
        let count = |f: fn(&Span) -> u64| spans.iter().filter(|s| f(s) <= t).count() as u64;
        let (completed, sent) = (count(|s| s.completed), count(|s| s.submitted));
        assert!(
            completed <= seq && seq <= sent,
            "{}: {seq} at {at}, where {completed} writes had completed and {sent} were sent",
            control.display()
        );
    }
}
