//! Errors of the volume engine.

use std::io;
use std::path::PathBuf;

use uuid::Uuid;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid volume settings: {0}")]
    InvalidSettings(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{0} already exists; choose another path or remove it first")]
    Exists(PathBuf),
    #[error("{0} is not a rewind volume (no volume.json)")]
    NotAVolume(PathBuf),
    #[error("volume {0} is open in another process")]
    Locked(PathBuf),
    #[error("{path} is damaged: {reason}")]
    BadMetadata { path: PathBuf, reason: String },
    #[error(
        "{what} uses on-disk format version {found}; this build reads version {} (open it \
         with the build that wrote it)",
        one_of(supported)
    )]
    UnsupportedVersion {
        what: String,
        found: u16,
        /// Every version this build reads there.
        supported: &'static [u16],
    },
    #[error("{path} belongs to volume {found}, not to this volume ({expected}); it must not be in this directory")]
    ForeignSegment {
        path: PathBuf,
        expected: Uuid,
        found: Uuid,
    },
    #[error(
        "journal damaged at lsn {lsn} ({path}, offset {offset}: {reason}), \
         but flush record {proof_lsn} proves that lsns up to {covered} were durable; \
         refusing to truncate flushed data (restore the file, or open with \
         truncate_damaged to truncate at lsn {lsn})"
    )]
    FlushedDataDamaged {
        lsn: u64,
        path: PathBuf,
        offset: u64,
        reason: String,
        proof_lsn: u64,
        covered: u64,
    },
    #[error(
        "{path} is damaged: {reason}; a prepared segment never looks like this after a crash \
         (restore the file, or open with truncate_damaged to end the journal before it)"
    )]
    DamagedSegment { path: PathBuf, reason: String },
    #[error(
        "journal full: the pool holds {used} of its {max}-byte limit and no segment can be freed"
    )]
    JournalFull { used: u64, max: u64 },
    #[error(
        "{requested} is outside the history window: it holds {start} (lsn {start_lsn}) \
         to {end} (lsn {last_lsn})"
    )]
    OutsideWindow {
        requested: String,
        start: String,
        end: String,
        start_lsn: u64,
        last_lsn: u64,
    },
    #[error("no bookmark named {0:?} in the history window (list them with the timeline)")]
    NoSuchBookmark(String),
    #[error(
        "lsn {lsn} is already folded into base.img (the journal starts after lsn {base_lsn}); \
         a replica that needs it must be resynced"
    )]
    Folded { lsn: u64, base_lsn: u64 },
    #[error(
        "a resync to lsn {sync_lsn} is under way ({done} of {size} bytes done): no point in \
         time is readable until it ends"
    )]
    Resyncing { sync_lsn: u64, done: u64, size: u64 },
    #[error("shipped record {lsn} needs a resync: {reason}")]
    NeedsResync { lsn: u64, reason: String },
    #[error("shipped record {lsn} refused: {reason}")]
    BadShipped { lsn: u64, reason: String },
    #[error("no branch named {name:?} (list them with the branches command)")]
    UnknownBranch { name: String },
    #[error(
        "a branch named {name:?} already exists with other content ({existing}); \
         choose another name or drop it first"
    )]
    BranchExists { name: String, existing: String },
    #[error("branch {name:?} cannot be read: {reason}")]
    BranchUnreadable { name: String, reason: String },
    #[error("view expired: {0}")]
    ViewExpired(String),
    #[error("{0} is a read-only view")]
    ReadOnly(String),
    #[error(
        "volume stopped taking writes after an unrecoverable IO error ({0}); reopen it to recover"
    )]
    Failed(String),
    #[error("{path} was not written (the volume's last one stays): {reason}")]
    NotStored { path: PathBuf, reason: String },
}

impl Error {
    /// For `map_err`: the context is only built if there is an error.
    pub(crate) fn io<S: Into<String>>(
        context: impl FnOnce() -> S,
    ) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io {
            context: context().into(),
            source,
        }
    }
}

/// "2", "2 or 3", "2, 3 or 4".
fn one_of(versions: &[u16]) -> String {
    let names: Vec<String> = versions.iter().map(u16::to_string).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_listed_as_alternatives() {
        assert_eq!(one_of(&[2]), "2");
        assert_eq!(one_of(&[2, 3]), "2 or 3");
        assert_eq!(one_of(&[2, 3, 4]), "2, 3 or 4");
    }
}
