//! Which appended records are completely written.
//!
//! Appends reserve lsns in order but finish in any order. The durable point
//! of the journal is the contiguous prefix of finished lsns: recovery stops
//! at the first missing record, so a flush may only claim lsns up to there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug)]
struct State {
    /// Every lsn <= prefix is written.
    prefix: u64,
    /// Written lsns above the prefix.
    ahead: BTreeSet<u64>,
    failed: bool,
    /// Targets threads wait for in [`Completion::wait_for`], with how many
    /// wait for each: the prefix wakes them (all; those further on sleep
    /// again) only once it reaches the lowest (a futex call per append
    /// otherwise, and a wake-up of every waiter per append while they wait).
    waiting: BTreeMap<u64, usize>,
}

#[derive(Debug)]
pub struct Completion {
    state: Mutex<State>,
    /// `state.prefix`, stored under the lock after it moves, so that a
    /// reader polls it without the lock.
    prefix: AtomicU64,
    advanced: Condvar,
}

/// The journal stopped: some lsn will never be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled;

impl Completion {
    /// Everything up to `prefix` is already written.
    pub fn new(prefix: u64) -> Self {
        Completion {
            state: Mutex::new(State {
                prefix,
                ahead: BTreeSet::new(),
                failed: false,
                waiting: BTreeMap::new(),
            }),
            prefix: AtomicU64::new(prefix),
            advanced: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts again with everything up to `prefix` written (a replica's
    /// journal after a resync; no append may be in flight).
    pub fn reset(&self, prefix: u64) {
        let mut st = self.lock();
        st.prefix = prefix;
        st.ahead.clear();
        self.prefix.store(prefix, Ordering::Release);
        drop(st);
        self.advanced.notify_all();
    }

    pub fn complete(&self, lsn: u64) {
        let mut st = self.lock();
        if lsn != st.prefix + 1 {
            st.ahead.insert(lsn);
            return;
        }
        st.prefix = lsn;
        while st.ahead.first() == Some(&(st.prefix + 1)) {
            st.ahead.pop_first();
            st.prefix += 1;
        }
        self.prefix.store(st.prefix, Ordering::Release);
        let reached = st
            .waiting
            .first_key_value()
            .is_some_and(|(&target, _)| target <= st.prefix);
        drop(st);
        if reached {
            self.advanced.notify_all();
        }
    }

    pub fn prefix(&self) -> u64 {
        self.prefix.load(Ordering::Acquire)
    }

    /// Waits until every lsn <= `target` is written; returns the prefix.
    pub fn wait_for(&self, target: u64) -> Result<u64, Stalled> {
        let mut st = self.lock();
        if st.prefix >= target {
            return Ok(st.prefix);
        }
        *st.waiting.entry(target).or_default() += 1;
        while st.prefix < target && !st.failed {
            st = self.advanced.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(count) = st.waiting.get_mut(&target) {
            *count -= 1;
            if *count == 0 {
                st.waiting.remove(&target);
            }
        }
        if st.prefix >= target {
            Ok(st.prefix)
        } else {
            Err(Stalled)
        }
    }

    /// Wakes every waiter with `Stalled`: a hole will never be filled.
    pub fn fail(&self) {
        self.lock().failed = true;
        self.advanced.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_prefix_only_advances_over_contiguous_lsns() {
        let c = Completion::new(0);
        c.complete(2);
        c.complete(3);
        assert_eq!(c.prefix(), 0);
        c.complete(1);
        assert_eq!(c.prefix(), 3);
        c.complete(5);
        assert_eq!(c.prefix(), 3);
    }

    #[test]
    fn waiters_wake_on_completion_and_on_failure() {
        let c = Arc::new(Completion::new(0));
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_for(2))
        };
        c.complete(2);
        c.complete(1);
        assert_eq!(waiter.join().expect("join"), Ok(2));
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_for(10))
        };
        c.fail();
        assert_eq!(waiter.join().expect("join"), Err(Stalled));
    }

    #[test]
    fn a_waiter_wakes_when_its_own_target_is_reached() {
        let c = Arc::new(Completion::new(0));
        let (done, results) = std::sync::mpsc::channel();
        for target in [2, 5] {
            let (c, done) = (c.clone(), done.clone());
            std::thread::spawn(move || done.send((target, c.wait_for(target))));
        }
        let registered = |targets: &[u64]| c.lock().waiting.keys().eq(targets.iter());
        let wait = std::time::Duration::from_secs(10);
        let deadline = std::time::Instant::now() + wait;
        while !registered(&[2, 5]) {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiters never registered"
            );
            std::thread::yield_now();
        }
        // The prefix jumps from 0 past 2 at once.
        c.complete(2);
        c.complete(3);
        c.complete(1);
        assert_eq!(results.recv_timeout(wait), Ok((2, Ok(3))));
        assert!(registered(&[5]), "the waiter for 5 still waits");
        for lsn in 4..=5 {
            c.complete(lsn);
        }
        assert_eq!(results.recv_timeout(wait), Ok((5, Ok(5))));
        assert!(registered(&[]), "no waiter is left registered");
    }
}
