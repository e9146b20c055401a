//! `volume.json`: a volume's identity and settings.
//!
//! Written once at creation and again only when a setting or the epoch
//! changes, always with write-then-rename, so a crash leaves the old or the
//! new file. The epoch lives here rather than in `super` because it changes
//! rarely and must be readable by people and tools.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::{FORMAT_VERSION, PAGE, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};
use crate::storage::Storage;
use crate::superblock::MAX_SEGMENTS;

/// The smallest write a guest makes.
const SECTOR_BYTES: u64 = 512;

pub const VOLUME_FILE: &str = "volume.json";
/// Bytes a `volume.json` may have: it is a few KiB (its client records
/// are capped), so a larger file is not one, and is not read.
pub(crate) const MAX_VOLUME_FILE: u64 = 1 << 20;

/// Most epochs an epoch history lists. volume.json lists every one, in
/// at most 126 bytes each (three 20-digit numbers, written out): these
/// take about half of its [`MAX_VOLUME_FILE`]. (Every promotion, failover,
/// handover and fence starts an epoch.)
pub const MAX_EPOCHS: usize = 4096;

/// Epochs a history keeps when one more would take it past
/// [`MAX_EPOCHS`]: the oldest are forgotten. Two copies relate only while
/// one still lists the other's first epoch (vhost-blk's
/// `replication/history.rs`), so a copy fewer than this many epochs
/// behind another always relates to it: far more role changes than a copy
/// misses while it is away (each needs another copy promoted meanwhile).
/// Half rather than all but one: a history is cut once per 2048 raises,
/// not at every one, so its first entry, which relating aligns on and
/// `status` shows, stays put that long.
pub const KEEP_EPOCHS: usize = MAX_EPOCHS / 2;

/// Forgets the oldest epochs of a history longer than [`MAX_EPOCHS`],
/// keeping the newest [`KEEP_EPOCHS`]. The entries kept are as they were,
/// so a copy still relates to another by any epoch both list
/// (vhost-blk's `replication/history.rs`).
pub(crate) fn compact_epochs(history: &mut Vec<EpochStart>) {
    if history.len() > MAX_EPOCHS {
        history.drain(..history.len() - KEEP_EPOCHS);
    }
}

/// Reads the whole of `path`, a file of the volume that holds at most
/// `max` bytes (`what` names it: "a volume.json"). A larger one is
/// damage, refused unread: a huge one would take the memory of its size.
pub(crate) fn read_small_file(
    storage: &dyn Storage,
    path: &Path,
    max: u64,
    what: &str,
) -> Result<Vec<u8>> {
    let context = || format!("reading {}", path.display());
    let file = storage.open(path).map_err(Error::io(context))?;
    let size = file.size().map_err(Error::io(context))?;
    check_small_file(size, max, what).map_err(|reason| Error::BadMetadata {
        path: path.to_owned(),
        reason,
    })?;
    let mut bytes = vec![0u8; size as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(Error::io(context))?;
    Ok(bytes)
}

/// Refuses `size` bytes for a file [`read_small_file`] reads only up to
/// `max`.
fn check_small_file(size: u64, max: u64, what: &str) -> std::result::Result<(), String> {
    if size > max {
        return Err(format!("it is {size} bytes; {what} is at most {max}"));
    }
    Ok(())
}

/// What a new volume is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSettings {
    /// Disk size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size advertised to guests: 512 or 4096.
    pub block_size: u32,
    /// Bytes per journal segment file (multiple of 64 KiB, 64 KiB to 1 GiB).
    pub segment_size: u64,
    /// History kept in the journal.
    pub window: Duration,
    /// Hard limit on the pool's size on disk.
    pub journal_max: u64,
    /// Pool size at which a warning is raised.
    pub journal_warn: u64,
    /// Free, preallocated segments kept ready for the write path.
    pub reserve_segments: u32,
    /// Write the whole pool (`journal_max`) once, at creation, and keep
    /// its files: the journal then always writes over blocks written
    /// before, as a preallocated raw image does, at the cost of the disk
    /// space of the whole limit from the start (see [`VolumeConfig`]).
    pub preallocate_journal: bool,
}

impl VolumeSettings {
    /// Defaults for a disk of `size` bytes: 64 MiB segments, a one-hour
    /// window, a journal limited to the disk's size (at least 1 GiB) with a
    /// warning at 80%.
    pub fn new(size: u64) -> Self {
        let journal_max = size.max(1 << 30);
        VolumeSettings {
            size,
            block_size: 512,
            segment_size: 64 << 20,
            window: Duration::from_secs(3600),
            journal_max,
            journal_warn: journal_max / 10 * 8,
            reserve_segments: 2,
            preallocate_journal: false,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::InvalidSettings(s));
        if self.block_size != 512 && self.block_size != 4096 {
            return bad(format!("block size {} is not 512 or 4096", self.block_size));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(self.block_size)) {
            return bad(format!(
                "size {} is not a positive multiple of the block size {}",
                self.size, self.block_size
            ));
        }
        if !self.segment_size.is_multiple_of(64 << 10)
            || !(64 << 10..=1 << 30).contains(&self.segment_size)
        {
            return bad(format!(
                "segment size {} is not a multiple of 64 KiB between 64 KiB and 1 GiB",
                self.segment_size
            ));
        }
        if self.reserve_segments == 0 {
            return bad("the reserve needs at least one segment".into());
        }
        let least = (u64::from(self.reserve_segments) + 1) * self.segment_size;
        if self.journal_max < least {
            return bad(format!(
                "journal limit {} is below {} (reserve + 1 segments)",
                self.journal_max, least
            ));
        }
        if self.journal_max / self.segment_size > MAX_SEGMENTS as u64 {
            return bad(format!(
                "journal limit {} needs more than {} segments of {} bytes; use larger segments",
                self.journal_max, MAX_SEGMENTS, self.segment_size
            ));
        }
        if self.journal_warn > self.journal_max {
            return bad(format!(
                "warning threshold {} is above the limit {}",
                self.journal_warn, self.journal_max
            ));
        }
        Ok(())
    }
}

/// The content of `volume.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format_version: u16,
    pub uuid: Uuid,
    pub size: u64,
    pub block_size: u32,
    pub segment_size: u64,
    pub window_secs: u64,
    pub journal_max: u64,
    pub journal_warn: u64,
    pub reserve_segments: u32,
    /// The pool's files are written in full when prepared and never
    /// removed, only recycled: a file system allocates a block on its
    /// first write (and a thin disk below it too), which made sequential
    /// writes into new segment files 0.6x the rate of writes over blocks
    /// written before (BENCHMARKS.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preallocate_journal: bool,
    /// Fencing generation: records carry it; raising it fences old writers.
    pub epoch: u64,
    /// Whether this copy serves a guest or receives a primary's records;
    /// promotion and demotion change it.
    #[serde(default)]
    pub role: Role,
    /// This copy's tag (random, not 0), written into the Epoch records it
    /// raises; 0 in volumes made before tags existed.
    #[serde(default)]
    pub node: u64,
    /// Set when this copy holds every record of epoch `sealed.epoch`: a
    /// primary that demoted itself, or a replica its primary sealed to.
    /// Such a replica may be promoted without losing anything.
    #[serde(default)]
    pub sealed: Option<Seal>,
    /// Where each epoch began, oldest first; kept here because Epoch
    /// records fold away with the journal, and rejoining a replica after a
    /// failover finds the common point from these (DESIGN.md, "Divergence
    /// and rejoin").
    #[serde(default)]
    pub epoch_history: Vec<EpochStart>,
    /// The last clients the daemon admitted (at most
    /// [`MAX_ATTACH_RECORDS`], oldest first), so that a client that comes
    /// back after a daemon restart is held to the reattach rule too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<AttachRecord>,
}

/// How many clients volume.json remembers: enough for the QEMU instances
/// of one VM's life (restarts, migrations), small enough to rewrite.
pub const MAX_ATTACH_RECORDS: usize = 16;

/// A client of the volume's live export, as volume.json keeps it
/// (DESIGN.md, "Drain and fence": a client that comes back continues only
/// at the same epoch and if nothing modified the disk since it left).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRecord {
    /// Who (the daemon's attach id, opaque here).
    pub client: String,
    /// The epoch it was admitted at.
    pub epoch: u64,
    /// The volume's last lsn when it left; `None` while it is attached
    /// (after a crash of the daemon: it left when the daemon died, and
    /// what recovery kept is what it saw).
    pub left_lsn: Option<u64>,
}

/// A volume's role (DESIGN.md, "Roles and identity").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves a guest and ships its journal.
    #[default]
    Primary,
    /// Takes a primary's records at the same lsns; serves no guest writes.
    Replica,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// The first lsn written in an epoch, and the tag of the copy that
/// raised it (0 for the first epoch, which every copy shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    pub first_lsn: u64,
    #[serde(default)]
    pub node: u64,
}

/// The end of an epoch: its primary stopped at `lsn` (DESIGN.md,
/// "Failover": a sealed primary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub epoch: u64,
    pub lsn: u64,
}

impl VolumeConfig {
    /// Journal bytes that can hold history: the hard limit less the
    /// segments the pool keeps free (its reserve, the applier's early
    /// folds and the segment being written).
    pub fn history_bytes(&self) -> u64 {
        let segments = self.journal_max / self.segment_size;
        let headroom =
            u64::from(self.reserve_segments) + crate::pool::early_fold_segments(segments) + 1;
        segments.saturating_sub(headroom) * self.segment_size
    }

    /// How much history the journal holds when the guest writes
    /// `bytes_per_second` in writes of `write_size` bytes each (every
    /// record takes a header slot besides its payload): past it, the hard
    /// limit folds early and the effective window shrinks below
    /// `window_secs`.
    pub fn history_at(&self, bytes_per_second: u64, write_size: u64) -> Duration {
        let write_size = write_size.max(SECTOR_BYTES);
        let per_second = bytes_per_second.max(1) as f64 * (write_size + RECORD_HEADER_SIZE) as f64
            / write_size as f64;
        Duration::from_secs_f64(self.history_bytes() as f64 / per_second)
    }

    pub(crate) fn new(settings: &VolumeSettings) -> Self {
        VolumeConfig {
            format_version: FORMAT_VERSION,
            uuid: Uuid::new_v4(),
            size: settings.size,
            block_size: settings.block_size,
            segment_size: settings.segment_size,
            window_secs: settings.window.as_secs(),
            journal_max: settings.journal_max,
            journal_warn: settings.journal_warn,
            reserve_segments: settings.reserve_segments,
            preallocate_journal: settings.preallocate_journal,
            epoch: 1,
            role: Role::Primary,
            node: new_node_tag(),
            sealed: None,
            epoch_history: vec![EpochStart {
                epoch: 1,
                first_lsn: 1,
                node: 0,
            }],
            clients: Vec::new(),
        }
    }

    /// Records that an epoch began (an Epoch record), forgetting the
    /// oldest epochs past [`MAX_EPOCHS`]: every epoch a copy takes, raised
    /// or shipped, comes here.
    pub(crate) fn start_epoch(&mut self, start: EpochStart) {
        self.epoch = self.epoch.max(start.epoch);
        if self
            .epoch_history
            .last()
            .is_none_or(|last| last.epoch < start.epoch)
        {
            self.epoch_history.push(start);
            compact_epochs(&mut self.epoch_history);
        }
    }

    pub fn settings(&self) -> VolumeSettings {
        VolumeSettings {
            size: self.size,
            block_size: self.block_size,
            segment_size: self.segment_size,
            window: Duration::from_secs(self.window_secs),
            journal_max: self.journal_max,
            journal_warn: self.journal_warn,
            reserve_segments: self.reserve_segments,
            preallocate_journal: self.preallocate_journal,
        }
    }

    /// Largest payload one record carries; bigger writes become several
    /// records. At least two such records fit in a segment, whatever the
    /// alignment of their payloads.
    pub(crate) fn max_record_payload(&self) -> u64 {
        let room =
            (self.segment_size - SEGMENT_HEADER_SIZE - 2 * PAGE - 2 * RECORD_HEADER_SIZE) / 2;
        (room / PAGE * PAGE).min(1 << 20)
    }

    /// Records `record`, replacing the same client's; the oldest beyond
    /// [`MAX_ATTACH_RECORDS`] are forgotten.
    pub(crate) fn note_client(&mut self, record: AttachRecord) {
        self.clients.retain(|r| r.client != record.client);
        self.clients.push(record);
        let excess = self.clients.len().saturating_sub(MAX_ATTACH_RECORDS);
        self.clients.drain(..excess);
    }

    /// What a daemon never writes: more records than kept, an empty or
    /// repeated client.
    fn check_clients(&self) -> std::result::Result<(), String> {
        if self.clients.len() > MAX_ATTACH_RECORDS {
            return Err(format!(
                "{} clients recorded, at most {MAX_ATTACH_RECORDS} are kept",
                self.clients.len()
            ));
        }
        for (i, record) in self.clients.iter().enumerate() {
            if record.client.is_empty() {
                return Err(format!("client record {i} names no client"));
            }
            if self.clients[..i].iter().any(|r| r.client == record.client) {
                return Err(format!("client {} is recorded twice", record.client));
            }
        }
        Ok(())
    }

    pub(crate) fn load(storage: &dyn Storage, dir: &Path) -> Result<Self> {
        let path = dir.join(VOLUME_FILE);
        if !storage.exists(&path) {
            return Err(Error::NotAVolume(dir.to_owned()));
        }
        let bytes = read_small_file(storage, &path, MAX_VOLUME_FILE, "a volume.json")?;
        let config: VolumeConfig =
            serde_json::from_slice(&bytes).map_err(|e| Error::BadMetadata {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if config.format_version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                what: path.display().to_string(),
                found: config.format_version,
                supported: &[FORMAT_VERSION],
            });
        }
        config
            .check()
            .map_err(|reason| Error::BadMetadata { path, reason })?;
        Ok(config)
    }

    /// What [`VolumeConfig::load`] refuses of a volume.json's content.
    fn check(&self) -> std::result::Result<(), String> {
        self.settings()
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|()| self.check_clients())
    }

    /// Writes volume.json; refuses, writing nothing, one that
    /// [`VolumeConfig::load`] would refuse: the volume would not open again.
    pub(crate) fn store(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        let path = dir.join(VOLUME_FILE);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::BadMetadata {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        self.check()
            .and_then(|()| check_small_file(bytes.len() as u64, MAX_VOLUME_FILE, "a volume.json"))
            .map_err(|reason| Error::NotStored {
                path: path.clone(),
                reason,
            })?;
        storage
            .write_file_atomic(&path, &bytes)
            .map_err(Error::io(|| format!("writing {}", path.display())))
    }
}

/// A random tag for a new volume copy; never 0 (that means "made before
/// tags existed").
pub(crate) fn new_node_tag() -> u64 {
    Uuid::new_v4().as_u64_pair().0 | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_a_journal_holds_shrinks_with_the_write_rate() {
        let config = VolumeConfig::new(&VolumeSettings::new(10 << 30));
        // 160 segments of 64 MiB: 2 in reserve, 10 for early folds, 1 open.
        assert_eq!(config.history_bytes(), (160 - 13) * (64 << 20));
        let big = config.history_at(100 << 20, 1 << 20);
        let small = config.history_at(100 << 20, 4096);
        assert!(
            big > small,
            "a header slot per 4 KiB record costs an eighth"
        );
        let ratio = big.as_secs_f64() / small.as_secs_f64();
        assert!(
            (ratio - 4608.0 / 4096.0 * 1048576.0 / 1049088.0).abs() < 1e-6,
            "{ratio}"
        );
        assert_eq!(
            config.history_at(1 << 20, 1 << 20).as_secs(),
            (147 * 64 * 1048576u64) / 1049088,
        );
        let tiny = VolumeConfig::new(&VolumeSettings {
            journal_max: 64 << 20,
            ..VolumeSettings::new(1 << 20)
        });
        assert_eq!(tiny.history_bytes(), 0, "one segment is all headroom");
    }

    #[test]
    fn defaults_are_valid_and_bad_settings_are_named() {
        VolumeSettings::new(1 << 30).validate().expect("defaults");
        let mut s = VolumeSettings::new(1 << 30);
        s.size = 1000;
        assert!(s.validate().unwrap_err().to_string().contains("size 1000"));
        let mut s = VolumeSettings::new(1 << 30);
        s.segment_size = 12345;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("segment size"));
        let mut s = VolumeSettings::new(1 << 30);
        s.journal_warn = s.journal_max + 1;
        assert!(s.validate().unwrap_err().to_string().contains("warning"));
        let mut s = VolumeSettings::new(1 << 30);
        s.journal_max = s.segment_size;
        assert!(s.validate().unwrap_err().to_string().contains("reserve"));
    }

    fn client(n: u32, left_lsn: Option<u64>) -> AttachRecord {
        AttachRecord {
            client: format!("{n}:1"),
            epoch: 1,
            left_lsn,
        }
    }

    #[test]
    fn the_last_clients_are_kept_once_each_and_round_trip() {
        let mut config = VolumeConfig::new(&VolumeSettings::new(1 << 20));
        for n in 0..20 {
            config.note_client(client(n, None));
        }
        config.note_client(client(10, Some(7)));
        let kept: Vec<&str> = config.clients.iter().map(|r| r.client.as_str()).collect();
        let mut want: Vec<String> = (4..20)
            .filter(|&n| n != 10)
            .map(|n| format!("{n}:1"))
            .collect();
        want.push("10:1".into());
        assert_eq!(
            kept, want,
            "the oldest forgotten, a returning one moved last"
        );
        assert_eq!(config.clients.len(), MAX_ATTACH_RECORDS);

        let fs = crate::fault::FaultStorage::new();
        let dir = Path::new("/vol");
        fs.create_dir_all(dir).expect("dir");
        config.store(&fs, dir).expect("store");
        assert_eq!(VolumeConfig::load(&fs, dir).expect("load"), config);
        // A volume without clients writes no field, and reads as none.
        let none = VolumeConfig::new(&VolumeSettings::new(1 << 20));
        let text = serde_json::to_string(&none).expect("json");
        assert!(!text.contains("clients"), "{text}");
    }

    #[test]
    fn past_the_most_epochs_the_oldest_are_forgotten_and_the_newest_kept() {
        let mut config = VolumeConfig::new(&VolumeSettings::new(1 << 20));
        let start = |epoch: u64| EpochStart {
            epoch,
            first_lsn: epoch * 10,
            node: 7,
        };
        for epoch in 2..=MAX_EPOCHS as u64 {
            config.start_epoch(start(epoch));
        }
        assert_eq!(config.epoch_history.len(), MAX_EPOCHS);
        assert_eq!(config.epoch_history[0].epoch, 1);
        // The next one would list one too many.
        config.start_epoch(start(MAX_EPOCHS as u64 + 1));
        let newest: Vec<EpochStart> = (MAX_EPOCHS - KEEP_EPOCHS + 2..=MAX_EPOCHS + 1)
            .map(|epoch| start(epoch as u64))
            .collect();
        assert_eq!(config.epoch_history, newest);
        assert_eq!(config.epoch, MAX_EPOCHS as u64 + 1);
        // Bounded however many follow; the same epoch again adds nothing.
        for epoch in MAX_EPOCHS as u64 + 2..=5 * MAX_EPOCHS as u64 {
            config.start_epoch(start(epoch));
            config.start_epoch(start(epoch));
            assert!(config.epoch_history.len() <= MAX_EPOCHS);
        }
        let last = config.epoch_history.last().expect("an epoch");
        assert_eq!(*last, start(5 * MAX_EPOCHS as u64));
        assert!(config
            .epoch_history
            .windows(2)
            .all(|pair| pair[1].epoch == pair[0].epoch + 1));
    }

    #[test]
    fn the_most_epochs_and_clients_fit_a_volume_json() {
        let mut config = VolumeConfig::new(&VolumeSettings::new(1 << 20));
        config.epoch_history = vec![
            EpochStart {
                epoch: u64::MAX,
                first_lsn: u64::MAX,
                node: u64::MAX,
            };
            MAX_EPOCHS
        ];
        for n in 0..MAX_ATTACH_RECORDS as u32 {
            config.note_client(AttachRecord {
                client: format!("{n:0>64}"),
                epoch: u64::MAX,
                left_lsn: Some(u64::MAX),
            });
        }
        let bytes = serde_json::to_vec_pretty(&config).expect("json");
        // Half of it, and room for the rest.
        assert!(
            bytes.len() as u64 <= MAX_VOLUME_FILE * 2 / 3,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn bad_client_records_are_named() {
        let fs = crate::fault::FaultStorage::new();
        let dir = Path::new("/vol");
        fs.create_dir_all(dir).expect("dir");
        let good = VolumeConfig::new(&VolumeSettings::new(1 << 20));
        // Refused by store as by load, for the same reason.
        let rejected = |clients: Vec<AttachRecord>| {
            let config = VolumeConfig {
                clients,
                ..good.clone()
            };
            let not_stored = config.store(&fs, dir).unwrap_err().to_string();
            let bytes = serde_json::to_vec(&config).expect("json");
            fs.write_file_atomic(&dir.join(VOLUME_FILE), &bytes)
                .expect("write");
            let e = VolumeConfig::load(&fs, dir).unwrap_err().to_string();
            let reason = e.split_once("damaged: ").expect("damaged").1;
            assert!(
                not_stored.contains("was not written") && not_stored.ends_with(reason),
                "{not_stored}"
            );
            e
        };
        let many = (0..17).map(|n| client(n, None)).collect();
        let e = rejected(many);
        assert!(
            e.contains("volume.json is damaged") && e.contains("17 clients"),
            "{e}"
        );
        let e = rejected(vec![client(1, None), client(1, Some(3))]);
        assert!(e.contains("client 1:1 is recorded twice"), "{e}");
        let mut empty = client(1, None);
        empty.client.clear();
        assert!(rejected(vec![empty]).contains("names no client"));

        // Not JSON for a record: the parser's reason, with the file.
        let mut text = serde_json::to_value(&good).expect("json");
        text["clients"] = serde_json::json!([{ "client": "1:1", "epoch": "one" }]);
        let path = dir.join(VOLUME_FILE);
        fs.write_file_atomic(&path, text.to_string().as_bytes())
            .expect("write");
        let e = VolumeConfig::load(&fs, dir).unwrap_err().to_string();
        assert!(
            e.contains("/vol/volume.json is damaged") && e.contains("expected u64"),
            "{e}"
        );
    }

    #[test]
    fn record_payloads_fit_twice_in_a_segment() {
        let mut s = VolumeSettings::new(1 << 20);
        s.segment_size = 64 << 10;
        let c = VolumeConfig::new(&s);
        let p = c.max_record_payload();
        assert_eq!(p % PAGE, 0);
        let slot = s.segment_size - RECORD_HEADER_SIZE;
        let first = crate::format::payload_position(SEGMENT_HEADER_SIZE, p, slot).expect("first");
        // Even after a payload that is not whole pages (worst alignment).
        let odd = crate::format::payload_position(first + p, 512, slot - 512).expect("odd");
        crate::format::payload_position(odd + 512, p, slot - 1024).expect("third");
        assert_eq!(
            VolumeConfig::new(&VolumeSettings::new(1 << 30)).max_record_payload(),
            1 << 20
        );
    }
}
