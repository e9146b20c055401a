//! Time sources for record timestamps (a fake one lets tests move time).

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::point::format_ns;

/// How far past this node's clock a time that another host stamped (a
/// primary's records, a resync's sync point) may be: the hosts' clocks
/// differ a little. Records are kept in time order, so one from the
/// future would keep every later record out and stand past every time a
/// view can name.
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Fails, saying why, when `ns` is more than [`MAX_CLOCK_SKEW`] past
/// `now_ns`.
pub(crate) fn check_not_ahead(ns: u64, now_ns: u64) -> Result<(), String> {
    let latest = now_ns.saturating_add(MAX_CLOCK_SKEW.as_nanos() as u64);
    if ns > latest {
        return Err(format!(
            "its time {} is more than {MAX_CLOCK_SKEW:?} past this node's clock ({})",
            format_ns(ns),
            format_ns(now_ns)
        ));
    }
    Ok(())
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
