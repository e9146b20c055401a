//! rewindctl: talks to `rewind-blk serve --control-socket` over its
//! line-JSON protocol (version 1: one request line; progress lines for
//! long commands, then one answer line). See PROTOCOL.md.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

pub mod cli;
pub mod group;
pub mod qga;
pub mod quiesce;

pub const PROTOCOL_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot connect to {path}: {source} (is `rewind-blk serve --control-socket {path}` running?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(std::io::Error),
    /// Waited for a line past the command's own timeout: progress comes
    /// every few seconds while a long command runs.
    #[error(
        "the daemon did not answer {command} within {seconds} s; it may still be running \
         (see `rewindctl status`)"
    )]
    NoAnswer { command: String, seconds: u64 },
    /// Something on this machine, not the daemon: what was being done to
    /// which path.
    #[error("cannot {doing} {}: {source}", path.display())]
    Local {
        doing: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon sent something that is not a protocol answer: {0}")]
    BadAnswer(String),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Volume(#[from] rewind_journal::Error),
}

/// Writes a raw image of the volume in `dir` (no daemon may be serving it)
/// as it was at `at`, to `output`.
pub fn materialize_offline(
    dir: &Path,
    at: &str,
    output: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value, CtlError> {
    let at: rewind_journal::PointInTime = at.parse().map_err(CtlError::Usage)?;
    let options = rewind_journal::OpenOptions {
        // Only read history: nothing is folded meanwhile.
        fold_interval: None,
        ..rewind_journal::OpenOptions::default()
    };
    let (volume, _) =
        rewind_journal::Volume::open(rewind_journal::OsStorage::shared(), dir, options)?;
    let lsn = volume.materialize(&at, output, progress)?;
    let size = volume.size();
    volume.close()?;
    Ok(json!({"output": output, "lsn": lsn, "size": size}))
}

/// Compares the disk of the daemon at `control` with its replica's (whose
/// control socket is `peer`) at one moment, by BLAKE3 hashes keyed with a
/// fresh random key, chunk by chunk, without writing: `at` (default: the
/// newest lsn the replica acknowledged) is resolved on `control`, and the
/// peer hashes that same lsn. Reports the ranges that differ.
pub fn verify(
    control: &Path,
    peer: &Path,
    at: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value, CtlError> {
    let at = match at {
        Some(at) => at.to_owned(),
        None => {
            let link = request(control, "replication", Value::Null, &mut |_, _| {})?;
            let acked = link
                .get("acked_lsn")
                .and_then(Value::as_u64)
                .ok_or_else(|| CtlError::BadAnswer(format!("no acked_lsn in {link}")))?;
            format!("lsn:{acked}")
        }
    };
    let key = random_key()?;
    let ours = request(
        control,
        "checksums",
        json!({"at": at, "key": key}),
        progress,
    )?;
    let lsn = field(&ours, "lsn")?;
    let theirs = request(
        peer,
        "checksums",
        json!({"at": format!("lsn:{lsn}"), "key": key}),
        progress,
    )?;
    let (a, b) = (hashes(&ours, control)?, hashes(&theirs, peer)?);
    if a.len() != b.len() || ours.get("size") != theirs.get("size") {
        return Err(CtlError::Usage(format!(
            "the two disks differ in size ({} and {} bytes): not a primary and its replica",
            ours.get("size").unwrap_or(&Value::Null),
            theirs.get("size").unwrap_or(&Value::Null)
        )));
    }
    let (size, chunk) = (field(&ours, "size")?, field(&ours, "chunk_bytes")?);
    if chunk == 0
        || size.div_ceil(chunk) != a.len() as u64
        || field(&theirs, "chunk_bytes")? != chunk
    {
        return Err(CtlError::BadAnswer(format!(
            "{} hashes for {size} bytes in chunks of {chunk} bytes, and {} in chunks of {}",
            a.len(),
            b.len(),
            theirs.get("chunk_bytes").unwrap_or(&Value::Null)
        )));
    }
    let mut differing: Vec<(u64, u64)> = Vec::new();
    for (i, _) in a.iter().zip(&b).enumerate().filter(|(_, (x, y))| x != y) {
        // i < size.div_ceil(chunk) (checked above): offset < size.
        let offset = i as u64 * chunk;
        let length = chunk.min(size - offset);
        match differing.last_mut() {
            Some((start, len)) if *start + *len == offset => *len += length,
            _ => differing.push((offset, length)),
        }
    }
    let differing_bytes: u64 = differing.iter().map(|(_, len)| len).sum();
    Ok(json!({
        "lsn": lsn,
        "chunk_bytes": chunk,
        "chunks": a.len(),
        "equal": differing.is_empty(),
        "differing_bytes": differing_bytes,
        "differing": differing
            .iter()
            .map(|&(offset, length)| json!({"offset": offset, "length": length}))
            .collect::<Vec<_>>(),
    }))
}

/// A `checksums` answer's hashes from the daemon at `from`, in order.
fn hashes(answer: &Value, from: &Path) -> Result<Vec<String>, CtlError> {
    let list = answer
        .get("hashes")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            CtlError::BadAnswer(format!("{} answered without hashes", from.display()))
        })?;
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            h.as_str().map(str::to_owned).ok_or_else(|| {
                CtlError::BadAnswer(format!(
                    "{} sent {h} as hash {i}, not a string",
                    from.display()
                ))
            })
        })
        .collect()
}

/// A whole number in a daemon's answer.
fn field(answer: &Value, key: &str) -> Result<u64, CtlError> {
    answer
        .get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| CtlError::BadAnswer(format!("no {key} in {answer}")))
}

/// Polls the daemon's replication link until the replica holds everything
/// written (streaming, no resync, no record it lacks), showing a resync's
/// progress; returns the link's status. Under steady writes without
/// flushes that can take a while: records go out once durable.
/// Fails when the link is outdated (it will not catch up by itself) or
/// after `timeout`.
pub fn wait_streaming(
    control: &Path,
    timeout: Duration,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value, CtlError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let link = request(control, "replication", Value::Null, &mut |_, _| {})?;
        if let Some(resync) = link.get("resync").filter(|r| !r.is_null()) {
            let field = |k: &str| resync.get(k).and_then(Value::as_u64).unwrap_or(0);
            progress(field("done_bytes"), field("total_bytes"));
        }
        match link.get("state").and_then(Value::as_str) {
            Some("streaming")
                if link.get("resync").is_none_or(Value::is_null)
                    && link.get("lag_records").and_then(Value::as_u64) == Some(0) =>
            {
                return Ok(link)
            }
            Some("outdated") => {
                return Err(CtlError::Usage(format!(
                    "the replication link is outdated: {}",
                    link.get("last_error")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given")
                )))
            }
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return Err(CtlError::Usage(format!(
                "the replica did not catch up within {timeout:?}; the link is {}",
                link.get("state").unwrap_or(&Value::Null)
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 32 random bytes as hex, for a keyed hash nobody could prepare for.
fn random_key() -> Result<String, CtlError> {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|source| CtlError::Local {
            doing: "read a random key from",
            path: "/dev/urandom".into(),
            source,
        })?;
    Ok(key.iter().map(|b| format!("{b:02x}")).collect())
}

/// `path` made absolute: the daemon resolves paths from its own working
/// directory.
pub fn absolute(path: &Path) -> Result<PathBuf, CtlError> {
    std::path::absolute(path).map_err(|source| CtlError::Local {
        doing: "make an absolute path of",
        path: path.to_owned(),
        source,
    })
}

/// Sends `command` with `arguments` (a JSON object, or null) and returns
/// the answer's `result`; `progress(done, total)` sees progress lines.
pub fn request(
    control: &Path,
    command: &str,
    arguments: Value,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value, CtlError> {
    request_waiting(control, command, arguments, progress, LINE_WAIT)
}

/// How long to wait for each line beyond a command's own `timeout_ms`
/// (drain and fence answer within it): a long command, once it sent
/// progress, sends a line at least every 5 s however slowly it goes, as
/// every role change does while it waits.
const LINE_WAIT: Duration = Duration::from_secs(60);

fn request_waiting(
    control: &Path,
    command: &str,
    arguments: Value,
    progress: &mut dyn FnMut(u64, u64),
    line_wait: Duration,
) -> Result<Value, CtlError> {
    let mut stream = UnixStream::connect(control).map_err(|source| CtlError::Connect {
        path: control.to_owned(),
        source,
    })?;
    let wait = line_wait.saturating_add(
        arguments
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .map_or(Duration::ZERO, Duration::from_millis),
    );
    stream.set_read_timeout(Some(wait)).map_err(CtlError::Io)?;
    let mut body = json!({"version": PROTOCOL_VERSION, "command": command});
    if let (Some(body), Value::Object(args)) = (body.as_object_mut(), arguments) {
        body.extend(args);
    }
    // A daemon that turns the connection away (too many are open) writes
    // its reason and closes without reading the request: the write may
    // fail, and the reason is still there to read.
    let mut unsent = match writeln!(stream, "{body}") {
        Ok(()) => None,
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => Some(e),
        Err(e) => return Err(CtlError::Io(e)),
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        if let (Ok(0) | Err(_), Some(e)) = (&read, unsent.take()) {
            return Err(CtlError::Io(e));
        }
        match read {
            Ok(0) => {
                return Err(CtlError::BadAnswer(
                    "the daemon closed the connection".into(),
                ))
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(CtlError::NoAnswer {
                    command: command.to_owned(),
                    seconds: wait.as_secs(),
                })
            }
            Err(e) => return Err(CtlError::Io(e)),
        }
        let answer: Value =
            serde_json::from_str(&line).map_err(|_| CtlError::BadAnswer(line.trim().to_owned()))?;
        if let Some(p) = answer.get("progress") {
            let field = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
            progress(field("done"), field("total"));
            continue;
        }
        return result(answer, &line);
    }
}

fn result(answer: Value, line: &str) -> Result<Value, CtlError> {
    match answer.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(answer.get("result").cloned().unwrap_or(Value::Null)),
        Some(false) => Err(CtlError::Refused(
            answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_owned(),
        )),
        None => Err(CtlError::BadAnswer(line.trim().to_owned())),
    }
}

/// A JSON object as aligned `key  value` lines, keys sorted, nested
/// objects as `key.field`; a list of objects (bookmarks) follows as rows
/// under its key, a row's flags last.
pub fn table(value: &Value) -> String {
    let Some(map) = value.as_object() else {
        return format!("{value}\n");
    };
    let mut fields = Vec::new();
    let mut lists = Vec::new();
    flatten("", map, &mut fields, &mut lists);
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, shown) in fields {
        out.push_str(&format!("{key:<width$}  {shown}\n"));
    }
    for (key, rows) in lists {
        out.push_str(&format!(
            "{key}:{}\n",
            if rows.is_empty() { " none" } else { "" }
        ));
        for row in rows {
            let cells: Vec<String> = match row.as_object() {
                // Flags follow the values, by name when set (a bookmark's
                // `app_consistent`), left out when not.
                Some(fields) => fields
                    .values()
                    .filter(|v| !v.is_boolean())
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .chain(
                        fields
                            .iter()
                            .filter(|(_, v)| **v == Value::Bool(true))
                            .map(|(k, _)| k.clone()),
                    )
                    .collect(),
                None => vec![row.to_string()],
            };
            out.push_str(&format!("  {}\n", cells.join("  ")));
        }
    }
    out
}

/// The `branches` answer as a table: one row per branch (name, lsn range,
/// time range, records, bytes, readable).
pub fn branches_table(value: &Value) -> String {
    let branches = match value.get("branches").and_then(Value::as_array) {
        Some(branches) if !branches.is_empty() => branches,
        Some(_) => return "no branches\n".to_owned(),
        None => return table(value),
    };
    let shown = |b: &Value, k: &str| match b.get(k) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let mut rows = vec![[
        "name".to_owned(),
        "lsns".to_owned(),
        "time".to_owned(),
        "records".to_owned(),
        "bytes".to_owned(),
        "readable".to_owned(),
    ]];
    rows.extend(branches.iter().map(|b| {
        [
            shown(b, "name"),
            format!("{}-{}", shown(b, "first_lsn"), shown(b, "last_lsn")),
            format!("{} to {}", shown(b, "first_time"), shown(b, "last_time")),
            shown(b, "records"),
            shown(b, "bytes"),
            shown(b, "readable"),
        ]
    }));
    let mut widths = [0; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Collects `map`'s scalars as (dotted key, shown value) and its lists.
fn flatten<'a>(
    prefix: &str,
    map: &'a serde_json::Map<String, Value>,
    fields: &mut Vec<(String, String)>,
    lists: &mut Vec<(String, &'a Vec<Value>)>,
) {
    for (key, v) in map {
        let key = format!("{prefix}{key}");
        match v {
            Value::Array(rows) => lists.push((key, rows)),
            Value::Object(inner) => flatten(&format!("{key}."), inner, fields, lists),
            Value::String(s) => fields.push((key, s.clone())),
            Value::Null => fields.push((key, "-".to_owned())),
            other => fields.push((key, other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_stays_quiet_is_reported_as_such() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // Takes the request and never answers.
        let quiet = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let err = request_waiting(
            &path,
            "materialize",
            json!({"timeout_ms": 100}),
            &mut |_, _| {},
            Duration::from_millis(900),
        )
        .expect_err("no answer");
        let message = err.to_string();
        assert!(
            message.contains("did not answer materialize within 1 s")
                && message.contains("may still be running"),
            "{message}"
        );
        drop(quiet.join());
    }

    #[test]
    fn tables_align_keys_and_show_nulls_as_dashes() {
        let t = table(&json!({"state": "serving", "epoch": 1, "failed": null}));
        assert_eq!(t, "epoch   1\nfailed  -\nstate   serving\n");
        let t = table(&json!({"last_lsn": 9, "bookmarks": [{"name": "b1", "lsn": 4}]}));
        assert_eq!(t, "last_lsn  9\nbookmarks:\n  4  b1\n");
        let t = table(&json!({"bookmarks": [
            {"name": "b1", "lsn": 4, "app_consistent": false},
            {"name": "b2", "lsn": 6, "app_consistent": true}
        ]}));
        assert_eq!(t, "bookmarks:\n  4  b1\n  6  b2  app_consistent\n");
        let t = table(&json!({"bookmarks": []}));
        assert_eq!(t, "bookmarks: none\n");
        let t = table(&json!({"io": {"completed": 3, "failed": 0}, "state": "drained"}));
        assert_eq!(
            t,
            "io.completed  3\nio.failed     0\nstate         drained\n"
        );
    }
}
