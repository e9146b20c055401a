//! A private libvirt for the tests: Debian's libvirtd and virtlogd run in
//! the foreground as the test's own processes, in a mount namespace where
//! /etc/libvirt, /run, /var/lib, /var/cache, /var/log, /etc/passwd and
//! /etc/group are the test's own directories and files, so nothing of the
//! host's libvirt (if any) is read or changed. `virsh` reaches the daemon
//! through its socket's real path. Domains come from
//! qemu-configs/libvirt-domain-tcg.xml and boot the test guest
//! (guest-tests/); their serial console is a unix socket the test reads and
//! types into. Also the operator's `rewindctl`, as these tests call it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::guest::{guest, BOOT_LIMIT};
use super::{wait_until, workspace, BIN};

/// Runs inside the new mount namespace: puts the private directories in
/// place, says so, and holds the namespace open for the daemons.
const HOLDER: &str = r#"
set -e
p=$1
mount --bind "$p/etc" /etc/libvirt
mount --bind "$p/run" /run
mount --bind "$p/var-lib" /var/lib
mount --bind "$p/var-cache" /var/cache
mount --bind "$p/var-log" /var/log
mount --bind "$p/passwd" /etc/passwd
mount --bind "$p/group" /etc/group
touch "$p/ready"
exec sleep 100000
"#;

/// QEMU runs as root with no security driver, cgroups or namespaces of
/// libvirt's: the test machine is a container with none to give.
const QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"#;

const LIBVIRTD_CONF: &str = r#"unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
"#;

/// rewindctl, built beside rewind-blk (`cargo test --workspace` builds it).
pub fn rewindctl() -> PathBuf {
    let path = Path::new(BIN).with_file_name("rewindctl");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p rewind-ctl (or run cargo test --workspace)",
        path.display()
    );
    path
}

/// `rewindctl --control CONTROL ARGS --json`, parsed.
pub fn ctl(control: &Path, args: &[&str]) -> Value {
    let out = Command::new("timeout")
        .arg("30")
        .arg(rewindctl())
        .arg("--control")
        .arg(control)
        .args(args)
        .arg("--json")
        .output()
        .expect("run rewindctl");
    assert!(
        out.status.success(),
        "rewindctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("rewindctl's JSON")
}

/// `BIN create` of a 64 MiB volume at `volume` with 1 MiB segments
/// (`bin` is the binary under test, or one a package installed).
pub fn create_volume(bin: &Path, volume: &Path) {
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin)
        .args([
            "create",
            "--size",
            "64M",
            "--segment-size",
            "1M",
            "--volume",
        ])
        .arg(volume)
        .output()
        .expect("run rewind-blk create");
    assert!(out.status.success(), "rewind-blk create: {out:?}");
}

/// Fails loudly if a program the test needs is not installed.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: apt-get install {package} (ci/install-deps.sh)"
    );
}

/// A hook script and its settings, installed as /etc/libvirt/hooks/qemu
/// and /etc/libvirt/hooks/rewind.conf before libvirtd starts (it looks for
/// hooks only then).
#[derive(Debug)]
pub struct Hook<'a> {
    pub script: &'a Path,
    pub conf: String,
}

/// libvirtd and virtlogd in their own mount namespace.
pub struct Libvirt {
    pub dir: tempfile::TempDir,
    holder: Child,
    daemons: Vec<Child>,
}

impl Libvirt {
    pub fn start(hook: Option<Hook>) -> Libvirt {
        for (program, package) in [
            ("libvirtd", "libvirt-daemon"),
            ("virtlogd", "libvirt-daemon"),
            ("virsh", "libvirt-clients"),
            ("virt-xml-validate", "libvirt-clients"),
            ("unshare", "util-linux"),
            ("nsenter", "util-linux"),
        ] {
            require(program, package);
        }
        assert!(
            Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
                .exists(),
            "libvirt's QEMU driver is not installed: apt-get install libvirt-daemon-driver-qemu \
             (ci/install-deps.sh)"
        );
        let dir = tempfile::Builder::new()
            .prefix("rewind-libvirt")
            .tempdir()
            .expect("tempdir");
        let p = dir.path();
        for sub in [
            "etc/hooks",
            "run/libvirt",
            "var-lib/libvirt",
            "var-cache/libvirt",
            "var-log/libvirt",
        ] {
            std::fs::create_dir_all(p.join(sub)).expect("mkdir");
        }
        std::fs::write(p.join("etc/qemu.conf"), QEMU_CONF).expect("qemu.conf");
        std::fs::write(p.join("etc/libvirtd.conf"), LIBVIRTD_CONF).expect("libvirtd.conf");
        // libvirtd resolves the QEMU user Debian built it with before it
        // reads qemu.conf; Debian's libvirt-daemon-system would add it.
        let mut passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
        let mut group = std::fs::read_to_string("/etc/group").expect("/etc/group");
        if !passwd.lines().any(|l| l.starts_with("libvirt-qemu:")) {
            passwd.push_str("libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n");
        }
        if !group.lines().any(|l| l.starts_with("libvirt-qemu:")) {
            group.push_str("libvirt-qemu:x:64055:\n");
        }
        std::fs::write(p.join("passwd"), passwd).expect("passwd");
        std::fs::write(p.join("group"), group).expect("group");
        if let Some(hook) = &hook {
            let installed = p.join("etc/hooks/qemu");
            std::fs::copy(hook.script, &installed).expect("install the hook");
            std::fs::write(p.join("etc/hooks/rewind.conf"), &hook.conf).expect("rewind.conf");
        }

        let holder = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                HOLDER,
                "holder",
            ])
            .arg(p)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(p.join("holder.log")).expect("log"))
            .spawn()
            .expect("unshare");
        let mut libvirt = Libvirt {
            dir,
            holder,
            daemons: Vec::new(),
        };
        let p = libvirt.dir.path().to_owned();
        wait_until("the mount namespace", Duration::from_secs(10), || {
            p.join("ready").exists() || libvirt.holder.try_wait().ok().flatten().is_some()
        });
        assert!(
            p.join("ready").exists(),
            "cannot make libvirt's mount namespace: {}",
            std::fs::read_to_string(p.join("holder.log")).unwrap_or_default()
        );
        libvirt.spawn("virtlogd", &[]);
        let conf = p.join("etc/libvirtd.conf");
        libvirt.spawn("libvirtd", &["-f", conf.to_str().expect("path")]);
        // The first connection waits for libvirtd to probe QEMU.
        let socket = p.join("run/libvirt/libvirt-sock");
        wait_until("libvirtd's socket", Duration::from_secs(60), || {
            socket.exists() || libvirt.daemons.iter_mut().any(exited)
        });
        for daemon in &mut libvirt.daemons {
            assert!(!exited(daemon), "{}", libvirt_log(&p));
        }
        let version = libvirt.virsh(&["version"]);
        assert!(version.contains("Running hypervisor: QEMU"), "{version}");
        libvirt
    }

    /// Starts `program` (a daemon, in the foreground) in the namespace.
    fn spawn(&mut self, program: &str, args: &[&str]) {
        let log = self.dir.path().join(format!("{program}.log"));
        let child = Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        self.daemons.push(child);
    }

    /// The connection URI of this libvirtd.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.path().join("run/libvirt/libvirt-sock").display()
        )
    }

    pub fn try_virsh(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["60", "virsh", "-c", &self.uri()])
            .args(args)
            .output()
            .expect("run virsh")
    }

    /// `virsh ARGS`; its stdout, or a failure with libvirtd's log.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = self.try_virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            libvirt_log(self.dir.path())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `virsh domstate NAME`.
    pub fn state(&self, name: &str) -> String {
        self.virsh(&["domstate", name]).trim().to_owned()
    }

    /// The pid of the domain's QEMU (libvirt's pid file).
    pub fn qemu_pid(&self, name: &str) -> i32 {
        let file = self.dir.path().join(format!("run/libvirt/qemu/{name}.pid"));
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .parse()
            .expect("pid")
    }

    /// What libvirt logged of the domain's QEMU (its command line first).
    pub fn qemu_log(&self, name: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("var-log/libvirt/qemu/{name}.log")),
        )
        .unwrap_or_default()
    }

    /// The domain XML for `name` from qemu-configs/libvirt-domain-tcg.xml,
    /// checked by virt-xml-validate.
    pub fn domain_xml(&self, name: &str, initrd: &Path, disk: &Path, console: &Path) -> PathBuf {
        let template =
            std::fs::read_to_string(workspace().join("qemu-configs/libvirt-domain-tcg.xml"))
                .expect("qemu-configs/libvirt-domain-tcg.xml");
        let xml = template
            .replace("@NAME@", name)
            .replace("@KERNEL@", &guest().join("vmlinuz").display().to_string())
            .replace("@INITRD@", &initrd.display().to_string())
            .replace("@SOCKET@", &disk.display().to_string())
            .replace("@CONSOLE@", &console.display().to_string());
        let file = self.dir.path().join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write the domain XML");
        let out = Command::new("virt-xml-validate")
            .arg(&file)
            .arg("domain")
            .output()
            .expect("virt-xml-validate");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        file
    }

    /// Defines the domain `name` booting the test guest with `script`
    /// (run by its init with `sh -e`) on the vhost-user-blk socket `disk`.
    pub fn define(&self, name: &str, disk: &Path, script: &str) {
        let initrd = self.initrd(name, script);
        let console = self.console_path(name);
        let xml = self.domain_xml(name, &initrd, disk, &console);
        self.virsh(&["define", xml.to_str().expect("path")]);
    }

    /// Replaces the script a defined domain runs at its next start.
    pub fn set_script(&self, name: &str, script: &str) {
        self.initrd(name, script);
    }

    fn console_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.console"))
    }

    /// The guest's initramfs plus an archive holding /test.sh.
    fn initrd(&self, name: &str, script: &str) -> PathBuf {
        let work = self.dir.path().join(format!("{name}-initrd"));
        std::fs::create_dir_all(&work).expect("mkdir");
        std::fs::write(work.join("test.sh"), script).expect("write test.sh");
        let archive = Command::new("sh")
            .arg("-c")
            .arg("echo test.sh | cpio -o -H newc --quiet | gzip")
            .current_dir(&work)
            .output()
            .expect("cpio (install cpio)");
        assert!(archive.status.success(), "cpio failed");
        let mut initrd = std::fs::read(guest().join("initramfs.gz")).expect("initramfs");
        initrd.extend_from_slice(&archive.stdout);
        let path = self.dir.path().join(format!("{name}-initrd.gz"));
        std::fs::write(&path, initrd).expect("write initrd");
        path
    }

    /// `virsh start` (paused, so no console line is printed before the
    /// test listens), connects to the console, then `virsh resume`.
    pub fn start_domain(&self, name: &str) -> Console {
        self.virsh(&["start", "--paused", name]);
        let stream = UnixStream::connect(self.console_path(name)).expect("the guest's console");
        let console = Console::new(stream);
        self.virsh(&["resume", name]);
        console
    }
}

fn exited(child: &mut Child) -> bool {
    child.try_wait().ok().flatten().is_some()
}

/// libvirtd's and virtlogd's logs, for failure messages.
fn libvirt_log(dir: &Path) -> String {
    ["libvirtd.log", "virtlogd.log", "holder.log"]
        .iter()
        .map(|f| {
            format!(
                "--- {f}:\n{}",
                std::fs::read_to_string(dir.join(f)).unwrap_or_default()
            )
        })
        .collect()
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // Domains outlive libvirtd: destroy them first, then kill any
        // QEMU left by its pid file.
        if let Ok(out) = Command::new("timeout")
            .args(["30", "virsh", "-c", &self.uri(), "list", "--name"])
            .output()
        {
            for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.try_virsh(&["destroy", name]);
            }
        }
        let run = self.dir.path().join("run/libvirt/qemu");
        for entry in std::fs::read_dir(run).into_iter().flatten().flatten() {
            let pid = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let (Some(pid), true) = (pid, entry.path().extension() == Some("pid".as_ref())) {
                // SAFETY: kill(2) on the QEMU this test's libvirtd started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for daemon in &mut self.daemons {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A domain's serial console: its lines as they arrive, and what the test
/// types.
pub struct Console {
    stream: UnixStream,
    lines: Receiver<String>,
    text: String,
    started: Instant,
}

impl Console {
    fn new(stream: UnixStream) -> Console {
        let reader = stream.try_clone().expect("clone the console stream");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line);
                let line = line.strip_suffix('\r').unwrap_or(&line).to_owned();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Console {
            stream,
            lines,
            text: String::new(),
            started: Instant::now(),
        }
    }

    /// Reads lines until one contains `text`; returns it. Fails if the
    /// guest's script ends first, or the console closes, or the guest runs
    /// longer than BOOT_LIMIT.
    pub fn wait_for(&mut self, text: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.text.push_str(&line);
                    self.text.push('\n');
                    if line.contains(text) {
                        return line;
                    }
                    assert!(
                        !line.starts_with("GUEST-RESULT"),
                        "the guest's script ended before printing {text:?}:\n{}",
                        self.text
                    );
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the guest's console closed before it printed {text:?}:\n{}",
                    self.text
                ),
                Err(RecvTimeoutError::Timeout) => assert!(
                    self.started.elapsed() < BOOT_LIMIT,
                    "no {text:?} from the guest in {BOOT_LIMIT:?}:\n{}",
                    self.text
                ),
            }
        }
    }

    /// Types `text` into the console.
    pub fn send(&mut self, text: &str) {
        self.stream
            .write_all(text.as_bytes())
            .and_then(|()| self.stream.flush())
            .expect("write to the guest's console");
    }

    /// Everything read so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}
