//! Handover with a real live migration (QEMU 7.2, TCG) between two hosts
//! on one machine (common/twins.rs): the guest runs on host A, whose
//! rewind-blk is the primary; a destination QEMU waits with `-incoming`
//! on host B, connected to B's rewind-blk (the replica), parked at its
//! closed gate. `rewindctl handover` on A arms the switch; QMP `migrate`
//! on the source moves the VM. The guest writes all along, on two queues,
//! each write O_DIRECT and fsync'd and read back at once, and at the end
//! checks every block it wrote against what it remembers (its memory
//! migrated with it): no IO error, no lost write, no old read.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::{assert_passed, field, Guest};
use common::qmp::Qmp;
use common::tmpfs::TmpfsJournal;
use common::twins::{number, streaming, Daemon, Twins};
use common::wait_until;
use serde_json::{json, Value};

/// The guest: two writers (one per vCPU, so both queues carry IO) until
/// the test types `stop`; then each block's last content is checked, and
/// the longest gap between two completed writes is reported. `burst`
/// writes 16 MiB at 32 MiB (checked at the end too).
const WRITER: &str = r#"
stty -echo 2>/dev/null || true
writer() {
  i=0
  while [ ! -e /tmp/stop ]; do
    b=$(( $1 * 256 + i % 256 ))
    dd if=/dev/urandom of=/tmp/d$1 bs=4k count=1 2>/dev/null
    dd if=/tmp/d$1 of=/dev/vda bs=4k seek=$b count=1 oflag=direct conv=fsync 2>/dev/null || echo "BAD: writing block $b failed"
    dd if=/dev/vda of=/tmp/r$1 bs=4k skip=$b count=1 iflag=direct 2>/dev/null || echo "BAD: reading block $b failed"
    cmp -s /tmp/d$1 /tmp/r$1 || echo "BAD: block $b read back other data"
    echo "$b $(md5sum < /tmp/d$1 | cut -d' ' -f1)" >> /tmp/log$1
    read up rest < /proc/uptime
    echo "$up" >> /tmp/t$1
    i=$((i + 1))
  done
  echo "$i" > /tmp/done$1
}
writer 0 &
writer 1 &
echo "WRITING: yes"
while read -r cmd; do
  case "$cmd" in
    progress) echo "WRITES: $(cat /tmp/log0 /tmp/log1 | wc -l)" ;;
    burst)
      dd if=/dev/urandom of=/tmp/burst bs=1M count=16 2>/dev/null
      dd if=/tmp/burst of=/dev/vda bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null || echo "BAD: the burst failed"
      md5sum < /tmp/burst | cut -d' ' -f1 > /tmp/burstsum
      rm /tmp/burst
      echo "BURST: done" ;;
    stop) break ;;
  esac
done
touch /tmp/stop
wait
cat /tmp/log0 /tmp/log1 | awk '{ last[$1] = $2 } END { for (b in last) print b, last[b] }' > /tmp/last
n=0
while read -r b sum; do
  got=$(dd if=/dev/vda bs=4k skip=$b count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$sum" ] || echo "BAD: block $b holds $got, the guest wrote $sum last"
  n=$((n + 1))
done < /tmp/last
if [ -e /tmp/burstsum ]; then
  got=$(dd if=/dev/vda bs=1M skip=32 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/burstsum)" ] || echo "BAD: the burst's 16 MiB read back other data"
fi
echo "BLOCKS: $n"
echo "TOTAL-WRITES: $(cat /tmp/log0 /tmp/log1 | wc -l)"
for w in 0 1; do awk 'NR > 1 { g = $1 - p; if (g > m) m = g } { p = $1 } END { printf "%d\n", m * 1000 }' /tmp/t$w; done | sort -n | tail -n 1 | sed 's/^/MAX-GAP-MS: /'
if dmesg | grep -q "I/O error"; then echo "BAD: the kernel saw an I/O error"; fi
"#;

/// A guest QEMU with a QMP socket, on host A or B; the destination waits
/// for an incoming migration on `incoming`.
fn start_qemu(twins: &Twins, on_a: bool, qmp: &Path, incoming: Option<&Path>) -> Guest {
    let mut args = vec![
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    if let Some(path) = incoming {
        args.extend(["-incoming".to_owned(), format!("unix:{}", path.display())]);
    }
    twins.migratable_guest(on_a, WRITER, 2, 2, &args)
}

/// Waits until the daemon has a client attached.
fn attached(daemon: &Daemon) {
    wait_until(
        &format!("a client on {}", daemon.name),
        Duration::from_secs(60),
        || !daemon.status()["attached"].is_null(),
    );
}

/// How many writes the guest has completed. The kernel may print into the
/// middle of the answer (`WRITES: 0[    3.46] random: crng init done`),
/// so only its leading digits count; an answer lost or cut in two (the
/// migration sent its start out through the source's console) is asked
/// for again.
fn writes(guest: &mut Guest) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "the guest stopped answering:\n{}",
            guest.console()
        );
        guest.send("progress\n");
        let Some(line) = guest.wait_for_within("WRITES: ", Duration::from_secs(30)) else {
            continue;
        };
        let value = field(&line, "WRITES");
        let digits = value
            .find(|c: char| !c.is_ascii_digit())
            .map_or(value, |end| &value[..end]);
        if let Ok(count) = digits.parse() {
            return count;
        }
    }
}

fn wait_writes(guest: &mut Guest, more: u64) {
    let start = writes(guest);
    let deadline = Instant::now() + Duration::from_secs(120);
    while writes(guest) < start + more {
        assert!(
            Instant::now() < deadline,
            "the guest stopped writing:\n{}",
            guest.console()
        );
    }
}

/// The handover's status on `daemon`, once it reached `state`.
fn handover_state(daemon: &Daemon, state: &str) -> Value {
    let mut last = Value::Null;
    wait_until(
        &format!("handover {state} on {}", daemon.name),
        Duration::from_secs(120),
        || {
            last = daemon.status()["handover"].clone();
            last["state"] == state
        },
    );
    last
}

/// Migrates the guest from `from_qmp` to a QEMU waiting on `to_incoming`,
/// with a handover armed on `primary`; returns QEMU's downtime and the
/// source's handover status.
fn migrate_with_handover(
    primary: &Daemon,
    replica: &Daemon,
    from_qmp: &mut Qmp,
    to_incoming: &Path,
) -> (u64, Value) {
    streaming(primary, replica);
    wait_until(
        "the destination's migration socket",
        Duration::from_secs(60),
        || to_incoming.exists(),
    );
    let armed = primary.ctl("handover", json!({ "timeout_ms": 60_000 }));
    assert_eq!(armed["state"], "armed", "{armed}");
    migrate_with_handover_armed(primary, replica, from_qmp, to_incoming)
}

/// The same, with the handover armed already.
fn migrate_with_handover_armed(
    primary: &Daemon,
    replica: &Daemon,
    from_qmp: &mut Qmp,
    to_incoming: &Path,
) -> (u64, Value) {
    streaming(primary, replica);
    from_qmp.run(
        "migrate",
        json!({ "uri": format!("unix:{}", to_incoming.display()) }),
    );
    let done = from_qmp.wait_migration(&["completed"], Duration::from_secs(180));
    let source = handover_state(primary, "done");
    let destination = handover_state(replica, "done");
    assert_eq!(replica.status()["role"], "primary");
    assert_eq!(primary.status()["role"], "replica");
    eprintln!(
        "handover {} -> {}: migration downtime {} ms (QEMU), source {source}, destination \
         {destination}",
        primary.name, replica.name, done["downtime"]
    );
    (number(&done, "downtime"), source)
}

fn stop_and_check(mut guest: Guest) -> (String, u64) {
    guest.send("stop\n");
    let console = guest.finish();
    assert_passed(&console);
    assert!(!console.contains("BAD:"), "{console}");
    let gap = field(&console, "MAX-GAP-MS").parse().expect("a gap");
    (console, gap)
}

fn paths(twins: &Twins) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = twins.a.vol.dir.path();
    (
        dir.join("src.qmp"),
        dir.join("dst.qmp"),
        dir.join("migrate.sock"),
        dir.join("back.qmp"),
    )
}

#[test]
fn a_live_migration_with_a_handover_moves_the_primary_role_and_back_with_every_write() {
    let twins = Twins::start_with(&[], 2);
    let (src_qmp, dst_qmp, migration, back_qmp) = paths(&twins);
    let mut source = start_qemu(&twins, true, &src_qmp, None);
    source.wait_for("WRITING: yes");
    wait_writes(&mut source, 20);
    let mut destination = start_qemu(&twins, false, &dst_qmp, Some(&migration));
    attached(&twins.b);
    let mut qmp = Qmp::connect(&src_qmp);
    let (downtime, status) = migrate_with_handover(&twins.a, &twins.b, &mut qmp, &migration);
    assert!(number(&status, "sealed_lsn") > 0, "{status}");
    drop(source);
    wait_writes(&mut destination, 20);

    // And back to A: B is the primary, A its replica.
    let back_migration = twins.b.vol.dir.path().join("back.sock");
    let mut back = start_qemu(&twins, true, &back_qmp, Some(&back_migration));
    attached(&twins.a);
    let mut dst = Qmp::connect(&dst_qmp);
    let (back_downtime, _) = migrate_with_handover(&twins.b, &twins.a, &mut dst, &back_migration);
    drop(destination);
    wait_writes(&mut back, 20);
    let (console, gap) = stop_and_check(back);
    eprintln!(
        "guest: {} writes over {} blocks, longest pause {gap} ms; QEMU downtimes {downtime} and \
         {back_downtime} ms",
        field(&console, "TOTAL-WRITES"),
        field(&console, "BLOCKS")
    );
}

/// Arms a handover on A and runs a migration to B's waiting QEMU up to
/// the switchover, where QEMU pauses (`pause-before-switchover`): the
/// source's device is stopped, A sealed and offered, B waits for its
/// client. Returns the source's QMP.
fn migrate_to_switchover(twins: &Twins, src_qmp: &Path, migration: &Path) -> Qmp {
    let mut qmp = Qmp::connect(src_qmp);
    streaming(&twins.a, &twins.b);
    wait_until(
        "the destination's migration socket",
        Duration::from_secs(60),
        || migration.exists(),
    );
    qmp.run(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "pause-before-switchover", "state": true }] }),
    );
    let armed = twins.a.ctl("handover", json!({ "timeout_ms": 120_000 }));
    assert_eq!(armed["state"], "armed", "{armed}");
    qmp.run(
        "migrate",
        json!({ "uri": format!("unix:{}", migration.display()) }),
    );
    qmp.wait_migration(&["pre-switchover"], Duration::from_secs(180));
    handover_state(&twins.b, "switching");
    assert_eq!(twins.a.status()["role"], "replica", "A sealed");
    qmp
}

/// A writing guest on A and a destination QEMU on B, migrated up to the
/// switchover with a handover armed.
fn at_switchover(twins: &Twins) -> (Guest, Guest, Qmp) {
    let (src_qmp, dst_qmp, migration, _) = paths(twins);
    let mut source = start_qemu(twins, true, &src_qmp, None);
    source.wait_for("WRITING: yes");
    wait_writes(&mut source, 20);
    let destination = start_qemu(twins, false, &dst_qmp, Some(&migration));
    attached(&twins.b);
    let qmp = migrate_to_switchover(twins, &src_qmp, &migration);
    (source, destination, qmp)
}

#[test]
fn a_migration_that_fails_after_the_switchover_rolls_back_and_the_source_writes_on() {
    let twins = Twins::start_with(&[], 2);
    let (mut source, mut destination, mut qmp) = at_switchover(&twins);
    // The destination dies before it runs; the migration fails.
    destination.kill();
    qmp.run("migrate-continue", json!({ "state": "pre-switchover" }));
    qmp.wait_migration(&["failed", "cancelled"], Duration::from_secs(60));
    qmp.run("cont", Value::Null);
    let source_side = handover_state(&twins.a, "rolled_back");
    let replica_side = handover_state(&twins.b, "rolled_back");
    eprintln!("rolled back: source {source_side}, replica {replica_side}");
    assert_eq!(twins.a.status()["role"], "primary");
    assert_eq!(twins.b.status()["role"], "replica");
    assert_eq!(
        twins.b.status()["io"]["completed"],
        0,
        "the destination was served nothing"
    );
    wait_writes(&mut source, 20);
    let (console, gap) = stop_and_check(source);
    eprintln!(
        "guest after the rollback: {} writes, longest pause {gap} ms",
        field(&console, "TOTAL-WRITES")
    );
    // B holds every record of A's new epoch too.
    streaming(&twins.a, &twins.b);
}

#[test]
fn a_primary_killed_during_the_switch_loses_nothing_and_rejoins_the_replica_that_took_over() {
    let mut twins = Twins::start_with(&[], 2);
    let (source, mut destination, mut qmp) = at_switchover(&twins);
    // A dies after its seal, before the verdict: B decides alone.
    twins.a.kill();
    qmp.run("migrate-continue", json!({ "state": "pre-switchover" }));
    qmp.wait_migration(&["completed"], Duration::from_secs(180));
    handover_state(&twins.b, "done");
    drop(source);
    wait_writes(&mut destination, 20);
    // A comes back as the sealed replica and follows B.
    twins.a.restart(&twins.hosts.a);
    streaming(&twins.b, &twins.a);
    assert_eq!(twins.a.status()["role"], "replica");
    let (console, gap) = stop_and_check(destination);
    eprintln!(
        "guest after its primary died mid-switch: {} writes, longest pause {gap} ms",
        field(&console, "TOTAL-WRITES")
    );
}

/// A writing guest on A, with a handover armed (no destination yet).
fn armed_source(twins: &Twins) -> Guest {
    let (src_qmp, ..) = paths(twins);
    let mut source = start_qemu(twins, true, &src_qmp, None);
    source.wait_for("WRITING: yes");
    streaming(&twins.a, &twins.b);
    let armed = twins.a.ctl("handover", json!({ "timeout_ms": 60_000 }));
    assert_eq!(armed["state"], "armed", "{armed}");
    source
}

/// Starts the destination on B and migrates with the armed handover;
/// returns the destination, which runs the guest now.
fn migrate_armed(twins: &Twins, source: Guest) -> Guest {
    let (src_qmp, dst_qmp, migration, _) = paths(twins);
    let destination = start_qemu(twins, false, &dst_qmp, Some(&migration));
    attached(&twins.b);
    let mut qmp = Qmp::connect(&src_qmp);
    wait_until(
        "the destination's migration socket",
        Duration::from_secs(60),
        || migration.exists(),
    );
    migrate_with_handover_armed(&twins.a, &twins.b, &mut qmp, &migration);
    drop(source);
    destination
}

#[test]
fn a_replica_killed_while_armed_takes_over_once_it_is_back() {
    let mut twins = Twins::start_with(&[], 2);
    let mut source = armed_source(&twins);
    // B dies and comes back; the handover stays armed on A and goes on
    // with it. (The destination starts after B is back: a destination
    // QEMU that reconnects while it waits for the migration is not
    // covered here.)
    twins.b.kill();
    twins.b.restart(&twins.hosts.b);
    wait_writes(&mut source, 20);
    assert_eq!(twins.a.status()["handover"]["state"], "armed");
    let mut destination = migrate_armed(&twins, source);
    wait_writes(&mut destination, 20);
    let (console, gap) = stop_and_check(destination);
    eprintln!(
        "guest after its replica died while armed: {} writes, longest pause {gap} ms",
        field(&console, "TOTAL-WRITES")
    );
}

#[test]
fn a_primary_killed_while_armed_forgets_the_handover_and_serves_on_until_armed_again() {
    let mut twins = Twins::start_with(&[], 2);
    let mut source = armed_source(&twins);
    // A dies and comes back: its guest reconnects and goes on; nothing is
    // armed any more (a migration now would not move the primary role).
    twins.a.kill();
    twins.a.restart(&twins.hosts.a);
    wait_until("A to serve again", Duration::from_secs(60), || {
        twins.a.status()["hold"].is_null()
    });
    assert!(twins.a.status()["handover"].is_null());
    wait_writes(&mut source, 20);
    let armed = twins.a.ctl("handover", json!({ "timeout_ms": 60_000 }));
    assert_eq!(armed["state"], "armed", "{armed}");
    let mut destination = migrate_armed(&twins, source);
    wait_writes(&mut destination, 20);
    let (console, gap) = stop_and_check(destination);
    eprintln!(
        "guest after its primary died while armed: {} writes, longest pause {gap} ms",
        field(&console, "TOTAL-WRITES")
    );
}

#[test]
fn a_primary_whose_storage_fails_detaches_and_its_guest_moves_with_a_handover() {
    // A's journal: 16 segments of 4 MiB, on a tmpfs the test fills.
    let mut tmpfs = None;
    let twins = Twins::start_custom(
        &["--journal-max", "64M"],
        &["--on-storage-error", "detach", "--io-error-hold", "2s"],
        2,
        |vol| tmpfs = Some(TmpfsJournal::over(vol, 256 << 20)),
    );
    // Unmounted after the daemons stopped.
    let tmpfs = tmpfs.as_ref().expect("the journal's tmpfs");
    let (src_qmp, dst_qmp, migration, _) = paths(&twins);
    let mut source = start_qemu(&twins, true, &src_qmp, None);
    source.wait_for("WRITING: yes");
    wait_writes(&mut source, 20);
    streaming(&twins.a, &twins.b);
    let epoch = number(&twins.a.status(), "epoch");

    // No room for a new segment: the burst's writes meet ENOSPC once the
    // prepared ones are used, and A detaches under them.
    tmpfs.fill();
    source.send("burst\n");
    source.wait_for("BURST: done");
    let detached = twins.a.replication()["detached"].clone();
    assert!(
        detached["summary"]
            .as_str()
            .is_some_and(|s| s.contains("No space left on device")),
        "{detached}"
    );
    assert_eq!(detached["peer_epoch"], json!(epoch + 1), "{detached}");
    wait_writes(&mut source, 20);
    assert_eq!(twins.b.status()["role"], "primary");
    assert!(
        twins.b.status()["attached"].is_null(),
        "B serves no client yet"
    );

    // Evacuate: a migration with a handover moves the guest to B.
    let mut destination = start_qemu(&twins, false, &dst_qmp, Some(&migration));
    attached(&twins.b);
    let armed = twins.a.ctl("handover", json!({ "timeout_ms": 60_000 }));
    assert_eq!(armed["state"], "armed", "{armed}");
    wait_until(
        "the destination's migration socket",
        Duration::from_secs(60),
        || migration.exists(),
    );
    let mut qmp = Qmp::connect(&src_qmp);
    qmp.run(
        "migrate",
        json!({ "uri": format!("unix:{}", migration.display()) }),
    );
    let done = qmp.wait_migration(&["completed"], Duration::from_secs(180));
    let source_status = handover_state(&twins.a, "done");
    let destination_status = handover_state(&twins.b, "done");
    assert!(source_status["sealed_lsn"].is_null(), "{source_status}");
    assert!(
        destination_status["sealed_lsn"].is_null(),
        "{destination_status}"
    );
    let serving = twins.b.replication()["serving_detached"].clone();
    assert!(serving["ended"].is_string(), "{serving}");
    assert!(number(&serving, "requests") > 0, "{serving}");
    drop(source);
    wait_writes(&mut destination, 20);
    let (console, gap) = stop_and_check(destination);
    eprintln!(
        "detach and handover: guest {} writes over {} blocks and a 16 MiB burst, longest pause \
         {gap} ms; migration downtime {} ms; source {source_status}, destination \
         {destination_status}",
        field(&console, "TOTAL-WRITES"),
        field(&console, "BLOCKS"),
        done["downtime"]
    );
}
