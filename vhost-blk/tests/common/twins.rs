//! Two hosts on one machine for the guest tests of failover and handover:
//! each host is a network namespace (netns.rs) with its own `rewind-blk
//! serve`, replicating to the other over the veth pair with mutual TLS.
//! The daemons are driven through their control sockets as `rewindctl`
//! drives them.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::guest::{Guest, GuestConfig, QEMU};
use super::netns::{Host, HostPair};
use super::replication::{identity, replica_volume, tls_args, volume_uuid, Identity, SIZE};
use super::{wait_until, TestVolume, BIN};

/// The replication port on each host's veth address.
pub const PORT: u16 = 7400;

/// `rewind-blk serve` inside a host's network namespace, with a control
/// socket; its log goes to a file that is shown when the test fails.
pub struct Daemon {
    pub name: &'static str,
    pub vol: TestVolume,
    args: Vec<String>,
    queues: u32,
    child: Option<Child>,
    pub control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    pub fn start(
        name: &'static str,
        host: &Host,
        vol: TestVolume,
        args: Vec<String>,
        queues: u32,
    ) -> Daemon {
        let control = vol.dir.path().join("control.sock");
        let log = vol.dir.path().join("daemon.log");
        let mut daemon = Daemon {
            name,
            vol,
            args,
            queues,
            child: None,
            control,
            log,
        };
        daemon.restart(host);
        daemon
    }

    pub fn restart(&mut self, host: &Host) {
        let _ = std::fs::remove_file(&self.control);
        let _ = std::fs::remove_file(&self.vol.socket);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let child = host
            .command(BIN)
            .args([
                "serve",
                "--num-queues",
                &self.queues.to_string(),
                "--volume",
            ])
            .arg(&self.vol.path)
            .arg("--socket-path")
            .arg(&self.vol.socket)
            .arg("--control-socket")
            .arg(&self.control)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run rewind-blk serve inside the namespace");
        self.child = Some(child);
        wait_until("the daemon's sockets", Duration::from_secs(20), || {
            let child = self.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("{}'s daemon exited at start: {status}", self.name);
            }
            self.vol.socket.exists() && self.control.exists()
        });
    }

    /// SIGKILL (`ip netns exec` execs the daemon: the child is it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn try_ctl(&self, command: &str, args: Value) -> Result<Value, rewind_ctl::CtlError> {
        rewind_ctl::request(&self.control, command, args, &mut |_, _| {})
    }

    pub fn ctl(&self, command: &str, args: Value) -> Value {
        self.try_ctl(command, args)
            .unwrap_or_else(|e| panic!("{} {command}: {e}", self.name))
    }

    pub fn status(&self) -> Value {
        self.ctl("status", Value::Null)
    }

    pub fn replication(&self) -> Value {
        self.ctl("replication", Value::Null)
    }

    /// The disk at `at` (a `materialize` moment), as an image file.
    pub fn materialize(&self, at: &str, file: &str) -> PathBuf {
        let out = self.vol.dir.path().join(file);
        let _ = std::fs::remove_file(&out);
        self.ctl("materialize", json!({"at": at, "output": out}));
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- {}'s daemon log (last lines) ---", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Two hosts, each with a daemon that can take either role: `a` starts as
/// the primary, `b` as its replica.
pub struct Twins {
    pub a: Daemon,
    pub b: Daemon,
    // Last: the namespaces go after the daemons in them.
    pub hosts: HostPair,
}

impl Twins {
    pub fn start(extra: &[&str]) -> Twins {
        Twins::start_with(extra, 1)
    }

    /// Twins whose daemons serve `queues` virtqueues.
    pub fn start_with(extra: &[&str], queues: u32) -> Twins {
        Twins::start_custom(&[], extra, queues, |_| {})
    }

    /// The same, A's volume created with `a_create` besides its segment
    /// size, and `before_a` run on it before A's daemon starts.
    pub fn start_custom(
        a_create: &[&str],
        extra: &[&str],
        queues: u32,
        before_a: impl FnOnce(&TestVolume),
    ) -> Twins {
        let hosts = HostPair::new();
        // Either may ship to the other: the same segment size on both.
        let mut create = vec!["--segment-size", "4M"];
        create.extend_from_slice(a_create);
        let a_vol = TestVolume::create_with(SIZE, &create);
        let certs = a_vol.dir.path().join("certs");
        let (a_id, b_id) = (identity(&certs, "a"), identity(&certs, "b"));
        let b_vol = replica_volume(&volume_uuid(&a_vol.path));
        let args = |me: &Identity, peer: &Identity, mine: &Host, other: &Host| {
            let mut args = vec![
                "--replication-listen".to_owned(),
                format!("{}:{PORT}", mine.addr),
                "--replicate-to".to_owned(),
                format!("{}:{PORT}", other.addr),
            ];
            args.extend(tls_args(me, peer));
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };
        let b_args = args(&b_id, &a_id, &hosts.b, &hosts.a);
        let b = Daemon::start("B", &hosts.b, b_vol, b_args, queues);
        let a_args = args(&a_id, &b_id, &hosts.a, &hosts.b);
        before_a(&a_vol);
        let a = Daemon::start("A", &hosts.a, a_vol, a_args, queues);
        Twins { a, b, hosts }
    }

    /// Boots a guest running `script` on host A (`on_a`) or B, on that
    /// host's daemon.
    pub fn guest(&self, on_a: bool, script: &str) -> Guest {
        self.start_guest(on_a, script, 1, 1, false, &[])
    }

    /// A guest that may be live-migrated, with `smp` vCPUs, `queues`
    /// virtqueues and more QEMU arguments (`-incoming`, `-qmp`).
    pub fn migratable_guest(
        &self,
        on_a: bool,
        script: &str,
        smp: u32,
        queues: u32,
        qemu_args: &[String],
    ) -> Guest {
        self.start_guest(on_a, script, smp, queues, true, qemu_args)
    }

    fn start_guest(
        &self,
        on_a: bool,
        script: &str,
        smp: u32,
        queues: u32,
        migrates: bool,
        qemu_args: &[String],
    ) -> Guest {
        let (host, daemon) = match on_a {
            true => (&self.hosts.a, &self.a),
            false => (&self.hosts.b, &self.b),
        };
        let config = GuestConfig {
            // Kernel notices: virtio_blk's `[vda] N 512-byte logical
            // blocks` says the disk is found and its partition table read,
            // the first IO, is under way. No EDD: the kernel's real-mode
            // setup would read the disk's MBR through the BIOS, which hangs
            // at a closed gate before the kernel prints anything.
            append: "loglevel=6 edd=off",
            smp,
            queues,
            migrates,
            ..GuestConfig::default()
        };
        let mut qemu = host.command(QEMU);
        qemu.args(qemu_args);
        Guest::start(qemu, &daemon.vol.socket, script, config)
    }
}

pub fn number(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {value}"))
}

/// Waits until `to` streams to `from` and `from` holds all of it.
pub fn streaming(to: &Daemon, from: &Daemon) -> u64 {
    let mut acked = 0;
    wait_until(
        &format!("{} to stream to {}", to.name, from.name),
        Duration::from_secs(60),
        || {
            let primary = to.replication();
            let durable = number(&to.status(), "durable_lsn");
            acked = number(&primary, "acked_lsn");
            primary["state"] == "streaming"
                && acked >= durable
                && number(&from.status(), "durable_lsn") >= acked
        },
    );
    acked
}
