//! Running `rewind-blk`: creating volumes and serving them.
//!
//! SIGTERM or SIGINT ends every connection (their queues finish what they
//! took), flushes the volume and exits.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rewind_journal::{BaseImage, ImportMode, OpenOptions, OsStorage, RetryPolicy, Role, Volume};
use vhost::vhost_user::Listener;

use crate::config::{CertArgs, CreateArgs, Listen, Replication, ServeConfig};
use crate::control::{self, Control};
use crate::detach::{Detacher, OnStorageError};
use crate::device::{BlockDevice, ReplicatedVolume};
use crate::export::{Export, ExportError};
use crate::failover::{Roles, SenderStart};
use crate::gate::Gate;
use crate::replication::tls::{self, TlsContext, TlsError};
use crate::replication::{self as repl, Link};
use crate::schedule::Scheduler;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Volume(#[from] rewind_journal::Error),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        source: vhost::vhost_user::Error,
    },
    #[error("{0}")]
    Export(#[from] ExportError),
    #[error("--fd {0} is not an open listening socket")]
    NotListening(i32),
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Control(#[from] control::ControlError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("replication: {0}")]
    Replication(String),
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the scheduled bookmarks: {0}")]
    Schedule(std::io::Error),
}

/// `rewind-blk cert`.
pub fn cert(args: &CertArgs) -> Result<(), DaemonError> {
    let made = tls::generate_node_cert(&args.out, &args.name)?;
    println!("certificate  {}", made.cert.display());
    println!("key          {}", made.key.display());
    println!("fingerprint  {}", made.fingerprint);
    Ok(())
}

/// `rewind-blk create`.
pub fn create(args: &CreateArgs) -> Result<(), DaemonError> {
    let base = match &args.from {
        Some(path) => BaseImage::Import {
            path,
            mode: ImportMode::Clone,
        },
        None => BaseImage::Empty,
    };
    // The base image (shown when imported), then a preallocated journal:
    // each counts up to its own total, so a fall from 100% starts the next.
    let phases = [
        args.from.as_ref().map(|_| "importing"),
        args.preallocate_journal
            .then_some("writing the journal out"),
    ];
    let mut phase = 0;
    let mut last_percent = None;
    let mut progress = |done: u64, total: u64| {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if last_percent == Some(100) && percent < 100 && phase + 1 < phases.len() {
            if phases[phase].is_some() {
                eprintln!();
            }
            phase += 1;
        }
        if last_percent != Some(percent) {
            if let Some(name) = phases[phase] {
                eprint!("\r{name}: {percent:3}%");
            }
            last_percent = Some(percent);
        }
    };
    let storage = OsStorage::shared();
    let config = match args.replica_of {
        Some(primary) => {
            Volume::create_replica(storage.as_ref(), &args.volume, &(args.into()), primary)?
        }
        None => Volume::create(
            storage.as_ref(),
            &args.volume,
            &(args.into()),
            base,
            &mut progress,
        )?,
    };
    if args.from.is_some() || args.preallocate_journal {
        eprintln!();
    }
    println!(
        "created {} volume {} at {}: {} bytes, window {}s, journal limit {} bytes{}",
        config.role,
        config.uuid,
        args.volume.display(),
        config.size,
        config.window_secs,
        config.journal_max,
        match config.preallocate_journal {
            true => " (written out)",
            false => "",
        }
    );
    print!("{}", history_table(&config));
    Ok(())
}

/// Write rates `create` shows the journal's history at: (MiB/s, write
/// size).
const SHOWN_RATES: [(u64, u64); 4] = [(1, 4096), (10, 4096), (50, 4096), (200, 1 << 20)];

/// How much history the journal limit holds at a few write rates, so the
/// operator sees whether `--journal-max` buys the window they asked for.
fn history_table(config: &rewind_journal::VolumeConfig) -> String {
    let window = std::time::Duration::from_secs(config.window_secs);
    let mut out = format!(
        "the journal limit holds this much history (window {} configured):\n",
        humantime::format_duration(window)
    );
    for (mib, write_size) in SHOWN_RATES {
        let held = config.history_at(mib << 20, write_size);
        // Whole minutes past an hour, whole seconds below.
        let secs = held.as_secs();
        let shown = match secs >= 3600 {
            true => secs - secs % 60,
            false => secs,
        };
        let verdict = match held >= window {
            true => "the whole window",
            false => "less than the window: it shrinks at this rate",
        };
        out.push_str(&format!(
            "  {mib:>4} MiB/s in {:>5} writes: {:<12} {verdict}\n",
            if write_size >= 1 << 20 {
                format!("{} MiB", write_size >> 20)
            } else {
                format!("{} KiB", write_size >> 10)
            },
            humantime::format_duration(std::time::Duration::from_secs(shown)).to_string(),
        ));
    }
    out
}

/// `rewind-blk serve`: serves until SIGTERM or SIGINT.
pub fn serve(config: ServeConfig) -> Result<(), DaemonError> {
    // Take an inherited socket before this process opens anything, so a
    // wrong number cannot alias (and later close) one of our own files.
    let inherited = match config.listen {
        Listen::Fd(fd) => Some(inherited_listener(fd)?),
        Listen::Path(_) => None,
    };
    let options = OpenOptions {
        retry: RetryPolicy {
            max_hold: config.io_error_hold,
            ..RetryPolicy::default()
        },
        layout: config.journal_layout,
        ..OpenOptions::default()
    };
    // Volume::open logs what recovery found.
    let (volume, _report) = Volume::open(OsStorage::shared(), &config.volume, options)?;
    let volume = Arc::new(volume);
    let gate = Arc::new(Gate::new(volume.epoch()));
    let replication = start_replication(&volume, &config.replication)?;
    let device: Arc<dyn BlockDevice> = match (&replication, &config.replication.sender) {
        (Some(running), Some(sender)) => Arc::new(ReplicatedVolume {
            volume: volume.clone(),
            link: running.link.clone(),
            config: sender.clone(),
            detacher: (config.on_storage_error == OnStorageError::Detach)
                .then(|| Detacher::new(running.link.clone(), config.io_error_hold)),
        }),
        _ => volume.clone(),
    };
    let live =
        Arc::new(Export::new(device, config.export.clone(), gate).with_journal(volume.clone()));
    // Sets the gate for the volume's role; a primary starts shipping.
    let roles = Roles::start(
        volume.clone(),
        live.clone(),
        replication.as_ref().map(|running| running.link.clone()),
        match (&replication, &config.replication.sender) {
            (Some(running), Some(sender)) => Some(SenderStart {
                config: sender.clone(),
                tls: running.tls.clone(),
                runtime: running.runtime.handle().clone(),
            }),
            _ => None,
        },
    );
    let control = Arc::new(Control::new(
        volume.clone(),
        live.clone(),
        replication.as_ref().map(|running| running.link.clone()),
        roles,
    ));
    let _control_socket = match &config.control_socket {
        Some(path) => Some(control::start(path, control.clone())?),
        None => None,
    };
    if let Some(address) = config.metrics_listen {
        crate::metrics::start(address, control.clone())
            .map_err(|source| DaemonError::Metrics { address, source })?;
    }
    let (listener, _socket_file) = match (inherited, &config.listen) {
        (Some(listener), _) => (listener, None),
        (None, Listen::Path(path)) => {
            let listener = listen_at(path).map_err(|e| DaemonError::Listen {
                what: path.display().to_string(),
                source: vhost::vhost_user::Error::SocketError(e),
            })?;
            (listener, Some(RemoveOnDrop(path.clone())))
        }
        (None, Listen::Fd(fd)) => return Err(DaemonError::NotListening(*fd)),
    };
    watch_signals(control.clone())?;
    let bookmarks = config
        .bookmarks
        .clone()
        .map(|schedule| Scheduler::start(schedule, volume.clone(), live.clone()))
        .transpose()
        .map_err(DaemonError::Schedule)?;
    tracing::info!(listen = ?config.listen, queues = config.export.num_queues, "serving");
    // The socket listens: QEMU may connect (systemd's Type=notify).
    notify("READY=1");
    live.serve(listener)?;
    tracing::info!("stopping: flushing the volume");
    control.stop_exports();
    // Its last tick ends (the guest thawed) before the last flush.
    drop(bookmarks);
    volume.flush()?;
    if let Some(Running { runtime, link, .. }) = replication {
        if volume.role() == Role::Primary && config.replication.sender.is_some() {
            let tail = volume.durable_lsn();
            if link.stop(tail, std::time::Duration::from_secs(5)) {
                tracing::info!(
                    lsn = tail,
                    "the replica holds everything this primary wrote"
                );
            } else {
                tracing::warn!(
                    event = rewind_journal::events::REPLICATION_TAIL_UNCONFIRMED,
                    volume = %volume.config().uuid,
                    lsn = tail,
                    acked = link.acked_lsn(),
                    "stopping before the replica confirmed the journal's tail"
                );
            }
        }
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    Ok(())
}

/// A replication link and the runtime its tasks run on (kept alive by
/// the caller).
struct Running {
    runtime: tokio::runtime::Runtime,
    link: Arc<Link>,
    tls: TlsContext,
}

/// Starts what the configuration asks for: the runtime, the link, and the
/// listener. The sender starts with the primary role (`Roles`).
fn start_replication(
    volume: &Arc<Volume>,
    replication: &Replication,
) -> Result<Option<Running>, DaemonError> {
    let tls_settings = match (&replication.sender, &replication.receiver) {
        (Some(sender), _) => &sender.tls,
        (None, Some(receiver)) => &receiver.tls,
        (None, None) => return Ok(None),
    };
    let tls = TlsContext::load(tls_settings, &volume.config().uuid.to_string())?;
    let runtime = repl::runtime().map_err(|e| DaemonError::Replication(e.to_string()))?;
    let link = Arc::new(Link::new(
        volume.config().uuid.to_string(),
        replication.sender.as_ref().map(|s| s.mode),
        replication.sender.as_ref().map(|s| s.peer),
    ));
    if let Some(receiver) = &replication.receiver {
        let cannot = |e: std::io::Error| {
            DaemonError::Replication(format!("cannot listen on {}: {e}", receiver.listen))
        };
        let listener = std::net::TcpListener::bind(receiver.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(cannot)?;
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(cannot)?
        };
        runtime.spawn(repl::receiver::run(
            volume.clone(),
            link.clone(),
            tls.clone(),
            listener,
        ));
        tracing::info!(listen = %receiver.listen, role = %volume.role(), "listening for the peer");
    }
    Ok(Some(Running { runtime, link, tls }))
}

/// Listens on a Unix socket at `path`, replacing a socket file there. The
/// file appears only once the socket accepts (bound and listening under a
/// temporary name, then renamed into place), so a client that waits for
/// the path never finds it refusing connections.
fn listen_at(path: &Path) -> std::io::Result<Listener> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = std::os::unix::net::UnixListener::bind(&temporary)?;
    if let Err(e) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(Listener::from(listener))
}

/// Removes a socket file when the daemon stops.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The listening socket inherited as `fd` (`--fd`).
fn inherited_listener(fd: i32) -> Result<Listener, DaemonError> {
    // SAFETY: called before this process opens any file, so `fd` is not one
    // of ours: it was inherited for us to use, or it is not open (then the
    // check below fails and dropping `owned` closes nothing we own).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match rustix::net::sockopt::socket_acceptconn(&owned) {
        Ok(true) => {
            // SAFETY: `owned` is a listening socket whose ownership passes
            // to the Listener.
            Ok(unsafe { Listener::from_raw_fd(owned.into_raw_fd()) })
        }
        _ => {
            // Not ours to close: leave the descriptor as it was.
            let _ = owned.into_raw_fd();
            Err(DaemonError::NotListening(fd))
        }
    }
}

/// Tells systemd what the daemon is doing (sd_notify(3)); nothing when
/// it was not started with NOTIFY_SOCKET. A lost message only delays what
/// systemd shows, so errors are logged, not returned.
fn notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!(
            event = rewind_journal::events::SYSTEMD_NOTIFY_FAILED,
            error = %e,
            state,
            "cannot notify systemd"
        );
    }
}

/// On SIGTERM or SIGINT: stop every export (each ends its connection and
/// its accept loop).
fn watch_signals(control: Arc<Control>) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    std::thread::Builder::new()
        .name("rewind-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "stop requested");
                notify("STOPPING=1");
                control.stop_exports();
                control.live.stop();
            }
        })
        .map_err(DaemonError::Signals)?;
    Ok(())
}
