//! The out-of-sync map: what a forced fold took from the journal before
//! the replica had it (DESIGN.md, "Folding with replicas, and resync").
//!
//! When the hard limit forces the applier to fold records the replica has
//! not acknowledged, the replica can no longer follow the journal. Before
//! those records leave it, the chunks they touch are marked here, durably,
//! so that the replica's resync sends only those chunks (the rest of its
//! disk is already right) instead of comparing every chunk.
//!
//! `<vol>/out-of-sync`, written atomically (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RWNDOOS\0` |
//! | 8 | 8 | `from_lsn`: the replica held every record up to it |
//! | 16 | 8 | `upto_lsn`: records up to it are folded; from it on the journal serves |
//! | 24 | 4 | chunk size in bytes (64 KiB) |
//! | 28 | 4 | zero |
//! | 32 | n | one bit per chunk of the disk, chunk i at byte i / 8, bit i % 8 |
//! | 32 + n | 4 | CRC-32C of every byte before it |

use std::path::PathBuf;

use super::{lock, Inner, Volume};
use crate::error::{Error, Result};
use crate::format::{crc32c, le_u32, le_u64, SECTOR};
use crate::record_index::{Effect, Snapshot};

pub const OUT_OF_SYNC_FILE: &str = "out-of-sync";
/// Bytes of the disk one bit stands for.
pub const OUT_OF_SYNC_CHUNK: u64 = 64 << 10;
const MAGIC: [u8; 8] = *b"RWNDOOS\0";
const HEADER: usize = 32;

/// Chunks a replica lacks because a forced fold took their records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfSync {
    /// The replica held every record up to here when the first such fold
    /// ran: a replica that holds at least this much lacks only the marked
    /// chunks as of `upto_lsn`.
    pub from_lsn: u64,
    pub upto_lsn: u64,
    bits: Vec<u8>,
}

impl OutOfSync {
    fn new(from_lsn: u64, upto_lsn: u64, disk_size: u64) -> Self {
        OutOfSync {
            from_lsn,
            upto_lsn,
            bits: vec![0; Self::bits_len(disk_size)],
        }
    }

    /// Bytes of the bits of a disk of `disk_size` bytes.
    fn bits_len(disk_size: u64) -> usize {
        disk_size.div_ceil(OUT_OF_SYNC_CHUNK).div_ceil(8) as usize
    }

    /// Bytes of the file of a disk of `disk_size` bytes.
    fn file_len(disk_size: u64) -> u64 {
        (HEADER + Self::bits_len(disk_size) + 4) as u64
    }

    fn mark(&mut self, offset: u64, length: u64) {
        let first = offset / OUT_OF_SYNC_CHUNK;
        let last = (offset + length).div_ceil(OUT_OF_SYNC_CHUNK);
        for chunk in first..last {
            if let Some(byte) = self.bits.get_mut((chunk / 8) as usize) {
                *byte |= 1 << (chunk % 8);
            }
        }
    }

    fn mark_all(&mut self) {
        self.bits.fill(0xff);
    }

    /// Whether any chunk in `offset..offset + length` is marked.
    pub fn any_in(&self, offset: u64, length: u64) -> bool {
        let first = offset / OUT_OF_SYNC_CHUNK;
        let last = (offset + length).div_ceil(OUT_OF_SYNC_CHUNK);
        (first..last).any(|chunk| {
            self.bits
                .get((chunk / 8) as usize)
                .is_some_and(|byte| byte & (1 << (chunk % 8)) != 0)
        })
    }

    /// Bytes of the disk marked.
    pub fn marked_bytes(&self) -> u64 {
        let bits: u32 = self.bits.iter().map(|b| b.count_ones()).sum();
        u64::from(bits) * OUT_OF_SYNC_CHUNK
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.bits.len() + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.from_lsn.to_le_bytes());
        b.extend_from_slice(&self.upto_lsn.to_le_bytes());
        b.extend_from_slice(&(OUT_OF_SYNC_CHUNK as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.bits);
        let crc = crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8], disk_size: u64) -> std::result::Result<Self, String> {
        let bits = Self::bits_len(disk_size);
        if b.len() as u64 != Self::file_len(disk_size) || b[..8] != MAGIC {
            return Err(format!(
                "{} bytes, not an out-of-sync map of this disk",
                b.len()
            ));
        }
        if crc32c(&b[..HEADER + bits]) != le_u32(b, HEADER + bits) {
            return Err("its checksum fails".into());
        }
        if u64::from(le_u32(b, 24)) != OUT_OF_SYNC_CHUNK {
            return Err(format!("chunks of {} bytes", le_u32(b, 24)));
        }
        Ok(OutOfSync {
            from_lsn: le_u64(b, 8),
            upto_lsn: le_u64(b, 16),
            bits: b[HEADER..HEADER + bits].to_vec(),
        })
    }
}

impl Inner {
    fn out_of_sync_path(&self) -> PathBuf {
        self.dir.join(OUT_OF_SYNC_FILE)
    }

    /// Reads the map an earlier run left, if any.
    pub(super) fn load_out_of_sync(&self) -> Result<Option<OutOfSync>> {
        let path = self.out_of_sync_path();
        let len = OutOfSync::file_len(self.config.size);
        let what = "the out-of-sync map of this disk";
        let Some(bytes) = self.read_if_there(&path, len, what)? else {
            return Ok(None);
        };
        OutOfSync::decode(&bytes, self.config.size)
            .map(Some)
            .map_err(|reason| Error::BadMetadata { path, reason })
    }

    /// Marks, durably, the chunks the records `from_lsn + 1..=upto` of
    /// `snapshot` touch: a forced fold is about to take them from a
    /// replica that holds only up to `from_lsn`.
    pub(super) fn mark_out_of_sync(
        &self,
        snapshot: &Snapshot,
        from_lsn: u64,
        upto: u64,
    ) -> Result<()> {
        let mut current = lock(&self.out_of_sync);
        let mut map = current
            .clone()
            .unwrap_or_else(|| OutOfSync::new(from_lsn, upto, self.config.size));
        map.from_lsn = map.from_lsn.min(from_lsn);
        map.upto_lsn = map.upto_lsn.max(upto);
        for lsn in from_lsn + 1..=upto {
            match snapshot.entry(lsn).effect {
                Effect::Data { start, sectors, .. } => map.mark(start * SECTOR, sectors * SECTOR),
                // What a revert changes is not in its record.
                Effect::Revert { .. } => map.mark_all(),
                Effect::Flush | Effect::Mark => {}
            }
        }
        let path = self.out_of_sync_path();
        self.storage
            .write_file_atomic(&path, &map.encode())
            .map_err(Error::io(|| format!("writing {}", path.display())))?;
        *current = Some(map);
        Ok(())
    }
}

impl Volume {
    /// The chunks a forced fold took from the replica, if any.
    pub fn out_of_sync(&self) -> Option<OutOfSync> {
        lock(&self.inner.out_of_sync).clone()
    }

    /// The chunks a replica that holds at least `from_lsn` of the map lacks
    /// as of lsn `upto` (>= the fold point): the map's, and those the
    /// records after the fold point touch. `None` without a map, or if the
    /// journal no longer starts at the map's fold point.
    pub fn out_of_sync_through(&self, upto: u64) -> Option<OutOfSync> {
        let mut map = self.out_of_sync()?;
        let index = lock(&self.inner.index);
        if map.upto_lsn != index.base_lsn() || upto > index.last_lsn() {
            return None;
        }
        for lsn in map.upto_lsn + 1..=upto {
            match index.effect(lsn) {
                Effect::Data { start, sectors, .. } => map.mark(start * SECTOR, sectors * SECTOR),
                Effect::Revert { .. } => map.mark_all(),
                Effect::Flush | Effect::Mark => {}
            }
        }
        map.upto_lsn = upto;
        Some(map)
    }

    /// Forgets the out-of-sync map: the replica was resynced.
    pub fn clear_out_of_sync(&self) -> Result<()> {
        let inner = &self.inner;
        let mut current = lock(&inner.out_of_sync);
        let path = inner.out_of_sync_path();
        if inner.storage.exists(&path) {
            inner
                .storage
                .remove_file(&path)
                .and_then(|()| inner.storage.sync_dir(&inner.dir))
                .map_err(Error::io(|| format!("removing {}", path.display())))?;
        }
        *current = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_round_trips_and_damage_is_found() {
        let mut map = OutOfSync::new(10, 20, 10 << 20);
        map.mark(65536 * 3 + 512, 4096);
        map.mark(5 << 20, 200 << 10);
        assert!(map.any_in(3 << 16, 1 << 16) && !map.any_in(0, 3 << 16));
        assert_eq!(map.marked_bytes(), (1 + 4) * OUT_OF_SYNC_CHUNK);
        let bytes = map.encode();
        assert_eq!(OutOfSync::decode(&bytes, 10 << 20), Ok(map));
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        assert!(OutOfSync::decode(&bad, 10 << 20).is_err());
        assert!(OutOfSync::decode(&bytes, 20 << 20).is_err());
    }
}
