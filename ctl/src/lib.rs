//! rewindctl: talks to `rewind-blk serve --control-socket` over its
//! line-JSON protocol (version 1: one request line, one answer line).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

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
    Io(#[from] std::io::Error),
    #[error("the daemon sent something that is not a protocol answer: {0}")]
    BadAnswer(String),
    #[error("the daemon refused: {0}")]
    Refused(String),
}

/// Sends `command` and returns the answer's `result`.
pub fn request(control: &Path, command: &str) -> Result<Value, CtlError> {
    let mut stream = UnixStream::connect(control).map_err(|source| CtlError::Connect {
        path: control.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(
        stream,
        "{}",
        json!({"version": PROTOCOL_VERSION, "command": command})
    )?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let answer: Value =
        serde_json::from_str(&line).map_err(|_| CtlError::BadAnswer(line.trim().to_owned()))?;
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

/// A JSON object as aligned `key  value` lines, keys sorted.
pub fn table(value: &Value) -> String {
    let Some(map) = value.as_object() else {
        return format!("{value}\n");
    };
    let width = map.keys().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (key, v) in map {
        let shown = match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        out.push_str(&format!("{key:<width$}  {shown}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_keys_and_show_nulls_as_dashes() {
        let t = table(&json!({"state": "serving", "epoch": 1, "failed": null}));
        assert_eq!(t, "epoch   1\nfailed  -\nstate   serving\n");
    }
}
