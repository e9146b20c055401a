//! Shipping the journal to a replica (DESIGN.md, "The stream").
//!
//! The primary reads records back **from its segment files**, so a slow or
//! absent replica costs disk, not memory. It ships only records that are
//! durable on its own disk: a record lost in a crash of the primary could
//! otherwise live on at the replica while the restarted primary writes a
//! different record at the same lsn and epoch.
//!
//! A record travels as the first [`SHIPPED_HEADER_SIZE`] bytes of its
//! on-disk header (checksum included) and its payload. The replica verifies
//! both checksums and every field, then places the record at the same lsn,
//! timestamp and epoch in its own segments (the segment sequence number and
//! payload offset are its own, so the header is encoded again).
//!
//! Flush records claim that the records they cover were durable before
//! they were written. The replica keeps that true: a Flush record that
//! covers only what it already made durable is written at once; one that
//! covers records of its own batch waits until the batch is synced (group
//! commit: one sync for the batch), then a second sync takes it. The lsn
//! acknowledged is the durable contiguous prefix.

use std::sync::atomic::Ordering;

use super::{lock, Inner, Payload, Volume, NO_HOLD};
use crate::clock::warn_if_ahead;
use crate::error::{Error, Result};
use crate::extent_map::ExtentMap;
use crate::format::{
    check_bookmark_name, crc32c, le_u32, le_u64, HeaderProblem, RecordHeader, RecordKind, SECTOR,
};
use crate::meta::{EpochStart, Role};
use crate::pool::{segment_name, Segment};
use crate::record_index::Effect;

/// Bytes of a record header that travel: every field and its checksum
/// (the rest of the on-disk slot is zero).
pub const SHIPPED_HEADER_SIZE: usize = 76;

/// Most header slots read with one call (256 KiB).
const HEADER_READ: u64 = 512;

/// A journal record as it travels from a primary to a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedRecord {
    pub header: [u8; SHIPPED_HEADER_SIZE],
    pub payload: Vec<u8>,
}

impl ShippedRecord {
    /// The lsn the header names (not yet verified).
    pub fn lsn(&self) -> u64 {
        le_u64(&self.header, 16)
    }

    /// Payload bytes the header announces (not yet verified).
    pub fn payload_len(&self) -> u32 {
        le_u32(&self.header, 56)
    }
}

/// Records read for shipping, oldest first.
#[derive(Debug, Default)]
pub struct ShipBatch {
    pub records: Vec<ShippedRecord>,
    /// Header and payload bytes of `records`.
    pub bytes: usize,
}

impl Volume {
    /// Reads durable records from lsn `from` on, up to about `max_bytes`
    /// (at least one record when there is one). Fails with
    /// [`Error::Folded`] when `from` is already folded into base.img.
    pub fn read_shipped(&self, from: u64, max_bytes: usize) -> Result<ShipBatch> {
        let inner = &self.inner;
        let durable = inner.durable_lsn.load(Ordering::Acquire);
        let mut batch = ShipBatch::default();
        if from > durable {
            return Ok(batch);
        }
        // The segment list first, then the base: a fold in between shows
        // as a base past the list's first records, never as a gap.
        let segments = inner.pool.used();
        let base_lsn = inner.pool.base().lsn;
        if from <= base_lsn {
            return Err(Error::Folded {
                lsn: from,
                base_lsn,
            });
        }
        let mut first = base_lsn + 1;
        let mut next = from;
        for seg in &segments {
            let last = seg.last_lsn.load(Ordering::Acquire);
            let seg_first = first;
            if last < seg_first {
                continue; // no record (a segment a crash left empty)
            }
            first = last + 1;
            if next > last {
                continue;
            }
            let upto = last.min(durable);
            inner.read_segment_records(seg, seg_first, next..=upto, max_bytes, &mut batch)?;
            next = from + batch.records.len() as u64;
            if next <= upto || next > durable || batch.bytes >= max_bytes {
                break;
            }
        }
        Ok(batch)
    }

    /// Places records shipped by the primary at their lsns, after checking
    /// all of them (a bad one fails the call before anything is written),
    /// and makes them durable. Returns the durable lsn to acknowledge.
    pub fn apply_shipped(&self, records: &[ShippedRecord]) -> Result<u64> {
        let inner = &self.inner;
        inner.check_failed()?;
        if self.role() == Role::Primary {
            return Err(Error::InvalidRequest(
                "this volume is a primary: it takes no shipped records".into(),
            ));
        }
        inner.check_not_resyncing()?;
        let mut epochs = Vec::new();
        let mut deferred = Vec::new();
        {
            let mut c = lock(&inner.cursor);
            let headers = inner.check_shipped(&c, records)?;
            let placed = inner.place_shipped(&mut c, &headers, records, &mut epochs, &mut deferred);
            if let Err(e) = placed {
                // Lsns of this batch may be reserved and never written:
                // stop, as any append that fails does; a reopen recovers.
                let reason = format!("placing shipped records failed: {e}");
                return Err(inner.fail(reason));
            }
        }
        let mut durable = inner.sync_written()?;
        // A Flush record covering another Flush record of the batch must
        // wait for that one to be durable: write them in rounds.
        while !deferred.is_empty() {
            let (ready, waiting): (Vec<_>, Vec<_>) = deferred
                .into_iter()
                .partition(|f| f.header.offset <= durable);
            if ready.is_empty() {
                let reason = "a shipped Flush record covers records never written".to_owned();
                return Err(inner.fail(reason));
            }
            for flush in ready {
                inner.write_reserved(flush, Payload::Bytes(&[]))?;
            }
            durable = inner.sync_written()?;
            deferred = waiting;
        }
        if !epochs.is_empty() {
            inner.persist(|config| {
                for start in epochs {
                    config.start_epoch(start);
                }
            })?;
        }
        Ok(durable)
    }

    /// The time (ns since the Unix epoch) of record `lsn`, if the journal
    /// holds it.
    pub fn record_time(&self, lsn: u64) -> Option<u64> {
        let index = lock(&self.inner.index);
        (lsn > index.base_lsn() && lsn <= index.last_lsn()).then(|| index.timestamp(lsn))
    }

    /// Bytes of data the records `after + 1..=upto` put in the journal
    /// (what a replica that holds `after` still lacks).
    pub fn bytes_between(&self, after: u64, upto: u64) -> u64 {
        lock(&self.inner.index).journal_bytes(after, upto)
    }

    /// The byte ranges (offset, length) of the disk that records after
    /// `lsn` changed, sorted and merged: what a peer that holds this
    /// journal up to `lsn` lacks of the live disk. The whole disk when
    /// what they changed is not known: a revert among them, or records
    /// after `lsn` already folded. Ranges of records still being written
    /// (or whose write failed) are included; reading them gives the live
    /// disk either way.
    pub fn changed_after(&self, lsn: u64) -> Vec<(u64, u64)> {
        let index = lock(&self.inner.index);
        let whole = vec![(0, self.inner.config.size)];
        if lsn < index.base_lsn() {
            return whole;
        }
        let mut sectors: Vec<(u64, u64)> = Vec::new();
        for at in lsn + 1..=index.last_lsn() {
            match index.effect(at) {
                Effect::Data {
                    start, sectors: n, ..
                } => sectors.push((start, start + n)),
                Effect::Revert { .. } => return whole,
                Effect::Mark | Effect::Flush => {}
            }
        }
        sectors.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in sectors {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged
            .into_iter()
            .map(|(start, end)| (start * SECTOR, (end - start) * SECTOR))
            .collect()
    }

    /// The largest payload one record of this volume carries: a replica's
    /// segments must hold records this large.
    pub fn max_record_payload(&self) -> u64 {
        self.inner.max_payload
    }

    /// The newest lsn of a record other than Flush: what a replica must
    /// hold to hold the whole disk.
    pub fn last_data_lsn(&self) -> u64 {
        self.inner.last_data_lsn.load(Ordering::Acquire)
    }

    /// Every lsn up to here survives a crash.
    pub fn durable_lsn(&self) -> u64 {
        self.inner.durable_lsn.load(Ordering::Acquire)
    }

    /// Keeps the applier from folding records after `lsn` (those a replica
    /// has not made durable) unless the hard limit forces it; `None` lifts
    /// the hold.
    pub fn hold_for_replica(&self, lsn: Option<u64>) {
        self.inner
            .replica_hold
            .store(lsn.unwrap_or(NO_HOLD), Ordering::Release);
    }
}

impl Inner {
    /// Places checked records under the cursor lock; Flush records that
    /// cover records not yet durable go to `deferred`.
    fn place_shipped(
        &self,
        c: &mut super::Cursor,
        headers: &[RecordHeader],
        records: &[ShippedRecord],
        epochs: &mut Vec<EpochStart>,
        deferred: &mut Vec<super::Reserved>,
    ) -> Result<()> {
        for (h, r) in headers.iter().zip(records) {
            if h.kind == RecordKind::Epoch {
                self.epoch.store(h.epoch, Ordering::Release);
                epochs.push(EpochStart {
                    epoch: h.epoch,
                    first_lsn: h.lsn,
                    node: h.length,
                });
            }
            let reserved = self.reserve(
                c,
                h.kind,
                h.offset,
                h.length,
                &r.payload,
                h.payload_crc,
                Some((h.timestamp, h.epoch)),
            )?;
            match h.kind {
                RecordKind::Flush if h.offset > self.durable_lsn.load(Ordering::Acquire) => {
                    deferred.push(reserved)
                }
                RecordKind::Revert => {
                    let snapshot = lock(&self.index).snapshot(h.lsn);
                    self.write_reserved(reserved, Payload::Bytes(&[]))?;
                    let map = ExtentMap::new(self.config.size);
                    snapshot.replay_into(&map, h.lsn);
                    self.map.replace_with(map);
                }
                _ => {
                    self.write_reserved(reserved, Payload::Bytes(&r.payload))?;
                }
            }
        }
        Ok(())
    }

    /// Syncs every record written so far; returns the new durable lsn.
    pub(super) fn sync_written(&self) -> Result<u64> {
        let _sync = lock(&self.sync_lock);
        // As in `flush`: not after a failed sync.
        self.check_failed()?;
        let upto = self.completion.prefix();
        if let Err(e) = self.pool.sync_dirty() {
            let reason = format!("syncing the journal failed: {e}");
            return Err(self.fail(reason));
        }
        // A replica's syncs count as a primary's flushes do: one per
        // record (a sync replica of FUA writes) makes its segments inline,
        // whose headers then carry the proof its primary's Flush records
        // no longer bring.
        self.syncs.fetch_add(1, Ordering::AcqRel);
        Ok(self.durable_lsn.fetch_max(upto, Ordering::AcqRel).max(upto))
    }

    /// Reads the records `lsns` of `seg` (whose first record is
    /// `seg_first`) into `batch`, stopping once it holds `max_bytes`.
    fn read_segment_records(
        &self,
        seg: &Segment,
        seg_first: u64,
        lsns: std::ops::RangeInclusive<u64>,
        max_bytes: usize,
        batch: &mut ShipBatch,
    ) -> Result<()> {
        let (from, upto) = (*lsns.start(), *lsns.end());
        let count = (upto - from + 1).min(HEADER_READ);
        let name = segment_name(seg.id);
        let read = self
            .retrying("reading the journal to ship it", || {
                seg.read_headers(self.config.segment_size, seg_first, from..=from + count - 1)
            })
            .map_err(Error::io(|| format!("reading {name}")))?;
        let found = match read {
            Ok(found) => found,
            Err(misplaced) => {
                let base_lsn = self.pool.base().lsn;
                if misplaced.lsn <= base_lsn {
                    return Err(Error::Folded {
                        lsn: misplaced.lsn,
                        base_lsn,
                    });
                }
                return Err(Error::DamagedSegment {
                    path: self.dir.join(crate::pool::JOURNAL_DIR).join(&name),
                    reason: format!(
                        "record {} is not in its header slot at {}",
                        misplaced.lsn, misplaced.offset
                    ),
                });
            }
        };
        let mut headers = Vec::new();
        let mut bytes = batch.bytes;
        for (h, _) in found {
            // On the wire as in a slot (version 2): the replica places the
            // record in a segment of its own.
            let slot_header = RecordHeader { inline: None, ..h }.encode();
            let mut header = [0u8; SHIPPED_HEADER_SIZE];
            header.copy_from_slice(&slot_header[..SHIPPED_HEADER_SIZE]);
            headers.push((h, header));
            bytes += SHIPPED_HEADER_SIZE + h.payload_len as usize;
            if bytes >= max_bytes {
                break;
            }
        }
        // Payloads of consecutive records are back to back (up to
        // alignment, or their headers between them inline): one read for
        // all of them.
        let with_payload = || headers.iter().filter(|(h, _)| h.payload_len > 0);
        let span = with_payload().next().map(|(h, _)| h.payload_offset).zip(
            with_payload()
                .next_back()
                .map(|(h, _)| h.payload_offset + u64::from(h.payload_len)),
        );
        let mut payloads = Vec::new();
        if let Some((start, end)) = span {
            payloads = vec![0u8; (end - start) as usize];
            self.retrying("reading the journal to ship it", || {
                seg.file.read_exact_at(&mut payloads, start)
            })
            .map_err(Error::io(|| format!("reading {name} at {start}")))?;
        }
        for (h, header) in headers {
            let payload = match span {
                Some((start, _)) if h.payload_len > 0 => {
                    let at = (h.payload_offset - start) as usize;
                    payloads[at..at + h.payload_len as usize].to_vec()
                }
                _ => Vec::new(),
            };
            batch.bytes += SHIPPED_HEADER_SIZE + payload.len();
            batch.records.push(ShippedRecord { header, payload });
        }
        Ok(())
    }

    /// Checks shipped records against this volume, in order, as the
    /// records that come next: their checksums, fields, lsns, times and
    /// epochs. Called under the cursor lock.
    fn check_shipped(
        &self,
        c: &super::Cursor,
        records: &[ShippedRecord],
    ) -> Result<Vec<RecordHeader>> {
        let mut time = c.last_timestamp;
        let now = self.clock.now_ns();
        let mut epoch = self.epoch.load(Ordering::Acquire);
        let window_start = {
            let index = lock(&self.index);
            self.window_start(&index).0
        };
        let mut headers = Vec::with_capacity(records.len());
        for (lsn, r) in (c.next_lsn..).zip(records) {
            let bad = |reason: String| Error::BadShipped {
                lsn: r.lsn(),
                reason,
            };
            let h = RecordHeader::decode(&r.header).map_err(|p| {
                bad(match p {
                    HeaderProblem::Garbage => "its header checksum fails".into(),
                    HeaderProblem::Version(v) => format!("it has on-disk format version {v}"),
                    HeaderProblem::Kind(k) => format!("it has unknown kind {k}"),
                })
            })?;
            // Fencing first: whatever else is wrong, a record of an older
            // epoch comes from a writer that was fenced.
            if h.epoch < epoch {
                return Err(bad(format!(
                    "it carries epoch {} but this volume is at epoch {epoch}",
                    h.epoch
                )));
            }
            if h.lsn != lsn {
                return Err(bad(format!("lsn {} arrived where {lsn} was due", h.lsn)));
            }
            if r.payload.len() != h.payload_len as usize {
                return Err(bad(format!(
                    "{} payload bytes arrived for a {}-byte payload",
                    r.payload.len(),
                    h.payload_len
                )));
            }
            if crc32c(&r.payload) != h.payload_crc {
                return Err(bad("its payload checksum fails".into()));
            }
            h.check(self.config.size).map_err(bad)?;
            if u64::from(h.payload_len) > self.max_payload {
                return Err(bad(format!(
                    "its {}-byte payload does not fit this volume's segments (at most {})",
                    h.payload_len, self.max_payload
                )));
            }
            if h.timestamp < time {
                return Err(bad(format!(
                    "its time {} is before the previous record's {time}",
                    h.timestamp
                )));
            }
            warn_if_ahead(h.timestamp, now, &self.config.uuid, "a shipped record");
            match h.kind {
                RecordKind::Epoch if h.epoch <= epoch => {
                    return Err(bad(format!(
                        "it starts epoch {} but this volume is at epoch {epoch}",
                        h.epoch
                    )))
                }
                RecordKind::Epoch => epoch = h.epoch,
                _ if h.epoch != epoch => {
                    return Err(bad(format!(
                        "it carries epoch {} but this volume is at epoch {epoch}",
                        h.epoch
                    )))
                }
                RecordKind::Bookmark => {
                    let name = r.payload.get(..h.length as usize).unwrap_or_default();
                    check_bookmark_name(&String::from_utf8_lossy(name)).map_err(bad)?;
                }
                // The primary's history is longer than this replica's: only
                // a resync past the revert brings the two together.
                RecordKind::Revert if h.offset < window_start => {
                    return Err(Error::NeedsResync {
                        lsn: h.lsn,
                        reason: format!(
                            "it reverts to lsn {}, before this replica's history (it starts at \
                             lsn {window_start})",
                            h.offset
                        ),
                    })
                }
                _ => {}
            }
            headers.push(h);
            time = h.timestamp;
        }
        Ok(headers)
    }
}
