//! Handover: the pause a guest sees when its VM is live-migrated with a
//! handover of its disk's primary role (rewind-blk, two daemons
//! replicating), against the same migration with qemu-storage-daemon on
//! shared storage (two daemons exporting one raw image).
//!
//! Both systems run the same guest with the same QEMU command line (the
//! test guest of guest-tests/build.sh, TCG, 2 vCPUs, a vhost-user-blk disk
//! with 2 queues, qemu-configs/vhost-user-blk.args) and the same migration
//! (QMP `migrate` to a unix socket, QEMU's default parameters). Each host is
//! a network namespace (tests/common/netns.rs; needs root): for rewind the
//! daemons replicate over its veth pair with mutual TLS, as
//! tests/guest_handover.rs runs them; for qemu-storage-daemon the two
//! daemons run in their namespaces too, on one image with
//! `locking=off`. The systems alternate round by round, each round on fresh
//! daemons and a fresh guest.
//!
//! In the guest, one writer per vCPU (pinned, so both queues carry IO)
//! writes 4 KiB with O_DIRECT to its own 256 blocks, each write followed by
//! fsync, and prints the guest's CLOCK_MONOTONIC at each completion on the
//! serial console; at the end it prints its longest gap between two
//! completions. Each writer pauses 5 ms before each write
//! (REWIND_BENCH_PACE_US, 0 for none), about 100 writes per second each.
//! Unpaced (300-400 writes per second each here) the destination guest's
//! kernel mostly crashed right after the migration on QEMU 7.2 under TCG
//! (memory corruption: NULL dereferences in the scheduler and in timers),
//! with qemu-storage-daemon too; paced, about one run in four or five
//! did, with either server. A round whose guest crashed or hung after the
//! migration runs again, up to ATTEMPTS times, and the table counts them
//! (vhost-blk/BENCHMARKS.md, "Handover"). The writer is a small static
//! program without libc, built here with `cc` and carried into the guest
//! in base64. The host stamps each console line as it arrives, which
//! gives the pause in wall-clock time too: the guest's clock stands still
//! while the VM is stopped, so the guest's gap leaves out the time both
//! QEMUs had the VM stopped, the wall-clock pause does not.
//!
//! Per round: the guest's longest gap, the migration's gap in guest and in
//! wall-clock time, QEMU's `downtime` and `total-time` (query-migrate), and
//! for rewind `status.handover` of both daemons (`seal_ms`, `switch_ms`,
//! `start_to_serve_ms`).
//!
//! `cargo bench -p rewind-vhost-blk --bench handover`; REWIND_BENCH_ROUNDS
//! (default 3) rounds of each; REWIND_BENCH_QUICK=1 runs one round of each
//! with shorter phases (CI).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::guest::{Guest, GuestConfig, QEMU};
use common::netns::{Host, HostPair};
use common::qmp::Qmp;
use common::twins::{streaming, Daemon, Twins};
use common::wait_until;
use serde_json::{json, Value};

const QSD: &str = "qemu-storage-daemon";
/// The size of rewind's volumes in the guest tests (common::replication).
const IMAGE_BYTES: u64 = 64 << 20;
const QUEUES: u32 = 2;
const VCPUS: u32 = 2;
/// The writers' pause before each write, in microseconds.
const DEFAULT_PACE_US: u64 = 5000;
/// From the migration's end to the destination guest's report.
const FINISH_LIMIT: Duration = Duration::from_secs(60);

/// The guest's writer (see the module's comment). It prints
/// `<writer> <guest microseconds> .` per completed write and
/// `GAP: <writer> <longest gap us> <its end us> <writes>` at the end.
const WRITER_C: &str = r#"
typedef unsigned long u64;
static long sys3(long n, long a, long b, long c) {
  long r;
  __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
  return r;
}
static long sys4(long n, long a, long b, long c, long d) {
  long r;
  register long r10 __asm__("r10") = d;
  __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
  return r;
}
struct ts { long s, ns; };
static u64 now(void) {
  struct ts t;
  sys3(228, 1, (long)&t, 0); /* clock_gettime(CLOCK_MONOTONIC) */
  return (u64)t.s * 1000000 + (u64)t.ns / 1000;
}
static char out[96];
static int put(int at, const char *s) { while (*s) out[at++] = *s++; return at; }
static int num(int at, u64 v) {
  char d[24]; int n = 0;
  do { d[n++] = (char)('0' + v % 10); v /= 10; } while (v);
  while (n) out[at++] = d[--n];
  return at;
}
static void bad(const char *what, long r) {
  int k = put(0, what); k = num(k, (u64)-r); out[k++] = '\n';
  sys3(1, 1, (long)out, k);
}
static unsigned char buf[4096] __attribute__((aligned(4096)));
void cmain(long *sp) {
  char **argv = (char **)(sp + 1);
  u64 id = (u64)(argv[1][0] - '0');
  long fd = sys3(2, (long)argv[2], 01 | 040000, 0); /* O_WRONLY | O_DIRECT */
  if (fd < 0) { bad("BAD: open failed: ", fd); sys3(60, 1, 0, 0); }
  u64 pace = 0; /* us between writes (argv[3]) */
  for (const char *p = argv[3]; p && *p; p++) pace = pace * 10 + (u64)(*p - '0');
  struct ts nap = { (long)(pace / 1000000), (long)(pace % 1000000 * 1000) };
  u64 n = 0, prev = 0, max = 0, max_at = 0;
  for (;;) {
    if (pace) sys3(35, (long)&nap, 0, 0); /* nanosleep */
    struct ts st[18];
    if (sys3(4, (long)"/tmp/stop", (long)st, 0) == 0) break; /* stat */
    for (int i = 0; i < 4096; i += 8) *(u64 *)(buf + i) = (id << 56) ^ (n * 4096 + i);
    long r = sys4(18, fd, (long)buf, 4096, (long)((id * 256 + n % 256) * 4096)); /* pwrite */
    if (r != 4096) bad("BAD: write returned -", r);
    r = sys3(74, fd, 0, 0); /* fsync */
    if (r != 0) bad("BAD: fsync returned -", r);
    u64 t = now();
    if (n > 0 && t - prev > max) { max = t - prev; max_at = t; }
    prev = t;
    n++;
    int k = num(0, id); out[k++] = ' '; k = num(k, t); k = put(k, " .\n");
    sys3(1, 1, (long)out, k);
  }
  int k = put(0, "GAP: "); k = num(k, id); out[k++] = ' '; k = num(k, max); out[k++] = ' ';
  k = num(k, max_at); out[k++] = ' '; k = num(k, n); out[k++] = '\n';
  sys3(1, 1, (long)out, k);
  sys3(60, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n xor %rbp, %rbp\n mov %rsp, %rdi\n and $-16, %rsp\n call cmain\n hlt\n");
"#;

/// The guest's script around the writer: `@WRITER@` is its base64.
const SCRIPT: &str = r#"
stty -echo 2>/dev/null || true
base64 -d > /tmp/w <<'EOF'
@WRITER@
EOF
chmod +x /tmp/w
taskset 1 /tmp/w 0 /dev/vda @PACE@ &
taskset 2 /tmp/w 1 /dev/vda @PACE@ &
echo "WRITING: yes"
while read -r cmd; do
  [ "$cmd" = stop ] && break
done
touch /tmp/stop
wait
if dmesg | grep -q "I/O error"; then echo "BAD: the kernel saw an I/O error"; fi
"#;

struct Scale {
    rounds: usize,
    /// How long the guest writes before the migration, and after it.
    before: Duration,
    after: Duration,
}

fn main() {
    let quick = std::env::var("REWIND_BENCH_QUICK").is_ok_and(|v| v == "1");
    let rounds = match std::env::var("REWIND_BENCH_ROUNDS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| fail(&format!("REWIND_BENCH_ROUNDS={v}: not a number"))),
        Err(_) => 3,
    };
    let scale = match quick {
        true => Scale {
            rounds: 1,
            before: Duration::from_secs(1),
            after: Duration::from_secs(1),
        },
        false => Scale {
            rounds,
            before: Duration::from_secs(3),
            after: Duration::from_secs(2),
        },
    };
    preflight();
    cleanup_on_signals();
    let work = tempfile::tempdir().expect("tempdir");
    // REWIND_BENCH_PACE_US: the writers' pause before each write (see the
    // module's comment for why it is not 0 by default).
    let pace: u64 = match std::env::var("REWIND_BENCH_PACE_US") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| fail(&format!("REWIND_BENCH_PACE_US={v}: not a number"))),
        Err(_) => DEFAULT_PACE_US,
    };
    let script = SCRIPT
        .replace("@WRITER@", &build_writer(work.path()))
        .replace("@PACE@", &pace.to_string());
    // Built once, before the first guest (guest-tests/build.sh).
    common::guest::guest();

    let started = Instant::now();
    let (mut rewind, mut qsd) = (Runs::default(), Runs::default());
    let mut failures = Vec::new();
    for round in 0..scale.rounds {
        // Alternating: rewind first in even rounds, qemu-storage-daemon in
        // odd ones.
        let order = match round % 2 {
            0 => [System::Rewind, System::Qsd],
            _ => [System::Qsd, System::Rewind],
        };
        for system in order {
            // REWIND_BENCH_ONLY=rewind|qsd runs one system alone.
            if std::env::var("REWIND_BENCH_ONLY").is_ok_and(|only| only != system.key()) {
                continue;
            }
            let runs = match system {
                System::Rewind => &mut rewind,
                System::Qsd => &mut qsd,
            };
            if let Err(why) = measure(system, round, &script, &scale, runs) {
                failures.push(format!("round {} {}: {why}", round + 1, system.name()));
            }
        }
    }
    println!("{}", table(&rewind, &qsd));
    println!(
        "{} round(s) of each, {:.0} s in all, load average now {}",
        scale.rounds,
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        std::process::exit(1);
    }
}

/// A system's samples, and the runs whose guest crashed after the
/// migration.
#[derive(Default)]
struct Runs {
    samples: Vec<Sample>,
    crashed: Vec<Sample>,
}

/// A guest that crashes after the migration (see the module's comment)
/// gives no gap: its round runs again, up to this many times in all.
const ATTEMPTS: usize = 3;

/// One round of `system`: a sample in `runs`, or why not.
fn measure(
    system: System,
    round: usize,
    script: &str,
    scale: &Scale,
    runs: &mut Runs,
) -> Result<(), String> {
    for attempt in 1..=ATTEMPTS {
        let load = loadavg();
        note(&format!(
            "round {} ({attempt}): {} (load average {load})",
            round + 1,
            system.name()
        ));
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match system {
            System::Rewind => rewind_round(script, scale),
            System::Qsd => qsd_round(script, scale),
        }));
        let mut sample = run.map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })?;
        sample.load = load;
        note(&format!("{}: {sample:?}", system.name()));
        match sample.guest_failed {
            None => {
                runs.samples.push(sample);
                return Ok(());
            }
            Some(_) => runs.crashed.push(sample),
        }
    }
    Err(format!(
        "the guest crashed after the migration in {ATTEMPTS} runs"
    ))
}

#[derive(Clone, Copy)]
enum System {
    Rewind,
    Qsd,
}

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Rewind => "rewind",
            System::Qsd => "qsd",
        }
    }

    fn name(self) -> &'static str {
        match self {
            System::Rewind => "rewind-blk handover",
            System::Qsd => "qemu-storage-daemon, shared image",
        }
    }
}

/// What one round measured.
#[derive(Debug, Default)]
struct Sample {
    /// The guest's longest gap between two completed writes (its clock).
    longest_gap_ms: f64,
    /// Whether that gap is the one across the migration.
    longest_is_migration: bool,
    /// The gap across the migration: in the guest's clock, and between the
    /// console lines as they reached the host.
    migration_gap_ms: f64,
    migration_wall_ms: f64,
    downtime_ms: f64,
    total_ms: f64,
    /// Completed writes per second (both writers) before the migration.
    writes_per_s: f64,
    /// rewind: status.handover on the source and the destination.
    source_seal_ms: Option<f64>,
    source_switch_ms: Option<f64>,
    destination_seal_ms: Option<f64>,
    start_to_serve_ms: Option<f64>,
    load: String,
    /// The destination guest failed after the migration: why.
    guest_failed: Option<String>,
}

fn fail(why: &str) -> ! {
    eprintln!("handover bench: {why}");
    std::process::exit(2)
}

/// Clear errors for what the bench needs from the machine.
fn preflight() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        fail("needs root (network namespaces for the two hosts)");
    }
    for (program, flag, package) in [
        (QEMU, "--version", "qemu-system-x86 (ci/install-deps.sh)"),
        (QSD, "--version", "qemu-utils 7.2 (ci/install-deps.sh)"),
        ("ip", "-V", "iproute2"),
        (
            "cc",
            "--version",
            "gcc (the guest's writer is built with it)",
        ),
        ("base64", "--version", "coreutils"),
    ] {
        match Command::new(program).arg(flag).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => fail(&format!("`{program} {flag}` failed: {}", out.status)),
            Err(e) => fail(&format!("cannot run {program} ({e}): install {package}")),
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP (a `timeout`, say) no drop runs: kill
/// this process's children (QEMUs and daemons, whose `ip netns exec`
/// exec'd them) and delete its namespaces, then exit.
fn cleanup_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).expect("signal handler");
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            eprintln!("handover bench: signal {signal}: killing its children");
            let me = std::process::id();
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                // pid (comm) state ppid ...
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(me) {
                    // SAFETY: kill(2) on a child of this process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let prefix = format!("rw{me:x}n");
            for entry in std::fs::read_dir("/run/netns")
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
            std::process::exit(128 + signal);
        }
    });
}

/// Builds the guest's writer; returns it in base64.
fn build_writer(dir: &Path) -> String {
    let source = dir.join("writer.c");
    let binary = dir.join("writer");
    std::fs::write(&source, WRITER_C).expect("write writer.c");
    let out = Command::new("cc")
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-stack-protector",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-s",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("run cc");
    if !out.status.success() {
        fail(&format!(
            "building the guest's writer failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = Command::new("base64")
        .arg(&binary)
        .output()
        .expect("run base64");
    assert!(out.status.success(), "base64 failed");
    String::from_utf8(out.stdout).expect("base64 is ASCII")
}

fn note(what: &str) {
    eprintln!(
        "{} {what}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}

fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The child is killed if the bench dies without running its drops.
fn dies_with_bench(command: &mut Command) {
    // SAFETY: the hook only calls prctl(2), which is async-signal-safe and
    // sets an attribute of the child.
    unsafe {
        command.pre_exec(
            || match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            },
        );
    }
}

/// A guest QEMU on `host` with its disk on `socket` and a QMP socket; the
/// destination waits for the migration on `incoming`. The same command
/// line for both systems (and the one tests/guest_handover.rs uses).
fn start_qemu(
    host: &Host,
    socket: &Path,
    script: &str,
    qmp: &Path,
    incoming: Option<&Path>,
) -> Guest {
    let mut qemu = host.command(QEMU);
    dies_with_bench(&mut qemu);
    qemu.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(path) = incoming {
        qemu.arg("-incoming")
            .arg(format!("unix:{}", path.display()));
    }
    let config = GuestConfig {
        append: "loglevel=6 edd=off",
        smp: VCPUS,
        queues: QUEUES,
        migrates: true,
        ..GuestConfig::default()
    };
    Guest::start(qemu, socket, script, config)
}

/// One completed write the guest reported: its writer, the guest's clock
/// (us), when the line reached the host, and whether the destination
/// printed it.
#[derive(Clone, Copy)]
struct Mark {
    writer: usize,
    guest_us: u64,
    at: Instant,
    on_destination: bool,
}

/// What a guest printed, parsed.
#[derive(Default)]
struct Console {
    marks: Vec<Mark>,
    /// Per writer: longest gap (us), its end (us), writes.
    gaps: [Option<(u64, u64, u64)>; 2],
    bad: Vec<String>,
    result: Option<String>,
    writing: bool,
}

impl Console {
    fn take(&mut self, line: &str, at: Instant, on_destination: bool) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [w @ ("0" | "1"), t, "."] = words[..] {
            if let Ok(guest_us) = t.parse() {
                self.marks.push(Mark {
                    writer: usize::from(w == "1"),
                    guest_us,
                    at,
                    on_destination,
                });
            }
        } else if let Some(rest) = line.split_once("GAP: ").map(|(_, r)| r) {
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if let [w @ (0 | 1), gap, end, n] = v[..] {
                self.gaps[w as usize] = Some((gap, end, n));
            }
        } else if line.contains("BAD:") {
            self.bad.push(line.to_owned());
        } else if let Some((_, r)) = line.split_once("GUEST-RESULT: ") {
            self.result = Some(r.trim().to_owned());
        } else if line.contains("WRITING: yes") {
            self.writing = true;
        }
    }

    /// Reads `guest`'s lines until `done` holds; false if QEMU exited
    /// first. Lines come at least every few ms while the guest writes, and
    /// the guest's own limit (common::guest::BOOT_LIMIT) bounds the wait.
    fn read(
        &mut self,
        guest: &mut Guest,
        on_destination: bool,
        mut done: impl FnMut(&Console) -> bool,
    ) -> bool {
        while !done(self) {
            let Some(line) = guest.next_line() else {
                return false;
            };
            self.take(&line, guest.last_at(), on_destination);
        }
        true
    }

    /// The first mark the destination printed.
    fn first_on_destination(&self) -> Option<Instant> {
        self.marks.iter().find(|m| m.on_destination).map(|m| m.at)
    }
}

/// Boots the source guest and lets it write for `before`; returns the
/// writes per second it made meanwhile.
fn warm_up(source: &mut Guest, console: &mut Console, before: Duration) -> f64 {
    assert!(
        console.read(source, false, |c| c.writing),
        "the source guest ended at boot:\n{}",
        source.console()
    );
    let start = Instant::now();
    let from = console.marks.len();
    // The writes themselves pace the reads: at least one line per write.
    assert!(
        console.read(source, false, |c| c
            .marks
            .last()
            .is_some_and(|m| m.at >= start + before)),
        "the source guest ended:\n{}",
        source.console()
    );
    (console.marks.len() - from) as f64 / start.elapsed().as_secs_f64()
}

/// Polls query-migrate (every 20 ms) until the migration completed;
/// returns QEMU's answer.
fn migration_completed(qmp: &mut Qmp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let last = qmp.run("query-migrate", Value::Null);
        match last["status"].as_str().unwrap_or_default() {
            "completed" => return last,
            "failed" | "cancelled" => panic!("the migration failed: {last}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration still running: {last}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Migrates from `source_qmp` to `incoming`; then ends the source QEMU
/// and reads what it printed (all before the migration's stop; a line cut
/// by the stop arrives when QEMU exits and is left out).
fn migrate(
    source: &mut Guest,
    source_qmp: &Path,
    incoming: &Path,
    console: &mut Console,
    armed: impl FnOnce(),
) -> Value {
    let mut qmp = Qmp::connect(source_qmp);
    wait_until(
        "the destination's migration socket",
        Duration::from_secs(60),
        || incoming.exists(),
    );
    armed();
    qmp.run(
        "migrate",
        json!({ "uri": format!("unix:{}", incoming.display()) }),
    );
    let done = migration_completed(&mut qmp);
    let quit_at = Instant::now();
    // QEMU answers, then exits.
    let _ = qmp.try_run("quit", Value::Null);
    let mut tail = Console::default();
    tail.read(source, false, |_| false);
    console
        .marks
        .extend(tail.marks.into_iter().filter(|m| m.at < quit_at));
    console.bad.extend(tail.bad);
    done
}

/// Reads the destination until it wrote for `after`, stops the writers
/// and reads the rest; checks the guest saw no error.
/// The guest's failure (its first kernel or `BAD:` line) is an outcome of
/// the round, kept in the table; its console goes to stderr.
/// A guest that hangs instead is ended through `qmp` after FINISH_LIMIT.
fn finish(
    destination: &mut Guest,
    qmp: &Path,
    console: &mut Console,
    after: Duration,
) -> Result<(), String> {
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let qmp = qmp.to_owned();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(FINISH_LIMIT) != Err(RecvTimeoutError::Timeout) {
            return false;
        }
        // Pipelined: QEMU reads the commands after its greeting.
        if let Ok(mut stream) = UnixStream::connect(&qmp) {
            let quit = "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n";
            let _ = stream.write_all(quit.as_bytes());
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        }
        true
    });
    let written = console.read(destination, true, |c| {
        c.first_on_destination()
            .is_some_and(|first| c.marks.last().is_some_and(|m| m.at >= first + after))
    });
    if written {
        destination.send("stop\n");
        console.read(destination, true, |_| false);
    }
    let _ = done.send(());
    let hung = watchdog.join().unwrap_or(false);
    if written && console.bad.is_empty() && console.result.as_deref() == Some("0") {
        return Ok(());
    }
    let text = destination.console().to_owned();
    note(&format!(
        "the destination guest failed; its console:\n{text}"
    ));
    let first = text.lines().find(|l| {
        ["BUG:", "Oops", "Kernel panic", "BAD:"]
            .iter()
            .any(|k| l.contains(k))
    });
    Err(match (first, hung) {
        (Some(line), _) => line.trim().to_owned(),
        (None, true) => format!("the destination guest hung (not done in {FINISH_LIMIT:?}): ended"),
        (None, false) => "the destination guest ended without its report".to_owned(),
    })
}

/// The measures from what the guest printed, and QEMU's; only QEMU's if
/// the guest failed.
fn sample(
    console: &Console,
    migration: &Value,
    writes_per_s: f64,
    guest: Result<(), String>,
) -> Sample {
    let mut s = Sample {
        writes_per_s,
        downtime_ms: migration["downtime"].as_f64().expect("downtime"),
        total_ms: migration["total-time"].as_f64().unwrap_or(f64::NAN),
        ..Sample::default()
    };
    if let Err(why) = guest {
        s.guest_failed = Some(why);
        s.longest_gap_ms = f64::NAN;
        s.migration_gap_ms = f64::NAN;
        s.migration_wall_ms = f64::NAN;
        return s;
    }
    for writer in 0..2 {
        let (gap, end, _) = console.gaps[writer].expect("the writer's GAP line");
        let marks: Vec<Mark> = console
            .marks
            .iter()
            .copied()
            .filter(|m| m.writer == writer)
            .collect();
        let last_source = marks
            .iter()
            .rfind(|m| !m.on_destination)
            .copied()
            .expect("writes on the source");
        // After the last write the source printed: the destination's
        // lines (some may have waited in the guest's serial buffer through
        // the stop), in the guest's order. The migration's gap is the
        // longest step among the first of them.
        let mut after: Vec<Mark> = marks
            .iter()
            .copied()
            .filter(|m| m.on_destination && m.guest_us > last_source.guest_us)
            .collect();
        after.sort_by_key(|m| m.guest_us);
        let mut prev = last_source;
        let (mut best_gap, mut best_wall) = (0u64, 0.0f64);
        for m in after.iter().take(20) {
            let step = m.guest_us - prev.guest_us;
            if step > best_gap {
                best_gap = step;
                // The start's line reached the host from the source, or
                // waited in the guest: then the source's last line is the
                // closest the host saw.
                let from = match prev.on_destination {
                    false => prev.at,
                    true => last_source.at,
                };
                best_wall = m.at.duration_since(from).as_secs_f64() * 1e3;
            }
            prev = *m;
        }
        let gap_ms = gap as f64 / 1e3;
        if gap_ms > s.longest_gap_ms {
            s.longest_gap_ms = gap_ms;
            // The longest gap ends at the migration's gap's end.
            s.longest_is_migration = after
                .iter()
                .take(20)
                .any(|m| m.guest_us == end && gap == best_gap);
        }
        s.migration_gap_ms = s.migration_gap_ms.max(best_gap as f64 / 1e3);
        s.migration_wall_ms = s.migration_wall_ms.max(best_wall);
    }
    s
}

/// The handover's status on `daemon` once it is done.
fn handover_done(daemon: &Daemon) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = daemon.status()["handover"].clone();
        if status["state"] == "done" {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no handover done on {} in 120 s: {status}",
            daemon.name
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rewind_round(script: &str, scale: &Scale) -> Sample {
    let twins = Twins::start_with(&[], QUEUES);
    let dir = twins.a.vol.dir.path();
    let (src_qmp, dst_qmp, incoming) = (
        dir.join("src.qmp"),
        dir.join("dst.qmp"),
        dir.join("migrate.sock"),
    );
    let mut console = Console::default();
    let mut source = start_qemu(&twins.hosts.a, &twins.a.vol.socket, script, &src_qmp, None);
    let rate = warm_up(&mut source, &mut console, scale.before);
    let mut destination = start_qemu(
        &twins.hosts.b,
        &twins.b.vol.socket,
        script,
        &dst_qmp,
        Some(&incoming),
    );
    wait_until("a client on B", Duration::from_secs(60), || {
        !twins.b.status()["attached"].is_null()
    });
    let arm = || {
        streaming(&twins.a, &twins.b);
        let armed = twins.a.ctl("handover", json!({ "timeout_ms": 60_000 }));
        assert_eq!(armed["state"], "armed", "{armed}");
    };
    let migration = migrate(&mut source, &src_qmp, &incoming, &mut console, arm);
    let on_source = handover_done(&twins.a);
    let on_destination = handover_done(&twins.b);
    assert_eq!(twins.b.status()["role"], "primary");
    let guest = finish(&mut destination, &dst_qmp, &mut console, scale.after);
    let mut s = sample(&console, &migration, rate, guest);
    s.source_seal_ms = on_source["seal_ms"].as_f64();
    s.source_switch_ms = on_source["switch_ms"].as_f64();
    s.destination_seal_ms = on_destination["seal_ms"].as_f64();
    s.start_to_serve_ms = on_destination["start_to_serve_ms"].as_f64();
    s
}

/// A qemu-storage-daemon exporting `image` over vhost-user-blk on
/// `socket`, inside `host`'s namespace; killed on drop.
struct Qsd {
    child: Child,
}

impl Qsd {
    fn start(host: &Host, image: &Path, socket: &Path, log: &Path) -> Qsd {
        let mut command = host.command(QSD);
        dies_with_bench(&mut command);
        let child = command
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},locking=off",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={QUEUES}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("qsd log"))
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot run {QSD} ({e})")));
        let mut qsd = Qsd { child };
        wait_until(
            "qemu-storage-daemon's socket",
            Duration::from_secs(30),
            || {
                if let Some(status) = qsd.child.try_wait().expect("try_wait") {
                    panic!(
                        "{QSD} exited at start ({status}): {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
                socket.exists()
            },
        );
        qsd
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qsd_round(script: &str, scale: &Scale) -> Sample {
    let hosts = HostPair::new();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    // Written out, not sparse: a shared image is allocated.
    let image = dir.join("shared.raw");
    std::fs::write(&image, vec![0u8; IMAGE_BYTES as usize]).expect("write the image");
    let path = |name: &str| -> PathBuf { dir.join(name) };
    let _a = Qsd::start(&hosts.a, &image, &path("a.sock"), &path("a.log"));
    let _b = Qsd::start(&hosts.b, &image, &path("b.sock"), &path("b.log"));
    let (src_qmp, dst_qmp, incoming) = (path("src.qmp"), path("dst.qmp"), path("migrate.sock"));
    let mut console = Console::default();
    let mut source = start_qemu(&hosts.a, &path("a.sock"), script, &src_qmp, None);
    let rate = warm_up(&mut source, &mut console, scale.before);
    let mut destination = start_qemu(&hosts.b, &path("b.sock"), script, &dst_qmp, Some(&incoming));
    let migration = migrate(&mut source, &src_qmp, &incoming, &mut console, || {});
    let guest = finish(&mut destination, &dst_qmp, &mut console, scale.after);
    sample(&console, &migration, rate, guest)
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    match v.len() % 2 {
        1 => v[v.len() / 2],
        _ => (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0,
    }
}

/// One row: the values per round and their median.
fn row(out: &mut String, what: &str, samples: &[Sample], get: impl Fn(&Sample) -> Option<f64>) {
    let values: Vec<f64> = samples.iter().map(|s| get(s).unwrap_or(f64::NAN)).collect();
    let each: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
    let _ = writeln!(
        out,
        "| {what} | {} | {:.1} |",
        each.join(" / "),
        median(&values)
    );
}

/// A column of the samples.
type Measure = fn(&Sample) -> Option<f64>;

fn table(rewind_runs: &Runs, qsd_runs: &Runs) -> String {
    let (rewind, qsd) = (&rewind_runs.samples[..], &qsd_runs.samples[..]);
    let mut out = String::from("| measure | per round | median |\n|---|---|---|\n");
    let both: [(&str, &[Sample]); 2] = [("rewind", rewind), ("qsd", qsd)];
    let measures: [(&str, Measure); 6] = [
        ("guest's longest gap between completed writes, ms", |s| {
            Some(s.longest_gap_ms)
        }),
        ("the migration's gap, guest clock, ms", |s| {
            Some(s.migration_gap_ms)
        }),
        (
            "the migration's gap, wall clock (console lines on the host), ms",
            |s| Some(s.migration_wall_ms),
        ),
        ("QEMU downtime, ms", |s| Some(s.downtime_ms)),
        ("QEMU total-time, ms", |s| Some(s.total_ms)),
        ("writes/s before the migration (both writers)", |s| {
            Some(s.writes_per_s)
        }),
    ];
    for (what, get) in measures {
        for (name, samples) in both {
            row(&mut out, &format!("{name}: {what}"), samples, get);
        }
    }
    row(&mut out, "rewind: source seal_ms", rewind, |s| {
        s.source_seal_ms
    });
    row(&mut out, "rewind: source switch_ms", rewind, |s| {
        s.source_switch_ms
    });
    row(&mut out, "rewind: destination seal_ms", rewind, |s| {
        s.destination_seal_ms
    });
    row(
        &mut out,
        "rewind: destination start_to_serve_ms",
        rewind,
        |s| s.start_to_serve_ms,
    );
    let spans = |samples: &[Sample]| -> String {
        let v: Vec<&str> = samples
            .iter()
            .map(|s| match s.longest_is_migration {
                true => "yes",
                false => "no",
            })
            .collect();
        v.join(" / ")
    };
    let loads = |samples: &[Sample]| -> String {
        let v: Vec<&str> = samples.iter().map(|s| s.load.as_str()).collect();
        v.join(" / ")
    };
    let _ = writeln!(
        out,
        "| rewind: the longest gap is the migration's | {} | |",
        spans(rewind)
    );
    let _ = writeln!(
        out,
        "| qsd: the longest gap is the migration's | {} | |",
        spans(qsd)
    );
    for (name, runs) in [("rewind", rewind_runs), ("qsd", qsd_runs)] {
        let why: Vec<&str> = runs
            .crashed
            .iter()
            .filter_map(|s| s.guest_failed.as_deref())
            .collect();
        let _ = writeln!(
            out,
            "| {name}: runs whose guest crashed after the migration (run again) | {} of {}{} | |",
            runs.crashed.len(),
            runs.crashed.len() + runs.samples.len(),
            why.iter().map(|w| format!(": {w}")).collect::<String>()
        );
    }
    let _ = writeln!(
        out,
        "| rewind: load average at the start | {} | |",
        loads(rewind)
    );
    let _ = writeln!(out, "| qsd: load average at the start | {} | |", loads(qsd));

    let m = |samples: &[Sample], get: fn(&Sample) -> f64| -> f64 {
        median(&samples.iter().map(get).collect::<Vec<_>>())
    };
    let (r_gap, q_gap) = (
        m(rewind, |s| s.longest_gap_ms),
        m(qsd, |s| s.longest_gap_ms),
    );
    let (r_wall, q_wall) = (
        m(rewind, |s| s.migration_wall_ms),
        m(qsd, |s| s.migration_wall_ms),
    );
    let (r_down, q_down) = (m(rewind, |s| s.downtime_ms), m(qsd, |s| s.downtime_ms));
    let added_gap = r_gap - q_gap;
    let added_wall = (r_wall - r_down) - (q_wall - q_down);
    let verdict = |added: f64| match added < 100.0 {
        true => "met",
        false => "not met",
    };
    let _ = writeln!(
        out,
        "\nGuest's longest gap, rewind / qsd (medians): {r_gap:.1} / {q_gap:.1} ms, ratio {:.2}x; \
         the handover adds {added_gap:.1} ms in the guest's clock (goal: under 100 ms): {}.",
        r_gap / q_gap,
        verdict(added_gap)
    );
    let _ = writeln!(
        out,
        "Wall-clock pause beyond QEMU's downtime, rewind / qsd (medians): {:.1} / {:.1} ms: the \
         handover adds {added_wall:.1} ms (goal: under 100 ms): {}.",
        r_wall - r_down,
        q_wall - q_down,
        verdict(added_wall)
    );
    out
}
