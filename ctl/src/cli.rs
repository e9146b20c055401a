//! The command line of `rewindctl`, in the library so that its man pages
//! and completions can be made from it (rewind-blk-docs, in vhost-blk).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "rewindctl", version, about = "Control rewind-blk daemons")]
pub struct Cli {
    /// The daemon's control socket (`rewind-blk serve --control-socket`).
    /// Repeat it to run the command on a consistency group at one moment.
    #[arg(long, global = true)]
    pub control: Vec<PathBuf>,
    /// A file listing a consistency group's control sockets, one a line
    /// (`#` comments; relative paths are relative to the file).
    #[arg(long, global = true)]
    pub group: Option<PathBuf>,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Points in time (`--at`): an RFC 3339 time (2026-11-22T19:36:00Z), a time
/// ago (-90s, -5m, -2h), lsn:N or bookmark:NAME.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The served volume: id, size, state, epoch, lsns, journal use, window.
    Status,
    /// The history held: window configured and effective, its start and
    /// end, bookmarks, flush points, journal use.
    Timeline,
    /// Names the present moment (durably), for `--at bookmark:NAME`.
    /// With --quiesce, application-consistent: the guest's filesystems
    /// are frozen through its QEMU guest agent while the volume is drained
    /// and bookmarked, then thawed (always, whatever fails); the timeline
    /// marks it `app_consistent`.
    Bookmark {
        /// 1 to 128 letters, digits, '.', '_', '-' or ':'.
        name: String,
        /// Freeze the guest's filesystems through its guest agent (--qga)
        /// while the bookmark is taken.
        #[arg(long, requires = "qga")]
        quiesce: bool,
        /// The Unix socket of the VM's guest agent channel (the socket
        /// chardev of its virtio-serial port org.qemu.guest_agent.0). For a
        /// group, one per --control, in the same order.
        #[arg(long, requires = "quiesce")]
        qga: Vec<PathBuf>,
        /// How long each step may take: each guest agent call and the
        /// drain.
        #[arg(long, value_parser = nonzero_duration, default_value = "10s")]
        timeout: Duration,
        /// When the guest cannot be frozen (no agent answers, the freeze
        /// is refused), take a crash-consistent bookmark instead of
        /// failing, and say so.
        #[arg(long, requires = "quiesce")]
        fallback_crash_consistent: bool,
    },
    /// Writes a sparse raw image of the disk as it was at a moment (for a
    /// group: one image per member in the `--output` directory, named
    /// <volume uuid>.img).
    Materialize {
        /// The moment: RFC 3339, -5m, lsn:N or bookmark:NAME.
        #[arg(long, allow_hyphen_values = true)]
        at: String,
        /// The image to write; it must not exist.
        #[arg(long)]
        output: PathBuf,
        /// Work on the volume directory itself, with its daemon stopped,
        /// instead of through `--control`.
        #[arg(long, conflicts_with_all = ["control", "group"])]
        volume: Option<PathBuf>,
    },
    /// Stops taking requests from the guest, finishes those in flight and
    /// flushes the journal: afterwards nothing changes the disk until
    /// `resume`.
    Drain {
        /// Give up (and serve again) if the requests in flight take longer.
        #[arg(long, value_parser = duration, default_value = "10s")]
        timeout: Duration,
        /// Fail requests held on a storage error, or waiting at the
        /// journal's hard limit, with IOERR instead of waiting for them.
        #[arg(long)]
        abort: bool,
    },
    /// Takes requests from the guest again after a drain.
    Resume,
    /// Raises the epoch, disconnects the client and admits no client until
    /// `unfence`; the old client can never write or reattach again.
    Fence {
        /// How long to wait for the requests in flight.
        #[arg(long, value_parser = duration, default_value = "10s")]
        timeout: Duration,
    },
    /// Admits clients again after a fence (new ones: the old stays out).
    Unfence,
    /// Makes the live disk what it was at a moment, as a new journal record
    /// (undo it by reverting to just before it). The volume must be drained
    /// and no VM attached.
    Revert {
        /// The moment: RFC 3339, -5m, lsn:N or bookmark:NAME.
        #[arg(long, allow_hyphen_values = true)]
        at: String,
    },
    /// Serves the disk as it was at a moment on another vhost-user-blk
    /// socket, while the live disk goes on (for a group: one socket per
    /// member in the `--socket-path` directory, named <volume uuid>.sock).
    Export {
        /// The moment: RFC 3339, -5m, lsn:N or bookmark:NAME.
        #[arg(long, allow_hyphen_values = true)]
        at: String,
        /// The socket to create; it must not exist.
        #[arg(long)]
        socket_path: PathBuf,
        /// Writable, into an overlay thrown away at `unexport`.
        #[arg(long)]
        scratch: bool,
    },
    /// Stops serving an export and removes its socket (for a group: the
    /// directory a group `export` was given).
    Unexport {
        #[arg(long)]
        socket_path: PathBuf,
    },
    /// Compares this volume with its replica by keyed checksums at one
    /// moment, without writing; lists the ranges that differ and exits 1
    /// if any does.
    Verify {
        /// The replica daemon's control socket (on this host, or forwarded
        /// here, e.g. with `ssh -L`).
        #[arg(long)]
        peer: PathBuf,
        /// The moment (default: the newest lsn the replica acknowledged).
        #[arg(long, allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// The replication link: role, peer, mode, state, acked lsn, lag,
    /// RPO, bytes sent, compression, last error.
    Replication {
        /// Show it again every second until interrupted.
        #[arg(long, conflicts_with = "wait")]
        watch: bool,
        /// Wait until the replica is caught up (streaming), with a progress
        /// bar while a resync runs; fails if the link is outdated or the
        /// time runs out.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_parser = duration, default_value = "1h", requires = "wait")]
        timeout: Duration,
    },
    /// Makes this replica the primary: raises the epoch durably and opens
    /// its gate. Refused while its old primary may still write (it has not
    /// sealed this replica) unless --force.
    Promote {
        /// Promote without a seal from the old primary (fence its VM
        /// first): the records this replica lacks are lost (see the RPO).
        #[arg(long)]
        force: bool,
        /// Leave the gate closed after the promotion (`resume` opens it).
        #[arg(long)]
        drained: bool,
    },
    /// Makes this primary a replica: closes its gate, finishes the requests
    /// in flight, flushes, ships its tail to the replica and seals it.
    Demote {
        /// How long to wait for the requests in flight and the tail.
        #[arg(long, value_parser = duration, default_value = "10s")]
        timeout: Duration,
    },
    /// Run on the replica: seals the old primary if it answers (nothing is
    /// lost), otherwise refuses unless --force; then promotes this side.
    /// For a group: every member is promoted drained, those holding more
    /// than the others are reverted to the latest moment every member
    /// holds, then all resume.
    Failover {
        /// Promote even when the old primary does not answer (fence its VM
        /// first): the records this side lacks are lost (see the RPO).
        #[arg(long)]
        force: bool,
        /// How long to wait for the old primary's seal.
        #[arg(long, value_parser = duration, default_value = "10s")]
        timeout: Duration,
        /// Leave the gate closed after the promotion (`resume` opens it).
        #[arg(long)]
        drained: bool,
    },
    /// Run on the primary before a live migration to the replica's host:
    /// once the replica holds every record, arms a switch at the moment
    /// the migration stops the guest's device. The primary then seals and
    /// the replica takes over as soon as the destination QEMU (connected to
    /// the replica's socket) starts; if none starts in time, or the source
    /// runs again, the switch is rolled back and this side serves on.
    Handover {
        /// How long to wait for the replica to catch up, and then for the
        /// destination to start once the source stopped.
        #[arg(long, value_parser = duration, default_value = "60s")]
        timeout: Duration,
        /// Call an armed or switching handover off.
        #[arg(long, conflicts_with = "timeout")]
        cancel: bool,
    },
    /// The branches: writes cut from this volume's history when it rejoined
    /// a newer primary, kept read-only (export or materialize them).
    Branches,
    /// Prints the daemon's Prometheus metrics (what `serve
    /// --metrics-listen` serves at /metrics), in the text format.
    Metrics,
    /// Deletes a branch and the journal space it holds.
    BranchDrop {
        /// The branch, as `branches` names it.
        name: String,
    },
    /// Ends a split brain on the side whose writes are to be discarded.
    Resolve {
        /// Required: this side's writes since the split become a branch
        /// and this volume becomes a replica of the other side.
        #[arg(long)]
        discard_this_side: bool,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use durations like 500ms, 10s, 2m)"))
}

/// A duration a socket timeout can take (zero would mean none).
fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        Duration::ZERO => Err("it must be more than zero (use durations like 500ms, 10s)".into()),
        d => Ok(d),
    }
}
