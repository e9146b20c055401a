//! The replica's side of a replication link.
//!
//! The replica listens; a primary connects, proves its identity (mutual
//! TLS) and says hello. The hello is checked against this volume (uuid,
//! size, block size, record size, epoch and epoch history, lsn ranges)
//! before anything is taken; a refusal is sent back, logged and shown in
//! `status`. An accepted session replaces any older one.
//!
//! Frames are read by one task and applied by another, so the network and
//! the disk overlap; batches that queued up while a sync ran are applied
//! together (one more group commit). Each apply is acknowledged with the
//! durable lsn. Whatever is wrong with a frame or a record closes the
//! session without appending it ([`Volume::apply_shipped`] checks a whole
//! batch before writing any of it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewind_journal::{Role, ShippedRecord, Volume};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::frame::{read_frame, write_frame, Encoder, Hello, Message, Welcome};
use super::tls::TlsContext;
use super::{tune_socket, Link, LinkState, SILENCE_LIMIT};

/// A primary sends one heartbeat a second; many more is a broken or
/// hostile peer.
const MAX_HEARTBEATS_PER_SECOND: u32 = 20;
/// Batches read ahead of the one being applied.
const QUEUED_BATCHES: usize = 8;

/// Accepts primaries until the runtime stops.
pub async fn run(volume: Arc<Volume>, link: Arc<Link>, tls: TlsContext, listener: TcpListener) {
    let current: Arc<Mutex<Option<AbortHandle>>> = Arc::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("replication listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (volume, link, tls, current) =
            (volume.clone(), link.clone(), tls.clone(), current.clone());
        let (me_tx, me_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let me = me_rx.await.ok();
            let ended = session(&volume, &link, &tls, tcp, peer, me, &current).await;
            if ended.established {
                tracing::warn!(%peer, "replication session ended: {}", ended.error);
                link.failed(LinkState::Disconnected, format!("{peer}: {}", ended.error));
                link.set_outdated(Some(format!(
                    "unknown: the primary went away without a seal; this replica holds lsn {} \
                     (durable {})",
                    volume.last_lsn(),
                    volume.durable_lsn()
                )));
            } else {
                // A peer turned away does not disturb the session that runs.
                tracing::warn!(%peer, "replication connection refused: {}", ended.error);
                link.note_error(format!("{peer}: {}", ended.error));
            }
        });
        let _ = me_tx.send(task.abort_handle());
    }
}

/// How a session ended.
#[derive(Debug)]
struct Ended {
    /// It passed the handshake (it was the replica's primary).
    established: bool,
    error: String,
}

/// One primary's connection, until it fails; `me` ends it when a newer
/// session takes over.
async fn session(
    volume: &Arc<Volume>,
    link: &Link,
    tls: &TlsContext,
    tcp: TcpStream,
    peer: SocketAddr,
    me: Option<AbortHandle>,
    current: &Mutex<Option<AbortHandle>>,
) -> Ended {
    match handshake(volume, tls, tcp).await {
        Err(error) => Ended {
            established: false,
            error,
        },
        Ok((mut reader, mut writer, mut encoder, hello, welcome)) => {
            // This session supersedes any older one (a primary that
            // reconnected before its old connection timed out).
            if let Some(old) =
                std::mem::replace(&mut *current.lock().unwrap_or_else(|e| e.into_inner()), me)
            {
                old.abort();
            }
            tracing::info!(
                %peer,
                primary_lsn = hello.durable_lsn,
                replica_lsn = welcome.last_lsn,
                "replication session up"
            );
            link.set_peer(Some(peer.to_string()));
            link.set_outdated(None);
            link.acked(welcome.durable_lsn);
            link.set_state(LinkState::Streaming);
            let (batches, queued) = mpsc::channel(QUEUED_BATCHES);
            let (replies, answers) = mpsc::channel(QUEUED_BATCHES + 2);
            let reading = read_frames(volume, &mut reader, batches, replies.clone());
            let applying = apply_batches(volume, link, queued, replies);
            let writing = write_replies(volume, &mut writer, &mut encoder, answers);
            let error = tokio::select! {
                e = reading => e,
                e = applying => e,
                e = writing => e,
            };
            Ended {
                established: true,
                error,
            }
        }
    }
}

type Reader = tokio::io::ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>;
type Writer = tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>;

/// TLS, then the hello and its answer.
async fn handshake(
    volume: &Volume,
    tls: &TlsContext,
    tcp: TcpStream,
) -> Result<(Reader, Writer, Encoder, Hello, Welcome), String> {
    tune_socket(&tcp);
    let stream = match tokio::time::timeout(SILENCE_LIMIT, tls.acceptor().accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err("TLS handshake timed out".into()),
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut encoder = Encoder::new(false).map_err(|e| format!("cannot start the encoder: {e}"))?;
    let hello = match tokio::time::timeout(SILENCE_LIMIT, read_frame(&mut reader)).await {
        Ok(Ok(frame)) => match frame.message {
            Message::Hello(hello) => hello,
            other => return Err(format!("expected a hello, got {}", other.name())),
        },
        Ok(Err(e)) => return Err(format!("reading the hello: {e}")),
        Err(_) => return Err("no hello".into()),
    };
    if let Err(reason) = check_hello(volume, &hello) {
        let refusal = encoder.encode(volume.epoch(), &Message::Refuse(reason.clone()));
        let _ = write_frame(&mut writer, &refusal).await;
        return Err(format!("refused: {reason}"));
    }
    let welcome = Welcome {
        epoch: volume.epoch(),
        last_lsn: volume.last_lsn(),
        durable_lsn: volume.durable_lsn(),
    };
    let answer = encoder.encode(welcome.epoch, &Message::Welcome(welcome.clone()));
    write_frame(&mut writer, &answer)
        .await
        .map_err(|e| format!("sending the welcome: {e}"))?;
    Ok((reader, writer, encoder, hello, welcome))
}

/// Checks a primary's hello against this replica; the error is the
/// refusal sent back.
fn check_hello(volume: &Volume, hello: &Hello) -> Result<(), String> {
    let config = volume.config();
    if volume.role() != Role::Replica {
        return Err(format!(
            "volume {} here is a primary; only a replica (`rewind-blk create --replica-of`) takes a stream",
            config.uuid
        ));
    }
    if hello.volume != config.uuid {
        return Err(format!(
            "this is a replica of volume {}, not of {}",
            config.uuid, hello.volume
        ));
    }
    if hello.size != config.size || hello.block_size != config.block_size {
        return Err(format!(
            "the primary's disk has {} bytes in blocks of {}; this replica's has {} in blocks of {}",
            hello.size, hello.block_size, config.size, config.block_size
        ));
    }
    if hello.max_payload > volume.max_record_payload() {
        return Err(format!(
            "the primary writes records of up to {} bytes; this replica's segments hold {} \
             (recreate it with a larger --segment-size)",
            hello.max_payload,
            volume.max_record_payload()
        ));
    }
    if hello.epoch < volume.epoch() {
        return Err(format!(
            "the primary is at epoch {}, older than this replica's {}: it was fenced",
            hello.epoch,
            volume.epoch()
        ));
    }
    let history = volume.epoch_history();
    if hello.epoch_history.get(..history.len()) != Some(&history[..]) {
        return Err(format!(
            "epoch histories differ (primary {:?}, replica {:?}): the two diverged",
            hello.epoch_history, history
        ));
    }
    let last = volume.last_lsn();
    if last > hello.durable_lsn {
        return Err(format!(
            "this replica holds lsn {last}, past the primary's durable lsn {}: the two diverged",
            hello.durable_lsn
        ));
    }
    if hello.first_lsn > last + 1 {
        return Err(format!(
            "the primary's journal starts at lsn {}, after this replica's lsn {last}: it needs a resync",
            hello.first_lsn
        ));
    }
    Ok(())
}

/// What the writer sends back.
#[derive(Debug)]
enum Reply {
    Ack(u64),
    Refuse(String),
}

async fn read_frames<R: AsyncRead + Unpin>(
    volume: &Volume,
    reader: &mut R,
    batches: mpsc::Sender<Vec<ShippedRecord>>,
    replies: mpsc::Sender<Reply>,
) -> String {
    let mut beats = (Instant::now(), 0u32);
    loop {
        let frame = match tokio::time::timeout(SILENCE_LIMIT, read_frame(reader)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => {
                let _ = replies.send(Reply::Refuse(e.to_string())).await;
                return format!("reading from the primary: {e}");
            }
            Err(_) => return format!("the primary was silent for {SILENCE_LIMIT:?}"),
        };
        let epoch = volume.epoch();
        if frame.epoch < epoch {
            let reason = format!(
                "a frame of epoch {} arrived; this replica is at epoch {epoch} (the sender was fenced)",
                frame.epoch
            );
            let _ = replies.send(Reply::Refuse(reason.clone())).await;
            return reason;
        }
        match frame.message {
            Message::Records(records) => {
                if batches.send(records).await.is_err() {
                    return "the applier stopped".into();
                }
            }
            Message::Heartbeat => {
                if beats.0.elapsed() >= Duration::from_secs(1) {
                    beats = (Instant::now(), 0);
                }
                beats.1 += 1;
                if beats.1 > MAX_HEARTBEATS_PER_SECOND {
                    let reason =
                        format!("more than {MAX_HEARTBEATS_PER_SECOND} heartbeats in a second");
                    let _ = replies.send(Reply::Refuse(reason.clone())).await;
                    return reason;
                }
                let _ = replies.send(Reply::Ack(volume.durable_lsn())).await;
            }
            other => {
                let reason = format!("unexpected {} frame from the primary", other.name());
                let _ = replies.send(Reply::Refuse(reason.clone())).await;
                return reason;
            }
        }
    }
}

async fn apply_batches(
    volume: &Arc<Volume>,
    link: &Link,
    mut queued: mpsc::Receiver<Vec<ShippedRecord>>,
    replies: mpsc::Sender<Reply>,
) -> String {
    while let Some(mut records) = queued.recv().await {
        while let Ok(more) = queued.try_recv() {
            records.extend(more);
        }
        let v = volume.clone();
        let applied = tokio::task::spawn_blocking(move || v.apply_shipped(&records)).await;
        match applied {
            Ok(Ok(durable)) => {
                link.acked(durable);
                if replies.send(Reply::Ack(durable)).await.is_err() {
                    return "the writer stopped".into();
                }
            }
            Ok(Err(e)) => {
                let reason = e.to_string();
                let _ = replies.send(Reply::Refuse(reason.clone())).await;
                return reason;
            }
            Err(e) => return format!("applying records: {e}"),
        }
    }
    "the reader stopped".into()
}

async fn write_replies<W: AsyncWrite + Unpin>(
    volume: &Volume,
    writer: &mut W,
    encoder: &mut Encoder,
    mut answers: mpsc::Receiver<Reply>,
) -> String {
    while let Some(reply) = answers.recv().await {
        let (message, refused) = match reply {
            Reply::Ack(durable_lsn) => (Message::Ack { durable_lsn }, None),
            Reply::Refuse(reason) => (Message::Refuse(reason.clone()), Some(reason)),
        };
        if let Err(e) = write_frame(writer, &encoder.encode(volume.epoch(), &message)).await {
            return format!("writing to the primary: {e}");
        }
        if let Some(reason) = refused {
            return reason;
        }
    }
    "the session ended".into()
}
