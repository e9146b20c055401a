//! Stable names of the events an operator acts on, logged as the field
//! `event` (with `volume`, the volume's uuid, wherever the call site knows
//! it) on warnings and errors, so that alerts and log queries (journald,
//! Loki) match a name rather than a message text, which may change.
//!
//! Names are snake_case and never renamed or reused; a new situation gets a
//! new name. vhost-blk/OPERATIONS.md ("Log events") lists them with what
//! each means and what to do.

// The volume's storage.

/// An EIO or ENOSPC on the volume's files: requests are held and retried.
pub const STORAGE_ERROR: &str = "storage_error";
/// Something could not be made durable in order: the volume takes no more writes.
pub const VOLUME_FAILED: &str = "volume_failed";
/// Folding records into base.img failed; the applier retries.
pub const FOLD_FAILED: &str = "fold_failed";
/// Preparing or removing segments failed; retried every second.
pub const POOL_MAINTENANCE_FAILED: &str = "pool_maintenance_failed";
/// Recovery found damage no crash explains and, as told, ended the journal there.
pub const JOURNAL_TRUNCATED: &str = "journal_truncated";
/// A background thread of the volume panicked.
pub const THREAD_PANICKED: &str = "thread_panicked";
/// The checkpoint was missing a piece, damaged, stale or disagreed with the
/// journal: recovery verified the whole journal instead (a slower open).
pub const CHECKPOINT_REJECTED: &str = "checkpoint_rejected";
/// A checkpoint could not be written: the next open verifies more of the journal.
pub const CHECKPOINT_FAILED: &str = "checkpoint_failed";

// The journal's size and the history window.

/// The journal passed its warning threshold.
pub const JOURNAL_WARN_THRESHOLD: &str = "journal_warn_threshold";
/// No prepared segment was left: one is prepared on the write path.
pub const SEGMENT_RESERVE_EXHAUSTED: &str = "segment_reserve_exhausted";
/// The journal is at its hard limit: writes wait for the applier.
pub const JOURNAL_HARD_LIMIT: &str = "journal_hard_limit";
/// Writes have waited at the hard limit for long: the applier is too slow.
pub const JOURNAL_HARD_LIMIT_STALLED: &str = "journal_hard_limit_stalled";
/// A write held at the hard limit after the stall alarm got its segment.
pub const JOURNAL_HARD_LIMIT_RELEASED: &str = "journal_hard_limit_released";
/// Records still inside the window were folded: the history got shorter.
pub const FORCED_FOLD: &str = "forced_fold";
/// A forced fold took records the replica had not acknowledged.
pub const FORCED_FOLD_OUT_OF_SYNC: &str = "forced_fold_out_of_sync";
/// A point-in-time view was folded away and fails its reads.
pub const VIEW_EXPIRED: &str = "view_expired";
/// A scratch overlay could not be removed.
pub const SCRATCH_NOT_REMOVED: &str = "scratch_not_removed";

// Branches and replica resync.

/// This replica takes the primary's disk: no point in time is readable until it ends.
pub const RESYNC_STARTED: &str = "resync_started";
/// A cut of the journal into a branch was interrupted; the open finished or undid it.
pub const CUT_INTERRUPTED: &str = "cut_interrupted";
/// An interrupted cut could not be undone; the next open will.
pub const CUT_UNDO_FAILED: &str = "cut_undo_failed";
/// The epochs begun after the cut point went with a cut.
pub const EPOCHS_CUT: &str = "epochs_cut";
/// A branch's files are damaged.
pub const BRANCH_DAMAGED: &str = "branch_damaged";
/// The records a newer primary never had were kept as a branch.
pub const BRANCH_KEPT: &str = "branch_kept";

// The daemon and its clients.

/// `rewind-blk` exits with an error (at start, or when serving ends).
pub const DAEMON_FAILED: &str = "daemon_failed";
/// The guest sent a request the device cannot answer (a malformed
/// descriptor chain, a status byte it cannot write).
pub const GUEST_PROTOCOL_ERROR: &str = "guest_protocol_error";

/// A QEMU was turned away (fenced, another attached, or the disk changed).
pub const CLIENT_REFUSED: &str = "client_refused";
/// The client's pid could not be read: it is admitted as a new one.
pub const CLIENT_UNIDENTIFIED: &str = "client_unidentified";
/// The volume was fenced: its client is cut off for good.
pub const FENCED: &str = "fenced";
/// An export of a point in time stopped on an error.
pub const EXPORT_FAILED: &str = "export_failed";
/// A user other than the daemon's and root tried the control socket.
pub const CONTROL_CLIENT_REFUSED: &str = "control_client_refused";
/// The control socket serves as many connections as it takes at once:
/// new ones are turned away until one ends.
pub const CONTROL_CONNECTIONS_FULL: &str = "control_connections_full";
/// systemd could not be told of the daemon's state.
pub const SYSTEMD_NOTIFY_FAILED: &str = "systemd_notify_failed";

// Scheduled bookmarks (`serve --bookmark-every`).

/// The guest could not be frozen (no agent, no answer, a refused freeze,
/// a failed drain): the scheduled bookmark is crash-consistent.
pub const SCHEDULED_BOOKMARK_NOT_QUIESCED: &str = "scheduled_bookmark_not_quiesced";
/// A scheduled bookmark could not be taken; the next tick tries again.
pub const SCHEDULED_BOOKMARK_FAILED: &str = "scheduled_bookmark_failed";
/// Thawing the guest's filesystems failed: it may still be frozen.
pub const GUEST_THAW_FAILED: &str = "guest_thaw_failed";

// Replication, failover and detach.

/// The replication session ended; the link reconnects.
pub const REPLICATION_LINK_DOWN: &str = "replication_link_down";
/// The replica cannot follow the journal: replication stopped.
pub const REPLICATION_OUTDATED: &str = "replication_outdated";
/// Both nodes were promoted and wrote: refused until one is resolved.
pub const REPLICATION_SPLIT_BRAIN: &str = "replication_split_brain";
/// A primary was turned away by this replica.
pub const REPLICATION_REFUSED: &str = "replication_refused";
/// A peer's certificate does not match the pinned fingerprint.
pub const REPLICATION_PEER_UNTRUSTED: &str = "replication_peer_untrusted";
/// Sync replication holds guest flushes: the replica does not confirm.
pub const REPLICATION_SUSPENDED: &str = "replication_suspended";
/// Sync replication degraded: guest flushes no longer wait for the replica.
pub const REPLICATION_DEGRADED: &str = "replication_degraded";
/// The daemon stopped before the replica confirmed the journal's tail.
pub const REPLICATION_TAIL_UNCONFIRMED: &str = "replication_tail_unconfirmed";
/// The `--fence-peer` hook runs before degrading.
pub const FENCE_PEER_RUN: &str = "fence_peer_run";
/// The `--fence-peer` hook failed: flushes wait instead of degrading.
pub const FENCE_PEER_FAILED: &str = "fence_peer_failed";
/// This node became the primary.
pub const PROMOTED: &str = "promoted";
/// This node sealed and is a replica.
pub const DEMOTED: &str = "demoted";
/// The primary did not seal within the failover's timeout.
pub const SEAL_TIMEOUT: &str = "seal_timeout";
/// A seal the replica asked for failed.
pub const SEAL_FAILED: &str = "seal_failed";
/// The gate could not be opened or closed after a role change.
pub const GATE_FAILED: &str = "gate_failed";
/// A newer primary exists: this node rejoined it as its replica.
pub const REJOINED: &str = "rejoined";
/// The local storage failed: the primary detaches to its replica.
pub const DETACHING: &str = "detaching";
/// Detached: guest IO is forwarded to the replica; evacuate with a handover.
pub const DETACHED: &str = "detached";
/// Detaching from the failed storage failed: guest requests fail.
pub const DETACH_FAILED: &str = "detach_failed";
/// A request forwarded to the replica failed, or the link carrying them was lost.
pub const FORWARD_FAILED: &str = "forward_failed";
/// The peer's storage failed: this node takes over to serve its guest.
pub const PEER_DETACHED: &str = "peer_detached";
/// A handover was rolled back: this node serves (or forwards) again.
pub const HANDOVER_ROLLED_BACK: &str = "handover_rolled_back";
/// A rolled-back handover could not serve again here.
pub const HANDOVER_ROLLBACK_FAILED: &str = "handover_rollback_failed";
/// A handover waits for the replica's verdict.
pub const HANDOVER_NO_VERDICT: &str = "handover_no_verdict";
/// A handover finished: the replica is the primary.
pub const HANDOVER_DONE: &str = "handover_done";

// The volume's storage, again.

/// A copy of `super` is cut off or fails its checksum: the other one is used.
pub const SUPER_COPY_DAMAGED: &str = "super_copy_damaged";

/// A time the primary stamped (a shipped record, a resync's sync point)
/// lies more than a minute past this node's clock: the hosts' clocks differ.
pub const CLOCK_SKEW: &str = "clock_skew";

/// Every name above, for the tests that keep them unique and documented.
pub const ALL: &[&str] = &[
    STORAGE_ERROR,
    VOLUME_FAILED,
    FOLD_FAILED,
    POOL_MAINTENANCE_FAILED,
    JOURNAL_TRUNCATED,
    THREAD_PANICKED,
    CHECKPOINT_REJECTED,
    CHECKPOINT_FAILED,
    JOURNAL_WARN_THRESHOLD,
    SEGMENT_RESERVE_EXHAUSTED,
    JOURNAL_HARD_LIMIT,
    JOURNAL_HARD_LIMIT_STALLED,
    JOURNAL_HARD_LIMIT_RELEASED,
    FORCED_FOLD,
    FORCED_FOLD_OUT_OF_SYNC,
    VIEW_EXPIRED,
    SCRATCH_NOT_REMOVED,
    RESYNC_STARTED,
    CUT_INTERRUPTED,
    CUT_UNDO_FAILED,
    EPOCHS_CUT,
    BRANCH_DAMAGED,
    BRANCH_KEPT,
    DAEMON_FAILED,
    GUEST_PROTOCOL_ERROR,
    CLIENT_REFUSED,
    CLIENT_UNIDENTIFIED,
    FENCED,
    EXPORT_FAILED,
    CONTROL_CLIENT_REFUSED,
    CONTROL_CONNECTIONS_FULL,
    SYSTEMD_NOTIFY_FAILED,
    SCHEDULED_BOOKMARK_NOT_QUIESCED,
    SCHEDULED_BOOKMARK_FAILED,
    GUEST_THAW_FAILED,
    REPLICATION_LINK_DOWN,
    REPLICATION_OUTDATED,
    REPLICATION_SPLIT_BRAIN,
    REPLICATION_REFUSED,
    REPLICATION_PEER_UNTRUSTED,
    REPLICATION_SUSPENDED,
    REPLICATION_DEGRADED,
    REPLICATION_TAIL_UNCONFIRMED,
    FENCE_PEER_RUN,
    FENCE_PEER_FAILED,
    PROMOTED,
    DEMOTED,
    SEAL_TIMEOUT,
    SEAL_FAILED,
    GATE_FAILED,
    REJOINED,
    DETACHING,
    DETACHED,
    DETACH_FAILED,
    FORWARD_FAILED,
    PEER_DETACHED,
    HANDOVER_ROLLED_BACK,
    HANDOVER_ROLLBACK_FAILED,
    HANDOVER_NO_VERDICT,
    HANDOVER_DONE,
    SUPER_COPY_DAMAGED,
    CLOCK_SKEW,
];

#[cfg(test)]
mod tests {
    use super::ALL;

    #[test]
    fn names_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for name in ALL {
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name} is not snake_case"
            );
        }
    }
}
