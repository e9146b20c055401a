//! A libblkio client for the integration tests: one request at a time per
//! queue, data through one mapped buffer.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Room for a request of up to 2 MiB (larger than the 1 MiB pieces a
/// detached primary forwards).
pub const BUF: usize = 2 << 20;

pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, queues: i32) -> Client {
        Self::try_connect(socket, queues, false).expect("start")
    }

    pub fn try_connect(socket: &Path, queues: i32, read_only: bool) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("driver");
        blkio
            .set_str("path", socket.to_str().expect("utf-8 path"))
            .expect("path");
        blkio.set_bool("read-only", read_only).expect("read-only");
        // A refused client sees its connection closed at any of these steps.
        blkio.connect()?;
        blkio.set_i32("num-queues", queues)?;
        blkio.set_i32("queue-size", 256)?;
        let started = blkio.start()?;
        let region = blkio.alloc_mem_region(BUF)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues: started.queues,
            region,
        })
    }

    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: libblkio mapped `region` for us (addr, len); no request is
        // in flight while the test touches it, so nothing else accesses it.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Waits for the one request in flight on queue `q`; returns its result.
    pub fn complete(&mut self, q: usize) -> i32 {
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let n = self.queues[q]
            .do_io(&mut done, 1, None, None)
            .expect("do_io");
        assert_eq!(n, 1);
        // SAFETY: do_io initialized the first `n` completions.
        unsafe { done[0].assume_init_read() }.ret
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        let addr = self.region.addr as *const u8;
        self.queues[q].write(offset, addr, data.len(), 0, ReqFlags::empty());
        self.complete(q)
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Vec<u8> {
        let (status, data) = self.try_read(q, offset, len);
        assert_eq!(status, 0, "read at {offset}");
        data
    }

    /// A read that may fail: its status, and what the buffer holds then.
    pub fn try_read(&mut self, q: usize, offset: u64, len: usize) -> (i32, Vec<u8>) {
        let addr = self.region.addr as *mut u8;
        self.queues[q].read(offset, addr, len, 0, ReqFlags::empty());
        let status = self.complete(q);
        (status, self.buf()[..len].to_vec())
    }

    /// Submits a write and waits at most `limit` for it: None if it did not
    /// complete (its device is drained, fenced or gone).
    pub fn write_within(&mut self, offset: u64, data: &[u8], limit: Duration) -> Option<i32> {
        self.buf()[..data.len()].copy_from_slice(data);
        let addr = self.region.addr as *const u8;
        self.queues[0].write(offset, addr, data.len(), 0, ReqFlags::empty());
        self.complete_within(0, limit)
    }

    /// Submits a flush and waits at most `limit` for it, as `write_within`.
    pub fn flush_within(&mut self, limit: Duration) -> Option<i32> {
        self.queues[0].flush(0, ReqFlags::empty());
        self.complete_within(0, limit)
    }

    /// Submits a flush on queue `q` and returns without waiting for it
    /// ([`Self::complete_within`]).
    pub fn submit_flush(&mut self, q: usize) {
        self.queues[q].flush(0, ReqFlags::empty());
        let submitted = self.queues[q].do_io(&mut [], 0, None, None);
        assert_eq!(submitted.expect("submit"), 0);
    }

    /// Waits at most `limit` for the one request in flight on queue `q`.
    pub fn complete_within(&mut self, q: usize, limit: Duration) -> Option<i32> {
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let mut limit = limit;
        match self.queues[q].do_io(&mut done, 1, Some(&mut limit), None) {
            // SAFETY: do_io initialized the one completion it returned.
            Ok(1) => Some(unsafe { done[0].assume_init_read() }.ret),
            _ => None,
        }
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.complete(q)
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}
