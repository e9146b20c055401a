//! The control socket (`serve --control-socket PATH`).
//!
//! A Unix socket, mode 0600, whose peers must be the daemon's own user or
//! root (SO_PEERCRED). Each request is one line of JSON,
//! `{"version": 1, "command": "..."}`, answered by one line:
//! `{"version": 1, "ok": true, "result": {...}}` or
//! `{"version": 1, "ok": false, "error": "..."}`. Commands so far: `status`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rewind_journal::Volume;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted.
const MAX_LINE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0} exists; remove it or choose another --control-socket path")]
    Exists(PathBuf),
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    version: u32,
    command: String,
}

/// What `status` reports.
#[derive(Debug, Serialize)]
struct Status {
    volume: String,
    size: u64,
    state: &'static str,
    epoch: u64,
    last_lsn: u64,
    durable_lsn: u64,
    /// Bytes the journal pool occupies on disk.
    journal_bytes: u64,
    journal_max: u64,
    segments_used: u64,
    segments_free: u64,
    queues: usize,
    read_only: bool,
    writethrough: bool,
    failed: Option<String>,
}

/// What the control socket serves.
#[derive(Debug)]
pub struct Control {
    pub volume: Arc<Volume>,
    pub queues: usize,
    pub read_only: bool,
}

impl Control {
    fn status(&self) -> Status {
        let s = self.volume.stats();
        Status {
            volume: s.uuid.to_string(),
            size: s.size,
            state: if s.failed.is_some() {
                "failed"
            } else {
                "serving"
            },
            epoch: s.epoch,
            last_lsn: s.last_lsn,
            durable_lsn: s.durable_lsn,
            journal_bytes: s.journal_bytes,
            journal_max: s.journal_max,
            segments_used: s.segments_used,
            segments_free: s.segments_free,
            queues: self.queues,
            read_only: self.read_only,
            writethrough: s.writethrough,
            failed: s.failed,
        }
    }

    /// Answers one request line.
    pub fn answer(&self, line: &str) -> Value {
        let request: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => return error(format!("malformed request: {e}")),
        };
        if request.version != PROTOCOL_VERSION {
            return error(format!(
                "protocol version {} is not supported; this daemon speaks version {PROTOCOL_VERSION}",
                request.version
            ));
        }
        match request.command.as_str() {
            "status" => json!({
                "version": PROTOCOL_VERSION,
                "ok": true,
                "result": self.status(),
            }),
            other => error(format!("unknown command {other:?}; known: status")),
        }
    }
}

fn error(message: String) -> Value {
    json!({"version": PROTOCOL_VERSION, "ok": false, "error": message})
}

/// Binds the socket (mode 0600) and serves it on a thread until the process
/// ends. The socket file is removed by [`ControlSocket`]'s drop.
pub fn start(path: &Path, control: Control) -> Result<ControlSocket, ControlError> {
    if path.exists() {
        return Err(ControlError::Exists(path.to_owned()));
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    let control = Arc::new(control);
    std::thread::Builder::new()
        .name("rewind-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let control = control.clone();
                        // One thread per client: requests are few and short.
                        let spawned = std::thread::Builder::new()
                            .name("rewind-control-client".into())
                            .spawn(move || serve_client(stream, &control));
                        if let Err(e) = spawned {
                            tracing::warn!(error = %e, "cannot start a control client thread");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        })
        .map_err(bind_err)?;
    Ok(ControlSocket {
        path: path.to_owned(),
    })
}

/// Removes the control socket file when the daemon stops.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Only the daemon's own user and root may use the socket.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let own = rustix::process::geteuid();
    if cred.uid == own || cred.uid.is_root() {
        Ok(())
    } else {
        Err(format!(
            "uid {} may not use this control socket (only uid {} and root)",
            cred.uid.as_raw(),
            own.as_raw()
        ))
    }
}

fn serve_client(stream: UnixStream, control: &Control) {
    let mut out = match stream.try_clone() {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(error = %e, "control client");
            return;
        }
    };
    if let Err(reason) = peer_allowed(&stream) {
        tracing::warn!("{reason}");
        let _ = writeln!(out, "{}", error(reason));
        return;
    }
    let mut reader = BufReader::new(stream.take(u64::MAX));
    loop {
        let mut line = String::new();
        reader.get_mut().set_limit(MAX_LINE);
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') => {
                let _ = writeln!(
                    out,
                    "{}",
                    error(format!("request longer than {MAX_LINE} bytes"))
                );
                return;
            }
            Ok(_) => {
                let answer = control.answer(line.trim_end());
                if writeln!(out, "{answer}").is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = writeln!(out, "{}", error(format!("unreadable request: {e}")));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> Control {
        Control {
            volume: Arc::new(crate::test_support::volume(8 << 20)),
            queues: 2,
            read_only: false,
        }
    }

    #[test]
    fn status_reports_the_volume() {
        let c = control();
        c.volume.write(0, &[1u8; 4096]).expect("write");
        let a = c.answer(r#"{"version": 1, "command": "status"}"#);
        assert_eq!(a["ok"], true, "{a}");
        let r = &a["result"];
        assert_eq!(
            (r["state"].as_str(), r["last_lsn"].as_u64()),
            (Some("serving"), Some(1))
        );
        assert_eq!(r["size"], 8 << 20);
        assert_eq!(r["queues"], 2);
        assert!(r["journal_bytes"].as_u64().is_some_and(|b| b > 0));
        assert_eq!(r["epoch"], 1);
    }

    #[test]
    fn bad_requests_get_a_clear_error() {
        let c = control();
        for (line, want) in [
            ("{not json", "malformed request"),
            (r#"{"version": 1}"#, "malformed request"),
            (
                r#"{"version": 1, "command": "status", "extra": 1}"#,
                "malformed request",
            ),
            (
                r#"{"version": 2, "command": "status"}"#,
                "protocol version 2",
            ),
            (r#"{"version": 1, "command": "explode"}"#, "unknown command"),
        ] {
            let a = c.answer(line);
            assert_eq!(a["ok"], false, "{line}");
            let message = a["error"].as_str().expect("error message");
            assert!(message.contains(want), "{line}: {message}");
            assert_eq!(a["version"], PROTOCOL_VERSION);
        }
    }
}
