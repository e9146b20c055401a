//! An in-memory [`Storage`] for crash and fault tests.
//!
//! Each file keeps its durable image and the writes made since its last
//! sync. [`FaultStorage::crash`] returns the file system as a power loss
//! could leave it: every unsynced write is independently kept, dropped, or
//! torn at a random byte, as a page cache writing back in any order would.
//! Directory operations (create, remove, rename) are durable at once; the
//! engine syncs directories after them anyway. A crash is one instant: no
//! operation runs while it is taken.
//!
//! [`FaultStorage::inject`] makes chosen operations fail with an errno
//! (EIO, ENOSPC, ...), once or until cleared. A failed sync or write-back
//! loses the writes it was to make durable, as on Linux (see `sync_data`). [`FaultStorage::slow_down`]
//! makes them slow, and [`FaultStorage::slow_write_back`] makes writing
//! dirty data back cost time per write, as on a disk that does few IOs a
//! second.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::storage::{LockGuard, Storage, StorageFile};

/// Operations a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Sync,
    /// `StorageFile::write_back_range`.
    WriteBack,
    Allocate,
    /// `Storage::sync_dir` (its path is the directory's).
    SyncDir,
}

/// A planned failure: after `skip` matching operations succeed, the next
/// `count` (or all, if `None`) fail with `errno`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub op: FaultOp,
    /// Only operations on paths containing this string match.
    pub path_contains: Option<String>,
    pub skip: u64,
    pub count: Option<u64>,
    pub errno: i32,
}

impl Fault {
    /// Every `op` from now on fails with `errno` until cleared.
    pub fn always(op: FaultOp, errno: i32) -> Self {
        Fault {
            op,
            path_contains: None,
            skip: 0,
            count: None,
            errno,
        }
    }

    /// Only the operation after `skip` successful ones fails.
    pub fn once_after(op: FaultOp, skip: u64, errno: i32) -> Self {
        Fault {
            op,
            path_contains: None,
            skip,
            count: Some(1),
            errno,
        }
    }

    pub fn on_paths_containing(mut self, s: &str) -> Self {
        self.path_contains = Some(s.to_owned());
        self
    }
}

#[derive(Debug, Default)]
struct FileState {
    durable: Vec<u8>,
    current: Vec<u8>,
    unsynced: Vec<(u64, Vec<u8>)>,
    /// Writes not yet written back to the disk, `(offset, length)`: what a
    /// write-back or sync has left to do. Not durability: `unsynced` is.
    dirty: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct FaultFile {
    path: PathBuf,
    state: Mutex<FileState>,
    fs: Weak<Shared>,
}

#[derive(Debug, Default)]
struct FsState {
    files: HashMap<PathBuf, Arc<FaultFile>>,
    dirs: HashSet<PathBuf>,
    locks: HashSet<PathBuf>,
}

#[derive(Debug, Default)]
struct Shared {
    fs: Mutex<FsState>,
    faults: Mutex<Vec<Fault>>,
    /// Operations made slow: (kind, path substring, time each takes).
    slow: Mutex<Vec<(FaultOp, String, Duration)>>,
    /// Operations sleeping out their delay now.
    stalled: AtomicUsize,
    /// Write-back made slow: (path substring, time each write takes).
    slow_write_back: Mutex<Vec<(String, Duration)>>,
    /// Operations hold it shared; a crash holds it exclusively.
    instant: RwLock<()>,
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct FaultStorage {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
}

impl Shared {
    /// How long an operation of kind `op` on `path` is made to take.
    fn delay(&self, op: FaultOp, path: &Path) -> Option<Duration> {
        let path = path.to_string_lossy();
        lock(&self.slow)
            .iter()
            .find(|(o, s, _)| *o == op && path.contains(s.as_str()))
            .map(|&(_, _, d)| d)
    }

    /// How long writing back one write to `path` takes.
    fn write_back_cost(&self, path: &Path) -> Option<Duration> {
        let path = path.to_string_lossy();
        lock(&self.slow_write_back)
            .iter()
            .find(|(s, _)| path.contains(s.as_str()))
            .map(|&(_, d)| d)
    }

    fn operation(&self) -> RwLockReadGuard<'_, ()> {
        self.instant.read().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, op: FaultOp, path: &Path) -> io::Result<()> {
        let mut faults = lock(&self.faults);
        let path = path.to_string_lossy();
        for f in faults.iter_mut() {
            let matches = f.op == op && f.path_contains.as_deref().is_none_or(|s| path.contains(s));
            if !matches {
                continue;
            }
            if f.skip > 0 {
                f.skip -= 1;
                continue;
            }
            match &mut f.count {
                Some(0) => continue,
                Some(n) => *n -= 1,
                None => {}
            }
            return Err(io::Error::from_raw_os_error(f.errno));
        }
        Ok(())
    }
}

impl FaultStorage {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn arc(&self) -> Arc<dyn Storage> {
        Arc::new(self.clone())
    }

    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
        lock(&self.shared.slow).clear();
        lock(&self.shared.slow_write_back).clear();
    }

    /// Makes every `op` on a path containing `path_contains` take `delay`
    /// (a slow disk), until [`FaultStorage::clear_faults`].
    pub fn slow_down(&self, op: FaultOp, path_contains: &str, delay: Duration) {
        lock(&self.shared.slow).push((op, path_contains.to_owned(), delay));
    }

    /// Operations sleeping in a [`FaultStorage::slow_down`] delay now: a
    /// test knows a thread is inside the storage (a delay taken is slept
    /// out even if the faults are cleared meanwhile).
    pub fn stalled(&self) -> usize {
        self.shared.stalled.load(Ordering::SeqCst)
    }

    /// Waits until an operation sleeps in a [`FaultStorage::slow_down`]
    /// delay; panics naming `what` if none does within 30 s.
    pub fn wait_stalled(&self, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.stalled() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never reached the storage"
            );
            std::thread::yield_now();
        }
    }

    /// Makes writing back each write to a path containing `path_contains`
    /// take `per_write` (a disk doing few IOs a second, the page cache
    /// fast): a sync waits that long for every write since the file's last
    /// write-back or sync, a `write_back_range` for those it covers, until
    /// [`FaultStorage::clear_faults`].
    pub fn slow_write_back(&self, path_contains: &str, per_write: Duration) {
        lock(&self.shared.slow_write_back).push((path_contains.to_owned(), per_write));
    }

    /// The file system as a power loss now could leave it, as a new,
    /// independent storage. `seed` picks which unsynced writes survive.
    pub fn crash(&self, seed: u64) -> FaultStorage {
        let mut rng = StdRng::seed_from_u64(seed);
        self.image(|st| {
            let mut image = st.durable.clone();
            for (offset, data) in &st.unsynced {
                let keep = match rng.random_range(0..3) {
                    0 => 0,
                    1 => data.len(),
                    _ => rng.random_range(0..=data.len()),
                };
                apply(&mut image, *offset, &data[..keep]);
            }
            image
        })
    }

    /// The file system as a crash of the process using it (not of the
    /// machine) leaves it: everything written is there, synced or not, as it
    /// would be in the page cache.
    pub fn process_crash(&self) -> FaultStorage {
        self.image(|st| st.current.clone())
    }

    /// A new storage whose files hold what `content` makes of each file
    /// here, all durable; taken at one instant.
    fn image(&self, mut content: impl FnMut(&FileState) -> Vec<u8>) -> FaultStorage {
        let _instant = self
            .shared
            .instant
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let new = FaultStorage::new();
        let fs = lock(&self.shared.fs);
        let mut paths: Vec<_> = fs.files.keys().cloned().collect();
        paths.sort(); // deterministic for a crash seed
        let mut out = lock(&new.shared.fs);
        for path in paths {
            let image = content(&lock(&fs.files[&path].state));
            out.files.insert(
                path.clone(),
                Arc::new(FaultFile {
                    path,
                    state: Mutex::new(FileState {
                        durable: image.clone(),
                        current: image,
                        ..FileState::default()
                    }),
                    fs: Arc::downgrade(&new.shared),
                }),
            );
        }
        out.dirs = fs.dirs.clone();
        drop(out);
        new
    }

    /// The current (not necessarily durable) content of a file.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let fs = lock(&self.shared.fs);
        let file = fs.files.get(path)?;
        let content = lock(&file.state).current.clone();
        Some(content)
    }

    /// Replaces a file's content, durably (to model corruption).
    pub fn set_contents(&self, path: &Path, data: Vec<u8>) {
        let fs = lock(&self.shared.fs);
        if let Some(file) = fs.files.get(path) {
            let mut st = lock(&file.state);
            st.durable = data.clone();
            st.current = data;
            st.unsynced.clear();
            st.dirty.clear();
        }
    }
}

fn apply(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let end = start + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(data);
}

impl FaultFile {
    /// Runs `f` as one operation of kind `op` (which may be made to fail).
    fn run<T>(
        &self,
        op: Option<FaultOp>,
        f: impl FnOnce(&mut FileState) -> io::Result<T>,
    ) -> io::Result<T> {
        self.run_or(op, f, |_| {})
    }

    /// [`FaultFile::run`], running `failed` instead of `f` when the
    /// operation is made to fail, in the same instant.
    fn run_or<T>(
        &self,
        op: Option<FaultOp>,
        f: impl FnOnce(&mut FileState) -> io::Result<T>,
        failed: impl FnOnce(&mut FileState),
    ) -> io::Result<T> {
        let shared = self
            .fs
            .upgrade()
            .ok_or_else(|| io::Error::other("storage dropped"))?;
        if let Some(delay) = op.and_then(|op| shared.delay(op, &self.path)) {
            // A slow disk: the operation takes this long (before it runs,
            // so a crash meanwhile does not wait for it).
            shared.stalled.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(delay);
            shared.stalled.fetch_sub(1, Ordering::SeqCst);
        }
        let _instant = shared.operation();
        let mut st = lock(&self.state);
        if let Some(op) = op {
            if let Err(e) = shared.check(op, &self.path) {
                failed(&mut st);
                return Err(e);
            }
        }
        f(&mut st)
    }

    /// Writes back the dirty writes `which` selects (by offset and
    /// length): takes them off the dirty list and waits as long as the
    /// disk takes for them (no lock held meanwhile, as a disk busy
    /// writing back does not stop reads from the cache). Durability is
    /// the sync's business: the writes stay unsynced.
    fn write_back(&self, which: impl Fn(u64, u64) -> bool) -> io::Result<()> {
        let shared = self
            .fs
            .upgrade()
            .ok_or_else(|| io::Error::other("storage dropped"))?;
        let written = {
            let mut st = lock(&self.state);
            let before = st.dirty.len();
            st.dirty.retain(|&(at, len)| !which(at, len));
            before - st.dirty.len()
        };
        if let Some(cost) = shared.write_back_cost(&self.path) {
            std::thread::sleep(cost.saturating_mul(u32::try_from(written).unwrap_or(u32::MAX)));
        }
        Ok(())
    }
}

impl StorageFile for FaultFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.run(Some(FaultOp::Read), |st| {
            let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
            let end = start
                .checked_add(buf.len())
                .filter(|&e| e <= st.current.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(&st.current[start..end]);
            Ok(())
        })
    }

    fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let data = bufs.concat();
        self.run(Some(FaultOp::Write), |st| {
            apply(&mut st.current, offset, &data);
            st.dirty.push((offset, data.len() as u64));
            st.unsynced.push((offset, data));
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.write_back(|_, _| true)?;
        self.run_or(
            Some(FaultOp::Sync),
            |st| {
                // The writes since the last sync, not `current`: those a
                // failed sync or write-back lost stay lost.
                for (offset, data) in std::mem::take(&mut st.unsynced) {
                    apply(&mut st.durable, offset, &data);
                }
                let len = st.current.len();
                st.durable.resize(len, 0);
                st.dirty.clear();
                Ok(())
            },
            // As Linux does: the write-back failed and its pages are clean,
            // so the disk never gets these writes (a crash loses them)
            // while reads still see them, and the next sync succeeds with
            // nothing to do.
            |st| {
                st.unsynced.clear();
                st.dirty.clear();
            },
        )
    }

    fn write_back_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len);
        let covers = |at: u64, n: u64| at < end && at.saturating_add(n) > offset;
        self.write_back(covers)?;
        // A failed write-back loses what it covers, as a failed sync does.
        self.run_or(
            Some(FaultOp::WriteBack),
            |_| Ok(()),
            |st| {
                st.unsynced
                    .retain(|(at, data)| !covers(*at, data.len() as u64));
            },
        )
    }

    fn size(&self) -> io::Result<u64> {
        self.run(None, |st| Ok(st.current.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.run(None, |st| {
            st.current.resize(len, 0);
            st.durable.resize(len, 0);
            Ok(())
        })
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.run(Some(FaultOp::Allocate), |st| {
            if st.current.len() < len {
                st.current.resize(len, 0);
                st.durable.resize(len, 0);
            }
            Ok(())
        })
    }
}

impl Storage for FaultStorage {
    /// In the system's temporary directory: this storage's directories
    /// exist only in memory, and the file must be real to be mapped.
    fn create_scratch(&self, _dir: &Path) -> io::Result<File> {
        crate::storage::unnamed_file(&std::env::temp_dir())
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let fs = lock(&self.shared.fs);
        let file = fs.files.get(path).ok_or_else(|| not_found(path))?;
        Ok(file.clone())
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let mut fs = lock(&self.shared.fs);
        let parent = path.parent().unwrap_or(Path::new(""));
        if !fs.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        if fs.files.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let file = Arc::new(FaultFile {
            path: path.to_owned(),
            state: Mutex::new(FileState::default()),
            fs: Arc::downgrade(&self.shared),
        });
        fs.files.insert(path.to_owned(), file.clone());
        Ok(file)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut fs = lock(&self.shared.fs);
        fs.files
            .remove(path)
            .map(drop)
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = lock(&self.shared.fs);
        let file = fs.files.remove(from).ok_or_else(|| not_found(from))?;
        let moved = Arc::new(FaultFile {
            path: to.to_owned(),
            state: Mutex::new(std::mem::take(&mut *lock(&file.state))),
            fs: Arc::downgrade(&self.shared),
        });
        fs.files.insert(to.to_owned(), moved);
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = lock(&self.shared.fs);
        for dir in path.ancestors() {
            fs.dirs.insert(dir.to_owned());
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let _instant = self.shared.operation();
        self.shared.check(FaultOp::SyncDir, dir)?;
        if lock(&self.shared.fs).dirs.contains(dir) {
            Ok(())
        } else {
            Err(not_found(dir))
        }
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let fs = lock(&self.shared.fs);
        if !fs.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let children = fs.files.keys().chain(fs.dirs.iter());
        Ok(children
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let fs = lock(&self.shared.fs);
        fs.files.contains_key(path) || fs.dirs.contains(path)
    }

    fn lock(&self, path: &Path) -> io::Result<LockGuard> {
        let mut fs = lock(&self.shared.fs);
        if !fs.locks.insert(path.to_owned()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Box::new(PathLock {
            path: path.to_owned(),
            fs: Arc::downgrade(&self.shared),
        }))
    }
}

struct PathLock {
    path: PathBuf,
    fs: Weak<Shared>,
}

impl Drop for PathLock {
    fn drop(&mut self) {
        if let Some(shared) = self.fs.upgrade() {
            lock(&shared.fs).locks.remove(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (FaultStorage, Arc<dyn StorageFile>) {
        let s = FaultStorage::new();
        s.create_dir_all(Path::new("/v")).expect("mkdir");
        let f = s.create_new(Path::new("/v/f")).expect("create");
        (s, f)
    }

    #[test]
    fn synced_data_survives_every_crash_and_unsynced_may_tear() {
        let (s, f) = setup();
        f.write_all_at(&[b"durable!"], 0).expect("write");
        f.sync_data().expect("sync");
        f.write_all_at(&[b"volatile"], 8).expect("write");
        let mut seen_kept = false;
        let mut seen_lost = false;
        for seed in 0..64 {
            let after = s.crash(seed).contents(Path::new("/v/f")).expect("file");
            assert_eq!(&after[..8], b"durable!");
            let tail = &after[8.min(after.len())..];
            assert!(b"volatile".starts_with(tail), "torn prefix only: {tail:?}");
            seen_kept |= tail == b"volatile";
            seen_lost |= tail.is_empty();
        }
        assert!(seen_kept && seen_lost);
    }

    #[test]
    fn injected_faults_fire_on_the_chosen_operation_only() {
        let (s, f) = setup();
        s.inject(Fault::once_after(FaultOp::Write, 1, 5));
        f.write_all_at(&[b"a"], 0).expect("first write passes");
        let err = f.write_all_at(&[b"b"], 1).expect_err("second fails");
        assert_eq!(err.raw_os_error(), Some(5));
        f.write_all_at(&[b"c"], 2).expect("third passes");
        s.inject(Fault::always(FaultOp::Sync, 28).on_paths_containing("/v/f"));
        assert_eq!(f.sync_data().expect_err("ENOSPC").raw_os_error(), Some(28));
        assert!(f.sync_data().is_err());
        s.clear_faults();
        f.sync_data().expect("cleared");
    }

    #[test]
    fn a_failed_sync_loses_its_writes_to_a_crash_as_on_linux() {
        let (s, f) = setup();
        f.write_all_at(&[b"synced"], 0).expect("write");
        f.sync_data().expect("sync");
        f.write_all_at(&[b"failed"], 0).expect("write");
        s.inject(Fault::once_after(FaultOp::Sync, 0, 5).on_paths_containing("/v/f"));
        assert!(f.sync_data().is_err());
        f.sync_data()
            .expect("the next sync has nothing left to write");
        let mut now = [0u8; 6];
        f.read_exact_at(&mut now, 0).expect("read");
        assert_eq!(&now, b"failed", "still readable");
        for seed in 0..16 {
            let after = s.crash(seed).contents(Path::new("/v/f")).expect("file");
            assert_eq!(&after[..6], b"synced", "seed {seed}");
        }
    }

    #[test]
    fn slow_write_back_costs_each_write_once_and_is_not_durability() {
        let (s, f) = setup();
        let cost = Duration::from_millis(50);
        s.slow_write_back("/v/f", cost);
        for i in 0..8u64 {
            f.write_all_at(&[b"x"], i * 4096).expect("write");
        }
        let timed = |op: &dyn Fn() -> io::Result<()>| {
            let started = std::time::Instant::now();
            op().expect("op");
            started.elapsed()
        };
        // The first four writes.
        let first = timed(&|| f.write_back_range(0, 4 * 4096));
        assert!(first >= 4 * cost, "{first:?}");
        let again = timed(&|| f.write_back_range(0, 4 * 4096));
        assert!(again < cost, "nothing left to write back there: {again:?}");
        let first_kept = |seed| {
            let image = s.crash(seed).contents(Path::new("/v/f"));
            image.is_some_and(|c| c.first() == Some(&b'x'))
        };
        assert!(!(0..32).all(first_kept), "written back, not durable");
        // The sync writes back the other four only.
        let sync = timed(&|| f.sync_data());
        assert!(sync >= 4 * cost && sync < 8 * cost, "{sync:?}");
        assert!((0..32).all(first_kept), "durable once synced");
        s.clear_faults();
        f.write_all_at(&[b"y"], 0).expect("write");
        assert!(timed(&|| f.sync_data()) < cost, "cleared");
    }

    #[test]
    fn locks_are_exclusive_until_dropped() {
        let (s, _f) = setup();
        let g = s.lock(Path::new("/v/f")).expect("first lock");
        assert!(s.lock(Path::new("/v/f")).is_err());
        drop(g);
        s.lock(Path::new("/v/f")).expect("relock");
    }
}
