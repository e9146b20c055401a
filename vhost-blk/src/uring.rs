//! A queue's reads in flight in the kernel at once (io_uring).
//!
//! The queue's thread plans each read it takes (the journal says which
//! bytes of which file fill which part of the buffer, and pins those
//! files: `rewind_journal::ReadPlan`), puts the plan's file reads into the
//! queue's ring, and submits them all in one system call once it has taken
//! what the virtqueue holds. Reads the page cache answers finish during
//! that call and complete right after it; cold ones reach the disk
//! together, and the kernel's completions wake the queue's thread through
//! an eventfd it polls beside its kick. So a cold read costs no thread
//! hand-off and no probe of the page cache first, and a batch of them is
//! one submission.
//!
//! A read whose file read fails or comes back short runs again the
//! ordinary way on an IO thread (inflight.rs), where the storage error
//! policy retries it and reports what failed; so does a read the ring
//! cannot take (no plan, larger than [`MAX_RING_READ`], the ring full).
//! Completions still reach the used ring in taking order (`InOrder`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use io_uring::{opcode, types, IoUring};
use rewind_journal::ReadPlan;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{signal, Dispatched};

/// Largest read the ring takes; larger ones go to the IO threads, which
/// need no buffer of that size held per read in flight.
pub const MAX_RING_READ: u64 = 4 << 20;

/// Spare read buffers a ring keeps, and the largest it keeps.
const SPARE_BUFFERS: usize = 64;
const MAX_SPARE_BUFFER: usize = 1 << 20;

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
    spare: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// A read in the ring.
struct RingRead {
    job: Dispatched,
    /// Keeps every file the kernel reads open until its read is reaped.
    plan: ReadPlan,
    /// The kernel writes the file reads into it: never touched, moved out
    /// or freed while any of them is in flight.
    buf: Vec<u8>,
    /// File reads not yet reaped.
    pending: usize,
    failed: bool,
}

fn user_data(slot: usize, piece: usize) -> u64 {
    (slot as u64) << 16 | piece as u64
}

/// Most file reads one plan may have (the piece index's bits).
const MAX_PIECES: usize = 1 << 16;

impl QueueRing {
    /// A ring of `entries` submissions (the queue's size).
    pub fn new(entries: u32) -> io::Result<Self> {
        let uring = IoUring::new(entries.next_power_of_two())?;
        let completed = EventFd::new(EFD_NONBLOCK)?;
        uring.submitter().register_eventfd(completed.as_raw_fd())?;
        Ok(QueueRing {
            ring: Mutex::new(Ring {
                uring,
                reads: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                spare: Vec::new(),
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

    /// Puts `job`'s read into the ring (submitted by [`QueueRing::submit`]);
    /// hands anything else, or a read the ring cannot take, to an IO
    /// thread. Returns whether it completed a request into the used ring
    /// already (a read of holes only).
    pub fn queue(&self, job: Dispatched) -> io::Result<bool> {
        let Some((offset, len)) = job.read_range().filter(|&(_, len)| len <= MAX_RING_READ) else {
            job.dispatch();
            return Ok(false);
        };
        // An error is the IO thread's to report, with its context.
        let Ok(Some(plan)) = job.plan_read(offset, len) else {
            job.dispatch();
            return Ok(false);
        };
        let mut ring = self.lock();
        let pieces = plan.reads().len();
        if pieces > MAX_PIECES || !ring.has_room(pieces) {
            drop(ring);
            job.dispatch();
            return Ok(false);
        }
        let mut buf = ring.buffer(len as usize);
        plan.fill_zeroes(&mut buf);
        if pieces == 0 {
            drop(ring);
            let published = job.finish_read(&buf);
            self.lock().spare_buffer(buf);
            return published;
        }
        let slot = ring.free.pop().unwrap_or_else(|| {
            ring.reads.push(None);
            ring.reads.len() - 1
        });
        let read = ring.reads[slot].insert(RingRead {
            job,
            plan,
            buf,
            pending: pieces,
            failed: false,
        });
        let base = read.buf.as_mut_ptr();
        let entries: Vec<_> = read
            .plan
            .reads()
            .iter()
            .enumerate()
            .map(|(piece, r)| {
                // `at + len` is inside `buf` (the plan covers the read).
                let to = base.wrapping_add(r.at);
                opcode::Read::new(types::Fd(r.fd), to, r.len as u32)
                    .offset(r.offset)
                    .build()
                    .user_data(user_data(slot, piece))
            })
            .collect();
        // SAFETY: the buffer and files the entries name live in
        // `reads[slot]`, which is neither dropped nor moved out until every
        // completion of the slot is reaped (`reap` takes it out at
        // `pending == 0`; `Drop` waits for all of them), and a Vec's heap
        // buffer stays put while the Vec moves.
        let pushed = unsafe { ring.uring.submission().push_multiple(&entries) };
        if pushed.is_err() {
            // `has_room` made room: not reached. Nothing of it was queued.
            let read = ring.reads[slot].take();
            ring.free.push(slot);
            drop(ring);
            if let Some(read) = read {
                read.job.dispatch();
            }
            return Ok(false);
        }
        ring.in_flight += pieces;
        Ok(false)
    }

    /// Submits what [`QueueRing::queue`] put in and completes the reads
    /// that finished during the call (the page cache held them).
    pub fn submit(&self) -> io::Result<()> {
        let mut ring = self.lock();
        ring.submit_queued();
        ring.reap()
    }

    /// Completes what the kernel posted since (the eventfd fired).
    pub fn completed(&self) -> io::Result<()> {
        // EAGAIN: another reap took the count; the ring says what is there.
        let _ = self.completed.read();
        let mut ring = self.lock();
        ring.submit_queued();
        ring.reap()
    }

    /// Waits for every read in the ring and completes it (GET_VRING_BASE,
    /// the end of a connection).
    pub fn drain(&self) -> io::Result<()> {
        let mut ring = self.lock();
        while ring.in_flight > 0 {
            match ring.uring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            ring.reap()?;
        }
        Ok(())
    }
}

impl Ring {
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

    /// Submits the queued file reads. One the kernel does not take now
    /// (it is short of memory, or its completion queue overflowed) stays
    /// queued for the next call (a kick, a completion, a drain).
    fn submit_queued(&mut self) {
        while !self.uring.submission().is_empty() {
            match self.uring.submit() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot submit reads now; they stay queued");
                    return;
                }
                Ok(_) => return,
            }
        }
    }

    /// A buffer of `len` bytes, a spare one where there is one.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn spare_buffer(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS && buf.capacity() <= MAX_SPARE_BUFFER {
            self.spare.push(buf);
        }
    }

    /// Takes the posted completions and completes every read whose file
    /// reads are all done, then signals the queue once.
    fn reap(&mut self) -> io::Result<()> {
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
                job, buf, failed, ..
            } = read;
            if failed {
                // EIO, a short read, a file gone: the waiting path retries
                // under the storage error policy and reports it.
                job.dispatch();
            } else {
                let vring = job.vring().clone();
                match job.finish_read(&buf) {
                    Ok(true) => to_signal = Some(vring),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "cannot complete a request"),
                }
            }
            self.spare_buffer(buf);
        }
        match to_signal {
            Some(vring) => signal(&vring),
            None => Ok(()),
        }
    }
}

impl Drop for Ring {
    /// Never frees a buffer the kernel may still write into: waits for
    /// every read in flight (none is left once the queue was drained).
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let Err(e) = self.uring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // The reads stay in `reads`: leak them rather than free
                    // memory the kernel may still write.
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
