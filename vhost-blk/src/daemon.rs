//! Running `rewind-blk`: creating volumes and serving them.
//!
//! The listening socket lives as long as the export; every connection gets
//! a fresh backend and vhost-user daemon, so a guest reboot, a QEMU restart
//! or QEMU's `reconnect=` all start from a clean device. SIGTERM or SIGINT
//! ends the current connection (its queues finish what they took), flushes
//! the volume and exits.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rewind_journal::{BaseImage, ImportMode, OpenOptions, OsStorage, RetryPolicy, Volume};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::BlkBackend;
use crate::config::{CreateArgs, Listen, ServeConfig};
use crate::control::{self, Control};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Volume(#[from] rewind_journal::Error),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        source: vhost::vhost_user::Error,
    },
    /// vhost_user_backend::Error is Display but not std::error::Error.
    #[error("vhost-user: {0}")]
    VhostUser(String),
    #[error("--fd {0} is not an open listening socket")]
    NotListening(i32),
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Control(#[from] control::ControlError),
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
    let mut last_percent = None;
    let mut progress = |done: u64, total: u64| {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if last_percent != Some(percent) && args.from.is_some() {
            eprint!("\rimporting: {percent:3}%");
            last_percent = Some(percent);
        }
    };
    let storage = OsStorage::shared();
    let config = Volume::create(
        storage.as_ref(),
        &args.volume,
        &(args.into()),
        base,
        &mut progress,
    )?;
    if args.from.is_some() {
        eprintln!();
    }
    println!(
        "created volume {} at {}: {} bytes, window {}s, journal limit {} bytes",
        config.uuid,
        args.volume.display(),
        config.size,
        config.window_secs,
        config.journal_max
    );
    Ok(())
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
        ..OpenOptions::default()
    };
    // Volume::open logs what recovery found.
    let (volume, _report) = Volume::open(OsStorage::shared(), &config.volume, options)?;
    let volume = Arc::new(volume);
    let _control = match &config.control_socket {
        Some(path) => Some(control::start(
            path,
            Control {
                volume: volume.clone(),
                queues: config.export.num_queues,
                read_only: config.export.read_only,
            },
        )?),
        None => None,
    };
    let mut listener = match (inherited, &config.listen) {
        (Some(listener), _) => listener,
        (None, Listen::Path(path)) => {
            Listener::new(path, true).map_err(|source| DaemonError::Listen {
                what: path.display().to_string(),
                source,
            })?
        }
        (None, Listen::Fd(fd)) => return Err(DaemonError::NotListening(*fd)),
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
    watch_signals(listener.as_raw_fd(), stopping.clone(), current.clone())?;
    tracing::info!(listen = ?config.listen, queues = config.export.num_queues, "serving");

    while !stopping.load(Ordering::Acquire) {
        let backend = Arc::new(BlkBackend::new(volume.clone(), config.export.clone()));
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("rewind-blk".into(), backend.clone(), memory)
            .map_err(|e| DaemonError::VhostUser(e.to_string()))?;
        if let Err(e) = daemon.start(&mut listener) {
            if stopping.load(Ordering::Acquire) {
                break;
            }
            return Err(DaemonError::VhostUser(e.to_string()));
        }
        tracing::info!("client connected");
        *lock(&current) = daemon.shutdown_handle();
        if stopping.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        let ended = daemon.wait();
        *lock(&current) = None;
        backend.stop_workers();
        match ended {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("client disconnected"),
            Err(e) => tracing::warn!(error = %e, "connection ended"),
        }
    }
    tracing::info!("stopping: flushing the volume");
    volume.flush()?;
    Ok(())
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGTERM or SIGINT: mark the daemon stopping, end the current
/// connection, and wake a pending accept by shutting the listener down.
fn watch_signals(
    listen_fd: i32,
    stopping: Arc<AtomicBool>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    std::thread::Builder::new()
        .name("rewind-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "stop requested");
                stopping.store(true, Ordering::Release);
                if let Some(handle) = lock(&current).as_ref() {
                    handle.shutdown();
                }
                // SAFETY: shutdown(2) on the listening fd, which lives until
                // the process exits; it only makes a pending accept return.
                unsafe { libc_shutdown(listen_fd) };
            }
        })
        .map_err(DaemonError::Signals)?;
    Ok(())
}

/// shutdown(2) with both directions.
///
/// # Safety
/// `fd` must be an open socket.
unsafe fn libc_shutdown(fd: i32) {
    // SAFETY: forwarded from the caller; shutdown takes no pointers.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}
