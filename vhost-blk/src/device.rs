//! What an export serves: the live volume, or a point-in-time view of it.

use std::fmt::Debug;

use std::sync::Arc;

use rewind_journal::{Result, View, Volume};

use crate::replication::{Link, SenderConfig};

/// The block operations virtio-blk requests run against. Offsets and
/// lengths are checked against `size` by the request layer first.
pub trait BlockDevice: Send + Sync + Debug {
    fn size(&self) -> u64;
    fn block_size(&self) -> u32;
    /// Seeds GET_ID's answer.
    fn uuid(&self) -> String;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<()>;
    fn discard(&self, offset: u64, length: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn writethrough(&self) -> bool;
    fn set_writethrough(&self, on: bool);
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
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        Volume::write(self, offset, data).map(drop)
    }
    fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<()> {
        Volume::write_zeroes(self, offset, length, unmap).map(drop)
    }
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        Volume::discard(self, offset, length).map(drop)
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
/// (so does each write in writethrough mode).
#[derive(Debug)]
pub struct ReplicatedVolume {
    pub volume: Arc<Volume>,
    pub link: Arc<Link>,
    pub config: SenderConfig,
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
        self.volume.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let lsn = self.volume.write(offset, data)?;
        if self.volume.writethrough() {
            self.replicated(lsn)?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, unmap: bool) -> Result<()> {
        let lsn = self.volume.write_zeroes(offset, length, unmap)?;
        if self.volume.writethrough() {
            self.replicated(lsn)?;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        let lsn = self.volume.discard(offset, length)?;
        if self.volume.writethrough() {
            self.replicated(lsn)?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.volume.flush()?;
        self.replicated(self.volume.durable_lsn())
    }
    fn writethrough(&self) -> bool {
        self.volume.writethrough()
    }
    fn set_writethrough(&self, on: bool) {
        self.volume.set_writethrough(on)
    }
}
