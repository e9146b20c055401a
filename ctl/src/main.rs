//! `rewindctl`: see `rewindctl --help`.

use std::path::PathBuf;
use std::process::ExitCode;

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
    };
    let control = cli.control.ok_or_else(|| {
        CtlError::Usage("--control PATH is needed: the daemon's control socket".into())
    })?;
    let answer = rewind_ctl::request(&control, command, arguments, &mut progress);
    bar.finish_and_clear();
    answer
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(result) if json => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(result) => {
            print!("{}", rewind_ctl::table(&result));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rewindctl: {e}");
            ExitCode::FAILURE
        }
    }
}
