//! Flushes that share one sync of the device.
//!
//! A flush (and, in writethrough mode, the sync after a write) is served
//! by any sync of the device that starts after it was taken: that sync
//! makes durable every write that completed before. So the queues' threads
//! put such requests into one list, and one IO thread syncs for all of
//! them, completes them and signals each queue once; those that arrive
//! meanwhile wait for its next sync. The thread goes on while requests
//! keep coming and ends when none is left.
//!
//! Handing each flush to an IO thread of its own cost the queue's thread a
//! wake-up of another thread per flush (on this kind of VM, often the
//! wake-up of a halted vCPU, which may preempt the queue's thread), and the
//! flushes that overlapped then queued behind the journal's sync lock,
//! woken one after another. Here a flush that arrives while a sync runs
//! costs a lock and a push. The journal's own group commit
//! (`Volume::flush`) still joins this sync with other callers' (bookmarks,
//! drains, other exports).
//!
//! The thread is one of the daemon's IO threads for as long as flushes
//! keep coming: one for each export that flushes, and a daemon serves one
//! volume and its views, far fewer than the 64 IO threads. Where the IO
//! threads cannot be started (`run_blocking`), the queue's thread that
//! started the sync runs it, for every queue, until none is left waiting.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::Dispatched;
use crate::device::BlockDevice;
use crate::inflight::run_blocking;

/// One export's requests that wait for a sync.
#[derive(Debug)]
pub struct Syncs {
    device: Arc<dyn BlockDevice>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Taken since the running sync started (or since the last one ended).
    waiting: Vec<Dispatched>,
    /// Whether an IO thread is syncing for the list (and will look at it
    /// again before it ends).
    syncing: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("waiting", &self.waiting.len())
            .field("syncing", &self.syncing)
            .finish()
    }
}

impl Syncs {
    pub fn new(device: Arc<dyn BlockDevice>) -> Self {
        Syncs {
            device,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes `job` (one that only syncs: `Waiting::only_syncs`) after
    /// the next sync that starts from now; starts an IO thread for it if
    /// none is syncing.
    pub fn queue(self: &Arc<Self>, job: Dispatched) {
        let mut state = self.lock();
        state.waiting.push(job);
        if std::mem::replace(&mut state.syncing, true) {
            return;
        }
        drop(state);
        let syncs = Arc::clone(self);
        run_blocking(move || syncs.run());
    }

    /// Syncs for the waiting requests until none is left.
    fn run(&self) {
        let _unwinding = EndsOnUnwind(self);
        loop {
            let jobs = {
                let mut state = self.lock();
                if state.waiting.is_empty() {
                    state.syncing = false;
                    return;
                }
                std::mem::take(&mut state.waiting)
            };
            // Every job was taken before this starts.
            let synced = self.device.flush().map_err(Arc::new);
            let last = last_of_each_queue(&jobs);
            for (job, last) in jobs.into_iter().zip(last) {
                // Each queue's last job signals, while it still counts as
                // running (`Inflight::complete_and_signal`).
                if let Err(e) = job.finish_synced(&synced, last) {
                    tracing::error!(error = %e, "cannot complete a request");
                }
            }
        }
    }
}

/// Should the syncing thread panic, the requests it had taken are lost with
/// it (as any request whose thread panics), and the next request to sync
/// starts another thread, which takes those left waiting too.
struct EndsOnUnwind<'a>(&'a Syncs);

impl Drop for EndsOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().syncing = false;
        }
    }
}

/// For each job, whether no later one is of the same queue.
fn last_of_each_queue(jobs: &[Dispatched]) -> Vec<bool> {
    let mut last = vec![false; jobs.len()];
    let mut seen: Vec<&Dispatched> = Vec::new();
    for (i, job) in jobs.iter().enumerate().rev() {
        if !seen.iter().any(|other| other.same_queue(job)) {
            last[i] = true;
            seen.push(job);
        }
    }
    last
}
