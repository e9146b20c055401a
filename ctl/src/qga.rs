//! A client of the QEMU guest agent (qemu-ga) over the Unix socket of the
//! VM's agent channel: a QEMU socket chardev behind a virtio-serial port
//! named `org.qemu.guest_agent.0`. One JSON command a line, one JSON
//! answer each (`{"return": ...}` or `{"error": {"class", "desc"}}`), in
//! order. What an earlier client left unread in the channel is skipped by
//! `guest-sync-delimited`, whose answer follows a 0xFF byte. Every call is
//! bounded by the agent's timeout: the agent's answers are outside data.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The byte the agent sends before its answer to `guest-sync-delimited`,
/// and the one a client sends to reset the agent's parser.
const DELIMITER: u8 = 0xff;
/// Longest answer line taken from the agent.
const MAX_LINE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error(
        "cannot connect to the guest agent's socket {path}: {source} (give --qga the path of \
         the socket chardev of the VM's org.qemu.guest_agent.0 virtio-serial port)"
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "the guest agent did not answer {command} within {timeout:?} (is qemu-ga running in \
         the guest, on its virtio-serial port?)"
    )]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("the guest agent refused {command}: {desc} ({class})")]
    Refused {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("the guest agent closed the connection during {command}")]
    Closed { command: &'static str },
    #[error("the guest agent sent something that is not an answer to {command}: {answer}")]
    BadAnswer {
        command: &'static str,
        answer: String,
    },
    #[error("talking to the guest agent: {0}")]
    Io(#[from] io::Error),
}

/// A connection to one guest agent.
#[derive(Debug)]
pub struct Agent {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    /// Bytes read past the last answer.
    pending: Vec<u8>,
    /// The id of the next `guest-sync-delimited`.
    next_id: u64,
}

impl Agent {
    /// Connects to the agent's socket and resynchronizes the channel; each
    /// step, and every later call, waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Agent, QgaError> {
        let stream = UnixStream::connect(path).map_err(|source| QgaError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_write_timeout(Some(timeout))?;
        let mut agent = Agent {
            stream,
            path: path.to_owned(),
            timeout,
            pending: Vec::new(),
            // Distinct per connection, so a stale answer from an earlier
            // client's sync is never taken for ours.
            next_id: u64::from(std::process::id()) << 32 | u64::from(random_u32()),
        };
        agent.sync()?;
        Ok(agent)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `guest-sync-delimited`: after it, the next line is the answer to the
    /// next command.
    pub fn sync(&mut self) -> Result<(), QgaError> {
        const COMMAND: &str = "guest-sync-delimited";
        let deadline = Instant::now() + self.timeout;
        let id = self.send_sync()?;
        loop {
            self.skip_to_delimiter(COMMAND, deadline)?;
            // An earlier sync's answer (its id differs) may come first.
            if self.answer(COMMAND, deadline)? == json!(id) {
                return Ok(());
            }
        }
    }

    fn send_sync(&mut self) -> Result<u64, QgaError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.clear();
        let mut line = vec![DELIMITER];
        line.extend_from_slice(
            format!(r#"{{"execute":"guest-sync-delimited","arguments":{{"id":{id}}}}}"#).as_bytes(),
        );
        line.push(b'\n');
        self.write(&line, "guest-sync-delimited")?;
        Ok(id)
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen.
    pub fn freeze(&mut self) -> Result<u64, QgaError> {
        self.count("guest-fsfreeze-freeze")
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub fn thaw(&mut self) -> Result<u64, QgaError> {
        self.count("guest-fsfreeze-thaw")
    }

    /// Thaws after a call that failed or timed out, when the channel may
    /// hold a late answer: sends a sync and the thaw together, so the thaw
    /// is queued behind whatever the agent is still doing (a freeze that
    /// takes long) even if its answer does not come in time.
    pub fn resync_and_thaw(&mut self) -> Result<u64, QgaError> {
        const COMMAND: &str = "guest-fsfreeze-thaw";
        let deadline = Instant::now() + self.timeout;
        let id = self.send_sync()?;
        self.write(b"{\"execute\":\"guest-fsfreeze-thaw\"}\n", COMMAND)?;
        loop {
            self.skip_to_delimiter(COMMAND, deadline)?;
            if self.answer(COMMAND, deadline)? == json!(id) {
                break;
            }
        }
        count_of(COMMAND, self.answer(COMMAND, deadline)?)
    }

    /// `guest-fsfreeze-status`: "thawed" or "frozen".
    pub fn freeze_status(&mut self) -> Result<String, QgaError> {
        const COMMAND: &str = "guest-fsfreeze-status";
        match self.call(COMMAND)? {
            Value::String(status) => Ok(status),
            other => Err(QgaError::BadAnswer {
                command: COMMAND,
                answer: other.to_string(),
            }),
        }
    }

    fn count(&mut self, command: &'static str) -> Result<u64, QgaError> {
        let answer = self.call(command)?;
        count_of(command, answer)
    }

    /// Sends `command` (no arguments) and returns its `return` value.
    fn call(&mut self, command: &'static str) -> Result<Value, QgaError> {
        let deadline = Instant::now() + self.timeout;
        self.write(
            format!("{{\"execute\":\"{command}\"}}\n").as_bytes(),
            command,
        )?;
        self.answer(command, deadline)
    }

    fn write(&mut self, bytes: &[u8], command: &'static str) -> Result<(), QgaError> {
        match self.stream.write_all(bytes) {
            Err(e) if is_timeout(&e) => Err(QgaError::Timeout {
                command,
                timeout: self.timeout,
            }),
            other => Ok(other?),
        }
    }

    /// Reads up to and past the next 0xFF; what comes before it is what
    /// the channel held from before.
    fn skip_to_delimiter(
        &mut self,
        command: &'static str,
        deadline: Instant,
    ) -> Result<(), QgaError> {
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == DELIMITER) {
                self.pending.drain(..=at);
                return Ok(());
            }
            self.pending.clear();
            self.fill(command, deadline)?;
        }
    }

    /// The next answer line: its `return` value, or the agent's error.
    fn answer(&mut self, command: &'static str, deadline: Instant) -> Result<Value, QgaError> {
        loop {
            let Some(end) = self.pending.iter().position(|&b| b == b'\n') else {
                if self.pending.len() > MAX_LINE {
                    return Err(QgaError::BadAnswer {
                        command,
                        answer: format!("a line longer than {MAX_LINE} bytes"),
                    });
                }
                self.fill(command, deadline)?;
                continue;
            };
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
            if text.is_empty() {
                continue;
            }
            let bad = || QgaError::BadAnswer {
                command,
                answer: text.chars().take(200).collect(),
            };
            let answer: Value = serde_json::from_str(text).map_err(|_| bad())?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            let error = answer.get("error").ok_or_else(bad)?;
            let field = |k: &str| {
                error
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .to_owned()
            };
            return Err(QgaError::Refused {
                command,
                class: field("class"),
                desc: field("desc"),
            });
        }
    }

    /// Reads what the agent sent, waiting at most until `deadline`.
    fn fill(&mut self, command: &'static str, deadline: Instant) -> Result<(), QgaError> {
        let timeout = QgaError::Timeout {
            command,
            timeout: self.timeout,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout);
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(QgaError::Closed { command }),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e) if is_timeout(&e) => Err(timeout),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn count_of(command: &'static str, answer: Value) -> Result<u64, QgaError> {
    answer.as_u64().ok_or_else(|| QgaError::BadAnswer {
        command,
        answer: answer.to_string(),
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Four random bytes (sync ids need not be secret, only unlikely to repeat).
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    match read {
        Ok(()) => u32::from_le_bytes(b),
        // The clock's nanoseconds do as well.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    }
}
