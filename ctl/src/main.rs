//! `rewindctl`: see `rewindctl --help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rewind_ctl::cli::{Cli, Command};
use rewind_ctl::{group, quiesce, CtlError};
use serde_json::{json, Value};

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
        // 0 of 0: a command waiting with nothing to count (demote,
        // failover, handover); a bar would be full, as if it were done.
        if total > 0 {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let path = cli.control.into_iter().next();
    let done = match cli.command {
        Command::Materialize {
            at,
            output,
            volume: Some(dir),
        } => rewind_ctl::materialize_offline(&dir, &at, &output, &mut progress),
        Command::Verify { peer, at } => {
            rewind_ctl::verify(&control(path)?, &peer, at.as_deref(), &mut progress)
        }
        Command::Replication {
            wait: true,
            timeout,
            ..
        } => rewind_ctl::wait_streaming(&control(path)?, timeout, &mut progress),
        Command::Replication { watch: true, .. } => watch(&control(path)?, cli.json),
        command => {
            let (command, arguments) = request_of(command)?;
            rewind_ctl::request(&control(path)?, command, arguments, &mut progress)
        }
    };
    bar.finish_and_clear();
    done
}

/// Shows the replication link again every second until interrupted (or
/// the daemon fails to answer).
fn watch(control: &Path, json: bool) -> Result<Value, CtlError> {
    loop {
        let status = rewind_ctl::request(control, "replication", Value::Null, &mut |_, _| {})?;
        // Clear the screen and home the cursor, as watch(1) does.
        print!("\x1b[2J\x1b[H");
        if json {
            println!("{status}");
        } else {
            print!("{}", rewind_ctl::table(&status));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The request a command sends when it is one request to each daemon.
/// Paths are made absolute: the daemon resolves them from its own working
/// directory.
fn request_of(command: Command) -> Result<(&'static str, Value), CtlError> {
    let one = |what: &str| {
        CtlError::Usage(format!(
            "{what} works on one daemon: give one --control (not a group)"
        ))
    };
    Ok(match command {
        Command::Status => ("status", Value::Null),
        Command::Timeline => ("timeline", Value::Null),
        Command::Bookmark { name, .. } => ("bookmark", json!({ "name": name })),
        Command::Materialize {
            volume: Some(_), ..
        } => return Err(one("materialize --volume")),
        Command::Materialize { at, output, .. } => {
            let output = rewind_ctl::absolute(&output)?;
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
            let socket_path = rewind_ctl::absolute(&socket_path)?;
            (
                "export",
                json!({ "at": at, "socket_path": socket_path, "scratch": scratch }),
            )
        }
        Command::Unexport { socket_path } => {
            let socket_path = rewind_ctl::absolute(&socket_path)?;
            ("unexport", json!({ "socket_path": socket_path }))
        }
        Command::Verify { .. } => return Err(one("verify")),
        Command::Replication { watch, wait, .. } if watch || wait => {
            return Err(one("replication --watch or --wait"))
        }
        Command::Replication { .. } => ("replication", Value::Null),
        Command::Promote { force, drained } => {
            ("promote", json!({ "force": force, "drained": drained }))
        }
        Command::Demote { timeout } => ("demote", json!({ "timeout_ms": millis(timeout) })),
        Command::Failover {
            force,
            timeout,
            drained,
        } => (
            "failover",
            json!({ "force": force, "timeout_ms": millis(timeout), "drained": drained }),
        ),
        Command::Handover { timeout, cancel } => (
            "handover",
            json!({ "timeout_ms": millis(timeout), "cancel": cancel }),
        ),
        Command::Branches => ("branches", Value::Null),
        Command::Metrics => ("metrics", Value::Null),
        Command::BranchDrop { name } => ("branch-drop", json!({ "name": name })),
        Command::Resolve {
            discard_this_side: true,
        } => ("resolve", json!({ "discard_this_side": true })),
        Command::Resolve { .. } => {
            return Err(CtlError::Usage(
                "resolve ends a split brain by discarding this side: its writes since the \
                 split become a read-only branch (see `rewindctl branches`) and this volume \
                 becomes a replica of the other side. Run it on the side to discard, with \
                 --discard-this-side"
                    .into(),
            ))
        }
    })
}

/// The command on every member of a group at one moment (see `group`).
fn run_group(cli: Cli) -> Result<group::Report, CtlError> {
    let members = group::members(&cli.control, cli.group.as_deref())?;
    let bar = progress_bar();
    let report = match cli.command {
        Command::Bookmark { name, timeout, .. } => group::bookmark(&members, &name, false, timeout),
        Command::Materialize {
            at,
            output,
            volume: None,
        } => group::materialize(&members, &at, &output, &mut |_, done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })?,
        Command::Export {
            at,
            socket_path,
            scratch,
        } => group::export(&members, &at, &socket_path, scratch)?,
        Command::Unexport { socket_path } => group::unexport(&members, &socket_path)?,
        Command::Revert { at } => group::revert(&members, &at)?,
        Command::Failover {
            force,
            timeout,
            drained,
        } => group::failover(&members, force, timeout, drained),
        Command::Metrics => {
            return Err(CtlError::Usage(
                "metrics reads one daemon: give one --control (Prometheus scrapes each \
                 daemon's --metrics-listen)"
                    .into(),
            ))
        }
        command => {
            let (command, arguments) = request_of(command)?;
            group::same(&members, command, &arguments)
        }
    };
    bar.finish_and_clear();
    Ok(report)
}

fn control(path: Option<PathBuf>) -> Result<PathBuf, CtlError> {
    path.ok_or_else(|| {
        CtlError::Usage("--control PATH is needed: the daemon's control socket".into())
    })
}

/// `metrics`: the text as the daemon rendered it.
fn metrics_text(result: &Value) -> String {
    result["text"].as_str().unwrap_or_default().to_string()
}

/// `bookmark --quiesce`, on one daemon or a group: prints what was done,
/// then, on stderr, a fallback to a crash-consistent bookmark or a thaw
/// that failed (which fails the command).
fn quiesced(cli: Cli) -> ExitCode {
    let Command::Bookmark {
        name,
        qga,
        timeout,
        fallback_crash_consistent,
        ..
    } = cli.command
    else {
        return ExitCode::FAILURE;
    };
    let options = quiesce::Options {
        timeout,
        fallback: fallback_crash_consistent,
    };
    let fallback_note = |result: &Value| {
        if let Some(why) = result.get("fallback").and_then(Value::as_str) {
            eprintln!(
                "rewindctl: took a crash-consistent bookmark (--fallback-crash-consistent): \
                 the guest could not be frozen: {why}"
            );
        }
    };
    // Held from the freeze until the outcome is shown.
    let mut held = None;
    if cli.group.is_some() || cli.control.len() > 1 {
        let report = group::members(&cli.control, cli.group.as_deref())
            .and_then(|members| quiesce::group_bookmark(&members, &qga, &name, options, &mut held));
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                eprintln!("rewindctl: {e}");
                return ExitCode::FAILURE;
            }
        };
        if cli.json {
            println!("{}", report.to_json());
        } else {
            print!("{}", report.table(rewind_ctl::table));
        }
        if let Some(Ok(first)) = report.outcomes.first().map(|o| &o.result) {
            fallback_note(first);
        }
        return match report.failure() {
            None => ExitCode::SUCCESS,
            Some(why) => {
                eprintln!("rewindctl: {why}");
                ExitCode::FAILURE
            }
        };
    }
    let outcome = match (control(cli.control.into_iter().next()), qga.as_slice()) {
        (Ok(control), [agent]) => {
            quiesce::bookmark_holding(&control, agent, &name, options, &mut held)
        }
        (Ok(_), _) => Err(CtlError::Usage(
            "one --control takes one --qga: the socket of its VM's guest agent".into(),
        )),
        (Err(e), _) => Err(e),
    };
    match outcome {
        Ok(outcome) => {
            if cli.json {
                println!("{}", outcome.result);
            } else {
                print!("{}", rewind_ctl::table(&outcome.result));
            }
            fallback_note(&outcome.result);
            match outcome.thaw_failed {
                None => ExitCode::SUCCESS,
                Some(advice) => {
                    eprintln!("rewindctl: {advice}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("rewindctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Bookmark { quiesce: true, .. }) {
        return quiesced(cli);
    }
    let json = cli.json;
    let show: fn(&Value) -> String = match cli.command {
        Command::Branches => rewind_ctl::branches_table,
        Command::Metrics => metrics_text,
        _ => rewind_ctl::table,
    };
    // One --control alone is a single daemon; more, or a group file, a group.
    if cli.group.is_some() || cli.control.len() > 1 {
        return match run_group(cli) {
            Ok(report) => {
                if json {
                    println!("{}", report.to_json());
                } else {
                    print!("{}", report.table(show));
                }
                match report.failure() {
                    None => ExitCode::SUCCESS,
                    Some(why) => {
                        eprintln!("rewindctl: {why}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("rewindctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
        Ok(result) => {
            if json {
                println!("{result}");
            } else {
                print!("{}", show(&result));
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
