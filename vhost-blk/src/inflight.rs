//! Requests a queue has taken and not yet completed, and the threads that
//! run those that wait for the disk.
//!
//! A queue's own thread runs what needs no wait (writes are appends to the
//! journal), puts reads into the queue's ring (uring.rs), and hands the
//! rest to the IO threads ([`run_blocking`]): flushes and a writethrough
//! write's sync to the one that syncs for all of them (syncs.rs), reads
//! the ring cannot take (or where there is no io_uring) each to its own.
//! Then it takes the next request: many reads of one queue reach the disk
//! at once, and flushes and writethrough writes share syncs.
//!
//! Each request goes into the used ring as soon as it is done, in any
//! order ([`Inflight`]): a read at the disk's tail latency holds back no
//! other. A restart stays exact through the front-end's inflight region
//! (INFLIGHT_SHMFD, inflight_region.rs): each request is marked there from
//! its taking until its used entry is in, so a daemon restarted after a
//! crash takes again exactly the marked ones, oldest first, and then the
//! available ring from the used index plus their number. A request that
//! ran but was not yet published runs again, a replay the journal
//! tolerates. QEMU (and cloud-hypervisor) keep such a region; a front-end
//! without one cannot tell what was done when its backend dies (libblkio
//! does not reconnect at all), the same as with qemu-storage-daemon.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use crate::backend::{GuestMemory, Vring};
use crate::inflight_region::{InflightRegion, VERSION};

/// A request taken from a queue, to complete exactly once.
#[derive(Debug)]
#[must_use = "a request taken and never completed is never answered"]
pub struct Ticket {
    head: u16,
}

/// Queue `queue`'s block of the front-end's inflight region.
#[derive(Debug)]
struct Tracking {
    region: Arc<InflightRegion>,
    queue: usize,
    /// Whether the block was read since it was handed over.
    restored: bool,
    /// The next request's place in the taking order.
    counter: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Requests taken and not yet in the used ring.
    running: usize,
    tracking: Option<Tracking>,
    /// Set when the inflight region contradicts the queue: the queue takes
    /// nothing more (which requests were done is unknown).
    refused: bool,
    /// Threads in [`Inflight::wait_empty`]: a completion wakes only those
    /// (a futex call per request otherwise, paid by every warm write).
    waiters: usize,
}

/// One queue's requests between being taken and being in the used ring.
#[derive(Debug, Default)]
pub struct Inflight {
    state: Mutex<State>,
    /// Heads to take again before the available ring, oldest last. Apart
    /// from `state`: the queue's thread takes them under the vring's lock,
    /// which `complete` takes under `state`.
    resubmit: Mutex<Vec<u16>>,
    /// Signalled when no request is running.
    emptied: Condvar,
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks requests in queue `queue`'s block of `region` from now on;
    /// before the next one is taken, [`Self::restore`] reads what the block
    /// says was in flight.
    pub fn track(&self, region: Arc<InflightRegion>, queue: usize) {
        self.lock().tracking = Some(Tracking {
            region,
            queue,
            restored: false,
            counter: 1,
        });
    }

    /// Once per handed-over region, before the queue takes anything: the
    /// requests its block marks in flight are to be taken again
    /// ([`Self::next_resubmit`]), and the available ring resumes past them.
    /// Returns whether the queue may take requests: not once a block
    /// contradicted the ring (reported then). Resuming anywhere would run
    /// again requests that completed out of order, or lose some in flight;
    /// the guest's IO on the queue stops instead.
    pub fn restore(&self, vring: &Vring, mem: &GuestMemory) -> io::Result<bool> {
        let mut state = self.lock();
        if state.refused {
            return Ok(false);
        }
        let Some(tracking) = state.tracking.as_mut().filter(|t| !t.restored) else {
            return Ok(true);
        };
        let (used, avail, ring_size) = {
            let vring_state = vring.get_ref();
            let queue = vring_state.get_queue();
            let used = queue.used_idx(mem, Ordering::Acquire);
            (used, queue.avail_idx(mem, Ordering::Acquire), queue.size())
        };
        let used = used.map_err(|e| io::Error::other(format!("used index: {e}")))?;
        let avail = avail.map_err(|e| io::Error::other(format!("available index: {e}")))?;
        tracking.restored = true;
        match resubmission(tracking, used, avail, ring_size) {
            Ok((heads, counter)) => {
                if !heads.is_empty() {
                    let resume = used + Wrapping(heads.len() as u16);
                    tracing::info!(
                        queue = tracking.queue,
                        requests = heads.len(),
                        used_index = used.0,
                        "taking again the requests in flight when the previous backend stopped"
                    );
                    vring.set_queue_next_avail(resume.0);
                }
                tracking.counter = counter;
                *self.resubmit.lock().unwrap_or_else(|e| e.into_inner()) = heads;
            }
            Err(e) => {
                tracing::error!(
                    queue = tracking.queue,
                    error = %e,
                    "the inflight region contradicts the queue: it takes no more requests, \
                     since which were done is unknown; restart the VM"
                );
                state.refused = true;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Requests a restart is still to take again.
    pub fn pending_resubmits(&self) -> usize {
        self.resubmit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The next request to take again after a restart, if any.
    pub fn next_resubmit(&self) -> Option<u16> {
        self.resubmit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
    }

    /// Takes the request whose chain starts at `head`.
    pub fn take(&self, head: u16) -> Ticket {
        let mut state = self.lock();
        state.running += 1;
        if let Some(t) = state.tracking.as_mut() {
            if let Some(desc) = t.region.desc(t.queue, head) {
                desc.counter.store(t.counter, Ordering::Relaxed);
                desc.inflight.store(1, Ordering::Release);
                // The front-end's memory set where it started: it may be
                // anything, up to u64::MAX.
                t.counter = t.counter.wrapping_add(1);
            }
        }
        Ticket { head }
    }

    /// Puts `ticket`'s request (`len` bytes written to guest buffers) into
    /// the used ring; the caller signals.
    pub fn complete(&self, ticket: Ticket, len: u32, vring: &Vring) -> io::Result<()> {
        self.finish(ticket, len, vring, false)
    }

    /// As [`Self::complete`], and signals the driver before the request
    /// stops counting as running: a GET_VRING_BASE that waits for it
    /// ([`Self::wait_empty`]) returns only after the signal, while the
    /// call eventfd is still there.
    pub fn complete_and_signal(&self, ticket: Ticket, len: u32, vring: &Vring) -> io::Result<()> {
        self.finish(ticket, len, vring, true)
    }

    fn finish(&self, ticket: Ticket, len: u32, vring: &Vring, signal: bool) -> io::Result<()> {
        let mut state = self.lock();
        let head = ticket.head;
        // Under the lock, the stores in this order (see the region's
        // invariant): a crash between any two leaves the head either
        // marked and not used, or used and recognisably the last batch.
        let published = match state.tracking.as_ref() {
            Some(t) => {
                let header = t.region.header(t.queue);
                header.last_batch_head.store(head, Ordering::Release);
                let added = add_used(vring, head, len);
                if let Ok(used) = added {
                    if let Some(desc) = t.region.desc(t.queue, head) {
                        desc.inflight.store(0, Ordering::Release);
                    }
                    header.used_idx.store(used, Ordering::Release);
                }
                added.map(drop)
            }
            None => add_used(vring, head, len).map(drop),
        };
        let published = if signal {
            // Outside the lock: the eventfd write wakes the driver, which
            // may preempt this (IO) thread right there, and the queue's
            // thread, which takes the lock for every request, must not
            // wait behind it meanwhile (it did, for up to milliseconds,
            // with a flush completing per write). The request counts as
            // running until signalled. Even if its own entry could not be
            // added: those completed before it wait for this signal.
            drop(state);
            let signalled = crate::backend::signal(vring);
            state = self.lock();
            published.and(signalled)
        } else {
            published
        };
        state.running -= 1;
        if state.running == 0 && state.waiters > 0 {
            self.emptied.notify_all();
        }
        published
    }

    /// Runs `f` between two completions: what a crash there would leave.
    #[cfg(test)]
    pub(crate) fn between_completions<R>(&self, f: impl FnOnce() -> R) -> R {
        let _state = self.lock();
        f()
    }

    /// Waits until every request taken is in the used ring.
    pub fn wait_empty(&self) {
        let mut state = self.lock();
        state.waiters += 1;
        while state.running > 0 {
            state = self.emptied.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiters -= 1;
    }
}

/// The heads a queue block marks in flight, oldest last, and the taking
/// order's next place; a fresh block is initialised. Fails if the block
/// contradicts the ring.
fn resubmission(
    tracking: &Tracking,
    used: Wrapping<u16>,
    avail: Wrapping<u16>,
    ring_size: u16,
) -> io::Result<(Vec<u16>, u64)> {
    let (region, queue) = (&tracking.region, tracking.queue);
    // Heads past the block could not be marked: none would be taken again.
    if ring_size > region.queue_size() {
        return Err(io::Error::other(format!(
            "a block of {} descriptors for a ring of {ring_size}",
            region.queue_size()
        )));
    }
    let header = region.header(queue);
    match header.version.load(Ordering::Acquire) {
        0 => {
            fresh(header, region.queue_size(), used);
            return Ok((Vec::new(), 1));
        }
        VERSION => {}
        other => return Err(io::Error::other(format!("version {other}, not {VERSION}"))),
    }
    let desc_num = header.desc_num.load(Ordering::Relaxed);
    if desc_num != region.queue_size() {
        return Err(io::Error::other(format!(
            "{desc_num} descriptors in a block of {}",
            region.queue_size()
        )));
    }
    // The last entry went into the used ring; its mark was not cleared.
    if header.used_idx.load(Ordering::Acquire) != used.0 {
        let last = header.last_batch_head.load(Ordering::Relaxed);
        if let Some(desc) = region.desc(queue, last) {
            desc.inflight.store(0, Ordering::Release);
        }
        header.used_idx.store(used.0, Ordering::Release);
    }
    let mut marked: Vec<(u64, u16)> = (0..desc_num)
        .filter_map(|head| {
            let desc = region.desc(queue, head)?;
            (desc.inflight.load(Ordering::Acquire) != 0)
                .then(|| (desc.counter.load(Ordering::Relaxed), head))
        })
        .collect();
    if let Some(&(_, head)) = marked.iter().find(|&&(_, head)| head >= ring_size) {
        return Err(io::Error::other(format!(
            "head {head} marked in flight in a ring of {ring_size}"
        )));
    }
    // Each request in flight was made available and is not used yet.
    let outstanding = usize::from((avail - used).0);
    if marked.len() > outstanding {
        return Err(io::Error::other(format!(
            "{} requests marked in flight; the ring has {outstanding} past its used index",
            marked.len()
        )));
    }
    marked.sort_unstable_by(|a, b| b.cmp(a));
    let next = marked
        .first()
        .map_or(1, |&(counter, _)| counter.saturating_add(1));
    Ok((marked.into_iter().map(|(_, head)| head).collect(), next))
}

/// Starts a block afresh at used index `used`.
fn fresh(header: &crate::inflight_region::Header, queue_size: u16, used: Wrapping<u16>) {
    header.features.store(0, Ordering::Relaxed);
    header.desc_num.store(queue_size, Ordering::Relaxed);
    header.last_batch_head.store(0, Ordering::Relaxed);
    header.used_idx.store(used.0, Ordering::Relaxed);
    header.version.store(VERSION, Ordering::Release);
}

/// Puts `head` into the used ring; returns the ring's index after it, read
/// under the same lock (the one the ring holds, whoever else moved it).
fn add_used(vring: &Vring, head: u16, len: u32) -> io::Result<u16> {
    let mut state = vring.get_mut();
    state
        .add_used(head, len)
        .map_err(|e| io::Error::other(format!("add_used: {e}")))?;
    Ok(state.get_queue().next_used())
}

/// Most threads the daemon runs requests that wait for the disk on, all
/// queues of all exports together (QEMU's thread pool has the same bound):
/// enough for a queue of 64 cold reads, or 8 queues of 8.
pub const IO_THREADS: usize = 64;

/// Threads that run requests that may block on the disk: tokio's blocking
/// pool, started on first use, each thread ending after 10 s idle.
#[derive(Debug)]
struct IoPool {
    runtime: tokio::runtime::Runtime,
}

impl IoPool {
    fn new(threads: usize) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(threads)
            .thread_name("rewind-io")
            .thread_keep_alive(Duration::from_secs(10))
            .build()?;
        Ok(IoPool { runtime })
    }
}

/// Runs `job` on one of the daemon's IO threads (queued while all of them
/// are busy); where the pool cannot be made, on this thread.
pub fn run_blocking(job: impl FnOnce() + Send + 'static) {
    static POOL: OnceLock<Option<IoPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| match IoPool::new(IO_THREADS) {
        Ok(pool) => Some(pool),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the IO threads; requests that wait for the disk run on their queue's thread");
            None
        }
    });
    match pool {
        // Nothing awaits the handle: the job reports through its queue.
        Some(pool) => drop(pool.runtime.spawn_blocking(job)),
        None => job(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::message::VhostUserInflight;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryAtomic};

    const RING: u16 = 256;

    /// A ready vring over `guest` and a fresh inflight region for one
    /// queue of `region_size` heads.
    fn ring_and_region(guest: &GuestMemory, region_size: u16) -> (Vring, Arc<InflightRegion>) {
        let q = MockSplitQueue::create(guest, GuestAddress(0), RING);
        let vring = Vring::new(GuestMemoryAtomic::new(guest.clone()), RING).expect("vring");
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .expect("queue info");
        vring.set_queue_size(RING);
        vring.set_queue_ready(true);
        let ask = VhostUserInflight {
            num_queues: 1,
            queue_size: region_size,
            ..Default::default()
        };
        let (reply, file) = crate::inflight_region::create(&ask, 1).expect("create");
        let region = InflightRegion::map(&reply, &file, 1).expect("map");
        (vring, Arc::new(region))
    }

    fn guest() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    /// A daemon's queue on the region, restored as before its first take.
    fn started(vring: &Vring, region: &Arc<InflightRegion>, guest: &GuestMemory) -> Inflight {
        let queue = Inflight::default();
        queue.track(region.clone(), 0);
        assert!(queue.restore(vring, guest).expect("restore"), "may take");
        queue
    }

    fn resubmitted(queue: &Inflight) -> Vec<u16> {
        std::iter::from_fn(|| queue.next_resubmit()).collect()
    }

    /// A daemon that took 5, 2 and 9 and completed 2 dies; QEMU resumes
    /// the ring at used index 1.
    fn crash_with_five_and_nine_in_flight(
        vring: &Vring,
        region: &Arc<InflightRegion>,
        guest: &GuestMemory,
    ) {
        let first = started(vring, region, guest);
        assert!(resubmitted(&first).is_empty(), "a fresh region");
        let [five, two, nine] = [5, 2, 9].map(|head| first.take(head));
        first.complete(two, 0, vring).expect("complete 2");
        drop((five, nine));
        vring.set_queue_next_avail(1);
    }

    /// `queue`, restored after [`crash_with_five_and_nine_in_flight`],
    /// takes 5 and 9 again, and then the ring from past them.
    fn assert_takes_again_five_and_nine(queue: &Inflight, vring: &Vring) {
        assert_eq!(resubmitted(queue), [5, 9]);
        assert_eq!(vring.queue_next_avail(), 3, "past the two taken again");
    }

    #[test]
    fn a_restart_takes_again_what_was_in_flight_oldest_first() {
        let guest = guest();
        let (vring, region) = ring_and_region(&guest, RING);
        crash_with_five_and_nine_in_flight(&vring, &region, &guest);
        let second = started(&vring, &region, &guest);
        assert_takes_again_five_and_nine(&second, &vring);
    }

    #[test]
    fn a_region_handed_over_after_the_queue_ran_is_still_read() {
        let guest = guest();
        let (vring, region) = ring_and_region(&guest, RING);
        crash_with_five_and_nine_in_flight(&vring, &region, &guest);
        // The next daemon's queue ran before the front-end handed it the
        // region (its restore found nothing to read).
        let second = Inflight::default();
        assert!(
            second.restore(&vring, &guest).expect("restore"),
            "no region yet"
        );
        second.track(region.clone(), 0);
        assert!(second.restore(&vring, &guest).expect("restore"), "may take");
        assert_takes_again_five_and_nine(&second, &vring);
    }

    /// The signal goes to the eventfd in place when it is sent (a
    /// SET_VRING_CALL racing the signal itself is not reachable here).
    /// A new call eventfd for `vring`; the test reads the returned end.
    fn set_call(vring: &Vring) -> vmm_sys_util::eventfd::EventFd {
        use std::os::fd::{FromRawFd, IntoRawFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let dup = call.try_clone().expect("dup").into_raw_fd();
        // SAFETY: `dup` is a descriptor of our own that nothing else owns.
        vring.set_call(Some(unsafe { std::fs::File::from_raw_fd(dup) }));
        call
    }

    /// A request whose used entry cannot be added (a head outside the
    /// ring) still signals the driver for those completed before it.
    #[test]
    fn a_completion_that_fails_still_signals_those_before_it() {
        let guest = guest();
        let (vring, _) = ring_and_region(&guest, RING);
        let call = set_call(&vring);
        let queue = Inflight::default();
        queue
            .complete(queue.take(1), 0, &vring)
            .expect("complete 1");
        assert!(queue
            .complete_and_signal(queue.take(RING + 1), 0, &vring)
            .is_err());
        assert_eq!(call.read().expect("signalled"), 1);
    }

    #[test]
    fn a_completion_signals_the_current_call_eventfd_only() {
        let guest = guest();
        let (vring, _) = ring_and_region(&guest, RING);
        let queue = Inflight::default();
        let old = set_call(&vring);
        queue
            .complete_and_signal(queue.take(1), 0, &vring)
            .expect("complete 1");
        assert_eq!(old.read().expect("signalled"), 1);
        let new = set_call(&vring);
        queue
            .complete_and_signal(queue.take(2), 0, &vring)
            .expect("complete 2");
        assert_eq!(new.read().expect("signalled"), 1);
        assert!(
            old.read().is_err(),
            "the replaced eventfd hears nothing more"
        );
    }

    #[test]
    fn a_crash_after_the_used_entry_and_before_its_mark_is_cleared_runs_nothing_again() {
        let guest = guest();
        let (vring, region) = ring_and_region(&guest, RING);
        let first = started(&vring, &region, &guest);
        let ticket = first.take(4);
        // `complete`'s first two stores, then the crash.
        region.header(0).last_batch_head.store(4, Ordering::Release);
        add_used(&vring, 4, 0).expect("used");
        drop(ticket);
        let marked = |head| {
            region
                .desc(0, head)
                .expect("head")
                .inflight
                .load(Ordering::Acquire)
        };
        assert_eq!(marked(4), 1);
        vring.set_queue_next_avail(1);
        let second = started(&vring, &region, &guest);
        assert!(resubmitted(&second).is_empty(), "4 is in the used ring");
        assert_eq!(vring.queue_next_avail(), 1);
        let header = region.header(0);
        assert_eq!(header.used_idx.load(Ordering::Acquire), 1);
        assert_eq!(marked(4), 0);
    }

    #[test]
    fn a_counter_at_its_largest_in_the_region_is_taken_past() {
        let guest = guest();
        let (vring, region) = ring_and_region(&guest, RING);
        crash_with_five_and_nine_in_flight(&vring, &region, &guest);
        let nine = region.desc(0, 9).expect("head");
        nine.counter.store(u64::MAX, Ordering::Relaxed);
        let second = started(&vring, &region, &guest);
        assert_takes_again_five_and_nine(&second, &vring);
        let ticket = second.take(3);
        second.complete(ticket, 0, &vring).expect("complete");
    }

    #[test]
    fn a_region_that_contradicts_the_ring_stops_the_queue() {
        let guest = guest();
        let (vring, region) = ring_and_region(&guest, RING);
        let first = started(&vring, &region, &guest);
        // Marked in flight, yet the ring has nothing past its used index.
        drop(first.take(44));
        vring.set_queue_next_avail(0);
        let second = Inflight::default();
        second.track(region.clone(), 0);
        assert!(!second.restore(&vring, &guest).expect("restore"));
        assert!(resubmitted(&second).is_empty());
        assert!(
            !second.restore(&vring, &guest).expect("again"),
            "it stays stopped"
        );
    }

    #[test]
    fn a_region_smaller_than_the_ring_stops_the_queue() {
        let guest = guest();
        let (vring, region) = ring_and_region(&guest, RING / 2);
        let queue = Inflight::default();
        queue.track(region, 0);
        assert!(!queue.restore(&vring, &guest).expect("restore"));
    }

    #[test]
    fn the_pool_runs_jobs_beside_each_other() {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let (barrier, tx) = (barrier.clone(), tx.clone());
            // Each waits for all four: only threads running at once get past.
            run_blocking(move || {
                barrier.wait();
                tx.send(()).expect("send");
            });
        }
        for _ in 0..4 {
            rx.recv_timeout(Duration::from_secs(30)).expect("job ran");
        }
    }
}
