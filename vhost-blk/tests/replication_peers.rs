//! A real replica daemon (`rewind-blk serve --replication-listen`) against
//! a hostile or broken primary played from the test with the crate's own
//! frame and TLS modules: peers it does not trust, hellos for another
//! disk, bad frames, bad records, heartbeat floods and a fenced primary.
//!
//! The other way round, a real primary daemon against a replica played
//! from the test: one whose welcome would steer its resync off the disk.
//!
//! Every case ends the same way: the replica closes the connection, its
//! `last_error` says why, nothing was appended, the daemon still answers,
//! its link does not claim a session that is gone, and a genuine session
//! works right after.
//!
//! The records sent are genuine: an in-process primary volume (the
//! journal crate, as the real daemon uses it) writes, flushes and reads
//! them back with `read_shipped`, exactly what the real sender ships.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::replication::{
    free_port, identity, replica_volume, tls_args, tls_context, Identity, Node, SIZE,
};
use common::{wait_until, KEEP_EPOCHS};
use rewind_journal::{
    BaseImage, EpochStart, OpenOptions, OsStorage, ShippedRecord, Volume, VolumeSettings,
    MAX_EPOCHS,
};
use rewind_vhost_blk::replication::frame::{
    read_frame, reseal, Encoder, ForwardOp, Frame, FrameError, Hello, Message, ResyncBegin,
    ResyncPoint, Welcome, HEADER_SIZE,
};
use rewind_vhost_blk::replication::tls::{Fingerprint, TlsContext};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Bound on every network wait (the replica gives up on a silent peer
/// after 3 s, so anything it does comes well before this).
const LIMIT: Duration = Duration::from_secs(10);
/// Bound on waiting for the replica's status to show something.
const STATUS_LIMIT: Duration = Duration::from_secs(10);
const DISK: u64 = 64 << 20;

/// The primary's side: an in-process volume whose records are shipped,
/// the identities, and a real replica daemon to ship them to.
struct Rig {
    rt: Runtime,
    replica: Node,
    addr: SocketAddr,
    primary: Volume,
    /// The identity the replica pins.
    me: TlsContext,
    replica_id: Identity,
    stranger: Identity,
    _dir: tempfile::TempDir,
}

/// One TLS connection to the replica, from the given local address (the
/// replica names its peer by it in `last_error`).
struct Conn {
    tls: TlsStream<TcpStream>,
    local: SocketAddr,
}

/// How the replica ended a connection: the frames it sent first, and the
/// read error that ended it.
#[derive(Debug)]
struct Closed {
    frames: Vec<Message>,
    end: FrameError,
}

impl Closed {
    fn refusal(&self) -> Option<&str> {
        self.frames.iter().find_map(|m| match m {
            Message::Refuse(why) => Some(why.as_str()),
            _ => None,
        })
    }

    fn welcomed(&self) -> bool {
        self.frames.iter().any(|m| matches!(m, Message::Welcome(_)))
    }

    fn acks(&self) -> Vec<u64> {
        self.frames
            .iter()
            .filter_map(|m| match m {
                Message::Ack { durable_lsn } => Some(*durable_lsn),
                _ => None,
            })
            .collect()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8).wrapping_mul(37) ^ (i as u8) ^ ((i / 512) as u8))
        .collect()
}

fn encode(epoch: u64, message: &Message) -> Vec<u8> {
    Encoder::new(false)
        .expect("encoder")
        .encode(epoch, message)
        .bytes
}

impl Rig {
    fn start() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let me_id = identity(&certs, "primary");
        let replica_id = identity(&certs, "replica");
        let stranger = identity(&certs, "stranger");
        assert_eq!(SIZE, "64M");
        let path = dir.path().join("primary");
        let settings = VolumeSettings {
            segment_size: 1 << 20,
            ..VolumeSettings::new(DISK)
        };
        Volume::create(
            &OsStorage,
            &path,
            &settings,
            BaseImage::Empty,
            &mut |_, _| {},
        )
        .expect("create the primary volume");
        let primary = open(&path);
        let uuid = primary.config().uuid.to_string();
        let port = free_port();
        let mut args = vec![
            "--replication-listen".to_owned(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(tls_args(&replica_id, &me_id));
        let replica = Node::start(replica_volume(&uuid), args);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let rig = Rig {
            rt,
            replica,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            primary,
            me: tls_context(&me_id, &replica_id),
            replica_id,
            stranger,
            _dir: dir,
        };
        assert_eq!(rig.last_lsn(), 0, "a new replica holds nothing");
        assert_eq!(rig.replication()["role"], "replica");
        rig
    }

    // --- the replica's status ---

    fn status(&self) -> Value {
        self.replica.ctl("status", Value::Null)
    }

    fn last_lsn(&self) -> u64 {
        self.status()["last_lsn"].as_u64().expect("last_lsn")
    }

    fn replication(&self) -> Value {
        self.replica.replication()
    }

    /// Waits for the replica to report the end of the connection from
    /// `local`, and returns what it says (without the address).
    fn error_of(&self, local: SocketAddr) -> String {
        let prefix = format!("{local}: ");
        let mut error = None;
        wait_until(
            &format!("the replica to report on {local}"),
            STATUS_LIMIT,
            || {
                error = self.replication()["last_error"]
                    .as_str()
                    .and_then(|e| e.strip_prefix(&prefix))
                    .map(str::to_owned);
                error.is_some()
            },
        );
        error.expect("reported")
    }

    /// What holds after every refused peer: the replica reported the
    /// connection with words containing `why`, appended nothing (it still
    /// holds `lsn`), still answers, and claims no session.
    fn check_refused(&self, local: SocketAddr, why: &str, lsn: u64) -> String {
        let error = self.error_of(local);
        assert!(
            error.contains(why),
            "the replica's last_error {error:?} does not say {why:?}"
        );
        let status = self.status();
        assert_eq!(status["last_lsn"], lsn, "nothing appended: {status}");
        let link = self.replication();
        assert_ne!(link["state"], "streaming", "no session claimed: {link}");
        assert_ne!(link["state"], "syncing", "no session claimed: {link}");
        assert!(link["acked_lsn"].as_u64() <= Some(lsn), "{link}");
        error
    }

    // --- the primary's side ---

    /// `blocks` 4 KiB writes on the primary, then a flush; the primary's
    /// durable lsn.
    fn write_flushed(&self, blocks: u64) -> u64 {
        let start = self.primary.last_lsn();
        for i in 0..blocks {
            let at = ((start + i) * 4096) % (DISK - 4096);
            self.primary
                .write(at, &pattern(start + i, 4096))
                .expect("write on the primary");
        }
        self.primary.flush().expect("flush the primary");
        self.primary.durable_lsn()
    }

    /// Every durable record of the primary from `from` on.
    fn records(&self, from: u64) -> Vec<ShippedRecord> {
        let mut records = Vec::new();
        loop {
            let batch = self
                .primary
                .read_shipped(from + records.len() as u64, usize::MAX)
                .expect("read the primary's journal");
            if batch.records.is_empty() {
                return records;
            }
            records.extend(batch.records);
        }
    }

    /// The hello the real sender would send.
    fn hello(&self) -> Hello {
        let config = self.primary.config();
        Hello {
            volume: config.uuid,
            size: config.size,
            block_size: config.block_size,
            max_payload: self.primary.max_record_payload(),
            epoch: self.primary.epoch(),
            epoch_history: self.primary.epoch_history(),
            durable_lsn: self.primary.durable_lsn(),
            first_lsn: 1,
        }
    }

    fn epoch(&self) -> u64 {
        self.primary.epoch()
    }

    // --- the network ---

    fn dial(&self, connector: TlsConnector) -> Result<Conn, (SocketAddr, String)> {
        self.rt.block_on(async {
            let tcp = tokio::time::timeout(LIMIT, TcpStream::connect(self.addr))
                .await
                .expect("connecting timed out")
                .expect("connect to the replica");
            let local = tcp.local_addr().expect("local address");
            let server_name = self.me.server_name();
            match tokio::time::timeout(LIMIT, connector.connect(server_name, tcp)).await {
                Ok(Ok(tls)) => Ok(Conn { tls, local }),
                Ok(Err(e)) => Err((local, format!("TLS: {e}"))),
                Err(_) => panic!("the TLS handshake timed out"),
            }
        })
    }

    /// A connection as the pinned primary.
    fn connect(&self) -> Conn {
        self.dial(self.me.connector())
            .unwrap_or_else(|(_, e)| panic!("the genuine primary cannot connect: {e}"))
    }

    /// Sends `bytes`; a replica that already closed may make this fail.
    fn send(&self, conn: &mut Conn, bytes: &[u8]) -> Result<(), String> {
        self.rt.block_on(async {
            let sent = async {
                conn.tls.write_all(bytes).await?;
                conn.tls.flush().await
            };
            match tokio::time::timeout(LIMIT, sent).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => panic!("sending {} bytes timed out", bytes.len()),
            }
        })
    }

    fn recv(&self, conn: &mut Conn) -> Result<Frame, FrameError> {
        self.rt.block_on(async {
            tokio::time::timeout(LIMIT, read_frame(&mut conn.tls))
                .await
                .unwrap_or_else(|_| panic!("no frame from the replica within {LIMIT:?}"))
        })
    }

    /// Reads until the replica closes the connection.
    fn closed(&self, conn: &mut Conn) -> Closed {
        let mut frames = Vec::new();
        loop {
            match self.recv(conn) {
                Ok(frame) => frames.push(frame.message),
                Err(end) => {
                    // The replica hung up (with or without a TLS alert),
                    // rather than sending something undecodable.
                    assert!(
                        matches!(
                            end,
                            FrameError::Closed | FrameError::Truncated | FrameError::Io(_)
                        ),
                        "the replica's last words: {end:?}"
                    );
                    return Closed { frames, end };
                }
            }
        }
    }

    /// Sends `hello` in a frame of its epoch; the replica's answer.
    fn say_hello(&self, conn: &mut Conn, hello: Hello) -> Message {
        let epoch = hello.epoch;
        self.send(conn, &encode(epoch, &Message::Hello(hello)))
            .expect("send the hello");
        self.recv(conn).expect("the replica's answer").message
    }

    /// A connection past the handshake, as the genuine primary.
    fn session(&self) -> (Conn, Welcome) {
        let mut conn = self.connect();
        match self.say_hello(&mut conn, self.hello()) {
            Message::Welcome(welcome) => {
                wait_until("the session to show", STATUS_LIMIT, || {
                    self.replication()["state"] == "streaming"
                });
                (conn, welcome)
            }
            other => panic!("the genuine hello was answered by {other:?}"),
        }
    }

    /// A genuine session: ships everything durable on the primary that the
    /// replica lacks, waits for its ack, then hangs up. Returns the lsn the
    /// replica holds.
    fn genuine(&self) -> u64 {
        let (mut conn, welcome) = self.session();
        assert_eq!(welcome.last_lsn, self.last_lsn());
        assert_eq!(
            welcome.epoch,
            self.status()["epoch"].as_u64().expect("epoch")
        );
        let target = self.primary.durable_lsn();
        let records = self.records(welcome.last_lsn + 1);
        if !records.is_empty() {
            self.send(&mut conn, &encode(self.epoch(), &Message::Records(records)))
                .expect("send the records");
        }
        // A heartbeat is answered by an ack too: the replica is alive even
        // with nothing to ship.
        self.send(&mut conn, &encode(self.epoch(), &Message::Heartbeat))
            .expect("send a heartbeat");
        loop {
            match self.recv(&mut conn) {
                Ok(Frame {
                    message: Message::Ack { durable_lsn },
                    ..
                }) if durable_lsn >= target => {
                    assert_eq!(durable_lsn, target);
                    break;
                }
                Ok(Frame {
                    message: Message::Ack { .. },
                    ..
                }) => {}
                other => panic!("a genuine session got {other:?}"),
            }
        }
        assert_eq!(self.last_lsn(), target);
        assert_eq!(self.replication()["acked_lsn"], target);
        self.hang_up(conn);
        target
    }

    /// Closes the connection cleanly and waits for the replica to see it;
    /// what it says of it.
    fn hang_up(&self, mut conn: Conn) -> String {
        self.rt.block_on(async {
            let _ = tokio::time::timeout(LIMIT, conn.tls.shutdown()).await;
        });
        let local = conn.local;
        drop(conn);
        let error = self.error_of(local);
        let link = self.replication();
        assert_eq!(link["state"], "disconnected", "{link}");
        error
    }
}

fn open(path: &Path) -> Volume {
    Volume::open(
        OsStorage::shared(),
        path,
        OpenOptions {
            fold_interval: None,
            ..OpenOptions::default()
        },
    )
    .expect("open the primary volume")
    .0
}

/// Trusts the server by its pinned fingerprint (the replica is genuine;
/// the client is the one under test) and presents no certificate.
#[derive(Debug)]
struct PinnedServer {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Fingerprint::of(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned replica".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn anonymous_client(replica: &Identity) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedServer {
        pin: replica.fingerprint.parse().expect("fingerprint"),
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A peer the replica must turn away during the TLS handshake: it never
/// sees a welcome, whatever it sends.
fn refused_by_tls(rig: &Rig, connector: TlsConnector, why: &str) -> String {
    let lsn = rig.last_lsn();
    let local = match rig.dial(connector) {
        // TLS 1.3: the client's handshake ends before the server has judged
        // its certificate; the refusal comes on the first read.
        Ok(mut conn) => {
            let _ = rig.send(&mut conn, &encode(1, &Message::Hello(rig.hello())));
            let closed = rig.closed(&mut conn);
            assert!(closed.frames.is_empty(), "{closed:?}");
            conn.local
        }
        Err((local, _)) => local,
    };
    rig.check_refused(local, why, lsn)
}

#[test]
fn peers_without_the_pinned_certificate_are_refused_by_tls() {
    let rig = Rig::start();
    rig.write_flushed(4);

    // 1. A certificate of its own that the replica does not pin.
    let stranger = tls_context(&rig.stranger, &rig.replica_id);
    let error = refused_by_tls(
        &rig,
        stranger.connector(),
        "TLS handshake failed: invalid peer certificate",
    );
    eprintln!("a stranger: {error}");

    // 2. No certificate at all.
    let error = refused_by_tls(
        &rig,
        anonymous_client(&rig.replica_id),
        "TLS handshake failed: peer sent no certificates",
    );
    eprintln!("no certificate: {error}");

    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

#[test]
fn a_hello_for_another_disk_is_refused() {
    let rig = Rig::start();
    let lsn = rig.genuine();
    rig.write_flushed(3);

    // 3. Another volume.
    let other = uuid::Uuid::new_v4();
    let mut conn = rig.connect();
    let answer = rig.say_hello(
        &mut conn,
        Hello {
            volume: other,
            ..rig.hello()
        },
    );
    let Message::Refuse(why) = answer else {
        panic!("a hello for volume {other} was answered by {answer:?}");
    };
    let expected = format!("not of {other}");
    assert!(why.contains(&expected), "{why}");
    let closed = rig.closed(&mut conn);
    assert!(closed.frames.is_empty(), "{closed:?}");
    let error = rig.check_refused(conn.local, &expected, lsn);
    assert!(
        error.contains("refused: this is a replica of volume"),
        "{error}"
    );

    // 4. Another size.
    for size in [DISK + 512, DISK / 2] {
        let mut conn = rig.connect();
        let answer = rig.say_hello(
            &mut conn,
            Hello {
                size,
                ..rig.hello()
            },
        );
        let Message::Refuse(why) = answer else {
            panic!("a hello for a disk of {size} bytes was answered by {answer:?}");
        };
        let expected = format!("the primary's disk has {size} bytes");
        assert!(why.contains(&expected), "{why}");
        rig.closed(&mut conn);
        rig.check_refused(conn.local, &expected, lsn);
    }

    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

#[test]
fn bad_frames_close_the_session_and_append_nothing() {
    let rig = Rig::start();
    let mut lsn = rig.genuine();

    // 5. Another protocol version: on the hello...
    let mut hello = encode(rig.epoch(), &Message::Hello(rig.hello()));
    hello[4..6].copy_from_slice(&2u16.to_le_bytes());
    reseal(&mut hello);
    let mut conn = rig.connect();
    rig.send(&mut conn, &hello).expect("send the hello");
    let closed = rig.closed(&mut conn);
    assert!(!closed.welcomed(), "{closed:?}");
    rig.check_refused(conn.local, "replication protocol version 2", lsn);

    // ...and on records in a session.
    rig.write_flushed(3);
    let (mut conn, welcome) = rig.session();
    assert_eq!(welcome.last_lsn, lsn);
    let mut records = encode(
        rig.epoch(),
        &Message::Records(rig.records(welcome.last_lsn + 1)),
    );
    records[4..6].copy_from_slice(&2u16.to_le_bytes());
    reseal(&mut records);
    rig.send(&mut conn, &records).expect("send the records");
    let closed = rig.closed(&mut conn);
    assert!(closed.acks().is_empty(), "{closed:?}");
    rig.check_refused(conn.local, "replication protocol version 2", lsn);

    // 6. Half a frame, then the primary hangs up.
    let (mut conn, _) = rig.session();
    let records = encode(rig.epoch(), &Message::Records(rig.records(lsn + 1)));
    rig.send(&mut conn, &records[..records.len() / 2])
        .expect("send half a frame");
    rig.rt.block_on(async {
        let _ = tokio::time::timeout(LIMIT, conn.tls.shutdown()).await;
    });
    rig.closed(&mut conn);
    rig.check_refused(conn.local, "ended in the middle of a frame", lsn);

    // 7. A byte of the body flipped under the old checksum.
    let (mut conn, _) = rig.session();
    let mut records = encode(rig.epoch(), &Message::Records(rig.records(lsn + 1)));
    let middle = HEADER_SIZE + (records.len() - HEADER_SIZE) / 2;
    records[middle] ^= 0x40;
    rig.send(&mut conn, &records).expect("send the records");
    let closed = rig.closed(&mut conn);
    assert!(closed.acks().is_empty(), "{closed:?}");
    rig.check_refused(conn.local, "frame checksum fails", lsn);

    // The same records, intact, are taken.
    lsn = rig.genuine();
    assert_eq!(lsn, rig.primary.durable_lsn());
}

#[test]
fn a_record_with_a_bad_payload_checksum_appends_nothing_of_its_batch() {
    let rig = Rig::start();
    let lsn = rig.genuine();
    rig.write_flushed(6);

    // 8. A payload byte flipped; the frame around it is sound.
    let mut records = rig.records(lsn + 1);
    let bad = records
        .iter()
        .rposition(|r| !r.payload.is_empty())
        .expect("a record with a payload");
    assert!(bad >= 2, "valid records come before the bad one");
    records[bad].payload[100] ^= 1;
    let bad_lsn = records[bad].lsn();
    let (mut conn, _) = rig.session();
    rig.send(&mut conn, &encode(rig.epoch(), &Message::Records(records)))
        .expect("send the records");
    let closed = rig.closed(&mut conn);
    assert!(closed.acks().is_empty(), "{closed:?}");
    let error = rig.check_refused(conn.local, "payload checksum fails", lsn);
    assert!(
        error.contains(&format!("shipped record {bad_lsn} refused")),
        "{error}"
    );

    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

#[test]
fn records_out_of_lsn_order_append_nothing() {
    let rig = Rig::start();
    let lsn = rig.genuine();
    rig.write_flushed(6);
    let records = rig.records(lsn + 1);
    assert!(records.len() >= 4);

    // 9a. Two records swapped (the first one of the batch is in order).
    let mut swapped = records.clone();
    swapped.swap(1, 2);
    let (mut conn, _) = rig.session();
    rig.send(&mut conn, &encode(rig.epoch(), &Message::Records(swapped)))
        .expect("send the records");
    let closed = rig.closed(&mut conn);
    assert!(closed.acks().is_empty(), "{closed:?}");
    rig.check_refused(
        conn.local,
        &format!("lsn {} arrived where {} was due", lsn + 3, lsn + 2),
        lsn,
    );

    // 9b. A batch that skips an lsn.
    let mut gap = records.clone();
    gap.remove(1);
    let (mut conn, _) = rig.session();
    rig.send(&mut conn, &encode(rig.epoch(), &Message::Records(gap)))
        .expect("send the records");
    let closed = rig.closed(&mut conn);
    assert!(closed.acks().is_empty(), "{closed:?}");
    rig.check_refused(
        conn.local,
        &format!("lsn {} arrived where {} was due", lsn + 3, lsn + 2),
        lsn,
    );

    // 9c. A batch that starts past the replica's next lsn.
    let (mut conn, _) = rig.session();
    rig.send(
        &mut conn,
        &encode(rig.epoch(), &Message::Records(records[1..].to_vec())),
    )
    .expect("send the records");
    rig.closed(&mut conn);
    rig.check_refused(
        conn.local,
        &format!("lsn {} arrived where {} was due", lsn + 2, lsn + 1),
        lsn,
    );

    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

/// Offsets of header fields (journal/FORMAT.md, "Records").
const LSN_AT: usize = 16;
const TIME_AT: usize = 24;
const EPOCH_AT: usize = 32;
const OFFSET_AT: usize = 40;

/// Sets the u64 header field at `at` of `record`, with a header checksum
/// to match: a record no genuine primary sends.
fn set_field(record: &mut ShippedRecord, at: usize, value: u64) {
    record.header[at..at + 8].copy_from_slice(&value.to_le_bytes());
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &record.header[..72]);
    // A 32-bit CRC comes back in the low half of the u64.
    record.header[72..76].copy_from_slice(&(crc as u32).to_le_bytes());
}

/// A primary whose clock runs far ahead (a bad clock at boot, a jump)
/// stamps its records so, and every record after them no earlier: the
/// replica takes them as they are (with a `clock_skew` warning), so that
/// replication and a failover go on.
#[test]
fn records_from_a_clock_far_ahead_are_taken() {
    const YEAR_2500_NS: u64 = 16_725_225_600 * 1_000_000_000;
    let rig = Rig::start();
    let lsn = rig.genuine();
    rig.write_flushed(4);
    let mut records = rig.records(lsn + 1);
    assert!(records.len() >= 3);
    // The first record is as stamped; those after it keep their order in
    // time.
    for record in &mut records[1..] {
        set_field(record, TIME_AT, YEAR_2500_NS);
    }
    let last = records.last().expect("records").lsn();
    let (mut conn, _) = rig.session();
    rig.send(&mut conn, &encode(rig.epoch(), &Message::Records(records)))
        .expect("send the records");
    loop {
        match rig.recv(&mut conn) {
            Ok(Frame {
                message: Message::Ack { durable_lsn },
                ..
            }) if durable_lsn >= last => break,
            Ok(Frame {
                message: Message::Ack { .. },
                ..
            }) => {}
            other => panic!("the replica answered {other:?}"),
        }
    }
    assert_eq!(rig.last_lsn(), last);
}

/// Every epoch a replica takes is listed in its volume.json, which an
/// open reads only up to 1 MiB: a batch of thousands of epochs is taken,
/// the history forgets the oldest and keeps the newest, and the replica
/// opens with them.
#[test]
fn a_flood_of_epochs_is_taken_and_the_history_stays_bounded() {
    const FLOOD: u64 = 16_000;
    let mut rig = Rig::start();
    let lsn = rig.genuine();
    rig.primary.raise_epoch().expect("raise the epoch");
    let genuine = rig.records(lsn + 1);
    assert_eq!(genuine[0].lsn(), lsn + 1);
    // Epoch records 2, 3, ...: listed all, volume.json would take well
    // over 1 MiB.
    let flood: Vec<ShippedRecord> = (0..FLOOD)
        .map(|i| {
            let mut record = genuine[0].clone();
            set_field(&mut record, LSN_AT, lsn + 1 + i);
            set_field(&mut record, EPOCH_AT, 2 + i);
            set_field(&mut record, OFFSET_AT, 2 + i);
            record
        })
        .collect();
    let (mut conn, _) = rig.session();
    rig.send(&mut conn, &encode(1, &Message::Records(flood)))
        .expect("send the records");
    let last = lsn + FLOOD;
    loop {
        match rig.recv(&mut conn) {
            Ok(Frame {
                message: Message::Ack { durable_lsn },
                ..
            }) if durable_lsn >= last => break,
            Ok(Frame {
                message: Message::Ack { .. },
                ..
            }) => {}
            other => panic!("the replica answered {other:?}"),
        }
    }
    let check = |status: Value| {
        assert_eq!(status["epoch"], FLOOD + 1);
        assert_eq!(status["last_lsn"], last);
        let history: Vec<EpochStart> =
            serde_json::from_value(status["epoch_history"].clone()).expect("epoch_history");
        assert!(
            (KEEP_EPOCHS..=MAX_EPOCHS).contains(&history.len()),
            "{} epochs",
            history.len()
        );
        // The newest, as they came.
        for start in &history {
            assert_eq!(start.first_lsn, lsn + start.epoch - 1, "{start:?}");
        }
        assert_eq!(history.last().map(|s| s.epoch), Some(FLOOD + 1));
        history
    };
    let history = check(rig.status());
    drop(conn);

    rig.replica.stop();
    rig.replica.restart();
    assert_eq!(check(rig.status()), history);
}

#[test]
fn a_flood_of_heartbeats_closes_the_session() {
    let rig = Rig::start();
    let lsn = rig.genuine();

    // 10. A hundred heartbeats in one burst.
    let (mut conn, _) = rig.session();
    let beat = encode(rig.epoch(), &Message::Heartbeat);
    let flood = beat.repeat(100);
    // The replica may hang up before it has read them all.
    let _ = rig.send(&mut conn, &flood);
    let closed = rig.closed(&mut conn);
    let acks = closed.acks();
    assert!(acks.len() <= 20, "{} heartbeats answered", acks.len());
    assert!(acks.iter().all(|&a| a == lsn), "{acks:?}");
    rig.check_refused(conn.local, "more than 20 heartbeats in a second", lsn);

    // A heartbeat a second is fine.
    rig.write_flushed(2);
    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

#[test]
fn a_fenced_primary_is_refused() {
    let rig = Rig::start();
    rig.write_flushed(3);
    let fenced_history = rig.primary.epoch_history();
    assert_eq!(
        fenced_history,
        vec![EpochStart {
            epoch: 1,
            first_lsn: 1,
            node: 0
        }]
    );
    let before = rig.genuine();

    // The primary moves to epoch 2 (an Epoch record) and ships it.
    let epoch_lsn = rig.primary.last_lsn() + 1;
    assert_eq!(rig.primary.raise_epoch().expect("raise the epoch"), 2);
    rig.write_flushed(2);
    let lsn = rig.genuine();
    assert!(lsn > before);
    assert_eq!(rig.status()["epoch"], 2);
    assert_eq!(
        rig.primary.epoch_history(),
        vec![
            EpochStart {
                epoch: 1,
                first_lsn: 1,
                node: 0
            },
            EpochStart {
                epoch: 2,
                first_lsn: epoch_lsn,
                node: rig.primary.node()
            }
        ]
    );

    // 11. The old primary, still at epoch 1, says hello.
    let mut conn = rig.connect();
    let stale = Hello {
        epoch: 1,
        epoch_history: fenced_history,
        durable_lsn: before,
        ..rig.hello()
    };
    let answer = rig.say_hello(&mut conn, stale);
    let Message::Refuse(why) = answer else {
        panic!("a fenced primary's hello was answered by {answer:?}");
    };
    assert!(why.contains("it was fenced"), "{why}");
    rig.closed(&mut conn);
    let error = rig.check_refused(
        conn.local,
        "the primary is at epoch 1, older than this replica's 2: it was fenced",
        lsn,
    );
    eprintln!("a fenced primary: {error}");

    // Past a hello of the right epoch, a frame of the old one.
    let (mut conn, _) = rig.session();
    rig.send(&mut conn, &encode(1, &Message::Heartbeat))
        .expect("send the heartbeat");
    let closed = rig.closed(&mut conn);
    assert!(closed.acks().is_empty(), "{closed:?}");
    rig.check_refused(
        conn.local,
        "a frame of epoch 1 arrived; this replica is at epoch 2 (the sender was fenced)",
        lsn,
    );

    rig.write_flushed(1);
    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
    assert_eq!(rig.status()["epoch"], 2);
}

/// REPLICATION.md: a refuse frame says why, then the connection closes.
/// Past the welcome the replica queues its refusal for the writer task,
/// but the session's `select!` returns as soon as the reader or the
/// applier ends, dropping the writer before it sent anything: the primary
/// only sees the connection drop, and cannot log why.
#[test]
fn the_primary_is_told_why_its_session_ends() {
    let rig = Rig::start();
    let lsn = rig.genuine();
    rig.write_flushed(4);
    let records = rig.records(lsn + 1);
    let mut garbled = encode(rig.epoch(), &Message::Records(records.clone()));
    garbled[HEADER_SIZE + 10] ^= 1;
    let mut bad_payload = records;
    let bad = bad_payload
        .iter()
        .rposition(|r| !r.payload.is_empty())
        .expect("a record with a payload");
    bad_payload[bad].payload[0] ^= 1;
    let cases = [
        ("frame checksum fails", garbled),
        (
            "payload checksum fails",
            encode(rig.epoch(), &Message::Records(bad_payload)),
        ),
        (
            "more than 20 heartbeats in a second",
            encode(rig.epoch(), &Message::Heartbeat).repeat(30),
        ),
    ];
    let mut untold = Vec::new();
    for (why, bytes) in cases {
        let (mut conn, _) = rig.session();
        let _ = rig.send(&mut conn, &bytes);
        let closed = rig.closed(&mut conn);
        rig.check_refused(conn.local, why, lsn);
        match closed.refusal() {
            Some(refusal) if refusal.contains(why) => {}
            other => untold.push(format!(
                "{why}: the primary got the refusal {other:?}, then {:?}",
                closed.end
            )),
        }
    }
    assert!(untold.is_empty(), "{untold:#?}");
}

/// A primary that hangs up between frames (a restart, a handover) is
/// reported in the words of a frame cut short (case 6): `last_error`
/// cannot tell a clean close from a truncated frame. (`read_frame` maps
/// every `UnexpectedEof` to `FrameError::Truncated`, even one before the
/// first byte of a header.)
#[test]
fn a_clean_hang_up_is_not_called_a_cut_frame() {
    let rig = Rig::start();
    rig.write_flushed(2);
    let (conn, _) = rig.session();
    let error = rig.hang_up(conn);
    assert!(!error.contains("in the middle of a frame"), "{error}");
}

/// A history that adds an epoch 0 at lsn 1 relates as a newer primary's
/// that began at lsn 1: taken, the replica would cut every record it
/// holds. A hello whose epoch is not its history's last is as bad.
#[test]
fn a_hello_with_a_malformed_epoch_history_is_refused_and_cuts_nothing() {
    let rig = Rig::start();
    rig.write_flushed(4);
    let lsn = rig.genuine();
    let mut appended = rig.primary.epoch_history();
    appended.push(EpochStart {
        epoch: 0,
        first_lsn: 1,
        node: 7,
    });
    let cases = [
        (
            Hello {
                epoch_history: appended,
                ..rig.hello()
            },
            "the primary's hello is malformed: epoch 0 follows epoch 1; epochs must increase",
        ),
        (
            Hello {
                epoch: 5,
                ..rig.hello()
            },
            "the primary's hello is malformed: it is at epoch 5 but its epoch history ends with",
        ),
    ];
    for (hello, why) in cases {
        let mut conn = rig.connect();
        let answer = rig.say_hello(&mut conn, hello);
        let Message::Refuse(refusal) = answer else {
            panic!("a malformed hello was answered by {answer:?}");
        };
        assert!(refusal.contains(why), "{refusal}");
        rig.closed(&mut conn);
        rig.check_refused(conn.local, why, lsn);
        assert_eq!(rig.status()["epoch"], 1);
    }
    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

/// A primary whose history starts (the older epochs forgotten) after
/// the replica's ends cannot be related to it: nothing says where the
/// two part. Refused with both histories' epochs and what to do; nothing
/// is cut, and the genuine primary goes on.
#[test]
fn a_hello_whose_history_cannot_be_related_is_refused_and_cuts_nothing() {
    let rig = Rig::start();
    rig.write_flushed(4);
    let lsn = rig.genuine();
    let far = vec![
        EpochStart {
            epoch: 5000,
            first_lsn: 2,
            node: 7,
        },
        EpochStart {
            epoch: 5001,
            first_lsn: lsn + 1,
            node: 7,
        },
    ];
    let mut conn = rig.connect();
    let hello = Hello {
        epoch: 5001,
        epoch_history: far,
        ..rig.hello()
    };
    let answer = rig.say_hello(&mut conn, hello);
    let Message::Refuse(refusal) = answer else {
        panic!("an unrelated hello was answered by {answer:?}");
    };
    let why = "the epoch histories cannot be related: this node's lists epochs 1..=1 (from \
               lsn 1), the peer's epochs 5000..=5001 (from lsn 2)";
    assert!(refusal.contains(why), "{refusal}");
    assert!(
        refusal.contains("rewind-blk create --replica-of"),
        "{refusal}"
    );
    rig.closed(&mut conn);
    rig.check_refused(conn.local, why, lsn);
    let status = rig.status();
    assert_eq!(status["epoch"], 1);
    assert_eq!(status["epoch_history"], json!(rig.primary.epoch_history()));
    rig.write_flushed(2);
    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

/// A resync-begin is checked before the replica keeps any of it: a sync
/// point at lsn u64::MAX (no lsn follows it: finishing the resync
/// overflowed), a malformed epoch history.
#[test]
fn a_resync_begin_the_replica_cannot_keep_is_refused_before_it_begins() {
    let rig = Rig::start();
    rig.write_flushed(4);
    let lsn = rig.genuine();
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let sound = ResyncBegin {
        sync_lsn: lsn,
        sync_ns: now_ns - 1_000_000_000,
        epoch_history: rig.primary.epoch_history(),
        from_offset: 0,
        diff_key: None,
    };
    let start = |epoch, first_lsn| EpochStart {
        epoch,
        first_lsn,
        node: 0,
    };
    let cases = [
        (
            ResyncBegin {
                sync_lsn: u64::MAX,
                ..sound.clone()
            },
            "a resync to lsn 18446744073709551615: no lsn could follow it".to_owned(),
        ),
        (
            ResyncBegin {
                epoch_history: Vec::new(),
                ..sound.clone()
            },
            format!("a resync to lsn {lsn}: the epoch history is empty"),
        ),
        (
            ResyncBegin {
                epoch_history: vec![start(2, 1), start(1, 2)],
                ..sound.clone()
            },
            format!("a resync to lsn {lsn}: epoch 1 follows epoch 2"),
        ),
    ];
    for (begin, why) in cases {
        let (mut conn, _) = rig.session();
        let epoch = rig.epoch();
        rig.send(&mut conn, &encode(epoch, &Message::ResyncBegin(begin)))
            .expect("send the resync-begin");
        // What a resync sends next; the replica may have hung up.
        let zero = Message::Zero {
            offset: 0,
            length: DISK,
        };
        let _ = rig.send(&mut conn, &encode(epoch, &zero));
        let _ = rig.send(&mut conn, &encode(epoch, &Message::ResyncEnd));
        let closed = rig.closed(&mut conn);
        assert!(
            closed.refusal().is_some_and(|r| r.contains(&why)),
            "{why}: {closed:?}"
        );
        rig.check_refused(conn.local, &why, lsn);
        assert!(rig.replication()["resync"].is_null());
        let (conn, welcome) = rig.session();
        assert_eq!(welcome.resync, None, "no resync began");
        assert_eq!((welcome.last_lsn, welcome.durable_lsn), (lsn, lsn));
        rig.hang_up(conn);
    }
    rig.write_flushed(2);
    assert_eq!(rig.genuine(), rig.primary.durable_lsn());
}

/// Once the replica took over for a detached primary it is a primary:
/// the detached one may send it requests, but nothing that would replace
/// its disk or history. A discard of the whole disk is one request, and
/// one past the disk is refused by its range check.
#[test]
fn a_node_serving_a_detached_primary_takes_only_its_requests() {
    let rig = Rig::start();
    rig.write_flushed(4);
    let lsn = rig.genuine();
    let (mut conn, _) = rig.session();
    let epoch = rig.epoch();
    let detach = Message::Detach("the test's disk failed".into());
    rig.send(&mut conn, &encode(epoch, &detach))
        .expect("send the detach");
    let answer = rig.recv(&mut conn).expect("an answer").message;
    assert_eq!(answer, Message::Detached { epoch: 2, lsn });
    let mut forward = |id, op| {
        rig.send(&mut conn, &encode(epoch, &Message::Forward { id, op }))
            .expect("forward");
        match rig.recv(&mut conn).expect("an answer").message {
            Message::Forwarded {
                id: answered,
                result,
            } if answered == id => result,
            other => panic!("request {id} was answered by {other:?}"),
        }
    };
    let whole = ForwardOp::Discard {
        offset: 0,
        length: DISK,
    };
    assert_eq!(forward(1, whole), Ok(Vec::new()));
    let past = ForwardOp::Discard {
        offset: 512,
        length: u64::MAX - 511,
    };
    let refused = forward(2, past).expect_err("past the disk");
    assert!(refused.contains("ends past the disk"), "{refused}");
    let last = rig.last_lsn();
    assert!(last > lsn, "the discard was taken");

    // A sound resync of the epoch this node is at now: it would replace
    // the disk and history of the primary this node is.
    let mut history = rig.primary.epoch_history();
    history.push(EpochStart {
        epoch: 2,
        first_lsn: last,
        node: 5,
    });
    let begin = ResyncBegin {
        sync_lsn: last,
        sync_ns: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64,
        epoch_history: history,
        from_offset: 0,
        diff_key: None,
    };
    rig.send(&mut conn, &encode(epoch, &Message::ResyncBegin(begin)))
        .expect("send the resync-begin");
    let closed = rig.closed(&mut conn);
    let why = "a resync-begin frame arrived from the detached primary";
    assert!(
        closed.refusal().is_some_and(|r| r.contains(why)),
        "{closed:?}"
    );
    let error = rig.error_of(conn.local);
    assert!(error.contains(why), "{error}");
    let status = rig.status();
    assert_eq!(status["last_lsn"], last, "{status}");
    assert_eq!(rig.replication()["role"], "primary");
    assert!(rig.replication()["resync"].is_null());
}

/// Where a resync may not resume (its offset and why), and where it may.
const BAD_RESUME: [(u64, &str); 2] = [
    (4096, "offset 4096 is not where a chunk starts"),
    (
        DISK + (1 << 20),
        "is past the end of the 67108864-byte disk",
    ),
];
const GOOD_RESUME: u64 = 1 << 20;

#[test]
fn a_replica_does_not_offer_to_resume_a_resync_its_file_places_off_a_chunk() {
    let mut rig = Rig::start();
    let sync_lsn = rig.write_flushed(4);
    for (next_offset, why) in BAD_RESUME.into_iter().chain([(GOOD_RESUME, "")]) {
        // A resync file as an interrupted resync leaves it, but damaged.
        rig.replica.stop();
        let state = json!({
            "sync_lsn": sync_lsn,
            "sync_ns": rig.primary.record_time(sync_lsn).expect("time"),
            "epoch_history": rig.primary.epoch_history(),
            "next_offset": next_offset,
        });
        let path = rig.replica.vol.path.join("resync");
        std::fs::write(path, state.to_string()).expect("write the resync file");
        rig.replica.restart();
        let mut conn = rig.connect();
        match rig.say_hello(&mut conn, rig.hello()) {
            Message::Welcome(welcome) if why.is_empty() => {
                let resume = welcome.resync.expect("a resync to resume");
                assert_eq!(
                    (resume.sync_lsn, resume.next_offset),
                    (sync_lsn, next_offset)
                );
            }
            Message::Refuse(refusal) => {
                assert!(refusal.contains("resync file is damaged"), "{refusal}");
                assert!(refusal.contains(why), "{refusal}");
                rig.check_refused(conn.local, why, 0);
            }
            other => panic!("resuming at {next_offset}: {other:?}"),
        }
    }
}

/// A real primary daemon whose replica, played here, welcomes it with a
/// resync to resume at `next_offset`: the resync-begin the primary
/// answers with (none if it hung up), the primary, and the replica's
/// listener (kept: the primary's next dial waits on it, so its last_error
/// stays).
fn primary_resuming_at(next_offset: u64) -> (Option<ResyncBegin>, Node, std::net::TcpListener) {
    let vol = common::TestVolume::create(SIZE);
    let certs = vol.dir.path().join("certs");
    let (me, replica) = (identity(&certs, "primary"), identity(&certs, "replica"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("address").port();
    let mut args = vec!["--replicate-to".to_owned(), format!("127.0.0.1:{port}")];
    args.extend(tls_args(&me, &replica));
    let primary = Node::start(vol, args);
    let sync_lsn = primary.ctl("bookmark", json!({"name": "sync"}))["lsn"]
        .as_u64()
        .expect("lsn");
    let tls = tls_context(&replica, &me);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (begin, listener) = rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let session = async {
            // A dial from before the bookmark may have given up on its
            // handshake: the next one comes.
            loop {
                let (tcp, _) = listener.accept().await.expect("accept");
                let Ok(stream) = tls.acceptor().accept(tcp).await else {
                    continue;
                };
                let (mut reader, mut writer) = tokio::io::split(stream);
                let Ok(Frame {
                    message: Message::Hello(hello),
                    ..
                }) = read_frame(&mut reader).await
                else {
                    continue;
                };
                let welcome = Welcome {
                    epoch: hello.epoch,
                    last_lsn: 0,
                    durable_lsn: 0,
                    resync: Some(ResyncPoint {
                        sync_lsn,
                        next_offset,
                    }),
                };
                let answer = encode(hello.epoch, &Message::Welcome(welcome));
                if writer.write_all(&answer).await.is_err() {
                    continue;
                }
                loop {
                    match read_frame(&mut reader).await {
                        Ok(Frame {
                            message: Message::ResyncBegin(begin),
                            ..
                        }) => return Some(begin),
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            }
        };
        let begin = tokio::time::timeout(LIMIT, session)
            .await
            .expect("the primary's session within the limit");
        (begin, listener.into_std().expect("listener"))
    });
    (begin, primary, listener)
}

#[test]
fn a_primary_does_not_resume_a_resync_its_replica_places_off_a_chunk() {
    for (next_offset, why) in BAD_RESUME {
        let (begin, primary, _listener) = primary_resuming_at(next_offset);
        assert!(begin.is_none(), "{begin:?}");
        wait_until("the primary to say why", STATUS_LIMIT, || {
            primary.replication()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("would resume its resync") && e.contains(why))
        });
    }
    let (begin, _primary, _listener) = primary_resuming_at(GOOD_RESUME);
    assert_eq!(begin.map(|b| b.from_offset), Some(GOOD_RESUME));
}
