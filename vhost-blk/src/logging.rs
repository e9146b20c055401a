//! The daemon's log on stderr: text for people, or one JSON object per line
//! (`--log-format json`) for journald and Loki pipelines. The level comes
//! from `RUST_LOG` (default `info`). Warnings and errors an operator acts on
//! carry `event` (a name from [`rewind_journal::events`]) and `volume`.

use std::fmt::Display;
use std::io::IsTerminal;

use rewind_journal::events;
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL target: message field=value ...` lines.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`
    /// and the event's fields (`event`, `volume`, ...) beside them.
    Json,
}

/// Sets the process's logger.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // No colour codes where stderr goes to journald or a file.
    let ansi = std::io::stderr().is_terminal();
    // `init` also forwards the `log` crate's records (rustls logs through it).
    subscriber(format, filter, ansi, std::io::stderr).init();
}

/// Reports the error `rewind-blk` exits with: a log event in JSON, so that
/// every line of stderr parses; the plain `rewind-blk: ...` line otherwise.
pub fn fatal(format: LogFormat, error: &dyn Display) {
    match format {
        LogFormat::Text => eprintln!("rewind-blk: {error}"),
        LogFormat::Json => {
            tracing::error!(event = events::DAEMON_FAILED, "rewind-blk: {error}")
        }
    }
}

fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        // Fields at the top level, where log pipelines look for labels.
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use serde_json::Value;

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    fn logged(format: LogFormat) -> String {
        let buffer = Buffer::default();
        let subscriber = subscriber(format, EnvFilter::new("info"), false, buffer.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("filtered out");
            tracing::info!(lsn = 7, "a line without an event");
            tracing::warn!(
                event = events::CLIENT_REFUSED,
                volume = %"6b3c1f8e-0000-4000-8000-000000000001",
                "client refused: {}",
                "fenced"
            );
        });
        let bytes = buffer.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn json_is_one_object_per_line_with_the_fields_at_the_top() {
        let out = logged(LogFormat::Json);
        let lines: Vec<Value> = out
            .lines()
            .map(|line| serde_json::from_str(line).expect(line))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["message"], "a line without an event");
        assert_eq!(lines[0]["lsn"], 7);
        let warning = &lines[1];
        assert_eq!(warning["level"], "WARN");
        assert_eq!(warning["target"], module_path!());
        assert_eq!(warning["event"], "client_refused");
        assert_eq!(warning["volume"], "6b3c1f8e-0000-4000-8000-000000000001");
        assert_eq!(warning["message"], "client refused: fenced");
        let timestamp = warning["timestamp"].as_str().expect("a timestamp");
        assert!(humantime::parse_rfc3339(timestamp).is_ok(), "{timestamp}");
    }

    #[test]
    fn text_keeps_the_message_and_shows_the_fields() {
        let out = logged(LogFormat::Text);
        let warning = out.lines().nth(1).expect("two lines");
        assert!(warning.contains("WARN"), "{warning}");
        assert!(warning.contains("client refused: fenced"), "{warning}");
        assert!(warning.contains("event=\"client_refused\""), "{warning}");
        assert!(!out.contains("filtered out"), "{out}");
    }
}
