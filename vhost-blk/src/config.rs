//! Command line of `rewind-blk` and the validated settings made from it.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rewind_journal::VolumeSettings;
use uuid::Uuid;

use crate::backend::{ExportConfig, MAX_QUEUE_SIZE};
use crate::detach::OnStorageError;
use crate::logging::LogFormat;
use crate::replication::tls::{Fingerprint, PeerTrust, TlsSettings};
use crate::replication::{Mode, OnLoss, ReceiverConfig, SenderConfig};
use crate::schedule::Schedule;

#[derive(Debug, Parser)]
#[command(
    name = "rewind-blk",
    version,
    about = "vhost-user-blk server of rewind volumes"
)]
pub struct Cli {
    /// How the log on stderr is written: `text` for people, `json` for
    /// journald and Loki pipelines (one object per line). Warnings and
    /// errors an operator acts on carry the fields `event`, a stable name
    /// listed in OPERATIONS.md, and `volume`, the volume's uuid. RUST_LOG
    /// sets the level (default info).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a volume (empty, or from a raw image).
    Create(CreateArgs),
    /// Serve a volume to QEMU over a vhost-user-blk socket until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
    /// Write this node's TLS key and self-signed certificate for
    /// replication, and print the certificate's fingerprint (what the
    /// other host gives as --tls-peer-fingerprint).
    Cert(CertArgs),
}

#[derive(Debug, Args)]
pub struct CertArgs {
    /// Directory to write NAME.crt and NAME.key (mode 0600) into.
    #[arg(long)]
    pub out: PathBuf,
    /// This node's name (letters, digits, '.', '-', '_').
    #[arg(long)]
    pub name: String,
}

fn size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{e} (use sizes like 512K, 64M, 10G)"))
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use durations like 10s, 1h, 7d)"))
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Directory of the new volume (must not exist, or be empty).
    #[arg(long)]
    pub volume: PathBuf,
    /// Disk size (at least the size of --from).
    #[arg(long, value_parser = size)]
    pub size: u64,
    /// Raw image to start from (reflinked or copied; left in place).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// History kept in the journal.
    #[arg(long, value_parser = duration, default_value = "1h")]
    pub window: Duration,
    /// Hard limit on the journal's size on disk (default: the disk size, at least 1G).
    #[arg(long, value_parser = size)]
    pub journal_max: Option<u64>,
    /// Size of each journal segment file.
    #[arg(long, value_parser = size, default_value = "64M")]
    pub segment_size: u64,
    /// Logical block size offered to guests: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Write the whole journal (--journal-max) out now and keep its files:
    /// the journal then always writes over blocks written before (a disk's
    /// new blocks are slower), at the cost of that disk space from the
    /// start, as a fully preallocated raw image.
    #[arg(long)]
    pub preallocate_journal: bool,
    /// Make an empty replica of the primary volume with this uuid (its
    /// `rewindctl status` names it); --size must be the primary's.
    #[arg(long, conflicts_with = "from")]
    pub replica_of: Option<Uuid>,
}

impl From<&CreateArgs> for VolumeSettings {
    fn from(a: &CreateArgs) -> Self {
        let defaults = VolumeSettings::new(a.size);
        let journal_max = a.journal_max.unwrap_or(defaults.journal_max);
        VolumeSettings {
            block_size: a.block_size,
            segment_size: a.segment_size,
            window: a.window,
            journal_max,
            journal_warn: journal_max / 10 * 8,
            preallocate_journal: a.preallocate_journal,
            ..defaults
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of the volume to serve.
    #[arg(long, required_unless_present = "print_capabilities")]
    pub volume: Option<PathBuf>,
    /// vhost-user socket to listen on (created; an existing socket is replaced).
    #[arg(long, conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// An inherited listening socket to use instead of --socket-path.
    /// Without either, the socket a systemd socket unit passes is used
    /// (fd 3, with LISTEN_FDS=1 and LISTEN_PID of this process).
    #[arg(long)]
    pub fd: Option<RawFd>,
    /// Virtqueues offered (QEMU's vhost-user-blk-pci asks one per vCPU by default).
    #[arg(long, default_value_t = 16)]
    pub num_queues: usize,
    /// Largest virtqueue size accepted.
    #[arg(long, default_value_t = 1024)]
    pub queue_size: usize,
    /// Serve the disk read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Unix socket for control commands (mode 0600; must not exist).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (for example
    /// 127.0.0.1:9470).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Print the vhost-user backend capabilities (JSON) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// How long an EIO or ENOSPC on the volume's files is retried (the guest
    /// sees latency) before requests fail with IOERR.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub io_error_hold: Duration,
    /// When the volume's own files fail (EIO or ENOSPC past the hold, a
    /// failed fsync): hold (then fail with IOERR), or detach: forward the
    /// guest's requests to the replica, which takes over as primary
    /// (needs --replicate-to; evacuate the VM with `rewindctl handover`).
    #[arg(long, value_enum, default_value = "hold")]
    pub on_storage_error: OnStorageError,
    /// How new journal segments place their records (journal/FORMAT.md):
    /// auto picks inline segments (each record one O_DIRECT write) while
    /// the guest makes its writes durable one by one (FUA writes, or a
    /// flush after each), header slots through the page cache otherwise;
    /// slots or inline force one.
    #[arg(long, value_enum, default_value = "auto")]
    pub journal_layout: JournalLayout,
    /// Take a bookmark every DURATION (at least 1s), at each multiple of
    /// it since the Unix epoch, named by that moment in UTC
    /// (auto-2026-11-30T19:45:00Z). They are pruned with the window as any
    /// record. None is taken on a replica, or while the volume is drained
    /// or fenced.
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub bookmark_every: Option<Duration>,
    /// Make the scheduled bookmarks application-consistent: the socket of
    /// the VM's QEMU guest agent channel (the chardev of its
    /// org.qemu.guest_agent.0 virtio-serial port). While a guest runs,
    /// its filesystems are frozen for each bookmark (each agent call and
    /// the drain wait at most half the interval, and at most 10s) and
    /// always thawed; when the agent does not answer, the bookmark is
    /// crash-consistent and a warning says why.
    #[arg(long, requires = "bookmark_every", value_name = "SOCKET")]
    pub bookmark_qga: Option<PathBuf>,
    #[command(flatten)]
    pub replication: ReplicationArgs,
}

/// Replication options of `serve` (DESIGN.md, "Replication").
#[derive(Debug, Args)]
pub struct ReplicationArgs {
    /// Where the peer connects (ADDR:PORT): a replica takes its primary's
    /// stream here; a primary learns here that a newer one superseded it.
    #[arg(long)]
    pub replication_listen: Option<SocketAddr>,
    /// The peer to ship the journal to while this node is the primary
    /// (ADDR:PORT). Give both options on both nodes so that the roles can
    /// change places (failover) without a new command line.
    #[arg(long)]
    pub replicate_to: Option<SocketAddr>,
    /// async: guest IO never waits for the network; sync: a guest flush
    /// completes once the replica holds what it covers.
    #[arg(long, value_enum, default_value = "async")]
    pub replication_mode: Mode,
    /// Sync mode: how long flushes wait for a lost replica before
    /// --on-replica-loss applies.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub sync_timeout: Duration,
    /// Sync mode, replica lost past --sync-timeout: suspend (flushes keep
    /// waiting) or degrade (go on as async, loudly).
    #[arg(long, value_enum, default_value = "degrade")]
    pub on_replica_loss: OnLoss,
    /// Command run (by sh -c) before degrading; it must exit 0 (e.g. mark
    /// the replica outdated where failover looks).
    #[arg(long)]
    pub fence_peer: Option<String>,
    /// Bytes per second the stream may use (e.g. 100M).
    #[arg(long, value_parser = size)]
    pub replication_rate: Option<u64>,
    /// Compress record batches with zstd (level 1, only when it pays).
    #[arg(long, value_enum, default_value = "zstd")]
    pub compress: Compress,
    /// This node's certificate (PEM), from `rewind-blk cert`.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Trust peers whose certificate this CA (PEM) signed.
    #[arg(long, conflicts_with = "tls_peer_fingerprint")]
    pub tls_ca: Option<PathBuf>,
    /// Trust the peer whose certificate has this SHA-256 fingerprint (what
    /// `rewind-blk cert` printed on the other host).
    #[arg(long)]
    pub tls_peer_fingerprint: Option<Fingerprint>,
}

/// `--journal-layout`: the journal's `LayoutChoice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JournalLayout {
    Auto,
    Slots,
    Inline,
}

impl From<JournalLayout> for rewind_journal::LayoutChoice {
    fn from(l: JournalLayout) -> Self {
        match l {
            JournalLayout::Auto => rewind_journal::LayoutChoice::Auto,
            JournalLayout::Slots => rewind_journal::LayoutChoice::Slots,
            JournalLayout::Inline => rewind_journal::LayoutChoice::Inline,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    Zstd,
    None,
}

/// What a daemon does with replication: ship to a peer while it is the
/// primary, and listen for one; either, both or neither.
#[derive(Debug, Clone, Default)]
pub struct Replication {
    pub sender: Option<SenderConfig>,
    pub receiver: Option<ReceiverConfig>,
}

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Path(PathBuf),
    Fd(RawFd),
}

/// A checked `serve` command.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub volume: PathBuf,
    pub listen: Listen,
    pub export: ExportConfig,
    pub io_error_hold: Duration,
    pub on_storage_error: OnStorageError,
    pub journal_layout: rewind_journal::LayoutChoice,
    pub control_socket: Option<PathBuf>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub replication: Replication,
    pub bookmarks: Option<Schedule>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--volume is required")]
    NoVolume,
    #[error("give --socket-path or --fd (or start it from a systemd socket unit)")]
    NoSocket,
    #[error("--num-queues must be 1 to 64, not {0}")]
    Queues(usize),
    #[error("--queue-size must be a power of two from 1 to {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(usize),
    #[error("--fd {0} is not a valid file descriptor number")]
    Fd(RawFd),
    #[error("--io-error-hold must be under 30s (guests reset devices after about 60s), not {0:?}")]
    Hold(Duration),
    #[error("replication needs --tls-cert and --tls-key (make them with `rewind-blk cert`)")]
    NoTlsIdentity,
    #[error("replication needs --tls-ca or --tls-peer-fingerprint to know its peer")]
    NoTlsTrust,
    #[error("{0} only applies with --replicate-to")]
    NotReplicating(&'static str),
    #[error("--on-storage-error detach forwards guest IO to a replica: it needs --replicate-to")]
    DetachWithoutReplica,
    #[error("--replication-rate must be at least 1M per second (a 1 MiB batch must not hold the link's heartbeats for seconds)")]
    Rate,
    #[error("--bookmark-every must be at least 1s (bookmarks are named to the second), not {0:?}")]
    BookmarkEvery(Duration),
}

/// The listening socket systemd passed (sd_listen_fds(3)): fd 3, when
/// LISTEN_PID names this process and LISTEN_FDS is 1.
fn systemd_listen_fd() -> Option<RawFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    (pid == std::process::id() && fds == 1).then_some(3)
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, ConfigError> {
        let volume = a.volume.ok_or(ConfigError::NoVolume)?;
        let listen = match (a.socket_path, a.fd) {
            (Some(path), _) => Listen::Path(path),
            (None, Some(fd)) if fd >= 0 => Listen::Fd(fd),
            (None, Some(fd)) => return Err(ConfigError::Fd(fd)),
            (None, None) => match systemd_listen_fd() {
                Some(fd) => Listen::Fd(fd),
                None => return Err(ConfigError::NoSocket),
            },
        };
        // queues_per_thread() is a 64-bit mask.
        if !(1..=64).contains(&a.num_queues) {
            return Err(ConfigError::Queues(a.num_queues));
        }
        if !a.queue_size.is_power_of_two() || a.queue_size > MAX_QUEUE_SIZE {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if a.io_error_hold >= Duration::from_secs(30) {
            return Err(ConfigError::Hold(a.io_error_hold));
        }
        if a.on_storage_error == OnStorageError::Detach && a.replication.replicate_to.is_none() {
            return Err(ConfigError::DetachWithoutReplica);
        }
        if let Some(every) = a.bookmark_every.filter(|e| *e < Duration::from_secs(1)) {
            return Err(ConfigError::BookmarkEvery(every));
        }
        let replication = Replication::try_from(a.replication)?;
        Ok(ServeConfig {
            volume,
            listen,
            export: ExportConfig {
                num_queues: a.num_queues,
                queue_size: a.queue_size,
                read_only: a.read_only,
            },
            io_error_hold: a.io_error_hold,
            on_storage_error: a.on_storage_error,
            journal_layout: a.journal_layout.into(),
            control_socket: a.control_socket,
            metrics_listen: a.metrics_listen,
            replication,
            bookmarks: a.bookmark_every.map(|every| Schedule {
                every,
                agent: a.bookmark_qga,
            }),
        })
    }
}

impl TryFrom<ReplicationArgs> for Replication {
    type Error = ConfigError;

    fn try_from(a: ReplicationArgs) -> Result<Self, ConfigError> {
        if a.replicate_to.is_none() {
            let primary_only = [
                (a.replication_mode != Mode::Async, "--replication-mode"),
                (a.fence_peer.is_some(), "--fence-peer"),
                (a.replication_rate.is_some(), "--replication-rate"),
            ];
            if let Some((_, name)) = primary_only.iter().find(|(given, _)| *given) {
                return Err(ConfigError::NotReplicating(name));
            }
        }
        if a.replicate_to.is_none() && a.replication_listen.is_none() {
            return Ok(Replication::default());
        }
        let (Some(cert), Some(key)) = (a.tls_cert, a.tls_key) else {
            return Err(ConfigError::NoTlsIdentity);
        };
        let trust = match (a.tls_ca, a.tls_peer_fingerprint) {
            (Some(ca), _) => PeerTrust::Ca(ca),
            (None, Some(pin)) => PeerTrust::Fingerprint(pin),
            (None, None) => return Err(ConfigError::NoTlsTrust),
        };
        let tls = TlsSettings { cert, key, trust };
        if a.replication_rate.is_some_and(|rate| rate < 1 << 20) {
            return Err(ConfigError::Rate);
        }
        Ok(Replication {
            sender: a.replicate_to.map(|peer| SenderConfig {
                peer,
                mode: a.replication_mode,
                sync_timeout: a.sync_timeout,
                on_loss: a.on_replica_loss,
                fence_peer: a.fence_peer,
                rate: a.replication_rate,
                compress: a.compress == Compress::Zstd,
                tls: tls.clone(),
            }),
            receiver: a
                .replication_listen
                .map(|listen| ReceiverConfig { listen, tls }),
        })
    }
}

/// What `--print-capabilities` prints (the vhost-user.json convention).
pub const CAPABILITIES: &str = r#"{"type": "block", "features": ["read-only-mode"]}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeConfig, String> {
        let mut argv = vec!["rewind-blk", "serve"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Serve(a) => ServeConfig::try_from(*a).map_err(|e| e.to_string()),
            Command::Create(_) | Command::Cert(_) => Err("not serve".into()),
        }
    }

    #[test]
    fn serve_arguments_are_checked() {
        let ok =
            serve(&["--volume", "/v", "--socket-path", "/s", "--num-queues", "2"]).expect("valid");
        assert_eq!(ok.listen, Listen::Path("/s".into()));
        assert_eq!((ok.export.num_queues, ok.export.queue_size), (2, 1024));
        assert_eq!(
            serve(&["--volume", "/v", "--fd", "3"]).expect("fd").listen,
            Listen::Fd(3)
        );
        let bad = [
            (vec!["--volume", "/v"], "--socket-path or --fd"),
            (vec!["--socket-path", "/s"], "--volume"),
            (vec!["--volume", "/v", "--fd=-2"], "not a valid"),
            (
                vec!["--volume", "/v", "--fd", "3", "--socket-path", "/s"],
                "cannot be used",
            ),
            (
                vec!["--volume", "/v", "--fd", "3", "--num-queues", "0"],
                "1 to 64",
            ),
            (
                vec!["--volume", "/v", "--fd", "3", "--num-queues", "65"],
                "1 to 64",
            ),
            (
                vec!["--volume", "/v", "--fd", "3", "--queue-size", "1000"],
                "power of two",
            ),
            (
                vec!["--volume", "/v", "--fd", "3", "--queue-size", "2048"],
                "power of two",
            ),
            (
                vec!["--volume", "/v", "--fd", "3", "--io-error-hold", "45s"],
                "under 30s",
            ),
            (
                vec![
                    "--volume",
                    "/v",
                    "--fd",
                    "3",
                    "--on-storage-error",
                    "detach",
                ],
                "needs --replicate-to",
            ),
            (
                vec!["--volume", "/v", "--fd", "3", "--on-storage-error", "drop"],
                "invalid value 'drop'",
            ),
        ];
        for (args, want) in bad {
            let err = serve(&args).expect_err("invalid");
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn bookmark_schedule_is_checked() {
        let with = |extra: &[&str]| {
            let mut args = vec!["--volume", "/v", "--fd", "3"];
            args.extend_from_slice(extra);
            serve(&args)
        };
        assert_eq!(with(&[]).expect("none").bookmarks, None);
        let every = with(&["--bookmark-every", "15m"]).expect("every");
        assert_eq!(
            every.bookmarks,
            Some(Schedule {
                every: Duration::from_secs(900),
                agent: None
            })
        );
        let quiesced =
            with(&["--bookmark-every", "1s", "--bookmark-qga", "/q.sock"]).expect("with an agent");
        assert_eq!(
            quiesced.bookmarks,
            Some(Schedule {
                every: Duration::from_secs(1),
                agent: Some("/q.sock".into())
            })
        );
        let bad = [
            (vec!["--bookmark-every", "500ms"], "at least 1s"),
            (vec!["--bookmark-every", "0s"], "at least 1s"),
            (vec!["--bookmark-every", "often"], "durations like"),
            (
                vec!["--bookmark-qga", "/q.sock"],
                "required arguments were not provided:\n  --bookmark-every",
            ),
        ];
        for (args, want) in bad {
            let err = with(&args).expect_err("invalid");
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn replication_arguments_are_checked() {
        let tls = [
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k",
            "--tls-peer-fingerprint",
            &"ab".repeat(32),
        ];
        let with = |extra: &[&str]| {
            let mut args = vec!["--volume", "/v", "--fd", "3"];
            args.extend_from_slice(extra);
            serve(&args)
        };
        let primary =
            with(&[&["--replicate-to", "127.0.0.1:7788"][..], &tls[..]].concat()).expect("primary");
        let Some(sender) = primary.replication.sender else {
            panic!("a sender");
        };
        assert!(primary.replication.receiver.is_none());
        assert_eq!(
            (sender.mode, sender.on_loss),
            (Mode::Async, OnLoss::Degrade)
        );
        assert_eq!(sender.sync_timeout, Duration::from_secs(5));
        assert!(sender.compress);
        let replica = with(&[&["--replication-listen", "0.0.0.0:7788"][..], &tls[..]].concat())
            .expect("replica");
        assert!(replica.replication.sender.is_none());
        assert_eq!(
            replica.replication.receiver.map(|r| r.listen.to_string()),
            Some("0.0.0.0:7788".to_string())
        );
        // Both: the symmetric setup of two nodes that can swap roles.
        let both = with(
            &[
                &["--replication-listen", "0.0.0.0:7788"][..],
                &["--replicate-to", "198.18.0.2:7788"][..],
                &tls[..],
            ]
            .concat(),
        )
        .expect("both");
        assert!(both.replication.sender.is_some() && both.replication.receiver.is_some());
        let off = with(&[]).expect("off").replication;
        assert!(off.sender.is_none() && off.receiver.is_none());
        let bad: [(Vec<&str>, &str); 6] = [
            (
                vec!["--replicate-to", "127.0.0.1:1"],
                "--tls-cert and --tls-key",
            ),
            (
                vec![
                    "--replicate-to",
                    "127.0.0.1:1",
                    "--tls-cert",
                    "/c",
                    "--tls-key",
                    "/k",
                ],
                "--tls-ca or --tls-peer-fingerprint",
            ),
            (
                vec!["--replication-mode", "sync"],
                "only applies with --replicate-to",
            ),
            (
                [
                    &[
                        "--replicate-to",
                        "127.0.0.1:1",
                        "--replication-rate",
                        "100K",
                    ][..],
                    &tls[..],
                ]
                .concat(),
                "at least 1M",
            ),
            (vec!["--replicate-to", "nowhere"], "invalid socket address"),
            (
                [&[
                    "--replicate-to",
                    "127.0.0.1:1",
                    "--tls-peer-fingerprint",
                    "xyz",
                ][..]]
                .concat(),
                "fingerprint",
            ),
        ];
        for (args, want) in bad {
            let err = with(&args).expect_err("invalid");
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn sizes_and_durations_parse_like_people_write_them() {
        let cli = Cli::try_parse_from([
            "rewind-blk",
            "create",
            "--volume",
            "/v",
            "--size",
            "10G",
            "--window",
            "7d",
            "--journal-max",
            "2G",
            "--segment-size",
            "1M",
        ])
        .expect("parse");
        let Command::Create(a) = cli.command else {
            panic!("create expected");
        };
        let s = VolumeSettings::from(&a);
        assert_eq!(s.size, 10 << 30);
        assert_eq!(s.window, Duration::from_secs(7 * 86400));
        assert_eq!((s.journal_max, s.segment_size), (2 << 30, 1 << 20));
        let err = Cli::try_parse_from(["rewind-blk", "create", "--volume", "/v", "--size", "ten"])
            .expect_err("bad size")
            .to_string();
        assert!(err.contains("sizes like"), "{err}");
        let err = Cli::try_parse_from([
            "rewind-blk",
            "create",
            "--volume",
            "/v",
            "--size",
            "1G",
            "--window",
            "soon",
        ])
        .expect_err("bad duration")
        .to_string();
        assert!(err.contains("durations like"), "{err}");
    }
}
