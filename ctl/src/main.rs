//! `rewindctl`: see `rewindctl --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rewind_ctl::CtlError;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "rewindctl", version, about = "Control rewind-blk daemons")]
struct Cli {
    /// The daemon's control socket (`rewind-blk serve --control-socket`).
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Points in time (`--at`): an RFC 3339 time (2026-11-22T19:36:00Z), a time
/// ago (-90s, -5m, -2h), lsn:N or bookmark:NAME.
#[derive(Debug, Subcommand)]
enum Command {
    /// The served volume: id, size, state, epoch, lsns, journal use, window.
    Status,
    /// The history held: window configured and effective, its start and
    /// end, bookmarks, flush points, journal use.
    Timeline,
    /// Names the present moment (durably), for `--at bookmark:NAME`.
    Bookmark {
        /// 1 to 128 letters, digits, '.', '_', '-' or ':'.
        name: String,
    },
    /// Writes a sparse raw image of the disk as it was at a moment.
    Materialize {
        /// The moment: RFC 3339, -5m, lsn:N or bookmark:NAME.
        #[arg(long, allow_hyphen_values = true)]
        at: String,
        /// The image to write; it must not exist.
        #[arg(long)]
        output: PathBuf,
        /// Work on the volume directory itself, with its daemon stopped,
        /// instead of through `--control`.
        #[arg(long, conflicts_with = "control")]
        volume: Option<PathBuf>,
    },
    /// Stops taking requests from the guest, finishes those in flight and
    /// flushes the journal: afterwards nothing changes the disk until
    /// `resume`.
    Drain {
        /// Give up (and serve again) if the requests in flight take longer.
        #[arg(long, value_parser = duration, default_value = "10s")]
        timeout: Duration,
        /// Fail requests held on a storage error, or waiting at the
        /// journal's hard limit, with IOERR instead of waiting for them.
        #[arg(long)]
        abort: bool,
    },
    /// Takes requests from the guest again after a drain.
    Resume,
    /// Raises the epoch, disconnects the client and admits no client until
    /// `unfence`; the old client can never write or reattach again.
    Fence {
        /// How long to wait for the requests in flight.
        #[arg(long, value_parser = duration, default_value = "10s")]
        timeout: Duration,
    },
    /// Admits clients again after a fence (new ones: the old stays out).
    Unfence,
    /// Makes the live disk what it was at a moment, as a new journal record
    /// (undo it by reverting to just before it). The volume must be drained
    /// and no VM attached.
    Revert {
        /// The moment: RFC 3339, -5m, lsn:N or bookmark:NAME.
        #[arg(long, allow_hyphen_values = true)]
        at: String,
    },
    /// Serves the disk as it was at a moment on another vhost-user-blk
    /// socket, while the live disk goes on.
    Export {
        /// The moment: RFC 3339, -5m, lsn:N or bookmark:NAME.
        #[arg(long, allow_hyphen_values = true)]
        at: String,
        /// The socket to create; it must not exist.
        #[arg(long)]
        socket_path: PathBuf,
        /// Writable, into an overlay thrown away at `unexport`.
        #[arg(long)]
        scratch: bool,
    },
    /// Stops serving an export and removes its socket.
    Unexport {
        #[arg(long)]
        socket_path: PathBuf,
    },
    /// Compares this volume with its replica by keyed checksums at one
    /// moment, without writing; lists the ranges that differ and exits 1
    /// if any does.
    Verify {
        /// The replica daemon's control socket (on this host, or forwarded
        /// here, e.g. with `ssh -L`).
        #[arg(long)]
        peer: PathBuf,
        /// The moment (default: the newest lsn the replica acknowledged).
        #[arg(long, allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// The replication link: role, peer, mode, state, acked lsn, lag,
    /// RPO, bytes sent, compression, last error.
    Replication {
        /// Show it again every second until interrupted.
        #[arg(long, conflicts_with = "wait")]
        watch: bool,
        /// Wait until the replica is caught up (streaming), with a progress
        /// bar while a resync runs; fails if the link is outdated or the
        /// time runs out.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_parser = duration, default_value = "1h", requires = "wait")]
        timeout: Duration,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use durations like 500ms, 10s, 2m)"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn run(cli: Cli) -> Result<Value, CtlError> {
    let bar = progress_bar();
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let (command, arguments) = match cli.command {
        Command::Status => ("status", Value::Null),
        Command::Timeline => ("timeline", Value::Null),
        Command::Bookmark { name } => ("bookmark", json!({ "name": name })),
        Command::Materialize {
            at,
            output,
            volume: Some(dir),
        } => {
            let done = rewind_ctl::materialize_offline(&dir, &at, &output, &mut progress);
            bar.finish_and_clear();
            return done;
        }
        Command::Materialize { at, output, .. } => {
            // The daemon resolves paths from its own working directory.
            let output = std::path::absolute(&output)?;
            ("materialize", json!({ "at": at, "output": output }))
        }
        Command::Drain { timeout, abort } => (
            "drain",
            json!({ "timeout_ms": millis(timeout), "abort": abort }),
        ),
        Command::Resume => ("resume", Value::Null),
        Command::Fence { timeout } => ("fence", json!({ "timeout_ms": millis(timeout) })),
        Command::Unfence => ("unfence", Value::Null),
        Command::Revert { at } => ("revert", json!({ "at": at })),
        Command::Export {
            at,
            socket_path,
            scratch,
        } => {
            let socket_path = std::path::absolute(&socket_path)?;
            (
                "export",
                json!({ "at": at, "socket_path": socket_path, "scratch": scratch }),
            )
        }
        Command::Unexport { socket_path } => {
            let socket_path = std::path::absolute(&socket_path)?;
            ("unexport", json!({ "socket_path": socket_path }))
        }
        Command::Verify { peer, at } => {
            let control = control(cli.control)?;
            let done = rewind_ctl::verify(&control, &peer, at.as_deref(), &mut progress);
            bar.finish_and_clear();
            return done;
        }
        Command::Replication {
            wait: true,
            timeout,
            ..
        } => {
            let control = control(cli.control)?;
            let done = rewind_ctl::wait_streaming(&control, timeout, &mut progress);
            bar.finish_and_clear();
            return done;
        }
        Command::Replication { watch, .. } => {
            if watch {
                let control = control(cli.control)?;
                loop {
                    let status =
                        rewind_ctl::request(&control, "replication", Value::Null, &mut progress)?;
                    // Clear the screen and home the cursor, as watch(1) does.
                    print!("\x1b[2J\x1b[H");
                    if cli.json {
                        println!("{status}");
                    } else {
                        print!("{}", rewind_ctl::table(&status));
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            ("replication", Value::Null)
        }
    };
    let control = control(cli.control)?;
    let answer = rewind_ctl::request(&control, command, arguments, &mut progress);
    bar.finish_and_clear();
    answer
}

fn control(path: Option<PathBuf>) -> Result<PathBuf, CtlError> {
    path.ok_or_else(|| {
        CtlError::Usage("--control PATH is needed: the daemon's control socket".into())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(result) => {
            if json {
                println!("{result}");
            } else {
                print!("{}", rewind_ctl::table(&result));
            }
            // `verify` found ranges that differ.
            if result.get("equal") == Some(&Value::Bool(false)) {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rewindctl: {e}");
            ExitCode::FAILURE
        }
    }
}
