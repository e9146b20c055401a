//! Inline segments (FORMAT.md, "Inline segments") on a real file system:
//! records written with O_DIRECT, header and payload in one request, and
//! the proof of a flush carried by the next record instead of a Flush
//! record. Which segments the writer makes inline, what recovery takes
//! back, and that damage to flushed data is still caught.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{create_with, flip, options, pattern, read, segment_file, small_settings};
use rewind_journal::{
    Error, LayoutChoice, OpenOptions, OsStorage, PayloadBuffer, RecoveryReport, Storage, Volume,
    VolumeSettings,
};

const RECORD: u64 = 8192;
/// A record's header sector and payload, back to back.
const INLINE_RECORD: u64 = 512 + RECORD;

fn create(tmp: &Path) -> PathBuf {
    create_with(tmp, &small_settings())
}

fn open(dir: &Path, layout: LayoutChoice) -> Result<(Volume, RecoveryReport), Error> {
    let options = OpenOptions {
        layout,
        ..options()
    };
    Volume::open(OsStorage::shared(), dir, options)
}

/// The version in a segment file's header: 2 for slots, 3 for inline.
fn version(dir: &Path, id: u32) -> u16 {
    let f = std::fs::File::open(segment_file(dir, id)).expect("open segment");
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, 8).expect("read header");
    u16::from_le_bytes(b)
}

/// Lsns 1-7 (8 KiB writes) fill inline segment 0 (seven records of
/// 8.5 KiB fit 64 KiB); a flush makes them durable without a record of
/// its own; lsns 8-10 go to segment 1 and are not flushed.
fn journal(tmp: &Path) -> PathBuf {
    let dir = create(tmp);
    let (v, _) = open(&dir, LayoutChoice::Inline).expect("open");
    for i in 0..7 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    v.flush().expect("flush");
    for i in 7..10 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    assert_eq!(v.last_lsn(), 10, "no Flush record in an inline segment");
    drop(v); // no close: 8-10 stay unflushed
    dir
}

fn assert_prefix(v: &Volume, n: u64) {
    for i in 0..10u64 {
        let want = if i < n {
            pattern(i as u8, RECORD as usize)
        } else {
            vec![0u8; RECORD as usize]
        };
        assert!(
            read(v, i * RECORD, RECORD as usize) == want,
            "record {i}, prefix {n}"
        );
    }
}

#[test]
fn inline_records_come_back_after_a_crash_of_the_process() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = journal(tmp.path());
    assert_eq!((version(&dir, 0), version(&dir, 1)), (3, 3));
    let (v, report) = open(&dir, LayoutChoice::Inline).expect("reopen");
    assert_eq!((report.next_lsn, report.flush_records), (11, 0));
    assert_eq!(report.discarded, None);
    assert_prefix(&v, 10);
    // Payloads sit right after their headers: lsn 3's at 512 + 2 records + 512.
    let f = std::fs::File::open(segment_file(&dir, 0)).expect("segment");
    let mut b = vec![0u8; RECORD as usize];
    f.read_exact_at(&mut b, 512 + 2 * INLINE_RECORD + 512)
        .expect("read");
    assert!(b == pattern(2, RECORD as usize));
}

#[test]
fn a_later_record_proves_damaged_data_was_flushed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = journal(tmp.path());
    // Lsn 3's payload, which the flush covered (lsns 8-10 say so).
    flip(&segment_file(&dir, 0), 512 + 2 * INLINE_RECORD + 512 + 7);
    let err = open(&dir, LayoutChoice::Inline).unwrap_err();
    match &err {
        Error::FlushedDataDamaged {
            lsn,
            proof_lsn,
            covered,
            ..
        } => {
            assert_eq!((*lsn, *covered), (3, 7));
            assert!((8..=10).contains(proof_lsn), "proof from lsn {proof_lsn}");
        }
        other => panic!("{other}"),
    }
    let options = OpenOptions {
        truncate_damaged: true,
        ..options()
    };
    let (v, report) = Volume::open(OsStorage::shared(), &dir, options).expect("forced");
    assert_eq!(report.next_lsn, 3);
    assert_prefix(&v, 2);
}

#[test]
fn damage_in_the_unflushed_tail_truncates_there() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = journal(tmp.path());
    // Lsn 9's payload: the second record of segment 1, never flushed.
    flip(&segment_file(&dir, 1), 512 + INLINE_RECORD + 512 + 100);
    let (v, report) = open(&dir, LayoutChoice::Inline).expect("a torn tail is not an error");
    assert_eq!(report.next_lsn, 9);
    let discarded = report.discarded.expect("lsn 10 is reported");
    assert_eq!((discarded.lowest_lsn, discarded.highest_lsn), (10, 10));
    assert_prefix(&v, 8);
    // Appends go on in a fresh segment, and survive a reopen.
    v.write(8 * RECORD, &pattern(42, RECORD as usize))
        .expect("write");
    v.close().expect("close");
    let (v, _) = open(&dir, LayoutChoice::Inline).expect("reopen");
    assert_eq!(
        read(&v, 8 * RECORD, RECORD as usize),
        pattern(42, RECORD as usize)
    );
}

#[test]
fn the_writer_moves_to_inline_segments_once_each_write_is_made_durable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path());
    let (v, _) = open(&dir, LayoutChoice::Auto).expect("open");
    let block = |i: u64| (i % 256) * 4096;
    // Buffered writes, one flush: slots.
    for i in 0..300 {
        v.write(block(i), &pattern(i as u8, 4096)).expect("write");
    }
    v.flush().expect("flush");
    // A flush after every write (what a guest's FUA writes come as): two
    // windows of 256 later the writer leaves its segment for an inline one.
    for i in 300..1000 {
        v.write(block(i), &pattern(i as u8, 4096)).expect("write");
        v.flush().expect("flush");
    }
    let last = v.last_lsn();
    v.close().expect("close");
    let versions: Vec<u16> = (0..3).map(|id| version(&dir, id)).collect();
    assert_eq!(versions[0], 2, "buffered writes: {versions:?}");
    let segments = std::fs::read_dir(dir.join("journal")).expect("ls").count() as u32;
    let inline = (0..segments).filter(|&id| version(&dir, id) == 3).count();
    assert!(inline >= 3, "{inline} of {segments} segments inline");
    let (v, report) = open(&dir, LayoutChoice::Auto).expect("reopen");
    // Close may have added a Flush record proving the last flush.
    assert!(
        (last + 1..=last + 2).contains(&report.next_lsn),
        "{report}, last lsn written {last}"
    );
    for i in 744..1000 {
        assert!(
            read(&v, block(i), 4096) == pattern(i as u8, 4096),
            "block {i}"
        );
    }
}

#[test]
fn a_writethrough_volume_writes_inline_from_its_first_segment() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path());
    let (v, _) = open(&dir, LayoutChoice::Auto).expect("open");
    v.set_writethrough(true);
    v.write(0, &pattern(1, RECORD as usize)).expect("write");
    assert_eq!(version(&dir, 0), 3);
    drop(v);
    let (v, report) = open(&dir, LayoutChoice::Auto).expect("reopen");
    assert_eq!(report.next_lsn, 2);
    assert!(read(&v, 0, RECORD as usize) == pattern(1, RECORD as usize));
}

#[test]
fn a_header_torn_on_its_way_to_inline_ends_the_log_where_nothing_was_flushed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = journal(tmp.path());
    // Segment 1 (lsns 8-10, never flushed): its header's nonce half
    // written, as a power loss in the rewrite would leave it.
    flip(&segment_file(&dir, 1), 50);
    let (v, report) = open(&dir, LayoutChoice::Inline).expect("not an error");
    assert_eq!(report.next_lsn, 8);
    assert!(report.end.reason.contains("torn"), "{report}");
    assert_prefix(&v, 7);
}

#[test]
fn a_torn_header_over_flushed_records_is_caught_by_the_records_after_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = journal(tmp.path());
    // Segment 0 holds the flushed lsns 1-7; lsns 8-10 say so.
    flip(&segment_file(&dir, 0), 50);
    match open(&dir, LayoutChoice::Inline).unwrap_err() {
        Error::FlushedDataDamaged { lsn, covered, .. } => assert_eq!((lsn, covered), (1, 7)),
        other => panic!("{other}"),
    }
}

/// Whether segment 0 of the volume in `dir` has no hole or unwritten
/// extent left (in a segment of `size` bytes).
fn fully_written(dir: &Path, size: u64) -> bool {
    let f = OsStorage.open(&segment_file(dir, 0)).expect("segment");
    f.fully_written(0, size).expect("FIEMAP")
}

#[test]
fn an_inline_segment_of_a_new_file_is_zeroed_ahead_of_its_records() {
    // A durable write into an unwritten extent makes the sync commit the
    // file system's journal; a zeroed chunk ahead spares that. (1 MiB
    // segments: ext4 zeroes small unwritten extents itself.)
    let size = 1 << 20;
    let settings = VolumeSettings {
        segment_size: size,
        ..small_settings()
    };
    for (layout, written) in [(LayoutChoice::Slots, false), (LayoutChoice::Inline, true)] {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = create_with(tmp.path(), &settings);
        let (v, _) = open(&dir, layout).expect("open");
        v.write(0, &pattern(1, 4096)).expect("write");
        v.flush().expect("flush");
        assert_eq!(fully_written(&dir, size), written, "{layout:?}");
    }
}

#[test]
fn a_close_proves_the_last_flush_of_an_inline_segment() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path());
    let (v, _) = open(&dir, LayoutChoice::Inline).expect("open");
    for i in 0..3 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    v.flush().expect("flush");
    // No record follows to carry the proof: close writes a Flush record.
    v.close().expect("close");
    flip(&segment_file(&dir, 0), 512 + INLINE_RECORD + 512 + 7);
    match open(&dir, LayoutChoice::Inline).unwrap_err() {
        Error::FlushedDataDamaged {
            lsn,
            proof_lsn,
            covered,
            ..
        } => assert_eq!((lsn, proof_lsn, covered), (2, 4, 3)),
        other => panic!("{other}"),
    }
}

#[test]
fn a_checkpoint_over_inline_segments_spares_their_recovery() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path());
    let options = OpenOptions {
        layout: LayoutChoice::Inline,
        checkpoint_every: Some(64 << 10),
        ..options()
    };
    let (v, _) = Volume::open(OsStorage::shared(), &dir, options.clone()).expect("open");
    // Ten 64 KiB segments of 8 KiB records, then a checkpoint.
    for i in 0..70 {
        v.write((i % 100) * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    v.flush().expect("flush");
    let covered = v.checkpoint().expect("checkpoint").expect("taken");
    drop(v);
    let (v, report) = Volume::open(OsStorage::shared(), &dir, options).expect("reopen");
    assert_eq!(report.records_from_checkpoint, covered, "{report}");
    for i in 0..70 {
        assert!(read(&v, i * RECORD, RECORD as usize) == pattern(i as u8, RECORD as usize));
    }
}

/// The segment files of the volume in `dir` with inline records.
fn inline_segments(dir: &Path) -> Vec<u32> {
    let files = std::fs::read_dir(dir.join("journal")).expect("ls").count() as u32;
    (0..files)
        .filter(|&id| segment_file(dir, id).exists() && version(dir, id) == 3)
        .collect()
}

#[test]
fn large_writes_far_from_the_limit_go_straight_to_the_device_and_come_back() {
    const BLOCK: u64 = 64 << 10;
    let (size, segment) = (64 << 20, 1 << 20);
    let settings = VolumeSettings {
        size,
        segment_size: segment,
        journal_max: 512 << 20,
        journal_warn: 400 << 20,
        ..small_settings()
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create_with(tmp.path(), &settings);
    let (v, _) = open(&dir, LayoutChoice::Auto).expect("open");
    let blocks = size / BLOCK;
    let write = |v: &Volume, i: u64| {
        v.write((i % blocks) * BLOCK, &pattern(i as u8, BLOCK as usize))
            .expect("write")
    };
    // A window of 256 large records in slots, then bulk segments.
    let mut i = 0;
    while !v.bulk_writes() {
        assert!(i < 256 + 16, "still not bulk after {i} writes");
        write(&v, i);
        i += 1;
    }
    assert!(i > 256, "bulk after {i} writes");
    let inline = inline_segments(&dir);
    let [first_bulk] = inline[..] else {
        panic!("inline segments {inline:?}")
    };
    let f = OsStorage
        .open(&segment_file(&dir, first_bulk))
        .expect("open");
    assert!(
        !f.fully_written(0, segment).expect("FIEMAP"),
        "a bulk segment is not zeroed ahead of its records"
    );
    // The daemon's IO threads write side by side: four threads here.
    let next = i;
    std::thread::scope(|s| {
        for t in 0..4 {
            let v = &v;
            s.spawn(move || {
                for i in (next..next + 4 * 128).filter(|i| i % 4 == t) {
                    write(v, i);
                }
            });
        }
    });
    v.flush().expect("flush");
    // Not flushed: a crash of the process loses none of it either.
    let end = next + 4 * 128 + 8;
    for i in next + 4 * 128..end {
        write(&v, i);
    }
    drop(v);
    let (v, report) = open(&dir, LayoutChoice::Auto).expect("reopen");
    assert_eq!(report.discarded, None, "{report}");
    assert_eq!(report.next_lsn, end + 1, "{report}");
    for i in end.saturating_sub(blocks)..end {
        let at = (i % blocks) * BLOCK;
        assert!(
            read(&v, at, BLOCK as usize) == pattern(i as u8, BLOCK as usize),
            "block {} (write {i})",
            i % blocks
        );
    }
    // A reopened writer learns the workload again; past a quarter of the
    // journal's limit it goes back to the page cache, from which the fold
    // reads recent records (a journal this much smaller than the memory
    // keeps them there until they are folded).
    let (mut i, mut bulk_again) = (end, false);
    let past_a_quarter = settings.journal_max / 4 + 3 * (32 << 20);
    while v.stats().journal_bytes <= past_a_quarter {
        write(&v, i);
        bulk_again |= v.bulk_writes();
        i += 1;
    }
    assert!(bulk_again);
    assert!(!v.bulk_writes(), "{:?}", v.stats());
}

#[test]
fn writes_from_a_payload_buffer_come_back_after_a_crash_in_every_layout() {
    // Sizes: right after its header, on the next page (64 KiB of whole
    // pages), and more than a record holds (two records, from the slice).
    const WRITES: [(u64, u64); 4] = [(0, 4096), (8192, 8192), (65536, 65536), (1 << 20, 1 << 20)];
    let settings = VolumeSettings {
        size: 4 << 20,
        segment_size: 1 << 20,
        journal_max: 64 << 20,
        journal_warn: 48 << 20,
        ..small_settings()
    };
    for layout in [LayoutChoice::Slots, LayoutChoice::Inline] {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = create_with(tmp.path(), &settings);
        let (v, _) = open(&dir, layout).expect("open");
        let before = v.last_lsn();
        let mut buf = PayloadBuffer::new();
        for (i, &(at, len)) in WRITES.iter().enumerate() {
            buf.payload_mut(len as usize)
                .copy_from_slice(&pattern(i as u8 + 1, len as usize));
            v.write_buffer_deferred(at, &mut buf).expect("write");
        }
        let records = v.last_lsn();
        assert!(
            records - before > WRITES.len() as u64,
            "{layout:?}: {records} records"
        );
        drop(v); // a crash of the process: nothing flushed
        let (v, report) = open(&dir, layout).expect("reopen");
        assert_eq!(report.discarded, None, "{layout:?}: {report}");
        assert_eq!(report.next_lsn, records + 1, "{layout:?}: {report}");
        for (i, &(at, len)) in WRITES.iter().enumerate() {
            let want = pattern(i as u8 + 1, len as usize);
            assert!(read(&v, at, len as usize) == want, "{layout:?}: write {i}");
        }
        if layout == LayoutChoice::Inline {
            assert_eq!(inline_segments(&dir), [0, 1]);
        }
    }
}

/// An inline segment whose lsns 1-3 were flushed (lsns 4-5 carry the
/// proof in their stamps), its header's version damaged by one bit (3
/// reads 2): open refuses; it must not end the log before lsn 1 and lose
/// the flushed records (a change that took such a header for one torn
/// while `open` re-headed a free segment did, and was reverted).
#[test]
fn an_inline_header_whose_version_reads_slots_does_not_hide_flushed_records() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path());
    let (v, _) = open(&dir, LayoutChoice::Inline).expect("open");
    for i in 0..3 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    v.flush().expect("flush");
    for i in 3..5 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    drop(v); // a crash: 4-5 unflushed, 1-3 flushed
    assert_eq!(version(&dir, 0), 3);
    // Control: the same segment with its nonce damaged is caught.
    let control = tempfile::tempdir().expect("tmp");
    let copy = control.path().join("vol");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    flip(&segment_file(&copy, 0), 50);
    assert!(
        matches!(
            open(&copy, LayoutChoice::Inline),
            Err(Error::FlushedDataDamaged { lsn: 1, .. })
        ),
        "control: nonce damage is caught"
    );
    // Bit 0 of the version byte: 3 (inline) reads 2 (slots).
    common::xor_byte(&segment_file(&dir, 0), 8, 0x01);
    match open(&dir, LayoutChoice::Inline) {
        Err(Error::FlushedDataDamaged { .. }) | Err(Error::DamagedSegment { .. }) => {}
        Err(other) => panic!("{other}"),
        Ok((v, report)) => panic!(
            "opened with next_lsn {} ({}): flushed lsns 1-3 lost, record 1 still reads back: {}",
            report.next_lsn,
            report.end.reason,
            read(&v, 0, RECORD as usize) == pattern(0, RECORD as usize)
        ),
    }
}

/// An inline segment whose lsns 1-3 were flushed, then a crash; its
/// header's sequence number damaged by one bit: open refuses, it does not
/// end the log before the flushed records.
#[test]
fn an_inline_header_with_a_garbled_sequence_number_over_flushed_records_is_damage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = create(tmp.path());
    let (v, _) = open(&dir, LayoutChoice::Inline).expect("open");
    for i in 0..3 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    v.flush().expect("flush");
    drop(v);
    assert_eq!(version(&dir, 0), 3);
    common::xor_byte(&segment_file(&dir, 0), 33, 0x04);
    match open(&dir, LayoutChoice::Inline) {
        Err(Error::FlushedDataDamaged { .. }) | Err(Error::DamagedSegment { .. }) => {}
        Err(other) => panic!("{other}"),
        Ok((_, report)) => panic!(
            "opened with next_lsn {} ({}): flushed lsns 1-3 lost",
            report.next_lsn, report.end.reason
        ),
    }
}
