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
//!
//! The listener runs whatever this node's role: on a primary it answers a
//! peer that connects as a primary of an older epoch with `fenced` (its
//! own history, from which the peer rejoins), and if the peer is the newer
//! primary this node rejoins it and takes its stream. A failover on this
//! replica asks the connected primary for a seal on the session.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewind_journal::{Role, Seal, ShippedRecord, Volume};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::frame::{
    read_frame, write_frame, Encoder, Fenced, ForwardOp, Hello, Message, ResyncBegin, ResyncPoint,
    Welcome,
};
use super::history::{self, relate, Relation};
use super::tls::TlsContext;
use super::{
    check_resume_offset, tune_socket, Link, LinkState, ResyncProgress, RESYNC_CHUNK, SILENCE_LIMIT,
};
use crate::control::ACCEPT_RETRY;

/// The journal work of this replica, one session's at a time.
static JOURNAL_WORK: Mutex<()> = Mutex::new(());

/// A primary sends one heartbeat a second; many more is a broken or
/// hostile peer.
const MAX_HEARTBEATS_PER_SECOND: u32 = 20;
/// Batches read ahead of the one being applied.
const QUEUED_BATCHES: usize = 8;
/// How long what was queued may take to apply once the primary hung up.
const APPLY_AFTER_END: Duration = Duration::from_secs(10);
/// The longest a handover may wait for its destination to start.
const HANDOVER_LIMIT: Duration = Duration::from_secs(600);

/// Accepts primaries until the runtime stops.
pub async fn run(volume: Arc<Volume>, link: Arc<Link>, tls: TlsContext, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("replication listener: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let (volume, link, tls) = (volume.clone(), link.clone(), tls.clone());
        let (me_tx, me_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let me = me_rx.await.ok();
            let ended = session(&volume, &link, &tls, tcp, peer, me).await;
            if ended.established {
                tracing::warn!(
                    event = rewind_journal::events::REPLICATION_LINK_DOWN,
                    volume = %volume.config().uuid,
                    %peer,
                    "replication session ended: {}",
                    ended.error
                );
                link.failed(LinkState::Disconnected, format!("{peer}: {}", ended.error));
                let sealed = volume
                    .sealed()
                    .is_some_and(|s| s.epoch == volume.epoch() && volume.last_lsn() >= s.lsn);
                link.set_outdated((!sealed && volume.role() == Role::Replica).then(|| {
                    format!(
                        "unknown: the primary went away without a seal; this replica holds lsn {} \
                         (durable {})",
                        volume.last_lsn(),
                        volume.durable_lsn()
                    )
                }));
            } else {
                // A peer turned away does not disturb the session that runs.
                tracing::warn!(
                    event = rewind_journal::events::REPLICATION_REFUSED,
                    volume = %volume.config().uuid,
                    %peer,
                    "replication connection refused: {}",
                    ended.error
                );
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
) -> Ended {
    match handshake(volume, link, tls, tcp).await {
        Err(error) => Ended {
            established: false,
            error,
        },
        Ok((mut reader, mut writer, mut encoder, opened)) => {
            // This session supersedes any older one (a primary that
            // reconnected before its old connection timed out).
            if let Some(old) = std::mem::replace(
                &mut *link.receiving.lock().unwrap_or_else(|e| e.into_inner()),
                me,
            ) {
                old.abort();
            }
            link.set_peer(Some(peer.to_string()));
            let detached_at = match opened {
                Opened::Primary { hello, welcome } => {
                    tracing::info!(
                        %peer,
                        primary_lsn = hello.durable_lsn,
                        replica_lsn = welcome.last_lsn,
                        "replication session up"
                    );
                    link.set_outdated(None);
                    link.acked(welcome.durable_lsn);
                    link.set_state(LinkState::Streaming);
                    None
                }
                Opened::Resumed { epoch } => {
                    tracing::warn!(%peer, "the detached primary is back: serving its requests again");
                    Some(epoch)
                }
            };
            let (batches, queued) = mpsc::channel(QUEUED_BATCHES);
            let (replies, answers) = mpsc::channel(QUEUED_BATCHES + 2);
            let reading = read_frames(volume, &mut reader, batches, replies.clone(), detached_at);
            let mut applying = std::pin::pin!(apply_ops(volume, link, queued, replies));
            let error = {
                let mut writing = std::pin::pin!(write_replies(
                    volume,
                    link,
                    &mut writer,
                    &mut encoder,
                    answers
                ));
                let (error, written) = tokio::select! {
                    e = reading => {
                        // What arrived before the end is applied (a seal
                        // comes last, right before the primary hangs up).
                        let _ = tokio::time::timeout(APPLY_AFTER_END, &mut applying).await;
                        (e, false)
                    }
                    e = &mut applying => (e, false),
                    e = &mut writing => (e, true),
                };
                // The reader and the applier are gone (and their senders
                // with them): let the writer send what they queued, above
                // all a refusal that says why this session ends.
                if !written {
                    let _ = tokio::time::timeout(Duration::from_secs(1), writing).await;
                }
                error
            };
            let _ = writer.shutdown().await;
            Ended {
                established: true,
                error,
            }
        }
    }
}

type Reader = tokio::io::ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>;
type Writer = tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>;

/// What a session is, once its first frame was answered.
enum Opened {
    /// A primary's stream.
    Primary { hello: Hello, welcome: Welcome },
    /// A detached primary whose requests this node serves, back on a new
    /// connection; its frames carry `epoch`.
    Resumed { epoch: u64 },
}

/// TLS, then the hello (or a detached primary's resume) and its answer.
async fn handshake(
    volume: &Arc<Volume>,
    link: &Link,
    tls: &TlsContext,
    tcp: TcpStream,
) -> Result<(Reader, Writer, Encoder, Opened), String> {
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
            Message::ResumeForwarding {
                volume: uuid,
                peer_epoch,
            } => {
                if uuid != volume.config().uuid
                    || !link.serving_detached()
                    || peer_epoch != volume.epoch()
                {
                    let reason = format!(
                        "cannot resume forwarding: this node serves no detached primary of \
                         volume {uuid} at epoch {peer_epoch}"
                    );
                    let refuse = encoder.encode(volume.epoch(), &Message::Refuse(reason.clone()));
                    let _ = write_frame(&mut writer, &refuse).await;
                    let _ = writer.shutdown().await;
                    return Err(format!("refused: {reason}"));
                }
                // After any journal work of the lost session: what it
                // took is applied before what this one resends.
                blocking(volume, |_| Ok(())).await?;
                let answer = Message::Detached {
                    epoch: peer_epoch,
                    lsn: 0,
                };
                write_frame(&mut writer, &encoder.encode(peer_epoch, &answer))
                    .await
                    .map_err(|e| format!("answering the resume: {e}"))?;
                return Ok((
                    reader,
                    writer,
                    encoder,
                    Opened::Resumed { epoch: frame.epoch },
                ));
            }
            Message::Hello(hello) => match peer_history(&hello) {
                Err(reason) => Err(Refusal::Refuse(reason)),
                Ok(()) => match answer_primary(volume, link, &hello).await {
                    Ok(()) => check_hello(volume, &hello)
                        .map(|()| hello)
                        .map_err(Refusal::Refuse),
                    Err(refusal) => Err(refusal),
                },
            },
            other => Err(Refusal::Refuse(format!(
                "expected a hello, got {}",
                other.name()
            ))),
        },
        Ok(Err(e)) => Err(Refusal::Refuse(format!("reading the hello: {e}"))),
        Err(_) => Err(Refusal::Refuse("no hello".into())),
    };
    let hello = match hello {
        Ok(hello) => hello,
        Err(refusal) => {
            // Told why, the primary can say so instead of "connection closed".
            let (message, reason) = match refusal {
                Refusal::Refuse(reason) => (Message::Refuse(reason.clone()), reason),
                Refusal::Fenced(fenced) => {
                    let reason = fenced.reason.clone();
                    (Message::Fenced(fenced), reason)
                }
            };
            let _ = write_frame(&mut writer, &encoder.encode(volume.epoch(), &message)).await;
            let _ = writer.shutdown().await;
            return Err(format!("refused: {reason}"));
        }
    };
    // After any journal work of an older session: it may still be
    // applying what that session received.
    let welcome = blocking(volume, |v| {
        Ok(Welcome {
            epoch: v.epoch(),
            last_lsn: v.last_lsn(),
            durable_lsn: v.durable_lsn(),
            resync: v.resync_state().map(|r| ResyncPoint {
                sync_lsn: r.sync_lsn,
                next_offset: r.next_offset,
            }),
        })
    })
    .await?;
    let answer = encoder.encode(welcome.epoch, &Message::Welcome(welcome.clone()));
    write_frame(&mut writer, &answer)
        .await
        .map_err(|e| format!("sending the welcome: {e}"))?;
    Ok((reader, writer, encoder, Opened::Primary { hello, welcome }))
}

/// Checks the hello's epoch history before it is related to this node's
/// (a malformed one could pass for a newer primary's and make this node
/// cut its records).
fn peer_history(hello: &Hello) -> Result<(), String> {
    history::check(&hello.epoch_history)
        .map_err(|e| format!("the primary's hello is malformed: {e}"))?;
    match hello.epoch_history.last() {
        Some(last) if last.epoch == hello.epoch => Ok(()),
        last => Err(format!(
            "the primary's hello is malformed: it is at epoch {} but its epoch history ends \
             with {last:?}",
            hello.epoch
        )),
    }
}

/// Why a hello is turned away.
#[derive(Debug)]
enum Refusal {
    Refuse(String),
    /// This node is the primary: the peer learns its history.
    Fenced(Fenced),
}

/// When this node is the primary, a peer that says hello as a primary
/// is either newer (this node was failed over: it rejoins the peer, and
/// the session goes on with this node as its replica) or not (it is told
/// this node's history: it rejoins, or both see a split brain).
async fn answer_primary(volume: &Arc<Volume>, link: &Link, hello: &Hello) -> Result<(), Refusal> {
    if hello.volume != volume.config().uuid {
        return Ok(());
    }
    if link.detached() {
        // Rejoining would take the guest this node still serves (through
        // the peer) from under it.
        return Err(Refusal::Refuse(
            "this primary detached from its failed storage and forwards its guest's requests; \
             it rejoins once the guest has moved (handover) or stopped"
                .into(),
        ));
    }
    let mine = volume.epoch_history();
    link.set_peer_history(hello.epoch_history.clone());
    let relation = relate(&mine, &hello.epoch_history);
    if volume.role() == Role::Replica {
        // A replica that holds records the newer primary never had (an
        // old primary's stream it took) cuts them too; otherwise
        // check_hello decides.
        match relation {
            Relation::Behind { common } if volume.last_lsn() > common => {}
            _ => return Ok(()),
        }
    }
    let fenced = |reason: String| {
        Refusal::Fenced(Fenced {
            epoch: volume.epoch(),
            epoch_history: mine.clone(),
            reason,
        })
    };
    match relation {
        Relation::Behind { common } => {
            let Some(roles) = link.roles() else {
                return Err(Refusal::Refuse("this daemon cannot change roles".into()));
            };
            let newer = hello.epoch_history.clone();
            match tokio::task::spawn_blocking(move || roles.rejoin(&newer)).await {
                Ok(Ok(())) => {
                    tracing::warn!(
                        event = rewind_journal::events::REJOINED,
                        volume = %volume.config().uuid,
                        common,
                        epoch = hello.epoch,
                        "a newer primary connected: this node rejoined it as a replica"
                    );
                    Ok(())
                }
                Ok(Err(e)) => Err(Refusal::Refuse(format!("cannot rejoin: {e}"))),
                Err(e) => Err(Refusal::Refuse(format!("cannot rejoin: {e}"))),
            }
        }
        Relation::Ahead { common } => Err(fenced(format!(
            "this node is the primary at epoch {}; the peer's epoch {} ended at lsn {common}",
            volume.epoch(),
            hello.epoch
        ))),
        Relation::Same => {
            let reason = format!(
                "split brain: both nodes are primaries of epoch {}; run `rewindctl resolve \
                 --discard-this-side` on the one whose writes to give up",
                volume.epoch()
            );
            link.failed(LinkState::SplitBrain, reason.clone());
            Err(fenced(reason))
        }
        Relation::Diverged { common } => {
            let reason = format!(
                "split brain: the histories diverged after lsn {common} (this node {:?}, the \
                 peer {:?}); run `rewindctl resolve --discard-this-side` on the one whose \
                 writes to give up",
                mine, hello.epoch_history
            );
            link.failed(LinkState::SplitBrain, reason.clone());
            Err(fenced(reason))
        }
        // Neither rejoins: no common point is known to cut at.
        Relation::Unrelated => Err(Refusal::Refuse(history::unrelated(
            &mine,
            &hello.epoch_history,
        ))),
    }
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
    if let Some(state) = volume.resync_state() {
        // Its journal is being replaced: only the epoch matters, and
        // where the welcome offers to resume (the resync file's
        // progress): a damaged file must not steer the primary's resync.
        return check_resume_offset(state.next_offset, volume.size()).map_err(|e| {
            format!(
                "this replica's resync file is damaged: it resumes the resync to lsn {} at {e} \
                 (recreate this replica with `rewind-blk create --replica-of`)",
                state.sync_lsn
            )
        });
    }
    let history = volume.epoch_history();
    match relate(&history, &hello.epoch_history) {
        Relation::Ahead { common } | Relation::Diverged { common } => {
            return Err(format!(
                "split brain: the histories diverged after lsn {common} (primary {:?}, replica \
                 {:?}); run `rewindctl resolve --discard-this-side` on the one whose writes to \
                 give up",
                hello.epoch_history, history
            ));
        }
        // A replica that holds no record (a new one, `create
        // --replica-of`) loses nothing to the full resync the primary
        // gives it (its welcome's `last_lsn` 0), which replaces its
        // history with the primary's: the only way a new copy of a volume
        // whose history forgot its first epochs can start.
        Relation::Unrelated if volume.last_lsn() == 0 => {}
        // Taking the stream would assume this replica's records are the
        // primary's up to its last lsn: unknown. A resync would be right
        // for a replica that is merely behind, but would throw away,
        // without a branch, an old primary's tail it may hold.
        Relation::Unrelated => {
            return Err(history::unrelated(&history, &hello.epoch_history));
        }
        Relation::Same | Relation::Behind { .. } => {}
    }
    let last = volume.last_lsn();
    if last > hello.durable_lsn {
        return Err(format!(
            "this replica holds lsn {last}, past the primary's durable lsn {}: the two diverged",
            hello.durable_lsn
        ));
    }
    Ok(())
}

/// What the writer sends back.
#[derive(Debug)]
enum Reply {
    Ack(u64),
    Refuse(String),
    /// Diff resync: keyed hashes of this replica's chunks from `offset`.
    Hashes {
        offset: u64,
        hashes: Vec<[u8; 32]>,
    },
    /// The next records cannot be taken without a resync; the session ends.
    ResyncNeeded(String),
    /// A failover here: the primary is asked to seal.
    SealRequest,
    /// Whether this node took over in the handover its primary offered.
    Verdict(bool),
    /// Took over for a detached primary.
    Detached {
        epoch: u64,
        lsn: u64,
    },
    /// A forwarded request's outcome.
    Forwarded {
        id: u64,
        result: Result<Vec<u8>, String>,
    },
}

/// What the applier does, in the order the frames came.
#[derive(Debug)]
enum Op {
    Records(Vec<ShippedRecord>),
    Begin(ResyncBegin),
    Chunk {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    Keep {
        offset: u64,
        length: u64,
    },
    End,
    /// The primary sealed its epoch at this lsn and demoted itself.
    Sealed(Seal),
    /// The same, for this node to take over once its client starts.
    HandOver {
        seal: Seal,
        timeout: Duration,
    },
    /// The primary called the handover off.
    HandoverCancel,
    /// The primary's storage failed: take over, and serve its requests.
    Detach(String),
    /// A detached primary's request.
    Forward {
        id: u64,
        op: ForwardOp,
    },
}

async fn read_frames<R: AsyncRead + Unpin>(
    volume: &Volume,
    reader: &mut R,
    ops: mpsc::Sender<Op>,
    replies: mpsc::Sender<Reply>,
    // Set once the primary detached: the epoch it detached at, whose
    // frames this session still takes after this node took over.
    mut detached_at: Option<u64>,
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
        if volume.role() == Role::Primary && detached_at.is_none() {
            let reason = "this node was promoted: it takes no more records".to_string();
            let _ = replies.send(Reply::Refuse(reason.clone())).await;
            return reason;
        }
        let epoch = volume.epoch();
        if frame.epoch < epoch && detached_at != Some(frame.epoch) {
            let reason = format!(
                "a frame of epoch {} arrived; this replica is at epoch {epoch} (the sender was fenced)",
                frame.epoch
            );
            let _ = replies.send(Reply::Refuse(reason.clone())).await;
            return reason;
        }
        // Once this node took over for a detached primary, only its
        // requests and its handover may follow: anything else would write
        // over the history of the primary this node is now.
        if detached_at.is_some()
            && !matches!(
                frame.message,
                Message::Forward { .. }
                    | Message::Heartbeat
                    | Message::HandOver { .. }
                    | Message::HandoverCancel
            )
        {
            let reason = format!(
                "a {} frame arrived from the detached primary; it may send only forwarded \
                 requests, heartbeats and a handover",
                frame.message.name()
            );
            let _ = replies.send(Reply::Refuse(reason.clone())).await;
            return reason;
        }
        let op = match frame.message {
            Message::Records(records) => Op::Records(records),
            Message::Sealed(seal) => Op::Sealed(seal),
            Message::HandOver { seal, timeout_ms } => Op::HandOver {
                seal,
                timeout: Duration::from_millis(timeout_ms).min(HANDOVER_LIMIT),
            },
            Message::HandoverCancel => Op::HandoverCancel,
            Message::Detach(reason) if detached_at.is_none() => {
                detached_at = Some(frame.epoch);
                Op::Detach(reason)
            }
            Message::Forward { id, op } if detached_at.is_some() => Op::Forward { id, op },
            Message::ResyncBegin(begin) => Op::Begin(begin),
            Message::Chunk { offset, data } => Op::Chunk { offset, data },
            Message::Zero { offset, length } => Op::Zero { offset, length },
            Message::Keep { offset, length } => Op::Keep { offset, length },
            Message::ResyncEnd => Op::End,
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
                continue;
            }
            other => {
                let reason = format!("unexpected {} frame from the primary", other.name());
                let _ = replies.send(Reply::Refuse(reason.clone())).await;
                return reason;
            }
        };
        if ops.send(op).await.is_err() {
            return "the applier stopped".into();
        }
    }
}

/// Runs `work` on the blocking pool, one at a time: the journal work of a
/// session that was superseded (a blocking task cannot be aborted) ends
/// before the next session's begins.
async fn blocking<T: Send + 'static>(
    volume: &Arc<Volume>,
    work: impl FnOnce(&Volume) -> rewind_journal::Result<T> + Send + 'static,
) -> Result<T, String> {
    let v = volume.clone();
    let serialized = move || {
        let _one = JOURNAL_WORK.lock().unwrap_or_else(|e| e.into_inner());
        work(&v)
    };
    match tokio::task::spawn_blocking(serialized).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the journal task failed: {e}")),
    }
}

/// A resync being received: where the next chunk must start.
#[derive(Debug)]
struct Receiving {
    progress: ResyncProgress,
    /// Bytes written since base.img was last synced.
    unsynced: u64,
}

/// base.img is synced (and the resync's progress made durable) after this
/// many bytes, so an interrupted resync loses at most this much.
const CHECKPOINT_BYTES: u64 = 16 << 20;

async fn apply_ops(
    volume: &Arc<Volume>,
    link: &Link,
    mut queued: mpsc::Receiver<Op>,
    replies: mpsc::Sender<Reply>,
) -> String {
    let mut resync: Option<Receiving> = None;
    let mut hasher = Hasher(None);
    let mut next_op = None;
    loop {
        let op = match next_op.take() {
            Some(op) => op,
            None => match queued.recv().await {
                Some(op) => op,
                None => return "the reader stopped".into(),
            },
        };
        let reply = match op {
            Op::Records(mut records) => {
                // Batches that queued up meanwhile share one sync.
                while let Ok(more) = queued.try_recv() {
                    match more {
                        Op::Records(more) => records.extend(more),
                        other => {
                            next_op = Some(other);
                            break;
                        }
                    }
                }
                let applied = blocking(volume, move |v| match v.apply_shipped(&records) {
                    Err(rewind_journal::Error::NeedsResync { lsn, reason }) => {
                        Ok(Err(format!("record {lsn}: {reason}")))
                    }
                    other => other.map(Ok),
                })
                .await;
                match applied {
                    Ok(Err(why)) => {
                        let _ = replies.send(Reply::ResyncNeeded(why.clone())).await;
                        return format!("needs a resync: {why}");
                    }
                    other => other.and_then(|applied| applied).map(Some),
                }
            }
            Op::Begin(begin) => start_resync(volume, begin, &mut hasher, &replies)
                .await
                .map(|progress| {
                    link.set_state(LinkState::Syncing);
                    link.set_resync(Some(progress));
                    resync = Some(Receiving {
                        progress,
                        unsynced: 0,
                    });
                    None
                }),
            Op::Chunk { offset, data } => {
                let length = data.len() as u64;
                let written = match expect_at(&resync, offset, length) {
                    Ok(()) => blocking(volume, move |v| v.resync_write(offset, &data)).await,
                    Err(e) => Err(e),
                };
                match written.map(|()| advance(&mut resync, link, length, length)) {
                    Ok(due) => checkpoint(volume, &mut resync, due).await,
                    Err(e) => Err(e),
                }
            }
            Op::Zero { offset, length } => {
                let zeroed = match expect_at(&resync, offset, length) {
                    Ok(()) => blocking(volume, move |v| v.resync_zero(offset, length)).await,
                    Err(e) => Err(e),
                };
                match zeroed.map(|()| advance(&mut resync, link, length, 0)) {
                    Ok(due) => checkpoint(volume, &mut resync, due).await,
                    Err(e) => Err(e),
                }
            }
            Op::Keep { offset, length } => {
                let kept = match expect_at(&resync, offset, length) {
                    Ok(()) => blocking(volume, move |v| v.resync_keep(offset, length)).await,
                    Err(e) => Err(e),
                };
                match kept.map(|()| advance(&mut resync, link, length, 0)) {
                    Ok(due) => checkpoint(volume, &mut resync, due).await,
                    Err(e) => Err(e),
                }
            }
            Op::Sealed(seal) => note_seal(volume, link, seal).await.map(|()| None),
            Op::HandOver { seal, timeout } => {
                // A detached primary seals nothing: this node took over
                // already.
                let noted = match link.serving_detached() {
                    true => Ok(()),
                    false => note_seal(volume, link, seal).await,
                };
                match (noted, link.roles()) {
                    (Ok(()), Some(roles)) => {
                        tracing::info!(?timeout, "handover: taking over once a client starts here");
                        // Waits aside: a cancel comes through this loop.
                        let replies = replies.clone();
                        tokio::spawn(async move {
                            let taking = move || roles.take_over(seal, timeout);
                            let promoted = tokio::task::spawn_blocking(taking).await;
                            let _ = replies
                                .send(Reply::Verdict(matches!(promoted, Ok(true))))
                                .await;
                        });
                        Ok(None)
                    }
                    (Ok(()), None) => {
                        Err("the primary offered a handover; this daemon cannot take over".into())
                    }
                    (Err(e), _) => Err(e),
                }
            }
            Op::HandoverCancel => {
                if let Some(roles) = link.roles() {
                    roles.cancel_take_over();
                }
                Ok(None)
            }
            Op::Detach(reason) => {
                let Some(roles) = link.roles() else {
                    let why = "the primary detached; this daemon cannot take over".to_string();
                    let _ = replies.send(Reply::Refuse(why.clone())).await;
                    return why;
                };
                tracing::error!(
                    event = rewind_journal::events::PEER_DETACHED,
                    volume = %volume.config().uuid,
                    "the primary's storage failed ({reason}): taking over to serve its guest"
                );
                let taking = {
                    let reason = reason.clone();
                    move || roles.take_over_detached(&reason)
                };
                match tokio::task::spawn_blocking(taking).await {
                    Ok(Ok((epoch, lsn))) => {
                        let peer = lock_peer(link);
                        link.forwarding.serve(peer, reason);
                        if replies.send(Reply::Detached { epoch, lsn }).await.is_err() {
                            return "the writer stopped".into();
                        }
                        Ok(None)
                    }
                    Ok(Err(e)) => Err(format!("cannot take over for the detached primary: {e}")),
                    Err(e) => Err(format!("cannot take over for the detached primary: {e}")),
                }
            }
            Op::Forward { id, .. } if !link.serving_detached() => Err(format!(
                "forwarded request {id} refused: this node serves no detached primary (its guest \
                 moved here)"
            )),
            Op::Forward { id, op } => {
                let result = blocking(volume, move |v| serve_forwarded(v, op)).await;
                link.forwarding.served();
                if replies.send(Reply::Forwarded { id, result }).await.is_err() {
                    return "the writer stopped".into();
                }
                Ok(None)
            }
            Op::End => match resync.take() {
                Some(r) if r.progress.done_bytes == r.progress.total_bytes => {
                    let sync_lsn = r.progress.sync_lsn;
                    let finished = blocking(volume, move |v| v.finish_resync(sync_lsn)).await;
                    link.set_resync(None);
                    link.set_state(LinkState::Streaming);
                    finished.map(|()| Some(sync_lsn))
                }
                Some(r) => Err(format!(
                    "the resync ended at offset {} of {}",
                    r.progress.done_bytes, r.progress.total_bytes
                )),
                None => Err("a resync ended that never began".into()),
            },
        };
        match reply {
            Ok(Some(durable)) => {
                link.acked(durable);
                if replies.send(Reply::Ack(durable)).await.is_err() {
                    return "the writer stopped".into();
                }
            }
            Ok(None) => {}
            Err(reason) => {
                let _ = replies.send(Reply::Refuse(reason.clone())).await;
                return reason;
            }
        }
    }
}

/// Runs a detached primary's request against this node's volume.
fn serve_forwarded(volume: &Volume, op: ForwardOp) -> rewind_journal::Result<Vec<u8>> {
    match op {
        ForwardOp::Read { offset, length } => {
            let mut data = vec![0u8; length as usize];
            volume.read(offset, &mut data).map(|()| data)
        }
        ForwardOp::Write { offset, data } => volume.write(offset, &data).map(|_| Vec::new()),
        ForwardOp::WriteZeroes {
            offset,
            length,
            unmap,
        } => volume
            .write_zeroes(offset, length, unmap)
            .map(|_| Vec::new()),
        ForwardOp::Discard { offset, length } => volume.discard(offset, length).map(|_| Vec::new()),
        ForwardOp::Flush => volume.flush().map(|()| Vec::new()),
    }
}

fn lock_peer(link: &Link) -> String {
    link.shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .peer
        .clone()
        .unwrap_or_else(|| "unknown".into())
}

/// Records the primary's seal, after every record before it was applied.
async fn note_seal(volume: &Arc<Volume>, link: &Link, seal: Seal) -> Result<(), String> {
    let noted = blocking(volume, move |v| {
        let holds = seal.epoch == v.epoch() && v.durable_lsn() >= seal.lsn;
        if holds {
            v.note_sealed(seal)?;
        }
        Ok(holds)
    })
    .await;
    match noted {
        Ok(true) => {
            tracing::info!(lsn = seal.lsn, epoch = seal.epoch, "the primary sealed");
            link.set_outdated(None);
            link.peer_sealed();
            Ok(())
        }
        Ok(false) => Err(format!(
            "the primary sealed epoch {} at lsn {}, but this replica is at epoch {} and holds \
             lsn {}",
            seal.epoch,
            seal.lsn,
            volume.epoch(),
            volume.durable_lsn()
        )),
        Err(e) => Err(e),
    }
}

/// The task hashing this replica's chunks for a diff resync; ended with
/// the session.
#[derive(Debug)]
struct Hasher(Option<tokio::task::AbortHandle>);

impl Drop for Hasher {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Hashes per frame: few, so the first reach the primary soon and the
/// session never goes quiet while the disk is read.
const HASHES_PER_FRAME: usize = 16;

/// Sends the keyed hashes of this replica's disk as it was before the
/// resync, chunk by chunk from `from`, ahead of the primary's chunks.
async fn hash_old_disk(
    volume: Arc<Volume>,
    key: [u8; 32],
    from: u64,
    replies: mpsc::Sender<Reply>,
) {
    let size = volume.size();
    let mut offset = from;
    while offset < size {
        let start = offset;
        let v = volume.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            let _one = JOURNAL_WORK.lock().unwrap_or_else(|e| e.into_inner());
            let mut hashes = Vec::with_capacity(HASHES_PER_FRAME);
            let mut buf = vec![0u8; RESYNC_CHUNK as usize];
            let mut at = start;
            while at < size && hashes.len() < HASHES_PER_FRAME {
                let len = RESYNC_CHUNK.min(size - at);
                let chunk = &mut buf[..len as usize];
                v.resync_read_old(at, chunk)?;
                hashes.push(*blake3::keyed_hash(&key, chunk).as_bytes());
                at += len;
            }
            Ok::<_, rewind_journal::Error>((hashes, at))
        })
        .await;
        let reply = match hashed {
            Ok(Ok((hashes, next))) => {
                offset = next;
                Reply::Hashes {
                    offset: start,
                    hashes,
                }
            }
            Ok(Err(e)) => Reply::Refuse(format!("hashing this replica's disk: {e}")),
            Err(e) => Reply::Refuse(format!("hashing this replica's disk: {e}")),
        };
        let refused = matches!(reply, Reply::Refuse(_));
        if replies.send(reply).await.is_err() || refused {
            return;
        }
    }
}

/// Checks what a resync-begin would have this replica keep (the sync
/// point becomes its journal's base), before any of it is kept.
fn check_resync_begin(begin: &ResyncBegin) -> Result<(), String> {
    if begin.sync_lsn == u64::MAX {
        return Err(format!(
            "a resync to lsn {}: no lsn could follow it",
            begin.sync_lsn
        ));
    }
    history::check(&begin.epoch_history)
        .map_err(|e| format!("a resync to lsn {}: {e}", begin.sync_lsn))?;
    if let Some(last) = begin
        .epoch_history
        .last()
        .filter(|last| last.first_lsn > begin.sync_lsn.max(1))
    {
        return Err(format!(
            "a resync to lsn {} whose epoch history has epoch {} begin later, at lsn {}",
            begin.sync_lsn, last.epoch, last.first_lsn
        ));
    }
    Ok(())
}

/// Checks a resync-begin against this replica and starts (or resumes) it;
/// a diff resync also starts hashing this replica's chunks.
async fn start_resync(
    volume: &Arc<Volume>,
    begin: ResyncBegin,
    hasher: &mut Hasher,
    replies: &mpsc::Sender<Reply>,
) -> Result<ResyncProgress, String> {
    check_resync_begin(&begin)?;
    let key = begin
        .diff_key
        .as_deref()
        .map(crate::control::parse_key)
        .transpose()?;
    let epoch = begin.epoch_history.last().map_or(1, |e| e.epoch);
    if epoch < volume.epoch() {
        return Err(format!(
            "a resync to epoch {epoch}, older than this replica's {}",
            volume.epoch()
        ));
    }
    let size = volume.size();
    let progress = ResyncProgress {
        sync_lsn: begin.sync_lsn,
        done_bytes: begin.from_offset,
        total_bytes: size,
        data_bytes: 0,
    };
    let from = begin.from_offset;
    if from == 0 {
        let (lsn, ns, history) = (begin.sync_lsn, begin.sync_ns, begin.epoch_history);
        blocking(volume, move |v| v.begin_resync(lsn, ns, history)).await?;
    } else {
        match volume.resync_state() {
            Some(state) if state.sync_lsn == begin.sync_lsn && state.next_offset == from => {
                tracing::info!(sync_lsn = state.sync_lsn, from, "resuming a resync");
            }
            state => {
                return Err(format!(
                    "a resync to lsn {} resumed at offset {from}, but this replica holds {:?}",
                    begin.sync_lsn, state
                ))
            }
        }
    }
    if let Some(key) = key {
        let task = tokio::spawn(hash_old_disk(volume.clone(), key, from, replies.clone()));
        if let Some(old) = hasher.0.replace(task.abort_handle()) {
            old.abort();
        }
    }
    Ok(progress)
}

/// Chunks come in order, back to back, inside a resync.
fn expect_at(resync: &Option<Receiving>, offset: u64, length: u64) -> Result<(), String> {
    match resync {
        None => Err("resync data arrived outside a resync".into()),
        Some(r) if r.progress.done_bytes != offset => Err(format!(
            "resync data for offset {offset} arrived where {} was due",
            r.progress.done_bytes
        )),
        Some(r)
            if offset
                .checked_add(length)
                .is_none_or(|end| end > r.progress.total_bytes) =>
        {
            Err(format!(
                "resync data at {offset}+{length} ends past the disk"
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Counts `length` bytes done (`data` of them sent as data); returns
/// whether a checkpoint is due.
fn advance(resync: &mut Option<Receiving>, link: &Link, length: u64, data: u64) -> bool {
    let Some(r) = resync.as_mut() else {
        return false;
    };
    r.progress.done_bytes += length;
    r.progress.data_bytes += data;
    r.unsynced += length.max(data);
    link.set_resync(Some(r.progress));
    r.unsynced >= CHECKPOINT_BYTES
}

/// Makes the resync's progress durable when `due`; then returns the lsn
/// to ack (an ack tells the primary the replica is alive).
async fn checkpoint(
    volume: &Arc<Volume>,
    resync: &mut Option<Receiving>,
    due: bool,
) -> Result<Option<u64>, String> {
    let Some(r) = resync.as_mut().filter(|_| due) else {
        return Ok(None);
    };
    let (sync_lsn, done) = (r.progress.sync_lsn, r.progress.done_bytes);
    blocking(volume, move |v| v.resync_checkpoint(sync_lsn, done)).await?;
    r.unsynced = 0;
    Ok(Some(volume.durable_lsn()))
}

async fn write_replies<W: AsyncWrite + Unpin>(
    volume: &Volume,
    link: &Link,
    writer: &mut W,
    encoder: &mut Encoder,
    mut answers: mpsc::Receiver<Reply>,
) -> String {
    loop {
        let reply = tokio::select! {
            reply = answers.recv() => match reply {
                Some(reply) => reply,
                None => return "the session ended".into(),
            },
            () = link.seal_request.notified() => {
                if !link.seal_wanted() {
                    continue;
                }
                Reply::SealRequest
            }
        };
        let (message, refused) = match reply {
            Reply::SealRequest => (Message::SealRequest, None),
            Reply::Verdict(promoted) => (Message::HandoverVerdict { promoted }, None),
            Reply::Detached { epoch, lsn } => (Message::Detached { epoch, lsn }, None),
            Reply::Forwarded { id, result } => (Message::Forwarded { id, result }, None),
            Reply::Ack(durable_lsn) => (Message::Ack { durable_lsn }, None),
            Reply::Refuse(reason) => (Message::Refuse(reason.clone()), Some(reason)),
            Reply::ResyncNeeded(reason) => (Message::ResyncNeeded(reason.clone()), Some(reason)),
            Reply::Hashes { offset, hashes } => (
                Message::Hashes {
                    offset,
                    chunk_bytes: RESYNC_CHUNK as u32,
                    hashes,
                },
                None,
            ),
        };
        if let Err(e) = write_frame(writer, &encoder.encode(volume.epoch(), &message)).await {
            return format!("writing to the primary: {e}");
        }
        if let Some(reason) = refused {
            return reason;
        }
    }
}
