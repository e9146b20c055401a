//! Requests a queue has taken and not yet completed, and the threads that
//! run those that wait for the disk.
//!
//! A queue's own thread runs what needs no wait (writes are appends to the
//! journal) and flushes, puts reads into the queue's ring (uring.rs), and
//! hands the rest (a writethrough write's sync; reads the ring cannot
//! take, or where there is no io_uring) to the IO threads
//! ([`run_blocking`]), then takes the next request: many reads of one
//! queue reach the disk at once, and writethrough writes share syncs.
//!
//! Completions reach the used ring in the order the requests were taken
//! ([`InOrder`]): one finished early waits for those taken before it. That
//! keeps a restart safe without INFLIGHT_SHMFD, which vhost-user-backend
//! does not implement: after a crash QEMU resubmits everything past the
//! used index, and everything before it is done. A request that ran but
//! was not yet published runs again, a replay the journal tolerates.

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use vhost_user_backend::VringT;

use crate::backend::Vring;

/// A place in a queue's completion order, taken with the request.
#[derive(Debug)]
#[must_use = "a ticket never completed holds back every completion after it"]
pub struct Ticket(u64);

/// What goes into the used ring for one request.
#[derive(Debug, Clone, Copy)]
struct Used {
    head: u16,
    len: u32,
}

#[derive(Debug, Default)]
struct Window {
    /// The ticket of `slots[0]`.
    first: u64,
    /// In taking order; None while the request runs.
    slots: VecDeque<Option<Used>>,
}

/// One queue's requests between being taken and being in the used ring.
#[derive(Debug, Default)]
pub struct InOrder {
    window: Mutex<Window>,
    /// Signalled when the window empties.
    emptied: Condvar,
}

impl InOrder {
    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes a request the queue's thread ran just now, after every
    /// request it took before: into the used ring at once if none of them
    /// is still running, else behind them. Returns whether it went into
    /// the used ring (the caller signals).
    pub fn completed_inline(&self, head: u16, len: u32, vring: &Vring) -> io::Result<bool> {
        let mut w = self.lock();
        if !w.slots.is_empty() {
            w.slots.push_back(Some(Used { head, len }));
            return Ok(false);
        }
        add_used(vring, Used { head, len })?;
        Ok(true)
    }

    /// Takes the next place in the order, for a request another thread
    /// completes.
    pub fn take(&self) -> Ticket {
        let mut w = self.lock();
        w.slots.push_back(None);
        Ticket(w.first + w.slots.len() as u64 - 1)
    }

    /// Completes `ticket`'s request (`head`, `len` bytes written to guest
    /// buffers) and puts in the used ring every completion that is now in
    /// order. Returns whether it put any there (the caller signals).
    pub fn complete(&self, ticket: Ticket, head: u16, len: u32, vring: &Vring) -> io::Result<bool> {
        let mut w = self.lock();
        let at = ticket
            .0
            .checked_sub(w.first)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < w.slots.len())
            .ok_or_else(|| io::Error::other(format!("ticket {} is not in flight", ticket.0)))?;
        w.slots[at] = Some(Used { head, len });
        let mut published = false;
        // Under the lock: the ring gets the entries in the window's order.
        while let Some(Some(used)) = w.slots.front().copied() {
            w.slots.pop_front();
            w.first += 1;
            add_used(vring, used)?;
            published = true;
        }
        if w.slots.is_empty() {
            self.emptied.notify_all();
        }
        Ok(published)
    }

    /// Waits until every request taken is in the used ring.
    pub fn wait_empty(&self) {
        let mut w = self.lock();
        while !w.slots.is_empty() {
            w = self.emptied.wait(w).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn add_used(vring: &Vring, used: Used) -> io::Result<()> {
    vring
        .add_used(used.head, used.len)
        .map_err(|e| io::Error::other(format!("add_used: {e}")))
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
