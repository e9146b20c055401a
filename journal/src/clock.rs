//! Time sources for record timestamps (a fake one lets tests move time).

use std::fmt::{Debug, Display};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::point::format_ns;

/// How far past this node's clock a time that the primary stamped (its
/// records, a resync's sync point) may be before a warning says the two
/// hosts' clocks differ. Such a time is still taken: the primary keeps its
/// own records in time order the same way (a record is never stamped
/// before the last one, whatever the clock says), so the replica holds
/// what the primary holds; refusing it would stop replication, and a
/// failover with it, until this clock caught up.
const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(60);

/// This node's time at the last `clock_skew` warning: one a minute at
/// most, however many records come from ahead. (The clocks are the
/// hosts', so one for the process.)
static LAST_SKEW_WARNING: AtomicU64 = AtomicU64::new(0);

/// Warns (`clock_skew`) when `ns`, the time `what` carries, is more than
/// [`CLOCK_SKEW_WARNING`] past `now_ns`, this node's clock; returns whether
/// it is.
pub(crate) fn warn_if_ahead(ns: u64, now_ns: u64, volume: &dyn Display, what: &str) -> bool {
    let skew = CLOCK_SKEW_WARNING.as_nanos() as u64;
    if ns <= now_ns.saturating_add(skew) {
        return false;
    }
    let last = LAST_SKEW_WARNING.load(Ordering::Relaxed);
    let due = last == 0 || now_ns.saturating_sub(last) >= skew || now_ns < last;
    if due
        && LAST_SKEW_WARNING
            .compare_exchange(last, now_ns, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            event = crate::events::CLOCK_SKEW,
            volume = %volume,
            "{what} is stamped {}, more than {}s past this node's clock ({}): the two \
             hosts' clocks differ; it is taken, and the records after it are stamped no \
             earlier",
            format_ns(ns),
            CLOCK_SKEW_WARNING.as_secs(),
            format_ns(now_ns)
        );
    }
    true
}

/// Nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + Debug {
    fn now_ns(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        ManualClock(AtomicU64::new(start_ns))
    }

    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::SeqCst);
    }

    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_time_more_than_a_minute_ahead_is_reported() {
        let now = 1_700_000_000 * 1_000_000_000;
        let minute = CLOCK_SKEW_WARNING.as_nanos() as u64;
        let ahead = |ns| warn_if_ahead(ns, now, &"vol", "a test record");
        assert!(!ahead(now - 1));
        assert!(!ahead(now + minute));
        assert!(ahead(now + minute + 1));
        assert!(ahead(u64::MAX), "no overflow at the far end");
        assert!(!warn_if_ahead(u64::MAX, u64::MAX, &"vol", "a test record"));
    }
}
