//! A detached primary's requests, forwarded to its peer (DESIGN.md,
//! "Handover (live migration) and storage-failure evacuation").
//!
//! The data path puts a request in the queue and waits for its answer; the
//! sender's session sends `detach` once, then every queued request in
//! order, and its reader files each `forwarded` answer under the request's
//! id. The peer applies them in the order they came, so a request is
//! answered only after every one before it was applied.
//!
//! Invariant: ids are given in queue order and never reused; a request is
//! in `unsent` or in `sent` until its answer is filed in `done`, where its
//! caller takes it, or until it is given up (then, if it was sent, its id
//! waits in `abandoned` for the answer the peer still owes).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::frame::ForwardOp;

/// Why a forwarded request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("the peer failed the forwarded request: {0}")]
    Peer(String),
    #[error("no answer from the peer within the hold (replication link: {0})")]
    NoAnswer(String),
}

/// What `status` shows of a detached primary.
#[derive(Debug, Clone, Serialize)]
pub struct DetachedStatus {
    /// What an operator reads first.
    pub summary: String,
    /// The storage error that made this primary detach.
    pub reason: String,
    /// When (RFC 3339).
    pub since: String,
    /// The epoch the peer took over as primary at, once it did.
    pub peer_epoch: Option<u64>,
    pub forwarded_requests: u64,
}

/// What `status` shows of a node serving a detached primary's requests.
#[derive(Debug, Clone, Serialize)]
pub struct ServingStatus {
    pub peer: String,
    /// The storage error the primary detached for.
    pub reason: String,
    pub since: String,
    pub requests: u64,
    /// When the guest moved here (a handover): no request is taken since.
    pub ended: Option<String>,
}

fn now() -> String {
    rewind_journal::format_ns(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    )
}

#[derive(Debug, Default)]
struct Queue {
    /// Set by `request_detach`; the session sends it once.
    detach: Option<String>,
    detach_sent: bool,
    /// The peer's answer to `detach`: its new epoch and the last lsn of
    /// the old one it holds, or why it refused.
    answer: Option<Result<(u64, u64), String>>,
    status: Option<DetachedStatus>,
    next_id: u64,
    /// Keyed by id, which is queue order: a request given up leaves in
    /// one step, however long the queue.
    unsent: BTreeMap<u64, ForwardOp>,
    sent: BTreeMap<u64, ForwardOp>,
    abandoned: HashSet<u64>,
    done: HashMap<u64, Result<Vec<u8>, String>>,
    /// Why the session that carried the requests ended, if it did.
    lost: Option<String>,
    /// On the peer: the detached primary it serves.
    serving: Option<ServingStatus>,
    /// The guest moved to the peer (a handover): nothing is forwarded
    /// any more.
    handed_over: bool,
}

impl Queue {
    /// Forgets request `id`; if it was sent, its answer may still come.
    fn abandon(&mut self, id: u64) {
        self.unsent.remove(&id);
        if self.sent.remove(&id).is_some() {
            self.abandoned.insert(id);
        }
        // Filed after its caller stopped waiting.
        self.done.remove(&id);
    }
}

/// The forwarding state of one link.
#[derive(Debug, Default)]
pub struct Forwarding {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Forwarding {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until<T>(
        &self,
        deadline: Instant,
        mut ready: impl FnMut(&mut Queue) -> Option<T>,
    ) -> Result<T, String> {
        let mut queue = self.lock();
        loop {
            if let Some(value) = ready(&mut queue) {
                return Ok(value);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(queue.lost.clone().unwrap_or_else(|| "up".into()));
            };
            queue = self
                .changed
                .wait_timeout(queue, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether this primary detached (or is detaching).
    pub fn detached(&self) -> bool {
        self.lock().detach.is_some()
    }

    /// Asks the session to send `detach` with `reason`.
    pub fn request_detach(&self, reason: &str) {
        let mut queue = self.lock();
        queue.detach = Some(reason.to_owned());
        queue.status = Some(DetachedStatus {
            summary: format!("detached: local storage failed ({reason}); evacuate with handover"),
            reason: reason.to_owned(),
            since: now(),
            peer_epoch: None,
            forwarded_requests: 0,
        });
    }

    /// Waits until `deadline` for the peer's answer to `detach`.
    pub fn wait_detached(&self, deadline: Instant) -> Result<(u64, u64), String> {
        self.wait_until(deadline, |queue| queue.answer.clone())
            .map_err(|link| {
                format!("the peer did not answer the detach (replication link: {link})")
            })?
    }

    /// `detach`, for the session to send, if not sent yet.
    pub(super) fn detach_to_send(&self) -> Option<String> {
        let mut queue = self.lock();
        if queue.detach_sent {
            return None;
        }
        queue.detach_sent = queue.detach.is_some();
        queue.detach.clone()
    }

    /// The peer's `detached`: it is the primary of `epoch` (newer than
    /// this node's `mine`) and holds the old epoch's records up to `lsn`
    /// (at most `sent`, the newest lsn it may hold). Refused unless a
    /// detach was sent and waits for its answer.
    pub(super) fn took_over(
        &self,
        epoch: u64,
        lsn: u64,
        mine: u64,
        sent: u64,
    ) -> Result<(), String> {
        let queue = self.lock();
        if !queue.detach_sent || queue.answer.is_some() {
            return Err(format!(
                "the peer says it took over at epoch {epoch}, but no detach waits for an answer"
            ));
        }
        if epoch <= mine {
            return Err(format!(
                "the peer says it took over at epoch {epoch}, not newer than this node's {mine}"
            ));
        }
        if lsn > sent {
            return Err(format!(
                "the peer says it took over holding lsn {lsn}, past the last lsn sent to it \
                 ({sent})"
            ));
        }
        self.file_detach_answer(queue, Ok((epoch, lsn)));
        Ok(())
    }

    /// The detach failed (the peer refused, or the link was lost).
    pub(super) fn answered_detach(&self, answer: Result<(u64, u64), String>) {
        self.file_detach_answer(self.lock(), answer);
    }

    fn file_detach_answer(
        &self,
        mut queue: MutexGuard<'_, Queue>,
        answer: Result<(u64, u64), String>,
    ) {
        if queue.answer.is_some() {
            return;
        }
        if let (Ok((epoch, _)), Some(status)) = (&answer, queue.status.as_mut()) {
            status.peer_epoch = Some(*epoch);
        }
        queue.answer = Some(answer);
        drop(queue);
        self.changed.notify_all();
    }

    /// Queues `op`; returns its id.
    pub fn queue(&self, op: ForwardOp) -> u64 {
        let mut queue = self.lock();
        queue.next_id += 1;
        let id = queue.next_id;
        queue.unsent.insert(id, op);
        if let Some(status) = queue.status.as_mut() {
            status.forwarded_requests += 1;
        }
        id
    }

    /// Waits until `deadline` for request `id`'s answer. At the deadline
    /// the request is given up (if the peer applies it later, the guest
    /// was told it failed, which allows any outcome).
    pub fn wait(&self, id: u64, deadline: Instant) -> Result<Vec<u8>, ForwardError> {
        match self.wait_until(deadline, |queue| queue.done.remove(&id)) {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(why)) => Err(ForwardError::Peer(why)),
            Err(link) => {
                self.lock().abandon(id);
                Err(ForwardError::NoAnswer(link))
            }
        }
    }

    /// Gives up requests `ids` (a piece of the same guest request failed).
    pub fn abandon(&self, ids: &[u64]) {
        let mut queue = self.lock();
        for &id in ids {
            queue.abandon(id);
        }
    }

    /// The requests to send now, in order (moved to `sent`).
    pub(super) fn take_unsent(&self) -> Vec<(u64, ForwardOp)> {
        let mut queue = self.lock();
        let taken: Vec<_> = std::mem::take(&mut queue.unsent).into_iter().collect();
        for (id, op) in &taken {
            queue.sent.insert(*id, op.clone());
        }
        taken
    }

    /// The peer answered request `id`. An answer to a request that waits
    /// for none (never sent, or answered already), or data of another
    /// length than the request reads, is an error of the peer's; the
    /// request then fails with it.
    pub(super) fn answered(&self, id: u64, result: Result<Vec<u8>, String>) -> Result<(), String> {
        let mut queue = self.lock();
        if let Some(op) = queue.sent.remove(&id) {
            // The pieces of a read are put together by their lengths: one
            // of another length would move the data of the rest.
            let wanted = match op {
                ForwardOp::Read { length, .. } => length,
                _ => 0,
            };
            let (result, wrong) = match result {
                Ok(data) if data.len() as u64 != wanted => {
                    let why = format!(
                        "the peer answered request {id}, which reads {wanted} bytes, with {} \
                         bytes",
                        data.len()
                    );
                    (Err(why.clone()), Some(why))
                }
                result => (result, None),
            };
            queue.done.insert(id, result);
            drop(queue);
            self.changed.notify_all();
            wrong.map_or(Ok(()), Err)
        } else if queue.abandoned.remove(&id) {
            Ok(())
        } else {
            Err(format!(
                "the peer answered request {id}, which waits for no answer (never sent, or \
                 answered already)"
            ))
        }
    }

    /// A new session: what the lost one sent and got no answer to goes
    /// out again first, in order (the peer applies requests in the order
    /// they come, so applying one twice, in order, changes nothing).
    pub(super) fn resend(&self) {
        let mut queue = self.lock();
        let sent = std::mem::take(&mut queue.sent);
        queue.unsent.extend(sent);
        // What the lost session owed is not answered on this one.
        queue.abandoned.clear();
        queue.lost = None;
    }

    /// The guest moved to the peer.
    pub(super) fn hand_over(&self) {
        self.lock().handed_over = true;
    }

    pub(super) fn handed_over(&self) -> bool {
        self.lock().handed_over
    }

    /// The session that carried the requests ended.
    pub(super) fn session_lost(&self, why: &str) {
        self.lock().lost = Some(why.to_owned());
        self.changed.notify_all();
    }

    pub fn status(&self) -> Option<DetachedStatus> {
        self.lock().status.clone()
    }

    /// On the peer: this node took over to serve the detached primary at
    /// `peer`.
    pub(super) fn serve(&self, peer: String, reason: String) {
        self.lock().serving = Some(ServingStatus {
            peer,
            reason,
            since: now(),
            requests: 0,
            ended: None,
        });
    }

    /// On the peer: one more request served.
    pub(super) fn served(&self) {
        if let Some(serving) = self.lock().serving.as_mut() {
            serving.requests += 1;
        }
    }

    pub(super) fn stop_serving(&self) {
        if let Some(serving) = self.lock().serving.as_mut() {
            serving.ended = Some(now());
        }
    }

    pub fn serving(&self) -> Option<ServingStatus> {
        self.lock().serving.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn answers_reach_their_callers_in_order() {
        let f = Forwarding::default();
        f.request_detach("EIO");
        assert_eq!(f.detach_to_send().as_deref(), Some("EIO"));
        assert_eq!(f.detach_to_send(), None, "detach is sent once");
        f.answered_detach(Ok((4, 77)));
        assert_eq!(f.wait_detached(soon()), Ok((4, 77)));
        assert_eq!(f.status().and_then(|s| s.peer_epoch), Some(4));
        let a = f.queue(ForwardOp::Flush);
        let b = f.queue(ForwardOp::Read {
            offset: 0,
            length: 512,
        });
        let sent = f.take_unsent();
        assert_eq!(sent.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [a, b]);
        assert!(f.take_unsent().is_empty());
        assert_eq!(f.answered(a, Ok(Vec::new())), Ok(()));
        assert_eq!(f.answered(b, Err("EINVAL".into())), Ok(()));
        assert_eq!(f.wait(a, soon()), Ok(Vec::new()));
        assert_eq!(f.wait(b, soon()), Err(ForwardError::Peer("EINVAL".into())));
        assert!(f.answered(b + 5, Ok(Vec::new())).is_err());
        assert_eq!(f.status().map(|s| s.forwarded_requests), Some(2));
    }

    #[test]
    fn a_new_session_resends_what_was_not_answered_first_in_order() {
        let f = Forwarding::default();
        let ids: Vec<u64> = (0..3).map(|_| f.queue(ForwardOp::Flush)).collect();
        assert_eq!(f.take_unsent().len(), 3);
        assert_eq!(f.answered(ids[0], Ok(Vec::new())), Ok(()));
        let later = f.queue(ForwardOp::Flush);
        f.session_lost("cut");
        f.resend();
        let order: Vec<u64> = f.take_unsent().into_iter().map(|(id, _)| id).collect();
        assert_eq!(order, [ids[1], ids[2], later]);
        assert_eq!(
            f.wait(ids[0], soon()),
            Ok(Vec::new()),
            "answered before the cut"
        );
    }

    #[test]
    fn a_request_without_an_answer_is_given_up_at_its_deadline() {
        let f = Forwarding::default();
        let id = f.queue(ForwardOp::Flush);
        f.session_lost("the peer was silent for 3s");
        let started = Instant::now();
        let deadline = started + Duration::from_millis(50);
        match f.wait(id, deadline) {
            Err(ForwardError::NoAnswer(why)) => assert!(why.contains("silent"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() >= deadline);
        assert!(f.take_unsent().is_empty(), "a given-up request is not sent");
    }

    #[test]
    fn only_the_detach_sent_is_answered_and_only_with_what_was_sent() {
        let f = Forwarding::default();
        let unasked = f.took_over(4, 10, 3, 50).expect_err("no detach");
        assert!(
            unasked.contains("no detach waits for an answer"),
            "{unasked}"
        );
        f.request_detach("EIO");
        assert!(f.took_over(4, 10, 3, 50).is_err(), "not sent yet");
        assert!(f.detach_to_send().is_some());
        let older = f.took_over(3, 10, 3, 50).expect_err("not newer");
        assert!(older.contains("not newer than this node's 3"), "{older}");
        let beyond = f.took_over(4, 51, 3, 50).expect_err("never sent");
        assert!(
            beyond.contains("past the last lsn sent to it (50)"),
            "{beyond}"
        );
        assert!(f.wait_detached(Instant::now()).is_err(), "none taken");
        assert_eq!(f.took_over(4, 50, 3, 50), Ok(()));
        assert!(f.took_over(5, 50, 3, 50).is_err(), "answered already");
        assert_eq!(f.wait_detached(soon()), Ok((4, 50)));
    }

    #[test]
    fn an_answer_carries_exactly_the_data_its_request_reads() {
        let f = Forwarding::default();
        let read = f.queue(ForwardOp::Read {
            offset: 0,
            length: 4096,
        });
        let flush = f.queue(ForwardOp::Flush);
        assert_eq!(f.take_unsent().len(), 2);
        let short = f.answered(read, Ok(vec![0; 512])).expect_err("short");
        assert!(
            short.contains("which reads 4096 bytes, with 512 bytes"),
            "{short}"
        );
        assert_eq!(f.wait(read, soon()), Err(ForwardError::Peer(short)));
        let data = f.answered(flush, Ok(vec![0; 512])).expect_err("data");
        assert!(
            data.contains("which reads 0 bytes, with 512 bytes"),
            "{data}"
        );
    }

    #[test]
    fn only_requests_that_wait_for_an_answer_take_one() {
        let f = Forwarding::default();
        let sent = f.queue(ForwardOp::Flush);
        assert_eq!(f.take_unsent().len(), 1);
        let unsent = f.queue(ForwardOp::Flush);
        let err = f.answered(unsent, Ok(Vec::new())).expect_err("not sent");
        assert!(err.contains("waits for no answer"), "{err}");
        // Given up after it was sent: its late answer is taken once.
        f.abandon(&[sent, unsent]);
        assert!(f.take_unsent().is_empty(), "given up before it was sent");
        assert_eq!(f.answered(sent, Ok(Vec::new())), Ok(()));
        assert!(f.answered(sent, Ok(Vec::new())).is_err(), "answered twice");
    }
}
