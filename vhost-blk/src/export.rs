//! One vhost-user-blk socket and what it serves (the live volume, or a
//! view), with its gate and the clients it admits.
//!
//! The listening socket lives as long as the export; every connection gets
//! a fresh backend and vhost-user daemon, so a guest reboot, a QEMU restart
//! or QEMU's `reconnect=` all start from a clean device.
//!
//! Admission (DESIGN.md, "Drain and fence"): a client is identified by its
//! attach id, the pid and start time of the process at the other end of the
//! socket (the QEMU instance). A client that detached and comes back with
//! the same attach id continues only if the epoch is unchanged and nothing
//! modified the disk meanwhile; a fenced export admits nobody.
//!
//! The live export also keeps its last clients in volume.json
//! (`AttachRecord`: attach id, epoch, the lsn it left at), so the rule
//! survives a restart of the daemon (`kill -9` included): a client that was
//! attached when the daemon died left at the journal's end as recovery
//! found it (written back at the start, so a second restart keeps that
//! point); the restart itself changes nothing. Any record after that point
//! which changed the disk (a write, zeroes, a discard, a revert, records a
//! replica received) refuses it, whoever made it; a failover or a fence
//! raised the epoch, which refuses it too.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use rewind_journal::{format_ns, AttachRecord, Volume};
use serde::Serialize;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BlkBackend, ExportConfig, GuestMemory};
use crate::device::BlockDevice;
use crate::gate::{Gate, State};

/// Detached clients remembered for the reattach rule (volume.json keeps
/// the last `MAX_ATTACH_RECORDS` across restarts of the daemon).
const REMEMBERED: usize = 64;

/// Who is at the other end of a vhost-user connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AttachId {
    pub pid: i32,
    /// Start time of the process, in clock ticks after boot
    /// (/proc/PID/stat), so a reused pid is another client.
    pub start: u64,
}

impl fmt::Display for AttachId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.pid, self.start)
    }
}

/// An attach id as Display writes it (`PID:START`).
impl std::str::FromStr for AttachId {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let (pid, start) = text.split_once(':').ok_or(())?;
        Ok(AttachId {
            pid: pid.parse().map_err(drop)?,
            start: start.parse().map_err(drop)?,
        })
    }
}

/// A client being served.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    /// None if the peer could not be identified.
    pub attach_id: Option<AttachId>,
    pub epoch: u64,
    pub since: String,
}

#[derive(Debug)]
struct Detached {
    id: AttachId,
    epoch: u64,
    /// `Counters::modifying` when it detached.
    modifications: u64,
    /// The journal's last lsn when it detached (live export only).
    left_lsn: Option<u64>,
}

#[derive(Default)]
struct Clients {
    current: Option<(Attached, Option<ShutdownHandle>)>,
    detached: VecDeque<Detached>,
    last_refusal: Option<String>,
    /// How many refusals in a row repeated `last_refusal`.
    repeated_refusals: u64,
}

/// A refused QEMU with `reconnect` set retries every second: the same
/// refusal is logged as a warning once, then every this many times.
const REFUSALS_PER_WARNING: u64 = 60;

impl Clients {
    /// Records a refusal; returns how many times in a row it repeated the
    /// previous one if it is worth a warning.
    fn refused(&mut self, reason: String) -> Option<u64> {
        if self.last_refusal.as_ref() == Some(&reason) {
            self.repeated_refusals += 1;
        } else {
            self.last_refusal = Some(reason);
            self.repeated_refusals = 0;
        }
        let repeats = self.repeated_refusals;
        repeats
            .is_multiple_of(REFUSALS_PER_WARNING)
            .then_some(repeats)
    }
}

impl fmt::Debug for Clients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clients")
            .field("current", &self.current.as_ref().map(|(a, _)| a))
            .field("detached", &self.detached)
            .field("last_refusal", &self.last_refusal)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// vhost_user_backend::Error is Display but not std::error::Error.
    #[error("vhost-user: {0}")]
    VhostUser(String),
}

#[derive(Debug)]
pub struct Export {
    pub device: Arc<dyn BlockDevice>,
    pub config: ExportConfig,
    pub gate: Arc<Gate>,
    /// The live export's volume: where its attach record is kept.
    journal: Option<Arc<Volume>>,
    clients: Mutex<Clients>,
    stopping: AtomicBool,
    /// The listening socket's descriptor while `serve` runs (to wake it).
    listening: Mutex<Option<i32>>,
}

impl Export {
    pub fn new(device: Arc<dyn BlockDevice>, config: ExportConfig, gate: Arc<Gate>) -> Self {
        Export {
            device,
            config,
            gate,
            journal: None,
            clients: Mutex::default(),
            stopping: AtomicBool::new(false),
            listening: Mutex::new(None),
        }
    }

    /// The live export of `volume`: the clients volume.json remembers
    /// are held to the reattach rule as if they had left where they left
    /// (or, attached when the last daemon ended, where its journal ends),
    /// and every client admitted or gone is recorded there.
    pub fn with_journal(mut self, volume: Arc<Volume>) -> Self {
        let records = volume.settle_attach_records().unwrap_or_else(|e| {
            tracing::warn!(
                volume = %self.volume_id(),
                "cannot settle the clients in volume.json ({e}); they are held to \
                 the journal's end"
            );
            volume.attach_records()
        });
        let modifications = self.gate.counters().modifying;
        let last = volume.last_lsn();
        for record in records {
            match record.client.parse::<AttachId>() {
                Ok(id) => self.clients().detached.push_back(Detached {
                    id,
                    epoch: record.epoch,
                    modifications,
                    left_lsn: Some(record.left_lsn.map_or(last, |lsn| lsn.min(last))),
                }),
                Err(()) => tracing::warn!(
                    volume = %self.volume_id(),
                    client = record.client,
                    "volume.json names a client this daemon cannot parse; it is forgotten"
                ),
            }
        }
        self.journal = Some(volume);
        self
    }

    /// Records `record` in volume.json, in place of the same client's.
    fn record_client(&self, record: AttachRecord) {
        let Some(volume) = &self.journal else {
            return;
        };
        if let Err(e) = volume.note_attach(record) {
            tracing::warn!(
                volume = %self.volume_id(),
                "cannot record the client in volume.json ({e}): after a restart of this \
                 daemon it is held to an older point, or admitted as a new one"
            );
        }
    }

    /// The volume's uuid as the logs and metrics spell it (hyphenated;
    /// the device gives the virtio serial's simple form).
    pub fn volume_id(&self) -> String {
        let simple = self.device.uuid();
        uuid::Uuid::try_parse(&simple).map_or(simple, |id| id.to_string())
    }

    fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client being served, if any.
    pub fn attached(&self) -> Option<Attached> {
        self.clients().current.as_ref().map(|(a, _)| a.clone())
    }

    /// Why the last client was refused, if one was.
    pub fn last_refusal(&self) -> Option<String> {
        self.clients().last_refusal.clone()
    }

    /// Accepts and serves clients, one at a time, until [`Export::stop`].
    pub fn serve(&self, mut listener: Listener) -> Result<(), ExportError> {
        *self.listening.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener.as_raw_fd());
        let result = self.accept_loop(&mut listener);
        *self.listening.lock().unwrap_or_else(|e| e.into_inner()) = None;
        result
    }

    fn accept_loop(&self, listener: &mut Listener) -> Result<(), ExportError> {
        while !self.stopping.load(Ordering::Acquire) {
            let backend = Arc::new(BlkBackend::new(
                self.device.clone(),
                self.config.clone(),
                self.gate.clone(),
            ));
            let memory = GuestMemoryAtomic::new(GuestMemory::new());
            let mut daemon =
                VhostUserDaemon::new("rewind-blk".into(), backend.clone(), memory.clone())
                    .map_err(|e| ExportError::VhostUser(e.to_string()))?;
            // One queue per worker thread: each polls its queue's ring too.
            for (index, worker) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Some((fd, event)) = backend.ring_event(index) {
                    worker
                        .register_listener(fd, EventSet::IN, event)
                        .map_err(|e| ExportError::VhostUser(format!("polling a ring: {e}")))?;
                }
            }
            if let Err(e) = daemon.start(listener) {
                if self.stopping.load(Ordering::Acquire) {
                    break;
                }
                return Err(ExportError::VhostUser(e.to_string()));
            }
            let id = match connected_peer(listener) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(
                        event = rewind_journal::events::CLIENT_UNIDENTIFIED,
                        volume = %self.volume_id(),
                        error = %e,
                        "cannot identify the client; it is admitted as a new one"
                    );
                    None
                }
            };
            let admitted = match self.admit(id, daemon.shutdown_handle()) {
                Ok(epoch) => {
                    tracing::info!(attach_id = ?id.map(|i| i.to_string()), epoch, "client attached");
                    backend.admit(epoch);
                    self.gate.wake_parked();
                    if self.stopping.load(Ordering::Acquire) {
                        daemon.request_shutdown();
                    }
                    true
                }
                Err(reason) => {
                    match self.clients().refused(reason.clone()) {
                        Some(0) => tracing::warn!(
                            event = rewind_journal::events::CLIENT_REFUSED,
                            volume = %self.volume_id(),
                            "client refused: {reason}"
                        ),
                        Some(n) => tracing::warn!(
                            event = rewind_journal::events::CLIENT_REFUSED,
                            volume = %self.volume_id(),
                            "client refused again ({n} times since the first): {reason}"
                        ),
                        None => tracing::debug!("client refused again: {reason}"),
                    }
                    daemon.request_shutdown();
                    false
                }
            };
            let ended = daemon.wait();
            backend.stop_workers();
            self.gate.device_gone();
            self.gate.forget_parked();
            self.detach(id);
            match ended {
                _ if !admitted => tracing::debug!("refused client disconnected"),
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                )) => tracing::info!("client disconnected"),
                // QEMU before 9.1 reconnects to a restarted daemon without
                // renegotiating if its device was stopped (a paused VM),
                // then starts the device without guest memory on `cont`.
                Err(
                    e @ vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::InvalidParam,
                    ),
                ) if memory.memory().num_regions() == 0 => tracing::warn!(
                    volume = %self.volume_id(),
                    error = %e,
                    "connection ended: the client set up its virtqueues without sharing \
                     guest memory; a QEMU before 9.1 does so after this daemon restarted \
                     under its paused VM, and its IO stalls: restart that VM"
                ),
                Err(e) => tracing::warn!(error = %e, "connection ended"),
            }
        }
        Ok(())
    }

    /// The reattach rule; returns the epoch the client is admitted at.
    fn admit(&self, id: Option<AttachId>, shutdown: Option<ShutdownHandle>) -> Result<u64, String> {
        let mut clients = self.clients();
        let epoch = self.gate.epoch();
        if self.gate.state() == State::Fenced {
            return Err(format!(
                "the volume is fenced at epoch {epoch}; run `rewindctl unfence` to let a client in"
            ));
        }
        if let Some(known) = id.and_then(|id| clients.detached.iter().find(|d| d.id == id)) {
            if known.epoch != epoch {
                return Err(format!(
                    "client {} attached at epoch {} but the volume is at epoch {epoch} (fenced or failed \
                     over since); \
                     restart the VM to attach afresh",
                    known.id, known.epoch
                ));
            }
            // The journal tells across restarts (any record that changed
            // the disk, whoever wrote it); the counter, for a view.
            let changed = match (&self.journal, known.left_lsn) {
                (Some(volume), Some(lsn)) => (!volume.changed_after(lsn).is_empty())
                    .then(|| format!(" (the journal changed the disk after lsn {lsn})")),
                _ => None,
            };
            if changed.is_some() || known.modifications != self.gate.counters().modifying {
                return Err(format!(
                    "the volume was modified since client {} detached{}; \
                     its cached view of the disk is stale: restart the VM to attach afresh",
                    known.id,
                    changed.unwrap_or_default()
                ));
            }
        }
        let now_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let since = format_ns(now_ns);
        clients.current = Some((
            Attached {
                attach_id: id,
                epoch,
                since,
            },
            shutdown,
        ));
        clients.last_refusal = None;
        drop(clients);
        if let Some(id) = id {
            self.record_client(AttachRecord {
                client: id.to_string(),
                epoch,
                left_lsn: None,
            });
        }
        Ok(epoch)
    }

    fn detach(&self, id: Option<AttachId>) {
        let mut clients = self.clients();
        // Only an admitted client is remembered, with the epoch it was
        // admitted at (a fence raises the gate's before it disconnects).
        let (Some(id), Some((attached, _))) = (id, clients.current.take()) else {
            return;
        };
        clients.detached.retain(|d| d.id != id);
        if clients.detached.len() == REMEMBERED {
            clients.detached.pop_front();
        }
        let left_lsn = self.journal.as_ref().map(|volume| volume.last_lsn());
        clients.detached.push_back(Detached {
            id,
            epoch: attached.epoch,
            modifications: self.gate.counters().modifying,
            left_lsn,
        });
        drop(clients);
        self.record_client(AttachRecord {
            client: id.to_string(),
            epoch: attached.epoch,
            left_lsn,
        });
    }

    /// Ends the current connection (a fence); the export goes on.
    pub fn disconnect(&self) {
        if let Some((_, Some(handle))) = self.clients().current.as_ref() {
            handle.shutdown();
        }
    }

    /// Ends the current connection and makes `serve` return.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.disconnect();
        if let Some(fd) = *self.listening.lock().unwrap_or_else(|e| e.into_inner()) {
            // SAFETY: the listener lives until `serve` clears `listening`,
            // which waits for this lock; shutdown(2) only wakes its accept.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
        }
    }
}

/// The attach id of the connection `VhostUserDaemon::start` just accepted
/// on `listener`. vhost-user-backend keeps the accepted stream to itself,
/// so it is found among this process's descriptors: a connected socket
/// whose local address is the listener's. An export serves one connection
/// at a time, so every such socket is that connection.
fn connected_peer(listener: &Listener) -> std::io::Result<AttachId> {
    // SAFETY: the listener is borrowed for this call.
    let listening = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    let local = rustix::net::getsockname(listening)?;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only queried (getsockopt, getsockname).
        // Should another thread close it and open something else under the
        // same number meanwhile, the query answers for that other file,
        // which the address check rejects.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if rustix::net::sockopt::socket_acceptconn(fd) != Ok(false)
            || rustix::net::getsockname(fd).ok().as_ref() != Some(&local)
        {
            continue;
        }
        let cred = rustix::net::sockopt::socket_peercred(fd)?;
        let pid = cred.pid.as_raw_nonzero().get();
        return Ok(AttachId {
            pid,
            start: process_start(pid)?,
        });
    }
    Err(std::io::Error::other(
        "the accepted connection was not found",
    ))
}

/// Field 22 of /proc/PID/stat: when the process started.
fn process_start(pid: i32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("unexpected /proc/{pid}/stat")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        let volume = crate::test_support::volume(1 << 20);
        let config = ExportConfig {
            num_queues: 1,
            queue_size: 16,
            read_only: false,
        };
        Export::new(Arc::new(volume), config, Arc::new(Gate::new(1)))
    }

    const A: AttachId = AttachId { pid: 10, start: 1 };
    const B: AttachId = AttachId { pid: 11, start: 1 };

    #[test]
    fn a_returning_client_is_admitted_only_if_nothing_changed() {
        let e = export();
        assert_eq!(e.admit(Some(A), None), Ok(1));
        assert_eq!(e.attached().map(|a| a.attach_id), Some(Some(A)));
        e.detach(Some(A));
        assert!(e.attached().is_none());
        assert_eq!(e.admit(Some(A), None), Ok(1), "nothing changed");
        e.detach(Some(A));

        // Another client writes meanwhile.
        assert_eq!(e.admit(Some(B), None), Ok(1));
        let pass = e.gate.enter(1).expect("serving");
        pass.finish(crate::request::Status::Ok, true);
        e.detach(Some(B));
        let refused = e.admit(Some(A), None).unwrap_err();
        assert!(refused.contains("modified"), "{refused}");
        assert_eq!(e.admit(None, None), Ok(1), "an unknown client is new");
    }

    #[test]
    fn the_last_client_is_held_to_the_rule_after_a_restart() {
        let volume = Arc::new(crate::test_support::volume(1 << 20));
        let config = ExportConfig {
            num_queues: 1,
            queue_size: 16,
            read_only: false,
        };
        // As the daemon starts it: the gate at the volume's epoch.
        let live = |volume: &Arc<Volume>| {
            let gate = Arc::new(Gate::new(volume.epoch()));
            Export::new(volume.clone(), config.clone(), gate).with_journal(volume.clone())
        };
        let e = live(&volume);
        assert_eq!(e.admit(Some(A), None), Ok(1));
        volume.write(0, &[1; 512]).expect("A's own write");
        // The daemon dies with A attached; restarted, nothing changed.
        let e = live(&volume);
        assert_eq!(e.admit(Some(A), None), Ok(1), "a restart is no change");
        e.detach(Some(A));
        assert_eq!(
            volume.attach_records().last().and_then(|r| r.left_lsn),
            Some(volume.last_lsn())
        );
        // Restarted again, and the disk reverted before A comes back.
        let e = live(&volume);
        volume
            .revert(&rewind_journal::PointInTime::Lsn(0))
            .expect("revert");
        let refused = e.admit(Some(A), None).unwrap_err();
        assert!(refused.contains("modified"), "{refused}");
        // Another client writes, then two restarts: A is still refused,
        // B comes back to the disk it left.
        let e = live(&volume);
        assert_eq!(e.admit(Some(B), None), Ok(1));
        volume.write(512, &[2; 512]).expect("B's write");
        e.detach(Some(B));
        let _ = live(&volume);
        let e = live(&volume);
        let refused = e.admit(Some(A), None).unwrap_err();
        assert!(refused.contains("modified"), "{refused}");
        assert_eq!(e.admit(Some(B), None), Ok(1));
        // A failover raises the epoch (a record that changes no data): B,
        // admitted at the old one, is refused after a restart.
        e.detach(Some(B));
        volume.promote().expect("a new epoch");
        let refused = live(&volume).admit(Some(B), None).unwrap_err();
        assert!(refused.contains("attached at epoch 1"), "{refused}");
        assert_eq!("10:1".parse(), Ok(A));
        assert_eq!("x:1".parse::<AttachId>(), Err(()));
    }

    #[test]
    fn a_fence_refuses_everyone_then_the_old_epoch() {
        let e = export();
        assert_eq!(e.admit(Some(A), None), Ok(1));
        e.gate
            .fence(std::time::Duration::from_secs(1), || {})
            .expect("fence");
        e.gate.set_epoch(2);
        // The fence disconnects the client attached at epoch 1.
        e.detach(Some(A));
        let fenced = e.admit(Some(B), None).unwrap_err();
        assert!(fenced.contains("unfence"), "{fenced}");
        e.gate.unfence().expect("unfence");
        let old = e.admit(Some(A), None).unwrap_err();
        assert!(old.contains("epoch 1"), "{old}");
        assert_eq!(e.admit(Some(B), None), Ok(2), "a new client");
    }

    #[test]
    fn a_refusal_repeated_by_a_reconnecting_client_warns_once_a_minute() {
        let mut clients = Clients::default();
        let fenced = || "fenced".to_string();
        assert_eq!(clients.refused(fenced()), Some(0), "the first warns");
        for _ in 1..REFUSALS_PER_WARNING {
            assert_eq!(clients.refused(fenced()), None);
        }
        assert_eq!(clients.refused(fenced()), Some(60), "then every 60th");
        assert_eq!(
            clients.refused("stale".into()),
            Some(0),
            "a new reason warns"
        );
        assert_eq!(clients.refused("stale".into()), None);
        // An admission in between (it clears the last refusal) warns anew.
        clients.last_refusal = None;
        assert_eq!(clients.refused("stale".into()), Some(0));
    }

    #[test]
    fn the_start_time_of_this_process_is_read() {
        let pid = std::process::id() as i32;
        let start = process_start(pid).expect("stat");
        assert_eq!(process_start(pid).expect("stat"), start);
        assert!(process_start(-1).is_err());
    }
}
