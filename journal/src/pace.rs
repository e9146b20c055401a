//! Pacing of guest writes near the journal's hard limit.
//!
//! At the hard limit a write waits for the applier to free a whole fold
//! piece, which on a slow disk takes seconds. So writes slow down before
//! that: once the pool is in the zone where the applier folds early
//! ([`crate::pool::Pool::headroom`] is some), every write takes a turn on
//! one schedule shared by all writers, at the applier's measured speed
//! times the headroom: the room left before the limit over the room the
//! writers are paced to keep (two fold pieces). A proportional law: with
//! more room than that the writers go faster than the applier, with less
//! slower, so the pool settles with about that room left and the guest
//! sees a steady rate where the applier keeps up. The room falls with
//! every write and comes back a piece at a time; the law keeps the dip
//! between two pieces above the limit, so writes are slowed, not stopped.
//! No turn is ever more than `MAX_DELAY` away (the pool's own wait
//! catches anything faster). Until a first fold finishes its rate so far
//! stands in; before the applier has written anything nothing is paced.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest a single write is delayed by pacing.
pub const MAX_DELAY: Duration = Duration::from_millis(50);

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
    /// Seconds the applier takes to free a byte of journal (moving
    /// average). Averaged as time per byte, not as a rate: after a run of
    /// quick folds (large records) one slow fold (scattered small ones)
    /// must pull the estimate down at once, not by half of a high rate.
    secs_per_byte: Option<f64>,
    /// The rate of the fold in progress so far, until one has finished.
    live: Option<f64>,
    /// The fold in progress: when it started and the bytes it frees. It
    /// bounds the rate: a fold that has run `t` frees at most `bytes / t`,
    /// so an estimate left from quicker folds gives way within one fold.
    folding: Option<(Instant, u64)>,
}

/// A fold in progress, known to the pacer until dropped.
pub struct Folding<'a>(&'a Pacer);

impl Drop for Folding<'_> {
    fn drop(&mut self) {
        self.0.lock().folding = None;
    }
}

impl Pacer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fold that frees `bytes` of journal started at `at`.
    pub fn folding(&self, bytes: u64, at: Instant) -> Folding<'_> {
        self.lock().folding = Some((at, bytes));
        Folding(self)
    }

    /// The applier freed `bytes` of journal in `took`.
    pub fn record_fold(&self, bytes: u64, took: Duration) {
        let sample = took.as_secs_f64().max(1e-9) / bytes.max(1) as f64;
        let mut st = self.lock();
        st.secs_per_byte = Some(match st.secs_per_byte {
            Some(avg) => avg * (1.0 - NEWEST_WEIGHT) + sample * NEWEST_WEIGHT,
            None => sample,
        });
    }

    /// The first fold, still under way, has freed the equivalent of
    /// `bytes` of journal in `took` (the part of its segments' records it
    /// wrote): until a fold finishes, the rate is taken from this.
    pub fn record_live(&self, bytes: f64, took: Duration) {
        let mut st = self.lock();
        if st.secs_per_byte.is_none() {
            st.live = Some(bytes / took.as_secs_f64().max(1e-6));
        }
    }

    /// The applier's rate, in journal bytes per second, once measured.
    #[cfg(test)]
    fn fold_rate(&self) -> Option<f64> {
        self.lock().secs_per_byte.map(|s| 1.0 / s)
    }

    /// Takes the turn of a write that uses `cost` bytes of journal, with
    /// `headroom` (the room left over the room to keep; 1 where the pool
    /// should settle), and returns how long it must wait from `now`.
    pub fn turn(&self, cost: u64, headroom: f64, now: Instant) -> Duration {
        let mut st = self.lock();
        let Some(estimate) = st.secs_per_byte.map(|s| 1.0 / s).or(st.live) else {
            return Duration::ZERO;
        };
        let bound = st.folding.and_then(|(at, bytes)| {
            let ran = now.checked_duration_since(at)?.as_secs_f64();
            (ran > 0.0).then(|| bytes as f64 / ran)
        });
        let rate = bound.map_or(estimate, |b| b.min(estimate));
        let allowed = rate * headroom.max(0.0);
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
    fn delays(p: &Pacer, n: usize, cost: u64, headroom: f64) -> Vec<Duration> {
        let mut now = Instant::now();
        (0..n)
            .map(|_| {
                let d = p.turn(cost, headroom, now);
                now += d;
                d
            })
            .collect()
    }

    #[test]
    fn nothing_is_paced_before_a_fold_was_measured() {
        let p = Pacer::default();
        assert!(delays(&p, 10, MIB, 0.5).iter().all(|d| d.is_zero()));
        p.record_fold(64 * MIB, Duration::from_secs(1));
        assert!(!delays(&p, 10, MIB, 0.5)[1..].iter().any(|d| d.is_zero()));
    }

    #[test]
    fn the_rate_is_the_applier_s_times_the_headroom() {
        // 4 KiB writes: the first goes at once, each next one a turn later.
        let rate_at = |headroom: f64| {
            let p = Pacer::default();
            p.record_fold(100 * MIB, Duration::from_secs(1));
            let d = delays(&p, 101, 4096, headroom);
            let total: Duration = d.iter().sum();
            100.0 * 4096.0 / total.as_secs_f64()
        };
        let settled = rate_at(1.0);
        let half = rate_at(0.5);
        let expected = 100.0 * MIB as f64;
        assert!(
            (settled / expected - 1.0).abs() < 0.01,
            "{settled} vs {expected}"
        );
        assert!((settled / half - 2.0).abs() < 0.02, "{half} vs {settled}");
    }

    /// A pool of 16 segments of 64 MiB at its limit on a slow disk (each
    /// fold piece of one segment takes 14 s, as measured under a 1000-IOPS
    /// throttle), one writer of 4 KiB records as fast as the pacer lets it,
    /// in virtual time; the pacer's estimate comes from folds that took
    /// `earlier_folds` each. Returns whether the writer ever found the pool
    /// full (it would wait there for a whole piece), its longest wait, and
    /// its rate over the applier's from the tenth fold on.
    fn at_the_limit(earlier_folds: Duration) -> (bool, Duration, f64) {
        const SEG: u64 = 64 * MIB;
        const MAX: u64 = 16;
        const ZONE: u64 = 4; // a reserve of 2, an early segment, the active one
        const PIECE: u64 = 1;
        const COST: u64 = 4096 + 512;
        let fold_time = Duration::from_secs(14);

        let p = Pacer::default();
        p.record_fold(PIECE * SEG, earlier_folds);
        let start = Instant::now();
        let mut now = start;
        let (mut used, mut left) = (MAX - ZONE, SEG);
        let mut fold: Option<(Instant, Folding<'_>)> = None;
        let (mut written, mut measured_from) = (0u64, None);
        let (mut folds, mut full, mut longest) = (0, false, Duration::ZERO);
        while folds < 40 {
            if fold.as_ref().is_some_and(|(end, _)| *end <= now) {
                fold = None;
                used -= PIECE;
                p.record_fold(PIECE * SEG, fold_time);
                folds += 1;
                if folds == 10 {
                    measured_from = Some((now, written));
                }
            }
            if fold.is_none() && used + ZONE > MAX {
                fold = Some((now + fold_time, p.folding(PIECE * SEG, now)));
            }
            if left < COST {
                if used == MAX {
                    // Held until the piece lands.
                    full = true;
                    now = fold.as_ref().expect("folding").0;
                    continue;
                }
                used += 1;
                left = SEG;
            }
            let room = MAX - used;
            let headroom =
                (room < ZONE).then(|| (room * SEG + left) as f64 / (2 * PIECE * SEG) as f64);
            let wait = headroom.map_or(Duration::ZERO, |h| p.turn(COST, h, now));
            longest = longest.max(wait);
            // The writer itself takes 10 us a write.
            now += wait + Duration::from_micros(10);
            left -= COST;
            written += COST;
        }
        let (since, before) = measured_from.expect("measured");
        let rate = (written - before) as f64 / (now - since).as_secs_f64();
        let applier = (PIECE * SEG) as f64 / fold_time.as_secs_f64();
        (full, longest, rate / applier)
    }

    /// Steady (the estimate is right), and just after a turn from large
    /// records, which fold quickly, to small scattered ones: the first slow
    /// fold must slow the writers while it runs.
    #[test]
    fn a_writer_paced_at_the_limit_keeps_pace_with_a_slow_applier_without_stalling() {
        for earlier_folds in [Duration::from_secs(14), Duration::from_millis(200)] {
            let (full, longest, ratio) = at_the_limit(earlier_folds);
            let case = format!("after folds of {earlier_folds:?}");
            assert!(!full, "{case}: the writer found the pool full");
            assert!(longest <= MAX_DELAY, "{case}: {longest:?}");
            assert!(
                (0.9..=1.05).contains(&ratio),
                "{case}: writer at {ratio:.3}x"
            );
        }
    }

    #[test]
    fn one_slow_fold_pulls_a_quick_estimate_down_at_once() {
        let p = Pacer::default();
        for _ in 0..10 {
            p.record_fold(64 * MIB, Duration::from_millis(100));
        }
        p.record_fold(64 * MIB, Duration::from_secs(14));
        let rate = p.fold_rate().expect("measured");
        let slow = 64.0 * MIB as f64 / 14.0;
        assert!(rate < 2.1 * slow, "{rate} vs {slow}");
    }

    #[test]
    fn a_fold_in_progress_bounds_the_rate() {
        let p = Pacer::default();
        p.record_fold(64 * MIB, Duration::from_millis(100));
        let start = Instant::now();
        let at = start + Duration::from_secs(8);
        // The second of two 4 KiB writes at `at` waits the first's turn.
        let second_turn = |p: &Pacer| {
            p.lock().next = None;
            p.turn(4096, 1.0, at);
            p.turn(4096, 1.0, at)
        };
        let fold = p.folding(64 * MIB, start);
        let bounded = second_turn(&p);
        drop(fold);
        let unbounded = second_turn(&p);
        // 64 MiB not freed in 8 s: 8 MiB/s at most.
        let expected = Duration::from_secs_f64(4096.0 / (8.0 * MIB as f64));
        assert!(
            bounded.abs_diff(expected) < Duration::from_micros(5),
            "{bounded:?}"
        );
        assert!(
            unbounded < expected / 50,
            "the bound ends with its fold: {unbounded:?}"
        );
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
