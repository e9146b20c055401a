//! Damaged volume files on a real file system: flipped bits, truncated
//! files, garbage, a segment of another volume. Each gives a clean
//! truncation or a clear error, never a panic, never wrong data.

mod common;

use std::path::{Path, PathBuf};

use common::{flip, options, pattern, read, segment_file, small_settings, xor_byte};
use proptest::prelude::*;
use rewind_journal::{BaseImage, Error, OpenOptions, OsStorage, RecoveryReport, Volume};
use uuid::Uuid;

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
    // Named where lsn 3 broke (its header slot in segment 0), not where
    // the scan gave up (segment 1 does not begin with lsn 3).
    let place = format!(
        "00000000.seg, offset {}: payload checksum",
        SEGMENT - 3 * 512
    );
    assert!(err.to_string().contains(&place), "{err}");
    assert!(err.to_string().contains("truncate_damaged"), "{err}");
    let (v, report) = open_with(&dir, true).expect("forced");
    assert_eq!(report.next_lsn, 3);
    assert_prefix(&v, 2);
}

/// Rewrites the header of segment 0's `k`th record (1-based) with `edit`
/// applied and a valid checksum.
fn rewrite_header(dir: &Path, k: u64, edit: impl Fn(&mut [u8])) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_file(dir, 0))
        .expect("open");
    let at = SEGMENT - 512 * k;
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, at).expect("read");
    edit(&mut b);
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &b[..72]) as u32;
    b[72..76].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&b, at).expect("write");
}

/// A header of an unknown version or kind that claims to be a record of
/// the segment's use is refused, naming the versions this build reads;
/// one of another use (sequence number) is not a record of this one.
#[test]
fn an_unknown_version_or_kind_is_an_error_only_in_a_record_of_the_use() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    rewrite_header(&dir, 3, |b| b[4..6].copy_from_slice(&9u16.to_le_bytes()));
    let err = open_with(&dir, true).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedVersion { found: 9, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("reads version 2, 3 or 4"), "{err}");

    let dir = volume(&tmp.path().join("b"));
    rewrite_header(&dir, 3, |b| b[6] = 9);
    let err = open_with(&dir, true).unwrap_err();
    assert!(err.to_string().contains("kind 9, unknown"), "{err}");

    // The same, with another sequence number: the log ends before lsn 3.
    for (i, edit) in [|b: &mut [u8]| b[4] = 9, |b: &mut [u8]| b[6] = 9]
        .into_iter()
        .enumerate()
    {
        let dir = volume(&tmp.path().join(format!("c{i}")));
        rewrite_header(&dir, 3, |b| {
            edit(b);
            b[8] ^= 0x40;
        });
        match open_with(&dir, false).unwrap_err() {
            Error::FlushedDataDamaged { lsn: 3, .. } => {}
            other => panic!("{other}"),
        }
        let (_, report) = open_with(&dir, true).expect("forced");
        assert_eq!(report.next_lsn, 3, "{report}");
        assert!(report.end.reason.contains("earlier use"), "{report}");
    }
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

const SUPER_SLOT: usize = 128 << 10;

/// The generation in copy `slot` of a `super` file's bytes.
fn generation(sb: &[u8], slot: usize) -> u64 {
    let at = slot * SUPER_SLOT + 16;
    u64::from_le_bytes(sb[at..at + 8].try_into().expect("8 bytes"))
}

/// A volume of two sessions of three writes each whose `super` has its
/// newest copy in slot 1, and in slot 0 an older one that does not know
/// the segment use of the second session's writes: what the older copy
/// of `super` is when the newer one listed a segment the writer then
/// filled. The older copy is the one `create` wrote, which lists no
/// segment (`from_create`), or the one the first session closed with,
/// which lists the segment the second session wrote for another use.
fn volume_with_an_older_super(tmp: &Path, from_create: bool) -> PathBuf {
    let dir = tmp.join("vol");
    Volume::create(
        OsStorage::shared().as_ref(),
        &dir,
        &small_settings(),
        BaseImage::Empty,
        &mut |_, _| {},
    )
    .expect("create");
    let mut supers = vec![std::fs::read(dir.join("super")).expect("super")];
    for session in 0..2u8 {
        let (v, _) = open_with(&dir, false).expect("open");
        for i in 0..3 {
            v.write(
                i * RECORD,
                &pattern(10 * session + i as u8, RECORD as usize),
            )
            .expect("write");
        }
        v.close().expect("close");
        supers.push(std::fs::read(dir.join("super")).expect("super"));
    }
    let newest = |b: &[u8]| {
        let slot = usize::from(generation(b, 1) > generation(b, 0));
        b[slot * SUPER_SLOT..(slot + 1) * SUPER_SLOT].to_vec()
    };
    let old = &supers[if from_create { 0 } else { 1 }];
    std::fs::write(
        dir.join("super"),
        [newest(old), newest(&supers[2])].concat(),
    )
    .expect("write super");
    dir
}

/// The error an open of `dir` fails with.
fn refused(dir: &Path, truncate_damaged: bool) -> Error {
    match open_with(dir, truncate_damaged) {
        Ok((_, report)) => panic!("opened: {report}"),
        Err(e) => e,
    }
}

fn journal_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("journal")).expect("ls").count()
}

#[test]
fn a_lost_newer_super_that_listed_segments_with_records_is_refused_and_nothing_removed() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Intact, the newer copy is used.
    let dir = volume_with_an_older_super(&tmp.path().join("intact"), false);
    let (v, report) = open_with(&dir, false).expect("open");
    assert!(report.next_lsn > 8, "{report}");
    assert!(read(&v, 0, RECORD as usize) == pattern(10, RECORD as usize));
    drop(v);
    // Its checksum fails, or the file is cut short of it.
    for truncated in [false, true] {
        for from_create in [true, false] {
            let what = &format!("truncated: {truncated}, older copy from create: {from_create}");
            let dir = volume_with_an_older_super(&tmp.path().join(what), from_create);
            let path = dir.join("super");
            if truncated {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open super");
                f.set_len(SUPER_SLOT as u64 + 100).expect("truncate");
            } else {
                flip(&path, SUPER_SLOT as u64 + 20);
            }
            let files = journal_files(&dir);
            let err = refused(&dir, true);
            match &err {
                Error::BadMetadata { path, reason } => {
                    assert!(path.ends_with("super"), "{what}: {err}");
                    // Found in a file it does not list, or lists for
                    // another use.
                    let how = match from_create {
                        true => "does not list",
                        false => "for segment use",
                    };
                    assert!(reason.contains(how), "{what}: {err}");
                    assert!(reason.contains("holds records"), "{what}: {err}");
                }
                other => panic!("{what}: {other}"),
            }
            assert_eq!(journal_files(&dir), files, "{what}: a file was removed");
        }
    }
}

/// A checkpoint header of `volume` (with the trailer of an empty file)
/// holding `count` records after `base_lsn` up to `lsn`, `len` bytes long.
fn checkpoint_header(volume: Uuid, lsn: u64, base_lsn: u64, count: u64, len: u64) -> Vec<u8> {
    let crc = |b: &[u8]| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32;
    let mut b = vec![0u8; 128];
    b[0..8].copy_from_slice(b"RWNDCKP\0");
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    b[16..32].copy_from_slice(volume.as_bytes());
    b[32..40].copy_from_slice(&lsn.to_le_bytes());
    b[40..48].copy_from_slice(&base_lsn.to_le_bytes());
    b[64..72].copy_from_slice(&count.to_le_bytes());
    b[72..80].copy_from_slice(&len.to_le_bytes());
    let header = crc(&b[..124]);
    b[124..128].copy_from_slice(&header.to_le_bytes());
    let file = crc(&b);
    b.extend_from_slice(&file.to_le_bytes());
    b
}

fn uuid_of(dir: &Path) -> Uuid {
    let (v, _) = open_with(dir, false).expect("open");
    let uuid = v.config().uuid;
    drop(v);
    uuid
}

#[test]
fn a_checkpoint_at_the_last_lsn_is_rejected_without_a_panic() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    let uuid = uuid_of(&dir);
    // Valid checksums, no records, nothing after its lsn.
    std::fs::write(
        dir.join("checkpoint"),
        checkpoint_header(uuid, u64::MAX, u64::MAX, 0, 132),
    )
    .expect("write");
    let (v, report) = open_with(&dir, false).expect("a full recovery");
    assert_eq!(report.records_from_checkpoint, 0, "{report}");
    assert_prefix(&v, 11);
}

#[test]
fn a_huge_checkpoint_file_is_rejected_by_its_header_not_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    let uuid = uuid_of(&dir);
    let path = dir.join("checkpoint");
    std::fs::write(&path, checkpoint_header(uuid, 0, 0, 0, 132)).expect("write");
    // Sparse: reading it whole would ask for 4 TiB of memory.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(4 << 40).expect("grow");
    let (v, report) = open_with(&dir, false).expect("a full recovery");
    assert_eq!(report.records_from_checkpoint, 0, "{report}");
    assert_prefix(&v, 11);
}

/// Pads the file at `path` with spaces to `len` bytes: a JSON file stays
/// valid.
fn pad(path: &Path, len: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes.resize(len, b' ');
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn an_oversized_volume_json_is_refused_unread() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    pad(&dir.join("volume.json"), 2 << 20);
    let err = refused(&dir, false);
    match &err {
        Error::BadMetadata { path, reason } => {
            assert!(path.ends_with("volume.json"), "{err}");
            assert!(reason.contains("bytes"), "{err}");
        }
        other => panic!("{other}"),
    }
}

/// The files `open` reads whole are as large as the volume's state
/// makes them; a larger one is damage (a huge one would take the memory
/// of its size), refused before it is read, with its name.
#[test]
fn oversized_resync_cut_and_out_of_sync_files_are_refused_unread() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cases: [(&str, &[u8], usize); 3] = [
        (
            "resync",
            br#"{"sync_lsn": 11, "sync_ns": 1, "next_offset": 0,
                "epoch_history": [{"epoch": 1, "first_lsn": 1, "node": 0}]}"#,
            2 << 20,
        ),
        (
            "cut",
            br#"{"name": "tail", "common_lsn": 5, "last_lsn": 11}"#,
            64 << 10,
        ),
        // The map of this 1 MiB disk is 38 bytes.
        ("out-of-sync", b"RWNDOOS\0", 2 << 20),
    ];
    for (file, content, len) in cases {
        let dir = volume(&tmp.path().join(file));
        std::fs::write(dir.join(file), content).expect("write");
        pad(&dir.join(file), len);
        let err = refused(&dir, false);
        match &err {
            Error::BadMetadata { path, reason } => {
                assert!(path.ends_with(file), "{file}: {err}");
                assert!(
                    reason.starts_with(&format!("it is {len} bytes;"))
                        && reason.contains("at most"),
                    "{file}: {err}"
                );
            }
            other => panic!("{file}: {other}"),
        }
    }
}

/// A branch's description too; its damage leaves the branch unreadable,
/// not the volume.
#[test]
fn an_oversized_branch_description_is_refused_unread() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    let (v, _) = open_with(&dir, false).expect("open");
    v.cut_to_branch(5, "tail").expect("cut").expect("a branch");
    v.close().expect("close");
    pad(&dir.join("branches").join("tail.json"), 2 << 20);
    let (v, _) = open_with(&dir, false).expect("open with a damaged branch");
    let branches = v.branches();
    assert_eq!(branches.len(), 1, "{branches:?}");
    let problem = branches[0].problem.as_deref().unwrap_or_default();
    assert!(
        !branches[0].readable
            && problem.contains("tail.json")
            && problem.contains(&format!("it is {} bytes;", 2 << 20)),
        "{branches:?}"
    );
}

#[test]
fn a_disk_size_base_img_does_not_have_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Larger (the extent map would be sized by it) and smaller (records
    // past it would pass for damage in their segment).
    for (what, size) in [("larger", 1u64 << 50), ("smaller", 8192)] {
        let dir = volume(&tmp.path().join(what));
        let json = std::fs::read_to_string(dir.join("volume.json")).expect("read");
        let json = json.replace("\"size\": 1048576", &format!("\"size\": {size}"));
        std::fs::write(dir.join("volume.json"), json).expect("write");
        let err = refused(&dir, true);
        match &err {
            Error::BadMetadata { path, reason } => {
                assert!(path.ends_with("volume.json"), "{what}: {err}");
                assert!(reason.contains("base.img has 1048576"), "{what}: {err}");
            }
            other => panic!("{what}: {other}"),
        }
    }
}

#[test]
fn a_slots_header_whose_version_reads_inline_is_damage_not_a_tear() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = volume(tmp.path());
    // Bit 0 of the version: 2 (slots) reads 3 (inline), the checksum
    // fails, and the rest is what a tear of the rewrite to inline leaves.
    xor_byte(&segment_file(&dir, 0), 8, 0x01);
    let err = refused(&dir, false);
    match &err {
        Error::DamagedSegment { path, reason } => {
            assert!(path.ends_with("00000000.seg"), "{err}");
            assert!(reason.contains("header is damaged"), "{err}");
        }
        other => panic!("{other}"),
    }
    // As for other damage, the journal may be ended there if told.
    let (v, report) = open_with(&dir, true).expect("forced");
    assert_eq!(report.next_lsn, 1, "{report}");
    assert_prefix(&v, 0);
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
