//! A fake QEMU guest agent on a Unix socket: it reads commands as qemu-ga
//! does (a 0xFF byte resets its parser; one JSON command a line), answers
//! `guest-sync-delimited` as qemu-ga does (0xFF, then the id back), and
//! every other command as its script says, or never.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The answer line to a command, or None for no answer at all.
pub type Script = fn(&str) -> Option<String>;

/// What a healthy agent says: two filesystems frozen, then thawed.
pub fn healthy(command: &str) -> Option<String> {
    match command {
        "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => Some(r#"{"return": 2}"#.into()),
        "guest-fsfreeze-status" => Some(r#"{"return": "thawed"}"#.into()),
        _ => Some(r#"{"error": {"class": "CommandNotFound", "desc": "unknown"}}"#.into()),
    }
}

/// An agent whose freeze never answers (a filesystem that hangs in
/// FIFREEZE); everything else answers.
pub fn hangs_in_freeze(command: &str) -> Option<String> {
    match command {
        "guest-fsfreeze-freeze" => None,
        other => healthy(other),
    }
}

/// An agent stuck from its freeze on (its thaw, queued behind, never
/// answers either).
pub fn hangs_from_freeze(command: &str) -> Option<String> {
    match command {
        "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => None,
        other => healthy(other),
    }
}

/// An agent that cannot freeze (a filesystem that does not support it).
pub fn refuses_freeze(command: &str) -> Option<String> {
    match command {
        "guest-fsfreeze-freeze" => Some(
            r#"{"error": {"class": "GenericError", "desc": "failed to freeze /mnt: Operation not supported"}}"#
                .into(),
        ),
        other => healthy(other),
    }
}

/// An agent that froze the guest and cannot thaw it.
pub fn refuses_thaw(command: &str) -> Option<String> {
    match command {
        "guest-fsfreeze-thaw" => Some(
            r#"{"error": {"class": "GenericError", "desc": "failed to thaw /mnt: Input/output error"}}"#
                .into(),
        ),
        other => healthy(other),
    }
}

/// The fake agent: serves connections one after the other, as a QEMU
/// socket chardev does.
pub struct FakeAgent {
    commands: Receiver<String>,
    seen: Vec<String>,
    /// Runs until the test process ends.
    _server: JoinHandle<()>,
}

impl FakeAgent {
    /// Listens on `socket`; `stale` is written to each new connection
    /// first, as answers an earlier client left unread in the channel.
    pub fn start(socket: &Path, script: Script, stale: &'static [u8]) -> FakeAgent {
        let listener = UnixListener::bind(socket).expect("bind the agent socket");
        let (tx, commands) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = conn.write_all(stale);
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while let Ok(1) = conn.read(&mut byte) {
                    match byte[0] {
                        // qemu-ga's parser starts again at 0xFF.
                        0xff => line.clear(),
                        b'\n' => {
                            let request: Value = match serde_json::from_slice(&line) {
                                Ok(v) => v,
                                Err(_) => json!({}),
                            };
                            line.clear();
                            let command = request["execute"].as_str().unwrap_or("").to_owned();
                            let _ = tx.send(command.clone());
                            let answer = match command.as_str() {
                                "guest-sync-delimited" => {
                                    let id = &request["arguments"]["id"];
                                    let mut answer = vec![0xff];
                                    answer.extend(format!("{{\"return\": {id}}}").bytes());
                                    Some(answer)
                                }
                                other => script(other).map(String::into_bytes),
                            };
                            if let Some(mut answer) = answer {
                                answer.push(b'\n');
                                if conn.write_all(&answer).is_err() {
                                    break;
                                }
                            }
                        }
                        b => line.push(b),
                    }
                }
            }
        });
        FakeAgent {
            commands,
            seen: Vec::new(),
            _server: server,
        }
    }

    /// Every command received so far, waiting up to `limit` for `until`
    /// to be among them.
    pub fn commands_until(&mut self, until: &str, limit: Duration) -> &[String] {
        let deadline = Instant::now() + limit;
        while !self.seen.iter().any(|c| c == until) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.commands.recv_timeout(left) {
                Ok(c) => self.seen.push(c),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(c) = self.commands.try_recv() {
            self.seen.push(c);
        }
        &self.seen
    }
}
