//! The primary's side of a replication link.
//!
//! A session: connect (TCP, then mutual TLS), say hello, learn from the
//! replica's welcome where it stands, then ship. Records are read from the
//! segment files ([`Volume::read_shipped`]) in batches of about 1 MiB,
//! only once durable here; a flush wakes the sender at once, and in async
//! mode it makes records durable itself after [`SHIP_DELAY`] so that a
//! guest that never flushes is replicated too. Acks come back on the same
//! connection and move the link's acked lsn and the journal's fold hold.
//! Any error ends the session; the next one starts after a backoff.
//!
//! A replica that the journal alone cannot bring up to date (a new one, or
//! one behind what the journal still holds) is resynced first: the disk as
//! of a sync point S, read through a view (which keeps S from being
//! folded), goes over in 1 MiB chunks, all-zero runs as one zero range
//! each, resumed where the replica's base.img durably got if S can still
//! be read; then records stream from S + 1.
//!
//! Roles: the sender runs while the volume is the primary. A replica that
//! asks for a seal (a failover) gets one: the daemon closes the gate,
//! ships the tail, demotes, and the sender answers `sealed` and ends. A
//! peer that answers `fenced` is a newer primary: this node rejoins it as
//! a replica (or, if both were promoted, reports a split brain).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rewind_journal::{
    EpochStart, Error as JournalError, PointInTime, Role, Seal, ShipBatch, View, Volume,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::frame::{
    read_frame, write_frame, Encoder, Fenced, Frame, Hello, Message, ResyncBegin, Welcome,
};
use super::history;
use super::tls::TlsContext;
use super::{
    check_resume_offset, tune_socket, LastResync, Link, LinkState, ResyncProgress, SenderConfig,
    HEARTBEAT, RESYNC_CHUNK, SILENCE_LIMIT,
};

/// Payload bytes per batch.
const BATCH_BYTES: usize = 1 << 20;
/// Replica hashes read ahead of the chunk being compared.
const HASHES_QUEUED: usize = 1024;
/// Longest zero range sent as one frame.
const ZERO_RUN_BYTES: u64 = 256 << 20;
/// How long records written without a guest flush wait before the sender
/// flushes them itself (async mode's RPO floor).
pub const SHIP_DELAY: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a session ended.
#[derive(Debug)]
struct SessionError {
    state: LinkState,
    message: String,
}

fn down(message: impl Into<String>) -> SessionError {
    SessionError {
        state: LinkState::Disconnected,
        message: message.into(),
    }
}

/// Whether this node ships: it is the primary, or it sealed its epoch and
/// the replica has not been told yet (it was away, or this daemon
/// restarted), so that the replica can be promoted without `--force`.
fn ships(volume: &Volume, link: &Link) -> bool {
    volume.role() == Role::Primary
        || (volume.sealed().is_some_and(|s| s.epoch == volume.epoch()) && !link.seal_delivered())
}

/// Runs sessions while this node ships, until the runtime stops.
pub async fn run(volume: Arc<Volume>, link: Arc<Link>, config: SenderConfig, tls: TlsContext) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        if link.stopping() {
            link.retire_sender(|| true);
            return;
        }
        // Decided under the lock `claim_sender` takes: a promotion that
        // races with this end finds either this sender going on or none.
        let retired = link.retire_sender(|| {
            let retire = !ships(&volume, &link);
            if retire {
                // Nothing waits for this node's records any more.
                volume.hold_for_replica(None);
            }
            retire
        });
        if retired {
            tracing::info!(peer = %config.peer, "this node is a replica now: it ships no more");
            return;
        }
        link.set_state(LinkState::Connecting);
        let started = Instant::now();
        let err = session(&volume, &link, &config, &tls).await;
        if link.stopping() {
            tracing::info!(peer = %config.peer, "replication link closed: the daemon stops");
            link.failed(LinkState::Disconnected, "closed: the daemon stopped".into());
            link.retire_sender(|| true);
            return;
        }
        if err.state == LinkState::Outdated {
            tracing::error!(
                event = rewind_journal::events::REPLICATION_OUTDATED,
                volume = %volume.config().uuid,
                peer = %config.peer,
                "replication stopped: {}",
                err.message
            );
        } else {
            tracing::warn!(
                event = match err.state {
                    LinkState::SplitBrain => rewind_journal::events::REPLICATION_SPLIT_BRAIN,
                    _ => rewind_journal::events::REPLICATION_LINK_DOWN,
                },
                volume = %volume.config().uuid,
                peer = %config.peer,
                "replication link down: {}",
                err.message
            );
        }
        link.forwarding.session_lost(&err.message);
        if link.detached() {
            // A detach the peer never answered failed; one it answered
            // goes on over a new session (`resume`), while the guest's
            // requests are held.
            link.forwarding
                .answered_detach(Err(format!("the link was lost: {}", err.message)));
            if link.detached_peer_epoch().is_none() || link.forwarding.handed_over() {
                link.failed(err.state, err.message);
                link.retire_sender(|| true);
                return;
            }
            tracing::error!(
                event = rewind_journal::events::FORWARD_FAILED,
                volume = %volume.config().uuid,
                peer = %config.peer,
                "the session with the peer that serves this detached primary ended ({}): \
                 reconnecting; guest requests are held meanwhile",
                err.message
            );
        }
        link.failed(err.state, err.message);
        link.set_resync(None);
        if !ships(&volume, &link) {
            continue;
        }
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_FIRST;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection, until it fails.
async fn session(
    volume: &Arc<Volume>,
    link: &Link,
    config: &SenderConfig,
    tls: &TlsContext,
) -> SessionError {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(config.peer)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return down(format!("cannot connect to {}: {e}", config.peer)),
        Err(_) => return down(format!("connecting to {} timed out", config.peer)),
    };
    tune_socket(&tcp);
    let stream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tls.connector().connect(tls.server_name(), tcp),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return down(format!("TLS handshake with {} failed: {e}", config.peer)),
        Err(_) => return down(format!("TLS handshake with {} timed out", config.peer)),
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut encoder = match Encoder::new(config.compress) {
        Ok(encoder) => encoder,
        Err(e) => return down(format!("cannot start zstd: {e}")),
    };
    if let Some(peer_epoch) = link.detached_peer_epoch() {
        return resume(volume, link, reader, writer, encoder, peer_epoch).await;
    }
    let welcome = match handshake(volume, link, &mut reader, &mut writer, &mut encoder).await {
        Ok(welcome) => welcome,
        Err(e) => return e,
    };
    if let Some(roles) = link.roles() {
        roles.confirmed();
    }
    tracing::info!(
        peer = %config.peer,
        replica_lsn = welcome.last_lsn,
        durable_lsn = welcome.durable_lsn,
        "replication link up"
    );
    link.set_state(LinkState::Syncing);
    let mut bucket = config.rate.map(TokenBucket::new);
    let (hashes, mut feed) = mpsc::channel(HASHES_QUEUED);
    let shipping = async {
        let mut next = welcome.last_lsn + 1;
        if needs_resync(volume, link, &welcome) {
            // A replica that holds an older disk keeps what did not change.
            let diff = (welcome.last_lsn > 0 || welcome.resync.is_some()).then_some(&mut feed);
            match resync(
                volume,
                link,
                &welcome,
                &mut writer,
                &mut encoder,
                &mut bucket,
                diff,
            )
            .await
            {
                Ok(sync_lsn) => next = sync_lsn + 1,
                Err(e) => return e,
            }
        }
        ship(volume, link, &mut writer, &mut encoder, &mut bucket, next).await
    };

    let acking = take_acks(volume, link, &mut reader, hashes);
    let ended = tokio::select! {
        e = shipping => e,
        e = acking => e,
        () = link.stop.notified() => down("the daemon stops"),
    };
    // A TLS close, so the replica knows this was no cut.
    let _ = writer.shutdown().await;
    ended
}

async fn handshake<R, W>(
    volume: &Arc<Volume>,
    link: &Link,
    reader: &mut R,
    writer: &mut W,
    encoder: &mut Encoder,
) -> Result<super::frame::Welcome, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = volume.config();
    let stats = volume.stats();
    let hello = Hello {
        volume: config.uuid,
        size: config.size,
        block_size: config.block_size,
        max_payload: volume.max_record_payload(),
        epoch: volume.epoch(),
        epoch_history: volume.epoch_history(),
        durable_lsn: stats.durable_lsn,
        first_lsn: stats.base_lsn + 1,
    };
    let epoch = volume.epoch();
    write_frame(writer, &encoder.encode(epoch, &Message::Hello(hello)))
        .await
        .map_err(|e| down(format!("sending hello: {e}")))?;
    let frame = tokio::time::timeout(SILENCE_LIMIT * 3, read_frame(reader))
        .await
        .map_err(|_| down("the replica did not answer the hello"))?
        .map_err(|e| down(format!("reading the replica's welcome: {e}")))?;
    let welcome = match frame.message {
        Message::Welcome(w) => w,
        Message::Refuse(reason) => {
            return Err(SessionError {
                state: LinkState::Outdated,
                message: format!("the replica refused: {reason}"),
            })
        }
        Message::Fenced(fenced) => return Err(superseded(link, fenced).await),
        other => return Err(down(format!("expected a welcome, got {}", other.name()))),
    };
    if welcome.epoch > epoch {
        return Err(SessionError {
            state: LinkState::Outdated,
            message: format!(
                "the replica is at epoch {}, newer than this primary's {epoch}: this primary \
                 was fenced or failed over and must not ship",
                welcome.epoch
            ),
        });
    }
    if welcome.last_lsn > stats.durable_lsn {
        return Err(SessionError {
            state: LinkState::Outdated,
            message: format!(
                "the replica holds lsn {} but this primary's journal ends at lsn {}: they \
                 diverged",
                welcome.last_lsn, stats.durable_lsn
            ),
        });
    }
    if welcome.durable_lsn > welcome.last_lsn {
        // Taken, it would count as acknowledged: sync-mode flushes would
        // complete, and folds go on, before the replica holds anything.
        return Err(down(format!(
            "the replica's welcome is malformed: durable lsn {} is past its last lsn {}",
            welcome.durable_lsn, welcome.last_lsn
        )));
    }
    volume.hold_for_replica(Some(welcome.durable_lsn));
    link.reset_acked(welcome.last_lsn, welcome.durable_lsn);
    Ok(welcome)
}

/// Whether the replica needs a resync before records can follow: it has
/// one under way, it is new (the primary's base.img may hold data no
/// record carries: an imported image, folded records), or the records
/// after its last one are folded, or it asked for one (it cannot take a
/// record: a revert to before its own history).
fn needs_resync(volume: &Volume, link: &Link, welcome: &Welcome) -> bool {
    link.force_resync
        .swap(false, std::sync::atomic::Ordering::AcqRel)
        || welcome.resync.is_some()
        || welcome.last_lsn == 0
        || welcome.last_lsn < volume.stats().base_lsn
}

/// The replica's keyed hashes of its chunks, as they arrive (diff resync).
type HashFeed = mpsc::Receiver<(u64, [u8; 32])>;

/// A run of chunks sent as one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Zero,
    Keep,
}

/// Whether `start`'s epoch had begun by lsn `lsn`: what a resync to
/// `lsn` lists. The first epoch starts at lsn 1 without a record to ship.
fn begun_by(start: &EpochStart, lsn: u64) -> bool {
    start.first_lsn <= lsn.max(1)
}

/// Resyncs the replica; returns the sync point. With `diff` (a replica
/// that holds an older state of the disk), the replica's hashes of its
/// chunks come in on the feed and only chunks that differ are sent.
async fn resync<W: AsyncWrite + Unpin>(
    volume: &Arc<Volume>,
    link: &Link,
    welcome: &Welcome,
    writer: &mut W,
    encoder: &mut Encoder,
    bucket: &mut Option<TokenBucket>,
    mut diff: Option<&mut HashFeed>,
) -> Result<u64, SessionError> {
    // The replica's saved progress (its welcome), unchecked, would place
    // every chunk.
    if let Some(point) = welcome.resync {
        check_resume_offset(point.next_offset, volume.size()).map_err(|e| {
            down(format!(
                "the replica would resume its resync to lsn {} at {e}",
                point.sync_lsn
            ))
        })?;
    }
    // A replica that holds at least what it held when a forced fold took
    // records from it lacks only the chunks the out-of-sync map marks and
    // those the journal's records touched since: sent from the map alone,
    // without reading the replica's disk.
    let v = volume.clone();
    let (resume, from_map) = (
        welcome.resync,
        welcome.resync.is_none().then_some(welcome.last_lsn),
    );
    let (view, from, marked) = tokio::task::spawn_blocking(move || {
        let durable = v.durable_lsn();
        let marked = from_map.and_then(|held| {
            v.out_of_sync_through(durable)
                .filter(|map| held >= map.from_lsn)
        });
        if marked.is_some() {
            return v
                .view(&PointInTime::Lsn(durable))
                .map(|view| (view, 0, marked));
        }
        if let Some(point) = resume {
            // A history compacted since may have forgotten every epoch
            // begun by that sync point: the begin would list none, which
            // the replica refuses on every reconnect. A new resync (from
            // offset 0, to a new sync point) replaces its resync instead.
            let begun = v
                .epoch_history()
                .iter()
                .any(|e| begun_by(e, point.sync_lsn));
            let view = if begun {
                v.view(&PointInTime::Lsn(point.sync_lsn))
                    .map_err(|e| e.to_string())
            } else {
                Err("the epoch history no longer lists its epoch".to_string())
            };
            match view {
                Ok(view) => return Ok((view, point.next_offset, None)),
                Err(e) => tracing::warn!(
                    "cannot resume the replica's resync at lsn {}: {e}; starting a new one",
                    point.sync_lsn
                ),
            }
        }
        v.view(&PointInTime::Lsn(durable))
            .map(|view| (view, 0, None))
    })
    .await
    .map_err(|e| down(format!("starting a resync: {e}")))?
    .map_err(|e| down(format!("starting a resync: {e}")))?;
    let view = Arc::new(view);
    let (sync_lsn, size) = (view.lsn(), view.size());
    volume.hold_for_replica(Some(sync_lsn));
    let mut progress = ResyncProgress {
        sync_lsn,
        done_bytes: from,
        total_bytes: size,
        data_bytes: 0,
    };
    link.set_resync(Some(progress));
    let key = match (&marked, &diff) {
        (None, Some(_)) => Some(random_key()?),
        _ => None,
    };
    let mode = match (&marked, &key) {
        (Some(_), _) => "out-of-sync map",
        (None, Some(_)) => "hash diff",
        (None, None) => "full",
    };
    tracing::info!(sync_lsn, from, mode, "resyncing the replica");
    let begin = ResyncBegin {
        sync_lsn,
        sync_ns: view.timestamp_ns(),
        epoch_history: volume
            .epoch_history()
            .into_iter()
            .filter(|e| begun_by(e, sync_lsn))
            .collect(),
        from_offset: from,
        diff_key: key.map(|k| k.iter().map(|b| format!("{b:02x}")).collect()),
    };
    let epoch = volume.epoch();
    write_frame(writer, &encoder.encode(epoch, &Message::ResyncBegin(begin)))
        .await
        .map_err(|e| down(format!("starting a resync: {e}")))?;
    let mut run: Option<(Run, u64, u64)> = None;
    let end_run = |run: &mut Option<(Run, u64, u64)>, frames: &mut Vec<Message>| {
        if let Some((kind, offset, length)) = run.take() {
            frames.push(match kind {
                Run::Zero => Message::Zero { offset, length },
                Run::Keep => Message::Keep { offset, length },
            });
        }
    };
    let mut last_beat = Instant::now();
    let mut offset = from;
    while offset < size {
        let len = RESYNC_CHUNK.min(size - offset);
        let mut frames = Vec::new();
        let unmarked = marked.as_ref().is_some_and(|map| !map.any_in(offset, len));
        // An unmarked chunk is already right on the replica: not even read.
        let chunk = match unmarked {
            true => None,
            false => read_chunk(&view, offset, len).await?,
        };
        let same = match (key.as_ref(), diff.as_deref_mut()) {
            _ if unmarked => true,
            (Some(key), Some(feed)) => {
                let theirs =
                    next_hash(feed, offset, writer, encoder, epoch, &mut last_beat).await?;
                let ours = match &chunk {
                    Some(data) => blake3::keyed_hash(key, data),
                    None => blake3::keyed_hash(key, &vec![0u8; len as usize]),
                };
                ours == blake3::Hash::from_bytes(theirs)
            }
            _ => false,
        };
        let kind = match (&chunk, same) {
            (_, true) => Some(Run::Keep),
            (None, false) => Some(Run::Zero),
            (Some(_), false) => None,
        };
        match (kind, run) {
            (Some(kind), Some((current, start, length)))
                if kind == current && length < ZERO_RUN_BYTES =>
            {
                run = Some((kind, start, length + len));
            }
            (Some(kind), _) => {
                end_run(&mut run, &mut frames);
                run = Some((kind, offset, len));
            }
            (None, _) => {
                end_run(&mut run, &mut frames);
                if let Some(data) = chunk {
                    progress.data_bytes += len;
                    frames.push(Message::Chunk { offset, data });
                }
            }
        }
        offset += len;
        if offset == size {
            end_run(&mut run, &mut frames);
        }
        if last_beat.elapsed() >= HEARTBEAT {
            frames.push(Message::Heartbeat);
            last_beat = Instant::now();
        }
        for message in frames {
            let encoded = encoder.encode(epoch, &message);
            // Heartbeats are not held back by the rate limit.
            if let (Some(bucket), false) = (bucket.as_mut(), message == Message::Heartbeat) {
                bucket.take(encoded.bytes.len()).await;
            }
            write_frame(writer, &encoded)
                .await
                .map_err(|e| down(format!("resync at offset {offset}: {e}")))?;
            link.sent(link.acked_lsn(), encoded.bytes.len(), encoded.raw_len);
        }
        progress.done_bytes = offset;
        link.set_resync(Some(progress));
    }
    write_frame(writer, &encoder.encode(epoch, &Message::ResyncEnd))
        .await
        .map_err(|e| down(format!("ending the resync: {e}")))?;
    // The replica acknowledges the sync point once it took it.
    link.sent(sync_lsn, 0, 0);
    // It holds everything a forced fold took (if it fails to finish, its
    // resync resumes, comparing hashes).
    if volume
        .out_of_sync()
        .is_some_and(|map| map.upto_lsn <= sync_lsn)
    {
        let v = volume.clone();
        match tokio::task::spawn_blocking(move || v.clear_out_of_sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cannot clear the out-of-sync map: {e}"),
            Err(e) => tracing::warn!("cannot clear the out-of-sync map: {e}"),
        }
    }
    link.set_last_resync(LastResync {
        mode,
        sync_lsn,
        data_bytes: progress.data_bytes,
    });
    tracing::info!(
        sync_lsn,
        data_bytes = progress.data_bytes,
        "resync sent; streaming from the sync point"
    );
    link.set_resync(None);
    Ok(sync_lsn)
}

/// The replica's hash of the chunk at `offset`. Meanwhile heartbeats go
/// out, or the replica, which hears nothing else while it hashes its disk,
/// would end the session after [`SILENCE_LIMIT`].
async fn next_hash<W: AsyncWrite + Unpin>(
    feed: &mut HashFeed,
    offset: u64,
    writer: &mut W,
    encoder: &mut Encoder,
    epoch: u64,
    last_beat: &mut Instant,
) -> Result<[u8; 32], SessionError> {
    let limit = SILENCE_LIMIT * 10;
    let deadline = Instant::now() + limit;
    loop {
        let beat = HEARTBEAT.saturating_sub(last_beat.elapsed());
        let wait = beat.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, feed.recv()).await {
            Ok(Some((at, hash))) if at == offset => return Ok(hash),
            Ok(Some((at, _))) => {
                return Err(down(format!(
                    "the replica sent the hash of offset {at} where {offset} was due"
                )))
            }
            Ok(None) => return Err(down("the replica's hashes stopped")),
            Err(_) if Instant::now() >= deadline => {
                return Err(down(format!(
                    "no hash from the replica for offset {offset} within {limit:?}"
                )))
            }
            Err(_) => heartbeat_if_due(writer, encoder, epoch, last_beat).await?,
        }
    }
}

/// A fresh key for a diff resync's keyed hashes, so that a replica cannot
/// answer with hashes prepared in advance.
fn random_key() -> Result<[u8; 32], SessionError> {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| down("no randomness for a resync key"))?;
    Ok(key)
}

/// The sync point's data at `offset`, or `None` where it is all zeroes
/// (found without reading where the view knows: holes, zeroed ranges).
async fn read_chunk(
    view: &Arc<View>,
    offset: u64,
    len: u64,
) -> Result<Option<Vec<u8>>, SessionError> {
    let view = view.clone();
    tokio::task::spawn_blocking(move || {
        if !view.may_hold_data(offset, len)? {
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        view.read(offset, &mut data)?;
        Ok(data.iter().any(|&b| b != 0).then_some(data))
    })
    .await
    .map_err(|e| down(format!("resync: reading at {offset}: {e}")))?
    .map_err(|e: rewind_journal::Error| down(format!("resync: reading at {offset}: {e}")))
}

/// Ships records from `next` on, for as long as the link holds.
async fn ship<W: AsyncWrite + Unpin>(
    volume: &Arc<Volume>,
    link: &Link,
    writer: &mut W,
    encoder: &mut Encoder,
    bucket: &mut Option<TokenBucket>,
    mut next: u64,
) -> SessionError {
    let mut last_send = Instant::now();
    let mut handover = HandoverSent::default();
    loop {
        if let Some(reason) = link.forwarding.detach_to_send() {
            return forward(link, writer, encoder, volume.epoch(), Some(reason)).await;
        }
        let offer = link.handover_offer();
        if volume.role() != Role::Primary {
            // Sealed: once the replica has every record up to the seal,
            // say so, so that it may be promoted without --force.
            let Some(seal) = volume.sealed().filter(|s| s.epoch == volume.epoch()) else {
                return down("demoted: this node is a replica now");
            };
            if next > seal.lsn && offer.is_some_and(|o| o.seal.is_none_or(|s| s == seal)) {
                // A handover: offer it, pass on a cancel, wait for the
                // verdict; a rollback promotes this node again.
                if let Some(ended) = handover.step(link, writer, encoder, volume.epoch()).await {
                    return ended;
                }
                let _ = tokio::time::timeout(HEARTBEAT, link.wake.notified()).await;
                if let Err(e) =
                    heartbeat_if_due(writer, encoder, volume.epoch(), &mut last_send).await
                {
                    return e;
                }
                continue;
            }
            if next > seal.lsn {
                let sealed = encoder.encode(volume.epoch(), &Message::Sealed(seal));
                return down(match write_frame(writer, &sealed).await {
                    Ok(()) => {
                        link.set_seal_delivered(true);
                        format!("sealed at lsn {}: this node is a replica now", seal.lsn)
                    }
                    Err(e) => {
                        format!(
                            "sealed at lsn {}, but telling the replica failed: {e}",
                            seal.lsn
                        )
                    }
                });
            }
        }
        let batch = match read(volume, next).await {
            Ok(batch) => batch,
            Err(e) => return e,
        };
        if batch.records.is_empty() {
            if link.acked_lsn() + 1 >= next {
                link.caught_up();
            }
            // A trailing Flush record needs no flush of its own.
            let unflushed = volume.last_data_lsn() > volume.durable_lsn();
            let wait = if unflushed { SHIP_DELAY } else { HEARTBEAT };
            let woken = tokio::time::timeout(wait, link.wake.notified())
                .await
                .is_ok();
            if !woken && unflushed && volume.durable_lsn() < next {
                // Nobody flushed: make the records durable to ship them.
                let v = volume.clone();
                match tokio::task::spawn_blocking(move || v.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return down(format!("flushing the journal to ship it: {e}")),
                    Err(e) => return down(format!("flushing the journal to ship it: {e}")),
                }
            }
            if let Err(e) = heartbeat_if_due(writer, encoder, volume.epoch(), &mut last_send).await
            {
                return e;
            }
            continue;
        }
        let count = batch.records.len() as u64;
        let encoded = encoder.encode(volume.epoch(), &Message::Records(batch.records));
        if let Some(bucket) = bucket.as_mut() {
            bucket.take(encoded.bytes.len()).await;
        }
        if let Err(e) = write_frame(writer, &encoded).await {
            return down(format!("sending records {next}..: {e}"));
        }
        last_send = Instant::now();
        next += count;
        link.sent(next - 1, encoded.bytes.len(), encoded.raw_len);
    }
}

/// A detached primary's new session with the peer that serves it: asks
/// it to go on, resends what the lost session left unanswered, in order,
/// then forwards as before.
async fn resume<R, W>(
    volume: &Arc<Volume>,
    link: &Link,
    mut reader: R,
    mut writer: W,
    mut encoder: Encoder,
    peer_epoch: u64,
) -> SessionError
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let epoch = volume.epoch();
    let ask = Message::ResumeForwarding {
        volume: volume.config().uuid,
        peer_epoch,
    };
    if let Err(e) = write_frame(&mut writer, &encoder.encode(epoch, &ask)).await {
        return down(format!("asking the peer to go on forwarding: {e}"));
    }
    let answer = match tokio::time::timeout(SILENCE_LIMIT * 3, read_frame(&mut reader)).await {
        Ok(Ok(frame)) => frame.message,
        Ok(Err(e)) => return down(format!("reading the peer's answer to the resume: {e}")),
        Err(_) => return down("the peer did not answer the resume"),
    };
    match answer {
        Message::Detached { .. } => {}
        Message::Refuse(reason) => return down(format!("the peer refused the resume: {reason}")),
        other => return down(format!("expected detached, got {}", other.name())),
    }
    tracing::warn!(
        peer_epoch,
        "forwarding again: the peer serves this detached primary"
    );
    link.set_state(LinkState::Streaming);
    link.forwarding.resend();
    let (hashes, _unused) = mpsc::channel(1);
    let ended = tokio::select! {
        e = forward(link, &mut writer, &mut encoder, epoch, None) => e,
        e = take_acks(volume, link, &mut reader, hashes) => e,
        () = link.stop.notified() => down("the daemon stops"),
    };
    let _ = writer.shutdown().await;
    ended
}

/// This primary detached from its failed storage: asks the peer to take
/// over (`detach`, unless it did on an earlier session), then sends the
/// guest's requests as they are queued, for as long as the session
/// holds. Records are not shipped any more: the peer holds what this
/// node's journal still had once the detach catches it up.
async fn forward<W: AsyncWrite + Unpin>(
    link: &Link,
    writer: &mut W,
    encoder: &mut Encoder,
    epoch: u64,
    detach: Option<String>,
) -> SessionError {
    if let Some(reason) = detach {
        tracing::warn!(
            "detaching: asking the replica to take over and serve this guest ({reason})"
        );
        let frame = encoder.encode(epoch, &Message::Detach(reason));
        if let Err(e) = write_frame(writer, &frame).await {
            return down(format!("sending detach: {e}"));
        }
    }
    let mut last_send = Instant::now();
    let mut handover = HandoverSent::default();
    loop {
        if let Some(ended) = handover.step(link, writer, encoder, epoch).await {
            return ended;
        }
        for (id, op) in link.forwarding.take_unsent() {
            let frame = encoder.encode(epoch, &Message::Forward { id, op });
            if let Err(e) = write_frame(writer, &frame).await {
                return down(format!("forwarding request {id}: {e}"));
            }
            link.sent(link.acked_lsn(), frame.bytes.len(), frame.raw_len);
            last_send = Instant::now();
        }
        let _ = tokio::time::timeout(HEARTBEAT, link.wake.notified()).await;
        if let Err(e) = heartbeat_if_due(writer, encoder, epoch, &mut last_send).await {
            return e;
        }
    }
}

/// Sends a heartbeat if nothing went out for [`HEARTBEAT`].
async fn heartbeat_if_due<W: AsyncWrite + Unpin>(
    writer: &mut W,
    encoder: &mut Encoder,
    epoch: u64,
    last_send: &mut Instant,
) -> Result<(), SessionError> {
    if last_send.elapsed() >= HEARTBEAT {
        let beat = encoder.encode(epoch, &Message::Heartbeat);
        write_frame(writer, &beat)
            .await
            .map_err(|e| down(format!("sending a heartbeat: {e}")))?;
        *last_send = Instant::now();
    }
    Ok(())
}

/// What a session told the replica of this node's handover offer.
#[derive(Debug, Default)]
struct HandoverSent {
    /// The seal whose handover was offered, and whether it was cancelled.
    offered: Option<Seal>,
    cancelled: Option<Seal>,
}

impl HandoverSent {
    /// Sends what the offer needs next; Some when the session is over
    /// (the peer took over, or the link failed).
    async fn step<W: AsyncWrite + Unpin>(
        &mut self,
        link: &Link,
        writer: &mut W,
        encoder: &mut Encoder,
        epoch: u64,
    ) -> Option<SessionError> {
        let offer = link.handover_offer()?;
        let seal = offer.seal?;
        if offer.verdict == Some(true) {
            link.set_seal_delivered(true);
            link.forwarding.hand_over();
            return Some(down(format!(
                "handed over at lsn {}: the peer is the primary now",
                seal.lsn
            )));
        }
        if self.offered != Some(seal) {
            let left = offer.deadline.saturating_duration_since(Instant::now());
            let message = Message::HandOver {
                seal,
                timeout_ms: left.as_millis() as u64,
            };
            if let Err(e) = write_frame(writer, &encoder.encode(epoch, &message)).await {
                return Some(down(format!("offering the handover: {e}")));
            }
            self.offered = Some(seal);
        }
        if offer.cancelled && self.cancelled != Some(seal) {
            let cancel = encoder.encode(epoch, &Message::HandoverCancel);
            if let Err(e) = write_frame(writer, &cancel).await {
                return Some(down(format!("calling the handover off: {e}")));
            }
            self.cancelled = Some(seal);
        }
        None
    }
}

/// The peer is a primary that supersedes this one, or diverged from it:
/// rejoin it as a replica if it is newer.
async fn superseded(link: &Link, fenced: Fenced) -> SessionError {
    // Checked before it is kept or acted on: a malformed history could
    // pass for a newer primary's and make this node cut its records.
    let shape = history::check(&fenced.epoch_history).map_err(|e| e.to_string());
    if let Err(why) = shape.and_then(|()| match fenced.epoch_history.last() {
        Some(last) if last.epoch == fenced.epoch => Ok(()),
        last => Err(format!(
            "it is at epoch {} but its epoch history ends with {last:?}",
            fenced.epoch
        )),
    }) {
        return SessionError {
            state: LinkState::Outdated,
            message: format!("the peer's fenced answer is malformed: {why}"),
        };
    }
    link.set_peer_history(fenced.epoch_history.clone());
    let offered = link.handover_offer().and_then(|offer| offer.seal);
    if offered.is_some_and(|seal| fenced.epoch > seal.epoch) {
        // The verdict was lost with the session that carried it.
        link.handover_verdict(true);
    }
    let Some(roles) = link.roles() else {
        return SessionError {
            state: LinkState::Outdated,
            message: format!("the peer refused: {}", fenced.reason),
        };
    };
    let history = fenced.epoch_history;
    let rejoined = tokio::task::spawn_blocking(move || roles.rejoin(&history)).await;
    match rejoined {
        Ok(Ok(())) => down(format!(
            "the peer is the primary at epoch {}: this node rejoined it as a replica",
            fenced.epoch
        )),
        Ok(Err(e)) if e.contains("split brain") => SessionError {
            state: LinkState::SplitBrain,
            message: e,
        },
        Ok(Err(e)) => SessionError {
            state: LinkState::Outdated,
            message: format!("the peer is the primary at epoch {}: {e}", fenced.epoch),
        },
        Err(e) => down(format!("rejoining: {e}")),
    }
}

async fn read(volume: &Arc<Volume>, next: u64) -> Result<ShipBatch, SessionError> {
    let v = volume.clone();
    match tokio::task::spawn_blocking(move || v.read_shipped(next, BATCH_BYTES)).await {
        Ok(Ok(batch)) => Ok(batch),
        Ok(Err(e @ JournalError::Folded { .. })) => Err(SessionError {
            state: LinkState::Outdated,
            message: format!("the replica needs a resync: {e}"),
        }),
        Ok(Err(e)) => Err(down(format!("reading the journal to ship it: {e}"))),
        Err(e) => Err(down(format!("reading the journal to ship it: {e}"))),
    }
}

/// Takes acks (and heartbeat answers) until the link fails.
async fn take_acks<R: AsyncRead + Unpin>(
    volume: &Volume,
    link: &Link,
    reader: &mut R,
    hashes: mpsc::Sender<(u64, [u8; 32])>,
) -> SessionError {
    loop {
        let frame = match tokio::time::timeout(SILENCE_LIMIT, read_frame(reader)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => return down(format!("reading from the replica: {e}")),
            Err(_) => return down(format!("the replica was silent for {SILENCE_LIMIT:?}")),
        };
        match frame {
            Frame {
                message: Message::Ack { durable_lsn },
                ..
            } => {
                let sent = link.sent_lsn.load(std::sync::atomic::Ordering::Acquire);
                if durable_lsn > sent.max(link.acked_lsn()) {
                    return down(format!(
                        "the replica acknowledged lsn {durable_lsn}, past what was sent ({sent})"
                    ));
                }
                volume.hold_for_replica(Some(durable_lsn));
                link.acked(durable_lsn);
                if durable_lsn >= volume.durable_lsn() && !link.resyncing() {
                    link.caught_up();
                }
            }
            Frame {
                message: Message::Heartbeat,
                ..
            } => {}
            Frame {
                message:
                    Message::Hashes {
                        offset,
                        chunk_bytes,
                        hashes: batch,
                    },
                ..
            } => {
                if u64::from(chunk_bytes) != RESYNC_CHUNK {
                    return down(format!(
                        "the replica hashed chunks of {chunk_bytes} bytes, not {RESYNC_CHUNK}"
                    ));
                }
                // Outside a diff resync nobody takes them: once
                // HASHES_QUEUED of them wait, the next is given up on
                // after SILENCE_LIMIT rather than waited for for ever.
                for (i, hash) in batch.into_iter().enumerate() {
                    let Some(at) = (i as u64)
                        .checked_mul(RESYNC_CHUNK)
                        .and_then(|o| o.checked_add(offset))
                    else {
                        return down(format!("hashes at offset {offset} run past any disk"));
                    };
                    let taken = tokio::time::timeout(SILENCE_LIMIT, hashes.send((at, hash))).await;
                    if !matches!(taken, Ok(Ok(()))) {
                        return down("the replica sent hashes that no diff resync takes");
                    }
                }
            }
            Frame {
                message: Message::HandoverVerdict { promoted },
                ..
            } => link.handover_verdict(promoted),
            Frame {
                message: Message::Detached { epoch, lsn },
                ..
            } => {
                let sent = link.sent_lsn.load(std::sync::atomic::Ordering::Acquire);
                if let Err(e) = link.forwarding.took_over(epoch, lsn, volume.epoch(), sent) {
                    return down(e);
                }
                tracing::warn!(
                    event = rewind_journal::events::DETACHED,
                    volume = %volume.config().uuid,
                    epoch,
                    lsn,
                    "detached: the peer is the primary now and serves this guest's requests"
                );
            }
            Frame {
                message: Message::Forwarded { id, result },
                ..
            } => {
                if let Err(e) = link.forwarding.answered(id, result) {
                    return down(e);
                }
            }
            Frame {
                message: Message::SealRequest,
                ..
            } => {
                // The seal waits for acks this loop takes: it runs aside,
                // and the ship loop ends once the volume is a replica.
                match link.roles() {
                    Some(roles) => {
                        let volume = link.volume().to_owned();
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = roles.seal_for_peer() {
                                tracing::error!(
                                    event = rewind_journal::events::SEAL_FAILED,
                                    volume,
                                    "the replica asked for a seal, which failed: {e}"
                                );
                            }
                        });
                    }
                    None => return down("the replica asked for a seal; this daemon cannot seal"),
                }
            }
            Frame {
                message: Message::ResyncNeeded(reason),
                ..
            } => {
                link.force_resync
                    .store(true, std::sync::atomic::Ordering::Release);
                return down(format!("the replica needs a resync: {reason}"));
            }
            Frame {
                message: Message::Refuse(reason),
                ..
            } => {
                if link.detached() {
                    link.forwarding.answered_detach(Err(reason.clone()));
                }
                return SessionError {
                    state: LinkState::Outdated,
                    message: format!("the replica refused: {reason}"),
                };
            }
            Frame { message, .. } => {
                return down(format!(
                    "unexpected {} frame from the replica",
                    message.name()
                ))
            }
        }
    }
}

/// `--replication-rate`: bytes per second, with a burst of a quarter
/// second so the rate holds over any window of a second or more.
#[derive(Debug)]
struct TokenBucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> Self {
        TokenBucket {
            rate,
            tokens: 0.0,
            at: Instant::now(),
        }
    }

    /// Waits until `bytes` may be sent (a batch larger than the burst
    /// takes the bucket into debt, repaid before the next).
    async fn take(&mut self, bytes: usize) {
        let burst = self.rate as f64 / 4.0;
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate as f64).min(burst);
        self.at = now;
        if self.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-self.tokens / self.rate as f64);
            tokio::time::sleep(wait).await;
            self.tokens = 0.0;
            self.at = Instant::now();
        }
        self.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use rewind_journal::EpochStart;
    use tokio::io::{DuplexStream, ReadHalf};

    use super::super::Mode;
    use super::*;

    fn volume() -> Arc<Volume> {
        let volume = Arc::new(crate::test_support::volume(8 << 20));
        volume.write(0, &[5; 4096]).expect("write");
        volume.flush().expect("flush");
        volume
    }

    fn link() -> Link {
        Link::new("test".into(), Some(Mode::Sync), None)
    }

    fn welcome(last_lsn: u64, durable_lsn: u64) -> Message {
        Message::Welcome(held(last_lsn, durable_lsn))
    }

    fn held(last_lsn: u64, durable_lsn: u64) -> Welcome {
        Welcome {
            epoch: 1,
            last_lsn,
            durable_lsn,
            resync: None,
        }
    }

    async fn send(stream: &mut DuplexStream, message: &Message) {
        let frame = Encoder::new(false).expect("encoder").encode(1, message);
        write_frame(stream, &frame).await.expect("send");
    }

    /// The sender's handshake against a replica that answers the hello
    /// with `answer`; the sender's reader, and the replica's end.
    async fn handshake_with(
        volume: &Arc<Volume>,
        link: &Link,
        answer: Message,
    ) -> (
        Result<Welcome, SessionError>,
        ReadHalf<DuplexStream>,
        DuplexStream,
    ) {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let (mut reader, mut writer) = tokio::io::split(ours);
        let mut encoder = Encoder::new(false).expect("encoder");
        let replica = async {
            let hello = read_frame(&mut theirs).await.expect("the hello");
            assert!(matches!(hello.message, Message::Hello(_)), "{hello:?}");
            send(&mut theirs, &answer).await;
        };
        let (result, ()) = tokio::join!(
            handshake(volume, link, &mut reader, &mut writer, &mut encoder),
            replica
        );
        (result, reader, theirs)
    }

    /// What ends `take_acks` once the replica sent `frames` and hung up.
    async fn acks_end(
        volume: &Volume,
        link: &Link,
        mut reader: ReadHalf<DuplexStream>,
        mut theirs: DuplexStream,
        frames: &[Message],
    ) -> String {
        for frame in frames {
            send(&mut theirs, frame).await;
        }
        drop(theirs);
        let (hashes, _feed) = mpsc::channel(1);
        take_acks(volume, link, &mut reader, hashes).await.message
    }

    #[tokio::test]
    async fn a_welcome_durable_past_what_it_holds_is_refused() {
        let (volume, link) = (volume(), link());
        let (result, ..) = handshake_with(&volume, &link, welcome(0, u64::MAX)).await;
        let err = result.expect_err("a malformed welcome");
        assert!(
            err.message
                .contains("durable lsn 18446744073709551615 is past its last lsn 0"),
            "{}",
            err.message
        );
        assert_eq!(link.acked_lsn(), 0, "nothing counts as acknowledged");
    }

    #[tokio::test]
    async fn acks_past_what_this_session_sent_end_it() {
        let (volume, link) = (volume(), link());
        // An earlier session sent more than this replica holds.
        link.sent(500, 0, 0);
        let (result, reader, theirs) = handshake_with(&volume, &link, welcome(0, 0)).await;
        result.expect("a sound welcome");
        let ack = Message::Ack { durable_lsn: 100 };
        let ended = acks_end(&volume, &link, reader, theirs, &[ack]).await;
        assert!(
            ended.contains("acknowledged lsn 100, past what was sent (0)"),
            "{ended}"
        );
        assert_eq!(link.acked_lsn(), 0);
    }

    #[tokio::test]
    async fn a_detached_answer_to_no_detach_ends_the_session() {
        let (volume, link) = (volume(), link());
        let (result, reader, theirs) = handshake_with(&volume, &link, welcome(0, 0)).await;
        result.expect("a sound welcome");
        let unasked = Message::Detached { epoch: 2, lsn: 0 };
        let ended = acks_end(&volume, &link, reader, theirs, &[unasked]).await;
        assert!(ended.contains("no detach waits for an answer"), "{ended}");
        assert_eq!(link.detached_peer_epoch(), None);

        // Asked, but it claims records it was never sent.
        link.forwarding.request_detach("EIO");
        assert!(link.forwarding.detach_to_send().is_some());
        let (result, reader, theirs) = handshake_with(&volume, &link, welcome(0, 0)).await;
        result.expect("a sound welcome");
        let beyond = Message::Detached { epoch: 2, lsn: 99 };
        let ended = acks_end(&volume, &link, reader, theirs, &[beyond]).await;
        assert!(
            ended.contains("holding lsn 99, past the last lsn sent to it (0)"),
            "{ended}"
        );
        assert_eq!(link.detached_peer_epoch(), None);
        assert!(link
            .forwarding
            .wait_detached(Instant::now())
            .is_err_and(|e| e.contains("did not answer")));
    }

    #[tokio::test]
    async fn a_fenced_answer_with_a_malformed_history_changes_nothing() {
        let (volume, link) = (volume(), link());
        let start = |epoch, first_lsn| EpochStart {
            epoch,
            first_lsn,
            node: 9,
        };
        let fenced = Message::Fenced(Fenced {
            epoch: 0,
            epoch_history: vec![start(1, 1), start(0, 1)],
            reason: "fenced".into(),
        });
        let (result, ..) = handshake_with(&volume, &link, fenced).await;
        let err = result.expect_err("refused");
        assert!(
            err.message
                .contains("malformed: epoch 0 follows epoch 1; epochs must increase"),
            "{}",
            err.message
        );
        assert_eq!(link.peer_history(), None, "not kept for `resolve`");
    }

    #[tokio::test]
    async fn a_diff_resync_sends_heartbeats_while_the_replica_hashes() {
        let (volume, link) = (volume(), link());
        let durable = volume.durable_lsn();
        let welcome = held(durable, durable);
        let (ours, mut theirs) = tokio::io::duplex(16 << 20);
        let (_reader, mut writer) = tokio::io::split(ours);
        let mut encoder = Encoder::new(false).expect("encoder");
        let (hashes, mut feed) = mpsc::channel(HASHES_QUEUED);
        let mut unlimited = None;
        let late = Duration::from_millis(2500);
        let replica = async {
            let begin = read_frame(&mut theirs).await.expect("resync-begin");
            assert!(matches!(begin.message, Message::ResyncBegin(_)));
            let asked = Instant::now();
            // A slow disk: the hashes come late, but within the limit.
            tokio::spawn(async move {
                tokio::time::sleep(late).await;
                for i in 0..8 {
                    let _ = hashes.send((i * RESYNC_CHUNK, [0; 32])).await;
                }
            });
            let first = read_frame(&mut theirs).await.expect("a frame");
            let heard = asked.elapsed();
            let mut last = first.message.clone();
            while last != Message::ResyncEnd {
                last = read_frame(&mut theirs).await.expect("a frame").message;
            }
            (first.message, heard)
        };
        let (synced, (first, heard)) = tokio::join!(
            resync(
                &volume,
                &link,
                &welcome,
                &mut writer,
                &mut encoder,
                &mut unlimited,
                Some(&mut feed)
            ),
            replica
        );
        assert_eq!(synced.expect("resync"), durable);
        assert_eq!(first, Message::Heartbeat);
        assert!(heard < late.min(SILENCE_LIMIT), "silent for {heard:?}");
    }
}
