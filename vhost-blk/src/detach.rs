//! `--on-storage-error detach`: a primary whose own files fail stops using
//! them and serves its guest through its replica (DESIGN.md, "Handover
//! (live migration) and storage-failure evacuation").
//!
//! The first request that meets a storage failure (EIO or ENOSPC past the
//! hold, or a volume that stopped taking writes) detaches:
//! 1. no new request runs against the local volume, and those running
//!    finish (held ones give up at once: `Volume::release_held`);
//! 2. the replica takes over as the primary of the next epoch (so this
//!    node's journal can never be served again in its place: a restart
//!    finds itself fenced) without serving a client of its own, and says
//!    up to which lsn it holds this journal;
//! 3. what records after that lsn changed is read from the live local disk
//!    (the page cache, usually) and written to the replica, then flushed:
//!    the replica now holds the disk exactly as this guest last saw it;
//! 4. every request from then on, the failed ones included, is forwarded
//!    over the link in the order it was taken, and the peer answers in
//!    that order.
//!
//! If a step fails (no replica connected, the local disk unreadable), the
//! requests fail as under `hold`. A forwarded request without an answer
//! within the hold (the link lost) fails with IOERR, loudly, as a local
//! one would.
//!
//! Invariant: `leaving` is set before the detach waits for `local` to
//! reach zero, and a request counts itself in `local` before it checks
//! `leaving` (both SeqCst), so no request runs locally once the catch-up
//! reads the disk. The one exception changes nothing: a read the queue's
//! ring planned before (`ReplicatedVolume::plan_read`) may still complete
//! from the local files, whose data the catch-up sends, or fail and run
//! again through `read`, which forwards it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rewind_journal::{Error, Volume};
use serde::Serialize;

use crate::replication::frame::{ForwardOp, MAX_FORWARD};
use crate::replication::Link;

/// What a primary does when its own storage fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnStorageError {
    /// Hold requests for --io-error-hold, then fail them with IOERR.
    Hold,
    /// Forward the guest's requests to the replica over the link.
    Detach,
}

/// Requests a detach keeps in flight to the peer while it catches it up.
const CATCH_UP_DEPTH: usize = 32;

/// Whether `e` means the volume's own storage failed.
pub fn storage_failed(e: &Error) -> bool {
    match e {
        Error::Failed(_) => true,
        Error::Io { source, .. } => matches!(
            source.raw_os_error(),
            Some(code) if code == rustix::io::Errno::IO.raw_os_error()
                || code == rustix::io::Errno::NOSPC.raw_os_error()
        ),
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Attached,
    Detaching,
    Forwarding,
    Failed(String),
}

/// Where a request runs.
#[derive(Debug)]
pub enum Route<'a> {
    /// On the local volume; the guard counts it.
    Local(LocalRequest<'a>),
    /// Over the link.
    Forward,
}

/// A request running on the local volume.
#[derive(Debug)]
pub struct LocalRequest<'a>(&'a Detacher);

impl Drop for LocalRequest<'_> {
    fn drop(&mut self) {
        self.0.leave_local();
    }
}

/// One primary's detach state.
#[derive(Debug)]
pub struct Detacher {
    link: Arc<Link>,
    hold: Duration,
    /// Requests running on the local volume.
    local: AtomicU64,
    /// Set when a detach starts; never cleared.
    leaving: AtomicBool,
    phase: Mutex<Phase>,
    changed: Condvar,
}

impl Detacher {
    pub fn new(link: Arc<Link>, hold: Duration) -> Self {
        Detacher {
            link,
            hold,
            local: AtomicU64::new(0),
            leaving: AtomicBool::new(false),
            phase: Mutex::new(Phase::Attached),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the next request runs: locally while attached; once a detach
    /// started, it waits for its outcome.
    pub fn route(&self) -> Result<Route<'_>, String> {
        if !self.leaving.load(Ordering::SeqCst) {
            self.local.fetch_add(1, Ordering::SeqCst);
            if !self.leaving.load(Ordering::SeqCst) {
                return Ok(Route::Local(LocalRequest(self)));
            }
            self.leave_local();
        }
        let mut phase = self.lock();
        loop {
            match &*phase {
                Phase::Forwarding => return Ok(Route::Forward),
                Phase::Failed(why) => return Err(why.clone()),
                Phase::Attached | Phase::Detaching => {
                    phase = self.changed.wait(phase).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    fn leave_local(&self) {
        if self.local.fetch_sub(1, Ordering::SeqCst) == 1 && self.leaving.load(Ordering::SeqCst) {
            drop(self.lock());
            self.changed.notify_all();
        }
    }

    /// The local volume failed with `error` (the caller's own request no
    /// longer counts as local): detaches, or waits for the detach under
    /// way. Ok once requests are forwarded.
    pub fn detach(&self, volume: &Volume, error: &Error) -> Result<(), String> {
        {
            let mut phase = self.lock();
            match &*phase {
                Phase::Attached => *phase = Phase::Detaching,
                Phase::Forwarding => return Ok(()),
                Phase::Failed(why) => return Err(why.clone()),
                Phase::Detaching => {
                    while *phase == Phase::Detaching {
                        phase = self.changed.wait(phase).unwrap_or_else(|e| e.into_inner());
                    }
                    return match &*phase {
                        Phase::Failed(why) => Err(why.clone()),
                        _ => Ok(()),
                    };
                }
            }
        }
        self.leaving.store(true, Ordering::SeqCst);
        let reason = error.to_string();
        tracing::error!(
            event = rewind_journal::events::DETACHING,
            volume = %volume.config().uuid,
            "local storage failed ({reason}): detaching, forwarding guest IO to the replica"
        );
        let outcome = self.leave(volume, &reason);
        let mut phase = self.lock();
        *phase = match &outcome {
            Ok(()) => {
                tracing::error!(
                    event = rewind_journal::events::DETACHED,
                    volume = %volume.config().uuid,
                    "detached: local storage failed ({reason}); guest IO goes to the replica; \
                     evacuate with handover"
                );
                Phase::Forwarding
            }
            Err(why) => {
                tracing::error!(
                    event = rewind_journal::events::DETACH_FAILED,
                    volume = %volume.config().uuid,
                    "cannot detach from the failed storage ({why}): guest requests fail"
                );
                Phase::Failed(format!("{reason}; detaching failed: {why}"))
            }
        };
        drop(phase);
        self.changed.notify_all();
        outcome
    }

    /// Steps 1 to 3 of the module comment.
    fn leave(&self, volume: &Volume, reason: &str) -> Result<(), String> {
        let deadline = Instant::now() + self.hold;
        {
            let _give_up = volume.release_held();
            let mut phase = self.lock();
            while self.local.load(Ordering::SeqCst) > 0 {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    return Err("requests on the failed storage did not finish".into());
                };
                phase = self
                    .changed
                    .wait_timeout(phase, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let (epoch, held) = self.link.detach(reason, deadline)?;
        let ranges = volume.changed_after(held);
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        tracing::warn!(
            event = rewind_journal::events::DETACHED,
            volume = %volume.config().uuid,
            epoch,
            held_lsn = held,
            bytes,
            "the replica took over; sending it what it lacks of this guest's disk"
        );
        let mut in_flight = VecDeque::new();
        for (offset, length) in ranges {
            let mut at = offset;
            while at < offset + length {
                let len = MAX_FORWARD.min(offset + length - at);
                let mut data = vec![0u8; len as usize];
                volume
                    .read(at, &mut data)
                    .map_err(|e| format!("reading the local disk at {at} to catch up: {e}"))?;
                in_flight.push_back(
                    self.link
                        .queue_forward(ForwardOp::Write { offset: at, data }),
                );
                if in_flight.len() >= CATCH_UP_DEPTH {
                    self.catch_up_answer(in_flight.pop_front(), deadline)?;
                }
                at += len;
            }
        }
        in_flight.push_back(self.link.queue_forward(ForwardOp::Flush));
        while let Some(id) = in_flight.pop_front() {
            self.catch_up_answer(Some(id), deadline.max(Instant::now() + self.hold))?;
        }
        Ok(())
    }

    fn catch_up_answer(&self, id: Option<u64>, deadline: Instant) -> Result<(), String> {
        match id {
            Some(id) => self
                .link
                .wait_forward(id, deadline.max(Instant::now() + self.hold))
                .map(drop)
                .map_err(|e| format!("catching the replica up: {e}")),
            None => Ok(()),
        }
    }

    /// Runs `op` on the peer, split into requests of at most
    /// [`MAX_FORWARD`] bytes of data; a read returns its data.
    pub fn forward(&self, op: ForwardOp) -> Result<Vec<u8>, Error> {
        let deadline = Instant::now() + self.hold;
        let ids: Vec<u64> = split(op)
            .into_iter()
            .map(|part| self.link.queue_forward(part))
            .collect();
        let mut data = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            match self.link.wait_forward(id, deadline) {
                Ok(part) => data.extend_from_slice(&part),
                Err(e) => {
                    // The guest request failed: its other pieces are not
                    // waited for.
                    self.link.abandon_forwards(&ids[i + 1..]);
                    tracing::error!(
                        event = rewind_journal::events::FORWARD_FAILED,
                        volume = self.link.volume(),
                        "a forwarded request failed: {e}"
                    );
                    return Err(Error::Io {
                        context: "forwarding to the replica".into(),
                        source: std::io::Error::other(e.to_string()),
                    });
                }
            }
        }
        Ok(data)
    }
}

/// `op` as requests of at most [`MAX_FORWARD`] bytes of data each; a
/// discard or write-zeroes carries no data and goes whole.
fn split(op: ForwardOp) -> Vec<ForwardOp> {
    let ranges = |offset: u64, length: u64| {
        (0..length.div_ceil(MAX_FORWARD)).map(move |i| {
            let at = offset + i * MAX_FORWARD;
            (at, MAX_FORWARD.min(offset + length - at))
        })
    };
    match op {
        ForwardOp::Read { offset, length } => ranges(offset, length)
            .map(|(offset, length)| ForwardOp::Read { offset, length })
            .collect(),
        ForwardOp::Write { offset, data } => data
            .chunks(MAX_FORWARD as usize)
            .enumerate()
            .map(|(i, chunk)| ForwardOp::Write {
                offset: offset + i as u64 * MAX_FORWARD,
                data: chunk.to_vec(),
            })
            .collect(),
        op @ (ForwardOp::WriteZeroes { .. } | ForwardOp::Discard { .. } | ForwardOp::Flush) => {
            vec![op]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_are_eio_enospc_and_a_failed_volume() {
        let io = |errno: rustix::io::Errno| Error::Io {
            context: "writing".into(),
            source: std::io::Error::from_raw_os_error(errno.raw_os_error()),
        };
        assert!(storage_failed(&io(rustix::io::Errno::IO)));
        assert!(storage_failed(&io(rustix::io::Errno::NOSPC)));
        assert!(storage_failed(&Error::Failed("sync failed".into())));
        assert!(!storage_failed(&io(rustix::io::Errno::INVAL)));
        assert!(!storage_failed(&Error::InvalidRequest(
            "past the end".into()
        )));
        // A sync-replication wait that was released is not the disk.
        assert!(!storage_failed(&Error::Io {
            context: "sync replication".into(),
            source: std::io::Error::other("released"),
        }));
    }

    #[test]
    fn without_a_connected_replica_the_detach_fails_and_requests_fail_as_under_hold() {
        let volume = crate::test_support::volume(8 << 20);
        let link = Arc::new(Link::new(
            "test".into(),
            Some(crate::replication::Mode::Async),
            None,
        ));
        let detacher = Detacher::new(link.clone(), Duration::from_millis(100));
        match detacher.route() {
            Ok(Route::Local(counted)) => drop(counted),
            other => panic!("attached: {other:?}"),
        }
        let failure = Error::Failed("fsync of segment 3 failed".into());
        let why = detacher.detach(&volume, &failure).expect_err("no replica");
        assert!(why.contains("not connected"), "{why}");
        assert!(!link.detached(), "nothing was asked of the peer");
        // Every request from now on fails, saying why.
        match detacher.route() {
            Err(why) => assert!(
                why.contains("fsync of segment 3 failed") && why.contains("detaching failed"),
                "{why}"
            ),
            Ok(route) => panic!("{route:?}"),
        }
        assert!(detacher.detach(&volume, &failure).is_err(), "decided once");
    }

    #[test]
    fn large_requests_split_at_the_frame_limit() {
        let m = MAX_FORWARD;
        let parts = split(ForwardOp::Read {
            offset: 512,
            length: 2 * m + 1024,
        });
        assert_eq!(
            parts,
            vec![
                ForwardOp::Read {
                    offset: 512,
                    length: m
                },
                ForwardOp::Read {
                    offset: 512 + m,
                    length: m
                },
                ForwardOp::Read {
                    offset: 512 + 2 * m,
                    length: 1024
                },
            ]
        );
        let data: Vec<u8> = (0..m + 512).map(|i| i as u8).collect();
        let parts = split(ForwardOp::Write {
            offset: 0,
            data: data.clone(),
        });
        assert_eq!(parts.len(), 2);
        let joined: Vec<u8> = parts
            .iter()
            .flat_map(|p| match p {
                ForwardOp::Write { data, .. } => data.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(joined, data);
        assert_eq!(split(ForwardOp::Flush), vec![ForwardOp::Flush]);
        // Without data, a request of the whole disk is one piece.
        let discard = ForwardOp::Discard {
            offset: 0,
            length: 1 << 40,
        };
        assert_eq!(split(discard.clone()), vec![discard]);
        let zeroes = ForwardOp::WriteZeroes {
            offset: 4096,
            length: 1 << 40,
            unmap: true,
        };
        assert_eq!(split(zeroes.clone()), vec![zeroes]);
    }
}
