//! The vhost-user-blk device: features, config space and the virtqueues.
//!
//! One worker thread per queue (`queues_per_thread`), each processing its
//! queue with no lock shared with the others: the `&self` backend trait,
//! per-queue state, and a volume that takes concurrent calls.
//!
//! A queue's thread runs the requests that need no wait for the disk,
//! puts its reads into the queue's ring (uring.rs) and hands the rest to
//! the IO threads (inflight.rs), so many are in flight at once; each
//! reaches the used ring when it is done. The front-end's inflight region
//! (INFLIGHT_SHMFD) marks those taken and not yet used, so a daemon
//! restarted after a crash takes exactly those again (QEMU with
//! `reconnect=`). The journal tolerates a request that ran but was not
//! marked used being run again.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rewind_journal::ReadPlan;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::BlockDevice;
use crate::gate::{Gate, Pass};
use crate::inflight::{self, Inflight, Ticket};
use crate::inflight_region::{self, InflightRegion};
use crate::request::{self, Disk, ReadInto, Step, Waiting, MAX_SEGMENTS, SECTOR, SEG_MAX};
use crate::syncs::Syncs;
use crate::uring::QueueRing;

/// Guest memory with a dirty log QEMU can share during a live migration:
/// every byte the device writes to the guest (read data, the used ring)
/// marks its page, so the migration copies it again.
pub type GuestMemory = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;
/// A virtqueue over that memory.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// Largest queue the device offers.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Offset of the `writeback` byte in virtio_blk_config.
const WRITEBACK_OFFSET: usize = 32;
/// Bytes of virtio_blk_config the device has.
const CONFIG_LEN: usize = 60;

/// Settings of one export.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub num_queues: usize,
    pub queue_size: usize,
    pub read_only: bool,
}

/// The vrings the client kicked, by queue index.
struct Kicked(Vec<OnceLock<Vring>>);

impl std::fmt::Debug for Kicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues = self.0.iter().enumerate().filter(|(_, v)| v.get().is_some());
        f.debug_list().entries(queues.map(|(i, _)| i)).finish()
    }
}

#[derive(Debug)]
pub struct BlkBackend {
    device: Arc<dyn BlockDevice>,
    config: ExportConfig,
    gate: Arc<Gate>,
    /// The epoch this connection was admitted at; 0 (no epoch) until it is
    /// admitted, so no request runs before.
    epoch: AtomicU64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemory>>>,
    /// Held while a queue takes requests; `stop_vring` waits on it.
    busy: Vec<Mutex<()>>,
    /// Set when the connection is over: queues take no more requests.
    stopping: AtomicBool,
    /// Each queue's requests taken and not yet in its used ring.
    inflight: Vec<Arc<Inflight>>,
    /// Each queue's reads in flight in the kernel; None where io_uring is
    /// not available (its reads go to the IO threads).
    rings: Vec<Option<QueueRing>>,
    /// The vrings the client kicked, by queue: the device is stopped once
    /// none of them is ready.
    kicked: Kicked,
    exits: Mutex<Vec<EventNotifier>>,
    /// Flushes waiting for a sync they share.
    syncs: Arc<Syncs>,
}

impl BlkBackend {
    pub fn new(device: Arc<dyn BlockDevice>, config: ExportConfig, gate: Arc<Gate>) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let uuid = device.uuid();
        let n = uuid.len().min(id.len());
        id[..n].copy_from_slice(&uuid.as_bytes()[..n]);
        let busy = (0..config.num_queues).map(|_| Mutex::new(())).collect();
        let inflight = (0..config.num_queues).map(|_| Arc::default()).collect();
        let rings = (0..config.num_queues)
            .map(|_| match QueueRing::new(config.queue_size as u32) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(error = %e, "no io_uring: reads that wait for the disk go to the IO threads");
                    None
                }
            })
            .collect();
        let kicked = Kicked((0..config.num_queues).map(|_| OnceLock::new()).collect());
        let syncs = Arc::new(Syncs::new(device.clone()));
        BlkBackend {
            device,
            config,
            gate,
            epoch: AtomicU64::new(0),
            id,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            busy,
            stopping: AtomicBool::new(false),
            inflight,
            rings,
            kicked,
            exits: Mutex::new(Vec::new()),
            syncs,
        }
    }

    /// Lets the connection's requests through the gate at `epoch`.
    pub fn admit(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Stops every worker thread (their daemon's connection is over) and
    /// waits for the requests they handed to the kernel or the IO threads,
    /// so none completes into a later connection's rings. A worker still
    /// taking requests stops at the next one: the wait starts after it.
    pub fn stop_workers(&self) {
        self.stopping.store(true, Ordering::Release);
        for exit in self.exits.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Err(e) = exit.notify() {
                tracing::warn!(error = %e, "cannot stop a worker thread");
            }
        }
        for (index, busy) in self.busy.iter().enumerate() {
            drop(busy.lock().unwrap_or_else(|e| e.into_inner()));
            self.wait_taken(index);
        }
    }

    /// Waits until every request queue `index` took is in its used ring.
    fn wait_taken(&self, index: usize) {
        if let Some(Some(ring)) = self.rings.get(index) {
            if let Err(e) = ring.drain() {
                tracing::error!(error = %e, queue = index, "cannot wait for the reads in flight");
            }
        }
        if let Some(queue) = self.inflight.get(index) {
            queue.wait_empty();
        }
    }

    /// The eventfd that says queue `index`'s reads completed, and the
    /// device event its worker thread is to get for it (past the queues
    /// and the exit event), if the queue has a ring.
    pub fn ring_event(&self, index: usize) -> Option<(RawFd, u64)> {
        let ring = self.rings.get(index)?.as_ref()?;
        Some((ring.event_fd(), self.ring_event_id()))
    }

    fn ring_event_id(&self) -> u64 {
        self.config.num_queues as u64 + 1
    }

    /// The virtio_blk_config structure, little-endian.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], at: usize, bytes: &[u8]| {
            c[at..at + bytes.len()].copy_from_slice(bytes)
        };
        let block = self.device.block_size();
        let sectors = self.device.size() / SECTOR;
        put(&mut c, 0, &sectors.to_le_bytes()); // capacity
        put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
        put(&mut c, 20, &block.to_le_bytes()); // blk_size
        c[WRITEBACK_OFFSET] = u8::from(!self.device.writethrough());
        put(&mut c, 34, &(self.config.num_queues as u16).to_le_bytes());
        let max_sectors = u32::MAX.to_le_bytes();
        put(&mut c, 36, &max_sectors); // max_discard_sectors
        put(&mut c, 40, &(MAX_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &(block / SECTOR as u32).to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &max_sectors); // max_write_zeroes_sectors
        put(&mut c, 52, &(MAX_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Takes the queue's requests while the gate lets them through: runs
    /// those that need no wait, puts reads into the queue's ring, hands the
    /// others to the IO threads. Returns false if it stopped with requests
    /// it cannot take now: the queue parked at a closed gate, stopped
    /// (GET_VRING_BASE) or the connection ending; the caller must then not
    /// look for more, or it would spin on requests left in the ring.
    fn process(&self, index: usize, vring: &Vring) -> io::Result<bool> {
        let guest = self
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| io::Error::other("no guest memory yet"))?;
        let mem = guest.memory();
        let disk = Disk {
            device: self.device.as_ref(),
            read_only: self.config.read_only,
            id: self.id,
        };
        let mut epoch = self.epoch.load(Ordering::SeqCst);
        let inflight = &self.inflight[index];
        let ring = self.rings.get(index).and_then(Option::as_ref);
        let _busy = self.busy[index].lock().unwrap_or_else(|e| e.into_inner());
        if !inflight.restore(vring, &mem)? {
            return Ok(false);
        }
        let mut published = false;
        let mut behind = Behind::default();
        // Whether it stopped with requests it cannot take now.
        let mut take = || -> io::Result<bool> {
            loop {
                published |= behind.complete_written(self.device.as_ref())?;
                // The connection is over (`stop_workers`): nothing new.
                if self.stopping.load(Ordering::Acquire) {
                    return Ok(true);
                }
                let Some(pass) = self.gate.enter(epoch) else {
                    // The client may have been admitted since `epoch` was
                    // read, its parked queues woken before this one parks:
                    // park reads the epoch again under the gate's lock.
                    let current = || self.epoch.load(Ordering::SeqCst);
                    if self.gate.park(index, current, vring) {
                        epoch = current();
                        continue;
                    }
                    return Ok(true);
                };
                // Stop taking descriptors once the queue is stopped
                // (GET_VRING_BASE). Requests a restart takes again come
                // first.
                let (chain, queue_size) = {
                    let mut state = vring.get_mut();
                    let queue = state.get_queue_mut();
                    if !queue.ready() {
                        return Ok(true);
                    }
                    let chain = match inflight.next_resubmit() {
                        Some(head) => Some(DescriptorChain::new(
                            &*mem,
                            GuestAddress(queue.desc_table()),
                            queue.size(),
                            head,
                        )),
                        None => queue.pop_descriptor_chain(&*mem),
                    };
                    (chain, queue.size())
                };
                let Some(chain) = chain else {
                    return Ok(false);
                };
                // No used entry can name such a head. The queue stops until
                // the driver sets it up again (QEMU's virtio_error does the
                // same): going on past it would leave the used index plus
                // the requests marked in flight short of where the next
                // request was taken, and a restart would take from there.
                if chain.head_index() >= queue_size {
                    tracing::warn!(
                        event = rewind_journal::events::GUEST_PROTOCOL_ERROR,
                        head = chain.head_index(),
                        queue_size,
                        "the available ring names a descriptor outside the queue; \
                         the queue stops until the driver resets it"
                    );
                    vring.set_queue_ready(false);
                    return Ok(true);
                }
                let ticket = inflight.take(chain.head_index());
                match request::start(&*mem, chain, &disk, ring.is_some()) {
                    Step::Done(done) => {
                        pass.finish_request(&done);
                        inflight.complete(ticket, done.used, vring)?;
                        published = true;
                    }
                    Step::Waiting(waiting) => {
                        let after_others = waiting.after_others();
                        let job = Dispatched {
                            waiting,
                            pass,
                            ticket,
                            inflight: inflight.clone(),
                            vring: vring.clone(),
                            guest: guest.clone(),
                            device: self.device.clone(),
                            read_only: self.config.read_only,
                            id: self.id,
                        };
                        match (after_others, ring) {
                            (Some(lsn), _) => behind.push(lsn, job),
                            _ if job.waiting.only_syncs() => self.syncs.queue(job),
                            (None, Some(ring)) => published |= ring.queue(job)?,
                            (None, None) => job.dispatch(),
                        }
                    }
                }
            }
        };
        let stopped = take();
        // Whatever ended the loop, the writes behind others are completed
        // here or on an IO thread, never dropped.
        let completed = behind.complete_written(self.device.as_ref());
        behind.dispatch();
        // Signalled even if completing one failed: those before it are used.
        published |= !matches!(completed, Ok(false));
        // One system call for the batch's reads through the page cache,
        // whatever ended the loop; those it held complete here.
        if let Some(ring) = ring {
            ring.submit();
        }
        if published {
            signal(vring)?;
        }
        completed?;
        stopped.map(|stopped| !stopped)
    }
}

/// Writes a queue's thread recorded behind records other queues' threads
/// were still writing (`Waiting::after_others`), in the order taken (their
/// lsns rise). The queue's thread completes them once the written prefix
/// passes them, as it takes the next requests; those still waiting when
/// it runs out of requests go to one IO thread together. A job per write
/// instead (a wake-up, a wait and a signal each) cost four queues of warm
/// 4 KiB writes about 4 us of CPU per write more than one queue.
#[derive(Default)]
struct Behind(VecDeque<(u64, Dispatched)>);

impl Behind {
    fn push(&mut self, lsn: u64, job: Dispatched) {
        self.0.push_back((lsn, job));
    }

    /// Completes, without signalling, those whose records and every record
    /// before them are written; returns whether it completed any.
    fn complete_written(&mut self, device: &dyn BlockDevice) -> io::Result<bool> {
        let mut completed = false;
        while let Some((lsn, _)) = self.0.front() {
            if !device.is_written(*lsn) {
                break;
            }
            let Some((_, job)) = self.0.pop_front() else {
                break;
            };
            job.finish(|waiting, mem, disk| waiting.finish(mem, disk), false)?;
            completed = true;
        }
        Ok(completed)
    }

    /// Hands the rest to an IO thread, which waits for them in turn and
    /// signals once, after the last.
    fn dispatch(self) {
        if self.0.is_empty() {
            return;
        }
        inflight::run_blocking(move || {
            let last = self.0.len() - 1;
            for (i, (_, job)) in self.0.into_iter().enumerate() {
                let published =
                    job.finish(|waiting, mem, disk| waiting.finish(mem, disk), i == last);
                if let Err(e) = published {
                    tracing::error!(error = %e, "cannot complete a request");
                }
            }
        });
    }
}

/// Tells the driver about new used entries, if it wants to hear (EVENT_IDX).
pub(crate) fn signal(vring: &Vring) -> io::Result<()> {
    if vring
        .needs_notification()
        .map_err(|e| io::Error::other(format!("needs_notification: {e}")))?
    {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// A request that waits for the disk (handed to the kernel or an IO
/// thread), with what completing it needs.
pub(crate) struct Dispatched {
    waiting: Waiting,
    pass: Pass,
    ticket: Ticket,
    inflight: Arc<Inflight>,
    vring: Vring,
    guest: GuestMemoryAtomic<GuestMemory>,
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl Dispatched {
    fn disk(&self) -> Disk<'_> {
        Disk {
            device: self.device.as_ref(),
            read_only: self.read_only,
            id: self.id,
        }
    }

    /// What it reads, if it is a read.
    pub fn read_into(&self) -> Option<ReadInto<'_>> {
        self.waiting.read_into(&self.disk())
    }

    /// The guest memory it runs against, kept mapped while held.
    pub fn memory(&self) -> Arc<GuestMemory> {
        self.guest.memory().into_inner()
    }

    /// Where the bytes of its read are (see `Volume::plan_read`).
    pub fn plan_read(&self, offset: u64, len: u64) -> rewind_journal::Result<Option<ReadPlan>> {
        self.device.plan_read(offset, len)
    }

    pub fn vring(&self) -> &Vring {
        &self.vring
    }

    /// Runs it to its end on an IO thread.
    pub fn dispatch(self) {
        inflight::run_blocking(move || {
            let published = self.finish(|waiting, mem, disk| waiting.finish(mem, disk), true);
            if let Err(e) = published {
                tracing::error!(error = %e, "cannot complete a request");
            }
        });
    }

    /// Completes it, one that only syncs, with the outcome of a sync that
    /// started after it was taken (syncs.rs); with `signal`, signals too.
    pub fn finish_synced(
        self,
        synced: &Result<(), Arc<rewind_journal::Error>>,
        signal: bool,
    ) -> io::Result<()> {
        self.finish(
            |waiting, mem, disk| waiting.finish_synced(mem, disk, synced),
            signal,
        )
    }

    /// Whether it was taken from the same queue as `other`.
    pub fn same_queue(&self, other: &Dispatched) -> bool {
        Arc::ptr_eq(&self.inflight, &other.inflight)
    }

    /// Completes its read, whose guest buffers the caller filled, into the
    /// used ring (the caller signals).
    pub fn finish_filled(self) -> io::Result<()> {
        self.finish(|waiting, mem, disk| waiting.finish_filled(mem, disk), false)
    }

    fn finish(
        self,
        run: impl FnOnce(Waiting, &GuestMemory, &Disk<'_>) -> request::Completion,
        signal: bool,
    ) -> io::Result<()> {
        let disk = Disk {
            device: self.device.as_ref(),
            read_only: self.read_only,
            id: self.id,
        };
        let done = run(self.waiting, &self.guest.memory(), &disk);
        self.pass.finish_request(&done);
        if signal {
            self.inflight
                .complete_and_signal(self.ticket, done.used, &self.vring)
        } else {
            self.inflight.complete(self.ticket, done.used, &self.vring)
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.config.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.config.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Live migration: QEMU refuses to migrate a vhost device without it.
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.config.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// Exactly the bytes asked for; past the structure, zeroes.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        (offset as usize..offset as usize + size as usize)
            .map(|i| config.get(i).copied().unwrap_or(0))
            .collect()
    }

    /// Only `writeback` is writable (CONFIG_WCE).
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let at = WRITEBACK_OFFSET.checked_sub(offset as usize);
        match at.and_then(|i| buf.get(i)) {
            Some(&writeback) if buf.len() == 1 => {
                self.device.set_writethrough(writeback == 0);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "only the writeback byte is writable ({} bytes at {offset})",
                    buf.len()
                ),
            )),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        let ours = notifier.try_clone().ok()?;
        self.exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ours);
        Some((consumer, notifier))
    }

    /// Called for GET_VRING_BASE after the queue is stopped: returns once
    /// every request already taken from it is complete and in the used ring.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(busy) = self.busy.get(queue_index as usize) {
            drop(busy.lock().unwrap_or_else(|e| e.into_inner()));
        }
        self.wait_taken(queue_index as usize);
        // Requests a restart is to take again are in flight for the guest;
        // the base would claim them done (a migration's destination would
        // never run them). They wait only behind a closed gate.
        if let Some(pending) = self
            .inflight
            .get(queue_index as usize)
            .map(|queue| queue.pending_resubmits())
            .filter(|&n| n > 0)
        {
            return Err(io::Error::other(format!(
                "queue {queue_index} still has {pending} requests from before a restart to run \
                 (the export is drained or fenced): resume it first"
            )));
        }
        // QEMU stops every queue in a row when it stops the device.
        let stopped = self
            .kicked
            .0
            .iter()
            .filter_map(OnceLock::get)
            .all(|vring| !vring.get_ref().get_queue().ready());
        if stopped {
            self.gate.device_stopped();
        }
        Ok(())
    }

    /// GET_INFLIGHT_FD: a zeroed region the front-end keeps for the device.
    fn get_inflight_fd(
        &self,
        inflight: &VhostUserInflight,
    ) -> io::Result<(VhostUserInflight, File)> {
        inflight_region::create(inflight, self.config.num_queues)
    }

    /// SET_INFLIGHT_FD: the queues mark their requests there; each reads
    /// what a previous backend left in flight before it takes anything.
    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = Arc::new(InflightRegion::map(
            inflight,
            &file,
            self.config.num_queues,
        )?);
        for (index, queue) in self.inflight.iter().enumerate().take(region.queues()) {
            queue.track(region.clone(), index);
        }
        Ok(())
    }

    /// SET_FEATURES: QEMU sends it each time it starts the device.
    fn acked_features(&self, _features: u64) {
        self.gate.device_started();
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event {evset:?}")));
        }
        if u64::from(device_event) == self.ring_event_id() {
            return match self.rings.get(thread_id) {
                Some(Some(ring)) => {
                    ring.completed();
                    Ok(())
                }
                _ => Err(io::Error::other(format!("no ring on thread {thread_id}"))),
            };
        }
        // One queue per thread: the thread's only vring is queue `thread_id`.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no vring for event {device_event}")))?;
        if let Some(kicked) = self.kicked.0.get(thread_id) {
            kicked.get_or_init(|| vring.clone());
        }
        if !self.event_idx.load(Ordering::Acquire) {
            return self.process(thread_id, vring).map(drop);
        }
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("disable_notification: {e}")))?;
            let served = self.process(thread_id, vring)?;
            let more = vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("enable_notification: {e}")))?;
            // A parked queue waits for the gate's kick, not for more requests.
            if !more || !served {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(read_only: bool) -> BlkBackend {
        let volume = crate::test_support::volume(8 << 20);
        let config = ExportConfig {
            num_queues: 4,
            queue_size: 256,
            read_only,
        };
        BlkBackend::new(Arc::new(volume), config, Arc::new(Gate::new(1)))
    }

    #[test]
    fn config_space_is_answered_at_exactly_the_requested_size() {
        let b = backend(false);
        for size in [57, 60, 8, 64] {
            assert_eq!(b.get_config(0, size).len(), size as usize);
        }
        let c = b.get_config(0, 60);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().expect("8")),
            (8 << 20) / 512
        );
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4, "num_queues");
        assert_eq!(c[WRITEBACK_OFFSET], 1, "writeback by default");
        assert_eq!(
            b.get_config(34, 2),
            vec![4, 0],
            "a window into the structure"
        );
        assert_eq!(
            b.get_config(100, 4),
            vec![0; 4],
            "past the structure: zeroes"
        );
    }

    #[test]
    fn config_wce_switches_writethrough_and_nothing_else_is_writable() {
        let b = backend(false);
        b.set_config(WRITEBACK_OFFSET as u32, &[0])
            .expect("writethrough");
        assert!(b.device.writethrough());
        assert_eq!(b.get_config(WRITEBACK_OFFSET as u32, 1), vec![0]);
        b.set_config(WRITEBACK_OFFSET as u32, &[1])
            .expect("writeback");
        assert!(!b.device.writethrough());
        assert!(
            b.set_config(0, &[1; 8]).is_err(),
            "capacity is not writable"
        );
        assert!(b.set_config(WRITEBACK_OFFSET as u32, &[1, 1]).is_err());
    }

    #[test]
    fn features_follow_the_export() {
        let rw = backend(false).features();
        let ro = backend(true).features();
        for f in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(rw & (1 << f), 0, "feature {f}");
        }
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(backend(false).queues_per_thread(), vec![1, 2, 4, 8]);
    }

    #[test]
    fn live_migration_is_offered_with_a_shared_dirty_log() {
        let b = backend(false);
        assert_ne!(b.features() & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD));
    }

    #[test]
    fn stop_vring_waits_for_the_request_in_progress() {
        let b = Arc::new(backend(false));
        // A queue worker in the middle of a request holds its queue's lock.
        let in_progress = b.busy[1].lock().expect("busy");
        let (tx, rx) = std::sync::mpsc::channel();
        let stopper = {
            let b = b.clone();
            std::thread::spawn(move || {
                b.stop_vring(1).expect("stop");
                tx.send(()).expect("send");
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "GET_VRING_BASE answered while a request was in progress"
        );
        drop(in_progress);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("answered once the request finished");
        stopper.join().expect("stopper");
        // Other queues are not held up by it.
        b.stop_vring(0).expect("queue 0 idle");
    }

    /// Requests of one queue in flight at once against the model: random
    /// reads, writes and flushes, all made available together; reads and
    /// (in writethrough mode) the syncs after writes run on the IO threads
    /// (the fault storage answers no read from a cache), journal reads
    /// slowed so they finish out of order.
    /// Then, optionally, a restart: the guest's rings and the inflight
    /// region are put back as a crash between two completions left them,
    /// QEMU resumes at the used index, and a new connection takes again
    /// exactly the requests that were in flight.
    mod concurrency {
        use super::*;
        use proptest::prelude::*;
        use rewind_journal::fault::{FaultOp, FaultStorage};
        use rewind_journal::Volume;
        use std::os::unix::fs::FileExt;
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
        use virtio_queue::desc::split::Descriptor;
        use virtio_queue::desc::RawDescriptor;
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Address, Bytes, GuestAddress};

        const QUEUE: u16 = 256;
        const BLOCK: usize = 4096;
        const BLOCKS: u64 = 16;
        /// Where request `i`'s header, status byte and data buffer are.
        fn header(i: usize) -> GuestAddress {
            GuestAddress(0x10_0000 + i as u64 * 0x2000)
        }
        fn status(i: usize) -> GuestAddress {
            header(i).unchecked_add(16)
        }
        fn data(i: usize) -> GuestAddress {
            header(i).unchecked_add(0x1000)
        }

        #[derive(Debug, Clone, Copy)]
        enum Op {
            Write { block: u64, fill: u8 },
            Read { block: u64 },
            Flush,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (0..BLOCKS, 1..=255u8).prop_map(|(block, fill)| Op::Write { block, fill }),
                3 => (0..BLOCKS).prop_map(|block| Op::Read { block }),
                1 => Just(Op::Flush),
            ]
        }

        /// Writes the chains of `ops` and makes them available, in order.
        fn submit(mem: &GuestMemory, q: &MockSplitQueue<'_, GuestMemory>, ops: &[Op]) {
            submit_from(mem, q, ops, 0, 0);
        }

        /// As [`submit`], for requests numbered from `first` whose chains
        /// start at descriptor `first_desc` (behind others already made
        /// available).
        fn submit_from(
            mem: &GuestMemory,
            q: &MockSplitQueue<'_, GuestMemory>,
            ops: &[Op],
            first: usize,
            first_desc: u16,
        ) {
            let mut descs = Vec::new();
            for (i, op) in (first..).zip(ops) {
                let (code, sector) = match *op {
                    Op::Write { block, fill } => {
                        mem.write_slice(&[fill; BLOCK], data(i)).expect("data");
                        (VIRTIO_BLK_T_OUT, block * 8)
                    }
                    Op::Read { block } => {
                        mem.write_slice(&[0xee; BLOCK], data(i)).expect("poison");
                        (VIRTIO_BLK_T_IN, block * 8)
                    }
                    Op::Flush => (VIRTIO_BLK_T_FLUSH, 0),
                };
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&code.to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&h, header(i)).expect("header");
                mem.write_obj(0xffu8, status(i)).expect("status");
                let at = first_desc + descs.len() as u16;
                let next = VRING_DESC_F_NEXT as u16;
                descs.push(Descriptor::new(header(i).0, 16, next, at + 1));
                match op {
                    Op::Write { .. } => {
                        descs.push(Descriptor::new(data(i).0, BLOCK as u32, next, at + 2))
                    }
                    Op::Read { .. } => descs.push(Descriptor::new(
                        data(i).0,
                        BLOCK as u32,
                        next | VRING_DESC_F_WRITE as u16,
                        at + 2,
                    )),
                    Op::Flush => {}
                }
                descs.push(Descriptor::new(
                    status(i).0,
                    1,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ));
            }
            let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
            q.add_desc_chains(&raw, first_desc).expect("chains");
        }

        fn used_idx(mem: &GuestMemory, q: &MockSplitQueue<'_, GuestMemory>) -> u16 {
            mem.read_obj(q.used_addr().unchecked_add(2))
                .expect("used idx")
        }

        /// The requests (indices into `ops`) the used ring's entries
        /// `from..to` name, each once, each with a status byte of OK.
        fn used_requests(
            mem: &GuestMemory,
            q: &MockSplitQueue<'_, GuestMemory>,
            heads: &[u16],
            from: u16,
            to: u16,
        ) -> Result<Vec<usize>, TestCaseError> {
            let mut requests = Vec::new();
            for k in from..to {
                let entry = q.used_addr().unchecked_add(4 + 8 * u64::from(k % QUEUE));
                let id: u32 = mem.read_obj(entry).expect("used id");
                let i = heads.iter().position(|&h| u32::from(h) == id);
                prop_assert!(i.is_some(), "used entry {} names no chain: {}", k, id);
                let i = i.unwrap_or_default();
                prop_assert!(!requests.contains(&i), "request {} used twice", i);
                let st: u8 = mem.read_obj(status(i)).expect("status");
                prop_assert_eq!(st, 0, "request {} failed", i);
                requests.push(i);
            }
            Ok(requests)
        }

        /// What a read at `i` may return for its block: the block as the
        /// writes before it left it, or what any write after it (which
        /// may run first) or run again after a restart (`rerun`) put there.
        fn allowed(ops: &[Op], i: usize, block: u64, rerun: &[usize]) -> Vec<u8> {
            let fill_of = |op: &Op| match *op {
                Op::Write { block: b, fill } if b == block => Some(fill),
                _ => None,
            };
            let before = ops[..i].iter().rev().find_map(fill_of);
            let after = ops[i..].iter().filter_map(fill_of);
            let again = rerun.iter().filter_map(|&j| fill_of(&ops[j]));
            std::iter::once(before.unwrap_or(0))
                .chain(after)
                .chain(again)
                .collect()
        }

        /// Checks the reads among `requests` against the model.
        fn check_reads(
            mem: &GuestMemory,
            ops: &[Op],
            requests: &[usize],
            rerun: &[usize],
        ) -> Result<(), TestCaseError> {
            for &i in requests {
                if let Op::Read { block } = ops[i] {
                    let mut buf = [0u8; BLOCK];
                    mem.read_slice(&mut buf, data(i)).expect("read data");
                    let fill = buf[0];
                    prop_assert!(buf.iter().all(|&b| b == fill), "read {} is torn", i);
                    let allowed = allowed(ops, i, block, rerun);
                    prop_assert!(
                        allowed.contains(&fill),
                        "read {} of block {} saw {:#x}, not one of {:?}",
                        i,
                        block,
                        fill,
                        allowed
                    );
                }
            }
            Ok(())
        }

        /// A connection to `device`, with the inflight region `region`
        /// (made by this connection if None, as QEMU asks for it the first
        /// time).
        fn connect<D: BlockDevice + 'static>(
            device: &Arc<D>,
            mem: &GuestMemoryAtomic<GuestMemory>,
            region: Option<&(VhostUserInflight, File)>,
        ) -> (BlkBackend, (VhostUserInflight, File)) {
            let config = ExportConfig {
                num_queues: 1,
                queue_size: QUEUE as usize,
                read_only: false,
            };
            let b = BlkBackend::new(device.clone(), config, Arc::new(Gate::new(1)));
            b.update_memory(mem.clone()).expect("memory");
            let (inflight, file) = match region {
                Some((inflight, file)) => (*inflight, file.try_clone().expect("clone")),
                None => {
                    let ask = VhostUserInflight {
                        num_queues: 1,
                        queue_size: QUEUE,
                        ..Default::default()
                    };
                    b.get_inflight_fd(&ask).expect("GET_INFLIGHT_FD")
                }
            };
            b.set_inflight_fd(&inflight, file.try_clone().expect("clone"))
                .expect("SET_INFLIGHT_FD");
            b.admit(1);
            (b, (inflight, file))
        }

        /// Where the volume's files are, and so which path its reads take.
        #[derive(Debug, Clone, Copy)]
        enum Files {
            /// In memory, journal reads slowed: the IO threads.
            Slowed,
            /// In files evicted from the page cache: the queue's ring, its
            /// reads cold.
            Cold,
        }

        /// A volume in `dir` whose every block is durable, filled with
        /// `fill(block)` (zeroes: what the model starts from), opened again
        /// (so that no page of its segments is mapped here: the writes
        /// stored into them, and fadvise cannot evict mapped pages), its
        /// files dropped from the page cache.
        fn cold_volume(dir: &std::path::Path, fill: impl Fn(u64) -> u8) -> Volume {
            let volume = crate::test_support::os_volume(dir, BLOCKS * BLOCK as u64);
            for block in 0..BLOCKS {
                volume
                    .write(block * BLOCK as u64, &[fill(block); BLOCK])
                    .expect("write");
            }
            volume.flush().expect("flush");
            volume.close().expect("close");
            let volume = crate::test_support::open_os_volume(dir);
            drop_cache(dir);
            volume
        }

        /// Drops every file under `dir` from the page cache.
        fn drop_cache(dir: &std::path::Path) {
            let mut dirs = vec![dir.to_path_buf()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir).expect("read dir") {
                    let path = entry.expect("entry").path();
                    if path.is_dir() {
                        dirs.push(path);
                        continue;
                    }
                    let file = std::fs::File::open(&path).expect("open");
                    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
                        .expect("fadvise");
                }
            }
        }

        /// A volume of `BLOCKS` blocks on `fs`.
        fn volume_on(fs: &FaultStorage) -> Volume {
            crate::test_support::volume_on(
                fs,
                BLOCKS * BLOCK as u64,
                rewind_journal::OpenOptions::default(),
            )
        }

        /// Another queue's write of `fill` to block 0, which stalls `stall`
        /// in the storage once its record is placed (the first segment's
        /// writes are slowed until it is inside, then the faults cleared).
        fn stalled_write(
            fs: &FaultStorage,
            volume: &Arc<Volume>,
            fill: u8,
            stall: std::time::Duration,
        ) -> std::thread::JoinHandle<rewind_journal::Result<u64>> {
            fs.slow_down(FaultOp::Write, "00000000.seg", stall);
            let other = {
                let volume = volume.clone();
                std::thread::spawn(move || volume.write(0, &[fill; BLOCK]))
            };
            fs.wait_stalled("the other queue's write");
            fs.clear_faults();
            other
        }

        /// Runs `ops` on one queue against the model. With `behind` (and
        /// `Files::Slowed`), another queue's write of zeroes to block 0 (what
        /// the model starts from) is placed first and stalls 20 ms in the
        /// storage, so the queue's writes are recorded behind it.
        fn run(
            ops: Vec<Op>,
            restart: bool,
            writethrough: bool,
            files: Files,
            behind: bool,
        ) -> Result<(), TestCaseError> {
            let dir = tempfile::tempdir().expect("tempdir");
            let fs = FaultStorage::new();
            let slow_reads =
                || fs.slow_down(FaultOp::Read, ".seg", std::time::Duration::from_micros(300));
            let volume = Arc::new(match files {
                Files::Slowed => {
                    slow_reads();
                    volume_on(&fs)
                }
                Files::Cold => cold_volume(dir.path(), |_| 0),
            });
            volume.set_writethrough(writethrough);
            let other = (behind && matches!(files, Files::Slowed)).then(|| {
                let other = stalled_write(&fs, &volume, 0, std::time::Duration::from_millis(20));
                // The faults were cleared: the reads slowed again.
                slow_reads();
                other
            });
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (q, mem, vring) = queue_of(&guest, &ops);
            let heads: Vec<u16> = (0..ops.len())
                .scan(0u16, |next, i| {
                    let head = *next;
                    *next += if matches!(ops[i], Op::Flush) { 2 } else { 3 };
                    Some(head)
                })
                .collect();
            let all: Vec<usize> = (0..ops.len()).collect();

            let (first, region) = connect(&volume, &mem, None);
            if matches!(files, Files::Cold) {
                prop_assert!(first.ring_event(0).is_some(), "no io_uring here");
            }
            prop_assert!(first.process(0, &vring).expect("process"));
            // What a crash now, between two completions, would leave.
            let (seen, left) = first.inflight[0].between_completions(|| {
                let mut left = vec![0u8; region.0.mmap_size as usize];
                region.1.read_exact_at(&mut left, 0).expect("region");
                (used_idx(&guest, &q), left)
            });
            let done = used_requests(&guest, &q, &heads, 0, seen)?;
            first.stop_vring(0).expect("stop");
            let n = ops.len() as u16;
            prop_assert_eq!(
                used_idx(&guest, &q),
                n,
                "GET_VRING_BASE answered with requests in flight"
            );
            used_requests(&guest, &q, &heads, 0, n)?;
            check_reads(&guest, &ops, &all, &[])?;
            if let Some(other) = other {
                other
                    .join()
                    .expect("other queue's thread")
                    .expect("its write");
            }

            let mut rerun = Vec::new();
            if restart {
                // The guest's view at the crash: the used index and the
                // status bytes and buffers of what was not done yet.
                guest
                    .write_obj(seen, q.used_addr().unchecked_add(2))
                    .expect("used idx");
                rerun = all.iter().copied().filter(|i| !done.contains(i)).collect();
                for &i in &rerun {
                    guest.write_obj(0xffu8, status(i)).expect("status");
                    if matches!(ops[i], Op::Read { .. }) {
                        guest.write_slice(&[0xee; BLOCK], data(i)).expect("poison");
                    }
                }
                region.1.write_all_at(&left, 0).expect("region");
                // QEMU resumes at the used index; the region says the rest.
                vring.set_queue_next_avail(seen);
                vring.set_queue_next_used(seen);
                let (second, _) = connect(&volume, &mem, Some(&region));
                prop_assert!(second.process(0, &vring).expect("process"));
                second.stop_vring(0).expect("stop");
                prop_assert_eq!(used_idx(&guest, &q), n, "not every request ran again");
                let mut again = used_requests(&guest, &q, &heads, seen, n)?;
                again.sort_unstable();
                prop_assert_eq!(
                    &again,
                    &rerun,
                    "other requests than those in flight ran again"
                );
                prop_assert_eq!(vring.queue_next_avail(), n);
                check_reads(&guest, &ops, &rerun, &rerun)?;
            }
            for block in 0..BLOCKS {
                let mut buf = [0u8; BLOCK];
                volume
                    .read(block * BLOCK as u64, &mut buf)
                    .expect("read back");
                let allowed = allowed(&ops, ops.len(), block, &rerun);
                prop_assert!(
                    allowed.contains(&buf[0]) && buf.iter().all(|&b| b == buf[0]),
                    "block {} holds {:#x}, not one of {:?}",
                    block,
                    buf[0],
                    allowed
                );
            }
            Ok(())
        }

        /// A virtqueue over `guest` holding the chains of `ops`, ready.
        fn queue_of<'a>(
            guest: &'a GuestMemory,
            ops: &[Op],
        ) -> (
            MockSplitQueue<'a, GuestMemory>,
            GuestMemoryAtomic<GuestMemory>,
            Vring,
        ) {
            let q = MockSplitQueue::create(guest, GuestAddress(0), QUEUE);
            submit(guest, &q, ops);
            let mem = GuestMemoryAtomic::new(guest.clone());
            let vring = Vring::new(mem.clone(), QUEUE).expect("vring");
            vring
                .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
                .expect("queue info");
            vring.set_queue_size(QUEUE);
            vring.set_queue_ready(true);
            (q, mem, vring)
        }

        /// A client admitted while its queue's worker parks: `process`
        /// reads the connection's epoch (0 until admitted) first; if the
        /// export admits the client and wakes the parked queues
        /// (`Gate::wake_parked`) after that reading but before this queue
        /// parks, the queue must still serve, not park at the stale epoch
        /// with nothing left to kick it. The queue's `busy` lock holds the
        /// worker between its reading and its park.
        #[test]
        fn a_client_admitted_while_its_queue_parks_is_served() {
            let volume = Arc::new(crate::test_support::volume(BLOCKS * BLOCK as u64));
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (q, mem, vring) = queue_of(&guest, &[Op::Write { block: 1, fill: 1 }]);
            let config = ExportConfig {
                num_queues: 1,
                queue_size: QUEUE as usize,
                read_only: false,
            };
            let gate = Arc::new(Gate::new(1));
            let b = Arc::new(BlkBackend::new(volume.clone(), config, gate.clone()));
            b.update_memory(mem.clone()).expect("memory");
            // The guest kicked: the worker starts `process` before admission.
            let busy = b.busy[0].lock().expect("busy");
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let worker = {
                let (b, vring) = (b.clone(), vring.clone());
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tid_tx.send(unsafe { libc::gettid() }).expect("tid");
                    b.process(0, &vring)
                })
            };
            // Its epoch read, it sleeps on the `busy` lock (nothing else
            // on its way there waits).
            let tid = tid_rx.recv().expect("tid");
            let stat = format!("/proc/self/task/{tid}/stat");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !std::fs::read_to_string(&stat)
                .expect("the worker's stat")
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the worker never waited"
                );
                std::thread::yield_now();
            }
            // What `Export::accept_loop` does once the client is identified.
            b.admit(1);
            gate.wake_parked();
            drop(busy);
            let served = worker.join().expect("worker").expect("process");
            assert!(served, "the worker went on taking requests");
            assert_eq!(used_idx(&guest, &q), 1, "the write was served");
            assert_eq!(volume.last_lsn(), 1);
        }

        #[test]
        fn a_cold_read_goes_around_the_page_cache_and_a_cached_one_comes_from_it() {
            let dir = tempfile::tempdir().expect("tempdir");
            let volume = Arc::new(cold_volume(dir.path(), |b| if b == 3 { 0x5a } else { 0 }));
            let plan = volume
                .plan_read(3 * BLOCK as u64, BLOCK as u64)
                .expect("plan")
                .expect("files");
            let [piece] = plan.reads() else {
                panic!("one file read: {:?}", plan.reads());
            };
            assert!(
                piece.direct_fd.is_some() && piece.offset % BLOCK as u64 == 0,
                "an aligned file read with an O_DIRECT descriptor: {piece:?}"
            );
            let cached = || {
                rewind_journal::page_cache_holds(piece.fd, piece.offset, BLOCK as u64)
                    .expect("cachestat (Linux 6.5)")
            };
            for warm in [false, true] {
                assert_eq!(cached(), warm);
                let guest =
                    GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
                let (q, mem, vring) = queue_of(&guest, &[Op::Read { block: 3 }]);
                let (b, _) = connect(&volume, &mem, None);
                assert!(b.process(0, &vring).expect("process"));
                b.stop_vring(0).expect("stop");
                used_requests(&guest, &q, &[0], 0, 1).expect("done");
                let mut got = [0u8; BLOCK];
                guest.read_slice(&mut got, data(0)).expect("data");
                assert!(got.iter().all(|&b| b == 0x5a), "read the block's data");
                // O_DIRECT left the page cache as it was; then warm it.
                assert_eq!(cached(), warm, "the read went through the page cache");
                let mut buf = [0u8; BLOCK];
                volume.read(3 * BLOCK as u64, &mut buf).expect("read");
                assert!(cached());
            }
        }

        /// A head the guest puts in the available ring that no used entry
        /// could name stops the queue (it ended the queue's thread, with
        /// the error); nothing after it is taken until the driver resets.
        #[test]
        fn a_head_outside_the_queue_stops_the_queue_and_its_thread_lives() {
            let volume = Arc::new(crate::test_support::volume(BLOCKS * BLOCK as u64));
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let ops = [
                Op::Write { block: 1, fill: 1 },
                Op::Write { block: 2, fill: 2 },
            ];
            let (q, mem, vring) = queue_of(&guest, &ops);
            let first_entry = q.avail_addr().unchecked_add(4);
            guest.write_obj(QUEUE + 44, first_entry).expect("bad head");
            let (b, _) = connect(&volume, &mem, None);
            let served = b.process(0, &vring).expect("no error ends the thread");
            assert!(!served, "stopped: the caller must not look for more");
            assert!(!vring.get_ref().get_queue().ready(), "the queue is stopped");
            let used: u16 = guest
                .read_obj(q.used_addr().unchecked_add(2))
                .expect("used idx");
            assert_eq!(used, 0, "nothing used");
            assert_eq!(volume.last_lsn(), 0, "nothing after the bad head ran");
            assert!(
                !b.process(0, &vring).expect("kicked again"),
                "still stopped"
            );
        }

        /// A kick that finds the queue stopped (GET_VRING_BASE) with
        /// requests still in its ring must not be told to look for more:
        /// the event loop would spin on them (a CI run hung so).
        #[test]
        fn a_stopped_queue_with_requests_left_reports_nothing_served() {
            let volume = Arc::new(crate::test_support::volume(BLOCKS * BLOCK as u64));
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (_q, mem, vring) = queue_of(&guest, &[Op::Write { block: 1, fill: 1 }]);
            let (b, _) = connect(&volume, &mem, None);
            vring.set_queue_ready(false);
            assert!(!b.process(0, &vring).expect("process"), "nothing served");
            assert!(
                vring.enable_notification().expect("notification"),
                "the request is still in the ring"
            );
        }

        #[test]
        fn get_vring_base_refuses_while_requests_of_a_restart_wait_behind_a_closed_gate() {
            let volume = Arc::new(crate::test_support::volume(BLOCKS * BLOCK as u64));
            let ops = [
                Op::Write { block: 1, fill: 1 },
                Op::Write { block: 2, fill: 2 },
            ];
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (_q, mem, vring) = queue_of(&guest, &ops);
            let (first, region) = connect(&volume, &mem, None);
            // The first daemon took both and died before completing them.
            assert!(first.inflight[0].restore(&vring, &guest).expect("restore"));
            drop([first.inflight[0].take(0), first.inflight[0].take(3)]);
            vring.set_queue_next_avail(0);
            let (second, _) = connect(&volume, &mem, Some(&region));
            // A client the gate does not let through (fenced).
            second.admit(2);
            assert!(!second.process(0, &vring).expect("process"), "parked");
            let err = second.stop_vring(0).expect_err("GET_VRING_BASE refused");
            assert!(
                err.to_string().contains("2 requests from before a restart"),
                "{err}"
            );
        }

        #[test]
        fn a_flush_holds_back_no_write_taken_after_it() {
            let fs = FaultStorage::new();
            let volume = Arc::new(volume_on(&fs));
            fs.slow_down(FaultOp::Sync, "", std::time::Duration::from_secs(1));
            let ops = [
                Op::Write { block: 1, fill: 1 },
                Op::Flush,
                Op::Write { block: 2, fill: 2 },
            ];
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (q, mem, vring) = queue_of(&guest, &ops);
            let (b, _) = connect(&volume, &mem, None);
            assert!(b.process(0, &vring).expect("process"));
            b.stop_vring(0).expect("stop");
            // Chains start at descriptors 0, 3 (the flush) and 5.
            let done = used_requests(&guest, &q, &[0, 3, 5], 0, 3).expect("all complete");
            assert_eq!(
                done,
                [0, 2, 1],
                "the write behind the flush completed first"
            );
        }

        /// A volume whose syncs (`BlockDevice::flush` calls) each wait
        /// until the test lets them go; sync number `fail` (from 1) then
        /// fails.
        #[derive(Debug)]
        struct HeldSyncs {
            volume: Arc<Volume>,
            /// Syncs started, syncs let go.
            counts: Mutex<(usize, usize)>,
            changed: std::sync::Condvar,
            fail: Option<usize>,
        }

        const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

        impl HeldSyncs {
            fn new(volume: Arc<Volume>, fail: Option<usize>) -> Self {
                HeldSyncs {
                    volume,
                    counts: Mutex::new((0, 0)),
                    changed: std::sync::Condvar::new(),
                    fail,
                }
            }

            fn counts(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
                self.counts.lock().expect("counts")
            }

            /// Waits (at most `HOLD_LIMIT`) until `n` syncs have started.
            fn wait_started(&self, n: usize) {
                let (counts, timeout) = self
                    .changed
                    .wait_timeout_while(self.counts(), HOLD_LIMIT, |c| c.0 < n)
                    .expect("counts");
                assert!(!timeout.timed_out(), "{} syncs started, not {n}", counts.0);
            }

            fn started(&self) -> usize {
                self.counts().0
            }

            /// Lets the first `n` syncs go.
            fn release(&self, n: usize) {
                self.counts().1 = n;
                self.changed.notify_all();
            }
        }

        impl BlockDevice for HeldSyncs {
            fn size(&self) -> u64 {
                BlockDevice::size(self.volume.as_ref())
            }
            fn block_size(&self) -> u32 {
                BlockDevice::block_size(self.volume.as_ref())
            }
            fn uuid(&self) -> String {
                BlockDevice::uuid(self.volume.as_ref())
            }
            fn read(&self, offset: u64, buf: &mut [u8]) -> rewind_journal::Result<()> {
                BlockDevice::read(self.volume.as_ref(), offset, buf)
            }
            fn write(&self, offset: u64, data: &[u8]) -> rewind_journal::Result<()> {
                BlockDevice::write(self.volume.as_ref(), offset, data)
            }
            fn write_zeroes(
                &self,
                offset: u64,
                length: u64,
                unmap: bool,
            ) -> rewind_journal::Result<()> {
                BlockDevice::write_zeroes(self.volume.as_ref(), offset, length, unmap)
            }
            fn discard(&self, offset: u64, length: u64) -> rewind_journal::Result<()> {
                BlockDevice::discard(self.volume.as_ref(), offset, length)
            }
            fn flush(&self) -> rewind_journal::Result<()> {
                let mut counts = self.counts();
                counts.0 += 1;
                let this = counts.0;
                self.changed.notify_all();
                let (_counts, timeout) = self
                    .changed
                    .wait_timeout_while(counts, HOLD_LIMIT, |c| c.1 < this)
                    .expect("counts");
                if timeout.timed_out() || self.fail == Some(this) {
                    return Err(rewind_journal::Error::Failed(format!("sync {this} failed")));
                }
                BlockDevice::flush(self.volume.as_ref())
            }
            fn writethrough(&self) -> bool {
                BlockDevice::writethrough(self.volume.as_ref())
            }
            fn set_writethrough(&self, on: bool) {
                BlockDevice::set_writethrough(self.volume.as_ref(), on)
            }
        }

        /// A connection to a volume whose syncs are held (sync number
        /// `fail` fails), after it took a write and a flush from `guest`'s
        /// queue (descriptors 0-4) and the flush's sync began.
        fn first_sync_held(
            guest: &GuestMemory,
            fail: Option<usize>,
        ) -> (
            Arc<HeldSyncs>,
            MockSplitQueue<'_, GuestMemory>,
            Vring,
            BlkBackend,
        ) {
            let volume = Arc::new(crate::test_support::volume(BLOCKS * BLOCK as u64));
            let device = Arc::new(HeldSyncs::new(volume, fail));
            let (q, mem, vring) = queue_of(guest, &[Op::Write { block: 1, fill: 1 }, Op::Flush]);
            let (b, _) = connect(&device, &mem, None);
            assert!(b.process(0, &vring).expect("process"));
            device.wait_started(1);
            (device, q, vring, b)
        }

        /// A flush taken while a sync runs is not completed by it (that
        /// sync may have passed the writes before the flush) but by the
        /// next one, which every flush taken meanwhile shares: one sync of
        /// the device, not one each.
        #[test]
        fn flushes_taken_while_a_sync_runs_share_the_next_one() {
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (device, q, vring, b) = first_sync_held(&guest, None);
            let then = [
                Op::Write { block: 2, fill: 2 },
                Op::Flush,
                Op::Flush,
                Op::Write { block: 3, fill: 3 },
                Op::Flush,
            ];
            submit_from(&guest, &q, &then, 2, 5);
            assert!(b.process(0, &vring).expect("process"));
            let heads = [0, 3, 5, 8, 10, 12, 15];
            let done =
                used_requests(&guest, &q, &heads, 0, used_idx(&guest, &q)).expect("completed");
            assert_eq!(done, [0, 2, 5], "only the writes are done");
            assert_eq!(device.started(), 1, "a second sync began beside the first");
            device.release(1);
            device.wait_started(2);
            assert_eq!(
                used_requests(&guest, &q, &heads, 3, used_idx(&guest, &q)).expect("completed"),
                [1],
                "the first sync completed what was taken after it began"
            );
            device.release(2);
            b.stop_vring(0).expect("stop");
            let mut done = used_requests(&guest, &q, &heads, 0, 7).expect("all complete");
            done.sort_unstable();
            assert_eq!(done, [0, 1, 2, 3, 4, 5, 6]);
            assert_eq!(device.started(), 2, "the three flushes shared one sync");
        }

        /// Every flush that shared a failed sync fails, and only those: not
        /// the one the sync before completed, nor one taken after.
        #[test]
        fn a_failed_sync_fails_every_flush_that_shared_it() {
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (device, q, vring, b) = first_sync_held(&guest, Some(2));
            // These two share sync 2.
            submit_from(&guest, &q, &[Op::Flush, Op::Flush], 2, 5);
            assert!(b.process(0, &vring).expect("process"));
            device.release(2);
            device.wait_started(2);
            // Waits for every request taken to complete.
            b.stop_vring(0).expect("stop");
            assert_eq!(used_idx(&guest, &q), 4);
            // Then one more, after the failed sync.
            submit_from(
                &guest,
                &q,
                &[Op::Write { block: 2, fill: 2 }, Op::Flush],
                4,
                9,
            );
            device.release(3);
            assert!(b.process(0, &vring).expect("process"));
            b.stop_vring(0).expect("stop");
            assert_eq!(used_idx(&guest, &q), 6);
            let statuses: Vec<u8> = (0..6)
                .map(|i| guest.read_obj(status(i)).expect("status"))
                .collect();
            assert_eq!(
                statuses,
                [0, 0, 1, 1, 0, 0],
                "VIRTIO_BLK_S_IOERR for the two flushes of sync 2"
            );
            assert_eq!(device.started(), 3);
        }

        /// Writes recorded behind another queue's record still being
        /// written do not hold their queue's thread: it returns with them
        /// pending, and they complete once that record is written.
        #[test]
        fn writes_behind_another_queues_record_wait_off_their_queues_thread() {
            let fs = FaultStorage::new();
            let volume = Arc::new(volume_on(&fs));
            let ops = [
                Op::Write { block: 1, fill: 1 },
                Op::Write { block: 2, fill: 2 },
            ];
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (q, mem, vring) = queue_of(&guest, &ops);
            let (b, _) = connect(&volume, &mem, None);
            let other = stalled_write(&fs, &volume, 7, std::time::Duration::from_secs(1));
            assert!(b.process(0, &vring).expect("process"));
            assert_eq!(
                used_idx(&guest, &q),
                0,
                "completed while the record before them was unwritten"
            );
            other
                .join()
                .expect("other queue's thread")
                .expect("its write");
            b.stop_vring(0).expect("stop");
            let done = used_requests(&guest, &q, &[0, 3], 0, 2).expect("both complete");
            assert_eq!(done, [0, 1]);
            for (block, fill) in [(0, 7), (1, 1), (2, 2)] {
                let mut got = [0u8; BLOCK];
                volume.read(block * BLOCK as u64, &mut got).expect("read");
                assert!(got.iter().all(|&b| b == fill), "block {block}");
            }
        }

        #[test]
        fn a_read_the_ring_cannot_finish_runs_again_and_fails_cleanly() {
            let dir = tempfile::tempdir().expect("tempdir");
            let volume = Arc::new(crate::test_support::os_volume(
                dir.path(),
                BLOCKS * BLOCK as u64,
            ));
            // base.img is cut short under the open volume: the ring's read
            // comes back short, the read that runs again fails.
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join("base.img"))
                .and_then(|f| f.set_len(0))
                .expect("truncate base.img");
            let guest = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
            let (q, mem, vring) = queue_of(&guest, &[Op::Read { block: 3 }]);
            let (b, _) = connect(&volume, &mem, None);
            assert!(b.ring_event(0).is_some(), "no io_uring here");
            assert!(b.process(0, &vring).expect("process"));
            b.stop_vring(0).expect("stop");
            assert_eq!(used_idx(&guest, &q), 1, "completed");
            let st: u8 = guest.read_obj(status(0)).expect("status");
            assert_eq!(st, request::Status::IoErr as u8);
        }

        #[test]
        fn the_end_of_a_connection_waits_for_a_queue_still_taking_reads() {
            // Cold reads, so some are in the ring when the connection ends;
            // the stop comes at varying points of the worker's batch.
            for attempt in 0..10u64 {
                let dir = tempfile::tempdir().expect("tempdir");
                let volume = Arc::new(cold_volume(dir.path(), |_| 0));
                let guest =
                    GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
                let ops: Vec<Op> = (0..80).map(|i| Op::Read { block: i % BLOCKS }).collect();
                let (q, mem, vring) = queue_of(&guest, &ops);
                let b = Arc::new(connect(&volume, &mem, None).0);
                let worker = {
                    let (b, vring) = (b.clone(), vring.clone());
                    std::thread::spawn(move || b.process(0, &vring).expect("process"))
                };
                std::thread::sleep(std::time::Duration::from_micros(100 * attempt));
                let (tx, rx) = std::sync::mpsc::channel();
                let stopper = {
                    let b = b.clone();
                    std::thread::spawn(move || {
                        b.stop_workers();
                        tx.send(()).expect("send");
                    })
                };
                worker.join().expect("worker");
                rx.recv_timeout(std::time::Duration::from_secs(30))
                    .unwrap_or_else(|_| {
                        panic!(
                            "attempt {attempt}: the stop still waits; used index {} of 80",
                            used_idx(&guest, &q)
                        )
                    });
                stopper.join().expect("stopper");
                // Whatever was taken is complete, once.
                let seen = used_idx(&guest, &q);
                let heads: Vec<u16> = (0..80).map(|i| i * 3).collect();
                used_requests(&guest, &q, &heads, 0, seen).expect("complete");
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn requests_in_flight_match_the_model_and_a_restart_takes_again_those_in_flight(
                ops in proptest::collection::vec(op(), 1..80),
                restart in any::<bool>(),
                writethrough in any::<bool>(),
                cold in any::<bool>(),
                behind in any::<bool>(),
            ) {
                let files = if cold { Files::Cold } else { Files::Slowed };
                run(ops, restart, writethrough, files, behind)?;
            }
        }
    }
}
