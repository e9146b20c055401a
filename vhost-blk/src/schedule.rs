//! Scheduled bookmarks (`serve --bookmark-every`): a thread takes one at
//! every multiple of the interval since the Unix epoch, named by that
//! moment (`auto-2026-11-30T19:45:00Z`). They are bookmark records, so the
//! applier's folds prune them with the window as any record.
//!
//! With `--bookmark-qga`, while a guest runs its device, each is
//! application-consistent: the guest's filesystems are frozen through its
//! agent, the volume drained and bookmarked, resumed, and the guest thawed
//! whatever failed (rewind_ctl::quiesce, as `rewindctl bookmark
//! --quiesce`). When the guest cannot be frozen, the bookmark is
//! crash-consistent and a warning says why.
//!
//! A tick is skipped (logged at debug) on a replica, whose journal takes
//! only its primary's records, and while the gate is not serving: an
//! operator's drain or fence, or a primary held for its peer.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rewind_ctl::quiesce;
use rewind_journal::{events, Bookmark, Role, Volume};

use crate::export::Export;
use crate::gate::State;

/// The longest wait for each guest agent call and for the drain; shorter
/// intervals wait half the interval, so that a tick ends near the next.
const MAX_AGENT_WAIT: Duration = Duration::from_secs(10);

/// `--bookmark-every` and `--bookmark-qga`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub every: Duration,
    /// The socket of the VM's guest agent channel.
    pub agent: Option<PathBuf>,
}

/// The thread taking the bookmarks; dropping it stops the thread after
/// the tick it is in (which always thaws), and waits for it.
#[derive(Debug)]
pub struct Scheduler {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    pub fn start(
        schedule: Schedule,
        volume: Arc<Volume>,
        live: Arc<Export>,
    ) -> std::io::Result<Scheduler> {
        let (stop, stopped) = mpsc::channel();
        let ticker = Ticker {
            schedule,
            volume,
            live,
        };
        let thread = std::thread::Builder::new()
            .name("rewind-bookmarks".into())
            .spawn(move || ticker.run(&stopped))?;
        Ok(Scheduler {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Nothing is ever sent: the channel's end is the stop.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Why a tick took no bookmark.
enum Missed {
    /// The volume became a replica meanwhile.
    Replica,
    Failed(rewind_journal::Error),
}

struct Ticker {
    schedule: Schedule,
    volume: Arc<Volume>,
    live: Arc<Export>,
}

impl Ticker {
    fn run(&self, stopped: &Receiver<()>) {
        loop {
            let now = SystemTime::now();
            let next = next_tick(now, self.schedule.every);
            let wait = next.duration_since(now).unwrap_or_default();
            if stopped.recv_timeout(wait) != Err(RecvTimeoutError::Timeout) {
                return;
            }
            // The wall clock may have been set back meanwhile.
            if SystemTime::now() >= next {
                self.tick(next);
            }
        }
    }

    fn tick(&self, at: SystemTime) {
        let volume = &self.volume;
        let state = self.live.gate.state();
        if volume.role() == Role::Replica {
            tracing::debug!("scheduled bookmark skipped: a replica bookmarks nothing of its own");
            return;
        }
        if let Some(failed) = volume.stats().failed {
            tracing::debug!(%failed, "scheduled bookmark skipped: the volume failed");
            return;
        }
        if state != State::Serving {
            tracing::debug!(%state, "scheduled bookmark skipped: the volume is not serving");
            return;
        }
        let name = bookmark_name(at);
        let taken = match &self.schedule.agent {
            Some(agent) if self.live.gate.device_running() => self.quiesced(agent, &name),
            Some(_) => {
                tracing::debug!(%name, "no guest runs its device: nothing to freeze");
                self.plain(&name)
            }
            None => self.plain(&name),
        };
        match taken {
            Ok(mark) => tracing::info!(
                name = %mark.name,
                lsn = mark.lsn,
                app_consistent = mark.app_consistent,
                "scheduled bookmark"
            ),
            Err(Missed::Replica) => {
                tracing::debug!(%name, "scheduled bookmark skipped: the volume became a replica")
            }
            Err(Missed::Failed(e)) => tracing::warn!(
                event = events::SCHEDULED_BOOKMARK_FAILED,
                volume = %self.volume.config().uuid,
                %name,
                "scheduled bookmark failed (the next tick tries again): {e}"
            ),
        }
    }

    /// A crash-consistent bookmark: as any in the journal, with no drain.
    fn plain(&self, name: &str) -> Result<Bookmark, Missed> {
        if self.volume.role() == Role::Replica {
            return Err(Missed::Replica);
        }
        self.volume.bookmark(name, false).map_err(Missed::Failed)
    }

    /// Freezes the guest, bookmarks it drained, thaws it; when it could
    /// not be frozen, a crash-consistent bookmark instead, after the thaw.
    fn quiesced(&self, agent: &Path, name: &str) -> Result<Bookmark, Missed> {
        let timeout = (self.schedule.every / 2).min(MAX_AGENT_WAIT);
        let why = match quiesce::freeze(agent, timeout) {
            Ok((frozen, filesystems, agent_freeze)) => {
                let mark = self.drained_bookmark(name, timeout);
                let thawed = frozen.thaw();
                if let Err(e) = &thawed.result {
                    self.thaw_failed(&quiesce::thaw_advice(agent, e));
                }
                match mark {
                    Ok(mark) => {
                        tracing::debug!(
                            filesystems,
                            agent_freeze_ms = agent_freeze.as_millis(),
                            frozen_ms = thawed.frozen.as_millis(),
                            "the guest was frozen for the scheduled bookmark"
                        );
                        return mark;
                    }
                    Err(why) => why,
                }
            }
            Err(not_frozen) => {
                if let Some(advice) = &not_frozen.thaw_failed {
                    self.thaw_failed(advice);
                }
                not_frozen.why
            }
        };
        tracing::warn!(
            event = events::SCHEDULED_BOOKMARK_NOT_QUIESCED,
            volume = %self.volume.config().uuid,
            name,
            reason = %why,
            "the guest could not be frozen: the scheduled bookmark is crash-consistent"
        );
        self.plain(name)
    }

    /// Drains the volume (as the control socket's `drain`), takes an
    /// application-consistent bookmark and resumes what this drain closed;
    /// a drain that failed (the bookmark is not quiesced) says why.
    fn drained_bookmark(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Result<Bookmark, Missed>, String> {
        let gate = &self.live.gate;
        let drained = gate
            .drain(timeout, || ())
            .map_err(|e| format!("draining the volume: {e}"))?;
        let mark = match self.volume.role() {
            Role::Replica => Err(Missed::Replica),
            Role::Primary => self.volume.bookmark(name, true).map_err(Missed::Failed),
        };
        // An operator's drain that came first stays; so does a demotion's
        // closed gate.
        if !drained.already_drained && self.volume.role() == Role::Primary {
            if let Err(e) = gate.resume() {
                tracing::info!("left the gate as an operator's command set it: {e}");
            }
        }
        Ok(mark)
    }

    fn thaw_failed(&self, advice: &str) {
        tracing::error!(
            event = events::GUEST_THAW_FAILED,
            volume = %self.volume.config().uuid,
            "after a scheduled bookmark: {advice}"
        );
    }
}

/// The first multiple of `every` since the Unix epoch after `now`.
fn next_tick(now: SystemTime, every: Duration) -> SystemTime {
    let since = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let every = every.as_nanos().max(1);
    let next = (since / every + 1) * every;
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX))
}

/// `auto-` and the tick's moment, in whole seconds (UTC): distinct for
/// ticks at least a second apart.
fn bookmark_name(at: SystemTime) -> String {
    format!("auto-{}", humantime::format_rfc3339_seconds(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_fall_on_multiples_of_the_interval() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        let minute = Duration::from_secs(60);
        assert_eq!(next_tick(at(120, 0), minute), at(180, 0));
        assert_eq!(next_tick(at(179, 999), minute), at(180, 0));
        let odd = Duration::from_millis(1500);
        assert_eq!(next_tick(at(3, 100), odd), at(4, 500));
        assert_eq!(
            bookmark_name(at(1_796_067_900, 0)),
            "auto-2026-11-30T19:45:00Z"
        );
        // Whole seconds: 1.5 s apart, still distinct names.
        assert_ne!(bookmark_name(at(3, 0)), bookmark_name(at(4, 500)));
    }
}
