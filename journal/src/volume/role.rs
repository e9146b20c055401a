//! Promotion and demotion of a volume copy (DESIGN.md, "Failover").
//!
//! A copy is a primary (serves a guest, ships its journal) or a replica
//! (takes a primary's records at the same lsns). The role lives in
//! volume.json. Promotion raises the epoch, and the Epoch record carries
//! this copy's node tag; volume.json then names the new epoch and the role
//! in one write. A crash between the record and that write leaves the
//! epoch raised (recovery reads it from the record) and the role as it
//! was, so the next promotion raises one more epoch: harmless, the unused
//! epoch holds no data. Demotion writes the role and, for a seal, where
//! this copy's epoch ends.
//!
//! The daemon decides when a change is allowed (a seal, `--force`, no
//! guest attached); these calls only make it durable.

use super::{lock, Volume};
use crate::meta::{AttachRecord, EpochStart, Role, Seal};
use crate::Result;

impl Volume {
    /// This copy's tag, written into the Epoch records it raises.
    pub fn node(&self) -> u64 {
        lock(&self.inner.persisted).node
    }

    /// Where this copy's primary (or this copy itself) sealed the current
    /// epoch, if it did.
    pub fn sealed(&self) -> Option<Seal> {
        lock(&self.inner.persisted).sealed
    }

    /// Becomes the primary at a new epoch: a durable Epoch record, then the
    /// role. Returns where the epoch starts.
    pub fn promote(&self) -> Result<EpochStart> {
        let start = self.inner.start_epoch(|config| {
            config.role = Role::Primary;
            config.sealed = None;
        })?;
        tracing::info!(
            volume = %self.inner.config.uuid,
            dir = %self.inner.dir.display(),
            epoch = start.epoch,
            first_lsn = start.first_lsn,
            "promoted: this copy is the primary"
        );
        Ok(start)
    }

    /// Flushes and makes every record durable, the Flush record that
    /// flush appends included, so a replica can be shipped all of them.
    /// Returns the last lsn.
    pub fn sync_all(&self) -> Result<u64> {
        self.flush()?;
        // Records reserved but not yet written (a bookmark placed beside
        // this call) are waited for: the lsn returned is durable.
        let last = self.last_lsn();
        if self.inner.completion.wait_for(last).is_err() {
            self.inner.check_failed()?;
        }
        let durable = self.inner.sync_written()?;
        Ok(last.min(durable))
    }

    /// Becomes a replica. With `seal`, records that this copy holds every
    /// record of its epoch up to its last lsn (the caller stopped every
    /// writer), so it can be promoted again without `--force`. Returns
    /// the seal.
    pub fn demote(&self, seal: bool) -> Result<Option<Seal>> {
        let lsn = self.sync_all()?;
        let sealed = seal.then(|| Seal {
            epoch: self.epoch(),
            lsn,
        });
        self.inner.persist(|config| {
            config.role = Role::Replica;
            config.sealed = sealed;
        })?;
        tracing::info!(
            volume = %self.inner.config.uuid,
            dir = %self.inner.dir.display(),
            ?sealed,
            "demoted: this copy is a replica"
        );
        Ok(sealed)
    }

    /// A replica records that its primary sealed `seal.epoch` at
    /// `seal.lsn` (and that it holds that much).
    pub fn note_sealed(&self, seal: Seal) -> Result<()> {
        self.inner.persist(|config| config.sealed = Some(seal))
    }

    /// The last clients the daemon admitted (volume.json), oldest first.
    pub fn attach_records(&self) -> Vec<AttachRecord> {
        lock(&self.inner.persisted).clients.clone()
    }

    /// Records a client admitted or gone, durably (volume.json), in place
    /// of the same client's record; the oldest beyond
    /// [`crate::meta::MAX_ATTACH_RECORDS`] are forgotten.
    pub fn note_attach(&self, record: AttachRecord) -> Result<()> {
        self.inner.persist(|config| config.note_client(record))
    }

    /// For a daemon that starts: a client still attached when the last one
    /// ended (killed, even) left at the journal's end as recovery found it,
    /// and none left after that end (a crash may have cut records it saw
    /// acknowledged but never flushed; the lsns after the end will be
    /// other records). Returns the records, written back so that the next
    /// start keeps these points.
    pub fn settle_attach_records(&self) -> Result<Vec<AttachRecord>> {
        let last = self.last_lsn();
        let mut records = self.attach_records();
        for record in &mut records {
            record.left_lsn = Some(record.left_lsn.map_or(last, |lsn| lsn.min(last)));
        }
        if records != self.attach_records() {
            let settled = records.clone();
            self.inner.persist(|config| config.clients = settled)?;
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::fault::FaultStorage;
    use crate::{AttachRecord, BaseImage, OpenOptions, Volume, VolumeSettings};

    fn open(fs: &FaultStorage) -> Volume {
        Volume::open(fs.arc(), Path::new("/vol"), OpenOptions::default())
            .expect("open")
            .0
    }

    fn record(client: &str, left_lsn: Option<u64>) -> AttachRecord {
        AttachRecord {
            client: client.into(),
            epoch: 1,
            left_lsn,
        }
    }

    #[test]
    fn attach_records_persist_and_a_start_settles_where_clients_left() {
        let fs = FaultStorage::new();
        let settings = VolumeSettings {
            segment_size: 64 << 10,
            journal_max: 64 << 20,
            journal_warn: 48 << 20,
            ..VolumeSettings::new(1 << 20)
        };
        Volume::create(
            &fs,
            Path::new("/vol"),
            &settings,
            BaseImage::Empty,
            &mut |_, _| {},
        )
        .expect("create");
        let v = open(&fs);
        v.note_attach(record("1:1", None)).expect("attached");
        v.write(0, &[1; 512]).expect("write");
        v.flush().expect("flush");
        let gone = v.last_lsn();
        v.note_attach(record("2:1", Some(gone + 5)))
            .expect("gone past the end");
        v.write(512, &[2; 512]).expect("write");
        v.close().expect("close");

        let v = open(&fs);
        assert_eq!(v.attach_records().len(), 2, "durable");
        let last = v.last_lsn();
        assert!(last < gone + 5);
        // Client 1 was attached when the daemon ended; client 2's point is
        // past the journal's end (as after a crash that cut it): both left
        // at the end recovery found, whatever comes after is new.
        let settled = v.settle_attach_records().expect("settle");
        assert_eq!(
            settled,
            vec![record("1:1", Some(last)), record("2:1", Some(last))]
        );
        v.close().expect("close");

        let v = open(&fs);
        assert_eq!(v.attach_records(), settled, "written back");
        v.close().expect("close");
    }
}
