//! Full chunks of the record index kept in a file and read back through a
//! shared mapping, so that the index of a large journal pages from disk
//! instead of living in anonymous memory: the kernel keeps the pages that
//! are read in the page cache and drops them under pressure, as it does
//! any clean file page.
//!
//! The file is a cache, not part of the volume: it is created unnamed
//! (`O_TMPFILE`) in the volume's directory each time the volume opens
//! (`Storage::create_scratch`), so
//! a crash leaves nothing behind, and recovery rebuilds the index from the
//! journal or its checkpoint as it always did. Where it cannot be created
//! or written (a file system without `O_TMPFILE`, no space left), chunks
//! stay in memory: the index works the same, only larger.
//!
//! Layout: slots of [`SLOT`] bytes, one full chunk each, in the encoding
//! of `Block::encode` (times, then packed effects). Slots are grouped in
//! regions of [`REGION_SLOTS`]; each region is mapped once, read-only,
//! when the file grows into it, and stays mapped until the file is
//! dropped.
//!
//! Invariants:
//! - a slot is written (`pwrite`) before the chunk that reads it exists,
//!   and written again only after that chunk is dropped everywhere, so
//!   reads through the mapping never race a write;
//! - the file never shrinks while it is open (a read of a mapped page past
//!   its end would raise SIGBUS);
//! - `free` holds the slots below `used` that no chunk holds.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use memmap2::{MmapOptions, MmapRaw};

use super::block::{self, Block};
use super::{Effect, Entry, CHUNK};

/// Bytes of one chunk's encoding: a whole number of 4 KiB pages (24).
const SLOT: usize = block::encoded_len(CHUNK);
/// Slots per mapped region: 96 MiB, about 4 M records.
const REGION_SLOTS: usize = 1024;
const REGION_BYTES: u64 = (SLOT * REGION_SLOTS) as u64;

/// The file the full chunks of one volume's record index page to.
#[derive(Debug)]
pub struct PageFile {
    file: File,
    slots: Mutex<Slots>,
    /// A write has failed (warned once; later chunks still try).
    failed: AtomicBool,
}

#[derive(Debug, Default)]
struct Slots {
    regions: Vec<MmapRaw>,
    /// Slots ever handed out: the next new one.
    used: usize,
    free: Vec<usize>,
}

impl PageFile {
    /// Chunks in `file`, a scratch file (`Storage::create_scratch`).
    pub fn new(file: File) -> Arc<PageFile> {
        Arc::new(PageFile {
            file,
            slots: Mutex::new(Slots::default()),
            failed: AtomicBool::new(false),
        })
    }

    /// `full` (chunks of `CHUNK` entries each) written to slots and on
    /// the disk ([`PageFile::write_back`]: a page the kernel drops from the
    /// cache then reads back as written), or an error and nothing held.
    pub(super) fn page_out(self: &Arc<Self>, full: &[&Block]) -> io::Result<Vec<Paged>> {
        let mut encoded = vec![0; SLOT];
        let mut paged = Vec::with_capacity(full.len());
        let done = full.iter().try_for_each(|block| {
            debug_assert_eq!(block.len(), CHUNK);
            block.encode(&mut encoded);
            let (slot, start) = self.store(&encoded)?;
            paged.push(Paged {
                pages: Arc::clone(self),
                slot,
                start,
                spilled: block.spilled().to_vec(),
            });
            Ok(())
        });
        // Dropping what was made on an error frees its slots.
        match done.and_then(|()| self.write_back()) {
            Ok(()) => Ok(paged),
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot page the record index out to its file, keeping it in memory: {e}"
                    );
                }
                Err(e)
            }
        }
    }

    /// Writes the file's dirty pages to the disk and waits for them
    /// (reporting a write-back error as fdatasync would), without the
    /// file system's journal commit that fdatasync makes: the file is a
    /// cache, only its data must reach the disk, so that a page the kernel
    /// evicts reads back as written. A commit would also wait for other
    /// files' ordered data (base.img's, in a fold), seconds at the limit.
    fn write_back(&self) -> io::Result<()> {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: a plain system call on the file descriptor `self.file`
        // owns (offset 0, length 0: the whole file); no memory is passed.
        let done = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, flags) };
        if done == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Writes `encoded` to a free slot: the slot and its first byte in the
    /// mapping.
    fn store(&self, encoded: &[u8]) -> io::Result<(usize, *const u8)> {
        let (slot, start) = self.take_slot()?;
        match self.file.write_all_at(encoded, (slot * SLOT) as u64) {
            Ok(()) => Ok((slot, start)),
            Err(e) => {
                self.release(slot);
                Err(e)
            }
        }
    }

    fn take_slot(&self) -> io::Result<(usize, *const u8)> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = match slots.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = slots.used;
                if slot / REGION_SLOTS == slots.regions.len() {
                    let end = REGION_BYTES * (slots.regions.len() as u64 + 1);
                    if self.file.metadata()?.len() < end {
                        self.file.set_len(end)?;
                    }
                    let region = MmapOptions::new()
                        .offset(end - REGION_BYTES)
                        .len(REGION_BYTES as usize)
                        .map_raw_read_only(&self.file)?;
                    slots.regions.push(region);
                }
                slots.used += 1;
                slot
            }
        };
        let region = &slots.regions[slot / REGION_SLOTS];
        // SAFETY: the offset is within the region's mapping (slot %
        // REGION_SLOTS < REGION_SLOTS slots of SLOT bytes).
        let start = unsafe { region.as_ptr().add(slot % REGION_SLOTS * SLOT) };
        Ok((slot, start))
    }

    fn release(&self, slot: usize) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.free.push(slot);
    }

    /// Slots holding chunks now.
    #[cfg(test)]
    pub(super) fn slots_in_use(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.used - slots.free.len()
    }
}

/// A full chunk in a slot of a [`PageFile`].
#[derive(Debug)]
pub(super) struct Paged {
    pages: Arc<PageFile>,
    slot: usize,
    /// The slot's first byte in the file's mapping.
    start: *const u8,
    /// The effects too large to pack (block.rs), kept in memory.
    spilled: Vec<(usize, Effect)>,
}

// SAFETY: `start` points into a read-only mapping that `pages` keeps
// alive (regions are unmapped only when the PageFile drops, after every
// Paged holding it), and the slot's bytes do not change while this Paged
// exists (the module's first invariant; the file has no name, so only
// this process writes it), so any thread may read them.
unsafe impl Send for Paged {}
// SAFETY: as for Send: shared access only reads bytes nobody writes.
unsafe impl Sync for Paged {}

impl Paged {
    /// The little-endian u64 at byte `at` of the slot (`at + 8 <= SLOT`).
    fn word(&self, at: usize) -> u64 {
        assert!(at + 8 <= SLOT, "word {at} past the slot");
        // SAFETY: `start` is the first of SLOT mapped bytes that stay
        // mapped and unchanged for as long as `self` lives (see Send), and
        // `at + 8 <= SLOT`; read unaligned, by value, so no reference to
        // the shared mapping is ever made.
        let word = unsafe { self.start.add(at).cast::<u64>().read_unaligned() };
        u64::from_le(word)
    }

    /// Entry `i` (< CHUNK).
    pub(super) fn get(&self, i: usize) -> Entry {
        block::decode(|at| self.word(at), CHUNK, i, &self.spilled)
    }
}

impl Drop for Paged {
    fn drop(&mut self) {
        self.pages.release(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent_map::Target;
    use crate::storage::unnamed_file;

    fn full(seed: u64) -> Block {
        let mut b = Block::with_capacity(CHUNK);
        for i in 0..CHUNK as u64 {
            let effect = match i % 5 {
                0 => Effect::Flush,
                1 => Effect::Revert { to: seed + i },
                // Too large to pack: kept in `spilled`.
                2 if i % 1000 == 2 => Effect::Data {
                    start: u64::MAX / 2,
                    sectors: 1 << 30,
                    target: Target::Zero,
                },
                _ => Effect::Data {
                    start: seed * 7 + i,
                    sectors: 8,
                    target: Target::Journal {
                        segment: seed as u32,
                        sector: i as u32,
                    },
                },
            };
            b.push(Entry {
                timestamp: seed * 1_000_000 + i * 10,
                effect,
            });
        }
        b
    }

    #[test]
    fn paged_chunks_read_back_and_free_their_slots() {
        let dir = tempfile::tempdir().unwrap();
        let pages = PageFile::new(unnamed_file(dir.path()).unwrap());
        let blocks: Vec<Block> = (0..5).map(full).collect();
        let want: Vec<Vec<Entry>> = blocks
            .iter()
            .map(|b| (0..CHUNK).map(|i| b.get(i)).collect())
            .collect();
        let refs: Vec<&Block> = blocks.iter().collect();
        let mut held = pages.page_out(&refs).unwrap();
        for (paged, want) in held.iter().zip(&want) {
            assert!((0..CHUNK).all(|i| paged.get(i) == want[i]));
        }
        assert_eq!(pages.slots_in_use(), 5);
        // A dropped chunk's slot is reused; the others keep their entries.
        held.remove(1);
        held.extend(pages.page_out(&[&full(9)]).unwrap());
        assert_eq!(pages.slots_in_use(), 5);
        assert_eq!(pages.slots.lock().unwrap().used, 5, "slot 1 reused");
        for (paged, want) in held.iter().zip(want.iter().take(1).chain(&want[2..])) {
            assert!((0..CHUNK).all(|i| paged.get(i) == want[i]));
        }
        drop(held);
        assert_eq!(pages.slots_in_use(), 0);
        // Nothing of it is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn chunks_stay_in_memory_when_the_file_cannot_take_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only");
        File::create(&path).unwrap().set_len(REGION_BYTES).unwrap();
        // Open for reading only: a region maps, every write fails.
        let read_only = PageFile::new(File::open(&path).unwrap());
        let blocks = [full(3), full(4)];
        let err = read_only.page_out(&[&blocks[0], &blocks[1]]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        assert!(read_only.failed.load(Ordering::Relaxed));
        assert_eq!(read_only.slots_in_use(), 0, "the slot went back");
        let pages = PageFile::new(unnamed_file(dir.path()).unwrap());
        assert_eq!(pages.page_out(&[&blocks[0]]).unwrap().len(), 1);
    }
}
