//! `rewind-blk`: see `rewind-blk --help`.

use std::process::ExitCode;

use clap::Parser;
use rewind_vhost_blk::config::{Cli, Command, ServeConfig, CAPABILITIES};
use rewind_vhost_blk::daemon;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Create(args) => daemon::create(&args).map_err(|e| e.to_string()),
        Command::Cert(args) => daemon::cert(&args).map_err(|e| e.to_string()),
        Command::Serve(args) if args.print_capabilities => {
            println!("{CAPABILITIES}");
            Ok(())
        }
        Command::Serve(args) => ServeConfig::try_from(*args)
            .map_err(|e| e.to_string())
            .and_then(|config| daemon::serve(config).map_err(|e| e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rewind-blk: {e}");
            ExitCode::FAILURE
        }
    }
}
