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
use crate::meta::{EpochStart, Role, Seal};
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
}
