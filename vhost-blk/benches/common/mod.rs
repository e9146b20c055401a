//! What the benches comparing rewind-blk with qemu-storage-daemon share
//! (vs_qsd, cold, at_limit): the servers, started over their
//! vhost-user-blk sockets, and the prefilled raw image both serve.
#![allow(dead_code)] // each bench uses a different subset

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const BIN: &str = env!("CARGO_BIN_EXE_rewind-blk");

pub struct Server {
    pub name: &'static str,
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    /// CPU time of all the server's threads so far (schedstat, in ns).
    pub fn cpu(&self) -> Duration {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("tasks");
        let ns: u64 = tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        Duration::from_nanos(ns)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A server started again on this path must not find the old socket.
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Polls until `path` exists (a server's socket).
pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes a raw image of `size` bytes (a multiple of 1 MiB) of random data
/// and syncs it.
pub fn make_image(image: &Path, size: u64) {
    let f = std::fs::File::create(image).expect("image");
    let mut rng = StdRng::seed_from_u64(1);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        rng.fill(&mut chunk[..]);
        std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i << 20).expect("prefill");
    }
    f.sync_all().expect("sync image");
}

/// `rewind-blk create --from image` in `dir`/vol, with `extra` create
/// arguments; returns the volume's path.
pub fn create_rewind(dir: &Path, image: &Path, size: u64, extra: &[String]) -> PathBuf {
    create_volume(dir, Some(image), size, extra)
}

/// [`create_rewind`], or an empty volume without `from`.
pub fn create_volume(dir: &Path, from: Option<&Path>, size: u64, extra: &[String]) -> PathBuf {
    let volume = dir.join("vol");
    let from = from.map(|image| [Path::new("--from"), image]);
    let out = Command::new(BIN)
        .args(["create", "--size", &size.to_string()])
        .args(extra)
        .arg("--volume")
        .arg(&volume)
        .args(from.iter().flatten())
        .output()
        .expect("rewind-blk create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    volume
}

/// `rewind-blk create --from image` in `dir`/vol, then serves it with
/// `queues` virtqueues on `dir`/rewind.sock.
pub fn start_rewind(dir: &Path, image: &Path, size: u64, queues: usize) -> Server {
    let volume = create_rewind(dir, image, size, &[]);
    serve_rewind(dir, &volume, queues)
}

/// Serves `volume` with `queues` virtqueues on `dir`/rewind.sock.
pub fn serve_rewind(dir: &Path, volume: &Path, queues: usize) -> Server {
    serve_rewind_to(dir, volume, queues, Stdio::null())
}

/// [`serve_rewind`] with the daemon's log (its stderr) going to `log`.
pub fn serve_rewind_to(dir: &Path, volume: &Path, queues: usize, log: impl Into<Stdio>) -> Server {
    let socket = dir.join("rewind.sock");
    let child = Command::new(BIN)
        .args(["serve", "--num-queues", &queues.to_string(), "--volume"])
        .arg(volume)
        .arg("--socket-path")
        .arg(&socket)
        .stderr(log)
        .spawn()
        .expect("rewind-blk serve");
    wait_for(&socket);
    Server {
        name: "rewind-blk",
        child,
        socket,
    }
}

/// qemu-storage-daemon exporting `image` (`driver=file` + `driver=raw`)
/// with `queues` virtqueues on `dir`/qsd.sock: its defaults (buffered IO,
/// thread-pool AIO), or with `direct` `cache.direct=on,aio=io_uring`.
pub fn start_qsd(dir: &Path, image: &Path, direct: bool, queues: usize) -> Server {
    let socket = dir.join("qsd.sock");
    let options = if direct {
        ",cache.direct=on,aio=io_uring"
    } else {
        ""
    };
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}{options}",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=raw,node-name=d0,file=f0")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        ))
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (install qemu-utils)");
    wait_for(&socket);
    Server {
        name: if direct {
            "qsd best"
        } else {
            "qemu-storage-daemon"
        },
        child,
        socket,
    }
}

/// Keeps up to `depth` requests in flight on `q` until `ops` completed:
/// `submit(q, slot, n)` queues the `n`th request with `slot` (below
/// `depth`) as its user data and buffer index. Asserts that every request
/// succeeded; returns their latencies, in completion order.
pub fn closed_loop(
    name: &str,
    q: &mut Blkioq,
    depth: usize,
    ops: usize,
    mut submit: impl FnMut(&mut Blkioq, usize, usize),
) -> Vec<Duration> {
    let mut started = vec![Instant::now(); depth];
    let mut latencies = Vec::with_capacity(ops);
    let mut submitted = 0;
    for (slot, start) in started.iter_mut().enumerate().take(ops) {
        *start = Instant::now();
        submit(q, slot, submitted);
        submitted += 1;
    }
    let mut done: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    while latencies.len() < ops {
        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
        for c in &done[..n] {
            // SAFETY: do_io initialized the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "{name} failed a request");
            latencies.push(started[c.user_data].elapsed());
            if submitted < ops {
                started[c.user_data] = Instant::now();
                submit(q, c.user_data, submitted);
                submitted += 1;
            }
        }
    }
    latencies
}
