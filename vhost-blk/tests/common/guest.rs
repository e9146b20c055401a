//! Real QEMU guests (TCG) whose disk is a vhost-user-blk socket, booted
//! with the command line kept in qemu-configs/vhost-user-blk.args. The
//! guest (a Debian cloud kernel and a busybox initramfs, built by
//! guest-tests/build.sh) runs a shell script (`sh -e`), reports on its
//! console (`KEY: value` lines, `GUEST-RESULT: N` at the end) and reads
//! what the test types into that console.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::workspace;

pub const QEMU: &str = "qemu-system-x86_64";
/// The longest one guest may run.
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// The guest kernel and base initramfs, built once.
pub fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = workspace().join("target/guest");
        if !dir.join("vmlinuz").exists() || !dir.join("initramfs.gz").exists() {
            build_guest(&dir);
        }
        dir
    })
}

/// Runs guest-tests/build.sh into `dir`.
pub fn build_guest(dir: &Path) {
    let out = Command::new("bash")
        .arg(workspace().join("guest-tests/build.sh"))
        .arg(dir)
        .output()
        .expect("run guest-tests/build.sh");
    assert!(
        out.status.success(),
        "building the guest failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// QEMU's arguments from qemu-configs/, with the placeholders filled in.
pub fn qemu_args(initrd: &Path, socket: &Path, smp: u32, queues: u32) -> Vec<String> {
    let template = std::fs::read_to_string(workspace().join("qemu-configs/vhost-user-blk.args"))
        .expect("qemu-configs/vhost-user-blk.args");
    let fill = |s: &str| {
        s.replace("@KERNEL@", &guest().join("vmlinuz").display().to_string())
            .replace("@INITRD@", &initrd.display().to_string())
            .replace("@SOCKET@", &socket.display().to_string())
            .replace("@SMP@", &smp.to_string())
            .replace("@QUEUES@", &queues.to_string())
    };
    template
        .lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| match l.split_once(' ') {
            Some((flag, value)) => vec![flag.to_string(), fill(value)],
            None => vec![l.to_string()],
        })
        .collect()
}

/// Sets the RAM size of QEMU arguments from qemu-configs/ (`-m` and the
/// memory backend's `size`) to `size`.
fn resize_ram(args: &mut [String], size: &str) {
    let m = args
        .iter()
        .position(|a| a == "-m")
        .expect("qemu-configs/vhost-user-blk.args sets -m");
    args[m + 1] = size.to_owned();
    let backend = args
        .iter_mut()
        .find(|a| a.starts_with("memory-backend-memfd,"))
        .expect("qemu-configs/vhost-user-blk.args has a memfd backend");
    *backend = backend
        .split(',')
        .map(|p| match p.starts_with("size=") {
            true => format!("size={size}"),
            false => p.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",");
}

/// Fails loudly, once, if QEMU is not installed (a command that runs it
/// through `ip netns exec` would only fail inside).
fn require_qemu() {
    static FOUND: OnceLock<()> = OnceLock::new();
    FOUND.get_or_init(|| match Command::new(QEMU).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("{QEMU} --version failed: {out:?}"),
        Err(e) => {
            panic!("cannot run {QEMU} ({e}): install qemu-system-x86 (ci/install-deps.sh)")
        }
    });
}

/// How a guest is started.
#[derive(Debug, Clone, Copy)]
pub struct GuestConfig {
    pub smp: u32,
    pub queues: u32,
    /// A reboot of the guest restarts the VM instead of ending QEMU
    /// (`-no-reboot` left out).
    pub allow_reboot: bool,
    /// Added to the kernel's command line.
    pub append: &'static str,
    /// The guest will be live-migrated: its RAM is sized so that QEMU
    /// tracks its stores exactly ([`MIGRATABLE_RAM`]).
    pub migrates: bool,
}

/// The RAM of a guest that migrates: 8 KiB more than the shipped 512 MiB.
/// QEMU before 9.0 loses a TCG guest's stores during a live migration when
/// its RAM block is a multiple of 256 KiB: the dirty bitmap's sync takes a
/// word-at-a-time fast path that does not re-arm the TCG TLB's dirty
/// tracking, so a store through a cached TLB entry is never sent (QEMU
/// commit "physmem: Fix migration dirty bitmap coherency with TCG memory
/// access"; seen here as a destination kernel whose RCU lists were half
/// old). Any other size takes the per-page path, which re-arms it.
pub const MIGRATABLE_RAM: &str = "524296K";

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            smp: 1,
            queues: 1,
            allow_reboot: false,
            append: "",
            migrates: false,
        }
    }
}

/// A running QEMU guest and its console.
pub struct Guest {
    qemu: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<(Instant, String)>,
    reader: Option<std::thread::JoinHandle<()>>,
    console: String,
    started: Instant,
    last_at: Instant,
    /// Holds the initrd while QEMU runs.
    _work: tempfile::TempDir,
}

impl Guest {
    /// Boots a guest that runs `script` against the disk at `socket`;
    /// `qemu` is the command that runs QEMU (`Command::new(QEMU)`, or
    /// `ip netns exec NS qemu-system-x86_64` to run it on another host).
    pub fn start(qemu: Command, socket: &Path, script: &str, config: GuestConfig) -> Guest {
        Self::start_with(qemu, socket, script, config, &[])
    }

    /// As `start`, with more initramfs archives unpacked after the base
    /// (e.g. `guest().join("qga.gz")`, the QEMU guest agent).
    pub fn start_with(
        mut qemu: Command,
        socket: &Path,
        script: &str,
        config: GuestConfig,
        archives: &[&Path],
    ) -> Guest {
        require_qemu();
        let work = tempfile::tempdir().expect("tempdir");
        std::fs::write(work.path().join("test.sh"), script).expect("write test.sh");
        let archive = Command::new("sh")
            .arg("-c")
            .arg("echo test.sh | cpio -o -H newc --quiet | gzip")
            .current_dir(work.path())
            .output()
            .expect("cpio (install cpio)");
        assert!(archive.status.success(), "cpio failed");
        let mut initrd = std::fs::read(guest().join("initramfs.gz")).expect("initramfs");
        for extra in archives {
            let bytes = std::fs::read(extra)
                .unwrap_or_else(|e| panic!("{}: {e} (run guest-tests/build.sh)", extra.display()));
            initrd.extend_from_slice(&bytes);
        }
        initrd.extend_from_slice(&archive.stdout);
        let initrd_path = work.path().join("initrd.gz");
        std::fs::write(&initrd_path, initrd).expect("write initrd");

        let mut args = qemu_args(&initrd_path, socket, config.smp, config.queues);
        if config.migrates {
            resize_ram(&mut args, MIGRATABLE_RAM);
        }
        let args = args
            .into_iter()
            .filter(|a| !config.allow_reboot || a != "-no-reboot")
            .map(|a| match a.contains("console=ttyS0") {
                true => format!("{a} {}", config.append),
                false => a,
            });
        let mut qemu = qemu
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {QEMU} ({e})"));
        let stdout = qemu.stdout.take().expect("stdout");
        let stdin = qemu.stdin.take();
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line);
                let line = line.strip_suffix('\r').unwrap_or(&line).to_owned();
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        Guest {
            qemu,
            stdin,
            lines,
            reader: Some(reader),
            console: String::new(),
            started,
            last_at: started,
            _work: work,
        }
    }

    /// The next console line; None once QEMU exited.
    pub fn next_line(&mut self) -> Option<String> {
        loop {
            match self.receive() {
                Ok(line) => return Some(line),
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.qemu.wait();
                    return None;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.started.elapsed() > BOOT_LIMIT {
                self.kill();
                panic!("guest did not finish in {BOOT_LIMIT:?}:\n{}", self.console);
            }
        }
    }

    fn receive(&mut self) -> Result<String, RecvTimeoutError> {
        let (at, line) = self.lines.recv_timeout(Duration::from_millis(50))?;
        self.console.push_str(&line);
        self.console.push('\n');
        self.last_at = at;
        Ok(line)
    }

    /// When the last line `next_line` returned was read from QEMU.
    pub fn last_at(&self) -> Instant {
        self.last_at
    }

    /// Reads lines until one contains `text`; returns it. Fails if the
    /// guest ends first.
    pub fn wait_for(&mut self, text: &str) -> String {
        loop {
            match self.next_line() {
                Some(line) if line.contains(text) => return line,
                Some(_) => {}
                None => panic!(
                    "the guest ended before printing {text:?}:\n{}",
                    self.console
                ),
            }
        }
    }

    /// As `wait_for`, but None if `text` did not come within `limit`
    /// (the guest is stuck, e.g. its IO stalls).
    pub fn wait_for_within(&mut self, text: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.receive() {
                Ok(line) if line.contains(text) => return Some(line),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the guest ended before printing {text:?}:\n{}",
                    self.console
                ),
            }
        }
        None
    }

    /// Types `text` into the guest's console.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("QEMU's stdin");
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to the guest's console");
    }

    /// Kills QEMU (SIGKILL) and reads what it printed before it died.
    pub fn kill(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        // Its output ends with it; the deadline only bounds a stuck reader.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.receive() {
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => break,
                _ => {}
            }
        }
    }

    /// Waits for QEMU to exit; returns the whole console.
    pub fn finish(mut self) -> String {
        while self.next_line().is_some() {}
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        std::mem::take(&mut self.console)
    }

    /// What the guest printed so far.
    pub fn console(&self) -> &str {
        &self.console
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

/// Boots a guest that runs `script` (with `sh -e`) against the disk at
/// `socket`; returns its console output once it powered off.
pub fn boot(socket: &Path, smp: u32, queues: u32, script: &str) -> String {
    boot_watching(socket, smp, queues, script, |_| {})
}

/// As `boot` on one queue, but a reboot of the guest restarts the VM
/// instead of ending QEMU (`-no-reboot` left out).
pub fn boot_allowing_reboot(socket: &Path, script: &str) -> String {
    boot_with(socket, 1, 1, script, true, |_| false)
}

/// As `boot`, calling `on_line` with each console line as it arrives.
pub fn boot_watching(
    socket: &Path,
    smp: u32,
    queues: u32,
    script: &str,
    mut on_line: impl FnMut(&str),
) -> String {
    boot_with(socket, smp, queues, script, false, |line| {
        on_line(line);
        false
    })
}

/// Boots a guest on one queue and calls `on_line` with each console line;
/// QEMU is killed as soon as it returns true.
pub fn boot_until(socket: &Path, script: &str, on_line: impl FnMut(&str) -> bool) -> String {
    boot_with(socket, 1, 1, script, false, on_line)
}

pub fn boot_with(
    socket: &Path,
    smp: u32,
    queues: u32,
    script: &str,
    allow_reboot: bool,
    mut on_line: impl FnMut(&str) -> bool,
) -> String {
    let config = GuestConfig {
        smp,
        queues,
        allow_reboot,
        ..GuestConfig::default()
    };
    let mut guest = Guest::start(Command::new(QEMU), socket, script, config);
    while let Some(line) = guest.next_line() {
        if on_line(&line) {
            guest.kill();
            break;
        }
    }
    guest.finish()
}

/// The value of `KEY: value` lines the guest printed.
pub fn field<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.split_once(&format!("{key}: ")).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("guest printed no {key}:\n{console}"))
}

/// The values of every `KEY: value` line, in order.
pub fn fields<'a>(console: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}: ");
    console
        .lines()
        .filter_map(|l| l.split_once(&prefix).map(|(_, v)| v.trim()))
        .collect()
}

pub fn assert_passed(console: &str) {
    assert_eq!(
        field(console, "GUEST-RESULT"),
        "0",
        "guest script failed:\n{console}"
    );
}
