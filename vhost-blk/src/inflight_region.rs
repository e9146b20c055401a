//! The inflight region: shared memory, kept by the front-end across
//! restarts of this daemon, in which each queue marks the requests it took
//! and has not yet put into the used ring (vhost-user INFLIGHT_SHMFD).
//!
//! QEMU asks for the region once (GET_INFLIGHT_FD: this daemon makes a
//! zeroed memfd), keeps the file, and hands it to every later connection
//! (SET_INFLIGHT_FD), a daemon restarted after `kill -9` included; it frees
//! it when the guest resets the device. Only the backend reads or writes
//! it, so its layout is this daemon's; it is the layout of QEMU's
//! libvhost-user (split rings), so either can take over the other's.
//!
//! Layout, little-endian, one block per queue at
//! `queue * queue_block_len(queue_size)`:
//!
//! ```text
//! offset  size  field
//!      0     8  features          0
//!      8     2  version           1; 0 = fresh (nothing was taken yet)
//!     10     2  desc_num          = queue_size
//!     12     2  last_batch_head   head of the entry being put into the used ring
//!     14     2  used_idx          the used ring's index after that entry
//!     16  16*N  desc[N]           per descriptor head:
//!                                   0  1  inflight  1 while taken, not yet used
//!                                   1  5  padding
//!                                   6  2  next      (packed rings; unused)
//!                                   8  8  counter   taking order
//! ```
//!
//! A queue block is `16 + 16 * queue_size` bytes rounded up to 64.
//!
//! Invariant, at every instruction of the daemon (so at any crash): a head
//! marked in flight is a chain the daemon took whose used entry is not in
//! the used ring, except possibly `last_batch_head` when `used_idx`
//! differs from the used ring's index (its entry went in, the mark was not
//! cleared yet). Publishing keeps it by the order of its stores
//! ([`crate::inflight::Inflight::complete`]).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::memfd_create;
use vhost::vhost_user::message::VhostUserInflight;

/// The region's version this daemon writes and reads.
pub const VERSION: u16 = 1;
/// Largest split virtqueue (virtio 1.x).
const MAX_QUEUE_SIZE: u16 = 32768;
const BLOCK_ALIGN: u64 = 64;

/// A queue block's header.
#[repr(C)]
#[derive(Debug)]
pub struct Header {
    pub features: AtomicU64,
    pub version: AtomicU16,
    pub desc_num: AtomicU16,
    pub last_batch_head: AtomicU16,
    pub used_idx: AtomicU16,
}

/// One descriptor head's state.
#[repr(C)]
#[derive(Debug)]
pub struct DescState {
    pub inflight: AtomicU8,
    padding: [u8; 5],
    pub next: AtomicU16,
    pub counter: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Header>() == 16);
const _: () = assert!(std::mem::size_of::<DescState>() == 16);

/// Bytes of one queue's block.
fn queue_block_len(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).div_ceil(BLOCK_ALIGN) * BLOCK_ALIGN
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Checks the queue count and size a front-end gives for the region.
fn check_shape(inflight: &VhostUserInflight, device_queues: usize) -> io::Result<(u16, u16)> {
    let queues = inflight.num_queues;
    if queues == 0 || usize::from(queues) > device_queues {
        return Err(invalid(format!(
            "inflight region for {queues} queues; the device has {device_queues}"
        )));
    }
    let size = inflight.queue_size;
    if size == 0 || size > MAX_QUEUE_SIZE {
        return Err(invalid(format!(
            "inflight region for queues of {size} descriptors (1 to {MAX_QUEUE_SIZE})"
        )));
    }
    Ok((queues, size))
}

/// Makes a zeroed region for the queues GET_INFLIGHT_FD names; returns
/// what to map and the file.
pub fn create(
    inflight: &VhostUserInflight,
    device_queues: usize,
) -> io::Result<(VhostUserInflight, File)> {
    let (queues, size) = check_shape(inflight, device_queues)?;
    let len = u64::from(queues) * queue_block_len(size);
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = memfd_create(
        "rewind-inflight",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let file = File::from(fd);
    file.set_len(len)?;
    // Its size is fixed: a holder of the file that shrank it would make
    // the mapping fault (SIGBUS) in this daemon.
    rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    let reply = VhostUserInflight {
        mmap_size: len,
        mmap_offset: 0,
        num_queues: queues,
        queue_size: size,
    };
    Ok((reply, file))
}

/// A mapped inflight region.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRaw,
    queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Maps the region SET_INFLIGHT_FD hands over, after checking that it
    /// holds the queues it claims.
    pub fn map(
        inflight: &VhostUserInflight,
        file: &File,
        device_queues: usize,
    ) -> io::Result<Self> {
        let (queues, queue_size) = check_shape(inflight, device_queues)?;
        let need = u64::from(queues) * queue_block_len(queue_size);
        if inflight.mmap_size < need {
            return Err(invalid(format!(
                "inflight region of {} bytes; {queues} queues of {queue_size} need {need}",
                inflight.mmap_size
            )));
        }
        if !inflight.mmap_offset.is_multiple_of(BLOCK_ALIGN) {
            return Err(invalid(format!(
                "inflight region at offset {}, not a multiple of {BLOCK_ALIGN}",
                inflight.mmap_offset
            )));
        }
        // Sealed by `create` (the front-end only hands back what this
        // daemon, or the one before it, made): a file that could shrink
        // under the mapping would crash the daemon (SIGBUS).
        let seals = rustix::fs::fcntl_get_seals(file).unwrap_or(rustix::fs::SealFlags::empty());
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(invalid(
                "inflight region in a file not sealed against shrinking".to_string(),
            ));
        }
        let file_len = file.metadata()?.len();
        if inflight
            .mmap_offset
            .checked_add(need)
            .is_none_or(|end| end > file_len)
        {
            return Err(invalid(format!(
                "inflight region at {} of {need} bytes past the end of its {file_len}-byte file",
                inflight.mmap_offset
            )));
        }
        let len = usize::try_from(need).map_err(|_| invalid(format!("{need} bytes")))?;
        let map = MmapOptions::new()
            .offset(inflight.mmap_offset)
            .len(len)
            .map_raw(file)?;
        Ok(InflightRegion {
            map,
            queues,
            queue_size,
        })
    }

    /// The queues it has blocks for.
    pub fn queues(&self) -> usize {
        usize::from(self.queues)
    }

    /// The descriptor heads each queue block has.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn block(&self, queue: usize) -> *mut u8 {
        debug_assert!(queue < self.queues());
        // The block is inside the mapping: `map` checked its length.
        self.map
            .as_mut_ptr()
            .wrapping_add(queue * queue_block_len(self.queue_size) as usize)
    }

    /// Queue `queue`'s header. `queue` < [`Self::queues`].
    pub fn header(&self, queue: usize) -> &Header {
        assert!(queue < self.queues(), "queue {queue} has no inflight block");
        // SAFETY: the block starts inside the mapping, which lives as long
        // as `self`, at a multiple of 64 bytes from a page-aligned start
        // (the offset is checked to be a multiple of 64), and has room for
        // the 16-byte header; every field is an atomic, so stores from
        // other threads (and the front-end, which only keeps the memory)
        // are no data race.
        unsafe { &*self.block(queue).cast::<Header>() }
    }

    /// Queue `queue`'s state of descriptor head `head`, if the block has it.
    pub fn desc(&self, queue: usize, head: u16) -> Option<&DescState> {
        assert!(queue < self.queues(), "queue {queue} has no inflight block");
        if head >= self.queue_size {
            return None;
        }
        // SAFETY: as in `header`: entry `head` < queue_size lies in the
        // block (16 + 16 * queue_size bytes), 16-byte aligned, all atomics.
        Some(unsafe {
            &*self
                .block(queue)
                .wrapping_add(16 + 16 * usize::from(head))
                .cast::<DescState>()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn request(queues: u16, size: u16) -> VhostUserInflight {
        VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        }
    }

    #[test]
    fn blocks_follow_libvhost_user_sizes() {
        assert_eq!(queue_block_len(128), 2112);
        assert_eq!(queue_block_len(256), 4160);
        assert_eq!(queue_block_len(3), 64);
    }

    #[test]
    fn a_created_region_is_zeroed_and_maps_back() {
        let (reply, file) = create(&request(2, 128), 4).expect("create");
        assert_eq!(reply.mmap_size, 2 * 2112);
        let region = InflightRegion::map(&reply, &file, 4).expect("map");
        assert_eq!(region.header(1).version.load(Ordering::Relaxed), 0);
        let desc = region.desc(1, 127).expect("last head");
        desc.counter.store(7, Ordering::Relaxed);
        // Another mapping of the file (a restarted daemon) sees it.
        let again = InflightRegion::map(&reply, &file, 4).expect("map again");
        let desc = again.desc(1, 127).expect("last head");
        assert_eq!(desc.counter.load(Ordering::Relaxed), 7);
        assert!(again.desc(1, 128).is_none());
    }

    #[test]
    fn a_region_that_does_not_fit_is_refused() {
        fn err<T>(r: io::Result<T>) -> String {
            r.map(drop).expect_err("refused").to_string()
        }
        assert!(err(create(&request(5, 128), 4)).contains("the device has 4"));
        assert!(err(create(&request(1, 0), 4)).contains("1 to 32768"));
        let (mut reply, file) = create(&request(2, 128), 4).expect("create");
        reply.mmap_size -= 1;
        assert!(err(InflightRegion::map(&reply, &file, 4)).contains("need 4224"));
        reply.mmap_size += 1;
        reply.mmap_offset = 64;
        assert!(err(InflightRegion::map(&reply, &file, 4)).contains("past the end"));
        reply.mmap_offset = 8;
        assert!(err(InflightRegion::map(&reply, &file, 4)).contains("multiple of 64"));
        // The right size, in a file that could shrink under the mapping.
        reply.mmap_offset = 0;
        let unsealed = tempfile::tempfile().expect("file");
        unsealed.set_len(reply.mmap_size).expect("size");
        assert!(err(InflightRegion::map(&reply, &unsealed, 4)).contains("not sealed"));
    }
}
