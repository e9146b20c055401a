//! Application-consistent bookmarks (`bookmark --quiesce`): the guest's
//! filesystems are frozen through its agent (qga.rs) while the volume is
//! drained and bookmarked, then resumed and thawed. Whatever fails after
//! the freeze, the volume is resumed (if drained here) and the guest
//! thawed: the thaw runs in `Frozen::thaw`, or in its `Drop` on a panic,
//! with SIGINT, SIGTERM and SIGHUP held until then and until the outcome
//! is shown.
//! `freeze` and `Frozen` are also rewind-blk's, for its scheduled
//! bookmarks (vhost-blk/src/schedule.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rewind_journal::PointInTime;
use serde_json::{json, Value};

use crate::group::{self, Report};
use crate::qga::{Agent, QgaError};
use crate::{request, CtlError};

/// How to quiesce: each agent call and the drain wait at most `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub timeout: Duration,
    /// Without an agent that answers, or with a freeze refused, take a
    /// crash-consistent bookmark instead of failing.
    pub fallback: bool,
}

/// What to tell the operator when a thaw failed.
pub fn thaw_advice(agent: &Path, e: &QgaError) -> String {
    format!(
        "THE GUEST MAY STILL BE FROZEN (its writes wait): thawing its filesystems failed: {e}. \
         Run guest-fsfreeze-thaw through the agent now: `virsh qemu-agent-command DOMAIN \
         '{{\"execute\":\"guest-fsfreeze-thaw\"}}'`, or `printf '%s\\n' \
         '{{\"execute\":\"guest-fsfreeze-thaw\"}}' | socat - UNIX-CONNECT:{}`; \
         guest-fsfreeze-status must then answer \"thawed\"",
        agent.display()
    )
}

/// A guest whose filesystems this process froze. `thaw` thaws them and
/// says how; dropped without it (a panic), it thaws them anyway.
#[derive(Debug)]
pub struct Frozen {
    agent: Agent,
    /// When the freeze's answer came.
    since: Instant,
    /// The freeze failed or timed out: the channel may hold its late
    /// answer, and the guest may be frozen or not.
    uncertain: bool,
    thawed: bool,
}

/// How the thaw went.
#[derive(Debug)]
pub struct Thawed {
    /// From the freeze's answer to the thaw's.
    pub frozen: Duration,
    pub result: Result<u64, QgaError>,
}

impl Frozen {
    pub fn thaw(mut self) -> Thawed {
        self.thawed = true;
        let result = if self.uncertain {
            self.agent.resync_and_thaw()
        } else {
            self.agent.thaw()
        };
        Thawed {
            frozen: self.since.elapsed(),
            result,
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            if let Err(e) = self.agent.resync_and_thaw() {
                eprintln!("rewindctl: {}", thaw_advice(self.agent.path(), &e));
            }
        }
    }
}

/// Why a guest could not be frozen; when thawing it afterwards failed
/// too, what to do about that.
#[derive(Debug)]
pub struct NotFrozen {
    pub why: String,
    pub thaw_failed: Option<String>,
}

impl NotFrozen {
    fn unreachable(agent: &Path, e: &QgaError) -> NotFrozen {
        NotFrozen {
            why: format!("{}: {e}", agent.display()),
            thaw_failed: None,
        }
    }
}

/// Connects to the guest agent at `path` and freezes the guest: the
/// guard, the number of filesystems frozen, how long the freeze took.
/// When the freeze fails the guest is thawed (it may have been half
/// done, or may still finish).
pub fn freeze(path: &Path, timeout: Duration) -> Result<(Frozen, u64, Duration), NotFrozen> {
    let agent = Agent::connect(path, timeout).map_err(|e| NotFrozen::unreachable(path, &e))?;
    let started = Instant::now();
    let mut frozen = Frozen {
        agent,
        since: started,
        uncertain: false,
        thawed: false,
    };
    match frozen.agent.freeze() {
        Ok(count) => {
            frozen.since = Instant::now();
            Ok((frozen, count, started.elapsed()))
        }
        Err(e) => {
            frozen.uncertain = true;
            let thaw_failed = frozen.thaw().result.err().map(|t| thaw_advice(path, &t));
            let thawed = if thaw_failed.is_none() {
                "; thawed the guest"
            } else {
                ""
            };
            Err(NotFrozen {
                why: format!("{}: {e}{thawed}", path.display()),
                thaw_failed,
            })
        }
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Why no bookmark should be attempted (before anything is frozen): the
/// name is not one, the volume is a replica, or the name is taken.
fn precheck(control: &Path, name: &str) -> Result<(), CtlError> {
    PointInTime::bookmark(name).map_err(CtlError::Usage)?;
    let status = request(control, "status", Value::Null, &mut |_, _| {})?;
    if status.get("role").and_then(Value::as_str) == Some("replica") {
        return Err(CtlError::Refused(
            "this volume is a replica; bookmark its primary".into(),
        ));
    }
    let timeline = request(control, "timeline", Value::Null, &mut |_, _| {})?;
    let taken = timeline
        .get("bookmarks")
        .and_then(Value::as_array)
        .is_some_and(|b| b.iter().any(|b| b.get("name") == Some(&json!(name))));
    if taken {
        return Err(CtlError::Refused(format!(
            "a bookmark named {name:?} already exists"
        )));
    }
    Ok(())
}

/// Drains the volume, bookmarks it, and resumes it if this drain closed
/// it, whatever failed.
fn drained_bookmark(
    control: &Path,
    name: &str,
    app_consistent: bool,
    timeout: Duration,
) -> Result<Value, CtlError> {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let quiet = &mut |_, _| {};
    let drain = request(control, "drain", json!({ "timeout_ms": timeout_ms }), quiet)?;
    let arguments = group::bookmark_arguments(name, app_consistent);
    let mark = request(control, "bookmark", arguments, quiet);
    if drain.get("already_drained") == Some(&Value::Bool(true)) {
        return mark;
    }
    match (mark, request(control, "resume", Value::Null, quiet)) {
        (mark, Ok(_)) => mark,
        (Ok(mark), Err(e)) => Err(CtlError::Usage(format!(
            "bookmarked at lsn {}, but resume failed: {e}; the volume stays drained (run \
             `rewindctl resume`)",
            mark.get("lsn").unwrap_or(&Value::Null)
        ))),
        (Err(why), Err(e)) => Err(CtlError::Usage(format!(
            "{why}; resume failed too: {e}; the volume stays drained (run `rewindctl resume`)"
        ))),
    }
}

/// What a quiesced bookmark did: the daemon's answer with the freeze's
/// timings, or with why it fell back; and the error to exit with
/// (after showing the answer) when the thaw failed.
#[derive(Debug)]
pub struct Outcome {
    pub result: Value,
    pub thaw_failed: Option<String>,
}

fn not_quiesced(why: &str, thaw_failed: Option<&str>) -> CtlError {
    CtlError::Usage(format!(
        "no application-consistent bookmark: {why} (nothing was bookmarked; \
         --fallback-crash-consistent takes a crash-consistent one instead){}",
        thaw_failed.map(|t| format!("; {t}")).unwrap_or_default()
    ))
}

/// `bookmark NAME --quiesce --qga AGENT`; SIGINT, SIGTERM and SIGHUP
/// are held from the freeze until it returns.
pub fn bookmark(
    control: &Path,
    agent: &Path,
    name: &str,
    options: Options,
) -> Result<Outcome, CtlError> {
    bookmark_holding(control, agent, name, options, &mut None)
}

/// [`bookmark`], the signals held in `held` from the freeze on: the
/// caller drops it once it has shown the outcome (a thaw that failed says
/// what to run).
pub fn bookmark_holding(
    control: &Path,
    agent: &Path,
    name: &str,
    options: Options,
    held: &mut Option<HeldSignals>,
) -> Result<Outcome, CtlError> {
    precheck(control, name)?;
    *held = Some(HeldSignals::hold());
    let (frozen, filesystems, freeze_took) = match freeze(agent, options.timeout) {
        Ok(frozen) => frozen,
        Err(NotFrozen { why, thaw_failed }) => {
            if !options.fallback {
                return Err(not_quiesced(&why, thaw_failed.as_deref()));
            }
            let mut result = drained_bookmark(control, name, false, options.timeout)?;
            result["fallback"] = json!(why);
            return Ok(Outcome {
                result,
                thaw_failed,
            });
        }
    };
    let mark = drained_bookmark(control, name, true, options.timeout);
    let thawed = frozen.thaw();
    let thaw_failed = thawed.result.as_ref().err().map(|e| thaw_advice(agent, e));
    let mut result = match (mark, &thaw_failed) {
        (Ok(result), _) => result,
        (Err(e), None) => return Err(e),
        (Err(e), Some(advice)) => return Err(CtlError::Usage(format!("{e}; {advice}"))),
    };
    result["frozen_filesystems"] = json!(filesystems);
    result["agent_freeze_ms"] = json!(millis(freeze_took));
    result["frozen_ms"] = json!(millis(thawed.frozen));
    Ok(Outcome {
        result,
        thaw_failed,
    })
}

/// `bookmark NAME --quiesce` on a group: `members[i]`'s guest agent is
/// `agents[i]`. Every guest is frozen, then every member drained and
/// bookmarked (as a plain group bookmark), resumed, and every guest
/// thawed, whatever failed. Signals are held in `held` as by [`bookmark_holding`].
pub fn group_bookmark(
    members: &[PathBuf],
    agents: &[PathBuf],
    name: &str,
    options: Options,
    held: &mut Option<HeldSignals>,
) -> Result<Report, CtlError> {
    if agents.len() != members.len() {
        return Err(CtlError::Usage(format!(
            "{} control sockets but {} --qga sockets: give one --qga per --control, in the \
             same order",
            members.len(),
            agents.len()
        )));
    }
    for member in members {
        precheck(member, name)?;
    }
    *held = Some(HeldSignals::hold());
    let frozen = group::each(agents, |a| freeze(a, options.timeout));
    if frozen.iter().any(Result::is_err) {
        // Thaw those that froze before anything else.
        let (frozen, failed): (Vec<_>, Vec<_>) = frozen.into_iter().partition(Result::is_ok);
        let thaws = group::each_owned(frozen.into_iter().flatten().collect(), |(f, _, _)| {
            let path = f.agent.path().to_owned();
            f.thaw().result.err().map(|e| thaw_advice(&path, &e))
        });
        let failed: Vec<NotFrozen> = failed.into_iter().filter_map(Result::err).collect();
        let why: Vec<&str> = failed.iter().map(|f| f.why.as_str()).collect();
        let why = why.join("; ");
        let thaw_failed: Vec<String> = failed
            .into_iter()
            .filter_map(|f| f.thaw_failed)
            .chain(thaws.into_iter().flatten())
            .collect();
        let thaw_failed = (!thaw_failed.is_empty()).then(|| thaw_failed.join("; "));
        if !options.fallback {
            return Err(not_quiesced(&why, thaw_failed.as_deref()));
        }
        let mut report = group::bookmark(members, name, false, options.timeout);
        for o in &mut report.outcomes {
            if let Ok(result) = &mut o.result {
                result["fallback"] = json!(why);
            }
        }
        report.stopped = thaw_failed;
        return Ok(report);
    }
    let frozen: Vec<_> = frozen.into_iter().flatten().collect();
    let mut report = group::bookmark(members, name, true, options.timeout);
    let thaws = group::each_owned(frozen, |(f, count, took)| (f.thaw(), count, took));
    for ((o, agent), (thawed, count, took)) in report.outcomes.iter_mut().zip(agents).zip(thaws) {
        if let Err(e) = &thawed.result {
            let advice = thaw_advice(agent, e);
            o.result = Err(match &o.result {
                Ok(mark) => format!(
                    "bookmarked at lsn {}, but {advice}",
                    mark.get("lsn").unwrap_or(&Value::Null)
                ),
                Err(e) => format!("{e}; {advice}"),
            });
        } else if let Ok(result) = &mut o.result {
            result["frozen_filesystems"] = json!(count);
            result["agent_freeze_ms"] = json!(millis(took));
            result["frozen_ms"] = json!(millis(thawed.frozen));
        }
    }
    Ok(report)
}

/// Holds SIGINT, SIGTERM and SIGHUP while it lives (a Ctrl-C would leave
/// the guest frozen, or kill rewindctl before it says how to thaw it);
/// they are delivered when it is dropped, once the outcome is shown.
/// Threads started meanwhile hold them too.
#[derive(Debug)]
pub struct HeldSignals(libc::sigset_t);

impl HeldSignals {
    fn hold() -> HeldSignals {
        // SAFETY: sigset_t is plain data that sigemptyset initializes, and
        // pthread_sigmask only reads `held` and writes `old`.
        unsafe {
            let mut held: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut held);
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut held, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &held, &mut old);
            HeldSignals(old)
        }
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask `hold` saved.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}
