//! Which segments cache their stored pages in large folios.
//!
//! Records go into the segment being written as stores into its mapping
//! (storage.rs, `write_mapped_at`), new pages by page faults. In large
//! folios (2 MiB) one allocation and one piece of write-back serve 512
//! pages, and faults are far fewer than new pages (rewind-blk took 14.9k
//! in all for 200,000 warm 4 KiB writes):
//! warm 4 KiB writes cost about a fifth less CPU each (BENCHMARKS.md,
//! "Stores into large folios"). But the kernel marks a whole folio dirty at
//! the first store into it, so a sync of the segment writes back all of
//! every folio written since the last, however little of each is new: the
//! folio the newest payload lies in and the one its header slot lies in
//! (payloads fill a segment from its start, header slots from its end), 4
//! MiB for a guest's 4 KiB write and flush.
//!
//! So large folios are kept for segments synced rarely. Invariant: the
//! syncs of a segment in large folios rewrite at most a quarter of its
//! size (`sync_budget` syncs of two folios). A segment starts in large
//! folios when the one written before it took fewer syncs than the budget
//! (the first one does: nothing says otherwise yet); at the sync that
//! reaches the budget it ends them, and the next segment starts in single
//! pages. After the end, the segment's writes go in by pwrite (storage.rs,
//! `set_large_folios`), which marks only the blocks it writes dirty, at
//! about 12 us a 4 KiB write into a large folio (ext4 walks the folio's
//! blocks) against 3 for a store: paid only by writes that each come with
//! a sync of about 100 us.
//!
//! Not counted: the kernel's own write-back of a segment written slowly
//! and never synced (every 30 s by default), at most two folios each time.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use super::Segment;

/// The size of the large folio a store faults in (`MADV_HUGEPAGE`: a PMD's
/// worth with 4 KiB pages, as on x86-64).
const LARGE_FOLIO: u64 = 2 << 20;

/// Whole folios a sync may write back: the newest payload's and the newest
/// header slot's.
const FOLIOS_A_SYNC: u64 = 2;

#[derive(Debug)]
pub(super) struct FolioPolicy {
    /// Syncs a segment may take in large folios; 0 where segments are
    /// under eight folios (never large).
    sync_budget: u64,
    /// The segment being written, whose syncs decide for the next.
    active: Mutex<Weak<Segment>>,
}

impl FolioPolicy {
    pub(super) fn new(segment_size: u64) -> Self {
        FolioPolicy {
            sync_budget: segment_size / 4 / (FOLIOS_A_SYNC * LARGE_FOLIO),
            active: Mutex::new(Weak::new()),
        }
    }

    /// `seg` becomes the segment being written (the writer leaves the one
    /// before it).
    pub(super) fn activated(&self, seg: &Arc<Segment>) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let large = self.sync_budget > 0
            && active
                .upgrade()
                .is_none_or(|left| left.syncs.load(Ordering::Acquire) < self.sync_budget);
        *active = Arc::downgrade(seg);
        drop(active);
        seg.file.set_large_folios(large);
    }

    /// `seg` was synced.
    pub(super) fn synced(&self, seg: &Segment) {
        let syncs = seg.syncs.fetch_add(1, Ordering::AcqRel) + 1;
        if syncs == self.sync_budget {
            seg.file.set_large_folios(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::fault::FaultStorage;
    use crate::storage::{Storage, StorageFile};

    /// What the policy asked of a segment's file, over a real one.
    #[derive(Debug)]
    struct Recorder {
        file: Arc<dyn StorageFile>,
        asked: Mutex<Vec<&'static str>>,
    }

    impl StorageFile for Recorder {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.file.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
            self.file.write_all_at(bufs, offset)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
        fn size(&self) -> std::io::Result<u64> {
            self.file.size()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
        fn allocate(&self, len: u64) -> std::io::Result<()> {
            self.file.allocate(len)
        }
        fn set_large_folios(&self, large: bool) {
            let asked = if large { "large" } else { "pages" };
            self.asked.lock().expect("lock").push(asked);
        }
    }

    fn segment(id: u32) -> (Arc<Segment>, Arc<Recorder>) {
        let fs = FaultStorage::new();
        let dir = std::path::Path::new("/v");
        fs.create_dir_all(dir).expect("mkdir");
        let file = fs.create_new(&dir.join("s")).expect("segment file");
        let recorder = Arc::new(Recorder {
            file,
            asked: Mutex::new(Vec::new()),
        });
        (
            Arc::new(Segment::new(id, u64::from(id), recorder.clone())),
            recorder,
        )
    }

    fn asked(r: &Recorder) -> Vec<&'static str> {
        r.asked.lock().expect("lock").clone()
    }

    #[test]
    fn segments_synced_within_the_budget_stay_in_large_folios() {
        let policy = FolioPolicy::new(64 << 20);
        assert_eq!(policy.sync_budget, 4);
        let mut segments = Vec::new();
        for id in 0..3 {
            let (seg, r) = segment(id);
            policy.activated(&seg);
            (0..3).for_each(|_| policy.synced(&seg));
            assert_eq!(asked(&r), ["large"], "segment {id}");
            segments.push(seg);
        }
    }

    #[test]
    fn the_sync_that_reaches_the_budget_ends_large_folios_until_a_segment_is_synced_rarely() {
        let policy = FolioPolicy::new(64 << 20);
        let (busy, r) = segment(0);
        policy.activated(&busy);
        (0..3).for_each(|_| policy.synced(&busy));
        assert_eq!(asked(&r), ["large"]);
        policy.synced(&busy);
        assert_eq!(asked(&r), ["large", "pages"]);
        (0..100).for_each(|_| policy.synced(&busy));
        assert_eq!(asked(&r), ["large", "pages"]);

        // The next segment starts in pages; synced rarely, it lets the one
        // after it start in large folios again.
        let (quiet, r) = segment(1);
        policy.activated(&quiet);
        policy.synced(&quiet);
        assert_eq!(asked(&r), ["pages"]);
        let (next, r) = segment(2);
        policy.activated(&next);
        assert_eq!(asked(&r), ["large"]);
    }

    #[test]
    fn segments_under_eight_large_folios_never_use_them() {
        let policy = FolioPolicy::new(8 << 20);
        assert_eq!(policy.sync_budget, 0);
        let (seg, r) = segment(0);
        policy.activated(&seg);
        assert_eq!(asked(&r), ["pages"]);
    }
}
