//! Helpers shared by rewindctl's tests against real daemons.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod agent;

pub const REWINDCTL: &str = env!("CARGO_BIN_EXE_rewindctl");

/// `rewind-blk`, built into the same target directory as `rewindctl`.
pub fn rewind_blk() -> PathBuf {
    let bin = Path::new(REWINDCTL).with_file_name("rewind-blk");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p rewind-vhost-blk`; \
         `cargo test --workspace` builds it)",
        bin.display()
    );
    bin
}

pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A volume served by `rewind-blk serve` with a control socket; killed
/// when dropped.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, name: &str) -> Daemon {
        let volume = dir.join(name);
        let out = Command::new(rewind_blk())
            .args(["create", "--size", "4M", "--segment-size", "1M"])
            .args(["--journal-max", "256M", "--volume"])
            .arg(&volume)
            .output()
            .expect("run rewind-blk create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.join(format!("{name}.sock"));
        let control = dir.join(format!("{name}.ctl"));
        let child = Command::new(rewind_blk())
            .args(["serve", "--volume"])
            .arg(&volume)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--control-socket")
            .arg(&control)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rewind-blk serve");
        let daemon = Daemon {
            child,
            socket,
            control,
        };
        wait_until("the daemon's sockets", Duration::from_secs(20), || {
            daemon.socket.exists() && daemon.control.exists()
        });
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon that answers one request with `lines` (progress, then answer).
pub fn scripted_daemon(socket: &Path, lines: Vec<String>) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut request = String::new();
        BufReader::new(stream.try_clone().expect("clone"))
            .read_line(&mut request)
            .expect("request");
        for line in lines {
            writeln!(&stream, "{line}").expect("line");
        }
        request
    })
}
