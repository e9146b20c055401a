//! `rewind-blk-docs OUT_DIR`: writes the man pages of rewind-blk and
//! rewindctl (one a subcommand) to
//! OUT_DIR/man/man1 and the bash, zsh and fish completions to
//! OUT_DIR/completions, made from the clap definitions so they never drift
//! from `--help`; prints each path. The Debian package is built after it
//! (vhost-blk/OPERATIONS.md).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// A command line to document.
struct Program {
    name: &'static str,
    /// clap_complete's bash script never completes a subcommand's options
    /// when the command's name has a hyphen (clap-rs/clap#6421): it is
    /// made for this name, then registered for `name`.
    bash_name: &'static str,
    command: fn() -> clap::Command,
}

const PROGRAMS: &[Program] = &[
    Program {
        name: "rewind-blk",
        bash_name: "rewind_blk",
        command: rewind_vhost_blk::config::Cli::command,
    },
    Program {
        name: "rewindctl",
        bash_name: "rewindctl",
        command: rewind_ctl::cli::Cli::command,
    },
];

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: rewind-blk-docs OUT_DIR");
        return ExitCode::from(2);
    };
    for program in PROGRAMS {
        match write(program, Path::new(&out)) {
            Ok(written) => {
                for path in written {
                    println!("{}", path.display());
                }
            }
            Err(e) => {
                eprintln!("rewind-blk-docs: {}: {e}", program.name);
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Writes the program's pages and completion files; returns their paths.
fn write(program: &Program, out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let name = program.name;
    let mut command = (program.command)().name(name);
    // Names the subcommands NAME-SUB, for their pages.
    command.build();
    let man = out.join("man/man1");
    std::fs::create_dir_all(&man)?;
    let mut written = Vec::new();
    // clap's own `help` subcommand gets no page.
    let pages = std::iter::once(&command).chain(
        command
            .get_subcommands()
            .filter(|sub| sub.get_name() != "help"),
    );
    for page in pages {
        let title = page.get_display_name().unwrap_or(name);
        let path = man.join(format!("{title}.1"));
        clap_mangen::Man::new(page.clone()).render(&mut File::create(&path)?)?;
        written.push(path);
    }
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.to_owned()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(file);
        let script = match shell {
            Shell::Bash => bash_completion(program),
            _ => {
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut command, name, &mut script);
                script
            }
        };
        std::fs::write(&path, script)?;
        written.push(path);
    }
    Ok(written)
}

/// The bash completion made for `bash_name`, its `complete` lines naming
/// `name`.
fn bash_completion(program: &Program) -> Vec<u8> {
    let (name, alias) = (program.name, program.bash_name);
    let mut command = (program.command)().name(alias).bin_name(alias);
    let mut script = Vec::new();
    clap_complete::generate(Shell::Bash, &mut command, alias, &mut script);
    let mut text = String::new();
    for line in String::from_utf8_lossy(&script).lines() {
        match line.trim_start().starts_with("complete ") && alias != name {
            true => text.push_str(&line.replace(&format!(" {alias}"), &format!(" {name}"))),
            false => text.push_str(line),
        }
        text.push('\n');
    }
    text.into_bytes()
}
