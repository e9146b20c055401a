//! The gate between an export's virtqueues and its disk: whether requests
//! may be taken from the queues (serving) or not (draining, drained,
//! fenced), how many are in flight, and the IO counters.
//!
//! Invariant: once [`Gate::drain`] (or [`Gate::fence`]) has returned, no
//! request is running and none starts until the gate opens again. The fast
//! path is two atomics: a request first counts itself in `in_flight`, then
//! checks `closed`; closing sets `closed`, then waits for `in_flight` to
//! reach zero. Both sides use SeqCst, so at least one sees the other.
//!
//! A queue that finds the gate closed parks its vring here; opening the gate
//! kicks every parked vring so its worker takes the requests the guest
//! queued meanwhile.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use vhost_user_backend::VringT;

use crate::backend::Vring;
use crate::request::{self, Kind, Status};

/// Upper bounds, in seconds, of the per-operation latency histograms'
/// buckets (`+Inf` is implied).
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// One operation's counters: a few relaxed atomics per request.
#[derive(Debug, Default)]
struct OpCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
    /// Requests that took at most `LATENCY_BOUNDS[i]` and more than the
    /// bound before it.
    buckets: [AtomicU64; LATENCY_BOUNDS.len()],
}

impl OpCounters {
    fn count(&self, sample: &request::Sample) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !sample.ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes.fetch_add(sample.bytes, Ordering::Relaxed);
        self.nanos.fetch_add(sample.nanos, Ordering::Relaxed);
        let seconds = sample.nanos as f64 / 1e9;
        if let Some(i) = LATENCY_BOUNDS.iter().position(|&b| seconds <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self, kind: Kind) -> OpStats {
        let buckets: [u64; LATENCY_BOUNDS.len()] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        // Read last, so the total is never below the buckets' (a request
        // counts itself in `requests` first).
        let requests = self
            .requests
            .load(Ordering::Relaxed)
            .max(buckets.iter().sum());
        OpStats {
            kind,
            requests,
            errors: self.errors.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            seconds: self.nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// One operation's counters since the daemon started (the metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct OpStats {
    pub kind: Kind,
    pub requests: u64,
    /// Of those, completed with an error status.
    pub errors: u64,
    /// Data bytes read or written.
    pub bytes: u64,
    /// Total time the requests took.
    pub seconds: f64,
    /// Requests that took at most `LATENCY_BOUNDS[i]` and more than the
    /// bound before it (the rest took longer than the last bound).
    pub buckets: [u64; LATENCY_BOUNDS.len()],
}

/// What the export does with its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Serving,
    /// A drain waits for the requests in flight.
    Draining,
    /// No request runs until `resume`.
    Drained,
    /// The epoch was raised: the old client is gone, no new one is let in
    /// until `unfence`.
    Fenced,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Serving => "serving",
            State::Draining => "draining",
            State::Drained => "drained",
            State::Fenced => "fenced",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GateError {
    #[error("a drain is already running")]
    Draining,
    #[error("the volume is fenced; run `rewindctl unfence` first")]
    Fenced,
    #[error(
        "drain timed out after {timeout:?} with {in_flight} request(s) still in flight \
         (held on a storage error?); the volume is serving again. \
         Retry with a longer --timeout, or with --abort to fail them"
    )]
    Timeout { timeout: Duration, in_flight: u64 },
    #[error(
        "fence timed out after {timeout:?} with {in_flight} request(s) still in flight; \
         the volume stays closed at its old epoch: run `rewindctl fence` again"
    )]
    FenceTimeout { timeout: Duration, in_flight: u64 },
}

/// What a drain did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    /// Requests running when the drain began.
    pub in_flight: u64,
    /// Of those, how many completed with an error (IOERR after `--abort`).
    pub failed: u64,
    /// How long the drain waited for them.
    pub waited_us: u64,
    /// Whether the volume was already drained (nothing was done).
    pub already_drained: bool,
}

/// IO counters since the daemon started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub completed: u64,
    pub failed: u64,
    /// Requests that may have changed the disk (writes, zeroes, discards),
    /// and reverts: if it is the same at two moments, nothing changed the
    /// disk in between.
    pub modifying: u64,
    pub in_flight: u64,
}

struct Inner {
    state: State,
    /// Vrings whose worker found the gate closed, by queue index.
    parked: BTreeMap<usize, Vring>,
    /// Fences begun so far: a drain that sees it move while it waits was
    /// taken over by a fence, whatever the state is by its end.
    fences: u64,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("state", &self.state)
            .field("parked", &self.parked.keys().collect::<Vec<_>>())
            .field("fences", &self.fences)
            .finish()
    }
}

/// Told when the attached client starts or stops its device: a handover
/// switches at a stop (a live migration's switchover) and takes over at
/// the destination's start. Called on the vhost-user thread: must not
/// block.
pub trait DeviceWatcher: Send + Sync + fmt::Debug {
    fn device_started(&self);
    fn device_stopped(&self);
}

#[derive(Debug, Default)]
struct DeviceWatch {
    running: AtomicBool,
    /// When the client last started its device.
    started_at: Mutex<Option<Instant>>,
    watcher: Mutex<Option<Weak<dyn DeviceWatcher>>>,
}

impl DeviceWatch {
    fn watcher(&self) -> Option<std::sync::Arc<dyn DeviceWatcher>> {
        self.watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }
}

#[derive(Debug)]
pub struct Gate {
    closed: AtomicBool,
    /// Requests carrying another epoch are refused.
    epoch: AtomicU64,
    in_flight: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    modifying: AtomicU64,
    /// By [`Kind::index`].
    ops: [OpCounters; Kind::ALL.len()],
    inner: Mutex<Inner>,
    /// Signalled when `in_flight` drops to zero while closed.
    idle: Condvar,
    device: DeviceWatch,
}

/// One request admitted through the gate; dropping it ends the request.
/// It owns a reference to the gate, so it can travel with a request to
/// the thread that completes it.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
}

impl Pass {
    /// Counts the request's outcome.
    pub fn finish(self, status: Status, modifying: bool) {
        let g = &self.gate;
        g.completed.fetch_add(1, Ordering::Relaxed);
        if status != Status::Ok {
            g.failed.fetch_add(1, Ordering::Relaxed);
        }
        if modifying {
            g.modifying.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request the queue worker completed, by operation too.
    pub fn finish_request(self, done: &request::Completion) {
        if let Some(sample) = &done.sample {
            self.gate.ops[sample.kind.index()].count(sample);
        }
        self.finish(done.status, done.modifying);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl Gate {
    pub fn new(epoch: u64) -> Self {
        Gate {
            closed: AtomicBool::new(false),
            epoch: AtomicU64::new(epoch),
            in_flight: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            modifying: AtomicU64::new(0),
            ops: Default::default(),
            inner: Mutex::new(Inner {
                state: State::Serving,
                parked: BTreeMap::new(),
                fences: 0,
            }),
            idle: Condvar::new(),
            device: DeviceWatch::default(),
        }
    }

    /// Who is told when the client's device starts or stops.
    pub fn watch_device(&self, watcher: Weak<dyn DeviceWatcher>) {
        *self
            .device
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(watcher);
    }

    /// Whether the attached client's device runs (started, not stopped).
    pub fn device_running(&self) -> bool {
        self.device.running.load(Ordering::Acquire)
    }

    /// When the attached client last started its device, if it did.
    pub fn device_started_at(&self) -> Option<Instant> {
        *self
            .device
            .started_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The client set its features, as QEMU does each time it starts the
    /// device (and when a migration turns dirty logging on or off).
    pub fn device_started(&self) {
        *self
            .device
            .started_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.device.running.store(true, Ordering::Release);
        if let Some(watcher) = self.device.watcher() {
            watcher.device_started();
        }
    }

    /// Every queue the client used is stopped (GET_VRING_BASE).
    pub fn device_stopped(&self) {
        if self.device.running.swap(false, Ordering::AcqRel) {
            if let Some(watcher) = self.device.watcher() {
                watcher.device_stopped();
            }
        }
    }

    /// The client went away: its device runs no more, but was not stopped
    /// (QEMU quit or crashed).
    pub fn device_gone(&self) {
        self.device.running.store(false, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub fn counters(&self) -> Counters {
        Counters {
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            modifying: self.modifying.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Per-operation counters, in the order of [`Kind::ALL`].
    pub fn op_stats(&self) -> Vec<OpStats> {
        Kind::ALL
            .iter()
            .map(|&kind| self.ops[kind.index()].snapshot(kind))
            .collect()
    }

    /// Admits one request from a client attached at `epoch`, or `None` if
    /// the gate is closed to it.
    pub fn enter(self: &Arc<Self>, epoch: u64) -> Option<Pass> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) || self.epoch.load(Ordering::SeqCst) != epoch {
            self.leave();
            return None;
        }
        Some(Pass { gate: self.clone() })
    }

    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst)
        {
            // Under the lock, so a drain between its check and its wait
            // cannot miss the signal.
            let _inner = self.lock();
            self.idle.notify_all();
        }
    }

    /// Parks queue `queue`'s vring after `enter` refused its client;
    /// returns true if the gate is open to the client's epoch now (the
    /// worker should try again instead). `epoch` is read under the lock:
    /// a client admitted after the worker's own reading, whose parked
    /// queues were woken (`wake_parked`) before this one parked, is seen
    /// here, and one admitted later wakes this queue.
    pub fn park(&self, queue: usize, epoch: impl Fn() -> u64, vring: &Vring) -> bool {
        let mut inner = self.lock();
        if inner.state == State::Serving && self.epoch.load(Ordering::SeqCst) == epoch() {
            return true;
        }
        inner.parked.insert(queue, vring.clone());
        false
    }

    /// Kicks the parked vrings if the gate is open (a client was admitted
    /// after its queues started).
    pub fn wake_parked(&self) {
        let mut inner = self.lock();
        if inner.state == State::Serving {
            self.open(&mut inner);
        }
    }

    /// Counts a change to the disk made outside the queues (a revert).
    pub fn note_modification(&self) {
        self.modifying.fetch_add(1, Ordering::SeqCst);
    }

    /// Forgets parked vrings (their connection ended).
    pub fn forget_parked(&self) {
        self.lock().parked.clear();
    }

    /// Closes the gate and waits up to `timeout` for the requests in flight;
    /// `on_closed` runs once the gate is closed, and what it returns (a
    /// release of held requests) lives until the wait is over. On timeout
    /// the gate opens again.
    pub fn drain<R>(
        &self,
        timeout: Duration,
        on_closed: impl FnOnce() -> R,
    ) -> Result<DrainReport, GateError> {
        let started = Instant::now();
        let in_flight;
        let fences;
        {
            let mut inner = self.lock();
            fences = inner.fences;
            match inner.state {
                State::Serving => inner.state = State::Draining,
                State::Draining => return Err(GateError::Draining),
                State::Drained => {
                    return Ok(DrainReport {
                        in_flight: 0,
                        failed: 0,
                        waited_us: 0,
                        already_drained: true,
                    })
                }
                State::Fenced => return Err(GateError::Fenced),
            }
            // Read before the gate closes: a request `enter` turns away
            // once it is closed counts itself for a moment.
            in_flight = self.in_flight.load(Ordering::SeqCst);
            self.closed.store(true, Ordering::SeqCst);
        }
        let failed_before = self.failed.load(Ordering::SeqCst);
        let during_wait = on_closed();
        let mut inner = self.wait_idle(started + timeout);
        drop(during_wait);
        if inner.fences != fences {
            // A fence took over while this drain waited (and may have
            // moved the gate on since, a rejoin's to drained).
            return Err(GateError::Fenced);
        }
        if self.in_flight.load(Ordering::SeqCst) != 0 {
            let in_flight = self.in_flight.load(Ordering::SeqCst);
            self.open(&mut inner);
            return Err(GateError::Timeout { timeout, in_flight });
        }
        inner.state = State::Drained;
        Ok(DrainReport {
            in_flight,
            failed: self.failed.load(Ordering::SeqCst) - failed_before,
            waited_us: started.elapsed().as_micros() as u64,
            already_drained: false,
        })
    }

    /// Waits, with the lock held on return, until nothing is in flight or
    /// `deadline` passes.
    fn wait_idle(&self, deadline: Instant) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            inner = self
                .idle
                .wait_timeout(inner, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        inner
    }

    /// Undoes a drain. Resuming a serving volume does nothing.
    pub fn resume(&self) -> Result<(), GateError> {
        let mut inner = self.lock();
        match inner.state {
            State::Serving => Ok(()),
            State::Draining => Err(GateError::Draining),
            State::Drained => {
                self.open(&mut inner);
                Ok(())
            }
            State::Fenced => Err(GateError::Fenced),
        }
    }

    /// Closes the gate for good (until `unfence`) and waits up to `timeout`
    /// for the requests in flight; `on_closed` runs once it is closed (to
    /// release held requests). The caller then raises the epoch and gives
    /// it to [`Gate::set_epoch`]. On timeout the gate stays closed: a
    /// request still running could otherwise land after the new epoch.
    /// A drain under way is taken over: it ends with [`GateError::Fenced`]
    /// and leaves the gate fenced (it would otherwise open it again on its
    /// timeout, or be resumed by whoever started it).
    pub fn fence<R>(
        &self,
        timeout: Duration,
        on_closed: impl FnOnce() -> R,
    ) -> Result<(), GateError> {
        let started = Instant::now();
        {
            let mut inner = self.lock();
            match inner.state {
                State::Serving | State::Drained | State::Draining | State::Fenced => {
                    inner.state = State::Fenced
                }
            }
            inner.fences += 1;
            self.closed.store(true, Ordering::SeqCst);
        }
        let during_wait = on_closed();
        let _inner = self.wait_idle(started + timeout);
        drop(during_wait);
        match self.in_flight.load(Ordering::SeqCst) {
            0 => Ok(()),
            in_flight => Err(GateError::FenceTimeout { timeout, in_flight }),
        }
    }

    /// Turns a fenced gate into a drained one: still closed, but a new
    /// client is admitted and waits (a replica after its rejoin, where the
    /// next guest may connect before the promotion). The epoch the fence
    /// moved on keeps the clients attached before it out.
    pub fn fenced_to_drained(&self) {
        let mut inner = self.lock();
        if inner.state == State::Fenced {
            inner.state = State::Drained;
        }
    }

    /// Takes the epoch a fence raised: clients attached before are refused.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Lets clients in again after a fence.
    pub fn unfence(&self) -> Result<(), GateError> {
        let mut inner = self.lock();
        match inner.state {
            State::Fenced => {
                self.open(&mut inner);
                Ok(())
            }
            State::Draining => Err(GateError::Draining),
            State::Serving | State::Drained => Ok(()),
        }
    }

    /// Opens the gate and kicks the parked vrings.
    fn open(&self, inner: &mut Inner) {
        inner.state = State::Serving;
        self.closed.store(false, Ordering::SeqCst);
        for (queue, vring) in std::mem::take(&mut inner.parked) {
            if let Err(e) = kick(&vring) {
                tracing::warn!(queue, error = %e, "cannot wake a parked queue");
            }
        }
    }
}

/// Signals the vring's kick eventfd, as the guest does, so its worker
/// thread takes the requests queued while the gate was closed.
fn kick(vring: &Vring) -> std::io::Result<()> {
    let state = vring.get_ref();
    let Some(consumer) = state.get_kick() else {
        return Ok(());
    };
    // SAFETY: `consumer` owns this eventfd and lives, borrowed from the
    // vring state we hold, until the end of this function.
    let fd = unsafe { BorrowedFd::borrow_raw(consumer.as_raw_fd()) };
    rustix::io::write(fd, &1u64.to_ne_bytes())?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Polls until `gate` is in `state` (another thread moves it there).
    pub(crate) fn wait_for_state(gate: &Gate, state: State) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while gate.state() != state {
            assert!(Instant::now() < deadline, "the gate never became {state:?}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_drain_waits_for_the_requests_in_flight_and_refuses_new_ones() {
        let gate = Arc::new(Gate::new(1));
        let pass = gate.enter(1).expect("serving");
        let (tx, rx) = std::sync::mpsc::channel();
        let drainer = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let report = gate.drain(Duration::from_secs(60), || {});
                tx.send(()).expect("send");
                report
            })
        };
        wait_for_state(&gate, State::Draining);
        assert!(gate.enter(1).is_none(), "no new request while draining");
        assert!(rx.try_recv().is_err(), "returned with a request in flight");
        pass.finish(Status::IoErr, true);
        let report = drainer.join().expect("drainer").expect("drained");
        assert_eq!((report.in_flight, report.failed), (1, 1));
        assert_eq!(gate.state(), State::Drained);
        assert!(gate.enter(1).is_none(), "drained");
        let again = gate.drain(Duration::ZERO, || {}).expect("idempotent");
        assert!(again.already_drained);

        gate.resume().expect("resume");
        assert_eq!(gate.state(), State::Serving);
        let c = gate.counters();
        assert_eq!((c.completed, c.failed, c.modifying), (1, 1, 1));
        assert!(gate.enter(1).is_some());
    }

    #[test]
    fn a_drain_that_times_out_serves_again() {
        let gate = Arc::new(Gate::new(1));
        let _stuck = gate.enter(1).expect("serving");
        let mut released = false;
        let err = gate
            .drain(Duration::from_millis(10), || released = true)
            .unwrap_err();
        assert!(released, "held requests were released");
        assert_eq!(
            err,
            GateError::Timeout {
                timeout: Duration::from_millis(10),
                in_flight: 1
            }
        );
        assert!(err.to_string().contains("--abort"), "{err}");
        assert_eq!(gate.state(), State::Serving);
    }

    #[test]
    fn a_fence_takes_over_a_drain_under_way() {
        let gate = Arc::new(Gate::new(1));
        let pass = gate.enter(1).expect("serving");
        let drainer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.drain(Duration::from_secs(60), || {}))
        };
        wait_for_state(&gate, State::Draining);
        let fencer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.fence(Duration::from_secs(60), || {}))
        };
        wait_for_state(&gate, State::Fenced);
        drop(pass);
        fencer.join().expect("fencer").expect("fenced");
        let drained = drainer.join().expect("drainer");
        assert_eq!(drained, Err(GateError::Fenced));
        assert_eq!(gate.state(), State::Fenced, "the drain left it fenced");
        assert_eq!(gate.resume(), Err(GateError::Fenced));
        assert!(gate.enter(1).is_none());
    }

    #[test]
    fn a_fence_refuses_the_old_epoch_for_good() {
        let gate = Arc::new(Gate::new(1));
        let stuck = gate.enter(1).expect("serving");
        let err = gate.fence(Duration::from_millis(10), || {}).unwrap_err();
        assert!(
            matches!(err, GateError::FenceTimeout { in_flight: 1, .. }),
            "{err}"
        );
        assert_eq!(
            gate.state(),
            State::Fenced,
            "a fence that times out stays closed"
        );
        drop(stuck);
        gate.fence(Duration::from_secs(1), || {}).expect("fence");
        gate.set_epoch(2);
        assert_eq!((gate.state(), gate.epoch()), (State::Fenced, 2));
        assert!(gate.enter(2).is_none(), "fenced");
        assert_eq!(gate.resume(), Err(GateError::Fenced));
        assert_eq!(gate.drain(Duration::ZERO, || {}), Err(GateError::Fenced));
        gate.unfence().expect("unfence");
        assert!(gate.enter(1).is_none(), "the old epoch stays out");
        assert!(gate.enter(2).is_some(), "the new epoch is served");
    }
}
