//! `super`: the pool's segment list and the journal's base, double-buffered.
//!
//! The file has two fixed-size slots. An update writes the slot that does
//! not hold the newest generation and syncs it, so a torn update damages
//! only that slot and the other still holds the previous state. `open`
//! takes the valid slot with the highest generation. Layout in FORMAT.md.
//!
//! Only ever written in place, never replaced: `Volume::open` holds its
//! flock on this file to keep a second open out.

use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::{crc32c, le_u32, le_u64, FORMAT_VERSION};
use crate::storage::{Storage, StorageFile};

pub const SUPER_FILE: &str = "super";
const MAGIC: [u8; 8] = *b"RWNDSUP\0";
const SLOT_SIZE: usize = 128 << 10;
const HEAD: usize = 80;
const ENTRY: usize = 16;
/// Most segments one slot can list.
pub const MAX_SEGMENTS: usize = (SLOT_SIZE - HEAD - 4) / ENTRY;

/// One segment file of the pool, in the order the journal uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRef {
    pub file_id: u32,
    /// The use this file is prepared for; its header and records carry it.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperState {
    pub generation: u64,
    /// Every record with lsn <= base_lsn is folded into base.img.
    pub base_lsn: u64,
    /// Time of record base_lsn, whose state base.img holds (0 before the
    /// first fold: the initial image).
    pub base_timestamp: u64,
    /// base.img may already hold changes up to this lsn (>= base_lsn): a
    /// fold to it is under way, so no state before it can be read again.
    pub horizon_lsn: u64,
    pub next_seq: u64,
    pub next_file_id: u32,
    /// Segments holding records (oldest first), then the prepared free ones.
    pub segments: Vec<SegmentRef>,
}

impl SuperState {
    pub fn empty() -> Self {
        SuperState {
            generation: 0,
            base_lsn: 0,
            base_timestamp: 0,
            horizon_lsn: 0,
            next_seq: 1,
            next_file_id: 0,
            segments: Vec::new(),
        }
    }

    fn encode(&self, volume: Uuid) -> Vec<u8> {
        let mut b = vec![0u8; HEAD + ENTRY * self.segments.len() + 4];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.segments.len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_lsn.to_le_bytes());
        b[32..40].copy_from_slice(&self.next_seq.to_le_bytes());
        b[40..44].copy_from_slice(&self.next_file_id.to_le_bytes());
        b[48..64].copy_from_slice(volume.as_bytes());
        b[64..72].copy_from_slice(&self.base_timestamp.to_le_bytes());
        b[72..80].copy_from_slice(&self.horizon_lsn.to_le_bytes());
        for (i, s) in self.segments.iter().enumerate() {
            let at = HEAD + i * ENTRY;
            b[at..at + 4].copy_from_slice(&s.file_id.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.seq.to_le_bytes());
        }
        let end = b.len() - 4;
        let crc = crc32c(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)` for a slot that is empty (never written: no magic) or
    /// torn or damaged (the magic, but a wrong count or checksum).
    fn decode(b: &[u8], volume: Uuid) -> Result<Option<Self>, String> {
        if b.len() < HEAD + 4 || b[0..8] != MAGIC {
            return Ok(None);
        }
        let count = le_u32(b, 12) as usize;
        if count > MAX_SEGMENTS {
            return Ok(None);
        }
        let end = HEAD + count * ENTRY;
        if crc32c(&b[..end]) != le_u32(b, end) {
            return Ok(None);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, expected {FORMAT_VERSION}"
            ));
        }
        if b[48..64] != volume.as_bytes()[..] {
            return Err("it belongs to another volume".into());
        }
        let segments = (0..count)
            .map(|i| {
                let at = HEAD + i * ENTRY;
                SegmentRef {
                    file_id: le_u32(b, at),
                    seq: le_u64(b, at + 8),
                }
            })
            .collect();
        Ok(Some(SuperState {
            generation: le_u64(b, 16),
            base_lsn: le_u64(b, 24),
            base_timestamp: le_u64(b, 64),
            horizon_lsn: le_u64(b, 72),
            next_seq: le_u64(b, 32),
            next_file_id: le_u32(b, 40),
            segments,
        }))
    }
}

/// The open `super` file.
#[derive(Debug)]
pub struct Superblock {
    file: Arc<dyn StorageFile>,
    volume: Uuid,
    state: SuperState,
}

impl Superblock {
    /// Creates the file with `state` in its first slot.
    pub fn create(storage: &dyn Storage, dir: &Path, volume: Uuid) -> Result<Self> {
        let path = dir.join(SUPER_FILE);
        let file = storage
            .create_new(&path)
            .map_err(Error::io(|| format!("creating {}", path.display())))?;
        file.set_len(2 * SLOT_SIZE as u64)
            .map_err(Error::io(|| format!("sizing {}", path.display())))?;
        let mut sb = Superblock {
            file,
            volume,
            state: SuperState::empty(),
        };
        sb.store(SuperState::empty())?;
        Ok(sb)
    }

    pub fn open(storage: &dyn Storage, dir: &Path, volume: Uuid) -> Result<Self> {
        let path = dir.join(SUPER_FILE);
        let bad = |reason: String| Error::BadMetadata {
            path: path.clone(),
            reason,
        };
        let file = storage
            .open(&path)
            .map_err(Error::io(|| format!("opening {}", path.display())))?;
        let mut best: Option<SuperState> = None;
        for slot in 0..2 {
            // A copy that was written but no longer reads back (an update a
            // crash tore, or damage) may have been the newest: then the
            // older one is used. A segment with records that only the lost
            // copy listed makes the open refuse (`check_unlisted` in
            // volume.rs, `check_header` in recovery.rs).
            let damaged = |why: &str| {
                tracing::warn!(
                    event = crate::events::SUPER_COPY_DAMAGED,
                    volume = %volume,
                    path = %path.display(),
                    slot,
                    "copy {slot} of super {why}; using the other copy (an update a crash \
                     interrupted, or damage)"
                );
            };
            let mut b = vec![0u8; SLOT_SIZE];
            match file.read_exact_at(&mut b, (slot * SLOT_SIZE) as u64) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // `create` sizes the file for both copies first.
                    damaged("is cut off: the file is shorter than its two copies");
                    continue;
                }
                Err(e) => return Err(Error::io(|| format!("reading {}", path.display()))(e)),
            }
            match SuperState::decode(&b, volume).map_err(bad)? {
                Some(s) if best.as_ref().is_none_or(|b| s.generation > b.generation) => {
                    best = Some(s);
                }
                Some(_) => {}
                None if b[0..8] == MAGIC => damaged("fails its checksum"),
                None => {}
            }
        }
        let state = best.ok_or_else(|| bad("neither copy is valid".into()))?;
        Ok(Superblock {
            file,
            volume,
            state,
        })
    }

    pub fn state(&self) -> &SuperState {
        &self.state
    }

    /// Durably replaces the state (the generation is assigned here).
    pub fn store(&mut self, mut state: SuperState) -> Result<()> {
        if state.segments.len() > MAX_SEGMENTS {
            return Err(Error::InvalidSettings(format!(
                "the pool cannot list more than {MAX_SEGMENTS} segments"
            )));
        }
        state.generation = self.state.generation + 1;
        let slot = (state.generation % 2) as usize;
        let bytes = state.encode(self.volume);
        self.file
            .write_all_at(&[&bytes], (slot * SLOT_SIZE) as u64)
            .and_then(|()| self.file.sync_data())
            .map_err(Error::io(|| "writing super"))?;
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::FaultStorage;

    fn state(n: u32) -> SuperState {
        SuperState {
            generation: 0,
            base_lsn: 10,
            base_timestamp: 77,
            horizon_lsn: 12,
            next_seq: 5,
            next_file_id: n,
            segments: (0..n)
                .map(|i| SegmentRef {
                    file_id: i,
                    seq: u64::from(i) + 1,
                })
                .collect(),
        }
    }

    #[test]
    fn a_torn_update_leaves_the_previous_state() {
        let fs = FaultStorage::new();
        let dir = Path::new("/v");
        fs.create_dir_all(dir).expect("mkdir");
        let id = Uuid::new_v4();
        let mut sb = Superblock::create(&fs, dir, id).expect("create");
        sb.store(state(3)).expect("store");
        let before = sb.state().clone();
        // An update that never reaches the disk: every crash shows `before`
        // or the update, never garbage.
        let mut next = state(4);
        next.base_lsn = 99;
        let file = sb.file.clone();
        let bytes = {
            next.generation = before.generation + 1;
            next.encode(id)
        };
        let slot = (next.generation % 2) as usize * SLOT_SIZE;
        file.write_all_at(&[&bytes], slot as u64).expect("write");
        for seed in 0..32 {
            let crashed = fs.crash(seed);
            let got = Superblock::open(&crashed, dir, id).expect("open").state;
            assert!(got == before || got == next, "seed {seed}: {got:?}");
        }
    }

    #[test]
    fn foreign_or_damaged_supers_are_refused() {
        let fs = FaultStorage::new();
        let dir = Path::new("/v");
        fs.create_dir_all(dir).expect("mkdir");
        let id = Uuid::new_v4();
        Superblock::create(&fs, dir, id).expect("create");
        let err = Superblock::open(&fs, dir, Uuid::new_v4()).unwrap_err();
        assert!(err.to_string().contains("another volume"), "{err}");
        fs.set_contents(&dir.join(SUPER_FILE), vec![0xA5; 2 * SLOT_SIZE]);
        let err = Superblock::open(&fs, dir, id).unwrap_err();
        assert!(err.to_string().contains("neither copy"), "{err}");
    }
}
