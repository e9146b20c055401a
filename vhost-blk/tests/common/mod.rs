//! Helpers shared by the integration tests: volumes made and served by the
//! real `rewind-blk` binary.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod child_client;
pub mod client;
pub mod guest;
pub mod libvirt;
pub mod load;
pub mod netns;
pub mod proxy;
pub mod qmp;
pub mod replication;
pub mod tmpfs;
pub mod twins;

pub const BIN: &str = env!("CARGO_BIN_EXE_rewind-blk");

/// Polls `cond` until it holds, failing after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A volume in a temporary directory, with room for a socket beside it.
pub struct TestVolume {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub socket: PathBuf,
}

/// The most epochs a volume's history lists (the journal's MAX_EPOCHS).
pub const MAX_EPOCHS: u64 = 4096;
/// The epochs it keeps when one more would take it past that.
pub const KEEP_EPOCHS: usize = 2048;

impl TestVolume {
    /// Writes by hand a volume.json whose history lists the most epochs it
    /// keeps (the next raise forgets the oldest), in `role` ("primary" or
    /// "replica", then sealed by its primary: promoted without --force);
    /// returns its path. No Epoch record backs the history: a
    /// peer refuses it, so this serves a daemon alone.
    pub fn at_the_epoch_cap(&self, role: &str) -> PathBuf {
        let path = self.path.join("volume.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("volume.json");
        config["epoch"] = MAX_EPOCHS.into();
        config["epoch_history"] = (1..=MAX_EPOCHS)
            .map(|epoch| serde_json::json!({"epoch": epoch, "first_lsn": 1, "node": 0}))
            .collect();
        config["role"] = role.into();
        if role == "replica" {
            config["sealed"] = serde_json::json!({"epoch": MAX_EPOCHS, "lsn": 0});
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("write");
        path
    }

    pub fn create(size: &str) -> TestVolume {
        Self::create_with(size, &["--segment-size", "1M"])
    }

    /// `rewind-blk create` with `args` besides the size.
    pub fn create_with(size: &str, args: &[&str]) -> TestVolume {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vol");
        let out = Command::new(BIN)
            .args(["create", "--size", size])
            .args(args)
            .arg("--volume")
            .arg(&path)
            .output()
            .expect("run create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.path().join("sock");
        TestVolume { dir, path, socket }
    }
}

/// A running `rewind-blk serve`; killed if dropped without `stop`. Its
/// log goes to `<socket>.log` (to the test's stderr with
/// `REWIND_TEST_LOG=1`) and is printed if the test fails.
pub struct Server {
    child: Child,
    /// The log, open for reading: it stays readable after the test's
    /// directory is removed.
    log: Option<File>,
}

impl Server {
    pub fn start(volume: &TestVolume, extra: &[&str]) -> Server {
        Self::start_at(volume, &volume.socket, extra)
    }

    /// As `start`, listening on `socket` instead of the volume's (a
    /// daemon its usual client cannot reach).
    pub fn start_at(volume: &TestVolume, socket: &Path, extra: &[&str]) -> Server {
        let _ = std::fs::remove_file(socket);
        let (stderr, log) = match std::env::var_os("REWIND_TEST_LOG") {
            Some(_) => (Stdio::inherit(), None),
            None => {
                let mut path = socket.as_os_str().to_owned();
                path.push(".log");
                // Appended to: a daemon restarted on the same socket adds
                // to its predecessor's log.
                let writer = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .expect("daemon log");
                let reader = File::open(&path).expect("daemon log");
                (Stdio::from(writer), Some(reader))
            }
        };
        let child = Command::new(BIN)
            .args(["serve", "--volume"])
            .arg(&volume.path)
            .arg("--socket-path")
            .arg(socket)
            .args(extra)
            .stderr(stderr)
            .spawn()
            .expect("spawn serve");
        let server = Server { child, log };
        wait_until("the socket", Duration::from_secs(20), || socket.exists());
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// SIGKILL, then the exit status.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait()
    }

    /// Sends `signal` (SIGSTOP freezes the daemon: a hung host).
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn wait(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("the server to exit", Duration::from_secs(30), || {
            status = self.child.try_wait().expect("wait");
            status.is_some()
        });
        status.expect("exited")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            self.print_log();
        }
    }
}

impl Server {
    /// The last lines of the daemon's log, on the test's stderr.
    fn print_log(&mut self) {
        const LINES: usize = 200;
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let mut text = String::new();
        if let Err(e) = log.read_to_string(&mut text) {
            eprintln!("rewind-blk {}: its log is unreadable: {e}", self.child.id());
            return;
        }
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LINES);
        eprintln!(
            "--- rewind-blk {} log, last {} of {} lines ---",
            self.child.id(),
            lines.len() - from,
            lines.len()
        );
        for line in &lines[from..] {
            eprintln!("{line}");
        }
        eprintln!("--- end of rewind-blk {} log ---", self.child.id());
    }
}

/// A daemon serving a volume with a control socket, and requests to it
/// (what `rewindctl` sends).
pub struct Controlled {
    pub server: Server,
    pub control: PathBuf,
}

impl Controlled {
    pub fn start(vol: &TestVolume) -> Controlled {
        let control = vol.dir.path().join("control.sock");
        let server = Server::start(vol, &["--control-socket", control.to_str().expect("path")]);
        Controlled { server, control }
    }

    pub fn try_ctl(
        &self,
        command: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, rewind_ctl::CtlError> {
        rewind_ctl::request(&self.control, command, args, &mut |_, _| {})
    }

    pub fn ctl(&self, command: &str, args: serde_json::Value) -> serde_json::Value {
        self.try_ctl(command, args)
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    pub fn status(&self) -> serde_json::Value {
        self.ctl("status", serde_json::Value::Null)
    }

    /// SIGKILL; removes the control socket the daemon leaves behind (so
    /// that another can bind it) and returns its path.
    pub fn kill(self) -> PathBuf {
        let Controlled {
            mut server,
            control,
        } = self;
        assert!(!server.kill().success(), "killed by SIGKILL");
        std::fs::remove_file(&control).expect("the killed daemon's control socket");
        control
    }

    /// Waits for the client to be gone from the socket.
    pub fn wait_detached(&self) {
        wait_until("the client to detach", Duration::from_secs(30), || {
            self.status()["attached"].is_null()
        });
    }
}

/// The workspace's root directory.
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}
