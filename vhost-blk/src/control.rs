//! The control socket (`serve --control-socket PATH`).
//!
//! A Unix socket, mode 0600, whose peers must be the daemon's own user or
//! root (SO_PEERCRED). Each request is one line of JSON,
//! `{"version": 1, "command": "...", ...arguments}`, answered by one line:
//! `{"version": 1, "ok": true, "result": {...}}` or
//! `{"version": 1, "ok": false, "error": "..."}`. Long commands send
//! `{"version": 1, "progress": {"done": N, "total": N}}` lines before their
//! answer. The protocol is documented in ctl/PROTOCOL.md.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rewind_journal::{format_ns, Bookmark, EpochStart, PointInTime, Role, Volume};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vhost::vhost_user::Listener;

use crate::backend::ExportConfig;
use crate::device::{BlockDevice, ViewDevice};
use crate::export::{Attached, Export};
use crate::failover::{HandoverStatus, Roles};
use crate::gate::{Counters, Gate, State};
use crate::replication::{Link, ReleaseWaits, ReplicationStatus};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;
/// Control connections served at once. Clients (rewindctl, the Pacemaker
/// agent, the libvirt hook) connect for a request or two and leave, so a
/// few at a time is usual and 64 leaves room for scripts run in parallel;
/// each one holds a thread and a file descriptor, and a script that leaks
/// connections must not take those from the guest's queues and the
/// journal.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a listener pauses after a failed accept. Its usual causes, no
/// file descriptor left (EMFILE, ENFILE) or no memory, last until
/// something else is closed or freed: retrying at once would spin a CPU
/// and write a warning each pass, while the connection waits in the
/// listen backlog either way.
pub(crate) const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long drain and fence wait for the requests in flight by default.
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0} exists; remove it or choose another --control-socket path")]
    Exists(PathBuf),
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A request's command and its arguments (the line without `version`).
#[derive(Debug, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    // Braces, so that unknown fields are refused for these too.
    Status {},
    Timeline {},
    /// `app_consistent`: the client froze the guest's filesystems
    /// around this request (rewindctl bookmark --quiesce); kept in the
    /// record.
    Bookmark {
        name: String,
        #[serde(default)]
        app_consistent: bool,
    },
    /// Writes a raw image of the disk at `at` to `output`, a new file
    /// (an absolute path: the daemon's working directory is not the
    /// client's).
    Materialize {
        at: String,
        output: PathBuf,
    },
    /// Stops taking requests from the virtqueues, waits for those in
    /// flight (failing held ones with `abort`), flushes.
    Drain {
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        #[serde(default)]
        abort: bool,
    },
    Resume {},
    /// Raises the epoch, disconnects the client, admits nobody until
    /// `unfence`.
    Fence {
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    Unfence {},
    /// Makes the live disk what it was at `at` (drained, no client).
    Revert {
        at: String,
    },
    /// Serves the disk at `at` on a new vhost-user-blk socket.
    Export {
        at: String,
        socket_path: PathBuf,
        #[serde(default)]
        scratch: bool,
    },
    Unexport {
        socket_path: PathBuf,
    },
    /// The replication link: role, peer, state, lag, RPO.
    Replication {},
    /// Keyed BLAKE3 hashes of the disk at `at`, chunk by chunk (what
    /// `rewindctl verify` compares between a primary and its replica).
    Checksums {
        at: String,
        /// 64 hex digits: the BLAKE3 key.
        key: String,
        #[serde(default = "default_chunk_bytes")]
        chunk_bytes: u64,
    },
    /// Makes this replica the primary (a new epoch); without `force` only
    /// once its primary sealed it.
    Promote {
        #[serde(default)]
        force: bool,
        /// Leave the gate closed (a group failover reverts first).
        #[serde(default)]
        drained: bool,
    },
    /// Seals this primary: it serves no more, ships its tail, and becomes
    /// a replica.
    Demote {
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    /// On a replica: seal the old primary if it answers, then promote.
    Failover {
        #[serde(default)]
        force: bool,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        #[serde(default)]
        drained: bool,
    },
    /// After a split brain: this side's writes since the split become a
    /// branch and it becomes the other side's replica.
    Resolve {
        discard_this_side: bool,
    },
    /// Arms a handover to the replica at the next stop of the guest's
    /// device (a live migration's switchover); `cancel` calls it off.
    Handover {
        #[serde(default = "default_handover_ms")]
        timeout_ms: u64,
        #[serde(default)]
        cancel: bool,
    },
    /// The read-only branches: tails cut at a rejoin or a resolve.
    Branches {},
    /// The Prometheus metrics text (what `--metrics-listen` serves).
    Metrics {},
    #[serde(rename = "branch-drop")]
    BranchDrop {
        name: String,
    },
}

fn default_chunk_bytes() -> u64 {
    1 << 20
}

/// A BLAKE3 key given as 64 hex digits.
pub(crate) fn parse_key(hex: &str) -> Result<[u8; 32], String> {
    let bad = || format!("key {hex:?} is not 64 hex digits");
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// How long a handover waits for the replica to catch up, and then for
/// the destination to start once the source stopped.
fn default_handover_ms() -> u64 {
    60_000
}

const COMMANDS: &[&str] = &[
    "status",
    "timeline",
    "bookmark",
    "materialize",
    "drain",
    "resume",
    "fence",
    "unfence",
    "revert",
    "export",
    "unexport",
    "replication",
    "checksums",
    "promote",
    "demote",
    "failover",
    "resolve",
    "handover",
    "branches",
    "branch-drop",
    "metrics",
];

/// What `status` reports.
#[derive(Debug, Serialize)]
struct Status {
    volume: String,
    size: u64,
    state: String,
    epoch: u64,
    /// The client being served, if any.
    attached: Option<Attached>,
    /// Why the last client was refused, if one was.
    last_refusal: Option<String>,
    io: Counters,
    exports: Vec<ExportInfo>,
    last_lsn: u64,
    durable_lsn: u64,
    /// Bytes the journal pool occupies on disk.
    journal_bytes: u64,
    journal_max: u64,
    segments_used: u64,
    segments_free: u64,
    queues: usize,
    read_only: bool,
    writethrough: bool,
    failed: Option<String>,
    /// Seconds of history the volume is set to keep, and keeps now.
    window_configured: u64,
    window_effective: u64,
    /// The oldest moment that can be viewed, materialized or reverted to.
    window_start: String,
    /// Folds the hard limit forced (each one shrank the window).
    forced_folds: u64,
    /// Journal bytes folded into base.img since the daemon started, and
    /// the seconds the folds took.
    folded_bytes: u64,
    fold_seconds: f64,
    /// Requests held now, retrying an EIO or ENOSPC on the volume's files.
    held_requests: u64,
    role: Role,
    /// This copy's tag in the Epoch records it raises.
    node: u64,
    /// Where each epoch began, and which copy raised it.
    epoch_history: Vec<EpochStart>,
    /// The lsn the primary of the current epoch sealed at, when this copy
    /// holds its seal (a promotion then needs no --force).
    sealed_lsn: Option<u64>,
    /// The time of the newest record (RFC 3339), if the journal holds one.
    last_record_time: Option<String>,
    /// Why the gate is held closed at start, if it is.
    hold: Option<&'static str>,
    /// The last handover (live migration) this node took part in.
    handover: Option<HandoverStatus>,
    /// The replication link, if the daemon replicates.
    replication: Option<ReplicationStatus>,
}

#[derive(Debug, Serialize)]
struct BookmarkInfo {
    name: String,
    lsn: u64,
    time: String,
    app_consistent: bool,
}

impl From<Bookmark> for BookmarkInfo {
    fn from(b: Bookmark) -> Self {
        BookmarkInfo {
            name: b.name,
            lsn: b.lsn,
            time: format_ns(b.timestamp_ns),
            app_consistent: b.app_consistent,
        }
    }
}

/// What `timeline` reports.
#[derive(Debug, Serialize)]
struct Timeline {
    window_configured: u64,
    window_effective: u64,
    window_start: String,
    window_end: String,
    start_lsn: u64,
    last_lsn: u64,
    flush_points: u64,
    journal_bytes: u64,
    journal_max: u64,
    forced_folds: u64,
    bookmarks: Vec<BookmarkInfo>,
}

/// A view served on its own socket (`export`).
#[derive(Debug, Clone, Serialize)]
struct ExportInfo {
    socket_path: PathBuf,
    lsn: u64,
    time: String,
    writable: bool,
    attached: Option<Attached>,
}

#[derive(Debug)]
struct ViewExport {
    info: ExportInfo,
    export: Arc<Export>,
    thread: JoinHandle<()>,
}

/// What the control socket serves.
#[derive(Debug)]
pub struct Control {
    pub volume: Arc<Volume>,
    pub live: Arc<Export>,
    views: Mutex<BTreeMap<PathBuf, ViewExport>>,
    replication: Option<Arc<Link>>,
    roles: Arc<Roles>,
}

impl Control {
    pub fn new(
        volume: Arc<Volume>,
        live: Arc<Export>,
        replication: Option<Arc<Link>>,
        roles: Arc<Roles>,
    ) -> Self {
        Control {
            volume,
            live,
            views: Mutex::default(),
            replication,
            roles,
        }
    }

    /// Flushes waiting for a sync-mode replica fail instead of waiting on,
    /// while the guard lives.
    fn release_replication_waits(&self) -> Option<ReleaseWaits<'_>> {
        self.replication.as_ref().map(|link| link.release_waits())
    }

    fn replication(&self) -> Option<ReplicationStatus> {
        self.replication
            .as_ref()
            .map(|link| link.status(&self.volume))
    }

    /// Refuses commands that would write to a replica's journal or serve
    /// its guest: its lsns are its primary's.
    fn not_on_replica(&self, what: &str) -> Result<(), String> {
        match self.volume.role() {
            Role::Replica => Err(format!(
                "this volume is a replica; {what} would write records its primary never wrote \
                 (views, export and materialize work on a replica)"
            )),
            Role::Primary => Ok(()),
        }
    }

    fn views(&self) -> MutexGuard<'_, BTreeMap<PathBuf, ViewExport>> {
        self.views.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> Status {
        let s = self.volume.stats();
        let exports = self
            .views()
            .values()
            .map(|v| ExportInfo {
                attached: v.export.attached(),
                ..v.info.clone()
            })
            .collect();
        Status {
            volume: s.uuid.to_string(),
            size: s.size,
            state: if s.failed.is_some() {
                "failed".into()
            } else {
                self.live.gate.state().to_string()
            },
            epoch: s.epoch,
            attached: self.live.attached(),
            last_refusal: self.live.last_refusal(),
            io: self.live.gate.counters(),
            exports,
            last_lsn: s.last_lsn,
            durable_lsn: s.durable_lsn,
            journal_bytes: s.journal_bytes,
            journal_max: s.journal_max,
            segments_used: s.segments_used,
            segments_free: s.segments_free,
            queues: self.live.config.num_queues,
            read_only: self.live.config.read_only,
            writethrough: s.writethrough,
            failed: s.failed,
            window_configured: s.window_configured.as_secs(),
            window_effective: s.window_effective.as_secs(),
            window_start: format_ns(s.window_start_ns),
            forced_folds: s.forced_folds,
            folded_bytes: s.folded_bytes,
            fold_seconds: s.fold_nanos as f64 / 1e9,
            held_requests: s.held_requests,
            role: self.volume.role(),
            node: self.volume.node(),
            epoch_history: self.volume.epoch_history(),
            sealed_lsn: self
                .volume
                .sealed()
                .filter(|seal| seal.epoch == s.epoch && s.last_lsn >= seal.lsn)
                .map(|seal| seal.lsn),
            last_record_time: self.volume.record_time(s.last_lsn).map(format_ns),
            hold: self.roles.hold(),
            handover: self.roles.handover_status(),
            replication: self.replication(),
        }
    }

    fn timeline(&self) -> Timeline {
        let t = self.volume.timeline();
        Timeline {
            window_configured: t.window_configured.as_secs(),
            window_effective: t.window_effective.as_secs(),
            window_start: format_ns(t.window_start_ns),
            window_end: format_ns(t.window_end_ns),
            start_lsn: t.start_lsn,
            last_lsn: t.last_lsn,
            flush_points: t.flush_points,
            journal_bytes: t.journal_bytes,
            journal_max: t.journal_max,
            forced_folds: t.forced_folds,
            bookmarks: t.bookmarks.into_iter().map(BookmarkInfo::from).collect(),
        }
    }

    /// Answers one request line; `progress` receives the progress lines a
    /// long command sends before its answer.
    pub fn answer(&self, line: &str, progress: &mut dyn FnMut(Value)) -> Value {
        match self.run(line, progress) {
            Ok(result) => json!({"version": PROTOCOL_VERSION, "ok": true, "result": result}),
            Err(message) => error(message),
        }
    }

    fn run(&self, line: &str, progress: &mut dyn FnMut(Value)) -> Result<Value, String> {
        let mut request: serde_json::Map<String, Value> =
            serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
        let version = request.remove("version");
        if version.as_ref().and_then(Value::as_u64) != Some(u64::from(PROTOCOL_VERSION)) {
            return Err(format!(
                "protocol version {} is not supported; this daemon speaks version {PROTOCOL_VERSION}",
                version.unwrap_or(Value::Null)
            ));
        }
        match request.get("command").and_then(Value::as_str) {
            Some(name) if !COMMANDS.contains(&name) => {
                return Err(format!(
                    "unknown command {name:?}; known: {}",
                    COMMANDS.join(", ")
                ))
            }
            Some(_) => {}
            None => return Err("malformed request: no \"command\"".into()),
        }
        let command: Command = serde_json::from_value(Value::Object(request))
            .map_err(|e| format!("malformed request: {e}"))?;
        let to_json = |v: Result<Value, serde_json::Error>| v.map_err(|e| e.to_string());
        match command {
            Command::Status {} => to_json(serde_json::to_value(self.status())),
            Command::Timeline {} => to_json(serde_json::to_value(self.timeline())),
            Command::Bookmark {
                name,
                app_consistent,
            } => {
                self.not_on_replica("a bookmark")?;
                let b = self
                    .volume
                    .bookmark(&name, app_consistent)
                    .map_err(|e| e.to_string())?;
                to_json(serde_json::to_value(BookmarkInfo::from(b)))
            }
            Command::Materialize { at, output } => self.materialize(&at, &output, progress),
            Command::Drain { timeout_ms, abort } => self.drain(timeout_ms, abort),
            Command::Resume {} => {
                self.not_on_replica("serving its guest")?;
                self.roles.clear_hold();
                self.live.gate.resume().map_err(|e| e.to_string())?;
                Ok(json!({"state": self.live.gate.state()}))
            }
            Command::Fence { timeout_ms } => {
                self.not_on_replica("a fence (an Epoch record)")?;
                self.fence(timeout_ms)
            }
            Command::Unfence {} => {
                self.not_on_replica("serving its guest")?;
                self.live.gate.unfence().map_err(|e| e.to_string())?;
                Ok(json!({"state": self.live.gate.state(), "epoch": self.volume.epoch()}))
            }
            Command::Revert { at } => {
                self.not_on_replica("a revert")?;
                self.revert(&at)
            }
            Command::Export {
                at,
                socket_path,
                scratch,
            } => self.export(&at, socket_path, scratch),
            Command::Unexport { socket_path } => self.unexport(&socket_path),
            Command::Checksums {
                at,
                key,
                chunk_bytes,
            } => self.checksums(&at, &key, chunk_bytes, progress),
            Command::Promote { force, drained } => {
                send_waiting(progress);
                to_json(serde_json::to_value(self.roles.promote(force, drained)?))
            }
            Command::Demote { timeout_ms } => {
                send_waiting(progress);
                to_json(serde_json::to_value(
                    self.roles.demote(Duration::from_millis(timeout_ms))?,
                ))
            }
            Command::Failover {
                force,
                timeout_ms,
                drained,
            } => {
                send_waiting(progress);
                to_json(serde_json::to_value(self.roles.failover(
                    force,
                    Duration::from_millis(timeout_ms),
                    drained,
                )?))
            }
            Command::Handover { cancel: true, .. } => {
                to_json(serde_json::to_value(self.roles.cancel_handover()?))
            }
            Command::Handover { timeout_ms, .. } => {
                send_waiting(progress);
                to_json(serde_json::to_value(
                    self.roles.arm_handover(Duration::from_millis(timeout_ms))?,
                ))
            }
            Command::Resolve { discard_this_side } => {
                if !discard_this_side {
                    return Err(
                        "resolve needs discard_this_side: true: this side's writes since \
                                the split become a branch and it becomes the other side's replica"
                            .into(),
                    );
                }
                send_waiting(progress);
                let branch = self.roles.resolve()?;
                Ok(json!({"role": self.volume.role(), "branch": branch}))
            }
            Command::Metrics {} => Ok(json!({"text": crate::metrics::render(self)?})),
            Command::Branches {} => {
                let branches: Vec<Value> = self
                    .volume
                    .branches()
                    .into_iter()
                    .map(|b| {
                        json!({
                            "name": b.name,
                            "base_lsn": b.base_lsn,
                            "first_lsn": b.first_lsn,
                            "last_lsn": b.last_lsn,
                            "first_time": format_ns(b.first_ns),
                            "last_time": format_ns(b.last_ns),
                            "epochs": b.epochs,
                            "records": b.records,
                            "bytes": b.bytes,
                            "readable": b.readable,
                            "problem": b.problem,
                        })
                    })
                    .collect();
                Ok(json!({ "branches": branches }))
            }
            Command::BranchDrop { name } => {
                self.volume.drop_branch(&name).map_err(|e| e.to_string())?;
                Ok(json!({ "dropped": name }))
            }
            Command::Replication {} => match self.replication() {
                Some(status) => to_json(serde_json::to_value(status)),
                None => Err(
                    "this daemon does not replicate (serve it with --replicate-to or \
                             --replication-listen)"
                        .into(),
                ),
            },
        }
    }

    fn drain(&self, timeout_ms: u64, abort: bool) -> Result<Value, String> {
        let gate = &self.live.gate;
        let report = gate
            .drain(Duration::from_millis(timeout_ms), || {
                abort.then(|| (self.release_replication_waits(), self.volume.release_held()))
            })
            .map_err(|e| e.to_string())?;
        self.volume
            .flush()
            .map_err(|e| format!("drained, but the flush failed: {e}"))?;
        tracing::info!(?report, "drained");
        let mut answer = serde_json::to_value(report).map_err(|e| e.to_string())?;
        answer["state"] = json!(gate.state());
        answer["last_lsn"] = json!(self.volume.last_lsn());
        Ok(answer)
    }

    /// Closes the gate, waits for (and releases) the requests in flight,
    /// raises the epoch durably, then ends the client's connection.
    fn fence(&self, timeout_ms: u64) -> Result<Value, String> {
        let gate = &self.live.gate;
        gate.fence(Duration::from_millis(timeout_ms), || {
            (self.release_replication_waits(), self.volume.release_held())
        })
        .map_err(|e| e.to_string())?;
        let epoch = self
            .volume
            .raise_epoch()
            .map_err(|e| format!("the volume is closed, but raising its epoch failed: {e}"))?;
        gate.set_epoch(epoch);
        let disconnected = self.live.attached();
        self.live.disconnect();
        tracing::warn!(
            event = rewind_journal::events::FENCED,
            volume = %self.volume.config().uuid,
            epoch,
            "fenced"
        );
        Ok(json!({
            "state": gate.state(),
            "epoch": epoch,
            "disconnected": disconnected,
            "last_lsn": self.volume.last_lsn(),
        }))
    }

    fn revert(&self, at: &str) -> Result<Value, String> {
        let gate = &self.live.gate;
        match gate.state() {
            State::Drained | State::Fenced => {}
            state => {
                return Err(format!(
                    "the volume is {state}; revert needs it drained: run `rewindctl drain` first"
                ))
            }
        }
        if let Some(client) = self.live.attached() {
            return Err(format!(
                "a client is attached ({}); shut the VM down before reverting its disk",
                client
                    .attach_id
                    .map_or_else(|| "unidentified".into(), |id| format!("attach id {id}"))
            ));
        }
        let at: PointInTime = at.parse()?;
        let to = self.volume.resolve(&at).map_err(|e| e.to_string())?;
        let lsn = self
            .volume
            .revert(&PointInTime::Lsn(to))
            .map_err(|e| e.to_string())?;
        gate.note_modification();
        Ok(json!({"lsn": lsn, "to_lsn": to}))
    }

    fn export(&self, at: &str, socket_path: PathBuf, scratch: bool) -> Result<Value, String> {
        if !socket_path.is_absolute() {
            return Err(format!(
                "socket path {} must be an absolute path (the daemon runs elsewhere)",
                socket_path.display()
            ));
        }
        let mut views = self.views();
        if views.contains_key(&socket_path) || socket_path.exists() {
            return Err(format!(
                "{} exists; remove it or choose another --socket-path",
                socket_path.display()
            ));
        }
        let at: PointInTime = at.parse()?;
        let view = if scratch {
            self.volume.view_writable(&at)
        } else {
            self.volume.view(&at)
        }
        .map_err(|e| e.to_string())?;
        let info = ExportInfo {
            socket_path: socket_path.clone(),
            lsn: view.lsn(),
            time: format_ns(view.timestamp_ns()),
            writable: scratch,
            attached: None,
        };
        let device = ViewDevice {
            view,
            block_size: BlockDevice::block_size(self.volume.as_ref()),
            uuid: BlockDevice::uuid(self.volume.as_ref()),
        };
        let config = ExportConfig {
            read_only: !scratch,
            ..self.live.config.clone()
        };
        let listener = Listener::new(&socket_path, false)
            .map_err(|e| format!("cannot listen on {}: {e}", socket_path.display()))?;
        let export = Arc::new(Export::new(
            Arc::new(device),
            config,
            Arc::new(Gate::new(1)),
        ));
        let thread = {
            let export = export.clone();
            std::thread::Builder::new()
                .name("rewind-export".into())
                .spawn(move || {
                    if let Err(e) = export.serve(listener) {
                        tracing::warn!(
                            event = rewind_journal::events::EXPORT_FAILED,
                            volume = %export.volume_id(),
                            error = %e,
                            "export ended"
                        );
                    }
                })
                .map_err(|e| format!("cannot start the export: {e}"))?
        };
        tracing::info!(socket = %socket_path.display(), lsn = info.lsn, scratch, "exported a view");
        let answer = serde_json::to_value(&info).map_err(|e| e.to_string());
        views.insert(
            socket_path,
            ViewExport {
                info,
                export,
                thread,
            },
        );
        answer
    }

    fn unexport(&self, socket_path: &Path) -> Result<Value, String> {
        let view = self.views().remove(socket_path).ok_or_else(|| {
            format!(
                "{} is not an export of this daemon (see `rewindctl status`)",
                socket_path.display()
            )
        })?;
        stop_view(view);
        Ok(json!({"socket_path": socket_path}))
    }

    /// Stops every view export (the daemon is stopping).
    pub fn stop_exports(&self) {
        let views = std::mem::take(&mut *self.views());
        for view in views.into_values() {
            stop_view(view);
        }
    }

    /// Keyed hashes of every chunk of the disk at `at`; chunks the view
    /// knows are zero (holes, zeroed ranges) are hashed without reading.
    fn checksums(
        &self,
        at: &str,
        key: &str,
        chunk_bytes: u64,
        progress: &mut dyn FnMut(Value),
    ) -> Result<Value, String> {
        let key = parse_key(key)?;
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(4096) || chunk_bytes > 64 << 20 {
            return Err(format!(
                "chunk_bytes {chunk_bytes} must be a multiple of 4096 up to 64 MiB"
            ));
        }
        let at: PointInTime = at.parse()?;
        let view = self.volume.view(&at).map_err(|e| e.to_string())?;
        let size = view.size();
        let mut hashes = Vec::with_capacity(size.div_ceil(chunk_bytes) as usize);
        let mut buf = vec![0u8; chunk_bytes as usize];
        let mut shown = u64::MAX;
        let mut offset = 0;
        while offset < size {
            let len = chunk_bytes.min(size - offset);
            let chunk = &mut buf[..len as usize];
            if view.may_hold_data(offset, len).map_err(|e| e.to_string())? {
                view.read(offset, chunk).map_err(|e| e.to_string())?;
            } else {
                chunk.fill(0);
            }
            hashes.push(blake3::keyed_hash(&key, chunk).to_hex().to_string());
            offset += len;
            let percent = offset * 100 / size;
            if percent != shown {
                shown = percent;
                progress(
                    json!({"version": PROTOCOL_VERSION, "progress": {"done": offset, "total": size}}),
                );
            }
        }
        Ok(json!({
            "lsn": view.lsn(),
            "size": size,
            "chunk_bytes": chunk_bytes,
            "hashes": hashes,
        }))
    }

    fn materialize(
        &self,
        at: &str,
        output: &Path,
        progress: &mut dyn FnMut(Value),
    ) -> Result<Value, String> {
        if !output.is_absolute() {
            return Err(format!(
                "output {} must be an absolute path (the daemon runs elsewhere)",
                output.display()
            ));
        }
        let at: PointInTime = at.parse()?;
        // One progress line per percent (serve_client repeats the last one
        // while a percent takes long).
        let mut shown = u64::MAX;
        let mut report = |done: u64, total: u64| {
            let percent = done.saturating_mul(100) / total.max(1);
            if percent != shown {
                shown = percent;
                progress(
                    json!({"version": PROTOCOL_VERSION, "progress": {"done": done, "total": total}}),
                );
            }
        };
        let lsn = self
            .volume
            .materialize(&at, output, &mut report)
            .map_err(|e| e.to_string())?;
        Ok(json!({
            "output": output,
            "lsn": lsn,
            "size": self.volume.size(),
        }))
    }
}

/// Ends a view export's connection and accept loop, removes its socket,
/// then drops the view (and its scratch overlay).
fn stop_view(view: ViewExport) {
    view.export.stop();
    if view.thread.join().is_err() {
        tracing::warn!(
            event = rewind_journal::events::THREAD_PANICKED,
            volume = %view.export.volume_id(),
            "an export thread panicked"
        );
    }
    let _ = std::fs::remove_file(&view.info.socket_path);
    tracing::info!(socket = %view.info.socket_path.display(), "unexported");
}

/// The progress line of a command that waits with nothing to count: 0 of
/// 0, which serve_client repeats every heartbeat. Every role change can
/// outlast rewindctl's wait for a line (`timeout_ms` + 60 s): it first
/// waits for any other role change to end (a handover's seal holds it for
/// up to twice that handover's timeout); then demote, failover and
/// handover wait for up to their `timeout_ms`, demote twice (the requests
/// in flight, then the replica's ack).
fn send_waiting(progress: &mut dyn FnMut(Value)) {
    progress(json!({"version": PROTOCOL_VERSION, "progress": {"done": 0, "total": 0}}));
}

fn error(message: String) -> Value {
    json!({"version": PROTOCOL_VERSION, "ok": false, "error": message})
}

/// Binds the socket (mode 0600) and serves it on a thread until the process
/// ends. The socket file is removed by [`ControlSocket`]'s drop.
pub fn start(path: &Path, control: Arc<Control>) -> Result<ControlSocket, ControlError> {
    if path.exists() {
        return Err(ControlError::Exists(path.to_owned()));
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    std::thread::Builder::new()
        .name("rewind-control".into())
        .spawn(move || {
            let connections = Connections::new(MAX_CONNECTIONS);
            let over_cap = Connections::new(MAX_QUERIES_OVER_CAP);
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        std::thread::sleep(ACCEPT_RETRY);
                        continue;
                    }
                };
                let (place, only_queries) = match connections.enter() {
                    Some(place) => (place, false),
                    None => {
                        connections.warn_full(&control);
                        match over_cap.enter() {
                            Some(place) => (place, true),
                            None => {
                                refuse_over_cap(stream);
                                continue;
                            }
                        }
                    }
                };
                let control = control.clone();
                // One thread per client, as a long command (a
                // materialize) must not hold up the others; a quiet
                // client's thread ends after TIMING.idle.
                let spawned = std::thread::Builder::new()
                    .name("rewind-control-client".into())
                    .spawn(move || {
                        let _place = place;
                        if only_queries {
                            serve_query_over_cap(stream, &control);
                        } else {
                            serve_client(stream, &control, TIMING);
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a control client thread");
                }
            }
        })
        .map_err(bind_err)?;
    Ok(ControlSocket {
        path: path.to_owned(),
    })
}

/// Past [`MAX_CONNECTIONS`], this many more connections are read for one
/// request each, answered only if it is a query ([`QUERIES`]), so that the
/// Pacemaker agent's monitor (`rewindctl status`) still sees the daemon
/// alive; other requests are refused, never run late for a client that
/// gave up (a forced failover run after its operator promoted the other
/// node instead would be a split brain). Past these too, a connection gets
/// the refusal unread.
pub const MAX_QUERIES_OVER_CAP: usize = 8;

/// Commands that change nothing: the ones answered past the cap.
const QUERIES: &[&str] = &["status", "timeline", "replication", "branches", "metrics"];

/// How long a connection past the cap may take to send its request.
const QUERY_OVER_CAP_WAIT: Duration = Duration::from_secs(5);

/// Connections being served, up to a number.
#[derive(Debug)]
struct Connections {
    max: usize,
    open: AtomicUsize,
    /// `control_connections_full` was logged since a place last came
    /// free: a client retrying in a loop logs one line, not one a try.
    warned: AtomicBool,
}

impl Connections {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            max,
            open: AtomicUsize::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// A place for one more connection, unless `max` are open.
    fn enter(self: &Arc<Self>) -> Option<Place> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()?;
        Some(Place(self.clone()))
    }

    fn warn_full(&self, control: &Control) {
        if !self.warned.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                event = rewind_journal::events::CONTROL_CONNECTIONS_FULL,
                volume = %control.volume.config().uuid,
                "{} control connections are open: new ones get answers to queries \
                 only, until one ends",
                self.max
            );
        }
    }
}

/// A connection's place, freed when it is dropped, however its thread
/// ends (or fails to start).
#[derive(Debug)]
struct Place(Arc<Connections>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.warned.store(false, Ordering::Release);
    }
}

/// What a connection past the cap gets for a request that is not a query.
fn over_cap_error() -> Value {
    error(format!(
        "{MAX_CONNECTIONS} control connections are open, the most this daemon serves at once: \
         only queries ({}) are answered; try again when one has ended",
        QUERIES.join(", ")
    ))
}

/// Answers one request of a connection past the cap, if it is a query.
fn serve_query_over_cap(stream: UnixStream, control: &Control) {
    let timing = Timing {
        idle: QUERY_OVER_CAP_WAIT,
        request: QUERY_OVER_CAP_WAIT,
        ..TIMING
    };
    serve_lines(stream, control, timing, |line| {
        let command = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|request| request["command"].as_str().map(str::to_owned));
        command.is_some_and(|c| QUERIES.contains(&c.as_str()))
    });
}

/// Sends the refusal to a connection past every cap, unread, and closes it.
/// Never waits for the client: the accept thread serves everyone.
fn refuse_over_cap(stream: UnixStream) {
    let line = format!("{}\n", over_cap_error());
    // A fresh socket's buffer takes the line whole.
    let mut writer = &stream;
    if let Err(e) = stream
        .set_nonblocking(true)
        .and_then(|()| writer.write_all(line.as_bytes()))
    {
        tracing::debug!(error = %e, "a control connection past the cap went away");
    }
}

/// Removes the control socket file when the daemon stops.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Only the daemon's own user and root may use the socket.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let own = rustix::process::geteuid();
    if cred.uid == own || cred.uid.is_root() {
        Ok(())
    } else {
        Err(format!(
            "uid {} may not use this control socket (only uid {} and root)",
            cred.uid.as_raw(),
            own.as_raw()
        ))
    }
}

fn serve_client(stream: UnixStream, control: &Control, timing: Timing) {
    serve_lines(stream, control, timing, |_| true);
}

/// Answers the requests of one connection, in order, while `allowed`
/// takes them; the first it does not take gets [`over_cap_error`] and ends
/// the connection.
fn serve_lines(
    stream: UnixStream,
    control: &Control,
    timing: Timing,
    allowed: impl Fn(&str) -> bool,
) {
    let mut out = match stream.try_clone() {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(error = %e, "control client");
            return;
        }
    };
    if let Err(reason) = peer_allowed(&stream) {
        tracing::warn!(
            event = rewind_journal::events::CONTROL_CLIENT_REFUSED,
            volume = %control.volume.config().uuid,
            "{reason}"
        );
        let _ = writeln!(out, "{}", error(reason));
        return;
    }
    // A client that stops reading its answers must not hold its thread
    // forever (read_request bounds the reads).
    if let Err(e) = out.set_write_timeout(Some(timing.idle)) {
        tracing::warn!(error = %e, "control client: cannot set its timeouts");
        return;
    }
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_request(&mut reader, timing) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                let _ = writeln!(out, "{}", error(e.to_string()));
                return;
            }
        };
        if !allowed(&line) {
            let _ = writeln!(out, "{}", over_cap_error());
            return;
        }
        let answer = answer_sending_progress(&out, timing.heartbeat, |progress| {
            control.answer(line.trim_end(), progress)
        });
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// Why no request line was read; each ends the connection.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("no request for {0:?}: closing the connection")]
    Idle(Duration),
    #[error(
        "the request did not end within {0:?} of its first byte (a newline ends it): \
         closing the connection"
    )]
    TooSlow(Duration),
    #[error("request longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("unreadable request: {0}")]
    Unreadable(std::io::Error),
    #[error("unreadable request: it is not UTF-8")]
    NotUtf8,
}

/// Reads one request line: up to its newline, or to the end of the stream
/// (the last request of a client that shut its side down); `None` at the
/// end of the stream. A quiet client is let go after `timing.idle`, and a
/// line must end within `timing.request` of its first byte: a client
/// trickling one in, a byte at a time, must not hold its thread forever.
fn read_request(
    reader: &mut BufReader<UnixStream>,
    timing: Timing,
) -> Result<Option<String>, RequestError> {
    let text = |line: Vec<u8>| {
        String::from_utf8(line)
            .map(Some)
            .map_err(|_| RequestError::NotUtf8)
    };
    let mut line = Vec::new();
    let mut deadline: Option<Instant> = None;
    loop {
        let wait = match deadline {
            None => timing.idle,
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
        };
        // set_read_timeout refuses zero.
        if wait.is_zero() {
            return Err(RequestError::TooSlow(timing.request));
        }
        reader
            .get_ref()
            .set_read_timeout(Some(wait))
            .map_err(RequestError::Unreadable)?;
        let buffered = match reader.fill_buf() {
            Ok(buffered) => buffered,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(match deadline {
                    None => RequestError::Idle(timing.idle),
                    Some(_) => RequestError::TooSlow(timing.request),
                });
            }
            Err(e) => return Err(RequestError::Unreadable(e)),
        };
        if buffered.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                text(line)
            };
        }
        deadline.get_or_insert_with(|| Instant::now() + timing.request);
        let newline = buffered.iter().position(|&b| b == b'\n');
        let taken = newline.map_or(buffered.len(), |at| at + 1);
        line.extend_from_slice(&buffered[..taken]);
        reader.consume(taken);
        if line.len() - usize::from(newline.is_some()) >= MAX_LINE {
            return Err(RequestError::TooLong);
        }
        if newline.is_some() {
            return text(line);
        }
    }
}

/// How long a control connection may stay quiet, how long one request
/// line may take to arrive from its first byte, and how often a long
/// command's progress line is sent again while nothing else was sent.
#[derive(Debug, Clone, Copy)]
struct Timing {
    idle: Duration,
    request: Duration,
    heartbeat: Duration,
}

const TIMING: Timing = Timing {
    // Clients (rewindctl, the Pacemaker agent through it) connect for
    // each request; a minute is far beyond any gap between their lines.
    idle: Duration::from_secs(60),
    // A line is sent at once: a client trickling one in must not hold a
    // thread for ever.
    request: Duration::from_secs(60),
    // Well within a client's wait for a line (rewindctl: 60 s and more).
    heartbeat: Duration::from_secs(5),
};

/// Answers a request through `answer`, sending its progress lines to `out`
/// and, while the command runs without sending any, its last progress line
/// again every `heartbeat`: a percent of a large disk can take minutes, and
/// clients give up on a connection that stays quiet.
fn answer_sending_progress(
    out: &UnixStream,
    heartbeat: Duration,
    answer: impl FnOnce(&mut dyn FnMut(Value)) -> Value,
) -> Value {
    // The last progress line and when anything was last sent; `None` once
    // a send failed: a client that went away notices at the answer.
    let last: Mutex<Option<(Option<Value>, Instant)>> = Mutex::new(Some((None, Instant::now())));
    let send = |line: Option<Value>| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        let Some((shown, at)) = last.as_mut() else {
            return;
        };
        let line = match line {
            Some(line) => line,
            None if at.elapsed() < heartbeat => return,
            None => match shown {
                Some(line) => line.clone(),
                None => return,
            },
        };
        let mut writer = out;
        if writeln!(writer, "{line}").is_err() {
            *last = None;
            return;
        }
        *shown = Some(line);
        *at = Instant::now();
    };
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let send = &send;
        let repeater = std::thread::Builder::new()
            .name("rewind-control-progress".into())
            .spawn_scoped(scope, move || {
                while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(heartbeat / 4) {
                    send(None);
                }
            });
        if let Err(e) = repeater {
            tracing::warn!(error = %e, "cannot start a thread repeating progress lines");
        }
        let answer = answer(&mut |line| send(Some(line)));
        drop(done);
        answer
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> Control {
        let volume = Arc::new(crate::test_support::volume(8 << 20));
        let config = ExportConfig {
            num_queues: 2,
            queue_size: 256,
            read_only: false,
        };
        let gate = Arc::new(Gate::new(volume.epoch()));
        let live = Arc::new(Export::new(volume.clone(), config, gate));
        let roles = Roles::start(volume.clone(), live.clone(), None, None);
        Control::new(volume, live, None, roles)
    }

    #[test]
    fn status_reports_the_volume() {
        let c = control();
        c.volume.write(0, &[1u8; 4096]).expect("write");
        let a = c.answer(r#"{"version": 1, "command": "status"}"#, &mut |_| {});
        assert_eq!(a["ok"], true, "{a}");
        let r = &a["result"];
        assert_eq!(
            (r["state"].as_str(), r["last_lsn"].as_u64()),
            (Some("serving"), Some(1))
        );
        assert_eq!(r["size"], 8 << 20);
        assert_eq!(r["queues"], 2);
        assert!(r["journal_bytes"].as_u64().is_some_and(|b| b > 0));
        assert_eq!(r["epoch"], 1);
        assert_eq!(r["window_configured"], 3600);
        assert!(
            r["window_start"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{r}"
        );
    }

    fn ok(c: &Control, line: &str) -> Value {
        let a = c.answer(line, &mut |_| {});
        assert_eq!(a["ok"], true, "{line}: {a}");
        a["result"].clone()
    }

    fn refused(c: &Control, line: &str) -> String {
        let a = c.answer(line, &mut |_| {});
        assert_eq!(a["ok"], false, "{line}: {a}");
        a["error"].as_str().expect("error message").to_owned()
    }

    #[test]
    fn bookmarks_show_in_the_timeline() {
        let c = control();
        c.volume.write(0, &[1u8; 4096]).expect("write");
        let b = ok(
            &c,
            r#"{"version": 1, "command": "bookmark", "name": "before-upgrade"}"#,
        );
        assert_eq!(
            (b["name"].as_str(), b["lsn"].as_u64()),
            (Some("before-upgrade"), Some(2))
        );
        let dup = refused(
            &c,
            r#"{"version": 1, "command": "bookmark", "name": "before-upgrade"}"#,
        );
        assert!(dup.contains("already exists"), "{dup}");
        let bad = refused(
            &c,
            r#"{"version": 1, "command": "bookmark", "name": "a b"}"#,
        );
        assert!(bad.contains("bookmark name"), "{bad}");
        let q = ok(
            &c,
            r#"{"version": 1, "command": "bookmark", "name": "frozen", "app_consistent": true}"#,
        );
        assert_eq!(q["app_consistent"], true, "{q}");
        let t = ok(&c, r#"{"version": 1, "command": "timeline"}"#);
        assert_eq!(t["bookmarks"][0]["name"], "before-upgrade");
        assert_eq!(t["bookmarks"][0]["app_consistent"], false, "{t}");
        assert_eq!(t["bookmarks"][1]["name"], "frozen");
        assert_eq!(t["bookmarks"][1]["app_consistent"], true, "{t}");
        assert_eq!(
            t["last_lsn"], 5,
            "write, bookmark, flush, bookmark, flush: {t}"
        );
        assert_eq!(t["window_configured"], 3600);
        assert!(t["flush_points"].as_u64().is_some_and(|n| n >= 1), "{t}");
    }

    #[test]
    fn materialize_streams_progress_then_answers() {
        let c = control();
        let lsn = c.volume.write(4096, &[7u8; 4096]).expect("write");
        c.volume.write(4096, &[8u8; 4096]).expect("overwrite");
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("at.raw");
        let line = json!({"version": 1, "command": "materialize", "at": format!("lsn:{lsn}"), "output": out}).to_string();
        let mut lines = Vec::new();
        let a = c.answer(&line, &mut |p| lines.push(p));
        assert_eq!(a["ok"], true, "{a}");
        assert_eq!(a["result"]["lsn"], lsn);
        let last = &lines.last().expect("progress lines")["progress"];
        assert_eq!(last["done"], last["total"], "{lines:?}");
        let image = std::fs::read(&out).expect("image");
        assert_eq!(image.len(), 8 << 20);
        assert!(image[4096..8192].iter().all(|&b| b == 7));

        let again = refused(&c, &line);
        assert!(again.contains("already exists"), "{again}");
        let relative = refused(
            &c,
            r#"{"version": 1, "command": "materialize", "at": "lsn:1", "output": "x.raw"}"#,
        );
        assert!(relative.contains("absolute"), "{relative}");
        let out2 = dir.path().join("b.raw");
        for (at, want) in [
            ("yesterday", "RFC 3339"),
            ("lsn:99", "outside the history window"),
            ("-10h", "outside the history window"),
        ] {
            let line = json!({"version": 1, "command": "materialize", "at": at, "output": out2})
                .to_string();
            let message = refused(&c, &line);
            assert!(message.contains(want), "{at}: {message}");
        }
        assert!(!out2.exists(), "nothing written for a refused request");
    }

    #[test]
    fn bad_requests_get_a_clear_error() {
        let c = control();
        for (line, want) in [
            ("{not json", "malformed request"),
            (r#"{"version": 1}"#, "malformed request"),
            (
                r#"{"version": 1, "command": "status", "extra": 1}"#,
                "malformed request",
            ),
            (
                r#"{"version": 2, "command": "status"}"#,
                "protocol version 2",
            ),
            (r#"{"version": 1, "command": "explode"}"#, "unknown command"),
            (
                r#"{"version": 1, "command": "bookmark"}"#,
                "missing field `name`",
            ),
            (r#"{"command": "status"}"#, "protocol version null"),
            (r#"[1, 2]"#, "malformed request"),
        ] {
            let a = c.answer(line, &mut |_| {});
            assert_eq!(a["ok"], false, "{line}");
            let message = a["error"].as_str().expect("error message");
            assert!(message.contains(want), "{line}: {message}");
            assert_eq!(a["version"], PROTOCOL_VERSION);
        }
    }

    #[test]
    fn drain_resume_fence_and_revert_follow_the_state() {
        let c = control();
        let first = c.volume.write(0, &[1u8; 4096]).expect("write");
        c.volume.write(0, &[2u8; 4096]).expect("overwrite");
        let at = format!(r#""at": "lsn:{first}""#);
        let revert = format!(r#"{{"version": 1, "command": "revert", {at}}}"#);
        let serving = refused(&c, &revert);
        assert!(serving.contains("rewindctl drain"), "{serving}");

        let d = ok(
            &c,
            r#"{"version": 1, "command": "drain", "timeout_ms": 1000}"#,
        );
        assert_eq!(d["state"], "drained", "{d}");
        assert_eq!(
            (d["in_flight"].as_u64(), d["already_drained"].as_bool()),
            (Some(0), Some(false))
        );
        let again = ok(&c, r#"{"version": 1, "command": "drain", "abort": true}"#);
        assert_eq!(again["already_drained"], true);
        let r = ok(&c, &revert);
        assert_eq!(r["to_lsn"], first);
        let mut buf = [0u8; 4096];
        c.volume.read(0, &mut buf).expect("read");
        assert_eq!(buf, [1u8; 4096], "the disk is as at lsn {first}");
        assert_eq!(
            c.live.gate.counters().modifying,
            1,
            "a revert is a modification"
        );
        let status = ok(&c, r#"{"version": 1, "command": "status"}"#);
        assert_eq!(status["state"], "drained");
        ok(&c, r#"{"version": 1, "command": "resume"}"#);

        let f = ok(&c, r#"{"version": 1, "command": "fence"}"#);
        assert_eq!(
            (f["state"].as_str(), f["epoch"].as_u64()),
            (Some("fenced"), Some(2))
        );
        let resume = refused(&c, r#"{"version": 1, "command": "resume"}"#);
        assert!(resume.contains("unfence"), "{resume}");
        let drain = refused(&c, r#"{"version": 1, "command": "drain"}"#);
        assert!(drain.contains("unfence"), "{drain}");
        let u = ok(&c, r#"{"version": 1, "command": "unfence"}"#);
        assert_eq!(
            (u["state"].as_str(), u["epoch"].as_u64()),
            (Some("serving"), Some(2))
        );
        assert_eq!(c.volume.epoch(), 2);
        let wrong = refused(
            &c,
            r#"{"version": 1, "command": "drain", "timeout_ms": "soon"}"#,
        );
        assert!(wrong.contains("malformed request"), "{wrong}");
    }

    #[test]
    fn views_are_exported_on_their_own_socket_and_unexported() {
        let c = control();
        let lsn = c.volume.write(0, &[1u8; 4096]).expect("write");
        let dir = tempfile::tempdir().expect("tmp");
        let socket = dir.path().join("view.sock");
        let line = |path: &Path| {
            json!({"version": 1, "command": "export", "at": format!("lsn:{lsn}"), "socket_path": path, "scratch": true})
                .to_string()
        };
        let relative = refused(&c, &line(Path::new("view.sock")));
        assert!(relative.contains("absolute"), "{relative}");
        let e = ok(&c, &line(&socket));
        assert_eq!(
            (e["lsn"].as_u64(), e["writable"].as_bool()),
            (Some(lsn), Some(true))
        );
        assert!(socket.exists(), "the socket is there");
        let twice = refused(&c, &line(&socket));
        assert!(twice.contains("exists"), "{twice}");
        let status = ok(&c, r#"{"version": 1, "command": "status"}"#);
        assert_eq!(
            status["exports"][0]["socket_path"],
            json!(socket),
            "{status}"
        );

        let unexport =
            json!({"version": 1, "command": "unexport", "socket_path": socket}).to_string();
        ok(&c, &unexport);
        assert!(!socket.exists(), "the socket is removed");
        let gone = refused(&c, &unexport);
        assert!(gone.contains("not an export"), "{gone}");
        let outside =
            json!({"version": 1, "command": "export", "at": "lsn:99", "socket_path": socket})
                .to_string();
        let message = refused(&c, &outside);
        assert!(message.contains("outside the history window"), "{message}");
        assert!(!socket.exists());
    }

    /// Holds a request meeting EIO or ENOSPC for ten minutes.
    fn patient() -> rewind_journal::OpenOptions {
        rewind_journal::OpenOptions {
            retry: rewind_journal::RetryPolicy {
                max_hold: Duration::from_secs(600),
                first_backoff: Duration::from_millis(1),
            },
            ..rewind_journal::OpenOptions::default()
        }
    }

    /// The control of a one-queue export of `volume`.
    fn control_of(volume: Volume) -> Control {
        let volume = Arc::new(volume);
        let config = ExportConfig {
            num_queues: 1,
            queue_size: 16,
            read_only: false,
        };
        let live = Arc::new(Export::new(volume.clone(), config, Arc::new(Gate::new(1))));
        let roles = Roles::start(volume.clone(), live.clone(), None, None);
        Control::new(volume, live, None, roles)
    }

    #[test]
    fn drain_with_abort_fails_a_request_held_on_a_storage_error() {
        use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
        let fs = FaultStorage::new();
        let c = control_of(crate::test_support::volume_on(&fs, 8 << 20, patient()));
        fs.inject(Fault::always(FaultOp::Write, 5).on_paths_containing(".seg"));
        std::thread::scope(|s| {
            // A queue's request, held retrying the EIO.
            let pass = c.live.gate.enter(1).expect("serving");
            let queue = s.spawn(|| {
                let status = match c.volume.write(0, &[1u8; 4096]) {
                    Ok(_) => crate::request::Status::Ok,
                    Err(_) => crate::request::Status::IoErr,
                };
                pass.finish(status, true);
            });
            let d = c.answer(
                r#"{"version": 1, "command": "drain", "timeout_ms": 60000, "abort": true}"#,
                &mut |_| {},
            );
            queue.join().expect("queue");
            // The volume failed with the write: the drain says so.
            assert_eq!(d["ok"], false, "{d}");
            let message = d["error"].as_str().expect("error");
            assert!(
                message.contains("drained, but the flush failed"),
                "{message}"
            );
        });
        assert_eq!(c.live.gate.state(), State::Drained);
        let io = c.live.gate.counters();
        assert_eq!((io.completed, io.failed), (1, 1), "failed with IOERR");
    }

    #[test]
    fn drain_with_abort_fails_a_write_waiting_at_the_journal_hard_limit() {
        use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
        let fs = FaultStorage::new();
        // Eight 64 KiB segments, and folds that cannot free any of them.
        let settings = rewind_journal::VolumeSettings {
            segment_size: 64 << 10,
            journal_max: 8 * (64 << 10),
            journal_warn: 4 * (64 << 10),
            ..rewind_journal::VolumeSettings::new(8 << 20)
        };
        let c = control_of(crate::test_support::volume_with(&fs, &settings, patient()));
        fs.inject(Fault::always(FaultOp::Write, 5).on_paths_containing("base.img"));
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            // A queue writing until the journal is full, where its last
            // request waits for a segment.
            let pass = c.live.gate.enter(1).expect("serving");
            let queue = s.spawn(|| {
                let refused =
                    (0..1000u64).find(|i| c.volume.write(i * 16384, &[1u8; 16384]).is_err());
                assert!(refused.is_some(), "the journal never filled");
                pass.finish(crate::request::Status::IoErr, true);
            });
            let d = c.answer(
                r#"{"version": 1, "command": "drain", "timeout_ms": 60000, "abort": true}"#,
                &mut |_| {},
            );
            queue.join().expect("queue");
            assert_eq!(d["ok"], true, "{d}");
            assert_eq!(d["result"]["state"], "drained", "{d}");
        });
        let io = c.live.gate.counters();
        assert_eq!((io.completed, io.failed), (1, 1), "failed with IOERR");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
    }

    /// Serves `client`'s peer end on a thread; returns every line it sent
    /// until it closed the connection, once `talk` is done.
    fn serve_pair(timing: Timing, talk: impl FnOnce(&mut UnixStream)) -> Vec<Value> {
        let c = control();
        let (mut client, server) = UnixStream::pair().expect("pair");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        std::thread::scope(|scope| {
            scope.spawn(|| serve_client(server, &c, timing));
            talk(&mut client);
            BufReader::new(client)
                .lines()
                .map(|line| serde_json::from_str(&line.expect("a line before EOF")).expect("JSON"))
                .collect()
        })
    }

    #[test]
    fn a_last_request_without_its_newline_is_answered() {
        let lines = serve_pair(TIMING, |client| {
            client
                .write_all(br#"{"version": 1, "command": "status"}"#)
                .expect("send");
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["ok"], true, "{lines:?}");
        assert_eq!(lines[0]["result"]["state"], "serving", "{lines:?}");

        // A line that reaches the limit is still refused as too long
        // (all of it sent: data left unread would reset the connection).
        let lines = serve_pair(TIMING, |client| {
            client.write_all(&vec![b' '; MAX_LINE]).expect("send");
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let message = lines[0]["error"].as_str().expect("error");
        assert!(message.contains("longer than 65536 bytes"), "{message}");
    }

    #[test]
    fn a_quiet_client_is_let_go() {
        let timing = Timing {
            idle: Duration::from_millis(300),
            ..TIMING
        };
        let started = Instant::now();
        let lines = serve_pair(timing, |client| {
            writeln!(client, r#"{{"version": 1, "command": "status"}}"#).expect("send");
            // Then nothing: not even a shutdown.
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["ok"], true, "{lines:?}");
        let message = lines[1]["error"].as_str().expect("error");
        assert!(message.contains("no request for"), "{message}");
    }

    #[test]
    fn a_request_trickled_in_is_cut_off_at_its_deadline() {
        let timing = Timing {
            request: Duration::from_millis(300),
            ..TIMING
        };
        let started = Instant::now();
        let lines = serve_pair(timing, |client| {
            // A byte every 20 ms (each far within the 60 s the daemon
            // waits for the next one), until the daemon ends the
            // connection, or for 10 s.
            while started.elapsed() < Duration::from_secs(10) && client.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(300)..Duration::from_secs(5)).contains(&took),
            "{took:?}"
        );
        assert_eq!(lines.len(), 1, "{lines:?}");
        let message = lines[0]["error"].as_str().expect("error");
        assert!(
            message.contains("did not end within 300ms of its first byte"),
            "{message}"
        );
    }

    #[test]
    fn a_slow_command_repeats_its_progress() {
        let (client, server) = UnixStream::pair().expect("pair");
        let answer = answer_sending_progress(&server, Duration::from_millis(100), |progress| {
            progress(json!({"version": 1, "progress": {"done": 1, "total": 100}}));
            std::thread::sleep(Duration::from_millis(800));
            json!({"version": 1, "ok": true, "result": {}})
        });
        assert_eq!(answer["ok"], true);
        drop(server);
        let lines: Vec<Value> = BufReader::new(client)
            .lines()
            .map(|line| serde_json::from_str(&line.expect("line")).expect("JSON"))
            .collect();
        assert!(lines.len() >= 4, "{lines:?}");
        assert!(
            lines.iter().all(|l| l["progress"]["done"] == 1),
            "{lines:?}"
        );
    }
}
