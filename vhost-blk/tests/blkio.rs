//! The real `rewind-blk` binary, driven over its vhost-user socket by
//! libblkio (a vhost-user-blk client written by the QEMU storage people).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blkio::ReqFlags;
use common::client::{pattern, Client};
use common::{wait_until, Controlled, Server, TestVolume, BIN};

const DISK: u64 = 64 << 20;

#[test]
fn every_request_type_works_over_the_socket_on_two_queues() {
    let vol = TestVolume::create("64M");
    let _server = Server::start(&vol, &["--num-queues", "2"]);
    let mut c = Client::connect(&vol.socket, 2);
    assert_eq!(c.blkio.get_u64("capacity").expect("capacity"), DISK);
    let a = pattern(1, 256 << 10);
    assert_eq!(c.write(0, 4096, &a), 0);
    assert_eq!(
        c.read(1, 4096, a.len()),
        a,
        "written on queue 0, read on queue 1"
    );
    assert_eq!(c.flush(1), 0);

    c.queues[0].discard(4096, 8192, 0, ReqFlags::empty());
    assert_eq!(c.complete(0), 0);
    c.queues[1].write_zeroes(16384, 4096, 0, ReqFlags::empty());
    assert_eq!(c.complete(1), 0);
    let mut want = a.clone();
    want[..8192].fill(0);
    want[12288..16384].fill(0);
    assert_eq!(c.read(0, 4096, want.len()), want);

    // Past the end of the disk: an error, not a crash.
    let len = 8192;
    let addr = c.region.addr as *mut u8;
    c.queues[0].read(DISK - 4096, addr, len, 0, ReqFlags::empty());
    assert_ne!(c.complete(0), 0);
    assert_eq!(c.read(0, 4096, 512), want[..512], "the device still works");
}

#[test]
fn data_survives_reconnects_and_a_clean_stop() {
    let vol = TestVolume::create("64M");
    let mut server = Server::start(&vol, &["--num-queues", "2"]);
    let a = pattern(7, 64 << 10);
    {
        let mut c = Client::connect(&vol.socket, 1);
        assert_eq!(c.write(0, 1 << 20, &a), 0);
    }
    for _ in 0..3 {
        let mut c = Client::connect(&vol.socket, 2);
        assert_eq!(c.read(1, 1 << 20, a.len()), a);
    }
    let status = server.stop();
    assert!(status.success(), "exit status {status}");
    let volume = &vol.path;
    // Offline, the data is there: the stop flushed it.
    let (v, _) = rewind_journal::Volume::open(
        rewind_journal::OsStorage::shared(),
        volume,
        rewind_journal::OpenOptions::default(),
    )
    .expect("open offline");
    let mut got = vec![0u8; a.len()];
    v.read(1 << 20, &mut got).expect("read");
    assert_eq!(got, a);
}

#[test]
fn a_read_only_export_is_offered_read_only() {
    let vol = TestVolume::create("64M");
    let _server = Server::start(&vol, &["--read-only"]);
    // The device says it is read-only, so a writable client is refused...
    let err = Client::try_connect(&vol.socket, 1, false)
        .err()
        .expect("a writable open of a read-only device");
    assert!(err.message().contains("read-only"), "{}", err.message());
    // ...and a read-only one reads.
    let mut c = Client::try_connect(&vol.socket, 1, true).expect("read-only open");
    assert_eq!(c.read(0, 0, 4096), vec![0u8; 4096]);
}

#[test]
fn bad_command_lines_fail_with_a_clear_message() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--volume",
            "/nonexistent",
            "--socket-path",
            "/tmp/x.sock",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a rewind volume"), "{err}");
    let out = Command::new(BIN)
        .args(["serve", "--print-capabilities"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""type": "block""#));
}

#[test]
fn acknowledged_writes_survive_a_kill_of_the_daemon() {
    let vol = TestVolume::create("64M");
    let mut server = Server::start(&vol, &["--num-queues", "2"]);
    let data: Vec<Vec<u8>> = (0..16u8).map(|i| pattern(i, 64 << 10)).collect();
    {
        let mut c = Client::connect(&vol.socket, 2);
        for (i, d) in data.iter().enumerate() {
            // No flush: acknowledged writes must survive a process crash.
            assert_eq!(c.write(i % 2, i as u64 * (64 << 10), d), 0);
        }
    }
    assert!(!server.kill().success(), "killed by SIGKILL");
    let _server = Server::start(&vol, &["--num-queues", "2"]);
    let mut c = Client::connect(&vol.socket, 2);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(&c.read(0, i as u64 * (64 << 10), d.len()), d, "write {i}");
    }
}

#[test]
fn serves_an_inherited_listening_socket() {
    use std::os::fd::AsRawFd;
    let vol = TestVolume::create("64M");
    let listener = std::os::unix::net::UnixListener::bind(&vol.socket).expect("bind");
    // SAFETY: dup(2) of an open fd; the copy has no close-on-exec flag, so
    // the daemon inherits it. It is closed when this process exits.
    let fd = unsafe { libc::dup(listener.as_raw_fd()) };
    assert!(fd >= 0, "dup");
    let mut child = Command::new(BIN)
        .args(["serve", "--volume"])
        .arg(&vol.path)
        .args(["--fd", &fd.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn serve --fd");
    let mut c = Client::connect(&vol.socket, 1);
    assert_eq!(c.write(0, 0, &pattern(3, 4096)), 0);
    assert_eq!(c.read(0, 0, 4096), pattern(3, 4096));
    drop(c);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_volume_created_from_an_image_serves_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    let data = pattern(9, 4 << 20);
    std::fs::write(&image, &data).expect("image");
    let volume = dir.path().join("vol");
    let out = Command::new(BIN)
        .args(["create", "--size", "8M", "--segment-size", "1M", "--volume"])
        .arg(&volume)
        .arg("--from")
        .arg(&image)
        .output()
        .expect("create --from");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("8388608 bytes"));
    assert_eq!(std::fs::read(&image).expect("image kept"), data);
    let vol = TestVolume {
        socket: dir.path().join("sock"),
        path: volume,
        dir,
    };
    let _server = Server::start(&vol, &[]);
    let mut c = Client::connect(&vol.socket, 1);
    assert_eq!(c.blkio.get_u64("capacity").expect("capacity"), 8 << 20);
    assert_eq!(c.read(0, 0, 1 << 20), data[..1 << 20]);
    assert_eq!(c.read(0, 3 << 20, 1 << 20), data[3 << 20..]);
    assert_eq!(
        c.read(0, 4 << 20, 4096),
        vec![0u8; 4096],
        "past the image: zeroes"
    );

    // An image larger than --size is refused and nothing is created.
    let bad = vol.dir.path().join("bad");
    let out = Command::new(BIN)
        .args(["create", "--size", "1M", "--volume"])
        .arg(&bad)
        .arg("--from")
        .arg(&image)
        .output()
        .expect("create --from");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most the volume size"));
    assert!(!bad.exists());
}

#[test]
fn an_fd_that_is_not_a_listening_socket_is_refused() {
    let vol = TestVolume::create("64M");
    for fd in ["0", "77"] {
        let out = Command::new(BIN)
            .args(["serve", "--volume"])
            .arg(&vol.path)
            .args(["--fd", fd])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is not an open listening socket"),
            "--fd {fd}: {err}"
        );
    }
}

#[test]
fn bookmarks_and_materialize_through_the_control_socket_while_a_client_writes() {
    use serde_json::json;
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    let ctl = |command: &str, args: serde_json::Value, progress: &mut dyn FnMut(u64, u64)| {
        rewind_ctl::request(&daemon.control, command, args, progress)
    };
    let mut c = Client::connect(&vol.socket, 1);
    assert_eq!(c.write(0, 0, &pattern(1, 65536)), 0);
    let b = ctl("bookmark", json!({"name": "first"}), &mut |_, _| {}).expect("bookmark");
    assert_eq!(b["name"], "first");
    assert_eq!(c.write(0, 0, &pattern(2, 65536)), 0);

    let output = vol.dir.path().join("first.raw");
    let mut seen = Vec::new();
    let done = ctl(
        "materialize",
        json!({"at": "bookmark:first", "output": output}),
        &mut |d, t| seen.push((d, t)),
    )
    .expect("materialize");
    assert_eq!(done["lsn"], b["lsn"]);
    let (last, total) = *seen.last().expect("progress lines");
    assert_eq!(last, total);
    let image = std::fs::read(&output).expect("image");
    assert_eq!(image.len() as u64, DISK);
    assert!(
        image[..65536] == pattern(1, 65536)[..],
        "the disk at the bookmark"
    );
    assert!(image[65536..].iter().all(|&b| b == 0));
    assert_eq!(
        c.read(0, 0, 65536),
        pattern(2, 65536),
        "the live disk goes on"
    );

    let timeline = ctl("timeline", serde_json::Value::Null, &mut |_, _| {}).expect("timeline");
    assert_eq!(timeline["bookmarks"][0]["name"], "first");
    assert!(
        timeline["last_lsn"].as_u64() > b["lsn"].as_u64(),
        "{timeline}"
    );
    let err = ctl(
        "materialize",
        json!({"at": "-1h", "output": vol.dir.path().join("old.raw")}),
        &mut |_, _| {},
    )
    .expect_err("before the volume existed");
    let err = err.to_string();
    assert!(
        err.contains("outside the history window") && err.contains("lsn 0"),
        "{err}"
    );
    drop(c);
    assert!(daemon.server.stop().success());
}

/// This process connects again and is refused for a reason containing
/// `want`; whatever it manages to submit before the daemon closes the
/// connection does not complete.
fn assert_reattach_refused(vol: &TestVolume, daemon: &Controlled, want: &str) {
    if let Ok(mut c) = Client::try_connect(&vol.socket, 1, false) {
        let write = c.write_within(4096, &pattern(9, 4096), Duration::from_millis(200));
        assert_ne!(write, Some(0), "a refused client wrote");
    }
    wait_until(want, Duration::from_secs(30), || {
        daemon.status()["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains(want))
    });
}

#[test]
fn a_drain_under_iodepth_32_writes_holds_them_until_resume() {
    use common::load::Load;
    use serde_json::json;
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    let load = Load::default();
    std::thread::scope(|s| {
        s.spawn(|| load.run(&vol.socket));
        let _abandon = load.stop_on_drop();
        wait_until("writes", Duration::from_secs(60), || {
            load.completed() >= 500
        });

        let drained = daemon.ctl("drain", json!({"timeout_ms": 10_000}));
        assert_eq!(drained["state"], "drained", "{drained}");
        // One request at a time per queue, and the client uses one queue.
        assert!(drained["in_flight"].as_u64() <= Some(1), "{drained}");
        assert_eq!(drained["failed"], 0);
        let lsn = drained["last_lsn"].as_u64().expect("last_lsn");
        // Once the client has waited a poll in vain, it got every
        // completion there was; then nothing more may come.
        let idle = load.idle_polls();
        wait_until("an idle poll", Duration::from_secs(30), || {
            load.idle_polls() > idle
        });
        let completed = load.completed();
        wait_until("five more idle polls", Duration::from_secs(30), || {
            load.idle_polls() > idle + 5
        });
        assert_eq!(
            load.completed(),
            completed,
            "a write completed while drained"
        );
        let s = daemon.status();
        assert_eq!(
            (s["state"].as_str(), s["last_lsn"].as_u64()),
            (Some("drained"), Some(lsn))
        );
        assert!(s["io"]["completed"].as_u64() >= Some(completed), "{s}");

        let resumed = daemon.ctl("resume", serde_json::Value::Null);
        assert_eq!(resumed["state"], "serving");
        wait_until("writes after resume", Duration::from_secs(60), || {
            load.completed() >= completed + 500
        });
        load.stop();
    });
    assert_eq!(load.errors(), 0, "the client saw no IO error");
    assert!(daemon.status()["last_lsn"].as_u64() > Some(0));
    assert!(daemon.server.stop().success());
}

#[test]
fn a_fenced_client_cannot_write_or_reattach_and_unfence_admits_a_new_one() {
    use serde_json::json;
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    let mut old = Client::connect(&vol.socket, 1);
    assert_eq!(old.write(0, 0, &pattern(1, 4096)), 0);
    let s = daemon.status();
    assert_eq!(s["attached"]["attach_id"]["pid"], std::process::id(), "{s}");
    assert_eq!(s["attached"]["epoch"], 1);

    let fenced = daemon.ctl("fence", json!({"timeout_ms": 10_000}));
    assert_eq!(
        (fenced["state"].as_str(), fenced["epoch"].as_u64()),
        (Some("fenced"), Some(2))
    );
    assert_eq!(
        fenced["disconnected"]["attach_id"]["pid"],
        std::process::id()
    );
    let lsn = fenced["last_lsn"].as_u64();
    let write = old.write_within(4096, &pattern(2, 4096), Duration::from_millis(500));
    assert_ne!(write, Some(0), "the fenced client wrote");
    drop(old);

    // Refused while fenced, and at the old epoch after unfence.
    let refused_with = |want: &str| assert_reattach_refused(&vol, &daemon, want);
    refused_with("fenced at epoch 2");
    let unfenced = daemon.ctl("unfence", serde_json::Value::Null);
    assert_eq!(unfenced["state"], "serving");
    refused_with("attached at epoch 1");
    let s = daemon.status();
    assert_eq!(
        (s["last_lsn"].as_u64(), s["epoch"].as_u64()),
        (lsn, Some(2))
    );

    // Another process is a new client.
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", "new_client_process", "--nocapture"])
        .env("REWIND_TEST_SOCKET", &vol.socket)
        .output()
        .expect("run the client process");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s = daemon.status();
    assert!(s["last_lsn"].as_u64() > lsn, "the new client wrote: {s}");
    assert!(daemon.server.stop().success());
}

/// Run as a separate process by the fence test: a client the daemon has
/// never seen, so not fenced out.
#[test]
#[ignore = "a client process that a_fenced_client_... starts itself"]
fn new_client_process() {
    let socket = std::env::var_os("REWIND_TEST_SOCKET").expect("REWIND_TEST_SOCKET");
    let mut c = Client::connect(Path::new(&socket), 1);
    assert_eq!(c.read(0, 0, 4096), pattern(1, 4096));
    assert_eq!(c.write(0, 8192, &pattern(3, 4096)), 0);
    assert_eq!(c.flush(0), 0);
}

#[test]
fn views_are_exported_beside_the_live_disk_and_reverts_need_a_drain() {
    use serde_json::json;
    let vol = TestVolume::create("64M");
    let mut daemon = Controlled::start(&vol);
    let mut live = Client::connect(&vol.socket, 1);
    assert_eq!(live.write(0, 0, &pattern(1, 65536)), 0);
    daemon.ctl("bookmark", json!({"name": "one"}));
    assert_eq!(live.write(0, 0, &pattern(2, 65536)), 0);

    let scratch = vol.dir.path().join("scratch.sock");
    let e = daemon.ctl(
        "export",
        json!({"at": "bookmark:one", "socket_path": scratch, "scratch": true}),
    );
    assert_eq!(e["writable"], true);
    {
        let mut view = Client::connect(&scratch, 1);
        assert_eq!(
            view.read(0, 0, 65536),
            pattern(1, 65536),
            "the disk at the bookmark"
        );
        assert_eq!(view.write(0, 4096, &pattern(3, 4096)), 0);
        assert_eq!(view.read(0, 4096, 4096), pattern(3, 4096));
        assert_eq!(
            live.read(0, 0, 65536),
            pattern(2, 65536),
            "the live disk is untouched"
        );
        let s = daemon.status();
        assert_eq!(
            s["exports"][0]["attached"]["attach_id"]["pid"],
            std::process::id(),
            "{s}"
        );
    }
    daemon.ctl("unexport", json!({"socket_path": scratch}));
    assert!(!scratch.exists());

    let read_only = vol.dir.path().join("ro.sock");
    daemon.ctl(
        "export",
        json!({"at": "bookmark:one", "socket_path": read_only}),
    );
    let err = Client::try_connect(&read_only, 1, false)
        .err()
        .expect("a writable open of a read-only view");
    assert!(err.message().contains("read-only"), "{}", err.message());
    let mut view = Client::try_connect(&read_only, 1, true).expect("read-only open");
    assert_eq!(view.read(0, 0, 4096), pattern(1, 4096));
    drop(view);

    let refused = daemon
        .try_ctl("revert", json!({"at": "bookmark:one"}))
        .expect_err("revert while serving");
    assert!(refused.to_string().contains("rewindctl drain"), "{refused}");
    daemon.ctl("drain", serde_json::Value::Null);
    let attached = daemon
        .try_ctl("revert", json!({"at": "bookmark:one"}))
        .expect_err("revert with a client attached");
    assert!(
        attached.to_string().contains("shut the VM down"),
        "{attached}"
    );
    drop(live);
    daemon.wait_detached();
    let reverted = daemon.ctl("revert", json!({"at": "bookmark:one"}));
    assert!(
        reverted["lsn"].as_u64() > reverted["to_lsn"].as_u64(),
        "{reverted}"
    );
    daemon.ctl("resume", serde_json::Value::Null);
    // The client that detached before the revert has a stale cache.
    assert_reattach_refused(&vol, &daemon, "modified");
    assert!(daemon.server.stop().success());
    let (v, _) = rewind_journal::Volume::open(
        rewind_journal::OsStorage::shared(),
        &vol.path,
        rewind_journal::OpenOptions::default(),
    )
    .expect("open offline");
    let mut got = vec![0u8; 65536];
    v.read(0, &mut got).expect("read");
    assert!(got == pattern(1, 65536), "the disk is as at the bookmark");
}

/// The versions in the headers of `volume`'s segment files: 2 for header
/// slots, 3 for inline segments (journal/FORMAT.md).
fn segment_versions(volume: &Path) -> Vec<u16> {
    use std::os::unix::fs::FileExt;
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(volume.join("journal")).expect("ls journal") {
        let f = std::fs::File::open(entry.expect("entry").path()).expect("segment");
        let mut b = [0u8; 2];
        f.read_exact_at(&mut b, 8).expect("read header");
        versions.push(u16::from_le_bytes(b));
    }
    versions
}

#[test]
fn fua_writes_move_the_journal_to_inline_segments_which_survive_a_kill() {
    let vol = TestVolume::create("64M");
    let mut server = Server::start(&vol, &[]);
    let mut c = Client::connect(&vol.socket, 1);
    // What a guest's FUA writes come as: a write and a flush each. Two
    // windows of 256 later the daemon's journal writes inline segments.
    let writes = 600u64;
    for i in 0..writes {
        assert_eq!(c.write(0, i * 4096, &pattern(i as u8, 4096)), 0);
        assert_eq!(c.flush(0), 0);
    }
    let versions = segment_versions(&vol.path);
    assert!(versions.contains(&3), "segment versions {versions:?}");
    drop(c);
    assert!(!server.kill().success(), "killed by SIGKILL");
    // Served again with header slots forced: the inline records read back.
    let _server = Server::start(&vol, &["--journal-layout", "slots"]);
    let mut c = Client::connect(&vol.socket, 1);
    for i in 0..writes {
        assert_eq!(
            c.read(0, i * 4096, 4096),
            pattern(i as u8, 4096),
            "write {i}"
        );
    }
}

#[test]
fn a_forced_inline_journal_writes_inline_from_its_first_record() {
    let vol = TestVolume::create("64M");
    let _server = Server::start(&vol, &["--journal-layout", "inline"]);
    let mut c = Client::connect(&vol.socket, 1);
    assert_eq!(c.write(0, 0, &pattern(9, 4096)), 0);
    assert_eq!(
        segment_versions(&vol.path)
            .iter()
            .filter(|&&v| v == 3)
            .count(),
        1
    );
    let out = Command::new(BIN)
        .args([
            "serve",
            "--journal-layout",
            "sideways",
            "--print-capabilities",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("possible values: auto, slots, inline"),
        "{err}"
    );
}

#[test]
fn a_preallocated_journal_serves_from_its_written_out_files_and_keeps_them() {
    let vol = TestVolume::create_with(
        "16M",
        &[
            "--segment-size",
            "1M",
            "--journal-max",
            "8M",
            "--preallocate-journal",
        ],
    );
    let journal = vol.path.join("journal");
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(&journal)
            .expect("journal")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = files();
    assert_eq!(before.len(), 8, "{before:?}");

    let mut server = Server::start(&vol, &[]);
    let mut c = Client::connect(&vol.socket, 1);
    // Three times the journal limit: the pool recycles its files.
    for i in 0..48u64 {
        let data = pattern(i as u8, 512 << 10);
        assert_eq!(c.write(0, (i % 16) * (512 << 10), &data), 0);
    }
    assert_eq!(c.flush(0), 0);
    for i in 32..48u64 {
        let want = pattern(i as u8, 512 << 10);
        assert!(
            c.read(0, (i % 16) * (512 << 10), want.len()) == want,
            "block {i}"
        );
    }
    drop(c);
    assert!(server.stop().success());
    assert_eq!(files(), before, "the same files, none removed or added");
}
