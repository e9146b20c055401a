//! Two real `rewind-blk` daemons, a primary and its replica, over TCP on
//! loopback with mutual TLS (pinned fingerprints), for the replication
//! tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{wait_until, Server, TestVolume, BIN};
use rewind_vhost_blk::replication::tls::{PeerTrust, TlsContext, TlsSettings};
use serde_json::{json, Value};

pub const SIZE: &str = "64M";

/// A node's certificate and key, and its fingerprint.
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: String,
}

pub fn identity(dir: &Path, name: &str) -> Identity {
    let out = Command::new(BIN)
        .args(["cert", "--name", name, "--out"])
        .arg(dir)
        .output()
        .expect("run cert");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .trim()
            .to_owned()
    };
    Identity {
        cert: field("certificate").into(),
        key: field("key").into(),
        fingerprint: field("fingerprint"),
    }
}

/// The TLS context of `me`, trusting `peer` by its fingerprint: a peer
/// played from a test.
pub fn tls_context(me: &Identity, peer: &Identity) -> TlsContext {
    TlsContext::load(
        &TlsSettings {
            cert: me.cert.clone(),
            key: me.key.clone(),
            trust: PeerTrust::Fingerprint(peer.fingerprint.parse().expect("fingerprint")),
        },
        "test",
    )
    .expect("TLS context")
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A daemon with a control socket and replication options.
pub struct Node {
    pub vol: TestVolume,
    pub server: Option<Server>,
    pub control: PathBuf,
    pub args: Vec<String>,
}

impl Node {
    pub fn start(vol: TestVolume, args: Vec<String>) -> Node {
        let control = vol.dir.path().join("control.sock");
        let mut node = Node {
            vol,
            server: None,
            control,
            args,
        };
        node.restart();
        node
    }

    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.control);
        let mut args = vec![
            "--control-socket".to_owned(),
            self.control.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.server = Some(Server::start(&self.vol, &args));
    }

    pub fn ctl(&self, command: &str, args: Value) -> Value {
        rewind_ctl::request(&self.control, command, args, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    pub fn try_ctl(&self, command: &str, args: Value) -> Result<Value, rewind_ctl::CtlError> {
        rewind_ctl::request(&self.control, command, args, &mut |_, _| {})
    }

    pub fn replication(&self) -> Value {
        self.ctl("replication", Value::Null)
    }

    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            assert!(server.stop().success());
        }
    }

    pub fn materialize(&self, lsn: u64) -> Vec<u8> {
        let out = self.vol.dir.path().join(format!("lsn{lsn}.raw"));
        let _ = std::fs::remove_file(&out);
        self.ctl(
            "materialize",
            json!({"at": format!("lsn:{lsn}"), "output": out}),
        );
        std::fs::read(&out).expect("read image")
    }
}

/// A primary and its replica, each with its own certificate, pinned by
/// fingerprint.
pub struct Pair {
    pub primary: Node,
    pub replica: Node,
}

pub fn replica_volume(uuid: &str) -> TestVolume {
    TestVolume::create_with(SIZE, &["--segment-size", "4M", "--replica-of", uuid])
}

pub fn tls_args(me: &Identity, peer: &Identity) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        me.cert.display().to_string(),
        "--tls-key".into(),
        me.key.display().to_string(),
        "--tls-peer-fingerprint".into(),
        peer.fingerprint.clone(),
    ]
}

impl Pair {
    pub fn start(primary_extra: &[&str]) -> Pair {
        Self::start_with(TestVolume::create(SIZE), primary_extra)
    }

    /// A replica for `primary_vol`, then the primary serving it.
    pub fn start_with(primary_vol: TestVolume, primary_extra: &[&str]) -> Pair {
        Self::start_routed(primary_vol, primary_extra, &mut |port| port)
    }

    /// As `start_with`, but the primary dials the port `route` gives for
    /// the replica's port (a fault-injecting proxy in between, say).
    pub fn start_routed(
        primary_vol: TestVolume,
        primary_extra: &[&str],
        route: &mut dyn FnMut(u16) -> u16,
    ) -> Pair {
        let certs = primary_vol.dir.path().join("certs");
        let (a, b) = (identity(&certs, "a"), identity(&certs, "b"));
        let uuid = volume_uuid(&primary_vol.path);
        let port = free_port();
        let mut replica_args = vec![
            "--replication-listen".to_owned(),
            format!("127.0.0.1:{port}"),
        ];
        replica_args.extend(tls_args(&b, &a));
        let replica = Node::start(replica_volume(&uuid), replica_args);
        let mut primary_args = vec![
            "--replicate-to".to_owned(),
            format!("127.0.0.1:{}", route(port)),
        ];
        primary_args.extend(tls_args(&a, &b));
        primary_args.extend(primary_extra.iter().map(|s| s.to_string()));
        let primary = Node::start(primary_vol, primary_args);
        Pair { primary, replica }
    }

    /// Whether the replica made durable every lsn durable on the primary.
    pub fn replica_holds_what_is_durable(&self) -> bool {
        let durable = self.primary.ctl("status", Value::Null)["durable_lsn"].as_u64();
        let acked = self.replica.replication()["acked_lsn"].as_u64();
        acked >= durable && durable.is_some()
    }

    /// Waits until the replica acknowledged everything durable on the
    /// primary; returns that lsn.
    pub fn caught_up(&self) -> u64 {
        let mut acked = 0;
        wait_until("the replica to catch up", Duration::from_secs(30), || {
            let durable = self.primary.ctl("status", Value::Null)["durable_lsn"]
                .as_u64()
                .expect("durable_lsn");
            let primary = self.primary.replication();
            acked = primary["acked_lsn"].as_u64().expect("acked");
            let replica = self.replica.replication();
            acked >= durable
                && primary["state"] == "streaming"
                && primary["resync"].is_null()
                && replica["acked_lsn"] == json!(acked)
                && replica["resync"].is_null()
                && replica["state"] == "streaming"
        });
        acked
    }
}

pub fn volume_uuid(path: &Path) -> String {
    let json: Value =
        serde_json::from_slice(&std::fs::read(path.join("volume.json")).expect("volume.json"))
            .expect("json");
    json["uuid"].as_str().expect("uuid").to_owned()
}

/// A sparse raw image of `SIZE` with random data in `extents` (offset,
/// length).
pub fn image(dir: &Path, extents: &[(u64, usize)]) -> PathBuf {
    use rand::RngCore;
    use std::os::unix::fs::FileExt;
    let path = dir.join("image.raw");
    let file = std::fs::File::create(&path).expect("image");
    file.set_len(64 << 20).expect("size");
    let mut rng = rand::rng();
    for &(offset, len) in extents {
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        file.write_all_at(&data, offset).expect("write image");
    }
    path
}

pub fn imported(extents: &[(u64, usize)]) -> TestVolume {
    let scratch = tempfile::tempdir().expect("tempdir");
    let img = image(scratch.path(), extents);
    TestVolume::create_with(
        SIZE,
        &[
            "--segment-size",
            "1M",
            "--from",
            img.to_str().expect("utf-8"),
        ],
    )
}

pub fn resync_status(node: &Node) -> Value {
    node.replication()["resync"].clone()
}
