//! A volume's journal on a small tmpfs that the test fills up: the
//! journal then cannot prepare a segment (ENOSPC), a storage failure the
//! daemon meets on its write path. Mounting needs root, as the
//! network-namespace tests do.

use std::path::PathBuf;
use std::process::Command;

use super::TestVolume;

/// The primary's journal directory moved onto a tmpfs of `size` bytes;
/// unmounted when dropped.
pub struct TmpfsJournal {
    pub mount: PathBuf,
}

impl TmpfsJournal {
    pub fn over(volume: &TestVolume, size: u64) -> TmpfsJournal {
        let mount = volume.path.join("journal");
        let saved = volume.dir.path().join("journal.saved");
        run(Command::new("cp").arg("-a").arg(&mount).arg(&saved));
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(&mount));
        let guard = TmpfsJournal { mount };
        run(Command::new("cp")
            .arg("-a")
            .arg(saved.join("."))
            .arg(&guard.mount));
        guard
    }

    /// Takes every free byte of the filesystem.
    pub fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.mount.join("filler.tmp")).expect("filler");
        let chunk = vec![0xffu8; 1 << 20];
        while filler.write_all(&chunk).is_ok() {}
        let _ = filler.sync_all();
    }
}

impl Drop for TmpfsJournal {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn run(command: &mut Command) {
    let out = command.output().expect("run");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
