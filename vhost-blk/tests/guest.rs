//! Real QEMU guests (TCG) whose disk is served by rewind-blk, booted with the
//! command line kept in qemu-configs/vhost-user-blk.args. The guest (a
//! Debian cloud kernel and a busybox initramfs, built by
//! guest-tests/build.sh) runs a shell script and the checks happen inside it.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{workspace, Server, TestVolume};

const QEMU: &str = "qemu-system-x86_64";
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// The guest kernel and base initramfs, built once.
fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = workspace().join("target/guest");
        if !dir.join("vmlinuz").exists() || !dir.join("initramfs.gz").exists() {
            let out = Command::new("bash")
                .arg(workspace().join("guest-tests/build.sh"))
                .arg(&dir)
                .output()
                .expect("run guest-tests/build.sh");
            assert!(
                out.status.success(),
                "building the guest failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        dir
    })
}

/// QEMU's arguments from qemu-configs/, with the placeholders filled in.
fn qemu_args(initrd: &Path, socket: &Path, smp: u32, queues: u32) -> Vec<String> {
    let template = std::fs::read_to_string(workspace().join("qemu-configs/vhost-user-blk.args"))
        .expect("qemu-configs/vhost-user-blk.args");
    let fill = |s: &str| {
        s.replace("@KERNEL@", &guest().join("vmlinuz").display().to_string())
            .replace("@INITRD@", &initrd.display().to_string())
            .replace("@SOCKET@", &socket.display().to_string())
            .replace("@SMP@", &smp.to_string())
            .replace("@QUEUES@", &queues.to_string())
    };
    template
        .lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| match l.split_once(' ') {
            Some((flag, value)) => vec![flag.to_string(), fill(value)],
            None => vec![l.to_string()],
        })
        .collect()
}

/// Boots a guest that runs `script` (with `sh -e`) against the disk at
/// `socket`; returns its console output once it powered off.
fn boot(socket: &Path, smp: u32, queues: u32, script: &str) -> String {
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::write(work.path().join("test.sh"), script).expect("write test.sh");
    let archive = Command::new("sh")
        .arg("-c")
        .arg("echo test.sh | cpio -o -H newc --quiet | gzip")
        .current_dir(work.path())
        .output()
        .expect("cpio (install cpio)");
    assert!(archive.status.success(), "cpio failed");
    let mut initrd = std::fs::read(guest().join("initramfs.gz")).expect("initramfs");
    initrd.extend_from_slice(&archive.stdout);
    let initrd_path = work.path().join("initrd.gz");
    std::fs::write(&initrd_path, initrd).expect("write initrd");

    let mut qemu = match Command::new(QEMU)
        .args(qemu_args(&initrd_path, socket, smp, queues))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!("cannot run {QEMU} ({e}): install qemu-system-x86 (ci/install-deps.sh)"),
    };
    let mut stdout = qemu.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let started = Instant::now();
    while qemu.try_wait().expect("wait for qemu").is_none() {
        if started.elapsed() > BOOT_LIMIT {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!(
                "guest did not finish in {BOOT_LIMIT:?}:\n{}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.join().expect("console reader")
}

/// The value of `KEY: value` lines the guest printed.
fn field<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.split_once(&format!("{key}: ")).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("guest printed no {key}:\n{console}"))
}

fn assert_passed(console: &str) {
    assert_eq!(
        field(console, "GUEST-RESULT"),
        "0",
        "guest script failed:\n{console}"
    );
}

/// Writes a pattern with O_DIRECT and fsync, reads it back, makes a
/// filesystem, fills it, remounts it; 2 vCPUs on 2 queues.
const FIRST_BOOT: &str = r#"
echo "SIZE: $(cat /sys/block/vda/size)"
echo "QUEUES: $(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=4096 seek=12288 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=4096 skip=12288 count=256 iflag=direct 2>/dev/null
cmp /tmp/pat /tmp/back
echo "PATTERN: $(md5sum < /tmp/pat | cut -d' ' -f1)"
mke2fs -q /dev/vda 32768
mount /dev/vda /mnt
for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=8 2>/dev/null; done
(cd /mnt && md5sum f*) > /tmp/sums
umount /mnt
mount /dev/vda /mnt
(cd /mnt && md5sum -c /tmp/sums) >/dev/null
umount /mnt
sed 's/^/SUM: /' /tmp/sums
"#;

#[test]
fn a_guest_keeps_its_data_and_filesystem_across_a_daemon_restart() {
    let vol = TestVolume::create("64M");
    let mut server = Server::start(&vol, &["--num-queues", "2"]);
    let console = boot(&vol.socket, 2, 2, FIRST_BOOT);
    assert_passed(&console);
    assert_eq!(field(&console, "SIZE"), ((64u64 << 20) / 512).to_string());
    assert_eq!(field(&console, "QUEUES"), "2", "both queues in use");
    let pattern = field(&console, "PATTERN").to_string();
    let sums: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("SUM: ").map(|(_, s)| s.trim()))
        .collect();
    assert_eq!(sums.len(), 8, "{console}");
    assert!(server.stop().success(), "rewind-blk exits 0 on SIGTERM");

    // A new daemon on the same volume; a new guest checks everything.
    let _server = Server::start(&vol, &["--num-queues", "1"]);
    let second = format!(
        r#"
dd if=/dev/vda of=/tmp/back bs=4096 skip=12288 count=256 iflag=direct 2>/dev/null
[ "$(md5sum < /tmp/back | cut -d' ' -f1)" = "{pattern}" ]
mount /dev/vda /mnt
cat > /tmp/sums <<'SUMS'
{sums}
SUMS
(cd /mnt && md5sum -c /tmp/sums)
umount /mnt
echo "CHECKED: yes"
"#,
        sums = sums.join("\n")
    );
    let console = boot(&vol.socket, 1, 1, &second);
    assert_passed(&console);
    assert_eq!(field(&console, "CHECKED"), "yes");
}

#[test]
fn the_libvirt_domain_xml_validates() {
    let xml = workspace().join("qemu-configs/libvirt-domain.xml");
    let out = match Command::new("virt-xml-validate").arg(&xml).arg("domain").output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run virt-xml-validate ({e}): install libvirt-clients"),
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&xml).expect("xml");
    assert!(text.contains("type='vhostuser'") && text.contains("<source type='memfd'/>"));
}
