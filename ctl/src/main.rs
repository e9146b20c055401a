//! `rewindctl`: see `rewindctl --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "rewindctl", version, about = "Control rewind-blk daemons")]
struct Cli {
    /// The daemon's control socket (`rewind-blk serve --control-socket`).
    #[arg(long)]
    control: PathBuf,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The served volume: id, size, state, epoch, lsns, journal use.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Status => "status",
    };
    match rewind_ctl::request(&cli.control, command) {
        Ok(result) if cli.json => {
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
