//! Roles at run time (DESIGN.md, "Failover" and "Divergence and rejoin"):
//! promotion, demotion (a seal), failover, an old primary's rejoin, and
//! the operator's resolution of a split brain.
//!
//! The volume says which role this node has (`volume.json`); the gate
//! follows it. A replica's gate is closed (a guest may connect early and
//! waits); a primary's is open, except right after a restart with a peer
//! configured: it stays closed until the peer confirms that no newer
//! primary exists, so an old primary never serves its guest again after a
//! failover it slept through. `rewindctl resume` lifts that hold when the
//! operator knows better (the peer is gone for good).
//!
//! A seal closes the gate (requests in flight finish), makes every record
//! durable, waits until the replica holds them, and demotes: the replica
//! then holds everything this primary ever acknowledged (RPO 0). The
//! gate's admission epoch moves on, so the guest that ran here cannot
//! reattach: a failback needs a fresh VM.

mod handover;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use rewind_journal::{format_ns, EpochStart, Role, Seal, Volume};
use serde::Serialize;

use self::handover::Handover;
pub use self::handover::HandoverStatus;
use crate::export::Export;
use crate::gate::{DeviceWatcher, GateError, State};
use crate::replication::history::{self, relate, Relation};
use crate::replication::tls::TlsContext;
use crate::replication::{self as repl, Link, RoleChanges, SenderConfig};

/// How long a seal asked for by the replica may take.
const PEER_SEAL_LIMIT: Duration = Duration::from_secs(10);

/// Who a seal is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SealFor {
    /// `demote`: refused while a guest is attached.
    Operator,
    /// The replica's failover: the guest is cut off for good.
    Failover,
    /// A handover: the guest, stopped, stays attached for a rollback.
    Handover,
}

/// What starts the sender after a promotion.
#[derive(Debug)]
pub struct SenderStart {
    pub config: SenderConfig,
    pub tls: TlsContext,
    pub runtime: tokio::runtime::Handle,
}

/// What `promote` and `failover` report.
#[derive(Debug, Clone, Serialize)]
pub struct Promoted {
    pub role: Role,
    pub epoch: u64,
    pub first_lsn: u64,
    /// Promoted without a seal: what the old primary wrote after this
    /// node's last record is not here.
    pub forced: bool,
    /// The lsn the old primary sealed at, when it did.
    pub sealed_lsn: Option<u64>,
    /// Now minus the time of the last record this node holds, for a
    /// forced promotion; 0 after a seal.
    pub rpo_seconds: f64,
    /// The time (RFC 3339) of the newest record this node held from the
    /// old primary (the one before `first_lsn`), if any: what it holds
    /// of the old primary's history. A group failover reverts every
    /// member to the earliest of these.
    pub held_through_time: Option<String>,
    /// `failover` only: the time from the command to serving.
    pub took_ms: u64,
    /// `failover` only: this node was the primary already.
    pub already: bool,
}

/// What `demote` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Demoted {
    pub role: Role,
    pub epoch: u64,
    pub sealed_lsn: u64,
    /// The replica confirmed it holds every record up to `sealed_lsn`.
    pub replica_acked: bool,
}

/// The role changes of one daemon's volume.
#[derive(Debug)]
pub struct Roles {
    volume: Arc<Volume>,
    live: Arc<Export>,
    link: Option<Arc<Link>>,
    sender: Option<SenderStart>,
    /// A restarted primary waits for its peer's confirmation.
    awaiting_peer: AtomicBool,
    /// One role change at a time.
    changing: Mutex<()>,
    handover: Mutex<Handover>,
    /// Signalled when the handover changes or the guest's device starts.
    handover_changed: Condvar,
    /// This, for the threads a device event starts.
    me: OnceLock<Weak<Roles>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Roles {
    /// Sets the gate for the volume's role and starts shipping if it is
    /// the primary and has a peer.
    pub fn start(
        volume: Arc<Volume>,
        live: Arc<Export>,
        link: Option<Arc<Link>>,
        sender: Option<SenderStart>,
    ) -> Arc<Roles> {
        let roles = Arc::new(Roles {
            volume,
            live,
            link,
            sender,
            awaiting_peer: AtomicBool::new(false),
            changing: Mutex::new(()),
            handover: Mutex::new(Handover::default()),
            handover_changed: Condvar::new(),
            me: OnceLock::new(),
        });
        let _ = roles.me.set(Arc::downgrade(&roles));
        let watcher = Arc::downgrade(&roles);
        roles
            .live
            .gate
            .watch_device(watcher as Weak<dyn DeviceWatcher>);
        if let Some(link) = &roles.link {
            let weak = Arc::downgrade(&roles);
            link.set_roles(weak as std::sync::Weak<dyn RoleChanges>);
        }
        match roles.volume.role() {
            Role::Replica => {
                // A replica serves no guest until it is promoted: a client
                // may connect (a migration destination, early) and waits.
                let _ = roles.live.gate.drain(Duration::ZERO, || ());
                // A node that sealed tells its peer again after a restart:
                // the peer may not have heard it.
                let v = &roles.volume;
                if v.sealed().is_some_and(|s| s.epoch == v.epoch()) {
                    roles.start_sender();
                }
            }
            Role::Primary if roles.sender.is_some() => {
                roles.awaiting_peer.store(true, Ordering::Release);
                let _ = roles.live.gate.drain(Duration::ZERO, || ());
                tracing::info!(
                    "the guest waits until the replica confirms that this node is still the \
                     primary (`rewindctl resume` serves it at once)"
                );
                roles.start_sender();
            }
            Role::Primary => {}
        }
        roles
    }

    /// Why the gate is held closed, if it is for the peer.
    pub fn hold(&self) -> Option<&'static str> {
        self.awaiting_peer
            .load(Ordering::Acquire)
            .then_some("waiting for the replica to confirm this node is still the primary")
    }

    /// The operator opened the gate: no hold any more.
    pub fn clear_hold(&self) {
        self.awaiting_peer.store(false, Ordering::Release);
    }

    fn start_sender(&self) {
        let (Some(start), Some(link)) = (&self.sender, &self.link) else {
            return;
        };
        // A sender that is still running goes on (it ends only once this
        // node ships no more, decided under the same lock).
        if !link.claim_sender() {
            return;
        }
        if self.volume.role() == Role::Primary {
            // Until the replica says what it holds, fold nothing it may lack.
            self.volume
                .hold_for_replica(Some(self.volume.stats().base_lsn));
        }
        drop(start.runtime.spawn(repl::sender::run(
            self.volume.clone(),
            link.clone(),
            start.config.clone(),
            start.tls.clone(),
        )));
        tracing::info!(peer = %start.config.peer, mode = ?start.config.mode, "replicating");
    }

    /// The seal this replica holds, if any: the primary sealed the current
    /// epoch at an lsn this node has.
    fn held_seal(&self) -> Option<Seal> {
        let v = &self.volume;
        v.sealed()
            .filter(|s| s.epoch == v.epoch() && v.last_lsn() >= s.lsn)
    }

    /// The time of record `lsn` (RFC 3339), if the journal holds it.
    fn time_of(&self, lsn: u64) -> Option<String> {
        (lsn > 0)
            .then(|| self.volume.record_time(lsn))
            .flatten()
            .map(format_ns)
    }

    fn open_gate(&self) {
        let gate = &self.live.gate;
        let opened = match gate.state() {
            State::Fenced => gate.unfence(),
            _ => gate.resume(),
        };
        if let Err(e) = opened {
            tracing::warn!(
                event = rewind_journal::events::GATE_FAILED,
                volume = %self.volume.config().uuid,
                "promoted, but the gate did not open: {e}"
            );
        }
    }

    /// Closes the gate for good: requests in flight finish or fail, the
    /// guest is disconnected and cannot reattach.
    /// An error if requests still ran when it gave up waiting: they may
    /// yet write, so the journal must not be cut under them.
    fn close_for_good(&self) -> Result<(), GateError> {
        let gate = &self.live.gate;
        let closed = gate.fence(PEER_SEAL_LIMIT, || {
            let released = self.link.as_ref().map(|link| link.release_waits());
            (released, self.volume.release_held())
        });
        if let Err(e) = &closed {
            tracing::error!(
                event = rewind_journal::events::GATE_FAILED,
                volume = %self.volume.config().uuid,
                "closing the gate: {e}"
            );
        }
        gate.set_epoch(gate.epoch() + 1);
        self.live.disconnect();
        closed
    }

    /// Why a promotion without a seal needs --force.
    fn unsealed(&self) -> String {
        let v = &self.volume;
        let last = v.last_lsn();
        let age = v
            .record_time(last)
            .map(|ns| {
                format!(
                    ", written {:.1} s ago",
                    now_ns().saturating_sub(ns) as f64 / 1e9
                )
            })
            .unwrap_or_default();
        let link = self.link.as_ref().map_or_else(String::new, |link| {
            let status = link.status(v);
            format!(
                " (replication {}{})",
                status.state.name(),
                status
                    .last_error
                    .map_or_else(String::new, |e| format!(": {e}"))
            )
        });
        format!(
            "the old primary did not seal this replica{link}: it holds lsn {last}{age}, and \
             whatever the primary wrote after that would be lost. Fail over while the old \
             primary answers, or, once its VM is fenced (stopped, or its host powered off), \
             pass --force"
        )
    }

    /// A handover from the detached primary this node serves: its guest
    /// runs here now. No more forwarded requests are taken; the gate
    /// opens, and the sender starts (the old primary rejoins once its
    /// storage is repaired).
    fn adopt_detached_guest(&self, link: &Link) -> Promoted {
        link.stop_serving_detached();
        self.open_gate();
        self.start_sender();
        self.already_primary(Duration::ZERO)
    }

    /// What a promotion of a node that is the primary already reports.
    fn already_primary(&self, took: Duration) -> Promoted {
        let v = &self.volume;
        let first_lsn = v.epoch_history().last().map_or(1, |start| start.first_lsn);
        Promoted {
            role: Role::Primary,
            epoch: v.epoch(),
            first_lsn,
            forced: false,
            sealed_lsn: None,
            rpo_seconds: 0.0,
            held_through_time: self.time_of(first_lsn.saturating_sub(1)),
            took_ms: took.as_millis() as u64,
            already: true,
        }
    }

    /// Makes this replica the primary. Without `force` it must hold its
    /// old primary's seal.
    pub fn promote(&self, force: bool, drained: bool) -> Result<Promoted, String> {
        let _one = lock(&self.changing);
        self.promote_locked(force, drained)
    }

    fn promote_locked(&self, force: bool, drained: bool) -> Result<Promoted, String> {
        self.promote_with(force, drained, true)
    }

    /// `end_session`: end the old primary's session now. A handover keeps
    /// it to send its verdict; the next frame on it is refused.
    fn promote_with(
        &self,
        force: bool,
        drained: bool,
        end_session: bool,
    ) -> Result<Promoted, String> {
        let v = &self.volume;
        if v.role() == Role::Primary {
            return Err(format!(
                "this volume is already the primary (epoch {}); promote applies to a replica",
                v.epoch()
            ));
        }
        let sealed = self.held_seal();
        if sealed.is_none() && !force {
            return Err(self.unsealed());
        }
        if let Some(link) = &self.link {
            // Nothing more is taken from the old primary, and a handover
            // this node offered is off.
            if end_session {
                link.end_receiving();
            }
            link.withdraw_handover();
        }
        let rpo_seconds = match sealed {
            Some(_) => 0.0,
            None => v
                .record_time(v.last_lsn())
                .map_or(0.0, |ns| now_ns().saturating_sub(ns) as f64 / 1e9),
        };
        let start = v
            .promote()
            .map_err(|e| format!("raising the epoch failed: {e}"))?;
        if let (Some(link), Some(sender)) = (&self.link, &self.sender) {
            link.set_seal_delivered(false);
            if sealed.is_none() {
                link.degrade_for_forced_promotion(&sender.config);
            }
        }
        if !drained {
            self.open_gate();
        }
        self.start_sender();
        tracing::warn!(
            event = rewind_journal::events::PROMOTED,
            volume = %self.volume.config().uuid,
            epoch = start.epoch,
            first_lsn = start.first_lsn,
            forced = sealed.is_none(),
            rpo_seconds,
            "this node is the primary"
        );
        Ok(Promoted {
            role: Role::Primary,
            epoch: start.epoch,
            first_lsn: start.first_lsn,
            forced: sealed.is_none(),
            sealed_lsn: sealed.map(|s| s.lsn),
            rpo_seconds,
            held_through_time: self.time_of(start.first_lsn - 1),
            took_ms: 0,
            already: false,
        })
    }

    /// Seals the old primary over the link if it answers, then promotes
    /// this replica; without a seal only with `force`.
    pub fn failover(
        &self,
        force: bool,
        timeout: Duration,
        drained: bool,
    ) -> Result<Promoted, String> {
        let started = Instant::now();
        let _one = lock(&self.changing);
        let v = &self.volume;
        if v.role() == Role::Primary {
            return Ok(self.already_primary(started.elapsed()));
        }
        if self.held_seal().is_none() {
            // A primary that is up reconnects within its backoff (this
            // daemon may have just restarted): wait for it, then ask.
            // --force says it is fenced: ask only if it is connected.
            // The timeout counts from the request: the wait for another
            // role change above spent part of it.
            let deadline = started + timeout;
            let wait = if force {
                Duration::ZERO
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            if let Some(link) = self.link.as_ref().filter(|link| link.wait_receiving(wait)) {
                tracing::info!("failover: asking the primary to seal");
                let left = deadline.saturating_duration_since(Instant::now());
                if link.request_seal(v, left).is_none() {
                    tracing::warn!(
                        event = rewind_journal::events::SEAL_TIMEOUT,
                        volume = %self.volume.config().uuid,
                        "failover: the primary did not seal within {timeout:?}"
                    );
                }
            }
        }
        let mut promoted = self.promote_locked(force, drained)?;
        promoted.took_ms = started.elapsed().as_millis() as u64;
        Ok(promoted)
    }

    /// Seals this primary: closes the gate, makes every record durable,
    /// waits up to `timeout` for the replica to hold them, and demotes.
    /// The operator's `demote` refuses while a guest is attached; a seal
    /// the replica asked for (a failover) takes the gate from under it.
    fn seal(&self, timeout: Duration, why: SealFor) -> Result<Demoted, String> {
        let _one = lock(&self.changing);
        self.seal_locked(timeout, why)
    }

    fn seal_locked(&self, timeout: Duration, why: SealFor) -> Result<Demoted, String> {
        let for_peer = why != SealFor::Operator;
        let v = &self.volume;
        if v.role() == Role::Replica {
            return match v.sealed().filter(|s| s.epoch == v.epoch()) {
                Some(seal) if for_peer => Ok(self.demoted(seal)),
                _ => Err("this volume is a replica already".into()),
            };
        }
        if !for_peer {
            if let Some(client) = self.live.attached() {
                return Err(format!(
                    "a guest is attached ({}); shut the VM down first, or fail over from the \
                     replica (that seals with the guest attached)",
                    client
                        .attach_id
                        .map_or_else(|| "unidentified".into(), |id| format!("attach id {id}"))
                ));
            }
        }
        let gate = &self.live.gate;
        match gate.drain(timeout, || ()) {
            Ok(_) | Err(GateError::Fenced) => {}
            Err(e) => return Err(format!("cannot close the gate: {e}")),
        }
        let reopen = |why: String| {
            let _ = gate.resume();
            Err(why)
        };
        let lsn = match v.sync_all() {
            Ok(lsn) => lsn,
            Err(e) => return reopen(format!("flushing the journal failed: {e}")),
        };
        let acked = match (&self.link, &self.sender) {
            (Some(link), Some(_)) => link.wait_acked(lsn, timeout),
            _ => false,
        };
        if for_peer && !acked {
            return reopen(format!(
                "the replica did not confirm lsn {lsn} within {timeout:?}; this primary serves on"
            ));
        }
        let seal = match v.demote(true) {
            Ok(Some(seal)) => seal,
            Ok(None) => return reopen("the demotion recorded no seal".into()),
            Err(e) => return reopen(format!("demoting failed: {e}")),
        };
        self.awaiting_peer.store(false, Ordering::Release);
        if why != SealFor::Handover {
            // The guest that ran here cannot come back (a failback needs a
            // fresh VM). A handover keeps it, parked, for a rollback.
            gate.set_epoch(gate.epoch() + 1);
            self.live.disconnect();
        }
        if let Some(link) = &self.link {
            // The sender tells the replica of the seal (now, or once it is
            // back), then ends.
            link.set_seal_delivered(false);
            link.notify_durable();
        }
        tracing::warn!(
            event = rewind_journal::events::DEMOTED,
            volume = %self.volume.config().uuid,
            lsn = seal.lsn,
            epoch = seal.epoch,
            acked,
            "sealed: this node is a replica"
        );
        Ok(Demoted {
            replica_acked: acked,
            ..self.demoted(seal)
        })
    }

    fn demoted(&self, seal: Seal) -> Demoted {
        Demoted {
            role: Role::Replica,
            epoch: seal.epoch,
            sealed_lsn: seal.lsn,
            replica_acked: self
                .link
                .as_ref()
                .is_some_and(|link| link.acked_lsn() >= seal.lsn),
        }
    }

    /// The operator's `demote`.
    pub fn demote(&self, timeout: Duration) -> Result<Demoted, String> {
        self.seal(timeout, SealFor::Operator)
    }

    /// Moves what this node holds after `common` out of the way of the
    /// newer primary's records (which take the same lsns).
    /// They become a read-only branch named after their epoch and first
    /// lsn, so a rerun after a crash names the same one.
    fn cut_after(&self, common: u64) -> Result<Option<String>, String> {
        let v = &self.volume;
        if v.last_lsn() <= common {
            return Ok(None);
        }
        let name = format!("e{}-{}", v.epoch(), common + 1);
        match v.cut_to_branch(common, &name) {
            Ok(Some(branch)) => {
                tracing::warn!(
                    event = rewind_journal::events::BRANCH_KEPT,
                    volume = %self.volume.config().uuid,
                    branch = %branch.name,
                    first_lsn = branch.first_lsn,
                    last_lsn = branch.last_lsn,
                    records = branch.records,
                    "the records the newer primary never had are kept as a branch"
                );
                Ok(Some(branch.name))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!(
                "keeping lsns {}.. as branch {name} failed: {e}",
                common + 1
            )),
        }
    }

    /// The operator's `resolve --discard-this-side`: this side's writes
    /// since the histories split become a branch, and it becomes a
    /// replica of the other side.
    pub fn resolve(&self) -> Result<Option<String>, String> {
        let _one = lock(&self.changing);
        let Some(peer) = self.link.as_ref().and_then(|link| link.peer_history()) else {
            return Err("no peer has connected yet: there is nothing to resolve against".into());
        };
        let common = match relate(&self.volume.epoch_history(), &peer) {
            Relation::Diverged { common } | Relation::Behind { common } => common,
            Relation::Ahead { .. } | Relation::Same => {
                return Err(format!(
                    "this node's history ({:?}) does not diverge from the peer's ({peer:?}): \
                     there is no split brain to resolve",
                    self.volume.epoch_history()
                ))
            }
            Relation::Unrelated => {
                return Err(history::unrelated(&self.volume.epoch_history(), &peer))
            }
        };
        self.leave_for(common)
    }

    /// Stops serving for good, cuts after `common`, becomes a replica.
    fn leave_for(&self, common: u64) -> Result<Option<String>, String> {
        let v = &self.volume;
        if v.role() == Role::Primary {
            // A request still running would append after the cut: a
            // record of this side's among the newer primary's. Another
            // rejoin (the peer reconnects) waits for it again.
            if let Err(e) = self.close_for_good() {
                return Err(not_cut(&e));
            }
        }
        // Until the demotion the gate stays fenced: a failed cut leaves a
        // superseded primary that `resume` cannot open.
        let branch = self.cut_after(common)?;
        if v.role() == Role::Primary {
            v.demote(false)
                .map_err(|e| format!("demoting failed: {e}"))?;
        }
        // Closed as a replica's: a new guest may connect and wait.
        self.live.gate.fenced_to_drained();
        self.awaiting_peer.store(false, Ordering::Release);
        if let Some(link) = &self.link {
            link.notify_durable();
        }
        Ok(branch)
    }
}

/// Why a rejoin cut nothing. Not the fence command's advice (fence again):
/// here that would raise an epoch, a split brain with the newer primary.
fn not_cut(e: &GateError) -> String {
    match e {
        GateError::FenceTimeout { timeout, in_flight } => format!(
            "{in_flight} guest request(s) still ran {timeout:?} after the gate closed, so the \
             journal is not cut: one could append after the cut. The gate stays closed; the \
             next rejoin (the newer primary reconnects, or `resolve` again) waits for them again"
        ),
        e => format!("the gate did not close, so the journal is not cut: {e}"),
    }
}

impl RoleChanges for Roles {
    fn seal_for_peer(&self) -> Result<Seal, String> {
        self.seal(PEER_SEAL_LIMIT, SealFor::Failover).map(|d| Seal {
            epoch: d.epoch,
            lsn: d.sealed_lsn,
        })
    }

    fn rejoin(&self, newer: &[EpochStart]) -> Result<(), String> {
        let _one = lock(&self.changing);
        let mine = self.volume.epoch_history();
        match relate(&mine, newer) {
            Relation::Behind { common } => {
                let branch = self.leave_for(common)?;
                tracing::warn!(
                    event = rewind_journal::events::REJOINED,
                    volume = %self.volume.config().uuid,
                    common,
                    ?branch,
                    "a newer primary exists: this node is its replica from lsn {}",
                    common + 1
                );
                Ok(())
            }
            Relation::Same if self.volume.role() == Role::Replica => Ok(()),
            Relation::Ahead { .. } => Err(format!(
                "the peer's history ({newer:?}) is older than this node's ({mine:?})"
            )),
            Relation::Same | Relation::Diverged { .. } => Err(format!(
                "split brain: this node ({mine:?}) and the peer ({newer:?}) were both promoted; \
                 run `rewindctl resolve --discard-this-side` on the one whose writes to give up"
            )),
            Relation::Unrelated => Err(history::unrelated(&mine, newer)),
        }
    }

    fn take_over(&self, seal: Seal, timeout: Duration) -> bool {
        self.take_over_for(seal, timeout)
    }

    fn cancel_take_over(&self) {
        self.cancel_take_over_now();
    }

    fn take_over_detached(&self, reason: &str) -> Result<(u64, u64), String> {
        let _one = lock(&self.changing);
        let v = &self.volume;
        if v.role() == Role::Primary {
            return Err(format!(
                "this node is the primary already (epoch {})",
                v.epoch()
            ));
        }
        if let Some(link) = &self.link {
            link.withdraw_handover();
        }
        let start = v
            .promote()
            .map_err(|e| format!("raising the epoch failed: {e}"))?;
        // The gate stays closed: the guest stays where it is and its
        // requests come over the link. No sender either: the only peer is
        // the detached primary, which rejoins once its guest has moved.
        tracing::error!(
            event = rewind_journal::events::PEER_DETACHED,
            volume = %self.volume.config().uuid,
            epoch = start.epoch,
            first_lsn = start.first_lsn,
            "this node is the primary, serving its detached peer's guest ({reason})"
        );
        Ok((start.epoch, start.first_lsn - 1))
    }

    fn confirmed(&self) {
        if self.awaiting_peer.swap(false, Ordering::AcqRel)
            && self.live.gate.state() == State::Drained
        {
            tracing::info!("the replica confirmed this node's epoch: serving the guest");
            let _ = self.live.gate.resume();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ExportConfig;
    use crate::gate::tests::wait_for_state;
    use crate::gate::Gate;

    /// A primary whose journal holds lsns 1..=5, serving at epoch 1.
    fn primary_of_five_records() -> (Arc<Volume>, Arc<Gate>, Arc<Roles>) {
        let volume = Arc::new(crate::test_support::volume(1 << 20));
        for block in 0..5u64 {
            volume.write(block * 4096, &[1; 4096]).expect("write");
        }
        let gate = Arc::new(Gate::new(1));
        let config = ExportConfig {
            num_queues: 1,
            queue_size: 16,
            read_only: false,
        };
        let live = Arc::new(Export::new(volume.clone(), config, gate.clone()));
        let roles = Roles::start(volume.clone(), live, None, None);
        (volume, gate, roles)
    }

    /// The history of a newer primary whose epoch 2 began at lsn 3: a
    /// rejoin to it cuts `volume`'s records after lsn 2.
    fn newer_primary_from_lsn_3(volume: &Volume) -> Vec<EpochStart> {
        let mut newer = volume.epoch_history();
        newer.push(EpochStart {
            epoch: 2,
            first_lsn: 3,
            node: 7,
        });
        newer
    }

    /// A rejoin cuts this side's records past the common point; a guest
    /// request still running then (a storage call that hangs) could write
    /// one after the cut, among the newer primary's. Refused until the
    /// requests end, and done once they have.
    #[test]
    fn a_rejoin_cuts_nothing_while_a_guest_request_still_runs() {
        let (volume, gate, roles) = primary_of_five_records();
        let running = gate.enter(1).expect("serving");
        let newer = newer_primary_from_lsn_3(&volume);

        let refused = roles.rejoin(&newer).expect_err("a request runs");
        assert!(refused.contains("not cut"), "{refused}");
        // Not the fence command's advice: a fence here would raise an
        // epoch, a split brain with the newer primary.
        assert!(!refused.contains("rewindctl fence"), "{refused}");
        assert_eq!(volume.last_lsn(), 5, "nothing cut");
        assert_eq!(volume.role(), Role::Primary);

        drop(running);
        roles.rejoin(&newer).expect("rejoined");
        assert_eq!(volume.role(), Role::Replica);
        assert_eq!(volume.last_lsn(), 2, "cut after the common point");
    }

    /// A drain under way when a rejoin comes (the operator's, or a
    /// scheduled bookmark's) is taken over by the rejoin's fence: the drain
    /// ends fenced instead of opening the gate again (on its timeout, or
    /// resumed by whoever started it) on a primary that a newer one
    /// superseded.
    #[test]
    fn a_rejoin_during_a_drain_takes_it_over() {
        let (volume, gate, roles) = primary_of_five_records();
        let running = gate.enter(1).expect("serving");
        let drainer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.drain(Duration::from_secs(60), || ()))
        };
        wait_for_state(&gate, State::Draining);
        let newer = newer_primary_from_lsn_3(&volume);
        let rejoin = {
            let roles = roles.clone();
            std::thread::spawn(move || roles.rejoin(&newer))
        };
        wait_for_state(&gate, State::Fenced);
        drop(running);
        rejoin.join().expect("rejoin").expect("rejoined");
        assert_eq!(
            drainer.join().expect("drainer"),
            Err(crate::gate::GateError::Fenced)
        );
        assert_eq!(volume.role(), Role::Replica);
        assert_eq!(volume.last_lsn(), 2, "cut after the common point");
        assert!(gate.enter(gate.epoch()).is_none(), "no client is served");
    }

    /// A rejoin whose cut fails (here the branch name is taken; a full
    /// disk does the same) leaves a superseded primary whose gate stays
    /// fenced: the operator's `rewindctl resume` (not refused on a
    /// primary) or a scheduled bookmark's resume must not open it to a
    /// guest that reattaches.
    #[test]
    fn a_rejoin_whose_cut_failed_leaves_no_gate_a_resume_opens() {
        let (volume, gate, roles) = primary_of_five_records();
        // Branch e1-3 already exists: the rejoin's cut will be refused.
        volume
            .cut_to_branch(4, "e1-3")
            .expect("cut")
            .expect("a branch");
        volume.write(4 * 4096, &[2; 4096]).expect("write");
        assert_eq!(volume.last_lsn(), 5);
        let newer = newer_primary_from_lsn_3(&volume);
        let refused = roles.rejoin(&newer).expect_err("the cut fails");
        assert!(refused.contains("e1-3"), "{refused}");
        assert_eq!(volume.role(), Role::Primary, "not demoted");
        // What `rewindctl resume` does on a primary (control.rs).
        let resumed = gate.resume();
        assert!(
            resumed.is_err() && gate.enter(gate.epoch()).is_none(),
            "a superseded primary serves again: resume gave {resumed:?}, state {:?}",
            gate.state()
        );
    }
}
