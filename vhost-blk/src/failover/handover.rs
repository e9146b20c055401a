//! Handover (DESIGN.md, "Handover (live migration) and storage-failure
//! evacuation"): the primary role moves with a live migration.
//!
//! On the source (the primary), `arm` waits until the replica holds every
//! record, then watches the guest's device. When QEMU stops every queue
//! (GET_VRING_BASE: the switchover of a live migration) the source seals
//! as for a failover, but keeps its guest attached and parked, and offers
//! the replica the handover. The replica takes over (is promoted) as soon
//! as a client starts its device on its socket (the migration's
//! destination, parked at its closed gate), or lets the offer go when none
//! starts within the timeout or the source calls it off; it answers with a
//! verdict. On `promoted` the source is done and cuts its guest off; on
//! `not promoted` it promotes itself again and its parked guest goes on.
//!
//! A primary that detached from its failed storage (detach.rs) hands over
//! the same way, without a seal: its peer is the primary already and
//! serves the forwarded requests. The source parks its guest and offers;
//! the peer, on its client's start, stops taking forwarded requests and
//! opens its own gate; on a rollback the source forwards again.
//!
//! The replica decides alone, once: a start and a cancel that race are
//! settled under its lock, and the verdict it sent is the truth. If the
//! verdict is lost with the link, the source asks again on the next
//! session (the replica answers the same), or learns it from the newer
//! epoch the replica shows when it took over.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rewind_journal::{format_ns, Role, Seal};
use serde::Serialize;

use super::{lock, Roles, SealFor};
use crate::gate::DeviceWatcher;
use crate::replication::LinkState;

/// How long the source waits for a verdict past the replica's deadline
/// before it says so in status (it keeps waiting).
const VERDICT_GRACE: Duration = Duration::from_secs(5);

/// Where a handover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The source waits for its guest's device to stop.
    Armed,
    /// Source: sealed, waiting for the replica's verdict. Replica: waiting
    /// for a client to start here.
    Switching,
    /// The replica took over.
    Done,
    /// The source serves again (no destination started, or the source's
    /// guest started again first, or the seal failed).
    RolledBack,
    /// Disarmed before the switch.
    Cancelled,
}

/// Which end of the handover this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Source,
    Destination,
}

/// What `status` and `handover` show.
#[derive(Debug, Clone, Serialize)]
pub struct HandoverStatus {
    pub state: Phase,
    pub side: Side,
    /// How long the destination may take to start once the source stopped.
    pub timeout_ms: u64,
    /// When it was armed (source) or offered (replica), RFC 3339.
    pub since: String,
    /// The lsn the source sealed at.
    pub sealed_lsn: Option<u64>,
    /// Source: from its guest's device stopping to the seal the replica
    /// holds. Replica: from the offer to its promotion.
    pub seal_ms: Option<f64>,
    /// Source: from its guest's device stopping to the replica's verdict.
    pub switch_ms: Option<f64>,
    /// Replica: from its client's device start to its promotion, which
    /// served it: what the handover added to the migration's downtime.
    pub start_to_serve_ms: Option<f64>,
    /// Why it rolled back or was cancelled, or what it waits for.
    pub reason: Option<String>,
}

/// The handover state of one daemon.
#[derive(Debug, Default)]
pub struct Handover {
    status: Option<HandoverStatus>,
    /// Source: when its guest's device stopped.
    stopped: Option<Instant>,
    /// Replica: the offer it waits on, until decided.
    offer: Option<Seal>,
    cancelled: bool,
    /// Replica: the verdict on `offer`, once decided.
    verdict: Option<bool>,
}

fn now_rfc3339() -> String {
    let ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format_ns(ns)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Roles {
    /// What status shows of the last handover, if any.
    pub fn handover_status(&self) -> Option<HandoverStatus> {
        lock(&self.handover).status.clone()
    }

    fn set_handover(&self, change: impl FnOnce(&mut Handover)) {
        change(&mut lock(&self.handover));
        self.handover_changed.notify_all();
    }

    /// `rewindctl handover`: arms a switch to the replica at the next stop
    /// of the guest's device. In async mode it first waits up to `timeout`
    /// for the replica to hold every record.
    pub fn arm_handover(&self, timeout: Duration) -> Result<HandoverStatus, String> {
        let _one = lock(&self.changing);
        if let Some(s) = self.handover_status() {
            if matches!(s.state, Phase::Armed | Phase::Switching) {
                return Err(format!(
                    "a handover is {} already; `handover --cancel` calls it off",
                    serde_json::to_value(s.state).map_or_else(|_| "on".into(), |v| v.to_string())
                ));
            }
        }
        let v = &self.volume;
        if v.role() != Role::Primary {
            return Err("this volume is a replica: a handover is armed on the primary".into());
        }
        if let Some(hold) = self.hold() {
            return Err(format!(
                "the gate is held ({hold}): nothing runs to hand over"
            ));
        }
        let (Some(link), Some(_)) = (&self.link, &self.sender) else {
            return Err(
                "no replica is configured (--replicate-to): there is nothing to hand over to"
                    .into(),
            );
        };
        if self.live.attached().is_none() {
            return Err(
                "no guest is attached: nothing to hand over (`demote` seals an idle primary)"
                    .into(),
            );
        }
        let state = link.status(v).state;
        if !matches!(state, LinkState::Streaming | LinkState::Syncing) {
            return Err(format!(
                "the replica is not connected and in sync (replication is {}); a handover needs it",
                state.name()
            ));
        }
        let lsn = v.durable_lsn();
        // A detached primary's peer holds the disk already.
        if !link.detached() && !link.wait_acked(lsn, timeout) {
            return Err(format!(
                "the replica did not catch up to lsn {lsn} within {timeout:?} (it holds {}); \
                 try again with a longer --timeout",
                link.acked_lsn()
            ));
        }
        let status = HandoverStatus {
            state: Phase::Armed,
            side: Side::Source,
            timeout_ms: timeout.as_millis() as u64,
            since: now_rfc3339(),
            sealed_lsn: None,
            seal_ms: None,
            switch_ms: None,
            start_to_serve_ms: None,
            reason: Some(
                "waiting for the guest's device to stop (a live migration's switchover)".into(),
            ),
        };
        self.set_handover(|h| {
            *h = Handover {
                status: Some(status.clone()),
                ..Handover::default()
            }
        });
        tracing::info!(
            ?timeout,
            "handover armed: the switch happens when the guest's device stops"
        );
        Ok(status)
    }

    /// `rewindctl handover --cancel`: disarms, or calls a switch off (the
    /// replica still decides: it may have taken over first).
    pub fn cancel_handover(&self) -> Result<HandoverStatus, String> {
        let mut h = lock(&self.handover);
        let Some(status) = h.status.as_mut() else {
            return Err("no handover is armed".into());
        };
        match (status.state, status.side) {
            (Phase::Armed, _) => {
                status.state = Phase::Cancelled;
                status.reason = Some("cancelled by the operator".into());
            }
            (Phase::Switching, Side::Source) => {
                status.reason =
                    Some("called off by the operator; waiting for the replica's verdict".into());
                h.cancelled = true;
                if let Some(link) = &self.link {
                    link.cancel_handover();
                }
            }
            (state, _) => {
                return Err(format!(
                    "the handover is over ({}); there is nothing to cancel",
                    serde_json::to_value(state).map_or_else(|_| "done".into(), |v| v.to_string())
                ))
            }
        }
        let status = h.status.clone();
        drop(h);
        self.handover_changed.notify_all();
        status.ok_or_else(|| "no handover is armed".into())
    }

    /// The source's switch, once its guest's device stopped: seal, offer,
    /// wait for the verdict, finish or roll back.
    fn switch(self: Arc<Self>) {
        let (Some(link), Some(stopped)) = (self.link.clone(), lock(&self.handover).stopped) else {
            return;
        };
        let timeout = self
            .handover_status()
            .map_or(Duration::ZERO, |s| Duration::from_millis(s.timeout_ms));
        let detached = link.detached();
        let sealed = {
            let _one = lock(&self.changing);
            link.prepare_handover();
            if detached {
                self.park_detached(&link, timeout.max(super::PEER_SEAL_LIMIT))
            } else {
                self.seal_locked(timeout.max(super::PEER_SEAL_LIMIT), SealFor::Handover)
                    .map(|d| Seal {
                        epoch: d.epoch,
                        lsn: d.sealed_lsn,
                    })
            }
        };
        let seal = match sealed {
            Ok(seal) => seal,
            Err(why) => {
                link.withdraw_handover();
                tracing::error!(
                    event = rewind_journal::events::HANDOVER_ROLLED_BACK,
                    volume = %self.volume.config().uuid,
                    "handover: the seal failed, this node serves on: {why}"
                );
                return self.finish(Phase::RolledBack, Some(format!("the seal failed: {why}")));
            }
        };
        link.offer_handover(seal, timeout);
        let seal_ms = ms(stopped.elapsed());
        self.set_handover(|h| {
            if let Some(s) = h.status.as_mut() {
                s.sealed_lsn = (!detached).then_some(seal.lsn);
                s.seal_ms = Some(seal_ms);
                s.reason = Some("sealed; waiting for the replica's verdict".into());
            }
        });
        tracing::info!(
            lsn = seal.lsn,
            seal_ms,
            "handover: sealed, offered to the replica"
        );
        let mut deadline = Instant::now() + timeout + VERDICT_GRACE;
        let verdict = loop {
            if let Some(verdict) = link.wait_handover_verdict(deadline) {
                break verdict;
            }
            if link.handover_offer().is_none() || (!detached && self.volume.role() == Role::Primary)
            {
                // The operator promoted this node meanwhile.
                return self.finish(Phase::RolledBack, Some("promoted by the operator".into()));
            }
            self.set_handover(|h| {
                if let Some(s) = h.status.as_mut() {
                    s.reason = Some(
                        "the replica has not answered; it decides when it is back. If it is \
                         gone for good, `rewindctl promote` here serves the guest again"
                            .into(),
                    );
                }
            });
            tracing::warn!(
                event = rewind_journal::events::HANDOVER_NO_VERDICT,
                volume = %self.volume.config().uuid,
                "handover: no verdict from the replica yet"
            );
            deadline = Instant::now() + VERDICT_GRACE;
        };
        let switch_ms = ms(stopped.elapsed());
        let _one = lock(&self.changing);
        link.withdraw_handover();
        self.set_handover(|h| {
            if let Some(s) = h.status.as_mut() {
                s.switch_ms = Some(switch_ms);
            }
        });
        if verdict {
            // The guest runs on the replica's host now: this one is cut off.
            let gate = &self.live.gate;
            gate.set_epoch(gate.epoch() + 1);
            self.live.disconnect();
            tracing::warn!(
                event = rewind_journal::events::HANDOVER_DONE,
                volume = %self.volume.config().uuid,
                switch_ms,
                "handover done: the replica is the primary"
            );
            return self.finish(Phase::Done, None);
        }
        let why = match lock(&self.handover).cancelled {
            true => "called off (the guest started here again, or the operator cancelled)",
            false => "no destination started its device on the replica in time",
        };
        if detached {
            // The peer serves on; so does this node's guest, through it.
            if let Err(e) = self.live.gate.resume() {
                tracing::error!(
                    event = rewind_journal::events::HANDOVER_ROLLBACK_FAILED,
                    volume = %self.volume.config().uuid,
                    "handover rolled back ({why}), but the gate did not open: {e}"
                );
            }
            tracing::warn!(
                event = rewind_journal::events::HANDOVER_ROLLED_BACK,
                volume = %self.volume.config().uuid,
                "handover rolled back: {why}; forwarding again"
            );
            return self.finish(Phase::RolledBack, Some(why.into()));
        }
        match self.promote_locked(false, false) {
            Ok(p) => {
                tracing::warn!(
                    event = rewind_journal::events::HANDOVER_ROLLED_BACK,
                    volume = %self.volume.config().uuid,
                    epoch = p.epoch,
                    "handover rolled back: {why}; serving again"
                );
                self.finish(Phase::RolledBack, Some(why.into()));
            }
            Err(e) => {
                tracing::error!(
                    event = rewind_journal::events::HANDOVER_ROLLBACK_FAILED,
                    volume = %self.volume.config().uuid,
                    "handover rolled back ({why}), but promoting again failed: {e}"
                );
                self.finish(
                    Phase::RolledBack,
                    Some(format!("{why}; promoting again failed: {e}")),
                );
            }
        }
    }

    /// A detached source's switch: its guest's requests finish (through
    /// the peer) and no more are taken. There is nothing to seal: the
    /// offer names the peer's epoch and, in place of an lsn, the time (ns)
    /// of this attempt, so that an offer after a rollback is a new one.
    fn park_detached(
        &self,
        link: &crate::replication::Link,
        timeout: Duration,
    ) -> Result<Seal, String> {
        if let Err(e) = self.live.gate.drain(timeout, || ()) {
            return Err(format!("cannot close the gate: {e}"));
        }
        let epoch = link
            .detached_peer_epoch()
            .ok_or("the peer has not taken over for this detached primary")?;
        let attempt = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Seal {
            epoch,
            lsn: attempt,
        })
    }

    fn finish(&self, state: Phase, reason: Option<String>) {
        self.set_handover(|h| {
            if let Some(s) = h.status.as_mut() {
                s.state = state;
                s.reason = reason;
            }
        });
    }

    /// The replica's side: promote once a client runs its device here,
    /// within `timeout`, unless the source calls it off first. The same
    /// offer again (a new session) gets the same verdict.
    pub(super) fn take_over_for(&self, seal: Seal, timeout: Duration) -> bool {
        let offered = Instant::now();
        let deadline = offered + timeout;
        // A detached primary's offer carries no lsn (see park_detached).
        let sealed_lsn = match &self.link {
            Some(link) if link.serving_detached() => None,
            _ => Some(seal.lsn),
        };
        let mut h = lock(&self.handover);
        if h.offer != Some(seal) {
            *h = Handover {
                status: Some(HandoverStatus {
                    state: Phase::Switching,
                    side: Side::Destination,
                    timeout_ms: timeout.as_millis() as u64,
                    since: now_rfc3339(),
                    sealed_lsn,
                    seal_ms: None,
                    switch_ms: None,
                    start_to_serve_ms: None,
                    reason: Some("waiting for a client to start its device here".into()),
                }),
                offer: Some(seal),
                ..Handover::default()
            };
        }
        loop {
            if let Some(verdict) = h.verdict {
                return verdict;
            }
            let now = Instant::now();
            let decided = if h.cancelled {
                Some((false, "called off by the source"))
            } else if self.live.gate.device_running() {
                Some((true, "a client started its device here"))
            } else if now >= deadline {
                Some((false, "no client started its device here in time"))
            } else {
                None
            };
            if let Some((promote, why)) = decided {
                h.verdict = Some(promote);
                drop(h);
                return self.decided(promote, why, offered);
            }
            h = self
                .handover_changed
                .wait_timeout(h, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn decided(&self, promote: bool, why: &str, offered: Instant) -> bool {
        if promote {
            tracing::info!("handover: {why}: taking over");
        } else {
            tracing::warn!(
                event = rewind_journal::events::HANDOVER_ROLLED_BACK,
                volume = %self.volume.config().uuid,
                "handover: not taking over: {why}"
            );
            self.finish(Phase::RolledBack, Some(why.into()));
            return false;
        }
        let promoted = {
            let _one = lock(&self.changing);
            match self.link.as_ref().filter(|link| link.serving_detached()) {
                Some(link) => Ok(self.adopt_detached_guest(link)),
                None => self.promote_with(false, false, false),
            }
        };
        match promoted {
            Ok(p) => {
                let took = ms(offered.elapsed());
                let start_to_serve = self
                    .live
                    .gate
                    .device_started_at()
                    .map(|at| ms(at.elapsed()));
                tracing::warn!(
                    event = rewind_journal::events::HANDOVER_DONE,
                    volume = %self.volume.config().uuid,
                    epoch = p.epoch,
                    took_ms = took,
                    start_to_serve_ms = start_to_serve,
                    "handover: took over"
                );
                self.set_handover(|h| {
                    if let Some(s) = h.status.as_mut() {
                        s.seal_ms = Some(took);
                        s.start_to_serve_ms = start_to_serve;
                    }
                });
                self.finish(Phase::Done, None);
                true
            }
            Err(e) => {
                tracing::error!(
                    event = rewind_journal::events::HANDOVER_ROLLED_BACK,
                    volume = %self.volume.config().uuid,
                    "handover: promoting failed: {e}"
                );
                lock(&self.handover).verdict = Some(false);
                self.finish(Phase::RolledBack, Some(format!("promoting failed: {e}")));
                false
            }
        }
    }

    pub(super) fn cancel_take_over_now(&self) {
        self.set_handover(|h| h.cancelled = true);
    }
}

impl DeviceWatcher for Roles {
    fn device_started(&self) {
        let mut h = lock(&self.handover);
        let switching_source = h
            .status
            .as_ref()
            .is_some_and(|s| s.state == Phase::Switching && s.side == Side::Source);
        if switching_source && !h.cancelled {
            // The source's guest runs again (`cont` after a migration
            // failed): the handover is off, unless the replica took over.
            h.cancelled = true;
            if let Some(link) = &self.link {
                link.cancel_handover();
            }
            tracing::warn!(
                event = rewind_journal::events::HANDOVER_ROLLED_BACK,
                volume = %self.volume.config().uuid,
                "handover: the guest's device started here again; calling it off"
            );
        }
        drop(h);
        // A replica waiting for its client.
        self.handover_changed.notify_all();
    }

    fn device_stopped(&self) {
        let mut h = lock(&self.handover);
        let Some(status) = h.status.as_mut().filter(|s| s.state == Phase::Armed) else {
            return;
        };
        status.state = Phase::Switching;
        status.reason = Some("the guest's device stopped: sealing".into());
        h.stopped = Some(Instant::now());
        drop(h);
        tracing::info!("handover: the guest's device stopped; switching");
        // Off the vhost-user thread, which must answer GET_VRING_BASE.
        if let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) {
            std::thread::spawn(move || me.switch());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ExportConfig;
    use crate::export::Export;
    use crate::gate::Gate;

    /// A replica holding its primary's seal (here: its own, from a
    /// demotion), as a handover finds it.
    fn sealed_replica() -> (Arc<Roles>, Seal) {
        let volume = Arc::new(crate::test_support::volume(8 << 20));
        volume.write(0, &[7u8; 4096]).expect("write");
        let seal = volume.demote(true).expect("demote").expect("a seal");
        let config = ExportConfig {
            num_queues: 1,
            queue_size: 64,
            read_only: false,
        };
        let gate = Arc::new(Gate::new(1));
        let live = Arc::new(Export::new(volume.clone(), config, gate));
        (Roles::start(volume, live, None, None), seal)
    }

    fn taking_over(
        roles: &Arc<Roles>,
        seal: Seal,
        timeout: Duration,
    ) -> std::thread::JoinHandle<bool> {
        let waiter = roles.clone();
        let handle = std::thread::spawn(move || waiter.take_over_for(seal, timeout));
        // Once it waits, its status says so.
        while roles_state(roles) != Some(Phase::Switching) && !handle.is_finished() {
            std::thread::yield_now();
        }
        handle
    }

    fn roles_state(roles: &Roles) -> Option<Phase> {
        roles.handover_status().map(|s| s.state)
    }

    #[test]
    fn the_replica_takes_over_when_its_client_starts_and_answers_the_same_again() {
        let (roles, seal) = sealed_replica();
        let waiting = taking_over(&roles, seal, Duration::from_secs(60));
        assert_eq!(roles.volume.role(), Role::Replica, "nothing started yet");
        roles.live.gate.device_started();
        assert!(waiting.join().expect("the waiter"));
        assert_eq!(roles.volume.role(), Role::Primary);
        let status = roles.handover_status().expect("status");
        assert_eq!(status.state, Phase::Done);
        assert!(status.start_to_serve_ms.is_some(), "{status:?}");
        // The same offer again (a new session) gets the same verdict.
        assert!(roles.take_over_for(seal, Duration::ZERO));
    }

    #[test]
    fn a_client_that_started_before_the_offer_is_taken_at_once() {
        let (roles, seal) = sealed_replica();
        roles.live.gate.device_started();
        assert!(roles.take_over_for(seal, Duration::from_secs(60)));
        assert_eq!(roles.volume.role(), Role::Primary);
    }

    #[test]
    fn a_cancel_or_the_timeout_lets_the_offer_go_for_good() {
        let (roles, seal) = sealed_replica();
        let waiting = taking_over(&roles, seal, Duration::from_secs(60));
        roles.cancel_take_over_now();
        assert!(!waiting.join().expect("the waiter"));
        assert_eq!(roles.volume.role(), Role::Replica);
        let status = roles.handover_status().expect("status");
        assert_eq!(status.state, Phase::RolledBack);
        assert_eq!(status.reason.as_deref(), Some("called off by the source"));
        // A client that starts afterwards does not change the verdict.
        roles.live.gate.device_started();
        assert!(!roles.take_over_for(seal, Duration::from_secs(60)));
        assert_eq!(roles.volume.role(), Role::Replica);

        let (roles, seal) = sealed_replica();
        assert!(!roles.take_over_for(seal, Duration::ZERO));
        assert_eq!(
            roles.handover_status().and_then(|s| s.reason).as_deref(),
            Some("no client started its device here in time")
        );
    }

    #[test]
    fn a_handover_is_armed_only_on_a_primary_with_a_replica_and_a_guest() {
        let (roles, _) = sealed_replica();
        let refused = roles.arm_handover(Duration::ZERO).expect_err("a replica");
        assert!(refused.contains("replica"), "{refused}");
        roles.promote(false, false).expect("promote");
        let refused = roles.arm_handover(Duration::ZERO).expect_err("no peer");
        assert!(refused.contains("--replicate-to"), "{refused}");
        let refused = roles.cancel_handover().expect_err("nothing armed");
        assert!(refused.contains("no handover"), "{refused}");
    }
}
