//! The file system beneath a volume.
//!
//! The engine does all its IO through [`Storage`] so that tests can run it on
//! [`crate::fault::FaultStorage`], which loses unsynced data, tears writes and
//! injects errors. [`OsStorage`] is the real file system.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};

use rustix::fs::{FallocateFlags, FlockOperation, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

/// Held while a volume is open; dropping it releases the lock.
pub type LockGuard = Box<dyn std::any::Any + Send + Sync>;

/// Progress of a long copy: `(bytes done, bytes in all)`.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// How [`Storage::import`] brings an existing image into a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportMode {
    /// Leave the source in place: reflink where the file system can, copy
    /// (sparse) otherwise.
    #[default]
    Clone,
    /// Take the source file itself (rename); copy if it is on another file
    /// system, leaving the source in place.
    Move,
}

/// How an import was actually done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMethod {
    Renamed,
    Reflinked,
    Copied,
}

/// A file system holding volumes.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Creates a file that must not exist yet.
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes creations, removals and renames in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir`.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Takes an exclusive lock on `path` for as long as the guard lives;
    /// fails with `WouldBlock` if someone else holds it.
    fn lock(&self, path: &Path) -> io::Result<LockGuard>;

    /// An unnamed scratch file for a cache the process may lose at any
    /// time (the record index's pages, record_index/pages.rs), on the file
    /// system of `dir`; gone when closed. A real file: it is mapped.
    fn create_scratch(&self, dir: &Path) -> io::Result<File> {
        unnamed_file(dir)
    }

    /// Brings the raw image `src` (a path on the host) in as `dst`.
    ///
    /// The default copies through this storage, skipping zero blocks.
    fn import(
        &self,
        src: &Path,
        dst: &Path,
        _mode: ImportMode,
        progress: Progress<'_>,
    ) -> io::Result<ImportMethod> {
        let source = File::open(src)?;
        let total = source.metadata()?.len();
        let out = self.create_new(dst)?;
        out.set_len(total)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < total {
            let n = usize::try_from((total - done).min(buf.len() as u64)).unwrap_or(buf.len());
            source.read_exact_at(&mut buf[..n], done)?;
            if buf[..n].iter().any(|&b| b != 0) {
                out.write_all_at(&[&buf[..n]], done)?;
            }
            done += n as u64;
            progress(done, total);
        }
        out.sync_data()?;
        Ok(ImportMethod::Copied)
    }

    /// Writes `data` to `path` so that a crash leaves either the old or the
    /// new content: temporary file, sync, rename, sync of the directory.
    fn write_file_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.write_file_atomic_with(path, &mut |f| f.write_all_at(&[data], 0))
    }

    /// [`Storage::write_file_atomic`] of what `write` writes to the
    /// temporary file (a file too large to build in memory first).
    fn write_file_atomic_with(
        &self,
        path: &Path,
        write: &mut dyn FnMut(&dyn StorageFile) -> io::Result<()>,
    ) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = path.with_extension("tmp");
        if self.exists(&tmp) {
            self.remove_file(&tmp)?;
        }
        let f = self.create_new(&tmp)?;
        write(f.as_ref())?;
        f.sync_data()?;
        drop(f);
        self.rename(&tmp, path)?;
        self.sync_dir(dir)
    }
}

/// A file with no name in `dir` (`O_TMPFILE`).
pub fn unnamed_file(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
}

/// One open file.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads `buf` at `offset` only if that does not wait for the disk (the
    /// bytes are all in the page cache); false when it would, or when the
    /// file cannot tell or the read fails (`buf` is then unspecified, and a
    /// [`StorageFile::read_exact_at`] gives the answer). A caller serves
    /// cached reads on its own thread and hands the rest to one that may
    /// wait. Files that cannot tell say false.
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> bool {
        let _ = (buf, offset);
        false
    }
    /// The file's descriptor, for a caller that reads it itself while it
    /// holds this file open (the daemon's io_uring); None where there is
    /// none (in-memory storage).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// A second descriptor of the file, opened with O_DIRECT, for a caller
    /// that reads around the page cache (the daemon's cold reads); None
    /// where there is none or the file system refuses O_DIRECT.
    fn direct_fd(&self) -> Option<RawFd> {
        None
    }
    /// Writes all of `bufs`, one after the other, starting at `offset`.
    fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset` around the page cache (O_DIRECT): on the
    /// disk, if not yet past its cache, when it returns. `offset` and the
    /// length are multiples of 512 and `buf` starts on a page boundary
    /// ([`aligned`]). `Unsupported` where the file system refuses O_DIRECT
    /// (nothing was written); EINVAL where it wants larger alignment. The
    /// pages it covers must never be written through the page cache at
    /// the same time (the kernel could not drop them, and would fail the
    /// file's next sync). Storage without a page cache writes as
    /// [`StorageFile::write_all_at`] does.
    fn write_direct_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(&[buf], offset)
    }
    /// Writes `buf` at `offset` like [`StorageFile::write_all_at`] (in the
    /// page cache when it returns, so only a machine crash can lose it
    /// before a sync), as a store into a shared mapping of the file where
    /// it has one: no system call, and no file lock, so writers of
    /// different ranges copy side by side (ext4's buffered write holds the
    /// inode lock across its copy). A store into a page not in the page
    /// cache reads the page from the disk first, and a store has no error
    /// to return: where that read fails, or the file system cannot place
    /// the page, the process gets SIGBUS. So the journal uses it for
    /// record headers, and for payloads only where
    /// [`StorageFile::stores_read_nothing`] says so. The file must not
    /// shrink while it is open (it is mapped in memory).
    fn write_mapped_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(&[buf], offset)
    }
    /// Whether stores into `[offset, offset + len)` with
    /// [`StorageFile::write_mapped_at`] need nothing of the disk or the
    /// file system: the range is allocated (no hole, nothing shared or
    /// delayed, on a file system whose stores into allocated blocks
    /// allocate nothing: ext4 or XFS), and every page of it is in the page
    /// cache, or none of it was ever written (unwritten extents, whose
    /// pages are zeroes made in memory). The answer can go stale: a page
    /// evicted since costs a read of it and, by readahead, of the pages
    /// around it (and SIGBUS if the read fails). Files that cannot tell
    /// say false.
    fn stores_read_nothing(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// Whether pages that stores ([`StorageFile::write_mapped_at`]) bring
    /// into the page cache from now on come as large folios (2 MiB,
    /// `MADV_HUGEPAGE`), for a file synced rarely, or as single pages. A
    /// large folio is one allocation and one piece of write-back for 512
    /// pages, but the kernel marks all of it dirty at the first store into
    /// it (ext4's `block_page_mkwrite`), so every sync writes the whole folio
    /// back however little of it changed. So where large folios are not
    /// wanted and the file may hold some already (it did before, or it was
    /// not created by this process: it may be cached from an earlier use),
    /// mapped writes go in by pwrite, which marks only the blocks it
    /// writes dirty. Only a hint.
    fn set_large_folios(&self, large: bool) {
        let _ = large;
    }
    /// Takes the file's pages out of this process's page tables, where
    /// [`StorageFile::write_mapped_at`] put them; they stay in the page
    /// cache, dirty ones dirty. Before a sync, and once a file's writes
    /// are done: write-back then need not write-protect them one by one,
    /// and the process's resident size does not count them. Only a hint.
    fn unmap_pages(&self) {}
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Starts writing dirty data back without waiting, so that several
    /// files' syncs overlap. Durability still needs `sync_data`.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Writes the dirty data of `[offset, offset + len)` back to the disk
    /// and waits for it (sync_file_range), so that a long write-back can
    /// be done, and its progress seen, a piece at a time. Not a durability
    /// point: neither the file's metadata nor the device's cache is
    /// flushed, so `sync_data` is still needed after it (and has less left
    /// to do). An error means some of the range may never reach the disk,
    /// and is reported once: the caller must write that data again rather
    /// than retry the write-back. The default does nothing (`sync_data`
    /// then does it all).
    fn write_back_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Asks for `[offset, offset + len)` to be read into the page cache in
    /// the background (readahead), so that reads of it soon after do not
    /// wait for the disk one request at a time. Only a hint.
    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Copies `[from, from + len)` of this file to `to` in `dst`. The
    /// default reads into a buffer and writes it; files with a page cache
    /// copy once, from page cache to page cache (`splice_copy`).
    fn copy_range_to(&self, dst: &dyn StorageFile, from: u64, to: u64, len: u64) -> io::Result<()> {
        copy_through_buffer(self, dst, from, to, len)
    }
    fn size(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves space for `[0, len)` so later writes there need no allocation.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeroes (deallocating it where
    /// the file system can).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_buffers(offset, len, |buf, at| self.write_all_at(&[buf], at))
    }
    /// Whether every block of `[offset, offset + len)` is allocated and
    /// written: no hole, no unwritten (preallocated) extent, so that a
    /// write there changes no file system metadata. Files that cannot
    /// tell say true.
    fn fully_written(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(true)
    }
    /// Whether `[offset, offset + len)` may hold data: false when it is
    /// all hole (it reads as zeroes). Files that cannot tell say true.
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(true)
    }
    /// Copies the first `len` bytes to `dst` (which reads as zeroes),
    /// leaving holes where this reads zeroes; reports bytes done.
    fn copy_to(&self, dst: &File, len: u64, progress: Progress<'_>) -> io::Result<()> {
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            self.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
            progress(at, len);
        }
        Ok(())
    }
}

/// The most zeroes [`aligned_zeroes`] hands out at once.
pub(crate) const ALIGNED_ZEROES: u64 = 8 << 20;

/// `len` zero bytes, at most [`ALIGNED_ZEROES`], starting on a page
/// boundary, as [`StorageFile::write_direct_at`] needs.
pub(crate) fn aligned_zeroes(len: u64) -> &'static [u8] {
    const PAGE: usize = 4096;
    static ZEROES: OnceLock<Vec<u8>> = OnceLock::new();
    let zeroes = ZEROES.get_or_init(|| vec![0u8; ALIGNED_ZEROES as usize + PAGE]);
    let start = zeroes.as_ptr().align_offset(PAGE);
    &zeroes[start..start + len.min(ALIGNED_ZEROES) as usize]
}

/// Writes zeroes over `[offset, offset + len)` with `write(buffer, at)`.
fn write_zero_buffers(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(ZEROES.len() as u64) as usize;
        write(&ZEROES[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// cachestat(2) (Linux 6.5): the same number on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether the page cache holds all of bytes `offset..offset + len` of
/// `fd`; None where the kernel cannot say. Unlike a RWF_NOWAIT read, the
/// question starts no readahead.
pub fn page_cache_holds(fd: RawFd, offset: u64, len: u64) -> Option<bool> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range { off: offset, len };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of
    // the kernel's layout, and only looks `fd` up (a bad one is EBADF).
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd,
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    let page = rustix::param::page_size() as u64;
    let pages = offset.saturating_add(len).div_ceil(page) - offset / page;
    (r == 0).then_some(stat.nr_cache >= pages)
}

/// The host's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsStorage;

impl OsStorage {
    pub fn shared() -> Arc<dyn Storage> {
        Arc::new(OsStorage)
    }
}

#[derive(Debug)]
struct OsFile {
    file: File,
    /// A shared mapping of the whole file, made at the first mapped write:
    /// a store into the page cache costs no system call. `None` where the
    /// file cannot be mapped (mapped writes then use pwrite). Where pwrite
    /// would fail with EIO (a page evicted and then unreadable), a store
    /// raises SIGBUS instead: the process dies, which the journal survives
    /// as it survives any crash. Stores go only where no allocation is
    /// needed (`stores_read_nothing`), so ENOSPC never becomes SIGBUS.
    mapped: OnceLock<Option<MmapRaw>>,
    /// The O_DIRECT descriptor, opened at the first ask; `None` once the
    /// file system refused O_DIRECT (EINVAL). Other failures (out of
    /// descriptors, say) are not kept: the next ask tries again.
    direct: OnceLock<Option<File>>,
    /// The same for writing (`write_direct_at`): readers of a read-only
    /// file must not need write access.
    direct_write: OnceLock<Option<File>>,
    /// `stores_allocate_nothing`'s answer.
    in_place: OnceLock<bool>,
    /// How mapped writes go in (`set_large_folios`): `PAGES`,
    /// `LARGE_FOLIOS` or `PWRITE`. Only a file this process created starts
    /// in `PAGES`: one it opened may have large folios cached from an
    /// earlier use.
    folios: AtomicU8,
}

/// `OsFile::folios`: stores, faulting single pages in. The page cache holds
/// no large folio of the file.
const PAGES: u8 = 0;
/// Stores, faulting large folios in.
const LARGE_FOLIOS: u8 = 1;
/// pwrite: large folios are not wanted, and the page cache may hold some.
const PWRITE: u8 = 2;

impl OsFile {
    /// `created`: this process created the file (none of it is cached).
    fn new(file: File, created: bool) -> Self {
        OsFile {
            file,
            mapped: OnceLock::new(),
            direct: OnceLock::new(),
            direct_write: OnceLock::new(),
            in_place: OnceLock::new(),
            folios: AtomicU8::new(if created { PAGES } else { PWRITE }),
        }
    }

    /// The O_DIRECT descriptor `slot` keeps, opened at the first ask (as
    /// the `direct` field says).
    fn direct<'a>(&self, slot: &'a OnceLock<Option<File>>, write: bool) -> Option<&'a File> {
        if slot.get().is_none() {
            // The same inode (renamed or unlinked ones too) with flags of
            // its own.
            let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
            let opened = OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_DIRECT)
                .open(path);
            match opened {
                // A racing ask may have set it first: either is the file.
                Ok(file) => {
                    let _ = slot.set(Some(file));
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let _ = slot.set(None);
                }
                Err(_) => return None,
            }
        }
        slot.get()?.as_ref()
    }

    /// The extents of `[offset, offset + len)` (FIEMAP), at most
    /// `FIEMAP_EXTENTS` of them.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Fiemap> {
        let mut map = Fiemap {
            start: offset,
            length: len,
            flags: 0,
            mapped_extents: 0,
            extent_count: FIEMAP_EXTENTS as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); FIEMAP_EXTENTS],
        };
        let fd = self.file.as_raw_fd();
        retry_eintr(|| {
            // SAFETY: `map` is a `struct fiemap` with room for the
            // `extent_count` extents it announces, alive and exclusively
            // borrowed for the call; the kernel writes no further.
            let r = unsafe { libc::ioctl(fd, FS_IOC_FIEMAP, &mut map as *mut Fiemap) };
            if r == 0 {
                Ok(())
            } else {
                Err(Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(Errno::IO))
            }
        })?;
        Ok(map)
    }

    /// How `[offset, offset + len)` is allocated: `None` where some of it
    /// is not, or not plainly (a hole, delayed allocation, shared or
    /// encoded extents, more extents than one call returns).
    fn allocated(&self, offset: u64, len: u64) -> io::Result<Option<Allocated>> {
        let end = offset.saturating_add(len);
        let map = self.extents(offset, len)?;
        let mut covered = offset;
        let mut written = false;
        for e in map.found() {
            if e.logical > covered || e.flags & !PLAIN_EXTENT_FLAGS != 0 {
                return Ok(None);
            }
            written |= e.flags & FIEMAP_EXTENT_UNWRITTEN == 0;
            covered = covered.max(e.logical.saturating_add(e.length));
        }
        Ok((covered >= end).then_some(if written {
            Allocated::Written
        } else {
            Allocated::Unwritten
        }))
    }

    /// Whether the file system allocates nothing for a store into an
    /// allocated block (ext4, XFS), asked once: copy-on-write ones
    /// (btrfs) reserve space at each first store, and raise SIGBUS where
    /// they find none.
    fn stores_allocate_nothing(&self) -> bool {
        *self.in_place.get_or_init(|| {
            rustix::fs::fstatfs(&self.file)
                .is_ok_and(|st| matches!(st.f_type as u64, EXT4_MAGIC | XFS_MAGIC))
        })
    }

    fn mapping(&self) -> Option<&MmapRaw> {
        self.mapped
            .get_or_init(|| match MmapOptions::new().map_raw(&self.file) {
                Ok(map) => {
                    if self.folios.load(Ordering::Acquire) == LARGE_FOLIOS {
                        advise_large_folios(&map);
                    }
                    Some(map)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot map a file; mapped writes use pwrite");
                    None
                }
            })
            .as_ref()
    }
}

/// Asks the kernel for large folios where stores into `map` fault.
/// Nothing asks for single pages again: a file that leaves `LARGE_FOLIOS`
/// goes to `PWRITE`, whose writes fault nothing in.
fn advise_large_folios(map: &MmapRaw) {
    if let Err(e) = map.advise(Advice::HugePage) {
        tracing::debug!(error = %e, "could not ask for large folios");
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> Result<T, Errno>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

impl StorageFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// preadv2 with RWF_NOWAIT: EAGAIN where a page is not cached.
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let mut iov = [IoSliceMut::new(&mut buf[done..])];
            match rustix::io::preadv2(
                &self.file,
                &mut iov,
                offset + done as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => return false,
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                // EAGAIN (not cached), EOPNOTSUPP (no RWF_NOWAIT here), or
                // an error the waiting read reports with its context.
                Err(_) => return false,
            }
        }
        true
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn direct_fd(&self) -> Option<RawFd> {
        self.direct(&self.direct, false).map(AsRawFd::as_raw_fd)
    }

    fn write_direct_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.direct(&self.direct_write, true) {
            Some(file) => file.write_all_at(buf, offset),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no O_DIRECT descriptor for this file",
            )),
        }
    }

    fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        if let [one] = bufs {
            return self.file.write_all_at(one, offset);
        }
        let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut at = offset;
        while !rest.is_empty() {
            let n = retry_eintr(|| rustix::io::pwritev(&self.file, rest, at))?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            at += n as u64;
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn write_mapped_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.folios.load(Ordering::Relaxed) == PWRITE {
            return self.file.write_all_at(buf, offset);
        }
        let Some(map) = self.mapping() else {
            return self.file.write_all_at(buf, offset);
        };
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        if start
            .checked_add(buf.len())
            .is_none_or(|end| end > map.len())
        {
            return self.file.write_all_at(buf, offset);
        }
        // SAFETY: `[start, start + buf.len())` lies within the mapping
        // (checked above), which lives as long as `self`. The mapped bytes
        // are only ever written, with raw copies, never borrowed as a Rust
        // reference, and the caller keeps the file from shrinking under the
        // mapping (the trait's contract). Concurrent writers of overlapping
        // ranges would race as they would with pwrite; the journal gives
        // every header its own slot.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), map.as_mut_ptr().add(start), buf.len());
        }
        Ok(())
    }

    /// FIEMAP, then cachestat (one call, no lock) where some of the range
    /// was written.
    fn stores_read_nothing(&self, offset: u64, len: u64) -> bool {
        if !self.stores_allocate_nothing() || self.mapping().is_none() {
            return false;
        }
        match self.allocated(offset, len) {
            Ok(Some(Allocated::Unwritten)) => true,
            Ok(Some(Allocated::Written)) => {
                page_cache_holds(self.file.as_raw_fd(), offset, len) == Some(true)
            }
            Ok(None) | Err(_) => false,
        }
    }

    fn set_large_folios(&self, large: bool) {
        if !large {
            // Pages stay stores only while no large folio was ever made.
            let _ = self.folios.compare_exchange(
                LARGE_FOLIOS,
                PWRITE,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            return;
        }
        if self.folios.swap(LARGE_FOLIOS, Ordering::AcqRel) != LARGE_FOLIOS {
            if let Some(map) = self.mapped.get().and_then(Option::as_ref) {
                advise_large_folios(map);
            }
        }
    }

    fn unmap_pages(&self) {
        let Some(map) = self.mapped.get().and_then(Option::as_ref) else {
            return;
        };
        // SAFETY: the mapping is shared and of a file: MADV_DONTNEED only
        // drops its page table entries (a dirty one marks its page dirty
        // first), and a later access faults the same page cache page back
        // in, so no store is lost and nothing reads zeroes. No Rust
        // reference into the mapping exists (stores are raw copies).
        if let Err(e) = unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) } {
            tracing::debug!(error = %e, "could not unmap a file's pages");
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        retry_eintr(|| rustix::fs::fdatasync(&self.file))
    }

    fn start_writeback(&self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: `fd` is open for as long as `self.file` lives, which spans the
        // call; sync_file_range takes no pointers.
        let r = unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_back_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let offset = i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // Past i64::MAX it runs to the end of the file (nbytes 0).
        let len = i64::try_from(len).unwrap_or(0);
        // Waits for pages already under writeback, writes the dirty ones
        // and waits for them too: the range's data is on the disk (not
        // necessarily past its cache) when it returns.
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        retry_eintr(|| {
            // SAFETY: `fd` is open for as long as `self.file` lives, which
            // spans the call; sync_file_range takes no pointers.
            let r = unsafe { libc::sync_file_range(fd, offset, len, flags) };
            if r == 0 {
                Ok(())
            } else {
                Err(Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(Errno::IO))
            }
        })
    }

    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = std::num::NonZeroU64::new(len);
        retry_eintr(|| rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::WillNeed))
    }

    fn copy_range_to(&self, dst: &dyn StorageFile, from: u64, to: u64, len: u64) -> io::Result<()> {
        let Some(fd) = dst.raw_fd() else {
            return copy_through_buffer(self, dst, from, to, len);
        };
        // SAFETY: `dst` is borrowed for the whole call and keeps its
        // descriptor open while it lives.
        let dst_fd = unsafe { BorrowedFd::borrow_raw(fd) };
        match splice_copy(self.file.as_fd(), dst_fd, from, to, len) {
            // A file system that cannot splice: nothing lost, the copy
            // is only done again (it is idempotent).
            Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                copy_through_buffer(self, dst, from, to, len)
            }
            other => other,
        }
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        match retry_eintr(|| rustix::fs::fallocate(&self.file, FallocateFlags::empty(), 0, len)) {
            // File systems without fallocate: size the file; blocks come on write.
            Err(e) if e.raw_os_error() == Some(libc_eopnotsupp()) => self.file.set_len(len),
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&self.file, offset, len)
    }

    fn copy_to(&self, dst: &File, len: u64, progress: Progress<'_>) -> io::Result<()> {
        copy_data_ranges(&self.file, dst, 0, len, progress)
    }

    /// FIEMAP (SEEK_HOLE would not do: it counts cached pages of an
    /// unwritten extent as data). More extents than one call returns
    /// count as not fully written.
    fn fully_written(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len);
        let map = self.extents(offset, len)?;
        let mut covered = offset;
        for e in map.found() {
            if e.logical > covered || e.flags & FIEMAP_EXTENT_UNWRITTEN != 0 {
                return Ok(false);
            }
            covered = covered.max(e.logical.saturating_add(e.length));
        }
        Ok(covered >= end)
    }

    /// SEEK_DATA, which moves the file offset: harmless, as every read and
    /// write here gives its own offset.
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(data) => Ok(data < offset.saturating_add(len)),
            Err(Errno::NXIO) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// `_IOWR('f', 11, struct fiemap)` (linux/fs.h).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `fe_flags`: preallocated, reads as zeroes (linux/fiemap.h).
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// `fe_flags` of an extent allocated in place: the last one, unwritten,
/// merged from several (linux/fiemap.h).
const PLAIN_EXTENT_FLAGS: u32 = 0x1 | FIEMAP_EXTENT_UNWRITTEN | 0x1000;
/// `f_type` of ext4 and XFS (linux/magic.h).
const EXT4_MAGIC: u64 = 0xEF53;
const XFS_MAGIC: u64 = 0x5846_5342;

/// How an allocated range is (`OsFile::allocated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allocated {
    /// Some of it holds written data.
    Written,
    /// All of it is preallocated and reads as zeroes.
    Unwritten,
}
/// Extents asked of one FIEMAP call.
const FIEMAP_EXTENTS: usize = 32;

/// `struct fiemap` (linux/fiemap.h) with room for `FIEMAP_EXTENTS`.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_EXTENTS],
}

impl Fiemap {
    /// The extents the kernel filled in.
    fn found(&self) -> &[FiemapExtent] {
        &self.extents[..(self.mapped_extents as usize).min(FIEMAP_EXTENTS)]
    }
}

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

thread_local! {
    /// Where `write_direct_parts` puts a request together.
    static DIRECT_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes `parts`, one after the other, at `offset` with
/// [`StorageFile::write_direct_at`], copied into a page-aligned buffer
/// (one per thread, kept for reuse) as O_DIRECT wants.
pub fn write_direct_parts(file: &dyn StorageFile, parts: &[&[u8]], offset: u64) -> io::Result<()> {
    const ALIGN: usize = 4096;
    let len = parts.iter().map(|p| p.len()).sum::<usize>();
    DIRECT_BUFFER.with_borrow_mut(|store| {
        if store.len() < len + ALIGN {
            store.resize(len + ALIGN, 0);
        }
        let start = store.as_ptr().align_offset(ALIGN);
        let mut at = start;
        for part in parts {
            store[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        file.write_direct_at(&store[start..start + len], offset)
    })
}

/// Largest piece [`copy_through_buffer`] reads at a time.
const COPY_BUFFER: u64 = 1 << 20;

/// [`StorageFile::copy_range_to`] through a buffer: a read, then a write.
fn copy_through_buffer(
    src: &(impl StorageFile + ?Sized),
    dst: &dyn StorageFile,
    from: u64,
    to: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(COPY_BUFFER) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(COPY_BUFFER) as usize;
        src.read_exact_at(&mut buf[..n], from + done)?;
        dst.write_all_at(&[&buf[..n]], to + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Pipe size `splice_copy` asks for (the default limit for users,
/// /proc/sys/fs/pipe-max-size); it keeps the default where refused.
const SPLICE_PIPE: usize = 1 << 20;

/// Copies `[from, from + len)` of `src` to `to` in `dst` through a pipe:
/// the source's page-cache pages go into the pipe by reference and are
/// copied once, into `dst`'s page cache, where a read into a buffer and a
/// write from it copy twice (the fold spent a third of its time in the
/// read's copy). Not copy_file_range: where the file system can, it
/// shares the extents instead (XFS, btrfs), and a segment file must keep
/// blocks of its own, as it is written again.
fn splice_copy(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    from: u64,
    to: u64,
    len: u64,
) -> io::Result<()> {
    use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
    let (pipe_out, pipe_in) = pipe_with(PipeFlags::CLOEXEC)?;
    let capacity = fcntl_setpipe_size(&pipe_in, SPLICE_PIPE).unwrap_or(64 << 10);
    let (mut read_at, mut write_at) = (from, to);
    while read_at < from + len {
        let want = usize::try_from(from + len - read_at).map_or(capacity, |n| n.min(capacity));
        let mut in_pipe = retry_eintr(|| {
            splice(
                src,
                Some(&mut read_at),
                &pipe_in,
                None,
                want,
                SpliceFlags::MOVE,
            )
        })?;
        if in_pipe == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the source ends at {read_at}, before {}", from + len),
            ));
        }
        while in_pipe > 0 {
            let moved = retry_eintr(|| {
                splice(
                    &pipe_out,
                    None,
                    dst,
                    Some(&mut write_at),
                    in_pipe,
                    SpliceFlags::MOVE,
                )
            })?;
            if moved == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            in_pipe -= moved;
        }
    }
    Ok(())
}

/// Makes `[offset, offset + len)` of a host file read as zeroes: punches
/// a hole, or writes zeroes where the file system cannot.
pub fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match retry_eintr(|| rustix::fs::fallocate(f, flags, offset, len)) {
        Err(e) if e.raw_os_error() == Some(libc_eopnotsupp()) => {
            write_zero_buffers(offset, len, |buf, at| f.write_all_at(buf, at))
        }
        other => other,
    }
}

fn libc_eopnotsupp() -> i32 {
    Errno::OPNOTSUPP.raw_os_error()
}

impl Storage for OsStorage {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(OsFile::new(f, false)))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(OsFile::new(f, true)))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let d = File::open(dir)?;
        retry_eintr(|| rustix::fs::fsync(&d))
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn lock(&self, path: &Path) -> io::Result<LockGuard> {
        let f = OpenOptions::new().read(true).open(path)?;
        retry_eintr(|| rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive))?;
        Ok(Box::new(f))
    }

    fn import(
        &self,
        src: &Path,
        dst: &Path,
        mode: ImportMode,
        progress: Progress<'_>,
    ) -> io::Result<ImportMethod> {
        let total = std::fs::metadata(src)?.len();
        if mode == ImportMode::Move {
            match std::fs::rename(src, dst) {
                Ok(()) => {
                    // Written by whoever made it, perhaps not yet on disk:
                    // the volume is complete only once its base is.
                    if let Err(e) = File::open(dst).and_then(|image| settle(&image)) {
                        // No volume is made: the image goes back where it was.
                        let _ = std::fs::rename(dst, src);
                        return Err(e);
                    }
                    progress(total, total);
                    return Ok(ImportMethod::Renamed);
                }
                Err(e) if e.raw_os_error() == Some(Errno::XDEV.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
        let source = File::open(src)?;
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dst)?;
        if rustix::fs::ioctl_ficlone(&out, &source).is_ok() {
            settle(&out)?;
            progress(total, total);
            return Ok(ImportMethod::Reflinked);
        }
        out.set_len(total)?;
        copy_sparse(&source, &out, total, progress)?;
        settle(&out)?;
        Ok(ImportMethod::Copied)
    }
}

/// Makes an imported image durable, then drops its cached pages (clean
/// once synced). A file copied or read in large runs is cached in large
/// folios (ext4 since Linux 6.16), and a 4 KiB write into one walks every
/// block of the folio: the fold's 4 KiB writes into the base cost 12 us
/// each there against 2.7 us into uncached blocks (vhost-blk/BENCHMARKS.md, "Fold writes into large
/// folios"). Uncached blocks are read around the page cache (O_DIRECT), so
/// the guest loses only a warm start.
fn settle(file: &File) -> io::Result<()> {
    file.sync_all()?;
    retry_eintr(|| rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed))
}

/// Copies the data ranges of `src` (skipping holes) with copy_file_range,
/// which the kernel may turn into a server-side or reflinked copy.
fn copy_sparse(src: &File, dst: &File, total: u64, progress: Progress<'_>) -> io::Result<()> {
    copy_data_ranges(src, dst, 0, total, progress)?;
    progress(total, total);
    Ok(())
}

/// Copies the data ranges of `src` in `[from, total)` to the same offsets
/// of `dst`, skipping holes.
fn copy_data_ranges(
    src: &File,
    dst: &File,
    from: u64,
    total: u64,
    progress: Progress<'_>,
) -> io::Result<()> {
    const CHUNK: u64 = 64 << 20;
    let mut pos = from;
    while pos < total {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) if d >= total => break,
            Ok(d) => d,
            Err(Errno::NXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(total);
        let mut at = data;
        while at < hole {
            let len = usize::try_from((hole - at).min(CHUNK)).unwrap_or(CHUNK as usize);
            let (mut off_in, mut off_out) = (at, at);
            let n = retry_eintr(|| {
                rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), len)
            })?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source image shrank during import",
                ));
            }
            at += n as u64;
            progress(at, total);
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized_file(dir: &Path, len: u64) -> Arc<dyn StorageFile> {
        let f = OsStorage.create_new(&dir.join("f")).expect("create");
        f.allocate(len).expect("allocate");
        f
    }

    #[test]
    fn fully_written_sees_holes_and_unwritten_extents_not_cached_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mib = 1 << 20;
        let f = sized_file(dir.path(), 4 * mib);
        assert!(
            !f.fully_written(0, 4 * mib).expect("fiemap"),
            "preallocated"
        );
        // Cached pages of an unwritten extent (which SEEK_DATA counts as
        // data) do not make it written.
        f.read_exact_at(&mut vec![0u8; mib as usize], mib)
            .expect("read");
        assert!(
            !f.fully_written(mib, mib).expect("fiemap"),
            "read, still unwritten"
        );
        write_direct_parts(f.as_ref(), &[&vec![0u8; mib as usize]], mib).expect("direct write");
        assert!(f.fully_written(mib, mib).expect("fiemap"), "written");
        assert!(
            !f.fully_written(mib - 4096, mib).expect("fiemap"),
            "one page before is not"
        );
        assert!(!f.fully_written(0, 4 * mib).expect("fiemap"));
        // A hole is not written either.
        let sparse = OsStorage.create_new(&dir.path().join("s")).expect("create");
        sparse.set_len(4 * mib).expect("size");
        assert!(!sparse.fully_written(0, mib).expect("fiemap"), "hole");
    }

    #[test]
    fn stores_read_nothing_where_allocated_pages_are_cached_or_never_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mib = 1 << 20;
        let f = sized_file(dir.path(), 4 * mib);
        assert!(f.stores_read_nothing(0, 4 * mib), "preallocated: unwritten");
        // Written around the page cache: a store would read it first.
        write_direct_parts(f.as_ref(), &[&vec![7u8; mib as usize]], mib).expect("direct write");
        assert!(!f.stores_read_nothing(mib, mib), "written, not cached");
        assert!(
            !f.stores_read_nothing(mib - 4096, 8192),
            "a range with one such page"
        );
        assert!(f.stores_read_nothing(0, mib), "the unwritten rest");
        f.read_exact_at(&mut vec![0u8; mib as usize], mib)
            .expect("read");
        assert!(f.stores_read_nothing(mib, mib), "written and cached");
        // A store into a hole allocates: it could find no space, and a
        // store cannot return ENOSPC.
        let sparse = OsStorage.create_new(&dir.path().join("s")).expect("create");
        sparse.set_len(4 * mib).expect("size");
        assert!(!sparse.stores_read_nothing(0, mib), "a hole");
        sparse
            .read_exact_at(&mut vec![0u8; mib as usize], 0)
            .expect("read");
        assert!(!sparse.stores_read_nothing(0, mib), "a cached hole");
    }

    /// Resident kB of this process's mappings of `path` (/proc/self/smaps).
    fn mapped_resident_kb(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let name = path.to_str().expect("utf-8 path");
        let mut ours = false;
        let mut kb = 0;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if ours {
                    kb += rss
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .expect("kB");
                }
            } else if line.contains('-') && line.split_whitespace().count() >= 5 {
                // A mapping's first line: range, perms, offset, dev, inode[, path].
                ours = line.ends_with(name);
            }
        }
        kb
    }

    /// Bytes this thread made dirty (`write_bytes`, /proc/thread-self/io).
    fn thread_write_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("io accounting");
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("write_bytes")
    }

    #[test]
    fn large_folios_are_made_only_when_asked_and_left_by_pwrite() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .expect("this test needs transparent huge pages in the kernel");
        assert!(
            !thp.contains("[never]"),
            "transparent huge pages are off (`{}`): this test needs `madvise`",
            thp.trim()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str| {
            let f = OsStorage
                .create_new(&dir.path().join(name))
                .expect("create");
            f.allocate(8 << 20).expect("allocate");
            f
        };
        // The kernel counts a folio's size to the thread that dirties it
        // (a large one may come smaller where memory is fragmented).
        let dirtied_by = |store: &dyn Fn()| {
            let before = thread_write_bytes();
            store();
            thread_write_bytes() - before
        };
        let pages = file("pages");
        let dirtied = dirtied_by(&|| pages.write_mapped_at(&[1; 4096], 0).expect("a store"));
        assert!(
            dirtied <= 64 << 10,
            "single pages: a store dirtied {dirtied} bytes"
        );

        let large = file("large");
        large.set_large_folios(true);
        let dirtied = dirtied_by(&|| large.write_mapped_at(&[2; 4096], 0).expect("a store"));
        assert!(
            dirtied > 64 << 10,
            "a large folio: a store dirtied {dirtied} bytes"
        );
        large.unmap_pages();

        // Into the large folio and past it: pwrite, nothing mapped.
        large.set_large_folios(false);
        large.write_mapped_at(&[3; 4096], 8192).expect("a write");
        large.write_mapped_at(&[4; 4096], 6 << 20).expect("a write");
        let path = dir.path().join("large");
        assert_eq!(mapped_resident_kb(&path), 0, "written by pwrite");
        large.sync_data().expect("sync");
        drop(large);
        let bytes = std::fs::read(&path).expect("read back");
        for (at, value) in [(0, 2), (8192, 3), (6 << 20, 4)] {
            assert!(bytes[at..at + 4096].iter().all(|&b| b == value), "at {at}");
        }
        assert!(bytes[4096..8192].iter().all(|&b| b == 0), "between");
        assert!(bytes[12288..6 << 20].iter().all(|&b| b == 0), "the rest");

        // A file this process did not create may hold large folios from
        // an earlier use: pwrite until large folios are asked for.
        let opened = OsStorage.open(&path).expect("open");
        opened.write_mapped_at(&[5; 4096], 4096).expect("a write");
        assert_eq!(mapped_resident_kb(&path), 0, "an opened file: pwrite");
        opened.set_large_folios(true);
        opened.write_mapped_at(&[6; 4096], 12288).expect("a store");
        assert!(mapped_resident_kb(&path) > 0, "asked for: stores");
        let mut got = [0u8; 4096];
        opened.read_exact_at(&mut got, 4096).expect("read");
        assert_eq!(got, [5; 4096]);
        opened.read_exact_at(&mut got, 12288).expect("read");
        assert_eq!(got, [6; 4096]);
    }

    #[test]
    fn unmapped_pages_keep_their_stores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = sized_file(dir.path(), 64 << 10);
        f.write_mapped_at(b"stored", 8192).expect("write");
        let path = dir.path().join("f");
        assert!(mapped_resident_kb(&path) >= 4, "the stored page is mapped");
        f.unmap_pages();
        assert_eq!(mapped_resident_kb(&path), 0, "no page mapped");
        let mut buf = [0u8; 6];
        f.read_exact_at(&mut buf, 8192).expect("read");
        assert_eq!(&buf, b"stored", "still in the page cache");
        f.write_mapped_at(b"again", 0).expect("a store after");
        f.sync_data().expect("sync");
        drop(f);
        let bytes = std::fs::read(dir.path().join("f")).expect("read back");
        assert_eq!(&bytes[8192..8198], b"stored");
        assert_eq!(&bytes[..5], b"again");
    }

    #[test]
    fn mapped_writes_are_read_back_and_reach_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = sized_file(dir.path(), 64 << 10);
        f.write_mapped_at(b"first", 0).expect("write");
        f.write_mapped_at(b"last", (64 << 10) - 4).expect("write");
        f.write_all_at(&[b"pwrite"], 512).expect("write");
        f.write_mapped_at(b"PW", 512).expect("write over a pwrite");
        let mut buf = [0u8; 6];
        f.read_exact_at(&mut buf, 512).expect("read");
        assert_eq!(&buf, b"PWrite");
        f.sync_data().expect("sync");
        drop(f);
        let bytes = std::fs::read(dir.path().join("f")).expect("read back");
        assert_eq!(
            bytes.len(),
            64 << 10,
            "a mapped write never resizes the file"
        );
        assert_eq!(&bytes[..5], b"first");
        assert_eq!(&bytes[512..518], b"PWrite");
        assert_eq!(&bytes[bytes.len() - 4..], b"last");
    }

    #[test]
    fn mapped_writes_past_the_mapped_size_use_pwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = sized_file(dir.path(), 4096);
        f.write_mapped_at(b"mapped", 0).expect("write");
        // Past the end of the mapping (made at 4096 bytes): grows the file.
        f.write_mapped_at(b"beyond", 4094)
            .expect("write across the end");
        f.write_mapped_at(b"far", 10_000)
            .expect("write past the end");
        assert_eq!(f.size().expect("size"), 10_003);
        let bytes = std::fs::read(dir.path().join("f")).expect("read back");
        assert_eq!(&bytes[..6], b"mapped");
        assert_eq!(&bytes[4094..4100], b"beyond");
        assert_eq!(&bytes[10_000..], b"far");
    }

    #[test]
    fn an_empty_file_takes_mapped_writes_through_pwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = OsStorage.create_new(&dir.path().join("f")).expect("create");
        f.write_mapped_at(b"grown", 0).expect("write");
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, 0).expect("read");
        assert_eq!(&buf, b"grown");
    }

    /// `len` bytes of a pattern that differs at every offset of a pipe.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i / 7) as u8 ^ (i % 251) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn range_copies_move_exact_bytes_across_pipe_sized_pieces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = OsStorage.create_new(&dir.path().join("src")).expect("src");
        let dst = OsStorage.create_new(&dir.path().join("dst")).expect("dst");
        let data = pattern(5 << 20, 1);
        src.write_all_at(&[&data], 0).expect("fill");
        let mut want = pattern(6 << 20, 2);
        dst.write_all_at(&[&want], 0).expect("fill dst");
        // Unaligned ends, longer than the pipe, and one that ends the file.
        for (from, to, len) in [
            (512, 3 << 20, 2 << 20),
            (3, 100, 70_001),
            ((5 << 20) - 4096, 0, 4096),
        ] {
            src.copy_range_to(dst.as_ref(), from, to, len)
                .expect("copy");
            let (f, t, n) = (from as usize, to as usize, len as usize);
            want[t..t + n].copy_from_slice(&data[f..f + n]);
        }
        let mut got = vec![0u8; want.len()];
        dst.read_exact_at(&mut got, 0).expect("read back");
        assert!(
            got == want,
            "the copies landed where asked, nothing else changed"
        );
    }

    #[test]
    fn an_imported_image_leaves_none_of_its_pages_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = pattern(4 << 20, 3);
        for mode in [ImportMode::Clone, ImportMode::Move] {
            let src = dir.path().join(format!("{mode:?}.raw"));
            let dst = dir.path().join(format!("{mode:?}.base"));
            std::fs::write(&src, &data).expect("image");
            let method = OsStorage
                .import(&src, &dst, mode, &mut |_, _| {})
                .expect("import");
            let base = File::open(&dst).expect("base");
            let cached: Vec<u64> = (0..data.len() as u64)
                .step_by(4096)
                .filter(|&at| page_cache_holds(base.as_raw_fd(), at, 4096) == Some(true))
                .collect();
            assert!(
                cached.is_empty(),
                "{method:?}: pages left cached at {cached:?}"
            );
            let mut got = vec![0u8; data.len()];
            base.read_exact_at(&mut got, 0).expect("read back");
            assert!(got == data, "{method:?}: the image's bytes");
        }
    }

    #[test]
    fn a_range_copy_past_the_source_end_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = OsStorage.create_new(&dir.path().join("src")).expect("src");
        let dst = OsStorage.create_new(&dir.path().join("dst")).expect("dst");
        src.write_all_at(&[&[7u8; 8192]], 0).expect("fill");
        for copy in [
            |s: &dyn StorageFile, d: &dyn StorageFile| s.copy_range_to(d, 4096, 0, 8192),
            |s: &dyn StorageFile, d: &dyn StorageFile| copy_through_buffer(s, d, 4096, 0, 8192),
        ] {
            let e = copy(src.as_ref(), dst.as_ref()).expect_err("short source");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
    }
}
