//! A real QEMU guest (TCG) reads through a `kill -9` of rewind-blk while
//! several of its reads are held in the daemon, and a restarted daemon
//! takes them again from the front-end's inflight region (INFLIGHT_SHMFD).
//!
//! The existing kill test (tests/guest.rs) kills between two writes and
//! nothing holds a request in the daemon at that moment. Here the first
//! daemon runs in a cgroup v1 blkio group that allows few reads per second
//! on the test file system's disk, and the guest reads, with O_DIRECT,
//! data of base.img that is not in the host's page cache: every guest read
//! waits for a throttled disk read, so several of them are held by the
//! daemon when it is killed. The restarted daemon (not throttled) must log
//! that it took requests again, and the guest must finish every read with
//! no IO error and the data of the image. The log is what proves the
//! region was used: when no request after the oldest one in flight has
//! completed yet (the usual case here), a daemon that ignored the region
//! and resumed at QEMU's used index would redo the same requests, and the
//! guest alone could not tell.
//!
//! Needs root and the cgroup v1 blkio controller at /sys/fs/cgroup/blkio:
//! without them the test fails, it does not skip.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{assert_passed, fields, Guest, GuestConfig, QEMU};
use common::{wait_until, TestVolume, BIN};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Where the cgroup v1 blkio hierarchy is mounted.
const BLKIO: &str = "/sys/fs/cgroup/blkio";
/// Reads per second the first daemon may issue to the disk: with four
/// readers each guest read waits for about 0.4 s in the daemon.
const READ_IOPS: u64 = 10;

const BLOCK: usize = 64 << 10;
const READERS: usize = 4;
/// Blocks each reader reads.
const PER_READER: usize = 16;
/// Reader `j`'s block `k` is block `(k * READERS + j) * 2` of the disk:
/// an unread block after each read one keeps the daemon's buffered reads
/// of base.img from being sequential, so the kernel reads each on its own
/// (one throttled disk read per guest read) instead of reading ahead.
fn disk_block(reader: usize, k: usize) -> usize {
    (k * READERS + reader) * 2
}

/// Four readers in parallel, each reading its blocks one `dd` at a time
/// with O_DIRECT (the guest's page cache is out of the way); then each
/// reader's md5.
const READ_THROUGH_A_KILL: &str = r#"
echo "READERS: started"
pids=""
for j in 0 1 2 3; do
  (k=0; while [ $k -lt 16 ]; do
     dd if=/dev/vda of=/tmp/r$j bs=64k count=1 skip=$(( (k * 4 + j) * 2 )) seek=$k conv=notrunc iflag=direct 2>/tmp/e$j \
       || { echo "READ-ERROR: $j $k $(cat /tmp/e$j)"; exit 1; }
     k=$((k + 1)); done) &
  pids="$pids $!"
done
for p in $pids; do wait $p; done
for j in 0 1 2 3; do echo "SUM: $j $(md5sum < /tmp/r$j | cut -d' ' -f1)"; done
"#;

/// A cgroup v1 blkio group whose processes' reads on one disk are capped
/// at a number per second; removed when dropped.
struct Throttle {
    /// The group's directory.
    dir: PathBuf,
    /// The disk's `MAJ:MIN`.
    device: String,
}

impl Throttle {
    /// Caps reads on the disk that holds `fs` at `iops`.
    fn new(fs: &Path, iops: u64) -> Throttle {
        assert!(
            Path::new(BLKIO)
                .join("blkio.throttle.read_iops_device")
                .exists(),
            "this test needs the cgroup v1 blkio controller at {BLKIO} (and root): \
             it holds requests in the daemon by throttling its reads"
        );
        let device = disk_of(fs);
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let path = own
            .lines()
            .find_map(|l| l.split_once(":blkio:").map(|(_, p)| p.to_string()))
            .expect("the test's blkio cgroup");
        let dir = Path::new(BLKIO)
            .join(path.trim_start_matches('/'))
            .join(format!("rewind-test-inflight-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating {} (needs root): {e}", dir.display()));
        let throttle = Throttle { dir, device };
        let file = throttle.dir.join("blkio.throttle.read_iops_device");
        std::fs::write(&file, format!("{} {iops}", throttle.device))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        throttle
    }

    /// Reads of the group's processes on the disk, as the throttle
    /// counted them so far (`blkio.throttle.io_serviced`).
    fn reads(&self) -> u64 {
        let text = std::fs::read_to_string(self.dir.join("blkio.throttle.io_serviced"))
            .expect("io_serviced");
        text.lines()
            .find_map(|line| {
                let mut f = line.split_whitespace();
                (f.next() == Some(self.device.as_str()) && f.next() == Some("Read"))
                    .then(|| f.next().and_then(|n| n.parse().ok()))
                    .flatten()
            })
            .unwrap_or(0)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // The daemons were killed and reaped before this runs (declared
        // after the throttle, they drop first); a throttled read the
        // killed daemon left may still hold the group for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove the cgroup {}", self.dir.display());
    }
}

/// The `MAJ:MIN` of the disk `path` lives on (a partition's disk: the
/// throttle limits whole disks).
fn disk_of(path: &Path) -> String {
    let dev = std::fs::metadata(path).expect("stat").dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let sys =
        std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).unwrap_or_else(|e| {
            panic!(
                "{} is on device {major}:{minor}, not a block device the throttle can cap: {e}",
                path.display()
            )
        });
    let disk = if sys.join("partition").exists() {
        sys.parent().expect("a partition's disk").to_path_buf()
    } else {
        sys
    };
    std::fs::read_to_string(disk.join("dev"))
        .expect("the disk's dev")
        .trim()
        .to_string()
}

/// A `rewind-blk serve` whose log (JSON lines) goes to a file; killed if
/// dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Serves `vol` on its socket; in the blkio group `cgroup` from its
    /// first instruction if given (a shell joins the group, then execs
    /// the daemon, so every thread and io-wq worker it makes is in it).
    fn start(vol: &TestVolume, log: PathBuf, cgroup: Option<&Throttle>) -> Daemon {
        let _ = std::fs::remove_file(&vol.socket);
        let mut command = match cgroup {
            Some(throttle) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                    .arg(&throttle.dir)
                    .arg(BIN);
                sh
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(["serve", "--log-format", "json", "--num-queues", "1"])
            .arg("--volume")
            .arg(&vol.path)
            .arg("--socket-path")
            .arg(&vol.socket)
            .env("RUST_LOG", "info")
            .stderr(File::create(&log).expect("daemon log"))
            .spawn()
            .expect("spawn serve");
        let daemon = Daemon { child, log };
        wait_until("the socket", Duration::from_secs(20), || {
            vol.socket.exists()
        });
        daemon
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        let mut status = None;
        wait_until("the killed daemon to exit", Duration::from_secs(30), || {
            status = self.child.try_wait().expect("wait");
            status.is_some()
        });
        assert!(!status.expect("exited").success(), "killed by SIGKILL");
    }

    /// The log's lines, parsed.
    fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .expect("daemon log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}")))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes every file under `dir` durable and drops it from the page cache,
/// so that reading it goes to the disk (through the throttle).
fn evict(dir: &Path) {
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let file = File::open(&path).expect("open");
            file.sync_all().expect("fsync");
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
        }
    }
}

/// md5 of `bytes`, as the guest's md5sum prints it.
fn md5(bytes: &[u8]) -> String {
    let mut md5sum = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    md5sum
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("to md5sum");
    let out = md5sum.wait_with_output().expect("md5sum");
    let out = String::from_utf8_lossy(&out.stdout);
    out.split_whitespace().next().expect("a sum").to_owned()
}

#[test]
fn requests_in_flight_at_a_daemon_kill_are_taken_again_and_complete_in_the_guest() {
    let t = Instant::now();
    // A base image of random data (no holes: a read of a hole never
    // reaches a file), imported by create.
    let images = tempfile::tempdir().expect("tempdir");
    let raw = images.path().join("data.raw");
    let mut data = vec![0u8; disk_block(READERS - 1, PER_READER - 1) * BLOCK + BLOCK];
    StdRng::seed_from_u64(0x1f11e).fill_bytes(&mut data);
    std::fs::write(&raw, &data).expect("write the raw image");
    let vol = TestVolume::create_with(
        "64M",
        &[
            "--segment-size",
            "1M",
            "--from",
            raw.to_str().expect("path"),
        ],
    );
    let expected: Vec<String> = (0..READERS)
        .map(|j| {
            let read: Vec<u8> = (0..PER_READER)
                .flat_map(|k| &data[disk_block(j, k) * BLOCK..][..BLOCK])
                .copied()
                .collect();
            md5(&read)
        })
        .collect();
    evict(&vol.path);

    // Declared before the daemons: dropped after them, on panic too.
    let throttle = Throttle::new(&vol.path, READ_IOPS);
    let first = Daemon::start(&vol, vol.dir.path().join("first.log"), Some(&throttle));
    let config = GuestConfig::default();
    let mut guest = Guest::start(Command::new(QEMU), &vol.socket, READ_THROUGH_A_KILL, config);
    guest.wait_for("READERS: started");
    // As many disk reads counted by the throttle as there are readers
    // since they started: the readers' reads missed the page cache and
    // are in the throttle, which lets one through per 1/READ_IOPS s while
    // the others wait in it, held by the daemon.
    let before = throttle.reads();
    wait_until(
        "the readers' reads to reach the throttle",
        Duration::from_secs(60),
        || throttle.reads() >= before + READERS as u64,
    );
    let serviced = throttle.reads();
    first.kill();
    let killed_at = t.elapsed();

    // The same volume, socket and arguments, not throttled; QEMU
    // reconnects (reconnect=1 in qemu-configs/vhost-user-blk.args).
    let second = Daemon::start(&vol, vol.dir.path().join("second.log"), None);
    let ended = guest.wait_for_within("GUEST-RESULT", Duration::from_secs(90));
    assert!(
        ended.is_some(),
        "the guest did not finish within 90 s of the restart:\n{}",
        guest.console()
    );
    let console = guest.finish();
    assert_passed(&console);
    let sums = fields(&console, "SUM");
    let want: Vec<String> = expected
        .iter()
        .enumerate()
        .map(|(j, s)| format!("{j} {s}"))
        .collect();
    assert_eq!(sums, want, "the guest read the image's data:\n{console}");

    let log = second.log();
    let retaken: Vec<&serde_json::Value> = log
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("taking again the requests in flight"))
        })
        .collect();
    assert!(
        !retaken.is_empty(),
        "the restarted daemon took no request again:\n{}",
        std::fs::read_to_string(&second.log).unwrap_or_default()
    );
    let requests: u64 = retaken
        .iter()
        .map(|l| l["requests"].as_u64().expect("requests"))
        .sum();
    assert!(requests >= 1, "{retaken:?}");
    println!(
        "killed at {killed_at:?} after {serviced} throttled reads; the restarted daemon took \
         {requests} requests again ({retaken:?}); test took {:?}",
        t.elapsed()
    );
}
