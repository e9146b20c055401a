//! Damaged volume files on a real file system: flipped bits, truncated
//! files, garbage, a segment of another volume. Each gives a clean
//! truncation or a clear error, never a panic, never wrong data.

mod common;

use std::path::{Path, PathBuf};

use common::{flip, options, pattern, read, segment_file, small_settings};
use proptest::prelude::*;
use rewind_journal::{BaseImage, Error, OpenOptions, OsStorage, RecoveryReport, Volume};

const RECORD: u64 = 8192;
const SEGMENT: u64 = 64 << 10;

/// Where the payload of the `k`th record (1-based) of a segment lies:
/// payloads grow up from the first page, header slots down from the end.
fn payload(k: u64) -> u64 {
    4096 + (k - 1) * RECORD
}

/// A volume whose journal holds, in order: lsns 1-7 (8 KiB writes) and flush
/// record 8 in segment 0, then unflushed lsns 9-11 in segment 1.
fn volume(tmp: &Path) -> PathBuf {
    let dir = tmp.join("vol");
    let storage = OsStorage::shared();
    Volume::create(
        storage.as_ref(),
        &dir,
        &small_settings(),
        BaseImage::Empty,
        &mut |_, _| {},
    )
    .expect("create");
    let (v, _) = Volume::open(storage, &dir, options()).expect("open");
    for i in 0..7 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    v.flush().expect("flush");
    for i in 7..10 {
        v.write(i * RECORD, &pattern(i as u8, RECORD as usize))
            .expect("write");
    }
    assert_eq!(v.last_lsn(), 11);
    drop(v); // no close: 9-11 stay unflushed
    dir
}

fn open_with(dir: &Path, truncate_damaged: bool) -> Result<(Volume, RecoveryReport), Error> {
    let options = OpenOptions {
        truncate_damaged,
        ..options()
    };
    Volume::open(OsStorage::shared(), dir, options)
}

/// Exactly the records with lsn <= `n` are visible.
fn assert_prefix(v: &Volume, n: u64) {
    for i in 0..10u64 {
        // Records 0-6 have lsns 1-7; lsn 8 is the flush record; 7-9 have 9-11.
        let lsn = if i < 7 { i + 1 } else { i + 2 };
        let want = if lsn <= n {
            pattern(i as u8, RECORD as usize)
        } else {
            vec![0u8; RECORD as usize]
        };
        assert!(
            read(v, i * RECORD, RECORD as usize) == want,
            "record {i} (lsn {lsn}), prefix {n}"
        );
    }
}

#[test]
fn an_intact_journal_recovers_everything() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    let (v, report) = open_with(&dir, false).expect("open");
    assert_eq!((report.next_lsn, report.flush_records), (12, 1));
    assert_eq!(report.discarded, None);
    assert_prefix(&v, 11);
}

#[test]
fn damage_in_the_unflushed_tail_truncates_there_and_reports_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    // Lsn 9 is the first record of segment 1.
    flip(&segment_file(&dir, 1), payload(1) + 100);
    let (v, report) = open_with(&dir, false).expect("a torn tail is not an error");
    assert_eq!(report.next_lsn, 9);
    assert_eq!(report.end.segment.as_deref(), Some("00000001.seg"));
    assert!(
        report.end.reason.starts_with("payload checksum mismatch"),
        "{report}"
    );
    let discarded = report.discarded.expect("lsns 10 and 11 are reported");
    assert_eq!(
        (
            discarded.records,
            discarded.lowest_lsn,
            discarded.highest_lsn
        ),
        (2, 10, 11)
    );
    assert!(
        report.to_string().contains("dropped 2 unflushed records"),
        "{report}"
    );
    assert_prefix(&v, 8);
    // The volume goes on from the truncation point, and stays consistent.
    v.write(9 * RECORD, &pattern(42, RECORD as usize))
        .expect("write");
    v.close().expect("close");
    let (v, report) = open_with(&dir, false).expect("reopen");
    assert_eq!(
        report.next_lsn, 11,
        "lsns 9 (write) and 10 (its flush record)"
    );
    assert_eq!(
        read(&v, 9 * RECORD, RECORD as usize),
        pattern(42, RECORD as usize)
    );
    assert_eq!(
        read(&v, 7 * RECORD, RECORD as usize),
        vec![0u8; RECORD as usize]
    );
}

#[test]
fn damage_to_flushed_data_is_an_error_unless_truncation_is_forced() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    flip(&segment_file(&dir, 0), payload(3) + 7);
    let err = open_with(&dir, false).unwrap_err();
    match &err {
        Error::FlushedDataDamaged {
            lsn,
            proof_lsn,
            covered,
            ..
        } => assert_eq!((*lsn, *proof_lsn, *covered), (3, 8, 7)),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("truncate_damaged"), "{err}");
    let (v, report) = open_with(&dir, true).expect("forced");
    assert_eq!(report.next_lsn, 3);
    assert_prefix(&v, 2);
}

#[test]
fn a_truncated_segment_file_is_an_error_unless_forced() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_file(&dir, 0))
        .expect("open");
    // Cuts off every header slot (they lie at the top) and records 5-7.
    f.set_len(payload(5) + 100).expect("truncate");
    let err = open_with(&dir, false).unwrap_err();
    assert!(matches!(err, Error::DamagedSegment { .. }), "{err}");
    assert!(err.to_string().contains("bytes, segments have"), "{err}");
    let (v, report) = open_with(&dir, true).expect("forced");
    assert_eq!(report.next_lsn, 1);
    assert_eq!(report.end.reason, "file ends before the segment does");
    assert_prefix(&v, 0);
}

#[test]
fn a_segment_overwritten_with_garbage_is_an_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(segment_file(&dir, 0), &garbage).expect("garbage");
    let err = open_with(&dir, false).unwrap_err();
    assert!(err.to_string().contains("header is damaged"), "{err}");
}

#[test]
fn a_segment_of_another_volume_is_refused_even_when_forced() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    let other = volume(&tmp.path().join("other"));
    std::fs::copy(segment_file(&other, 0), segment_file(&dir, 0)).expect("copy");
    for forced in [false, true] {
        let err = open_with(&dir, forced).unwrap_err();
        assert!(matches!(err, Error::ForeignSegment { .. }), "{err}");
        assert!(err.to_string().contains("belongs to volume"), "{err}");
    }
}

#[test]
fn damaged_metadata_files_are_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    // One damaged copy of super is survivable (and opening rewrites it).
    flip(&dir.join("super"), 20);
    drop(open_with(&dir, false).expect("the other copy of super"));
    // Both are not.
    flip(&dir.join("super"), 20);
    flip(&dir.join("super"), (128 << 10) + 20);
    let err = open_with(&dir, false).unwrap_err();
    assert!(err.to_string().contains("neither copy"), "{err}");

    let dir = volume(&tmp.path().join("b"));
    std::fs::write(dir.join("volume.json"), b"{ not json").expect("write");
    let err = open_with(&dir, false).unwrap_err();
    assert!(matches!(err, Error::BadMetadata { .. }), "{err}");

    let dir = volume(&tmp.path().join("c"));
    let json = std::fs::read_to_string(dir.join("volume.json")).expect("read");
    let current = format!("\"format_version\": {}", rewind_journal::FORMAT_VERSION);
    let json = json.replace(&current, "\"format_version\": 7");
    std::fs::write(dir.join("volume.json"), json).expect("write");
    let err = open_with(&dir, false).unwrap_err();
    assert!(err.to_string().contains("format version 7"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random damage anywhere in the journal: open either fails with an
    /// error or yields exactly a prefix of the history.
    #[test]
    fn random_damage_never_panics_or_shows_wrong_data(
        flips in prop::collection::vec((0u32..2, 0u64..SEGMENT), 1..6),
        forced in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = volume(tmp.path());
        for (id, at) in flips {
            flip(&segment_file(&dir, id), at);
        }
        match open_with(&dir, forced) {
            Ok((v, report)) => assert_prefix(&v, report.next_lsn - 1),
            // Damage is named as damage, never an IO error or anything else.
            Err(e) => prop_assert!(
                matches!(
                    e,
                    Error::FlushedDataDamaged { .. }
                        | Error::DamagedSegment { .. }
                        | Error::BadMetadata { .. }
                        | Error::UnsupportedVersion { .. }
                ),
                "{e}"
            ),
        }
    }
}
