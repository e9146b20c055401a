//! Two hosts on one machine: two network namespaces joined by a veth pair,
//! with RFC 2544 test addresses (198.18.0.1 and .2) that exist only on that
//! pair, so no packet can leave the machine. Names are unique per process
//! and per pair, so tests can run in parallel; both namespaces (and with
//! them the veth pair) are deleted on drop, also while a test panics.
//! Needs root and iproute2; fails loudly without them.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Host A's and host B's address on the veth pair (a /24).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// One "host": a network namespace and its end of the veth pair.
pub struct Host {
    pub name: String,
    pub addr: Ipv4Addr,
    pub link: String,
}

impl Host {
    /// `program` run inside this host's network namespace
    /// (`ip netns exec`, which also gives it its own /sys).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `f` on a thread that joined this host's network namespace
    /// (setns(2) applies to the calling thread only): sockets it opens live
    /// on this host.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::spawn(move || {
            // SAFETY: setns(2) on an open namespace file; it changes only
            // this new thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Takes this host's end of the link down (a cut cable) or up again.
    pub fn set_link(&self, up: bool) {
        ip(&[
            "-n",
            &self.name,
            "link",
            "set",
            &self.link,
            if up { "up" } else { "down" },
        ]);
    }
}

/// Two hosts joined by one veth pair.
pub struct HostPair {
    pub a: Host,
    pub b: Host,
}

impl HostPair {
    pub fn new() -> HostPair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Interface names have at most 15 bytes: "rw" + pid (<= 7 hex digits)
        // + a counter + the side.
        let base = format!(
            "rw{:x}n{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let host = |side: &str, addr| Host {
            name: format!("{base}{side}"),
            addr,
            link: format!("{base}{side}"),
        };
        // Built before any namespace exists, so a failure below deletes
        // whatever was made (Drop ignores namespaces that are not there).
        let pair = HostPair {
            a: host("a", ADDR_A),
            b: host("b", ADDR_B),
        };
        for h in [&pair.a, &pair.b] {
            // Left over by a killed process that had this pid.
            let _ = Command::new("ip")
                .args(["netns", "del", &h.name])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["netns", "add", &h.name]);
            ip(&["-n", &h.name, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link",
            "add",
            &pair.a.link,
            "netns",
            &pair.a.name,
            "type",
            "veth",
            "peer",
            "name",
            &pair.b.link,
            "netns",
            &pair.b.name,
        ]);
        for h in [&pair.a, &pair.b] {
            let cidr = format!("{}/24", h.addr);
            ip(&["-n", &h.name, "addr", "add", &cidr, "dev", &h.link]);
            h.set_link(true);
        }
        pair
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        for h in [&self.a, &self.b] {
            // Deleting a namespace deletes its end of the veth, and with it
            // the pair.
            let _ = Command::new("ip")
                .args(["netns", "del", &h.name])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Runs `ip ARGS`, panicking with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` ({e}): two-host tests need iproute2 and root"));
    assert!(
        out.status.success(),
        "`ip {}` failed (two-host tests need root and network namespaces): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
