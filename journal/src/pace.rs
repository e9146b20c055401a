//! Pacing of guest writes near the journal's hard limit.
//!
//! At the hard limit a write waits for the applier to free a whole
//! segment, which on a slow disk takes seconds. So writes slow down before
//! that: once the pool is in the zone where the applier folds early
//! ([`crate::pool::Pool::pressure`] above 0), every write takes a turn on
//! one schedule shared by all writers, at a rate of the applier's measured
//! speed divided by `SLACK_AT_LIMIT × pressure`. The deeper the pool is,
//! the slower the writes: the guest sees a steady rate that settles where
//! the applier keeps up, not stalls. No turn is ever more than
//! `MAX_DELAY` away (the pool's own wait catches anything faster). Until
//! a first fold finishes its rate so far stands in; before the applier
//! has written anything nothing is paced.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest a single write is delayed by pacing.
pub const MAX_DELAY: Duration = Duration::from_millis(50);

/// At the hard limit (pressure 1), writes get this fraction less than the
/// applier's rate, so the applier gains on them.
const SLACK_AT_LIMIT: f64 = 1.25;

/// Weight of the newest fold in the rate estimate.
const NEWEST_WEIGHT: f64 = 0.5;

#[derive(Debug, Default)]
pub struct Pacer {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the next write's turn starts (`None`: no write was paced yet).
    next: Option<Instant>,
    /// Journal bytes the applier frees per second (moving average).
    fold_rate: Option<f64>,
    /// The same, of the fold in progress so far, until one has finished.
    live: Option<f64>,
}

impl Pacer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The applier freed `bytes` of journal in `took`.
    pub fn record_fold(&self, bytes: u64, took: Duration) {
        let secs = took.as_secs_f64().max(1e-6);
        let sample = bytes as f64 / secs;
        let mut st = self.lock();
        st.fold_rate = Some(match st.fold_rate {
            Some(rate) => rate * (1.0 - NEWEST_WEIGHT) + sample * NEWEST_WEIGHT,
            None => sample,
        });
    }

    /// The first fold, still under way, has freed the equivalent of
    /// `bytes` of journal in `took` (the part of its segments' records it
    /// wrote): until a fold finishes, the rate is taken from this.
    pub fn record_live(&self, bytes: f64, took: Duration) {
        let mut st = self.lock();
        if st.fold_rate.is_none() {
            st.live = Some(bytes / took.as_secs_f64().max(1e-6));
        }
    }

    /// The applier's rate, in journal bytes per second, once measured.
    #[cfg(test)]
    fn fold_rate(&self) -> Option<f64> {
        self.lock().fold_rate
    }

    /// Takes the turn of a write that uses `cost` bytes of journal, at
    /// `pressure` (0 to 1), and returns how long it must wait from `now`.
    pub fn turn(&self, cost: u64, pressure: f64, now: Instant) -> Duration {
        if pressure <= 0.0 {
            return Duration::ZERO;
        }
        let mut st = self.lock();
        let Some(rate) = st.fold_rate.or(st.live) else {
            return Duration::ZERO;
        };
        let allowed = rate / (SLACK_AT_LIMIT * pressure.min(1.0));
        let length = Duration::from_secs_f64(cost as f64 / allowed.max(1.0));
        let start = st.next.filter(|&n| n > now).unwrap_or(now);
        let start = start.min(now + MAX_DELAY);
        st.next = Some(start + length);
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The delays of `n` back-to-back writes of `cost` bytes, each issued
    /// when the one before it was allowed to go.
    fn delays(p: &Pacer, n: usize, cost: u64, pressure: f64) -> Vec<Duration> {
        let mut now = Instant::now();
        (0..n)
            .map(|_| {
                let d = p.turn(cost, pressure, now);
                now += d;
                d
            })
            .collect()
    }

    #[test]
    fn nothing_is_paced_outside_the_zone_or_before_a_fold_was_measured() {
        let p = Pacer::default();
        assert!(delays(&p, 10, MIB, 1.0).iter().all(|d| d.is_zero()));
        p.record_fold(64 * MIB, Duration::from_secs(1));
        assert!(delays(&p, 10, MIB, 0.0).iter().all(|d| d.is_zero()));
    }

    #[test]
    fn the_rate_falls_in_proportion_to_the_pressure() {
        // 4 KiB writes: the first goes at once, each next one a turn later.
        let rate_at = |pressure: f64| {
            let p = Pacer::default();
            p.record_fold(100 * MIB, Duration::from_secs(1));
            let d = delays(&p, 101, 4096, pressure);
            let total: Duration = d.iter().sum();
            100.0 * 4096.0 / total.as_secs_f64()
        };
        let full = rate_at(1.0);
        let half = rate_at(0.5);
        let expected = 100.0 * MIB as f64 / SLACK_AT_LIMIT;
        assert!((full / expected - 1.0).abs() < 0.01, "{full} vs {expected}");
        assert!((half / full - 2.0).abs() < 0.02, "{half} vs {full}");
    }

    #[test]
    fn the_first_fold_paces_while_it_runs_and_then_gives_way_to_finished_ones() {
        let p = Pacer::default();
        p.record_live(MIB as f64, Duration::from_secs(1));
        let paced = |p: &Pacer| delays(p, 2, 4096, 1.0)[1];
        let live = paced(&p);
        assert!(!live.is_zero());
        p.record_fold(64 * MIB, Duration::from_secs(1));
        p.record_live(MIB as f64, Duration::from_secs(100));
        assert!(paced(&p) < live / 32, "the finished fold's rate is used");
    }

    #[test]
    fn no_write_waits_longer_than_the_cap() {
        let p = Pacer::default();
        p.record_fold(MIB, Duration::from_secs(10));
        let d = delays(&p, 20, MIB, 1.0);
        assert!(d.iter().all(|d| *d <= MAX_DELAY), "{d:?}");
        assert_eq!(d[5], MAX_DELAY, "a slow applier makes each wait the cap");
    }

    #[test]
    fn the_rate_follows_the_newest_folds() {
        let p = Pacer::default();
        p.record_fold(64 * MIB, Duration::from_secs(1));
        for _ in 0..20 {
            p.record_fold(64 * MIB, Duration::from_secs(4));
        }
        let rate = p.fold_rate().expect("measured");
        assert!((rate / (16.0 * MIB as f64) - 1.0).abs() < 0.01, "{rate}");
    }
}
