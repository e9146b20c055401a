//! A libblkio client writing 4 KiB blocks at iodepth 32 on one queue until
//! told to stop, counting what completes.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blkio::{Blkio, Completion, Errno, ReqFlags};

pub const DEPTH: usize = 32;
const BLOCK: usize = 4096;
/// How long the client waits for a completion before counting an idle poll.
pub const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
pub struct Load {
    completed: AtomicU64,
    errors: AtomicU64,
    /// Times `POLL` passed with nothing completing.
    idle_polls: AtomicU64,
    stop: AtomicBool,
    /// Return without waiting for the requests in flight.
    abandon: AtomicBool,
}

impl Load {
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    pub fn idle_polls(&self) -> u64 {
        self.idle_polls.load(Ordering::SeqCst)
    }

    /// Makes `run` stop submitting and return once its requests complete.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// A guard that stops the load when dropped, without waiting for the
    /// requests in flight, so a failing test does not wait forever for the
    /// writer thread.
    pub fn stop_on_drop(&self) -> StopOnDrop<'_> {
        StopOnDrop(self)
    }

    /// Connects to `socket` and writes until `stop`, then waits for the
    /// requests in flight.
    pub fn run(&self, socket: &Path) {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("driver");
        blkio
            .set_str("path", socket.to_str().expect("utf-8 path"))
            .expect("path");
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", 1).expect("num-queues");
        blkio.set_i32("queue-size", 256).expect("queue-size");
        let mut started = blkio.start().expect("start");
        let blocks = blkio.get_u64("capacity").expect("capacity") / BLOCK as u64;
        let region = blkio.alloc_mem_region(DEPTH * BLOCK).expect("alloc");
        blkio.map_mem_region(&region).expect("map");
        // SAFETY: the region is mapped for us and lives until the end of
        // this function; only this thread touches it.
        let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i / 512) as u8 ^ 0x5a;
        }
        let queue = &mut started.queues[0];
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; DEPTH];
        let (mut in_flight, mut next) = (0usize, 0u64);
        loop {
            // Every slot holds the same bytes for the whole run, so a
            // slot may back several requests at once.
            while !self.stop.load(Ordering::SeqCst) && in_flight < DEPTH {
                let slot = (region.addr + (next as usize % DEPTH) * BLOCK) as *const u8;
                let offset = (next % blocks) * BLOCK as u64;
                queue.write(offset, slot, BLOCK, 0, ReqFlags::empty());
                (in_flight, next) = (in_flight + 1, next + 1);
            }
            if in_flight == 0 || self.abandon.load(Ordering::SeqCst) {
                return;
            }
            let mut timeout = POLL;
            match queue.do_io(&mut done, 1, Some(&mut timeout), None) {
                Ok(n) => {
                    for c in &done[..n] {
                        // SAFETY: do_io initialized the first n completions.
                        if unsafe { c.assume_init_read() }.ret != 0 {
                            self.errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    in_flight -= n;
                    self.completed.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e) if e.errno() == Errno::TIME => {
                    self.idle_polls.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => panic!("do_io: {}", e.message()),
            }
        }
    }
}

pub struct StopOnDrop<'a>(&'a Load);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.abandon.store(true, Ordering::SeqCst);
        self.0.stop();
    }
}
