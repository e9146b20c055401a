//! What an operator installs and runs, through the tools they use: the man
//! pages (`man`, `groff`) and bash completion of rewind-blk and rewindctl
//! made by rewind-blk-docs, the systemd units (`systemd-analyze verify`,
//! and the service's own command line run with the listening socket and
//! the notify socket systemd would pass it, through
//! `systemd-socket-activate`), and the Debian packages (`cargo deb`,
//! `dpkg-deb`, `dpkg --root`, then a create/serve/status round with the
//! installed binaries).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use clap::CommandFactory;
use common::client::{pattern, Client};
use common::libvirt::{create_volume, ctl, require, rewindctl};
use common::{wait_until, workspace, BIN};

const DOCS: &str = env!("CARGO_BIN_EXE_rewind-blk-docs");

/// Runs `command` under a time limit; fails with its output unless it
/// succeeded.
fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn limited(seconds: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("timeout");
    command.arg(seconds.to_string()).arg(program);
    command
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// rewind-blk-docs OUT: its man pages and completion files.
fn docs(out: &Path) -> Vec<PathBuf> {
    let listed = stdout(&run(limited(60, DOCS).arg(out)));
    listed.lines().map(PathBuf::from).collect()
}

/// `man -l PAGE`, as a terminal of 80 columns shows it, with groff's
/// warnings (man shows none) checked by `groff -ww -z`.
fn render(page: &Path) -> String {
    let warnings = run(limited(30, "groff")
        .args(["-man", "-ww", "-z", "-Tutf8"])
        .arg(page));
    assert!(
        warnings.stderr.is_empty(),
        "groff warns on {}:\n{}",
        page.display(),
        String::from_utf8_lossy(&warnings.stderr)
    );
    let out = run(limited(30, "man")
        .args(["-P", "cat", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8"));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

#[test]
fn the_man_pages_render_and_bash_completes_the_options() {
    require("man", "man-db");
    require("groff", "groff-base");
    require("bash", "bash");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = docs(dir.path());
    let man = dir.path().join("man/man1");
    // One page for the command and one a subcommand, each with what
    // `--help` says.
    for (page, wants) in [
        (
            "rewind-blk",
            &[
                "NAME",
                "rewind-blk - vhost-user-blk server",
                "serve",
                "--log-format",
                "journald and Loki",
            ][..],
        ),
        (
            "rewind-blk-create",
            &["--volume", "--size", "--window", "--replica-of"],
        ),
        (
            "rewind-blk-serve",
            &[
                "--socket-path",
                "--fd",
                "--control-socket",
                "--replicate-to",
            ],
        ),
        ("rewind-blk-cert", &["--out", "--name"]),
        (
            "rewindctl",
            &[
                "NAME",
                "rewindctl - Control rewind-blk daemons",
                "--control",
                "failover",
                "handover",
            ],
        ),
        ("rewindctl-materialize", &["--at", "--output", "--volume"]),
        ("rewindctl-handover", &["--timeout", "--cancel"]),
    ] {
        let path = man.join(format!("{page}.1"));
        assert!(files.contains(&path), "{files:?}");
        let text = render(&path);
        for want in wants {
            assert!(text.contains(want), "{page}(1) lacks {want:?}:\n{text}");
        }
    }
    let blk_pages = std::fs::read_dir(&man)
        .expect("man1")
        .filter(|e| {
            let name = e.as_ref().expect("entry").file_name();
            name.to_string_lossy().starts_with("rewind-blk")
        })
        .count();
    assert_eq!(blk_pages, 4, "no page for clap's help subcommand");
    assert!(!man.join("rewindctl-help.1").exists());
    // A page for every subcommand rewindctl has.
    for sub in rewind_ctl::cli::Cli::command().get_subcommands() {
        let path = man.join(format!("rewindctl-{}.1", sub.get_name()));
        assert!(
            files.contains(&path),
            "no page {}: {files:?}",
            path.display()
        );
    }

    // Bash completes subcommands and a subcommand's options, through the
    // function each file registers for its program (as a shell calls it).
    let completions = dir.path().join("completions/bash");
    let complete_for = |program: &str, words: &str| {
        let script = format!(
            "source {}; f=$(complete -p {program} | sed 's/.*-F \\([^ ]*\\).*/\\1/'); \
             COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             \"$f\" {program} \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            completions.join(program).display()
        );
        stdout(&run(limited(30, "bash").args(["-c", &script])))
    };
    let complete = |words: &str| complete_for("rewind-blk", words);
    let complete_ctl = |words: &str| complete_for("rewindctl", words);
    let subcommands = complete("rewind-blk ''");
    for sub in ["create", "serve", "cert"] {
        assert!(subcommands.lines().any(|l| l == sub), "{subcommands}");
    }
    let options = complete("rewind-blk serve --cont");
    assert_eq!(options.trim(), "--control-socket", "{options}");
    let subcommands = complete_ctl("rewindctl ''");
    for sub in ["status", "failover", "handover", "branch-drop"] {
        assert!(subcommands.lines().any(|l| l == sub), "{subcommands}");
    }
    let options = complete_ctl("rewindctl materialize --out");
    assert_eq!(options.trim(), "--output", "{options}");
    for (shell, file, word) in [
        ("zsh", "_rewind-blk", "control-socket"),
        ("fish", "rewind-blk.fish", "control-socket"),
        ("zsh", "_rewindctl", "discard-this-side"),
        ("fish", "rewindctl.fish", "discard-this-side"),
    ] {
        let path = dir.path().join("completions").join(shell).join(file);
        let text = std::fs::read_to_string(&path).expect("completion file");
        assert!(text.contains(word), "{}", path.display());
    }
}

/// A unit file's `KEY=` values, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

/// The shipped units with the installed binary's path pointing at the one
/// under test (verify checks that it exists).
fn units_for_test(dir: &Path, instance: &str) -> (PathBuf, PathBuf) {
    let mut paths = Vec::new();
    for kind in ["service", "socket"] {
        let shipped = workspace().join(format!("vhost-blk/systemd/rewind-blk@.{kind}"));
        let text = std::fs::read_to_string(&shipped).expect("unit");
        assert!(kind == "socket" || text.contains("ExecStart=/usr/bin/rewind-blk serve"));
        let path = dir.join(format!("rewind-blk@{instance}.{kind}"));
        std::fs::write(&path, text.replace("/usr/bin/rewind-blk", BIN)).expect("write unit");
        paths.push(path);
    }
    (paths[0].clone(), paths[1].clone())
}

/// The service's ExecStartPre and ExecStart lines for `instance`, with
/// /var/lib/rewind, /run/rewind and REWIND_SERVE_ARGS (from
/// /etc/rewind/NAME.conf) as given: what systemd would run.
fn exec_lines(service: &str, instance: &str, lib: &Path, run: &Path, args: &str) -> Vec<String> {
    let fill = |line: &str| {
        line.replace("%i", instance)
            .replace("/var/lib/rewind", &lib.display().to_string())
            .replace("/run/rewind", &run.display().to_string())
            .replace("$REWIND_SERVE_ARGS", args)
    };
    let mut lines = unit_values(service, "ExecStartPre");
    lines.extend(unit_values(service, "ExecStart"));
    lines.iter().map(|l| fill(l)).collect()
}

/// A `rewind-blk serve` of the test's.
struct Daemon {
    child: Child,
}

impl Daemon {
    /// Started as the socket unit would start it.
    /// With NOTIFY_SOCKET set to `notify`, as for Type=notify.
    fn activated(listen: &Path, exec_start: &str, notify: &Path) -> Daemon {
        let argv: Vec<&str> = exec_start.split_whitespace().collect();
        let child = Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(listen)
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify.display()))
            .arg("--")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-socket-activate");
        wait_until("the activation socket", Duration::from_secs(20), || {
            listen.exists()
        });
        Daemon { child }
    }

    /// SIGTERM, as `systemctl stop` sends; the exit status.
    fn stop(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let mut status = None;
        wait_until("the service to stop", limit, || {
            status = self.child.try_wait().expect("wait");
            status.is_some()
        });
        status.expect("exited")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_systemd_units_verify_and_the_socket_activated_service_serves_and_stops() {
    require("systemd-analyze", "systemd");
    require("systemd-socket-activate", "systemd");
    require("man", "man-db");
    let dir = tempfile::tempdir().expect("tempdir");
    let (service, socket) = units_for_test(dir.path(), "vm1");
    // Documentation=man:rewind-blk(1) is checked against the pages too.
    docs(&dir.path().join("docs"));
    let verify = run(limited(60, "systemd-analyze")
        .arg("verify")
        .arg(&service)
        .arg(&socket)
        .env("MANPATH", dir.path().join("docs/man")));
    assert!(
        verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        stdout(&verify),
        String::from_utf8_lossy(&verify.stderr)
    );

    // The service's own command line, given the listening socket as fd 3
    // with LISTEN_FDS and LISTEN_PID as systemd does (ExecStart has no
    // --fd), and NOTIFY_SOCKET; a control socket a killed daemon left
    // behind is removed by ExecStartPre.
    let service_text = std::fs::read_to_string(&service).expect("unit");
    let socket_text = std::fs::read_to_string(&socket).expect("unit");
    let lib = dir.path().join("lib");
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).expect("mkdir");
    let volume = lib.join("vm1");
    create_volume(Path::new(BIN), &volume);
    let lines = exec_lines(&service_text, "vm1", &lib, &run_dir, "--num-queues 1");
    let (pre, exec_start) = match lines.as_slice() {
        [pre, start] => (pre, start),
        other => panic!("ExecStartPre and ExecStart expected: {other:?}"),
    };
    assert!(!exec_start.contains("--fd"), "{exec_start}");
    assert_eq!(unit_values(&service_text, "Type"), ["notify"]);
    let listen = unit_values(&socket_text, "ListenStream");
    let listen = PathBuf::from(
        listen[0]
            .replace("%i", "vm1")
            .replace("/run/rewind", &run_dir.display().to_string()),
    );
    let control = run_dir.join("vm1.ctl");
    std::fs::write(&control, "").expect("a stale control socket");
    let stop_limit = unit_values(&service_text, "TimeoutStopSec")[0]
        .parse::<u64>()
        .map(Duration::from_secs)
        .expect("TimeoutStopSec in seconds");
    // What the daemon tells systemd.
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let notified = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let data = pattern(7, 256 << 10);
    for round in 0..2 {
        run(Command::new("sh").args(["-c", pre]));
        let mut daemon = Daemon::activated(&listen, exec_start, &notify_path);
        let mut client = None;
        // The socket file exists from bind(2), a moment before listen(2).
        wait_until("a connection", Duration::from_secs(20), || {
            client = Client::try_connect(&listen, 1, false).ok();
            client.is_some()
        });
        let mut client = client.expect("connected");
        assert_eq!(notified(), "READY=1");
        if round == 0 {
            assert_eq!(client.write(0, 1 << 20, &data), 0);
            assert_eq!(client.flush(0), 0);
        }
        assert_eq!(client.read(0, 1 << 20, data.len()), data, "round {round}");
        let status = ctl(&control, &["status"]);
        assert_eq!(status["state"], "serving", "{status}");
        assert_eq!(status["queues"], 1, "REWIND_SERVE_ARGS reached serve");
        drop(client);
        let exit = daemon.stop(stop_limit);
        assert!(exit.success(), "stop (SIGTERM) drains and exits 0: {exit}");
        assert_eq!(notified(), "STOPPING=1");
        assert!(!control.exists(), "a clean stop removes the control socket");
    }

    // LISTEN_FDS meant for another process (LISTEN_PID) is not taken.
    let argv: Vec<&str> = exec_start.split_whitespace().collect();
    let refused = Command::new(argv[0])
        .args(&argv[1..])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("rewind-blk");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("give --socket-path or --fd"),
        "{}: {stderr}",
        refused.status
    );
}

/// The package's files every install must have.
const BLK_FILES: &[&str] = &[
    "./usr/bin/rewind-blk",
    "./lib/systemd/system/rewind-blk@.service",
    "./lib/systemd/system/rewind-blk@.socket",
    "./usr/share/rewind-blk/libvirt/qemu-hook",
    "./usr/lib/ocf/resource.d/rewind/rewind",
    "./usr/lib/ocf/lib/rewind/rewind-fence-peer",
    "./usr/share/man/man1/rewind-blk.1",
    "./usr/share/man/man1/rewind-blk-serve.1",
    "./usr/share/man/man1/rewind-blk-create.1",
    "./usr/share/man/man1/rewind-blk-cert.1",
    "./usr/share/bash-completion/completions/rewind-blk",
    "./usr/share/zsh/vendor-completions/_rewind-blk",
    "./usr/share/fish/vendor_completions.d/rewind-blk.fish",
    "./usr/share/doc/rewind-blk/OPERATIONS.md",
    "./usr/share/doc/rewind-blk/README.md",
    "./usr/share/doc/rewind-blk/copyright",
];
const CTL_FILES: &[&str] = &[
    "./usr/bin/rewindctl",
    "./usr/share/man/man1/rewindctl.1",
    "./usr/share/man/man1/rewindctl-status.1",
    "./usr/share/man/man1/rewindctl-failover.1",
    "./usr/share/man/man1/rewindctl-handover.1",
    "./usr/share/bash-completion/completions/rewindctl",
    "./usr/share/zsh/vendor-completions/_rewindctl",
    "./usr/share/fish/vendor_completions.d/rewindctl.fish",
    "./usr/share/doc/rewindctl/PROTOCOL.md",
    "./usr/share/doc/rewindctl/copyright",
];

/// `cargo deb` of `package` from the binaries this test run built (the
/// dev profile, so CI builds nothing twice; a release is `cargo deb -p
/// PACKAGE`, OPERATIONS.md); the .deb's path.
fn cargo_deb(package: &str, out: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = run(limited(300, &cargo)
        .args([
            "deb",
            "-p",
            package,
            "--profile",
            "dev",
            "--no-build",
            "--fast",
            "-o",
        ])
        .arg(out)
        .current_dir(workspace()));
    let deb = PathBuf::from(stdout(&built).trim());
    assert!(deb.exists(), "cargo deb printed {deb:?}");
    deb
}

#[test]
fn the_debian_packages_build_install_into_a_root_and_serve() {
    for (program, package) in [("dpkg-deb", "dpkg"), ("dpkg", "dpkg"), ("man", "man-db")] {
        require(program, package);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let version = Command::new(&cargo).args(["deb", "--version"]).output();
    assert!(
        version.map(|o| o.status.success()).unwrap_or(false),
        "cargo-deb is not installed: cargo install --locked cargo-deb (ci/install-deps.sh)"
    );
    // The package takes the generated pages from the profile's directory.
    let profile_dir = Path::new(BIN).parent().expect("target/debug");
    docs(&profile_dir.join("docs"));
    let ctl_bin = rewindctl();
    assert!(ctl_bin.starts_with(profile_dir));
    let dir = tempfile::tempdir().expect("tempdir");
    let blk_deb = cargo_deb("rewind-vhost-blk", dir.path());
    let ctl_deb = cargo_deb("rewind-ctl", dir.path());
    assert!(
        blk_deb.ends_with("rewind-blk_0.1.0-1_amd64.deb"),
        "{blk_deb:?}"
    );
    assert!(
        ctl_deb.ends_with("rewindctl_0.1.0-1_amd64.deb"),
        "{ctl_deb:?}"
    );

    for (deb, name, files) in [
        (&blk_deb, "rewind-blk", BLK_FILES),
        (&ctl_deb, "rewindctl", CTL_FILES),
    ] {
        let info = stdout(&run(limited(30, "dpkg-deb").arg("--info").arg(deb)));
        for want in [
            format!("Package: {name}"),
            "Version: 0.1.0-1".into(),
            "Architecture: amd64".into(),
            "Depends: libc6".into(),
        ] {
            assert!(info.contains(&want), "{want:?} not in:\n{info}");
        }
        let contents = stdout(&run(limited(30, "dpkg-deb").arg("--contents").arg(deb)));
        let listed: Vec<&str> = contents
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        for file in files {
            assert!(listed.contains(file), "{file} not in {name}:\n{contents}");
        }
        for executable in files
            .iter()
            .filter(|f| f.contains("/bin/") || f.contains("ocf") || f.ends_with("qemu-hook"))
        {
            let line = contents
                .lines()
                .find(|l| l.ends_with(executable))
                .expect("listed");
            assert!(line.starts_with("-rwxr-xr-x"), "{line}");
        }
    }

    // dpkg installs both into an empty root of its own.
    let root = dir.path().join("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("status");
    // libc6 is the host's, not in this root.
    run(limited(120, "dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-depends",
            "--force-script-chrootless",
            "--log=/dev/null",
            "-i",
        ])
        .arg(&blk_deb)
        .arg(&ctl_deb));
    for name in ["rewind-blk", "rewindctl"] {
        let status = stdout(&run(limited(30, "dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["-s", name])));
        assert!(status.contains("Status: install ok installed"), "{status}");
    }
    let blk = root.join("usr/bin/rewind-blk");
    let ctl_bin = root.join("usr/bin/rewindctl");
    let version = stdout(&run(limited(30, &blk).arg("--version")));
    assert_eq!(version.trim(), "rewind-blk 0.1.0");
    let help = stdout(&run(limited(30, &ctl_bin).arg("--help")));
    assert!(help.contains("Control rewind-blk daemons"), "{help}");
    let page = render(&root.join("usr/share/man/man1/rewind-blk-serve.1"));
    assert!(page.contains("--control-socket"), "{page}");
    let page = render(&root.join("usr/share/man/man1/rewindctl-handover.1"));
    assert!(page.contains("--cancel"), "{page}");

    // One round with the installed binaries: create, serve, status, stop.
    let volume = dir.path().join("vol");
    let socket = dir.path().join("vol.sock");
    let control = dir.path().join("vol.ctl");
    create_volume(&blk, &volume);
    let child = Command::new(&blk)
        .arg("serve")
        .arg("--volume")
        .arg(&volume)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--control-socket")
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the installed rewind-blk serve");
    let mut serve = Daemon { child };
    wait_until(
        "the installed daemon's sockets",
        Duration::from_secs(20),
        || socket.exists() && control.exists(),
    );
    let status = run(limited(30, &ctl_bin)
        .arg("--control")
        .arg(&control)
        .args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["size"], 64u64 << 20, "{status}");
    let exit = serve.stop(Duration::from_secs(30));
    assert!(exit.success(), "{exit}");
}

#[test]
fn create_says_how_much_history_the_journal_limit_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let create = |name: &str, extra: &[&str]| {
        stdout(&run(Command::new(BIN)
            .args(["create", "--size", "10G", "--volume"])
            .arg(dir.path().join(name))
            .args(extra)))
    };
    let out = create("default", &[]);
    let row = |out: &str, rate: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(rate))
            .unwrap_or_else(|| panic!("no {rate} row in {out}"))
            .to_string()
    };
    assert!(out.contains("(window 1h configured)"), "{out}");
    let slow = row(&out, "1 MiB/s in 4 KiB writes");
    assert!(
        slow.contains("2h 19m") && slow.ends_with("the whole window"),
        "{slow}"
    );
    let busy = row(&out, "10 MiB/s in 4 KiB writes");
    assert!(busy.ends_with("it shrinks at this rate"), "{busy}");
    // A shorter window is held at that rate.
    let out = create("short", &["--window", "10m"]);
    assert!(
        row(&out, "10 MiB/s in 4 KiB writes").ends_with("the whole window"),
        "{out}"
    );
}

#[test]
fn create_preallocate_journal_writes_the_whole_journal_out_with_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("vol");
    let out = run(Command::new(BIN)
        .args(["create", "--size", "64M", "--segment-size", "1M"])
        .args(["--journal-max", "40M", "--preallocate-journal", "--volume"])
        .arg(&volume));
    let shown = stdout(&out);
    assert!(
        shown.contains("journal limit 41943040 bytes (written out)"),
        "{shown}"
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    let percents: Vec<&str> = progress
        .split('\r')
        .filter_map(|p| p.trim().strip_prefix("writing the journal out:"))
        .map(str::trim)
        .collect();
    // A batch of 16 segments at a time: 0, 16 and 32 of 40, then all.
    assert_eq!(percents, ["0%", "40%", "80%", "100%"], "{progress:?}");
    let files = std::fs::read_dir(volume.join("journal"))
        .expect("journal")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .collect::<Vec<_>>();
    assert_eq!(files, vec![1 << 20; 40]);

    // Without the option nothing is written out ahead.
    let plain = dir.path().join("plain");
    let out = run(Command::new(BIN)
        .args(["create", "--size", "64M", "--volume"])
        .arg(&plain));
    assert!(!stdout(&out).contains("written out"));
    assert!(out.stderr.is_empty(), "{:?}", out.stderr);
    let files = std::fs::read_dir(plain.join("journal")).expect("journal");
    assert_eq!(files.count(), 0);
}
