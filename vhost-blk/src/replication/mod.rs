//! Replication: the primary ships its journal to a replica daemon on
//! another host (DESIGN.md, "Replication, failover and handover"; the wire
//! protocol is in REPLICATION.md next to this crate).
//!
//! One TCP connection per (volume, replica), mutual TLS 1.3. The primary
//! connects out ([`sender`]), reads durable records from its segment files
//! and sends them in batches; the replica ([`receiver`]) checks and places
//! them at the same lsns, group-commits and acknowledges its durable lsn.
//! Both run on a small tokio runtime of their own; the journal's blocking
//! calls run on its blocking pool. Roles change at run time (failover):
//! the listener always runs when configured, and the sender runs while
//! the volume is the primary.
//!
//! [`Link`] is what the rest of the daemon sees of the peer: its state and
//! counters for `status`, and in sync mode the wait that makes a guest
//! flush complete only once the replica holds what it covers.

pub mod forward;
pub mod frame;
pub mod history;
pub mod receiver;
pub mod sender;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use rewind_journal::{EpochStart, Role, Seal, Volume};
use serde::Serialize;
use tokio::task::AbortHandle;

use self::forward::{DetachedStatus, ForwardError, Forwarding, ServingStatus};
use self::frame::ForwardOp;
use self::tls::TlsSettings;

/// Idle links send a heartbeat this often; a peer silent for
/// [`SILENCE_LIMIT`] is disconnected.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
pub const SILENCE_LIMIT: Duration = Duration::from_secs(3);

/// Bytes of the disk per resync chunk: the primary sends, and the replica
/// hashes for a diff resync, chunks of it from offset 0.
const RESYNC_CHUNK: u64 = 1 << 20;

/// Checks where a resync is to resume (a replica's saved progress, as
/// its welcome names it): a chunk's start, or the disk's end (every chunk
/// taken, the end not yet).
fn check_resume_offset(offset: u64, size: u64) -> Result<(), String> {
    if offset > size {
        return Err(format!(
            "offset {offset} is past the end of the {size}-byte disk"
        ));
    }
    if !offset.is_multiple_of(RESYNC_CHUNK) && offset != size {
        return Err(format!(
            "offset {offset} is not where a chunk starts (every {RESYNC_CHUNK} bytes)"
        ));
    }
    Ok(())
}

/// How the primary's guest flushes relate to the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Guest IO never waits for the network.
    Async,
    /// A guest flush completes once the replica's durable lsn covers it.
    Sync,
}

/// What sync mode does when the replica stays away past `--sync-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnLoss {
    /// Keep holding flushes (the guest sees latency) until it returns.
    Suspend,
    /// Go on as in async mode, loudly, after `--fence-peer` succeeded.
    Degrade,
}

/// A primary's replication settings (`serve --replicate-to ...`).
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub peer: SocketAddr,
    pub mode: Mode,
    pub sync_timeout: Duration,
    pub on_loss: OnLoss,
    /// Run (by `sh -c`) before degrading; it must exit 0.
    pub fence_peer: Option<String>,
    /// Bytes per second on the wire; `None`: unlimited.
    pub rate: Option<u64>,
    pub compress: bool,
    pub tls: TlsSettings,
}

/// While it lives, sync-mode waits fail where the replica is not streaming
/// or was seen lost (`Link::release_waits`).
#[derive(Debug)]
#[must_use = "the waits are released only while the guard lives"]
pub struct ReleaseWaits<'a> {
    link: &'a Link,
}

impl Drop for ReleaseWaits<'_> {
    fn drop(&mut self) {
        self.link.releasing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where peers connect (`serve --replication-listen ...`): a replica's
/// primary, or an old primary that learns it was superseded.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub listen: SocketAddr,
    pub tls: TlsSettings,
}

/// What the network tasks ask of the daemon when roles change
/// (implemented by [`crate::failover::Roles`]). The calls block.
pub trait RoleChanges: Send + Sync + std::fmt::Debug {
    /// The replica asked this primary to seal: close the gate, flush,
    /// wait until the replica holds the tail, demote. Returns the seal.
    fn seal_for_peer(&self) -> Result<Seal, String>;
    /// A primary of a newer epoch exists (its history `newer`): stop
    /// serving for good, keep what diverged as a branch, become a replica.
    fn rejoin(&self, newer: &[EpochStart]) -> Result<(), String>;
    /// The replica accepted this primary's epoch: a startup hold ends.
    fn confirmed(&self);
    /// The primary sealed for a handover: take over once a client starts
    /// its device here, within `timeout`, unless cancelled. Blocks; returns
    /// whether this node is the primary now.
    fn take_over(&self, seal: Seal, timeout: Duration) -> bool;
    /// The primary called its handover off.
    fn cancel_take_over(&self);
    /// The primary's storage failed (it says why): become the primary of
    /// the next epoch, with the gate kept closed to clients of this node
    /// (the guest stays on the detached primary, which forwards its
    /// requests). Returns the new epoch and the last lsn of the old one.
    fn take_over_detached(&self, reason: &str) -> Result<(u64, u64), String>;
}

/// A handover this node offers its peer, from its seal to the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverOffer {
    /// None while the seal is being made: the sender waits for it rather
    /// than end the session with a plain `sealed`.
    pub seal: Option<Seal>,
    /// When the peer gives up waiting for its client.
    pub deadline: Instant,
    /// The offer was called off (this node's client started again).
    pub cancelled: bool,
    /// The peer's answer: it took over, or let the handover go.
    pub verdict: Option<bool>,
}

/// The state of a link, as `status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Dialling, or (replica) waiting for a primary.
    Connecting,
    /// Connected, sending what the replica lacks.
    Syncing,
    /// Connected and caught up: new records go out as they become durable.
    Streaming,
    Disconnected,
    /// Sync mode gave up waiting for the replica: flushes no longer wait.
    Degraded,
    /// The replica cannot follow the journal (it needs records already
    /// folded, or holds records this primary does not).
    Outdated,
    /// Both sides were promoted and wrote: refused until an operator runs
    /// `rewindctl resolve --discard-this-side` on one of them.
    SplitBrain,
}

impl LinkState {
    /// The name `status` shows.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Syncing => "syncing",
            LinkState::Streaming => "streaming",
            LinkState::Disconnected => "disconnected",
            LinkState::Degraded => "degraded",
            LinkState::Outdated => "outdated",
            LinkState::SplitBrain => "split_brain",
        }
    }
}

/// What `status` shows of replication.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationStatus {
    pub role: String,
    /// The other end: the replica a primary ships to, or the primary
    /// connected to a replica.
    pub peer: Option<String>,
    pub mode: Option<Mode>,
    pub state: LinkState,
    /// Every lsn up to here is durable at the replica.
    pub acked_lsn: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// Now minus the time of the oldest record the replica has not made
    /// durable (0 when caught up).
    pub rpo_seconds: f64,
    pub bytes_sent: u64,
    /// Bytes before compression over bytes on the wire (1 without).
    pub compression_ratio: f64,
    /// A resync under way: the sync point and how far it got.
    pub resync: Option<ResyncProgress>,
    /// The last resync this daemon sent: how, to where, and the data it sent.
    pub last_resync: Option<LastResync>,
    /// Bytes of the disk a forced fold took from the replica before it had
    /// them (the out-of-sync map): its next resync sends them.
    pub out_of_sync_bytes: u64,
    /// Set on a replica that lost its primary without a seal: its data may
    /// be behind what the primary acknowledged to its guest.
    pub outdated: Option<String>,
    pub last_error: Option<String>,
    /// This primary's storage failed and it forwards its guest's requests
    /// to the peer (`--on-storage-error detach`).
    pub detached: Option<DetachedStatus>,
    /// This node serves the requests of a detached primary.
    pub serving_detached: Option<ServingStatus>,
}

/// A resync that was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LastResync {
    /// `full`, `hash diff` or `out-of-sync map`.
    pub mode: &'static str,
    pub sync_lsn: u64,
    pub data_bytes: u64,
}

/// How far a resync got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResyncProgress {
    pub sync_lsn: u64,
    /// Bytes of the disk done (sent, on a primary; written, on a replica).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes of data sent or received (zero ranges are not sent).
    pub data_bytes: u64,
}

#[derive(Debug)]
struct Shared {
    state: LinkState,
    peer: Option<String>,
    last_error: Option<String>,
    outdated: Option<String>,
    /// Sync mode, flushes waiting: since when the replica has been away.
    lost_since: Option<Instant>,
    resync: Option<ResyncProgress>,
    last_resync: Option<LastResync>,
    /// Sync mode gave up waiting for the replica, until it caught up.
    degraded: bool,
    /// The epoch history a peer last showed (a refused or diverged one):
    /// what `resolve` cuts against.
    peer_history: Option<Vec<EpochStart>>,
    /// A failover waits for its primary's seal.
    seal_wanted: bool,
    /// A handover offered to the peer, until its verdict is taken.
    handover: Option<HandoverOffer>,
}

/// One replica link: shared by its network task, the data path (sync
/// mode) and `status`.
#[derive(Debug)]
pub struct Link {
    /// The volume's id, for the logs.
    volume: String,
    mode: Option<Mode>,
    shared: Mutex<Shared>,
    changed: Condvar,
    acked_lsn: AtomicU64,
    /// The newest lsn the peer of this session may hold: what its
    /// welcome said, then what was sent.
    sent_lsn: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_raw: AtomicU64,
    /// Wakes the sender when a flush made records durable.
    wake: tokio::sync::Notify,
    /// The daemon is stopping: the sender closes its connection cleanly.
    stopping: AtomicBool,
    stop: tokio::sync::Notify,
    /// Bumped by `release_waits`: the waits under way fail.
    released: AtomicU64,
    /// `release_waits` guards alive: waits that start meanwhile fail too.
    releasing: AtomicU64,
    /// The replica asked for a resync: the next session runs one.
    force_resync: AtomicBool,
    /// The peer was told of this node's seal.
    seal_delivered: AtomicBool,
    /// Held while `--fence-peer` runs.
    hook: Mutex<()>,
    /// The session a primary has open to this node's listener.
    receiving: Mutex<Option<AbortHandle>>,
    /// Wakes the receiver's writer to ask the primary for a seal.
    seal_request: tokio::sync::Notify,
    roles: OnceLock<Weak<dyn RoleChanges>>,
    forwarding: Forwarding,
    /// A sender task runs (`claim_sender`, `retire_sender`).
    sender_active: Mutex<bool>,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Link {
    /// The id of the volume this link replicates.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Volume `volume`'s link to the peer at `peer` (where this node ships
    /// while it is the primary), in `mode`; without a peer, it only takes
    /// streams.
    pub fn new(volume: String, mode: Option<Mode>, peer: Option<SocketAddr>) -> Self {
        Link {
            volume,
            mode,
            shared: Mutex::new(Shared {
                state: LinkState::Connecting,
                peer: peer.map(|p| p.to_string()),
                last_error: None,
                outdated: None,
                lost_since: None,
                resync: None,
                last_resync: None,
                degraded: false,
                peer_history: None,
                seal_wanted: false,
                handover: None,
            }),
            changed: Condvar::new(),
            acked_lsn: AtomicU64::new(0),
            sent_lsn: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_raw: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            released: AtomicU64::new(0),
            releasing: AtomicU64::new(0),
            force_resync: AtomicBool::new(false),
            seal_delivered: AtomicBool::new(false),
            hook: Mutex::new(()),
            receiving: Mutex::new(None),
            seal_request: tokio::sync::Notify::new(),
            roles: OnceLock::new(),
            forwarding: Forwarding::default(),
            sender_active: Mutex::new(false),
        }
    }

    /// Whether the caller is to start a sender: none runs (it is marked
    /// running from now on).
    pub fn claim_sender(&self) -> bool {
        let mut active = self.sender_active.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut *active, true)
    }

    /// The running sender ends if `retire` says so (it runs under the lock
    /// `claim_sender` takes); returns whether it ended.
    fn retire_sender(&self, retire: impl FnOnce() -> bool) -> bool {
        let mut active = self.sender_active.lock().unwrap_or_else(|e| e.into_inner());
        let retired = retire();
        if retired {
            *active = false;
        }
        retired
    }

    /// This primary's storage failed: asks the peer to take over as the
    /// primary of the next epoch and to serve the requests this node
    /// forwards. Returns the peer's new epoch and the last lsn of the old
    /// epoch it holds, once it answered (before `deadline`).
    pub fn detach(&self, reason: &str, deadline: Instant) -> Result<(u64, u64), String> {
        let state = lock(&self.shared).state;
        if !matches!(state, LinkState::Streaming | LinkState::Syncing) {
            return Err(format!(
                "the replica is not connected (replication {})",
                state.name()
            ));
        }
        self.forwarding.request_detach(reason);
        self.wake.notify_one();
        self.forwarding.wait_detached(deadline)
    }

    /// Whether this primary detached from its storage.
    pub fn detached(&self) -> bool {
        self.forwarding.detached()
    }

    /// The epoch the peer took over at for this detached primary.
    pub fn detached_peer_epoch(&self) -> Option<u64> {
        self.forwarding.status().and_then(|s| s.peer_epoch)
    }

    /// Whether this node serves a detached primary's requests.
    pub fn serving_detached(&self) -> bool {
        self.forwarding.serving().is_some_and(|s| s.ended.is_none())
    }

    /// The detached primary's guest moved here: its forwarded requests
    /// are refused from now on.
    pub fn stop_serving_detached(&self) {
        self.forwarding.stop_serving();
    }

    /// Queues `op` for the peer (this primary detached); returns its id.
    pub fn queue_forward(&self, op: ForwardOp) -> u64 {
        let id = self.forwarding.queue(op);
        self.wake.notify_one();
        id
    }

    /// Gives up forwarded requests `ids` without waiting for their answers.
    pub fn abandon_forwards(&self, ids: &[u64]) {
        self.forwarding.abandon(ids);
    }

    /// Waits until `deadline` for the answer to forwarded request `id`.
    pub fn wait_forward(&self, id: u64, deadline: Instant) -> Result<Vec<u8>, ForwardError> {
        self.forwarding.wait(id, deadline)
    }

    /// Who the network tasks ask to change roles.
    pub fn set_roles(&self, roles: Weak<dyn RoleChanges>) {
        let _ = self.roles.set(roles);
    }

    fn roles(&self) -> Option<std::sync::Arc<dyn RoleChanges>> {
        self.roles.get().and_then(Weak::upgrade)
    }

    /// Waits up to `limit` for a primary's session (one that reconnects
    /// after a restart of either side); returns whether one is up.
    pub fn wait_receiving(&self, limit: Duration) -> bool {
        self.wait_for(Instant::now() + limit, |link, shared| {
            matches!(shared.state, LinkState::Streaming | LinkState::Syncing)
                && link
                    .receiving
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some()
        })
    }

    /// Ends the session a primary has open to this node (it was promoted:
    /// nothing more is taken from the old primary).
    pub fn end_receiving(&self) {
        if let Some(session) = self
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            session.abort();
        }
    }

    /// Asks the connected primary to seal and waits up to `limit` for this
    /// replica to hold the seal it answers with; gives up early when the
    /// primary's session ends without one (it went silent or away).
    pub fn request_seal(&self, volume: &Volume, limit: Duration) -> Option<Seal> {
        lock(&self.shared).seal_wanted = true;
        self.seal_request.notify_one();
        let held = |_: &Link, _: &Shared| {
            volume
                .sealed()
                .filter(|s| s.epoch == volume.epoch() && volume.last_lsn() >= s.lsn)
        };
        self.wait_for(Instant::now() + limit, |link, shared| {
            // The receiver applies the seal before it marks the session
            // down, so a seal that came is never missed here.
            held(link, shared).is_some()
                || !matches!(shared.state, LinkState::Streaming | LinkState::Syncing)
        });
        lock(&self.shared).seal_wanted = false;
        held(self, &lock(&self.shared))
    }

    /// Whether the peer was told of this node's seal.
    pub fn seal_delivered(&self) -> bool {
        self.seal_delivered.load(Ordering::Acquire)
    }

    /// Records whether the peer knows of this node's newest seal.
    pub fn set_seal_delivered(&self, delivered: bool) {
        self.seal_delivered.store(delivered, Ordering::Release);
    }

    /// Whether a failover waits for a seal (the receiver's writer asks).
    fn seal_wanted(&self) -> bool {
        lock(&self.shared).seal_wanted
    }

    /// The replica made its primary's seal durable.
    fn peer_sealed(&self) {
        drop(lock(&self.shared));
        self.changed.notify_all();
    }

    fn set_peer_history(&self, history: Vec<EpochStart>) {
        lock(&self.shared).peer_history = Some(history);
    }

    /// A handover is about to seal this primary: the seal is for the peer
    /// to take over, not a plain demotion.
    pub fn prepare_handover(&self) {
        lock(&self.shared).handover = Some(HandoverOffer {
            seal: None,
            deadline: Instant::now(),
            cancelled: false,
            verdict: None,
        });
    }

    /// Offers the peer a handover at `seal` (the sender sends it once the
    /// peer holds the tail); the peer waits up to `timeout` for its client.
    /// A cancel that came while the seal was being made stands.
    pub fn offer_handover(&self, seal: Seal, timeout: Duration) {
        let mut shared = lock(&self.shared);
        let cancelled = shared.handover.is_some_and(|offer| offer.cancelled);
        shared.handover = Some(HandoverOffer {
            seal: Some(seal),
            deadline: Instant::now() + timeout,
            cancelled,
            verdict: None,
        });
        drop(shared);
        self.wake.notify_one();
    }

    /// Withdraws the offer (the seal failed, or the verdict was taken).
    pub fn withdraw_handover(&self) {
        lock(&self.shared).handover = None;
        self.wake.notify_one();
    }

    /// The offer the sender is to make, if any.
    pub fn handover_offer(&self) -> Option<HandoverOffer> {
        lock(&self.shared).handover
    }

    /// Calls the offered handover off; the peer still answers (it may have
    /// taken over first).
    pub fn cancel_handover(&self) {
        if let Some(offer) = lock(&self.shared).handover.as_mut() {
            offer.cancelled = true;
        }
        self.wake.notify_one();
    }

    /// The peer's verdict on the offer.
    fn handover_verdict(&self, promoted: bool) {
        if let Some(offer) = lock(&self.shared).handover.as_mut() {
            offer.verdict = Some(promoted);
        }
        self.changed.notify_all();
        self.wake.notify_one();
    }

    /// Waits until `deadline` for the peer's verdict on the offer. None:
    /// no verdict came (the offer stays, and the sender keeps asking).
    pub fn wait_handover_verdict(&self, deadline: Instant) -> Option<bool> {
        self.wait_for(deadline, |_, shared| {
            shared.handover.is_none_or(|offer| offer.verdict.is_some())
        });
        lock(&self.shared).handover.and_then(|o| o.verdict)
    }

    /// The epoch history a refused or diverged peer showed last.
    pub fn peer_history(&self) -> Option<Vec<EpochStart>> {
        lock(&self.shared).peer_history.clone()
    }

    /// Waits up to `limit` for the replica to acknowledge `lsn`.
    pub fn wait_acked(&self, lsn: u64, limit: Duration) -> bool {
        self.notify_durable();
        self.wait_for(Instant::now() + limit, |link, _| link.acked_lsn() >= lsn)
    }

    pub fn acked_lsn(&self) -> u64 {
        self.acked_lsn.load(Ordering::Acquire)
    }

    fn set_state(&self, state: LinkState) {
        let mut shared = lock(&self.shared);
        shared.state = state;
        drop(shared);
        self.changed.notify_all();
    }

    fn set_peer(&self, peer: Option<String>) {
        lock(&self.shared).peer = peer;
    }

    /// Records why the link went down (logged by the caller).
    fn failed(&self, state: LinkState, error: String) {
        let mut shared = lock(&self.shared);
        shared.state = state;
        shared.last_error = Some(error);
        drop(shared);
        self.changed.notify_all();
    }

    /// Records an error that does not change the link's state (a peer
    /// turned away while another session runs).
    fn note_error(&self, error: String) {
        lock(&self.shared).last_error = Some(error);
    }

    fn resyncing(&self) -> bool {
        lock(&self.shared).resync.is_some()
    }

    fn set_last_resync(&self, done: LastResync) {
        lock(&self.shared).last_resync = Some(done);
    }

    fn set_resync(&self, progress: Option<ResyncProgress>) {
        lock(&self.shared).resync = progress;
    }

    fn set_outdated(&self, why: Option<String>) {
        lock(&self.shared).outdated = why;
    }

    fn acked(&self, lsn: u64) {
        self.acked_lsn.fetch_max(lsn, Ordering::AcqRel);
        // Taking the lock orders the store before a waiter's check.
        drop(lock(&self.shared));
        self.changed.notify_all();
    }

    /// What a new session's peer says it holds, and durably (it may hold
    /// less than an earlier one acknowledged: a replica recreated or
    /// restored). Nothing of this session was sent yet: its acks may not
    /// go past what the peer holds.
    fn reset_acked(&self, held: u64, durable: u64) {
        self.sent_lsn.store(held, Ordering::Release);
        self.acked_lsn.store(durable, Ordering::Release);
        // Taking the lock orders the store before a waiter's check.
        drop(lock(&self.shared));
        self.changed.notify_all();
    }

    fn sent(&self, lsn: u64, wire: usize, raw: usize) {
        self.sent_lsn.fetch_max(lsn, Ordering::AcqRel);
        self.bytes_sent.fetch_add(wire as u64, Ordering::Relaxed);
        self.bytes_raw.fetch_add(raw as u64, Ordering::Relaxed);
    }

    /// The daemon is stopping: waits up to `limit` for the replica to hold
    /// `lsn` (the tail the last flush made durable), then has the sender
    /// end its connection cleanly and waits for that too. Returns whether
    /// the replica held `lsn`.
    pub fn stop(&self, lsn: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        self.notify_durable();
        let held = self.wait_for(deadline, |link, _| link.acked_lsn() >= lsn);
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_one();
        self.wait_for(deadline + Duration::from_secs(1), |_, shared| {
            shared.state == LinkState::Disconnected
        });
        // Waits that start from now on fail too (`stopping`).
        drop(self.release_waits());
        held
    }

    /// Waits until `done` holds or `deadline` passes; returns `done`.
    fn wait_for(&self, deadline: Instant, done: impl Fn(&Link, &Shared) -> bool) -> bool {
        let mut shared = lock(&self.shared);
        while !done(self, &shared) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            shared = self
                .changed
                .wait_timeout(shared, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// A flush made records durable: the sender may ship them now.
    pub fn notify_durable(&self) {
        self.wake.notify_one();
    }

    /// Sync mode: waits until the replica's durable lsn covers `lsn`. Past
    /// `sync_timeout` without it, `suspend` keeps waiting and `degrade`
    /// stops waiting (once `fence_peer` succeeded) until the replica has
    /// caught up again. Fails when the wait is released (a fence, a drain
    /// with abort, the daemon stopping): the flush is not replicated.
    pub fn wait_replicated(&self, lsn: u64, config: &SenderConfig) -> Result<(), String> {
        if self.mode != Some(Mode::Sync) {
            return Ok(());
        }
        let released = self.released.load(Ordering::Acquire);
        let mut shared = lock(&self.shared);
        let mut deadline = Instant::now() + config.sync_timeout;
        loop {
            if self.acked_lsn() >= lsn {
                shared.lost_since = None;
                return Ok(());
            }
            if shared.degraded {
                return Ok(());
            }
            // While a release lasts, a wait that started since fails only
            // where the replica is not holding up its side: one the
            // replica is about to confirm completes.
            let released_since = self.releasing.load(Ordering::Acquire) > 0
                && (shared.lost_since.is_some() || shared.state != LinkState::Streaming);
            if self.released.load(Ordering::Acquire) != released
                || released_since
                || self.stopping()
            {
                return Err(format!("the replica never confirmed lsn {lsn}: released"));
            }
            let now = Instant::now();
            if now >= deadline {
                let since = *shared.lost_since.get_or_insert(now);
                match config.on_loss {
                    OnLoss::Suspend => {
                        tracing::warn!(
                            event = rewind_journal::events::REPLICATION_SUSPENDED,
                            volume = %self.volume,
                            "sync replication: the replica has not confirmed lsn {lsn} for {:?}; \
                             holding guest flushes (--on-replica-loss suspend)",
                            since.elapsed() + config.sync_timeout
                        );
                    }
                    // One queue runs the hook; the others wait for it.
                    OnLoss::Degrade => {
                        if let Ok(_running) = self.hook.try_lock() {
                            drop(shared);
                            let fenced = fence_peer(&self.volume, config.fence_peer.as_deref());
                            shared = lock(&self.shared);
                            // The replica may have come back meanwhile.
                            if self.acked_lsn() >= lsn {
                                continue;
                            }
                            match fenced {
                                Ok(()) => {
                                    tracing::error!(
                                        event = rewind_journal::events::REPLICATION_DEGRADED,
                                        volume = %self.volume,
                                        "sync replication degraded: the replica did not confirm \
                                         lsn {lsn} within {:?}; guest flushes no longer wait",
                                        config.sync_timeout
                                    );
                                    shared.degraded = true;
                                    shared.last_error = Some(format!(
                                        "degraded: the replica did not confirm lsn {lsn} within {:?}",
                                        config.sync_timeout
                                    ));
                                    drop(shared);
                                    self.changed.notify_all();
                                    return Ok(());
                                }
                                Err(e) => {
                                    tracing::error!(
                                        event = rewind_journal::events::FENCE_PEER_FAILED,
                                        volume = %self.volume,
                                        "sync replication: --fence-peer failed ({e}); holding \
                                         guest flushes instead of degrading"
                                    );
                                    shared.last_error = Some(format!("--fence-peer failed: {e}"));
                                }
                            }
                        }
                    }
                }
                deadline = Instant::now() + config.sync_timeout;
            }
            shared = self
                .changed
                .wait_timeout(shared, deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A promotion with --force: its peer, the old primary, is fenced, so
    /// sync mode does not make the first flushes wait `--sync-timeout` for
    /// it. With `--on-replica-loss degrade` the link degrades at once,
    /// once `--fence-peer` succeeded, until the peer caught up as a
    /// replica; with `suspend` flushes wait for it as always.
    pub fn degrade_for_forced_promotion(&self, config: &SenderConfig) {
        if self.mode != Some(Mode::Sync) || config.on_loss != OnLoss::Degrade {
            return;
        }
        let _running = self.hook.lock().unwrap_or_else(|e| e.into_inner());
        match fence_peer(&self.volume, config.fence_peer.as_deref()) {
            Ok(()) => {
                let mut shared = lock(&self.shared);
                shared.degraded = true;
                shared.last_error =
                    Some("degraded: promoted with --force while the old primary is fenced".into());
                drop(shared);
                self.changed.notify_all();
                tracing::warn!(
                    event = rewind_journal::events::REPLICATION_DEGRADED,
                                        volume = %self.volume,
                    "sync replication starts degraded: promoted with --force; flushes wait for \
                     the replica again once it has caught up"
                );
            }
            Err(e) => {
                tracing::error!(
                    event = rewind_journal::events::FENCE_PEER_FAILED,
                                        volume = %self.volume,
                    "--fence-peer failed after a forced promotion ({e}); flushes wait for the \
                     replica as --on-replica-loss says"
                );
                lock(&self.shared).last_error = Some(format!("--fence-peer failed: {e}"));
            }
        }
    }

    /// The sender caught up with the replica: a degraded link is in sync
    /// again.
    fn caught_up(&self) {
        let mut shared = lock(&self.shared);
        if shared.state != LinkState::Streaming || shared.degraded {
            if shared.degraded {
                tracing::info!("the replica caught up: sync replication resumes");
            }
            shared.state = LinkState::Streaming;
            shared.degraded = false;
            shared.lost_since = None;
            drop(shared);
            self.changed.notify_all();
        }
    }

    /// Ends the sync-mode waits in progress (they fail their flush), and
    /// while the returned guard lives, those that start while the replica
    /// is not streaming or was seen lost: the operator fenced or aborted,
    /// and the guest's requests must not hang. A flush taken before the
    /// gate closed may reach its wait only after this call, behind a sync
    /// that was under way (syncs.rs).
    pub fn release_waits(&self) -> ReleaseWaits<'_> {
        self.releasing.fetch_add(1, Ordering::AcqRel);
        self.released.fetch_add(1, Ordering::AcqRel);
        drop(lock(&self.shared));
        self.changed.notify_all();
        ReleaseWaits { link: self }
    }

    /// The link as `status` shows it, against `volume`'s journal.
    pub fn status(&self, volume: &Volume) -> ReplicationStatus {
        let shared = lock(&self.shared);
        let stats = volume.stats();
        let acked = self.acked_lsn();
        let primary = volume.role() == Role::Primary;
        let (lag_records, rpo_seconds) = if primary {
            // A trailing Flush record changes nothing on the disk.
            let newest = volume.last_data_lsn();
            let oldest_missing = (newest > acked)
                .then(|| volume.record_time(acked + 1))
                .flatten();
            let rpo = oldest_missing.map_or(0.0, |ns| {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                now.saturating_sub(ns) as f64 / 1e9
            });
            (newest.saturating_sub(acked), rpo)
        } else {
            (0, 0.0)
        };
        let sent = self.bytes_sent.load(Ordering::Relaxed);
        let raw = self.bytes_raw.load(Ordering::Relaxed);
        ReplicationStatus {
            role: volume.role().to_string(),
            peer: shared.peer.clone(),
            mode: self.mode,
            state: if shared.degraded {
                LinkState::Degraded
            } else {
                shared.state
            },
            acked_lsn: acked,
            lag_records,
            lag_bytes: if primary {
                volume.bytes_between(acked, stats.last_lsn)
            } else {
                0
            },
            rpo_seconds,
            bytes_sent: sent,
            compression_ratio: if sent == 0 {
                1.0
            } else {
                raw as f64 / sent as f64
            },
            resync: shared.resync,
            last_resync: shared.last_resync,
            out_of_sync_bytes: volume.out_of_sync().map_or(0, |map| map.marked_bytes()),
            outdated: shared.outdated.clone(),
            last_error: shared.last_error.clone(),
            detached: self.forwarding.status(),
            serving_detached: self.forwarding.serving(),
        }
    }
}

/// How long `--fence-peer` may run.
const HOOK_LIMIT: Duration = Duration::from_secs(30);

/// Runs the `--fence-peer` hook, if any, for at most [`HOOK_LIMIT`].
fn fence_peer(volume: &str, command: Option<&str>) -> Result<(), String> {
    let Some(command) = command else {
        return Ok(());
    };
    tracing::warn!(
        event = rewind_journal::events::FENCE_PEER_RUN,
        volume,
        command,
        "running --fence-peer before degrading"
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", command])
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let deadline = Instant::now() + HOOK_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{command:?} exited with {status}")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{command:?} did not finish within {HOOK_LIMIT:?}"));
            }
            Err(e) => return Err(format!("waiting for {command:?}: {e}")),
        }
    }
}

/// The tokio runtime replication runs on: two workers are plenty for one
/// link per volume.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("rewind-repl")
        .enable_all()
        .build()
}

/// Sets TCP keepalive and a user timeout, so a dead peer or a cut link is
/// noticed within seconds even while data waits to be acknowledged.
fn tune_socket(stream: &tokio::net::TcpStream) {
    use rustix::net::sockopt;
    let _ = stream.set_nodelay(true);
    let tuned = sockopt::set_socket_keepalive(stream, true)
        .and_then(|()| sockopt::set_tcp_keepidle(stream, Duration::from_secs(2)))
        .and_then(|()| sockopt::set_tcp_keepintvl(stream, Duration::from_secs(1)))
        .and_then(|()| sockopt::set_tcp_keepcnt(stream, 3))
        .and_then(|()| sockopt::set_tcp_user_timeout(stream, 5_000));
    if let Err(e) = tuned {
        tracing::warn!("cannot set TCP keepalive on the replication link: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_while_the_seal_is_made_stands_when_the_offer_is_made() {
        let link = Link::new("test".into(), Some(Mode::Async), None);
        link.prepare_handover();
        link.cancel_handover();
        let seal = Seal { epoch: 3, lsn: 40 };
        link.offer_handover(seal, Duration::from_secs(60));
        let offer = link.handover_offer().expect("an offer");
        assert_eq!(offer.seal, Some(seal));
        assert!(offer.cancelled, "the cancel was kept");
        // The verdict ends the wait; withdrawn, the offer is gone.
        link.handover_verdict(false);
        assert_eq!(link.wait_handover_verdict(Instant::now()), Some(false));
        link.withdraw_handover();
        assert_eq!(link.handover_offer(), None);
    }

    /// Released sync-mode waits fail: those under way, and while the
    /// release lasts those that start (a flush that was behind a sync
    /// under way reaches its wait only then).
    #[test]
    fn sync_waits_fail_while_released() {
        use super::tls::{PeerTrust, TlsSettings};
        let link = Link::new("test".into(), Some(Mode::Sync), None);
        let config = SenderConfig {
            peer: ([127, 0, 0, 1], 9).into(),
            mode: Mode::Sync,
            // A wait not released degrades (succeeds) after this.
            sync_timeout: Duration::from_secs(2),
            on_loss: OnLoss::Degrade,
            fence_peer: None,
            rate: None,
            compress: false,
            tls: TlsSettings {
                cert: "unused".into(),
                key: "unused".into(),
                trust: PeerTrust::Ca("unused".into()),
            },
        };
        std::thread::scope(|s| {
            // Under way when released, or started while the release lasts.
            let first = s.spawn(|| link.wait_replicated(5, &config));
            let released = link.release_waits();
            let later = link.wait_replicated(6, &config).expect_err("released");
            assert!(later.contains("released"), "{later}");
            let first = first.join().expect("first wait").expect_err("released");
            assert!(first.contains("released"), "{first}");
            drop(released);
        });
        assert_eq!(link.releasing.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_forwarded_request_stops_at_its_first_failed_piece() {
        let link = std::sync::Arc::new(Link::new("test".into(), Some(Mode::Async), None));
        let hold = Duration::from_secs(20);
        let detacher = crate::detach::Detacher::new(link.clone(), hold);
        let started = Instant::now();
        let ended = std::thread::scope(|s| {
            let forwarded = s.spawn(|| {
                detacher.forward(ForwardOp::Read {
                    offset: 0,
                    length: 3 * frame::MAX_FORWARD,
                })
            });
            let mut pieces = Vec::new();
            while pieces.len() < 3 {
                pieces.extend(link.forwarding.take_unsent());
                std::thread::sleep(Duration::from_millis(5));
            }
            let first = pieces[0].0;
            assert_eq!(link.forwarding.answered(first, Err("EIO".into())), Ok(()));
            forwarded.join().expect("forwarded")
        });
        let err = ended.expect_err("the first piece failed");
        assert!(err.to_string().contains("EIO"), "{err}");
        assert!(
            started.elapsed() < hold / 2,
            "waited {:?}",
            started.elapsed()
        );
    }
}
