//! Which segments cache their stored pages in large folios.
//!
//! Records go into the segment being written as stores into its mapping
//! (storage.rs, `write_mapped_at`), each new page a page fault. In large
//! folios (2 MiB) one fault and one piece of write-back serve 512 pages:
//! warm 4 KiB writes cost about a fifth less CPU each (BENCHMARKS.md,
//! "Stores into large folios"). But the kernel marks a whole folio dirty at
//! its first store, so each sync of the segment writes back all of the
//! folio the newest record lies in, however little of it is new: a guest
//! that flushes after every 4 KiB write would have each flush write 2 MiB.
//!
//! So large folios are kept for segments synced rarely. Invariant: a
//! segment's syncs while its stores make large folios rewrite at most a
//! quarter of the segment's size (`sync_budget` syncs of a whole folio).
//! A segment starts in large folios when the one written before it stayed
//! within the budget (the first one does: nothing says otherwise yet); at
//! the sync past the budget it ends them (later stores go in by pwrite,
//! which marks only what it writes dirty), and the next segment starts in
//! single pages.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use super::Segment;

/// The size of the large folio a store faults in (`MADV_HUGEPAGE`: a PMD's
/// worth on x86-64).
const LARGE_FOLIO: u64 = 2 << 20;

#[derive(Debug)]
pub(super) struct FolioPolicy {
    /// Syncs a segment may take while in large folios; 0 where segments
    /// are under four folios (never large).
    sync_budget: u64,
    /// The segment being written, whose syncs decide for the next.
    active: Mutex<Weak<Segment>>,
}

impl FolioPolicy {
    pub(super) fn new(segment_size: u64) -> Self {
        FolioPolicy {
            sync_budget: segment_size / LARGE_FOLIO / 4,
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
                .is_none_or(|left| left.syncs.load(Ordering::Acquire) <= self.sync_budget);
        *active = Arc::downgrade(seg);
        drop(active);
        seg.file.set_large_folios(large);
    }

    /// `seg` was synced.
    pub(super) fn synced(&self, seg: &Segment) {
        let syncs = seg.syncs.fetch_add(1, Ordering::AcqRel) + 1;
        if syncs == self.sync_budget + 1 {
            seg.file.end_large_folios();
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
        fn end_large_folios(&self) {
            self.asked.lock().expect("lock").push("end");
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
        assert_eq!(policy.sync_budget, 8);
        let mut segments = Vec::new();
        for id in 0..3 {
            let (seg, r) = segment(id);
            policy.activated(&seg);
            (0..8).for_each(|_| policy.synced(&seg));
            assert_eq!(asked(&r), ["large"], "segment {id}");
            segments.push(seg);
        }
    }

    #[test]
    fn a_sync_past_the_budget_ends_large_folios_until_a_segment_is_synced_rarely() {
        let policy = FolioPolicy::new(64 << 20);
        let (busy, r) = segment(0);
        policy.activated(&busy);
        (0..8).for_each(|_| policy.synced(&busy));
        assert_eq!(asked(&r), ["large"]);
        policy.synced(&busy);
        assert_eq!(asked(&r), ["large", "end"]);
        (0..100).for_each(|_| policy.synced(&busy));
        assert_eq!(asked(&r), ["large", "end"]);

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
    fn segments_under_four_large_folios_never_use_them() {
        let policy = FolioPolicy::new(4 << 20);
        assert_eq!(policy.sync_budget, 0);
        let (seg, r) = segment(0);
        policy.activated(&seg);
        assert_eq!(asked(&r), ["pages"]);
    }
}
