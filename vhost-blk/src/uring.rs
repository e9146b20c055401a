//! A queue's reads in flight in the kernel at once (io_uring), straight
//! into guest memory.
//!
//! The queue's thread plans each read it takes (the journal says which
//! bytes of which file fill which part of the read, and pins those files:
//! `rewind_journal::ReadPlan`), turns each file read into a readv into the
//! guest's buffers and puts them into the queue's ring. A read that goes
//! with O_DIRECT or to a kernel worker (see below) is submitted at once,
//! so it reaches the disk while the thread plans the next; the others,
//! through the page cache, are submitted together in one system call once
//! the thread has taken what the virtqueue holds: those the page cache
//! holds finish during it and complete right after. The kernel's
//! completions wake the queue's thread through an eventfd it polls beside
//! its kick. So a cold read costs no thread hand-off, a batch of warm ones
//! is one submission, and no read is copied twice.
//!
//! Which way a file read goes: one the page cache does not hold in full
//! (one cachestat call, which unlike a RWF_NOWAIT probe starts no
//! readahead) and aligned for it goes with O_DIRECT straight from the disk
//! into the guest's buffers, as qemu-storage-daemon's `cache.direct=on`
//! does for every read; of the rest, from 64 KiB on through the page cache
//! on the kernel's io-wq workers (their copies run side by side, not on
//! this thread), smaller ones through the page cache on this thread. So
//! cold reads neither fill the page cache nor pay for its copies (cold 1
//! MiB sequential reads took a tenth of the CPU on the workers' route
//! through the page cache), and hot data stays served from memory.
//!
//! The kernel writes guest memory behind vm-memory's back, so a completed
//! read marks its buffers in the dirty log itself (live migration copies
//! them again), before the status byte says it is done.
//!
//! A read whose file read fails or comes back short runs again the
//! ordinary way on an IO thread (inflight.rs), where the storage error
//! policy retries it and reports what failed; so does a read the ring
//! cannot take (no plan, a buffer outside guest memory, larger than
//! [`MAX_RING_READ`], the ring full). Each read reaches the used ring as
//! it completes (`Inflight`); the ring's reaped completions are signalled
//! once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, squeue, types, IoUring};
use rewind_journal::{page_cache_holds, FileRead, ReadPlan};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::backend::{signal, Dispatched, GuestMemory};
use crate::request::spans;

/// Largest read the ring takes; larger ones go to the IO threads.
pub const MAX_RING_READ: u64 = 4 << 20;
/// File reads from this size on run on the kernel's workers (IOSQE_ASYNC).
const ASYNC_READ_MIN: usize = 64 << 10;
/// Alignment of file offsets, lengths and buffers an O_DIRECT read needs
/// (the largest logical block size of common disks).
const DIRECT_ALIGN: usize = 4096;

/// One queue's ring and the reads in it.
#[derive(Debug)]
pub struct QueueRing {
    ring: Mutex<Ring>,
    /// Readable when the kernel posted completions.
    completed: EventFd,
}

struct Ring {
    uring: IoUring,
    /// Reads in flight by slot; a file read's user_data is its slot and
    /// its index in the plan ([`user_data`]).
    reads: Vec<Option<RingRead>>,
    free: Vec<usize>,
    /// File reads submitted or queued and not yet reaped: at most the
    /// completion queue's size, so none is dropped.
    in_flight: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// A read in the ring. Nothing of it is dropped or moved out while any of
/// its file reads is in flight.
struct RingRead {
    job: Dispatched,
    /// Keeps every file the kernel reads open.
    plan: ReadPlan,
    /// Keeps the guest buffers the kernel writes mapped.
    mem: Arc<GuestMemory>,
    /// Each file read's guest buffers: only the kernel reads the arrays.
    _iovecs: Vec<IoVecs>,
    /// File reads not yet reaped.
    pending: usize,
    failed: bool,
}

/// Host addresses of guest buffers, for a readv.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are into guest memory that the read's `mem` keeps
// mapped; only the kernel writes through them, and no thread reads them.
unsafe impl Send for IoVecs {}

fn user_data(slot: usize, piece: usize) -> u64 {
    (slot as u64) << 16 | piece as u64
}

/// A readv of `iov` from `offset` of `fd` (`rw_flags`: RWF_*).
fn readv(fd: RawFd, iov: &IoVecs, offset: u64, user_data: u64, rw_flags: i32) -> squeue::Entry {
    opcode::Readv::new(types::Fd(fd), iov.0.as_ptr(), iov.0.len() as u32)
        .offset(offset)
        .rw_flags(rw_flags)
        .build()
        .user_data(user_data)
}

/// How one file read reaches the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// From ASYNC_READ_MIN on, in the page cache (or not aligned for
    /// O_DIRECT): through the page cache on the kernel's io-wq workers,
    /// many copies at once, not as task work on the queue's thread.
    Worker,
    /// Straight from the disk with O_DIRECT (this descriptor): no page
    /// cache to fill, no readahead, no copy.
    Direct(RawFd),
    /// Through the page cache on the queue's thread (no IOSQE_ASYNC): a
    /// read it holds is copied during the submission.
    Cached,
}

impl Route {
    fn of(read: &FileRead, iov: &IoVecs) -> Route {
        if let Some(direct) = read.direct_fd.filter(|_| cold(read, iov)) {
            Route::Direct(direct)
        } else if read.len >= ASYNC_READ_MIN {
            Route::Worker
        } else {
            Route::Cached
        }
    }

    /// Whether the read is submitted as soon as it is in the ring rather
    /// than with the batch: it waits for the disk or a kernel worker.
    fn submits_at_once(self) -> bool {
        self != Route::Cached
    }
}

/// Whether `read` is better read with O_DIRECT into `iov`: aligned for
/// it (DIRECT_ALIGN), and not all in the page cache.
fn cold(read: &FileRead, iov: &IoVecs) -> bool {
    let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
    read.offset.is_multiple_of(DIRECT_ALIGN as u64)
        && aligned(read.len)
        && iov
            .0
            .iter()
            .all(|v| aligned(v.iov_base as usize) && aligned(v.iov_len))
        && page_cache_holds(read.fd, read.offset, read.len as u64) == Some(false)
}

/// Most file reads one plan may have (the piece index's bits).
const MAX_PIECES: usize = 1 << 16;

/// The host addresses of bytes `at..at + len` of a read into `buffers`;
/// None if any is outside guest memory.
fn iovecs(
    mem: &GuestMemory,
    buffers: &[(GuestAddress, u32)],
    at: usize,
    len: usize,
) -> Option<IoVecs> {
    let mut iov = Vec::new();
    for (addr, n) in spans(buffers, at, len) {
        for slice in mem.get_slices(addr, n) {
            let slice = slice.ok()?;
            iov.push(libc::iovec {
                // Plain mmap regions: the guard only carries the pointer.
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(IoVecs(iov))
}

/// Zeroes bytes `at..at + len` of a read into `buffers` (vm-memory marks
/// them dirty).
fn zero(mem: &GuestMemory, buffers: &[(GuestAddress, u32)], at: usize, len: usize) -> bool {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    spans(buffers, at, len).all(|(addr, n)| {
        (0..n).step_by(ZEROES.len()).all(|done| {
            let chunk = (n - done).min(ZEROES.len());
            mem.write_slice(&ZEROES[..chunk], addr.unchecked_add(done as u64))
                .is_ok()
        })
    })
}

/// Marks a read's guest buffers in the dirty log.
fn mark_dirty(mem: &GuestMemory, buffers: &[(GuestAddress, u32)]) {
    for &(addr, len) in buffers {
        for slice in mem.get_slices(addr, len as usize).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

impl QueueRing {
    /// A ring of `entries` submissions (the queue's size).
    pub fn new(entries: u32) -> io::Result<Self> {
        let uring = IoUring::new(entries.next_power_of_two())?;
        let completed = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        uring.submitter().register_eventfd(completed.as_raw_fd())?;
        Ok(QueueRing {
            ring: Mutex::new(Ring {
                uring,
                reads: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
            }),
            completed,
        })
    }

    /// The eventfd the queue's thread polls for completions.
    pub fn event_fd(&self) -> RawFd {
        self.completed.as_raw_fd()
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `job`'s read into the ring (submitted at once or by
    /// [`QueueRing::submit`], as its [`Route`] says); hands anything else,
    /// or a read the ring cannot take, to an IO thread. Returns whether it
    /// completed a request into the used ring already (a read of holes
    /// only).
    pub fn queue(&self, job: Dispatched) -> io::Result<bool> {
        let Some((plan, mem, iovecs)) = Self::prepare(&job) else {
            job.dispatch();
            return Ok(false);
        };
        let pieces = iovecs.len();
        if pieces == 0 {
            mark_dirty(&mem, job.read_into().map_or(&[], |r| r.buffers));
            return job.finish_filled().map(|()| true);
        }
        let mut ring = self.lock();
        if pieces > MAX_PIECES || !ring.has_room(pieces) {
            drop(ring);
            job.dispatch();
            return Ok(false);
        }
        let slot = ring.free.pop().unwrap_or_else(|| {
            ring.reads.push(None);
            ring.reads.len() - 1
        });
        let mut at_once = false;
        let entries: Vec<_> = plan
            .reads()
            .iter()
            .zip(&iovecs)
            .enumerate()
            .map(|(piece, (r, iov))| {
                let id = user_data(slot, piece);
                let route = Route::of(r, iov);
                at_once |= route.submits_at_once();
                match route {
                    Route::Worker => readv(r.fd, iov, r.offset, id, 0).flags(squeue::Flags::ASYNC),
                    Route::Direct(direct) => readv(direct, iov, r.offset, id, 0),
                    Route::Cached => readv(r.fd, iov, r.offset, id, 0),
                }
            })
            .collect();
        ring.reads[slot] = Some(RingRead {
            job,
            plan,
            mem,
            _iovecs: iovecs,
            pending: pieces,
            failed: false,
        });
        // SAFETY: the files, the iovec arrays and the guest memory the
        // entries name are held by `reads[slot]`, which is neither dropped
        // nor moved out until every completion of the slot is reaped
        // (`reap` takes it out at `pending == 0`; `Drop` waits for all of
        // them, or leaks them); a Vec's heap array stays put while the Vec
        // moves.
        let pushed = unsafe { ring.push(&entries, at_once) };
        if !pushed {
            // `has_room` made room: not reached. Nothing of it was queued.
            let read = ring.reads[slot].take();
            ring.free.push(slot);
            drop(ring);
            if let Some(read) = read {
                read.job.dispatch();
            }
            return Ok(false);
        }
        Ok(false)
    }

    /// Plans `job`'s read: its files, the guest memory, and the guest
    /// buffers of each file read, with its holes zeroed in guest memory.
    /// None where the ring cannot read it (the IO thread reports errors).
    fn prepare(job: &Dispatched) -> Option<(ReadPlan, Arc<GuestMemory>, Vec<IoVecs>)> {
        let read = job.read_into()?;
        let buffers = read.buffers;
        if read.len > MAX_RING_READ {
            return None;
        }
        let plan = job.plan_read(read.offset, read.len).ok()??;
        let mem = job.memory();
        let iovecs = plan
            .reads()
            .iter()
            .map(|r| iovecs(&mem, buffers, r.at, r.len))
            .collect::<Option<Vec<_>>>()?;
        if !plan
            .zeroes()
            .iter()
            .all(|&(at, n)| zero(&mem, buffers, at, n))
        {
            return None;
        }
        Some((plan, mem, iovecs))
    }

    /// Submits what [`QueueRing::queue`] left queued and completes the
    /// reads that finished since (those the page cache held, cold ones
    /// already done).
    pub fn submit(&self) {
        let mut ring = self.lock();
        ring.submit_queued();
        ring.reap();
    }

    /// Completes what the kernel posted since (the eventfd fired), and
    /// submits what an earlier call could not.
    pub fn completed(&self) {
        // EAGAIN: another reap took the count; the ring says what is there.
        let _ = self.completed.read();
        let mut ring = self.lock();
        ring.submit_queued();
        ring.reap();
    }

    /// Waits for every read in the ring and completes it (GET_VRING_BASE,
    /// the end of a connection). Fails only if the kernel refuses to wait
    /// for them, which leaves them in the ring.
    pub fn drain(&self) -> io::Result<()> {
        let mut ring = self.lock();
        while ring.in_flight > 0 {
            match ring.uring.submit_and_wait(1) {
                Ok(_) => {}
                // Interrupted, or short of memory: reap and try again.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            ring.reap();
        }
        Ok(())
    }
}

impl Ring {
    /// Queues `entries` (all or none; false if they do not fit) and
    /// counts them in flight; with `at_once`, submits them now instead of
    /// with the batch. Held back until the queue's thread had planned
    /// every request the virtqueue held, the first of ~28 cold reads at
    /// QD32 waited for the others: with a client that spins on its
    /// completions, 0.73x the IOPS of qemu-storage-daemon's O_DIRECT
    /// reads, which go one by one (BENCHMARKS.md, "Cold reads submitted
    /// as they are taken"). A failed submission leaves them queued for
    /// the batch's, which reports it.
    ///
    /// # Safety
    /// Everything the entries name (files, buffers, iovec arrays) stays
    /// valid until their completions are reaped.
    unsafe fn push(&mut self, entries: &[squeue::Entry], at_once: bool) -> bool {
        // SAFETY: the caller keeps what the entries name valid.
        if unsafe { self.uring.submission().push_multiple(entries) }.is_err() {
            return false;
        }
        self.in_flight += entries.len();
        if at_once {
            let _ = self.uring.submit();
        }
        true
    }

    /// Whether `pieces` more file reads fit: in the submission queue
    /// (submitting what it holds to make room) and in the completion
    /// queue beside those in flight.
    fn has_room(&mut self, pieces: usize) -> bool {
        let completions = self.uring.params().cq_entries() as usize;
        if self.in_flight + pieces > completions {
            return false;
        }
        let free = |ring: &mut Ring| {
            let sq = ring.uring.submission();
            sq.capacity() - sq.len()
        };
        free(self) >= pieces || (self.uring.submit().is_ok() && free(self) >= pieces)
    }

    /// Submits the queued file reads. Those the kernel does not take now
    /// (it is short of memory) stay queued for the next call: a kick, a
    /// completion of another read, a drain.
    fn submit_queued(&mut self) {
        while !self.uring.submission().is_empty() {
            match self.uring.submit() {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot submit reads now; they stay queued");
                    return;
                }
            }
        }
    }

    /// Takes the posted completions and completes every read whose file
    /// reads are all done, then signals the queue once.
    fn reap(&mut self) {
        let mut done = Vec::new();
        for cqe in self.uring.completion() {
            self.in_flight -= 1;
            let slot = (cqe.user_data() >> 16) as usize;
            let piece = (cqe.user_data() & 0xffff) as usize;
            let Some(Some(read)) = self.reads.get_mut(slot) else {
                tracing::error!(slot, "a completion for no read in the ring");
                continue;
            };
            let wanted = read.plan.reads().get(piece).map(|r| r.len);
            if usize::try_from(cqe.result()).ok() != wanted {
                read.failed = true;
            }
            read.pending -= 1;
            if read.pending == 0 {
                done.extend(self.reads[slot].take());
                self.free.push(slot);
            }
        }
        let mut to_signal = None;
        for read in done {
            let RingRead {
                job, mem, failed, ..
            } = read;
            if failed {
                // EIO, a short read, a file gone: the waiting path retries
                // under the storage error policy and reports it.
                job.dispatch();
                continue;
            }
            mark_dirty(&mem, job.read_into().map_or(&[], |r| r.buffers));
            let vring = job.vring().clone();
            match job.finish_filled() {
                Ok(()) => to_signal = Some(vring),
                Err(e) => tracing::error!(error = %e, "cannot complete a request"),
            }
        }
        if let Some(vring) = to_signal {
            // The entries are in the used ring: the driver finds them at
            // its next look even without this interrupt.
            if let Err(e) = signal(&vring) {
                tracing::error!(error = %e, "cannot signal the queue");
            }
        }
    }
}

impl Drop for Ring {
    /// Never lets go of memory the kernel may still write into: waits for
    /// every read in flight (none is left once the queue was drained).
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let Err(e) = self.uring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // Leak the reads rather than unmap what the kernel may
                    // still write.
                    tracing::error!(error = %e, "cannot wait for reads in flight");
                    std::mem::forget(std::mem::take(&mut self.reads));
                    return;
                }
            }
            let reaped = self.uring.completion().count();
            self.in_flight -= reaped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_submitted_at_once_leave_the_queue_and_the_others_wait_for_the_batch() {
        let ring = QueueRing::new(8).expect("io_uring");
        let mut ring = ring.lock();
        let nop = |id| opcode::Nop::new().build().user_data(id);
        let push = |ring: &mut Ring, entries: &[squeue::Entry], at_once| {
            // SAFETY: a Nop names no file or buffer.
            unsafe { ring.push(entries, at_once) }
        };
        let too_many: Vec<_> = (0..9).map(nop).collect();
        assert!(
            !push(&mut ring, &too_many, true),
            "more than the queue holds"
        );
        assert!(ring.uring.submission().is_empty());
        assert_eq!(ring.in_flight, 0);
        assert!(push(&mut ring, &[nop(1)], false));
        assert_eq!(ring.uring.submission().len(), 1, "queued for the batch");
        assert!(push(&mut ring, &[nop(2), nop(3)], true));
        assert!(
            ring.uring.submission().is_empty(),
            "submitted, with what was queued before"
        );
        assert_eq!(ring.in_flight, 3);
        ring.uring.submit_and_wait(3).expect("wait");
        assert_eq!(ring.uring.completion().count(), 3);
        ring.in_flight = 0;
    }

    #[test]
    fn cold_aligned_reads_go_direct_large_warm_ones_to_workers_and_small_warm_ones_with_the_batch()
    {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        const BLOCK: usize = DIRECT_ALIGN;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        file.write_all_at(&[7; 2 * ASYNC_READ_MIN], 0)
            .expect("write");
        file.sync_all().expect("sync");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("O_DIRECT open");
        let mut buf = vec![0u8; ASYNC_READ_MIN + 2 * BLOCK];
        let aligned = buf.as_ptr().align_offset(BLOCK);
        let base = buf[aligned..].as_mut_ptr();
        let iov = |skew: usize, len: usize| {
            IoVecs(vec![libc::iovec {
                iov_base: base.wrapping_add(skew).cast(),
                iov_len: len,
            }])
        };
        let read = |offset: u64, len: usize| FileRead {
            at: 0,
            len,
            fd: file.as_raw_fd(),
            direct_fd: Some(direct.as_raw_fd()),
            offset,
        };
        let cold = read(BLOCK as u64, BLOCK);
        let route = Route::of(&cold, &iov(0, BLOCK));
        assert_eq!(route, Route::Direct(direct.as_raw_fd()), "cold and aligned");
        assert!(route.submits_at_once());
        for (what, r, v) in [
            ("file offset not aligned", read(512, BLOCK), iov(0, BLOCK)),
            ("buffer not aligned", cold, iov(512, BLOCK)),
            (
                "no O_DIRECT descriptor",
                FileRead {
                    direct_fd: None,
                    ..cold
                },
                iov(0, BLOCK),
            ),
        ] {
            let route = Route::of(&r, &v);
            assert_eq!(route, Route::Cached, "{what}");
            assert!(!route.submits_at_once(), "{what}");
        }
        let large = read(0, ASYNC_READ_MIN);
        let route = Route::of(&large, &iov(0, ASYNC_READ_MIN));
        assert_eq!(route, Route::Direct(direct.as_raw_fd()), "large and cold");
        let unaligned = Route::of(&large, &iov(512, ASYNC_READ_MIN));
        assert_eq!(unaligned, Route::Worker, "large, cold, buffer not aligned");
        assert!(unaligned.submits_at_once());
        file.read_exact_at(&mut [0; ASYNC_READ_MIN], 0)
            .expect("warm it");
        let warm = Route::of(&cold, &iov(0, BLOCK));
        assert_eq!(warm, Route::Cached, "in the page cache");
        assert!(!warm.submits_at_once());
        let large_warm = Route::of(&large, &iov(0, ASYNC_READ_MIN));
        assert_eq!(large_warm, Route::Worker, "large, in the page cache");
        assert!(large_warm.submits_at_once());
    }
}
