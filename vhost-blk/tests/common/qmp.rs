//! A QMP client for the guest tests: QEMU's monitor on a unix socket
//! (`-qmp unix:PATH,server=on,wait=off`), one command at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::wait_until;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects once QEMU listens, and leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Qmp {
        let mut stream = None;
        wait_until("QEMU's QMP socket", Duration::from_secs(60), || {
            stream = UnixStream::connect(path).ok();
            stream.is_some()
        });
        let stream = stream.expect("connected");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let writer = stream.try_clone().expect("clone");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.next();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.run("qmp_capabilities", Value::Null);
        qmp
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QEMU closed its QMP socket");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs `command`; returns its `return` value, or panics with QEMU's
    /// error.
    pub fn run(&mut self, command: &str, arguments: Value) -> Value {
        self.try_run(command, arguments)
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }

    /// Runs `command`; returns its `return` value or QEMU's error.
    pub fn try_run(&mut self, command: &str, arguments: Value) -> Result<Value, Value> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .expect("write to QMP");
        loop {
            let answer = self.next();
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(error) = answer.get("error") {
                return Err(error.clone());
            }
            return Ok(answer["return"].clone());
        }
    }

    /// Polls `query-migrate` until its status is one of `states`; returns
    /// the last answer.
    pub fn wait_migration(&mut self, states: &[&str], limit: Duration) -> Value {
        let mut last = Value::Null;
        wait_until(&format!("migration status {states:?}"), limit, || {
            last = self.run("query-migrate", Value::Null);
            let status = last["status"].as_str().unwrap_or_default();
            assert!(
                status != "failed" || states.contains(&"failed"),
                "the migration failed: {last}"
            );
            states.contains(&status)
        });
        last
    }
}
