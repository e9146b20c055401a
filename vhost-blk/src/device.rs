//! What an export serves: the live volume, or a point-in-time view of it.

use std::fmt::Debug;

use std::sync::Arc;

use rewind_journal::{Error, PayloadBuffer, ReadPlan, Result, View, Volume, Written};

use crate::detach::{storage_failed, Detacher, Route};
use crate::replication::frame::ForwardOp;
use crate::replication::{Link, SenderConfig};

/// The block operations virtio-blk requests run against. Offsets and
/// lengths are checked against `size` by the request layer first. Writes,
/// zeroes and discards never sync, even in writethrough mode: the request
/// layer flushes after them (on an IO thread, so the queue goes on).
pub trait BlockDevice: Send + Sync + Debug {
    fn size(&self) -> u64;
    fn block_size(&self) -> u32;
    /// Seeds GET_ID's answer.
    fn uuid(&self) -> String;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Reads like `read` if that needs no wait for the disk; false (`buf`
    /// unspecified) where it would. Devices that cannot tell say false.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let _ = (offset, buf);
        Ok(false)
    }
    /// Where the bytes of a read are, for a caller that reads the files
    /// itself (see `Volume::plan_read`); None where the device cannot say
    /// (the caller then uses `read`).
    fn plan_read(&self, offset: u64, len: u64) -> Result<Option<ReadPlan>> {
        let _ = (offset, len);
        Ok(None)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// `write` of `buf`'s payload (a device that can use the room in front
    /// of it saves a copy: [`PayloadBuffer`]), which may return before the
    /// writes recorded before it are written by other threads: `Some(lsn)`
    /// then, and the write is done once `wait_written(lsn)` returns (see
    /// [`Volume::write_buffer_unordered`]). The default waits itself.
    fn write_buffer_unordered(&self, offset: u64, buf: &mut PayloadBuffer) -> Result<Option<u64>> {
        self.write(offset, buf.payload()).map(|()| None)
    }
    fn wait_written(&self, _lsn: u64) -> Result<()> {
        Ok(())
    }
    /// Whether `wait_written(lsn)` would return at once.
    fn is_written(&self, _lsn: u64) -> bool {
        true
    }
    fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<()>;
    fn discard(&self, offset: u64, length: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn writethrough(&self) -> bool;
    fn set_writethrough(&self, on: bool);
    /// Whether large writes now go to the disk without the page cache
    /// (`Volume::bulk_writes`): the request layer then runs them on IO
    /// threads, several at once, instead of one after another on the
    /// queue's thread.
    fn bulk_writes(&self) -> bool {
        false
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn block_size(&self) -> u32 {
        self.config().block_size
    }
    fn uuid(&self) -> String {
        self.config().uuid.simple().to_string()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Volume::read(self, offset, buf)
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        Volume::read_cached(self, offset, buf)
    }
    fn plan_read(&self, offset: u64, len: u64) -> Result<Option<ReadPlan>> {
        Volume::plan_read(self, offset, len)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        Volume::write_deferred(self, offset, data).map(drop)
    }
    fn write_buffer_unordered(&self, offset: u64, buf: &mut PayloadBuffer) -> Result<Option<u64>> {
        Ok(match Volume::write_buffer_unordered(self, offset, buf)? {
            Written::InOrder(_) => None,
            Written::AfterOthers(lsn) => Some(lsn),
        })
    }
    fn wait_written(&self, lsn: u64) -> Result<()> {
        Volume::wait_written(self, lsn)
    }
    fn is_written(&self, lsn: u64) -> bool {
        Volume::is_written(self, lsn)
    }
    fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<()> {
        Volume::write_zeroes_deferred(self, offset, length, unmap).map(drop)
    }
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        Volume::discard_deferred(self, offset, length).map(drop)
    }
    fn flush(&self) -> Result<()> {
        Volume::flush(self)
    }
    fn writethrough(&self) -> bool {
        Volume::writethrough(self)
    }
    fn set_writethrough(&self, on: bool) {
        Volume::set_writethrough(self, on)
    }
    fn bulk_writes(&self) -> bool {
        Volume::bulk_writes(self)
    }
}

/// A view exported with `export --at T`: read-only, or writable into a
/// scratch overlay that is thrown away with it, so flushes have nothing to
/// make durable.
#[derive(Debug)]
pub struct ViewDevice {
    pub view: View,
    pub block_size: u32,
    pub uuid: String,
}

impl BlockDevice for ViewDevice {
    fn size(&self) -> u64 {
        self.view.size()
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn uuid(&self) -> String {
        self.uuid.clone()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.view.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.view.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, length: u64, _unmap: bool) -> Result<()> {
        self.view.write_zeroes(offset, length)
    }
    /// Discarded sectors may read as anything; zeroes are simplest.
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.view.write_zeroes(offset, length)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn writethrough(&self) -> bool {
        false
    }
    fn set_writethrough(&self, _on: bool) {}
}

/// A primary's live volume: a flush also wakes the replication sender,
/// and in sync mode completes only once the replica holds what it covers
/// (in writethrough mode, the flush after each write). With a [`Detacher`]
/// (`--on-storage-error detach`), requests go to the replica once the
/// local storage failed.
#[derive(Debug)]
pub struct ReplicatedVolume {
    pub volume: Arc<Volume>,
    pub link: Arc<Link>,
    pub config: SenderConfig,
    pub detacher: Option<Detacher>,
}

/// Where a request ran.
enum Ran {
    Local,
    /// Over the link; a read's data.
    Forwarded(Vec<u8>),
}

impl ReplicatedVolume {
    fn replicated(&self, lsn: u64) -> Result<()> {
        self.link.notify_durable();
        self.link
            .wait_replicated(lsn, &self.config)
            .map_err(|reason| rewind_journal::Error::Io {
                context: "sync replication".into(),
                source: std::io::Error::other(reason),
            })
    }

    /// Runs `local`, or `op` on the replica once this primary detached
    /// (the request that meets the storage failure detaches).
    fn serve(
        &self,
        local: impl FnOnce() -> Result<()>,
        op: impl FnOnce() -> ForwardOp,
    ) -> Result<Ran> {
        let Some(detacher) = &self.detacher else {
            return local().map(|()| Ran::Local);
        };
        match detacher.route().map_err(Error::Failed)? {
            Route::Local(counted) => match local() {
                Ok(()) => return Ok(Ran::Local),
                Err(e) if storage_failed(&e) => {
                    drop(counted);
                    if detacher.detach(&self.volume, &e).is_err() {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            },
            Route::Forward => {}
        }
        let data = detacher.forward(op())?;
        Ok(Ran::Forwarded(data))
    }

    /// Runs `local` on this volume unless it detached: then the answer is
    /// `detached`, and the caller's `read` forwards the request.
    fn local_only<T>(&self, local: impl FnOnce() -> Result<T>, detached: T) -> Result<T> {
        let Some(detacher) = &self.detacher else {
            return local();
        };
        match detacher.route().map_err(Error::Failed)? {
            Route::Local(_counted) => local(),
            Route::Forward => Ok(detached),
        }
    }

    /// A write-like request: run locally, or forwarded.
    fn modify(
        &self,
        local: impl FnOnce() -> Result<u64>,
        op: impl FnOnce() -> ForwardOp,
    ) -> Result<()> {
        self.serve(|| local().map(drop), op).map(drop)
    }
}

impl BlockDevice for ReplicatedVolume {
    fn size(&self) -> u64 {
        self.volume.size()
    }
    fn block_size(&self) -> u32 {
        self.volume.config().block_size
    }
    fn uuid(&self) -> String {
        BlockDevice::uuid(self.volume.as_ref())
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let length = buf.len() as u64;
        let ran = self.serve(
            || self.volume.read(offset, buf),
            || ForwardOp::Read { offset, length },
        )?;
        if let Ran::Forwarded(data) = ran {
            if data.len() != buf.len() {
                return Err(Error::Io {
                    context: "a forwarded read".into(),
                    source: std::io::Error::other(format!(
                        "the replica returned {} bytes for a read of {length}",
                        data.len()
                    )),
                });
            }
            buf.copy_from_slice(&data);
        }
        Ok(())
    }
    /// Local reads only: once detached, the read is forwarded by `read`.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.local_only(|| self.volume.read_cached(offset, buf), false)
    }
    /// Local reads only, as `read_cached`. A planned read in flight when
    /// the volume detaches either completes from the local files, whose
    /// data the replica holds too, or fails and runs again through `read`,
    /// which forwards it.
    fn plan_read(&self, offset: u64, len: u64) -> Result<Option<ReadPlan>> {
        self.local_only(|| self.volume.plan_read(offset, len), None)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.modify(
            || self.volume.write_deferred(offset, data),
            || ForwardOp::Write {
                offset,
                data: data.to_vec(),
            },
        )
    }
    /// As the volume's: a local write recorded behind records other
    /// threads still write is reported by its lsn, and `wait_written`
    /// finishes it. It no longer counts as a local request then, so a
    /// detach does not wait for it.
    fn write_buffer_unordered(&self, offset: u64, buf: &mut PayloadBuffer) -> Result<Option<u64>> {
        // One closure or the other runs, never both at once.
        let buf = std::cell::RefCell::new(buf);
        let mut after_others = None;
        self.serve(
            || {
                let volume: &Volume = &self.volume;
                after_others =
                    BlockDevice::write_buffer_unordered(volume, offset, &mut buf.borrow_mut())?;
                Ok(())
            },
            || ForwardOp::Write {
                offset,
                data: buf.borrow().payload().to_vec(),
            },
        )?;
        Ok(after_others)
    }
    /// A record ahead that can no longer be written failed the volume:
    /// the write then waits for the detach instead of failing, whose
    /// catch-up sends the replica what every record after its lsn changed,
    /// this one's included (it is in the record index, written), so the
    /// write is done once the volume detached.
    fn wait_written(&self, lsn: u64) -> Result<()> {
        match self.volume.wait_written(lsn) {
            Err(e) if storage_failed(&e) => match &self.detacher {
                Some(detacher) => detacher.detach(&self.volume, &e).map_err(Error::Failed),
                None => Err(e),
            },
            done => done,
        }
    }
    fn is_written(&self, lsn: u64) -> bool {
        self.volume.is_written(lsn)
    }
    fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<()> {
        self.modify(
            || self.volume.write_zeroes_deferred(offset, length, unmap),
            || ForwardOp::WriteZeroes {
                offset,
                length,
                unmap,
            },
        )
    }
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.modify(
            || self.volume.discard_deferred(offset, length),
            || ForwardOp::Discard { offset, length },
        )
    }
    fn flush(&self) -> Result<()> {
        let local = || {
            self.volume.flush()?;
            self.replicated(self.volume.durable_lsn())
        };
        self.serve(local, || ForwardOp::Flush).map(drop)
    }
    fn writethrough(&self) -> bool {
        self.volume.writethrough()
    }
    fn set_writethrough(&self, on: bool) {
        self.volume.set_writethrough(on)
    }
    /// Not once detached: forwarded writes leave in the order taken.
    fn bulk_writes(&self) -> bool {
        self.local_only(|| Ok(self.volume.bulk_writes()), false)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use rewind_journal::fault::{Fault, FaultOp, FaultStorage};
    use rewind_journal::OpenOptions;

    use super::*;
    use crate::replication::tls::{PeerTrust, TlsSettings};
    use crate::replication::{Mode, OnLoss};

    /// A primary of `volume` whose replica is not connected; with a
    /// detacher, a detach then fails (no replica to take over).
    fn primary(volume: Volume, detach: bool) -> ReplicatedVolume {
        let link = Arc::new(Link::new("test".into(), Some(Mode::Async), None));
        ReplicatedVolume {
            volume: Arc::new(volume),
            link: link.clone(),
            config: SenderConfig {
                peer: "127.0.0.1:1".parse().expect("address"),
                mode: Mode::Async,
                sync_timeout: Duration::from_secs(1),
                on_loss: OnLoss::Suspend,
                fence_peer: None,
                rate: None,
                compress: false,
                tls: TlsSettings {
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                    trust: PeerTrust::Ca(PathBuf::new()),
                },
            },
            detacher: detach.then(|| Detacher::new(link, Duration::from_millis(100))),
        }
    }

    fn buffer(byte: u8) -> PayloadBuffer {
        let mut buf = PayloadBuffer::new();
        buf.payload_mut(4096).fill(byte);
        buf
    }

    /// Another queue's write (the first record, in the first segment,
    /// which only the writer writes to) stalls in the storage after its
    /// record is placed; `then` runs while it sleeps, with the storage fast
    /// again.
    fn behind_a_stalled_write(fs: &FaultStorage, primary: &ReplicatedVolume, then: impl FnOnce()) {
        fs.slow_down(FaultOp::Write, "00000000.seg", Duration::from_secs(1));
        std::thread::scope(|s| {
            let other = s.spawn(|| primary.volume.write(0, &[7u8; 4096]));
            fs.wait_stalled("the other queue's write");
            assert_eq!(primary.volume.last_lsn(), 1, "placed");
            fs.clear_faults();
            then();
            let _ = other.join().expect("other queue's thread");
        });
    }

    #[test]
    fn a_replicated_write_behind_one_still_being_written_leaves_the_wait_to_its_caller() {
        let fs = FaultStorage::new();
        let p = primary(
            crate::test_support::volume_on(&fs, 8 << 20, OpenOptions::default()),
            true,
        );
        behind_a_stalled_write(&fs, &p, || {
            let lsn = p
                .write_buffer_unordered(8192, &mut buffer(2))
                .expect("recorded");
            assert_eq!(lsn, Some(2), "recorded behind lsn 1, not yet done");
            p.wait_written(2).expect("done once lsn 1 is written");
            let mut back = vec![0u8; 4096];
            p.read(0, &mut back).expect("read");
            assert_eq!(back, vec![7u8; 4096], "the write ahead is written");
        });
        // Nothing ahead in flight: done at once.
        assert_eq!(
            p.write_buffer_unordered(16384, &mut buffer(3))
                .expect("third"),
            None
        );
    }

    #[test]
    fn a_replicated_write_whose_record_ahead_fails_is_left_to_the_detach() {
        for detach in [false, true] {
            let fs = FaultStorage::new();
            let p = primary(
                crate::test_support::volume_on(&fs, 8 << 20, OpenOptions::default()),
                detach,
            );
            behind_a_stalled_write(&fs, &p, || {
                let lsn = p
                    .write_buffer_unordered(8192, &mut buffer(2))
                    .expect("recorded");
                assert_eq!(lsn, Some(2));
                // The stalled write then fails (EROFS: not retried): the
                // volume stops taking writes.
                fs.inject(Fault::always(FaultOp::Write, 30).on_paths_containing(".seg"));
                let e = p.wait_written(2).expect_err("lsn 1 is never written");
                let why = e.to_string();
                if detach {
                    // The detach ran (and failed here: no replica).
                    assert!(why.contains("the replica is not connected"), "{why}");
                    assert!(p.detacher.as_ref().is_some_and(|d| d.route().is_err()));
                } else {
                    assert!(!why.contains("replica"), "{why}");
                }
            });
        }
    }
}
