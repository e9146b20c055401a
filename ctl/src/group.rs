//! Consistency groups: one command on several daemons at one moment.
//!
//! A group is a list of control sockets (`--control` repeated, or
//! `--group FILE`). A bookmark drains every member before bookmarking any,
//! so no member takes a write between the members' bookmarks; a moment
//! given as a time ago is resolved once, here, so every member gets the
//! same absolute time; a group failover promotes every member, then
//! reverts the ones that hold more than the others to the latest moment
//! every member holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rewind_journal::{format_ns, PointInTime};
use serde_json::{json, Value};

use crate::{request, CtlError};

/// What one member answered, or why it failed.
#[derive(Debug)]
pub struct Outcome {
    pub control: PathBuf,
    pub result: Result<Value, String>,
}

/// The outcomes of a group command, one per member in the group's order,
/// and why the group as a whole failed, if it did (beyond its members'
/// errors: a group failover that stopped half-way).
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub stopped: Option<String>,
}

impl Report {
    fn of(members: &[PathBuf], results: Vec<Result<Value, String>>) -> Report {
        Report {
            outcomes: members
                .iter()
                .zip(results)
                .map(|(control, result)| Outcome {
                    control: control.clone(),
                    result,
                })
                .collect(),
            stopped: None,
        }
    }

    /// Every member succeeded and the group command ran to its end.
    pub fn succeeded(&self) -> bool {
        self.stopped.is_none() && self.outcomes.iter().all(|o| o.result.is_ok())
    }

    /// `[{"control": path, "result": ...} or {"control": path, "error": ...}]`.
    pub fn to_json(&self) -> Value {
        self.outcomes
            .iter()
            .map(|o| match &o.result {
                Ok(result) => json!({"control": o.control, "result": result}),
                Err(error) => json!({"control": o.control, "error": error}),
            })
            .collect()
    }

    /// Each member's answer under a `== CONTROL` line, shown by `show`.
    pub fn table(&self, show: fn(&Value) -> String) -> String {
        let mut out = String::new();
        for o in &self.outcomes {
            out.push_str(&format!("== {}\n", o.control.display()));
            match &o.result {
                Ok(result) => out.push_str(&show(result)),
                Err(error) => out.push_str(&format!("error  {error}\n")),
            }
        }
        out
    }

    /// One line saying which members failed (and why the group stopped).
    pub fn failure(&self) -> Option<String> {
        let failed: Vec<String> = self
            .outcomes
            .iter()
            .filter(|o| o.result.is_err())
            .map(|o| o.control.display().to_string())
            .collect();
        match (&self.stopped, failed.is_empty()) {
            (Some(why), _) => Some(why.clone()),
            (None, true) => None,
            (None, false) => Some(format!(
                "{} of {} members failed: {}",
                failed.len(),
                self.outcomes.len(),
                failed.join(", ")
            )),
        }
    }
}

/// The group's control sockets: every `--control`, then those `file`
/// lists (one path a line; blank lines and lines starting with `#` are
/// skipped; a relative path is relative to the file's directory).
pub fn members(controls: &[PathBuf], file: Option<&Path>) -> Result<Vec<PathBuf>, CtlError> {
    let mut members = controls.to_vec();
    if let Some(file) = file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            CtlError::Usage(format!(
                "cannot read the group file {}: {e}",
                file.display()
            ))
        })?;
        let dir = file.parent().unwrap_or(Path::new(""));
        members.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(|line| dir.join(line)),
        );
    }
    if members.is_empty() {
        return Err(CtlError::Usage(match file {
            Some(file) => format!("the group file {} lists no control socket", file.display()),
            None => "--control PATH is needed: the daemon's control socket".into(),
        }));
    }
    for (i, member) in members.iter().enumerate() {
        if members[..i].contains(member) {
            return Err(CtlError::Usage(format!(
                "{} is in the group twice",
                member.display()
            )));
        }
    }
    Ok(members)
}

/// `at` as every member should get it: a time ago becomes the absolute
/// time it means now (RFC 3339, to the nanosecond), so all members agree;
/// a time or a bookmark (which a group bookmark gave every member) stays.
/// An lsn or a branch is refused: those are one volume's.
pub fn resolve_at(at: &str, now: SystemTime) -> Result<String, CtlError> {
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    match at.parse::<PointInTime>().map_err(CtlError::Usage)? {
        PointInTime::Bookmark(_) => Ok(at.trim().to_owned()),
        point @ (PointInTime::Time(_) | PointInTime::Ago(_)) => point
            .timestamp(now_ns)
            .map(format_ns)
            .ok_or_else(|| CtlError::Usage(format!("{at} is before 1970"))),
        _ => Err(CtlError::Usage(format!(
            "{at} names a moment of one volume; a group takes a time or a bookmark"
        ))),
    }
}

/// Runs `f` on every item at once; the results in the items' order.
pub(crate) fn each<I: Sync, T: Send>(items: &[I], f: impl Fn(&I) -> T + Sync) -> Vec<T> {
    each_owned(items.iter().collect(), f)
}

/// As `each`, for items `f` takes (frozen guests, quiesce.rs).
pub(crate) fn each_owned<I: Send, T: Send>(items: Vec<I>, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let f = &f;
        let running: Vec<_> = items
            .into_iter()
            .map(|i| scope.spawn(move || f(i)))
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

fn ask(control: &Path, command: &str, arguments: Value) -> Result<Value, String> {
    request(control, command, arguments, &mut |_, _| {}).map_err(|e| e.to_string())
}

fn statuses(members: &[PathBuf]) -> Vec<Result<Value, String>> {
    each(members, |m| {
        ask(m, "status", Value::Null).map_err(|e| format!("status: {e}"))
    })
}

fn field<'a>(value: &'a Value, name: &str) -> Option<&'a str> {
    value.get(name).and_then(Value::as_str)
}

/// The members whose item (status, answer...) satisfies `pick`.
fn members_where<'a, T>(
    members: &'a [PathBuf],
    items: &[T],
    pick: impl Fn(&T) -> bool,
) -> Vec<&'a PathBuf> {
    members
        .iter()
        .zip(items)
        .filter(|(_, item)| pick(item))
        .map(|(m, _)| m)
        .collect()
}

fn names(members: &[&PathBuf]) -> String {
    let names: Vec<String> = members.iter().map(|m| m.display().to_string()).collect();
    names.join(", ")
}

/// Sends the same request to every member at once.
pub fn same(members: &[PathBuf], command: &str, arguments: &Value) -> Report {
    Report::of(
        members,
        each(members, |m| ask(m, command, arguments.clone())),
    )
}

/// Bookmarks every member at one moment: drains every member (each
/// waiting at most `drain_timeout` for its requests in flight), bookmarks
/// each once all are drained, then resumes the members it drained (a
/// member drained before stays drained), whatever failed. If a drain
/// fails, no member is bookmarked. `app_consistent`: the caller froze
/// every member's guest meanwhile (quiesce.rs).
pub fn bookmark(
    members: &[PathBuf],
    name: &str,
    app_consistent: bool,
    drain_timeout: Duration,
) -> Report {
    let timeout_ms = u64::try_from(drain_timeout.as_millis()).unwrap_or(u64::MAX);
    // A replica refuses the bookmark, and its resume too: it would be
    // left drained. Find out before draining anything.
    let statuses = statuses(members);
    let blocked = members_where(
        members,
        &statuses,
        |s| !matches!(s, Ok(s) if field(s, "role") != Some("replica")),
    );
    if !blocked.is_empty() {
        let results = statuses
            .into_iter()
            .map(|s| match s {
                Err(e) => Err(e),
                Ok(s) if field(&s, "role") == Some("replica") => {
                    Err("a replica takes no bookmark: bookmark its primary".into())
                }
                Ok(_) => Err(format!(
                    "not bookmarked: {} cannot be (nothing was drained)",
                    names(&blocked)
                )),
            })
            .collect();
        return Report::of(members, results);
    }
    let drains = each(members, |m| {
        ask(m, "drain", json!({ "timeout_ms": timeout_ms }))
    });
    let undrained = members_where(members, &drains, Result::is_err);
    let marks: Vec<Option<Result<Value, String>>> = if undrained.is_empty() {
        each(members, |m| {
            Some(ask(m, "bookmark", bookmark_arguments(name, app_consistent)))
        })
    } else {
        members.iter().map(|_| None).collect()
    };
    // Resume exactly the members this drain closed.
    let ours: Vec<(&PathBuf, bool)> = members
        .iter()
        .zip(&drains)
        .map(|(m, d)| {
            let closed_here =
                matches!(d, Ok(d) if d.get("already_drained") != Some(&Value::Bool(true)));
            (m, closed_here)
        })
        .collect();
    let resumes = each(&ours, |(m, closed_here)| {
        closed_here.then(|| ask(m, "resume", Value::Null))
    });
    let results = drains
        .into_iter()
        .zip(marks)
        .zip(resumes)
        .map(|((drain, mark), resume)| {
            let mark = match (drain, mark) {
                (Err(e), _) => Err(format!("drain: {e}")),
                (Ok(_), None) => Err(format!(
                    "not bookmarked: {} could not be drained",
                    names(&undrained)
                )),
                (Ok(_), Some(Err(e))) => Err(format!("bookmark: {e}")),
                (Ok(_), Some(Ok(mark))) => Ok(mark),
            };
            match (mark, resume) {
                (mark, None | Some(Ok(_))) => mark,
                (Ok(mark), Some(Err(e))) => Err(format!(
                    "bookmarked at lsn {}, but resume failed: {e}; the volume stays drained \
                     (run `rewindctl resume`)",
                    mark.get("lsn").unwrap_or(&Value::Null)
                )),
                (Err(why), Some(Err(e))) => Err(format!(
                    "{why}; resume failed too: {e}; the volume stays drained \
                     (run `rewindctl resume`)"
                )),
            }
        })
        .collect();
    Report::of(members, results)
}

/// The `bookmark` request's arguments; `app_consistent` only when true,
/// which daemons older than the flag would refuse.
pub(crate) fn bookmark_arguments(name: &str, app_consistent: bool) -> Value {
    match app_consistent {
        true => json!({ "name": name, "app_consistent": true }),
        false => json!({ "name": name }),
    }
}

/// Each member's path in `dir`: `<volume uuid>.<extension>` (the uuid from
/// `status`). Fails if two members serve the same volume (a primary and
/// its replica): their files would collide.
fn paths_by_volume(
    members: &[PathBuf],
    dir: &Path,
    extension: &str,
) -> Result<Vec<Result<PathBuf, String>>, CtlError> {
    let paths: Vec<Result<PathBuf, String>> = statuses(members)
        .into_iter()
        .map(|s| {
            let s = s?;
            let uuid = field(&s, "volume").ok_or("status: no volume uuid in the answer")?;
            Ok(dir.join(format!("{uuid}.{extension}")))
        })
        .collect();
    let mut seen = BTreeMap::new();
    for (member, path) in members.iter().zip(&paths) {
        if let Ok(path) = path {
            if let Some(other) = seen.insert(path.clone(), member) {
                return Err(CtlError::Usage(format!(
                    "{} and {} serve the same volume; a group holds each volume once",
                    other.display(),
                    member.display()
                )));
            }
        }
    }
    Ok(paths)
}

/// Writes every member's disk at `at` (resolved once) to
/// `dir/<volume uuid>.img`, one member after the other; `dir` is created
/// if missing. `progress(control, done, total)` follows each image.
pub fn materialize(
    members: &[PathBuf],
    at: &str,
    dir: &Path,
    progress: &mut dyn FnMut(&Path, u64, u64),
) -> Result<Report, CtlError> {
    let at = resolve_at(at, SystemTime::now())?;
    // The daemons resolve paths from their own working directories.
    let dir = crate::absolute(dir)?;
    std::fs::create_dir_all(&dir).map_err(|source| CtlError::Local {
        doing: "create the output directory",
        path: dir.clone(),
        source,
    })?;
    let outputs = paths_by_volume(members, &dir, "img")?;
    let results = members
        .iter()
        .zip(outputs)
        .map(|(m, output)| {
            let arguments = json!({ "at": at, "output": output? });
            request(m, "materialize", arguments, &mut |done, total| {
                progress(m, done, total)
            })
            .map_err(|e| e.to_string())
        })
        .collect();
    Ok(Report::of(members, results))
}

/// Serves every member's disk at `at` (resolved once) on
/// `dir/<volume uuid>.sock`.
pub fn export(
    members: &[PathBuf],
    at: &str,
    dir: &Path,
    scratch: bool,
) -> Result<Report, CtlError> {
    let at = resolve_at(at, SystemTime::now())?;
    let dir = crate::absolute(dir)?;
    let sockets = paths_by_volume(members, &dir, "sock")?;
    let jobs: Vec<_> = members.iter().zip(sockets).collect();
    let results = each(&jobs, |(m, socket)| {
        let socket = socket.clone()?;
        ask(
            m,
            "export",
            json!({ "at": at, "socket_path": socket, "scratch": scratch }),
        )
    });
    Ok(Report::of(members, results))
}

/// Ends the exports a group `export` made in `dir`.
pub fn unexport(members: &[PathBuf], dir: &Path) -> Result<Report, CtlError> {
    let dir = crate::absolute(dir)?;
    let sockets = paths_by_volume(members, &dir, "sock")?;
    let jobs: Vec<_> = members.iter().zip(sockets).collect();
    let results = each(&jobs, |(m, socket)| {
        ask(m, "unexport", json!({ "socket_path": socket.clone()? }))
    });
    Ok(Report::of(members, results))
}

/// Why a member cannot be reverted now (it must be drained or fenced,
/// with no client attached, as for a single revert), or None.
fn revert_blocker(status: &Result<Value, String>) -> Option<String> {
    let status = match status {
        Ok(status) => status,
        Err(e) => return Some(e.clone()),
    };
    match field(status, "state") {
        Some("drained" | "fenced") => {}
        state => {
            return Some(format!(
                "the volume is {}; a group revert needs every member drained: \
                 run `rewindctl drain` on the group first",
                state.unwrap_or("in an unknown state")
            ))
        }
    }
    match status.get("attached") {
        None | Some(Value::Null) => None,
        Some(_) => Some("a client is attached; shut the VM down before reverting its disk".into()),
    }
}

/// Reverts every member to `at` (resolved once). Every member must be
/// drained or fenced with no client attached; otherwise none is reverted.
pub fn revert(members: &[PathBuf], at: &str) -> Result<Report, CtlError> {
    let at = resolve_at(at, SystemTime::now())?;
    let blockers: Vec<Option<String>> = statuses(members).iter().map(revert_blocker).collect();
    let blocked = members_where(members, &blockers, Option::is_some);
    if !blocked.is_empty() {
        let results = blockers
            .into_iter()
            .map(|b| {
                Err(b.unwrap_or_else(|| {
                    format!(
                        "not reverted: {} cannot be (nothing was reverted)",
                        names(&blocked)
                    )
                }))
            })
            .collect();
        return Ok(Report::of(members, results));
    }
    Ok(Report::of(
        members,
        each(members, |m| ask(m, "revert", json!({ "at": at }))),
    ))
}

/// The time, in ns, of the newest record a promoted member held from its
/// old primary (its `failover` answer says it); None when it held none
/// (its disk is the same at every moment).
fn held_through_ns(promoted: &Value) -> Result<Option<u64>, String> {
    match promoted.get("held_through_time") {
        None => Err(
            "the failover answer has no held_through_time: the daemon is too old for a group \
             failover"
                .into(),
        ),
        Some(Value::Null) => Ok(None),
        Some(Value::String(time)) => match time.parse::<PointInTime>() {
            Ok(PointInTime::Time(ns)) => Ok(Some(ns)),
            _ => Err(format!(
                "failover: held_through_time {time:?} is not an RFC 3339 time"
            )),
        },
        Some(other) => Err(format!("failover: held_through_time {other} is not a time")),
    }
}

/// Fails the whole group over: promotes each member in turn, drained
/// (`failover` with `drained`: each seals its old primary, or with
/// `force` takes what it holds); stops at the first member that fails.
/// Then T* = the earliest of the times each member held its old primary's
/// history through (the latest moment every member holds; the records
/// of the promotion itself come after it); each member holding records
/// after T* is
/// reverted to T* (a revert record: nothing is lost); then every member
/// resumes, unless `leave_drained`. A failure after a promotion leaves
/// every promoted member drained, for the operator to decide.
pub fn failover(
    members: &[PathBuf],
    force: bool,
    timeout: Duration,
    leave_drained: bool,
) -> Report {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let arguments = json!({ "force": force, "timeout_ms": timeout_ms, "drained": true });
    let mut promoted: Vec<Value> = Vec::new();
    for (i, member) in members.iter().enumerate() {
        match ask(member, "failover", arguments.clone()) {
            Ok(result) => promoted.push(result),
            Err(e) => {
                let mut results: Vec<Result<Value, String>> = promoted
                    .into_iter()
                    .map(|mut r| {
                        r["state"] = json!("drained");
                        Ok(r)
                    })
                    .collect();
                results.push(Err(format!("failover: {e}")));
                results.extend(members[i + 1..].iter().map(|_| {
                    Err(format!(
                        "not attempted: the group failover stopped at {}",
                        member.display()
                    ))
                }));
                let stopped = stopped_message(
                    &format!("the failover of {} failed", member.display()),
                    &members[..i],
                );
                return Report {
                    stopped: Some(stopped),
                    ..Report::of(members, results)
                };
            }
        }
    }
    let stop = |results: Vec<Result<Value, String>>, why: String| Report {
        stopped: Some(stopped_message(&why, members)),
        ..Report::of(members, results)
    };
    let times: Vec<Result<Option<u64>, String>> = promoted.iter().map(held_through_ns).collect();
    if times.iter().any(Result::is_err) {
        let results = drained(&promoted, times.iter().map(|t| t.as_ref().err().cloned()));
        return stop(
            results,
            "a promoted member did not say how far it held its old primary".into(),
        );
    }
    let times: Vec<Option<u64>> = times.into_iter().map(|t| t.unwrap_or(None)).collect();
    let t_star = times.iter().flatten().min().copied();
    let jobs: Vec<(&PathBuf, Option<String>)> = members
        .iter()
        .zip(&times)
        .map(|(m, t)| match (t, t_star) {
            (Some(t), Some(star)) if *t > star => (m, Some(format_ns(star))),
            _ => (m, None),
        })
        .collect();
    let reverts = each(&jobs, |(m, to)| {
        to.as_ref().map(|at| ask(m, "revert", json!({ "at": at })))
    });
    if reverts.iter().any(|r| matches!(r, Some(Err(_)))) {
        let errors = reverts.iter().map(|r| {
            r.as_ref()
                .and_then(|r| r.as_ref().err())
                .map(|e| format!("revert: {e}"))
        });
        return stop(
            drained(&promoted, errors),
            "a member could not be reverted to the group's common moment".into(),
        );
    }
    let resumes: Vec<Option<Result<Value, String>>> = if leave_drained {
        members.iter().map(|_| None).collect()
    } else {
        each(members, |m| Some(ask(m, "resume", Value::Null)))
    };
    let results = promoted
        .into_iter()
        .zip(jobs)
        .zip(reverts)
        .zip(resumes)
        .map(|(((mut result, (_, to)), revert), resume)| {
            result["reverted_to"] = json!(to);
            result["revert"] = revert.and_then(Result::ok).unwrap_or(Value::Null);
            match resume {
                None => result["state"] = json!("drained"),
                Some(Ok(r)) => result["state"] = r.get("state").cloned().unwrap_or(Value::Null),
                Some(Err(e)) => {
                    return Err(format!(
                        "promoted{}, but resume failed: {e}; the volume stays drained \
                         (run `rewindctl resume`)",
                        to.map(|t| format!(" and reverted to {t}"))
                            .unwrap_or_default()
                    ))
                }
            }
            Ok(result)
        })
        .collect();
    Report::of(members, results)
}

/// The promoted members' results marked drained, or their errors.
fn drained(
    promoted: &[Value],
    errors: impl Iterator<Item = Option<String>>,
) -> Vec<Result<Value, String>> {
    promoted
        .iter()
        .zip(errors)
        .map(|(result, error)| match error {
            Some(e) => Err(e),
            None => {
                let mut result = result.clone();
                result["state"] = json!("drained");
                Ok(result)
            }
        })
        .collect()
}

fn stopped_message(why: &str, promoted: &[PathBuf]) -> String {
    let promoted: Vec<&PathBuf> = promoted.iter().collect();
    if promoted.is_empty() {
        format!("the group failover stopped: {why}; no member was promoted")
    } else {
        format!(
            "the group failover stopped: {why}; promoted and left drained: {} \
             (resume them, or demote them)",
            names(&promoted)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_ago_is_resolved_once_to_an_absolute_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_795_000_000_123_456_789);
        let at = resolve_at("-90s", now).expect("resolves");
        assert_eq!(at, format_ns(1_795_000_000_123_456_789 - 90_000_000_000));
        assert_eq!(
            at.parse::<PointInTime>(),
            Ok(PointInTime::Time(1_794_999_910_123_456_789))
        );
        assert_eq!(
            resolve_at("bookmark:pre", now).expect("kept"),
            "bookmark:pre"
        );
        let t = "2026-11-22T19:36:00.5+01:00";
        assert_eq!(resolve_at(t, now).expect("kept"), "2026-11-22T18:36:00.5Z");
        assert!(matches!(resolve_at("lsn:4", now), Err(CtlError::Usage(_))));
        assert!(matches!(resolve_at("soon", now), Err(CtlError::Usage(_))));
    }

    #[test]
    fn group_files_list_sockets_relative_to_themselves() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("vm1.group");
        std::fs::write(&file, "# the disks of vm1\n a.ctl \n\n/run/b.ctl\n").expect("write");
        let members = members(&[PathBuf::from("/x.ctl")], Some(&file)).expect("members");
        assert_eq!(
            members,
            [
                PathBuf::from("/x.ctl"),
                dir.path().join("a.ctl"),
                PathBuf::from("/run/b.ctl")
            ]
        );
        std::fs::write(&file, "a.ctl\na.ctl\n").expect("write");
        let twice = super::members(&[], Some(&file)).expect_err("twice");
        assert!(twice.to_string().contains("twice"), "{twice}");
        std::fs::write(&file, "# nothing\n").expect("write");
        let empty = super::members(&[], Some(&file)).expect_err("empty");
        assert!(
            empty.to_string().contains("lists no control socket"),
            "{empty}"
        );
    }
}
