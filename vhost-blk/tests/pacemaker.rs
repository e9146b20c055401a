//! The OCF resource agent (vhost-blk/ocf/rewind) on its own, under
//! ocf-tester beside a running peer on a second "host" (a network
//! namespace), and in a real two-node Corosync + Pacemaker cluster
//! (ci/ha/cluster.sh): a guest (QEMU, TCG) whose disk is the promoted
//! instance writes on node 1, node 1 is killed by the fence agent, node 2 is
//! promoted, the guest boots there and finds node 1's data, and node 1
//! rejoins as the replica. Needs root, pacemaker, corosync,
//! pacemaker-cli-utils, resource-agents and QEMU (ci/install-deps.sh).

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::netns::HostPair;
use common::replication::{identity, replica_volume, volume_uuid, Identity, SIZE};
use common::{wait_until, workspace, TestVolume, BIN};
use serde_json::Value;

const OCF_ROOT: &str = "/usr/lib/ocf";
const INSTALLED_AGENT: &str = "/usr/lib/ocf/resource.d/rewind/rewind";
const INSTALLED_FENCE_PEER: &str = "/usr/lib/ocf/lib/rewind/rewind-fence-peer";
/// Every wait in the cluster: generous, the box has 2 cores and is slow at
/// times.
const CLUSTER_LIMIT: Duration = Duration::from_secs(180);

/// One cluster at a time: two on 2 cores would skew the failover times.
fn one_cluster() -> MutexGuard<'static, ()> {
    static CLUSTER: Mutex<()> = Mutex::new(());
    CLUSTER.lock().unwrap_or_else(PoisonError::into_inner)
}

fn agent() -> PathBuf {
    workspace().join("vhost-blk/ocf/rewind")
}

fn fence_peer() -> PathBuf {
    workspace().join("vhost-blk/ocf/rewind-fence-peer")
}

/// rewindctl, built beside rewind-blk (`cargo test --workspace` builds it).
fn rewindctl() -> PathBuf {
    let path = Path::new(BIN).with_file_name("rewindctl");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p rewind-ctl (or run cargo test --workspace)",
        path.display()
    );
    path
}

/// Fails loudly when a program the test needs is not installed.
fn need(programs: &[&str]) {
    for program in programs {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{program} is missing: install pacemaker corosync pacemaker-cli-utils resource-agents \
             (ci/install-deps.sh)"
        );
    }
    assert!(
        Path::new(OCF_ROOT)
            .join("lib/heartbeat/ocf-shellfuncs")
            .exists(),
        "{OCF_ROOT}/lib/heartbeat/ocf-shellfuncs is missing: install resource-agents"
    );
}

/// The agent's parameters for one node.
fn node_params(
    vol: &Path,
    dir: &Path,
    me: &Identity,
    peer: &Identity,
    listen: &str,
    peer_addr: &str,
) -> Vec<(&'static str, String)> {
    let path = |p: &Path| p.display().to_string();
    vec![
        ("volume", path(vol)),
        ("socket", path(&dir.join("vhost.sock"))),
        ("control", path(&dir.join("ctl.sock"))),
        ("log", path(&dir.join("rewind-blk.log"))),
        ("listen", listen.to_owned()),
        ("peer", peer_addr.to_owned()),
        ("tls_cert", path(&me.cert)),
        ("tls_key", path(&me.key)),
        ("tls_peer_fingerprint", peer.fingerprint.clone()),
        ("binary", BIN.to_owned()),
        ("ctl", path(&rewindctl())),
        ("fence_peer", path(&fence_peer())),
    ]
}

/// Runs the agent the way Pacemaker does: the action as argument, the
/// parameters as OCF_RESKEY_* variables.
fn run_agent(action: &str, params: &[(&str, String)]) -> Output {
    Command::new(agent())
        .arg(action)
        .env("OCF_ROOT", OCF_ROOT)
        .env("OCF_RESOURCE_INSTANCE", "rewind-test")
        .envs(params.iter().map(|(k, v)| (format!("OCF_RESKEY_{k}"), v)))
        .output()
        .expect("run the agent")
}

fn with(
    params: &[(&'static str, String)],
    key: &'static str,
    value: &str,
) -> Vec<(&'static str, String)> {
    let mut params: Vec<_> = params.iter().filter(|(k, _)| *k != key).cloned().collect();
    params.push((key, value.to_owned()));
    params
}

#[test]
fn the_agent_has_ocf_1_0_meta_data_and_validate_all_checks_its_parameters() {
    need(&["xmllint"]);
    let out = run_agent("meta-data", &[]);
    assert!(out.status.success());
    let meta = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        meta.contains(r#"<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">"#),
        "{meta}"
    );
    // What ocf-tester checks: valid against OCF 1.0's DTD.
    let mut lint = Command::new("xmllint")
        .args(["--noout", "--valid", "-"])
        .current_dir("/usr/share/resource-agents")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("xmllint");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(meta.as_bytes())
        .expect("write");
    let lint = lint.wait_with_output().expect("xmllint");
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stderr)
    );
    for action in [
        "start",
        "stop",
        "promote",
        "demote",
        "notify",
        "monitor",
        "validate-all",
    ] {
        assert!(
            meta.contains(&format!(r#"action name="{action}""#)),
            "{action}"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let vol = TestVolume::create(SIZE);
    let (a, b) = (identity(dir.path(), "a"), identity(dir.path(), "b"));
    let good = node_params(
        &vol.path,
        dir.path(),
        &a,
        &b,
        "127.0.0.1:7001",
        "127.0.0.1:7002",
    );
    let validate = |params: &[(&str, String)]| {
        let out = run_agent("validate-all", params);
        (
            out.status.code().expect("exit code"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(validate(&good).0, 0, "{}", validate(&good).1);
    // OCF_ERR_CONFIGURED (6): the configuration is wrong on every node.
    let missing: Vec<_> = good.iter().filter(|(k, _)| *k != "peer").cloned().collect();
    let (rc, err) = validate(&missing);
    assert_eq!(rc, 6);
    assert!(err.contains("parameter peer is required"), "{err}");
    let (rc, err) = validate(&with(&good, "mode", "eventually"));
    assert_eq!(rc, 6);
    assert!(err.contains("mode must be async or sync"), "{err}");
    let (rc, err) = validate(&with(&good, "listen", "nowhere"));
    assert_eq!(rc, 6);
    assert!(err.contains("listen must be ADDR:PORT"), "{err}");
    // OCF_ERR_INSTALLED (5): something is missing on this node.
    let (rc, err) = validate(&with(&good, "volume", "/nonexistent/vol"));
    assert_eq!(rc, 5);
    assert!(err.contains("no volume at /nonexistent/vol"), "{err}");
    assert_eq!(
        validate(&with(&good, "binary", "/nonexistent/rewind-blk")).0,
        5
    );
    assert_eq!(
        validate(&with(&good, "fence_peer", "/nonexistent/hook")).0,
        5
    );
    assert_eq!(validate(&with(&good, "fence_peer", "")).0, 0);
}

// ------------------------------------------------------------------ the fence-peer hook

/// A fake `crm_node` for the hook: this node is n2; n1's membership state
/// (`member` or `lost`) is in `$FAKE/n1-state`.
const FAKE_CRM_NODE: &str = r#"#!/bin/sh
case "$1" in
-n) echo n2 ;;
-l) printf '1 n1 %s\n2 n2 member\n' "$(cat "$FAKE/n1-state")" ;;
*) exit 1 ;;
esac
"#;

/// A fake `crm_attribute`: appends its arguments to `$FAKE/marks`.
const FAKE_CRM_ATTRIBUTE: &str = "#!/bin/sh\necho \"$*\" >>\"$FAKE/marks\"\n";

/// A fake `crm_mon`: the Nth call answers as line N of `$FAKE/views` says
/// (the last line repeated): `error` is what crm_mon 2.1.5 prints when it
/// cannot reach the CIB (exit 0!), `fail` an error exit, and `online`,
/// `unclean` (offline, lost but not fenced), `clean` (offline after a fence
/// or a clean shutdown), `nofencing` (offline, clean, stonith-enabled=false)
/// are n1's state in Pacemaker 2.1.5's XML (attribute names checked
/// against its crm_mon run on a CIB file). A resource's and a node
/// attribute's `<node name="n1">` elements are there too, without online=.
const FAKE_CRM_MON: &str = r#"#!/bin/sh
calls=$(($(cat "$FAKE/calls" 2>/dev/null || echo 0) + 1))
echo "$calls" >"$FAKE/calls"
view=$(sed -n "${calls}p" "$FAKE/views")
[ -n "$view" ] || view=$(tail -n 1 "$FAKE/views")
stonith=true online=false unclean=false
case "$view" in
error)
	printf '<pacemaker-result api-version="2.25">\n  <status code="0" message="OK">\n    <errors>\n      <error>Could not connect to the CIB: No such device or address</error>\n    </errors>\n  </status>\n</pacemaker-result>\n'
	exit 0 ;;
fail) echo "crm_mon: broken" >&2; exit 102 ;;
online) online=true ;;
unclean) unclean=true ;;
nofencing) stonith=false ;;
esac
cat <<XML
<pacemaker-result api-version="2.25" request="crm_mon -1 --output-as=xml">
  <summary>
    <cluster_options stonith-enabled="$stonith" symmetric-cluster="true" no-quorum-policy="stop" maintenance-mode="false"/>
  </summary>
  <nodes>
    <node name="n1" id="1" online="$online" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="$unclean" health="green" shutdown="false" expected_up="true" is_dc="false" resources_running="0" type="member"/>
    <node name="n2" id="2" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" health="green" shutdown="false" expected_up="true" is_dc="true" resources_running="1" type="member"/>
  </nodes>
  <resources>
    <clone id="disk-clone" multi_state="true" unique="false">
      <resource id="disk" role="Promoted" active="true" nodes_running_on="1">
        <node name="n1" id="1" cached="true"/>
      </resource>
    </clone>
  </resources>
  <node_attributes>
    <node name="n1">
      <attribute name="rewind-outdated-disk" value="x"/>
    </node>
  </node_attributes>
  <status code="0" message="OK"/>
</pacemaker-result>
XML
"#;

/// What one run of the hook did.
struct HookRun {
    ok: bool,
    stderr: String,
    took: Duration,
    /// crm_mon calls.
    polls: usize,
    /// crm_attribute's argument lines.
    marks: String,
}

/// Runs rewind-fence-peer as the agent does (`--attribute
/// rewind-outdated-disk`, plus `args`) on n2, with the fake tools first on
/// PATH: n1's membership state is `n1`, crm_mon answers `views`.
fn run_fence_peer(n1: &str, views: &[&str], args: &[&str]) -> HookRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    for (name, text) in [
        ("crm_node", FAKE_CRM_NODE),
        ("crm_attribute", FAKE_CRM_ATTRIBUTE),
        ("crm_mon", FAKE_CRM_MON),
    ] {
        std::fs::write(bin.join(name), text).expect("write");
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    std::fs::write(dir.path().join("n1-state"), n1).expect("write");
    std::fs::write(dir.path().join("views"), views.join("\n") + "\n").expect("write");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = Instant::now();
    let out = Command::new(fence_peer())
        .args(["--attribute", "rewind-outdated-disk"])
        .args(args)
        .env("PATH", path)
        .env("FAKE", dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run rewind-fence-peer");
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    HookRun {
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
        polls: read("calls").trim().parse().unwrap_or(0),
        marks: read("marks"),
    }
}

#[test]
fn the_fence_peer_hook_waits_until_pacemaker_sees_a_lost_peer_offline_and_clean() {
    // n1 left the membership. crm_mon first still shows it online (the DC
    // has not written the loss yet), then fails twice, then shows it lost
    // but not fenced (unclean): the hook waits through all of it, and
    // succeeds once n1 is offline and clean (fenced).
    let run = run_fence_peer(
        "lost",
        &["online", "error", "fail", "unclean", "unclean", "clean"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.polls, 6, "{}", run.stderr);
    assert!(
        run.took >= Duration::from_millis(2500),
        "5 pauses of 0.5 s: {:?}",
        run.took
    );
    assert!(
        run.marks
            .starts_with("--node n1 --name rewind-outdated-disk --lifetime forever --update "),
        "{}",
        run.marks
    );
    for said in [
        "marked n1 outdated (rewind-outdated-disk), peer lost",
        "waiting for n1 to be fenced or shut down: online=true unclean=false",
        "waiting for n1: crm_mon failed or does not list it",
        "waiting for n1 to be fenced or shut down: online=false unclean=true",
        "n1 is offline and clean in Pacemaker's view",
    ] {
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
    }

    // n1 stays lost and unclean: this node may be the one cut off, and
    // fails at --timeout.
    let run = run_fence_peer("lost", &["unclean"], &["--timeout", "2"]);
    assert!(!run.ok, "{}", run.stderr);
    assert!(run.took >= Duration::from_secs(2), "{:?}", run.took);
    assert!(
        run.stderr.contains(
            "n1 left the cluster but Pacemaker did not see it offline and clean within 2s"
        ),
        "{}",
        run.stderr
    );
    // crm_mon never answers: never a success.
    let run = run_fence_peer("lost", &["error", "fail"], &["--timeout", "1"]);
    assert!(!run.ok, "{}", run.stderr);
    assert!(run.polls >= 2, "{}", run.stderr);

    // Without fencing every lost node looks offline and clean: no proof,
    // a failure at once.
    let run = run_fence_peer("lost", &["nofencing"], &[]);
    assert!(!run.ok, "{}", run.stderr);
    assert_eq!(run.polls, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("stonith-enabled is false"),
        "{}",
        run.stderr
    );

    // A peer already down and clean (a clean stop, or a fence, however
    // long ago as long as it did not rejoin since): at once. --recent, an
    // option of the earlier version, is accepted and ignored.
    let run = run_fence_peer("lost", &["clean"], &["--recent", "60"]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.polls, 1, "{}", run.stderr);

    // A peer still in the membership gets the mark through the CIB it
    // shares: done, no wait.
    let run = run_fence_peer("member", &["unclean"], &[]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.polls, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("marked n1 outdated (rewind-outdated-disk), peer member"),
        "{}",
        run.stderr
    );

    // The mark is required.
    let out = Command::new(fence_peer()).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

/// A process killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ocf_tester_passes_on_the_agent_beside_a_running_peer() {
    need(&["ocf-tester", "xmllint"]);
    let hosts = HostPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (identity(dir.path(), "a"), identity(dir.path(), "b"));
    let primary = TestVolume::create_with(SIZE, &["--segment-size", "4M"]);
    let replica = replica_volume(&volume_uuid(&primary.path));
    let (addr_a, addr_b) = (
        format!("{}:7788", hosts.a.addr),
        format!("{}:7788", hosts.b.addr),
    );

    // Host b: the primary, run by hand with the command line the agent
    // uses.
    let peer_ctl = dir.path().join("peer.ctl");
    let peer = hosts
        .b
        .command(BIN)
        .args(["serve", "--volume"])
        .arg(&primary.path)
        .arg("--socket-path")
        .arg(&primary.socket)
        .arg("--control-socket")
        .arg(&peer_ctl)
        .args(["--replication-listen", &addr_b, "--replicate-to", &addr_a])
        .args(["--tls-cert"])
        .arg(&b.cert)
        .arg("--tls-key")
        .arg(&b.key)
        .args(["--tls-peer-fingerprint", &a.fingerprint])
        .stderr(std::fs::File::create(dir.path().join("peer.log")).expect("peer.log"))
        .spawn()
        .expect("spawn the peer");
    let mut peer = Running(peer);
    wait_until("the peer's control socket", Duration::from_secs(30), || {
        let exited = peer.0.try_wait().expect("wait");
        assert!(
            exited.is_none(),
            "the peer exited ({exited:?}): {}",
            std::fs::read_to_string(dir.path().join("peer.log")).unwrap_or_default()
        );
        peer_ctl.exists()
    });

    // Host a: ocf-tester drives the agent on the replica: start, monitor,
    // notify, promote (a failover that seals the peer), demote (a seal),
    // promote of a sealed copy, stop, and each twice.
    let params = node_params(&replica.path, dir.path(), &a, &b, &addr_a, &addr_b);
    let mut tester = hosts.a.command("timeout");
    tester.args(["600", "ocf-tester", "-n", "rewind-test"]);
    for (k, v) in &params {
        tester.arg("-o").arg(format!("{k}={v}"));
    }
    let out = tester
        .arg(agent())
        .env("OCF_ROOT", OCF_ROOT)
        .output()
        .expect("run ocf-tester");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(dir.path().join("rewind-blk.log")).unwrap_or_default();
    assert!(
        out.status.success() && stdout.contains("passed all tests"),
        "{stdout}{}\ndaemon log:\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent stopped its daemon; the peer still answers.
    assert!(!dir.path().join("ctl.sock").exists());
    let status = rewind_ctl::request(&peer_ctl, "status", Value::Null, &mut |_, _| {})
        .expect("the peer answers");
    // Two promotions of the agent's copy (a failover that sealed the peer,
    // then a sealed copy) raised the epoch twice; its last demotion sealed
    // and handed the peer everything, as a replica.
    assert_eq!(status["role"], "replica", "{status}");
    assert!(status["epoch"].as_u64() >= Some(3), "{status}");
    let sealed = status["sealed_lsn"].as_u64().expect("sealed");
    assert_eq!(status["last_lsn"].as_u64(), Some(sealed), "{status}");
}

// ------------------------------------------------------------------ the cluster

/// A two-node cluster run by ci/ha/cluster.sh; torn down on drop, with a
/// dump of what the cluster and the agents saw if the test failed.
struct Cluster {
    state: PathBuf,
    name: String,
    data: PathBuf,
}

impl Cluster {
    fn script(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let out = Command::new("timeout")
            .args(["900", "bash"])
            .arg(workspace().join("ci/ha/cluster.sh"))
            .args(args)
            .env("RW_HA_STATE", &self.state)
            .env("RW_HA_NAME", &self.name)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("run ci/ha/cluster.sh");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn must(&self, args: &[&str], env: &[(&str, &Path)]) -> String {
        let out = self.script(args, env);
        assert!(
            out.status.success(),
            "cluster.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn on(&self, node: u32, command: &[&str]) -> String {
        let mut args = vec!["on".to_owned(), node.to_string()];
        args.extend(command.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.script(&args, &[]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn node_dir(&self, node: u32) -> PathBuf {
        self.data.join(format!("n{node}"))
    }

    fn console(&self, node: u32) -> String {
        std::fs::read_to_string(self.node_dir(node).join("console.log")).unwrap_or_default()
    }

    fn status(&self, node: u32) -> Option<Value> {
        rewind_ctl::request(
            &self.node_dir(node).join("ctl.sock"),
            "status",
            Value::Null,
            &mut |_, _| {},
        )
        .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in [1, 2] {
                eprintln!(
                    "--- n{node}: crm_mon\n{}",
                    self.on(node, &["crm_mon", "-1r"])
                );
                let dir = self.node_dir(node);
                let tail = |file: &str| {
                    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                };
                eprintln!("--- n{node}: rewind-blk.log\n{}", tail("rewind-blk.log"));
                eprintln!("--- n{node}: console.log\n{}", tail("console.log"));
                let log = self
                    .state
                    .join(format!("n{node}/log-pacemaker/pacemaker.log"));
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let agent: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("rewind(") || l.contains("ocf-exit-reason"))
                    .collect();
                eprintln!(
                    "--- n{node}: pacemaker.log, the agent's lines\n{}",
                    agent[agent.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        self.script(&["down"], &[]);
    }
}

#[test]
fn the_cluster_harness_fails_over_and_fences_a_node_cut_off() {
    need(&[
        "corosync",
        "pacemakerd",
        "crm_mon",
        "crm_resource",
        "cibadmin",
        "nsenter",
    ]);
    let _one = one_cluster();
    let tmp = tempfile::tempdir().expect("tempdir");
    // ci/ha/cluster.sh self-test: up with a Dummy on n1; SIGKILL of every
    // process of n1: the Dummy runs on n2 and the fence agent reports n1
    // off; n1 rejoins; both links of n1 cut: n2 fences it and the fence
    // agent kills every process of n1; n1 rejoins; down.
    let out = Command::new("timeout")
        .args(["600", "bash"])
        .arg(workspace().join("ci/ha/cluster.sh"))
        .arg("self-test")
        .env("RW_HA_STATE", tmp.path().join("ha"))
        .env(
            "RW_HA_NAME",
            format!("rs{:x}", std::process::id() & 0xff_ffff),
        )
        .stdin(Stdio::null())
        .output()
        .expect("run ci/ha/cluster.sh");
    let log = String::from_utf8_lossy(&out.stderr);
    eprint!("{log}");
    assert!(out.status.success(), "{log}");
    assert!(log.contains("self-test passed"), "{log}");
    assert!(!tmp.path().join("ha").exists(), "down removed its state");
}

/// `install -D -m 0755`, the documented installation (vhost-blk/PACEMAKER.md).
fn install(from: &Path, to: &str) {
    let status = Command::new("install")
        .args(["-D", "-m", "0755"])
        .arg(from)
        .arg(to)
        .status()
        .expect("install");
    assert!(status.success(), "install {} {to}", from.display());
}

/// The guest kernel and base initramfs that ci/install-deps.sh builds.
fn guest() -> PathBuf {
    let dir = workspace().join("target/guest");
    assert!(
        dir.join("vmlinuz").exists() && dir.join("initramfs.gz").exists(),
        "no guest in {}: bash guest-tests/build.sh target/guest (ci/install-deps.sh)",
        dir.display()
    );
    dir
}

/// The guest's script, the same on both nodes: a disk without the header
/// is the first boot (write a random MiB with O_DIRECT and fsync, then the
/// header with its checksum); a disk with it is a boot after a failover
/// (check the MiB, say the last tick on the disk, then write). Then it
/// writes a tick every second (O_DIRECT, fsync) and says so.
const GUEST_SCRIPT: &str = r#"
line=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n 1)
case "$line" in
"REWIND-HA "*)
  want=${line#REWIND-HA }
  got=$(dd if=/dev/vda bs=4096 skip=256 count=256 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  echo "GUEST-FOUND: $want $got"
  [ "$want" = "$got" ]
  echo "GUEST-LAST-TICK: $(dd if=/dev/vda bs=4096 skip=2048 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n 1)"
  echo "written after the failover" > /tmp/again
  dd if=/tmp/again of=/dev/vda bs=4096 seek=1024 conv=sync,fsync oflag=direct 2>/dev/null
  echo "GUEST-WROTE-AGAIN: ok"
  ;;
*)
  dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null
  dd if=/tmp/pat of=/dev/vda bs=4096 seek=256 oflag=direct conv=fsync 2>/dev/null
  sum=$(md5sum < /tmp/pat | cut -d' ' -f1)
  echo "REWIND-HA $sum" > /tmp/header
  dd if=/tmp/header of=/dev/vda bs=4096 conv=sync,fsync oflag=direct 2>/dev/null
  echo "GUEST-FIRST-WROTE: $sum"
  ;;
esac
i=0
while :; do
  i=$((i + 1))
  echo "tick $i" > /tmp/tick
  dd if=/tmp/tick of=/dev/vda bs=4096 seek=2048 conv=sync,fsync oflag=direct 2>/dev/null
  echo "GUEST-TICK: $i"
  sleep 1
done
"#;

/// The guest's initrd (base initramfs plus the script) and a vm.sh that
/// starts QEMU with the project's arguments on the socket it is given.
fn write_vm(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("test.sh"), GUEST_SCRIPT).expect("write test.sh");
    let archive = Command::new("sh")
        .arg("-c")
        .arg("echo test.sh | cpio -o -H newc --quiet | gzip")
        .current_dir(dir)
        .output()
        .expect("cpio (install cpio)");
    assert!(archive.status.success(), "cpio failed");
    let mut initrd = std::fs::read(guest().join("initramfs.gz")).expect("initramfs");
    initrd.extend_from_slice(&archive.stdout);
    let initrd_path = dir.join("initrd.gz");
    std::fs::write(&initrd_path, initrd).expect("write initrd");

    let template = std::fs::read_to_string(workspace().join("qemu-configs/vhost-user-blk.args"))
        .expect("qemu-configs/vhost-user-blk.args");
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut args = Vec::new();
    for line in template.lines().filter(|l| !l.trim().is_empty()) {
        let fill = |s: &str| {
            quote(
                &s.replace("@KERNEL@", &guest().join("vmlinuz").display().to_string())
                    .replace("@INITRD@", &initrd_path.display().to_string())
                    .replace("@SMP@", "1")
                    .replace("@QUEUES@", "1"),
            )
            // The socket is the script's argument.
            .replace("@SOCKET@", "'\"$1\"'")
        };
        match line.split_once(' ') {
            Some((flag, value)) => args.extend([flag.to_owned(), fill(value)]),
            None => args.push(line.to_owned()),
        }
    }
    let script = dir.join("vm.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# The VM of the cluster test: QEMU on the vhost-user socket $1.\nexec qemu-system-x86_64 {} </dev/null\n",
            args.join(" ")
        ),
    )
    .expect("write vm.sh");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod vm.sh");
    script
}

/// One `<instance_attributes>` set that applies on `node` only.
fn node_attrs(id: &str, node: u32, params: &[(&str, String)]) -> String {
    let mut xml = format!(
        "\n      <instance_attributes id=\"{id}-n{node}\">\
         \n        <rule id=\"{id}-n{node}-rule\" score=\"0\">\
         <expression id=\"{id}-n{node}-expr\" attribute=\"#uname\" operation=\"eq\" value=\"n{node}\"/></rule>"
    );
    for (k, v) in params {
        xml.push_str(&format!(
            "\n        <nvpair id=\"{id}-n{node}-{k}\" name=\"{k}\" value=\"{v}\"/>"
        ));
    }
    xml.push_str("\n      </instance_attributes>");
    xml
}

fn resources_xml(per_node: [Vec<(&'static str, String)>; 2], vm: &Path, data: &Path) -> String {
    // The parameters that differ per node go into rule-bound sets; binary,
    // ctl and fence_peer are the same everywhere.
    let common = ["binary", "ctl", "fence_peer"];
    let shared: Vec<_> = per_node[0]
        .iter()
        .filter(|(k, _)| common.contains(k))
        .cloned()
        .collect();
    let mut disk = String::from("\n      <instance_attributes id=\"disk-common\">");
    for (k, v) in shared.iter().chain([("mode", "sync".to_owned())].iter()) {
        disk.push_str(&format!(
            "\n        <nvpair id=\"disk-common-{k}\" name=\"{k}\" value=\"{v}\"/>"
        ));
    }
    disk.push_str("\n      </instance_attributes>");
    for (i, params) in per_node.iter().enumerate() {
        let own: Vec<_> = params
            .iter()
            .filter(|(k, _)| !common.contains(k))
            .cloned()
            .collect();
        disk.push_str(&node_attrs("disk", i as u32 + 1, &own));
    }
    let mut vm_attrs = format!(
        "\n      <instance_attributes id=\"vm-common\">\
         \n        <nvpair id=\"vm-binfile\" name=\"binfile\" value=\"{}\"/>\
         \n        <nvpair id=\"vm-stop-timeout\" name=\"stop_timeout\" value=\"10\"/>\
         \n      </instance_attributes>",
        vm.display()
    );
    for node in [1, 2] {
        let dir = data.join(format!("n{node}"));
        vm_attrs.push_str(&node_attrs(
            "vm",
            node,
            &[
                (
                    "cmdline_options",
                    dir.join("vhost.sock").display().to_string(),
                ),
                ("logfile", dir.join("console.log").display().to_string()),
            ],
        ));
    }
    format!(
        r#"
  <clone id="disk-clone">
    <meta_attributes id="disk-clone-meta">
      <nvpair id="disk-clone-promotable" name="promotable" value="true"/>
      <nvpair id="disk-clone-pmax" name="promoted-max" value="1"/>
      <nvpair id="disk-clone-pnmax" name="promoted-node-max" value="1"/>
      <nvpair id="disk-clone-cmax" name="clone-max" value="2"/>
      <nvpair id="disk-clone-cnmax" name="clone-node-max" value="1"/>
    </meta_attributes>
    <primitive id="disk" class="ocf" provider="rewind" type="rewind">{disk}
      <operations>
        <op id="disk-start" name="start" interval="0" timeout="90s"/>
        <op id="disk-stop" name="stop" interval="0" timeout="60s"/>
        <op id="disk-promote" name="promote" interval="0" timeout="90s"/>
        <op id="disk-demote" name="demote" interval="0" timeout="60s"/>
        <op id="disk-mon-p" name="monitor" interval="2s" role="Promoted" timeout="20s"/>
        <op id="disk-mon-u" name="monitor" interval="3s" role="Unpromoted" timeout="20s"/>
      </operations>
    </primitive>
  </clone>
  <primitive id="vm" class="ocf" provider="heartbeat" type="anything">{vm_attrs}
    <operations>
      <op id="vm-start" name="start" interval="0" timeout="30s"/>
      <op id="vm-stop" name="stop" interval="0" timeout="30s"/>
      <op id="vm-mon" name="monitor" interval="2s" timeout="20s"/>
    </operations>
  </primitive>"#
    )
}

const CONSTRAINTS: &str = r##"
  <rsc_order id="vm-after-promotion" kind="Mandatory" first="disk-clone" first-action="promote" then="vm" then-action="start"/>
  <rsc_colocation id="vm-with-promoted" score="INFINITY" rsc="vm" with-rsc="disk-clone" with-rsc-role="Promoted"/>
  <rsc_location id="disk-promoted-prefers-n1" rsc="disk-clone">
    <rule id="disk-promoted-prefers-n1-rule" role="Promoted" score="50">
      <expression id="disk-promoted-prefers-n1-expr" attribute="#uname" operation="eq" value="n1"/>
    </rule>
  </rsc_location>"##;

fn field<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.split_once(&format!("{key}: ")).map(|(_, v)| v.trim()))
}

#[test]
fn pacemaker_fails_the_guest_over_to_node_2_and_node_1_rejoins_as_the_replica() {
    need(&[
        "corosync",
        "pacemakerd",
        "crm_mon",
        "crm_resource",
        "crm_attribute",
        "cibadmin",
        "stonith_admin",
        "nsenter",
        "qemu-system-x86_64",
        "cpio",
    ]);
    let _one = one_cluster();
    install(&agent(), INSTALLED_AGENT);
    install(&fence_peer(), INSTALLED_FENCE_PEER);

    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    // Node 1 holds the primary, node 2 its replica; the replication link
    // runs over corosync's link 0 (198.18.0.1 <-> 198.18.0.2).
    let (d1, d2) = (data.join("n1"), data.join("n2"));
    std::fs::create_dir_all(&d1).expect("mkdir");
    std::fs::create_dir_all(&d2).expect("mkdir");
    let primary = TestVolume::create_with(SIZE, &["--segment-size", "4M"]);
    let replica = replica_volume(&volume_uuid(&primary.path));
    let (v1, v2) = (&primary.path, &replica.path);
    let (id1, id2) = (identity(&d1, "n1"), identity(&d2, "n2"));
    let (a1, a2) = ("198.18.0.1:7788", "198.18.0.2:7788");
    let vm = write_vm(&data);
    let resources = tmp.path().join("resources.xml");
    let constraints = tmp.path().join("constraints.xml");
    std::fs::write(
        &resources,
        resources_xml(
            [
                node_params(v1, &d1, &id1, &id2, a1, a2),
                node_params(v2, &d2, &id2, &id1, a2, a1),
            ],
            &vm,
            &data,
        ),
    )
    .expect("write");
    std::fs::write(&constraints, CONSTRAINTS).expect("write");

    let cluster = Cluster {
        state: tmp.path().join("ha"),
        name: format!("rp{:x}", std::process::id() & 0xff_ffff),
        data,
    };
    cluster.must(
        &["up"],
        &[
            ("RW_HA_RESOURCES", &resources),
            ("RW_HA_CONSTRAINTS", &constraints),
        ],
    );

    // Node 1 is promoted and its guest wrote (O_DIRECT, fsync: in sync
    // mode the replica on node 2 holds it once the fsync returned).
    // A failed action this early is a bug: say so now rather than at the
    // deadline.
    let mut polls = 0;
    wait_until("the guest on n1 to write", CLUSTER_LIMIT, || {
        polls += 1;
        if polls % 200 == 0 {
            let mon = cluster.on(1, &["crm_mon", "-1"]);
            assert!(!mon.contains("Failed Resource Actions"), "{mon}");
        }
        field(&cluster.console(1), "GUEST-FIRST-WROTE").is_some()
    });
    let console = cluster.console(1);
    let sum = field(&console, "GUEST-FIRST-WROTE")
        .expect("sum")
        .to_owned();
    let role = |node| cluster.status(node).map(|s| s["role"].clone());
    assert_eq!(role(1), Some("primary".into()));
    assert_eq!(role(2), Some("replica".into()));
    wait_until("a tick of the guest on n1", CLUSTER_LIMIT, || {
        field(&cluster.console(1), "GUEST-TICK").is_some()
    });

    // Kill node 1: every process in its namespaces, as the fence agent
    // does.
    let last_tick_n1 = last_tick(&cluster.console(1));
    let killed = Instant::now();
    cluster.must(&["crash", "1"], &[]);
    wait_until("n2 to be promoted", CLUSTER_LIMIT, || {
        role(2) == Some("primary".into())
    });
    let promoted = killed.elapsed();
    let mut read = None;
    wait_until("the guest on n2 to read and write", CLUSTER_LIMIT, || {
        let console = cluster.console(2);
        if read.is_none() && console.contains("GUEST-FOUND") {
            read = Some(killed.elapsed());
        }
        console.contains("GUEST-WROTE-AGAIN: ok") || console.contains("GUEST-RESULT")
    });
    let wrote = killed.elapsed();
    let read = read.unwrap_or(wrote);
    let console = cluster.console(2);
    assert!(console.contains("GUEST-WROTE-AGAIN: ok"), "{console}");
    assert_eq!(
        field(&console, "GUEST-FOUND"),
        Some(format!("{sum} {sum}").as_str()),
        "the guest on n2 found n1's data"
    );
    println!(
        "pacemaker failover: n1 killed -> n2 promoted {:.1} s -> the guest booted on n2 and \
         read n1's data {:.1} s -> its first write (fsync) done {:.1} s",
        promoted.as_secs_f64(),
        read.as_secs_f64(),
        wrote.as_secs_f64()
    );
    assert!(
        on_disk_tick(&console) >= last_tick_n1,
        "n2 holds every tick n1's guest completed (last {last_tick_n1}): {console}"
    );
    let fence_log = std::fs::read_to_string(cluster.state.join("fence.log")).unwrap_or_default();
    assert!(
        fence_log.contains("n1 is off"),
        "n1 was fenced: {fence_log}"
    );
    // The forced promotion marked n1's copy outdated: it lacks what n2
    // writes from now on.
    let mark = |node: u32| {
        cluster
            .on(
                2,
                &[
                    "crm_attribute",
                    "--node",
                    &format!("n{node}"),
                    "--name",
                    "rewind-outdated-disk",
                    "--lifetime",
                    "forever",
                    "--query",
                    "--quiet",
                    "--default",
                    "",
                ],
            )
            .trim()
            .to_owned()
    };
    assert!(!mark(1).is_empty(), "n1 is marked outdated");
    // In sync mode a promotion with --force runs the agent's --fence-peer
    // command before the new primary goes on without its replica (9a09dfb:
    // as part of the promotion, so the guest's first flush on n2 did not
    // wait for the lost replica). n1 had left the membership: the command
    // went on once Pacemaker saw n1 offline and clean, which the fence
    // above made it.
    let log =
        std::fs::read_to_string(cluster.node_dir(2).join("rewind-blk.log")).expect("n2's log");
    assert!(
        log.contains("rewind-fence-peer: marked n1 outdated (rewind-outdated-disk), peer lost")
            && log.contains("rewind-fence-peer: n1 is offline and clean in Pacemaker's view"),
        "the fence-peer command ran on n2 and found n1 fenced: {log}"
    );
    println!(
        "pacemaker failover: the fence agent said\n  {}\nn2's fence-peer said\n  {}",
        fence_log
            .lines()
            .filter(|l| l.contains("n1"))
            .collect::<Vec<_>>()
            .join("\n  "),
        hook_lines(&log)
    );

    // Node 1 comes back: it learns it was failed over, resyncs as the
    // replica, and its mark goes once it caught up; the guest stays on n2.
    cluster.must(&["start", "1"], &[]);
    wait_until("n1 to stream as the replica", CLUSTER_LIMIT, || {
        cluster
            .status(1)
            .is_some_and(|s| s["role"] == "replica" && s["replication"]["state"] == "streaming")
    });
    wait_until("n1's outdated mark to be cleared", CLUSTER_LIMIT, || {
        mark(1).is_empty()
    });
    assert_eq!(role(2), Some("primary".into()));
    let located = cluster.on(2, &["crm_resource", "--locate", "-r", "vm"]);
    assert!(located.contains("running on: n2"), "{located}");
    let ticks = |c: &str| c.matches("GUEST-TICK").count();
    let before = ticks(&cluster.console(2));
    wait_until("the guest on n2 to go on writing", CLUSTER_LIMIT, || {
        ticks(&cluster.console(2)) > before
    });
    // Both copies hold the same disk.
    let verify = rewind_ctl::verify(
        &cluster.node_dir(2).join("ctl.sock"),
        &cluster.node_dir(1).join("ctl.sock"),
        None,
        &mut |_, _| {},
    )
    .expect("verify");
    assert_eq!(verify["equal"], true, "{verify}");

    // A planned switch back: moving the VM to n1 makes Pacemaker stop it
    // on n2, demote n2 (a seal) and promote n1 without --force (a forced
    // promotion would mark n2 outdated); the guest boots on n1 and finds
    // every tick the guest on n2 completed.
    let last_tick_n2 = last_tick(&cluster.console(2));
    let earlier = cluster.console(1).len();
    let switched = Instant::now();
    cluster.on(2, &["crm_resource", "--move", "-r", "vm", "--node", "n1"]);
    wait_until("the guest on n1 to read and write", CLUSTER_LIMIT, || {
        let console = cluster.console(1);
        let new = &console[earlier.min(console.len())..];
        new.contains("GUEST-WROTE-AGAIN: ok") || new.contains("GUEST-RESULT")
    });
    println!(
        "pacemaker switchover (move the VM back to n1): the guest's first write there after {:.1} s",
        switched.elapsed().as_secs_f64()
    );
    cluster.on(2, &["crm_resource", "--clear", "-r", "vm"]);
    let console = cluster.console(1);
    let new = &console[earlier..];
    assert!(new.contains("GUEST-WROTE-AGAIN: ok"), "{new}");
    assert!(
        on_disk_tick(new) >= last_tick_n2,
        "n1 holds every tick n2's guest completed (last {last_tick_n2}): {new}"
    );
    assert_eq!(role(1), Some("primary".into()));
    assert_eq!(role(2), Some("replica".into()));
    assert!(mark(2).is_empty(), "n2 was sealed, not forced: {}", mark(2));

    // A clean stop of n1, usually within a minute of n1's fence: Pacemaker
    // moves the guest to n2 (n1 sealed, n2 promoted without --force), then
    // stops n1's copy. n2 loses its replica; its guest's first flush waits
    // --sync-timeout, then n2 runs --fence-peer, which must find n1 shut
    // down cleanly (or still a member) and let it go on, rather than wait
    // for a fence that will not come; it must not take n1's old fence for
    // this one either (an earlier version accepted any fence of the last
    // 60 s, although n1 had rejoined since).
    let earlier_log = std::fs::read_to_string(cluster.node_dir(2).join("rewind-blk.log"))
        .unwrap_or_default()
        .len();
    let earlier = cluster.console(2).len();
    let stopping = Instant::now();
    cluster.must(&["stop", "1"], &[]);
    wait_until("the guest on n2 to read and write", CLUSTER_LIMIT, || {
        let console = cluster.console(2);
        let new = &console[earlier.min(console.len())..];
        new.contains("GUEST-WROTE-AGAIN: ok") || new.contains("GUEST-RESULT")
    });
    println!(
        "pacemaker clean stop of n1: the guest's first write on n2 (sync mode, replica stopped) \
         after {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    let console = cluster.console(2);
    assert!(
        console[earlier..].contains("GUEST-WROTE-AGAIN: ok"),
        "{}",
        &console[earlier..]
    );
    assert_eq!(role(2), Some("primary".into()));
    let log =
        std::fs::read_to_string(cluster.node_dir(2).join("rewind-blk.log")).expect("n2's log");
    let log = &log[earlier_log.min(log.len())..];
    println!(
        "pacemaker clean stop of n1: n2's fence-peer said\n  {}",
        hook_lines(log)
    );
    assert!(
        log.contains("rewind-fence-peer: marked n1 outdated (rewind-outdated-disk), peer member")
            || log.contains("rewind-fence-peer: n1 is offline and clean in Pacemaker's view"),
        "the fence-peer command on n2 found n1 stopped: {log}"
    );
    assert!(!log.contains("fenced at"), "no old fence taken: {log}");
}

/// The lines of a daemon's log about its --fence-peer command (what the
/// daemon and the command said, and the degraded link that followed), one
/// per line, indented.
fn hook_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("fence-peer") || l.contains("fence_peer") || l.contains("degraded"))
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// The last tick the guest said it completed.
fn last_tick(console: &str) -> u64 {
    console
        .lines()
        .rev()
        .find_map(|l| {
            let (_, n) = l.split_once("GUEST-TICK: ")?;
            n.trim().parse().ok()
        })
        .unwrap_or(0)
}

/// The tick the guest found on the disk at boot.
fn on_disk_tick(console: &str) -> u64 {
    field(console, "GUEST-LAST-TICK")
        .and_then(|t| t.strip_prefix("tick "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tick on the disk: {console}"))
}
