//! `rewind-blk`: see `rewind-blk --help`.

use std::process::ExitCode;

use clap::Parser;
use rewind_vhost_blk::config::{Cli, Command, ServeConfig, CAPABILITIES};
use rewind_vhost_blk::{daemon, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
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
            logging::fatal(cli.log_format, &e);
            ExitCode::FAILURE
        }
    }
}
