//! virtio-blk requests (virtio 1.2, 5.2.6): a descriptor chain from an
//! untrusted guest, checked and run on a volume.
//!
//! A request is a 16-byte header (type, reserved, sector), its data
//! (device-writable for reads, device-readable for writes), and a status
//! byte at its end. The device sees them as bytes: the device-readable ones
//! first, then the device-writable ones, split among descriptors however
//! the driver likes (virtio 1.2, 2.7.4; VERSION_1 implies any layout), so a
//! header may share its descriptor with data and the status is the last
//! writable byte. Every field is checked before it is used, sector
//! arithmetic is checked, every data buffer is checked to lie in guest
//! memory before anything is allocated for it or the volume is touched,
//! and a request that fails a check gets an error status, never an effect
//! outside its own buffers. A large request runs a piece at a time
//! ([`PIECE`]), so what a guest asks for does not size the daemon's memory.

use crate::device::BlockDevice;
use rewind_journal::{PayloadBuffer, LARGE_PAYLOAD};
use std::sync::{Arc, Mutex, PoisonError};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

pub const SECTOR: u64 = 512;
const HEADER_LEN: usize = 16;
/// Most data buffers one request may have: the device offers it as
/// `seg_max`, and a chain with more gets an error status.
pub const SEG_MAX: u32 = 254;
/// The most data bytes of a request the daemon holds in memory at once:
/// a larger read or write runs in pieces of this size (a chain may
/// describe up to 4 GiB, overlapping buffers included).
const PIECE: u64 = 4 << 20;
const SEGMENT_LEN: u64 = 16;
/// Most segments one discard or write-zeroes request may carry.
pub const MAX_SEGMENTS: u64 = 32;

/// The status byte a request completes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

impl Kind {
    fn from_code(code: u32) -> Option<Kind> {
        match code {
            VIRTIO_BLK_T_IN => Some(Kind::In),
            VIRTIO_BLK_T_OUT => Some(Kind::Out),
            VIRTIO_BLK_T_FLUSH => Some(Kind::Flush),
            VIRTIO_BLK_T_GET_ID => Some(Kind::GetId),
            VIRTIO_BLK_T_DISCARD => Some(Kind::Discard),
            VIRTIO_BLK_T_WRITE_ZEROES => Some(Kind::WriteZeroes),
            _ => None,
        }
    }

    /// Every kind, in the order of [`Kind::index`].
    pub const ALL: [Kind; 6] = [
        Kind::In,
        Kind::Out,
        Kind::Flush,
        Kind::GetId,
        Kind::Discard,
        Kind::WriteZeroes,
    ];

    /// Its position in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `op` label of the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::In => "read",
            Kind::Out => "write",
            Kind::Flush => "flush",
            Kind::GetId => "get_id",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether the device writes the request's data buffers.
    fn device_writes(self) -> bool {
        matches!(self, Kind::In | Kind::GetId)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the request has fewer than {HEADER_LEN} device-readable bytes for its header")]
    BadHeader,
    #[error("a device-readable descriptor follows a device-writable one")]
    Layout,
    #[error("the request has more than {SEG_MAX} data buffers")]
    TooManyBuffers,
    #[error("the request's data buffers add up to 4 GiB or more")]
    TooLarge,
    #[error("cannot access guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("{0:?} request with data buffers of the wrong direction")]
    Direction(Kind),
    #[error("{0} bytes of data is not whole sectors")]
    Unaligned(u64),
    #[error("sectors {sector}+{sectors} are not inside the disk's {disk} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        disk: u64,
    },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("discard/write-zeroes data of {0} bytes is not 1 to {MAX_SEGMENTS} segments")]
    Segments(u64),
    #[error("segment flags {0:#x} are not supported for this request")]
    Flags(u32),
    #[error("{0}")]
    Volume(#[from] rewind_journal::Error),
    /// A sync shared by several requests failed (syncs.rs).
    #[error("{0}")]
    Sync(Arc<rewind_journal::Error>),
}

impl RequestError {
    pub fn status(&self) -> Status {
        match self {
            RequestError::Unsupported(_) | RequestError::Flags(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// What a request runs against.
#[derive(Debug)]
pub struct Disk<'a> {
    pub device: &'a dyn BlockDevice,
    pub read_only: bool,
    /// GET_ID's answer (the volume id, NUL-padded).
    pub id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl Disk<'_> {
    fn sectors(&self) -> u64 {
        self.device.size() / SECTOR
    }

    /// Byte offset of `sectors` sectors at `sector`, if they are on the disk.
    fn range(&self, sector: u64, sectors: u64) -> Result<u64, RequestError> {
        let disk = self.sectors();
        match sector.checked_add(sectors) {
            Some(end) if end <= disk => Ok(sector * SECTOR),
            _ => Err(RequestError::OutOfRange {
                sector,
                sectors,
                disk,
            }),
        }
    }
}

/// A request whose header and buffer directions are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    /// Data buffers, in order.
    pub data: Vec<(GuestAddress, u32)>,
}

/// Payload buffers kept for the next writes: as many as ran at once, up to
/// `KEPT_BUFFERS`, none larger than `KEPT_BUFFER_BYTES`.
static PAYLOAD_BUFFERS: Mutex<Vec<PayloadBuffer>> = Mutex::new(Vec::new());
const KEPT_BUFFERS: usize = 16;
/// A [`PIECE`] with its alignment and the room for its header
/// (`PayloadBuffer`).
const KEPT_BUFFER_BYTES: usize = PIECE as usize + (8 << 10);

/// Runs `f` with a payload buffer: a write gathered into one is sent to
/// the journal with no second copy and no zeroing first.
fn with_payload_buffer<T>(f: impl FnOnce(&mut PayloadBuffer) -> T) -> T {
    let kept = || {
        PAYLOAD_BUFFERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    };
    let mut buf = kept().pop().unwrap_or_default();
    let out = f(&mut buf);
    let mut kept = kept();
    if kept.len() < KEPT_BUFFERS && buf.capacity() <= KEPT_BUFFER_BYTES {
        kept.push(buf);
    }
    out
}

impl Request {
    /// Parses a chain whose last descriptor is device-writable and holds
    /// the status byte at its end ([`status_byte`]).
    pub fn parse<M: GuestMemory>(mem: &M, chain: &[Descriptor]) -> Result<Request, RequestError> {
        let mut header = [0u8; HEADER_LEN];
        let mut have = 0;
        // Data buffers, the device-readable ones (after the header) first.
        let mut data = Vec::with_capacity(chain.len());
        let (mut readable, mut writable) = (0, 0);
        let last = chain.len().saturating_sub(1);
        for (i, d) in chain.iter().enumerate() {
            let (mut addr, mut len) = (d.addr(), d.len());
            if i == last {
                len = len.saturating_sub(1); // the status byte
            }
            if d.is_write_only() {
                writable += 1;
            } else if writable > 0 {
                return Err(RequestError::Layout);
            } else if have < HEADER_LEN {
                let n = (HEADER_LEN - have).min(len as usize);
                mem.read_slice(&mut header[have..have + n], addr)?;
                have += n;
                addr = addr
                    .checked_add(n as u64)
                    .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
                len -= n as u32;
            }
            if len > 0 {
                readable += usize::from(!d.is_write_only());
                data.push((addr, len));
            }
        }
        if have < HEADER_LEN {
            return Err(RequestError::BadHeader);
        }
        let code = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let kind = Kind::from_code(code).ok_or(RequestError::Unsupported(code))?;
        let wrong_way = if kind.device_writes() {
            readable > 0
        } else {
            readable < data.len()
        };
        match kind {
            // A flush has no data; buffers it carries are left alone.
            Kind::Flush => data.clear(),
            _ if wrong_way => return Err(RequestError::Direction(kind)),
            _ => {}
        }
        if data.len() > SEG_MAX as usize {
            return Err(RequestError::TooManyBuffers);
        }
        let total: u64 = data.iter().map(|&(_, len)| u64::from(len)).sum();
        if total > u64::from(u32::MAX) {
            return Err(RequestError::TooLarge);
        }
        // Checked here when it runs in pieces, so that no piece takes
        // effect before a later one's buffer is found missing; a request
        // of one piece fails at its one access, before any effect.
        if total > PIECE {
            let access = if kind.device_writes() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if let Some(&(addr, _)) = data
                .iter()
                .find(|&&(addr, len)| !mem.check_range(addr, len as usize, access))
            {
                return Err(GuestMemoryError::InvalidGuestAddress(addr).into());
            }
        }
        Ok(Request {
            kind,
            sector: u64::from_le_bytes(sector),
            data,
        })
    }

    /// Whether it is a write, write-zeroes or discard.
    fn modifies(&self) -> bool {
        matches!(self.kind, Kind::Out | Kind::Discard | Kind::WriteZeroes)
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|&(_, len)| u64::from(len)).sum()
    }

    /// Reads all data buffers from the guest (a discard's segments: at
    /// most `MAX_SEGMENTS` of 16 bytes, checked by the caller).
    fn gather<M: GuestMemory>(&self, mem: &M) -> Result<Vec<u8>, RequestError> {
        let mut buf = vec![0u8; self.data_len() as usize];
        self.gather_at(mem, 0, &mut buf)?;
        Ok(buf)
    }

    /// Reads data bytes `[from, from + buf.len())` from the guest into `buf`.
    fn gather_at<M: GuestMemory>(
        &self,
        mem: &M,
        from: u64,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut at = 0;
        for (addr, n) in spans(&self.data, from as usize, buf.len()) {
            mem.read_slice(&mut buf[at..at + n], addr)?;
            at += n;
        }
        Ok(())
    }

    /// Writes `buf` into the data buffers from data byte `from` on, as far
    /// as they go; returns the bytes written.
    fn scatter_at<M: GuestMemory>(
        &self,
        mem: &M,
        from: u64,
        buf: &[u8],
    ) -> Result<u32, RequestError> {
        let mut at = 0;
        for (addr, n) in spans(&self.data, from as usize, buf.len()) {
            mem.write_slice(&buf[at..at + n], addr)?;
            at += n;
        }
        // At most the data's length, itself at most u32::MAX (`parse`).
        Ok(at as u32)
    }

    /// Runs the request; returns the bytes it wrote into guest buffers.
    pub fn execute<M: GuestMemory>(&self, mem: &M, disk: &Disk<'_>) -> Result<u32, RequestError> {
        match self.kind {
            Kind::In => {
                let len = self.data_len();
                let offset = self.sectors_of(len, disk)?;
                let mut buf = vec![0u8; len.min(PIECE) as usize];
                let mut done = 0;
                while done < len {
                    let piece = &mut buf[..(len - done).min(PIECE) as usize];
                    disk.device.read(offset + done, piece)?;
                    self.scatter_at(mem, done, piece)?;
                    done += piece.len() as u64;
                }
                // At most u32::MAX (`parse`).
                Ok(len as u32)
            }
            Kind::Out => {
                if let Some(lsn) = self.write_unordered(mem, disk)? {
                    disk.device.wait_written(lsn)?;
                }
                Ok(0)
            }
            Kind::Flush => {
                disk.device.flush()?;
                Ok(0)
            }
            Kind::GetId => self.scatter_at(mem, 0, &disk.id),
            Kind::Discard | Kind::WriteZeroes => {
                if disk.read_only {
                    return Err(RequestError::ReadOnly);
                }
                for (offset, len, unmap) in self.segments(mem, disk)? {
                    match self.kind {
                        Kind::Discard => disk.device.discard(offset, len)?,
                        _ => disk.device.write_zeroes(offset, len, unmap)?,
                    };
                }
                Ok(0)
            }
        }
    }

    /// Records a write, a [`PIECE`] at a time; `Some(lsn)` if it is done
    /// only once the writes recorded before it are written too
    /// (`BlockDevice::write_buffer_unordered`).
    fn write_unordered<M: GuestMemory>(
        &self,
        mem: &M,
        disk: &Disk<'_>,
    ) -> Result<Option<u64>, RequestError> {
        if disk.read_only {
            return Err(RequestError::ReadOnly);
        }
        let len = self.data_len();
        let offset = self.sectors_of(len, disk)?;
        let mut after_others = None;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            let lsn = with_payload_buffer(|buf| {
                self.gather_at(mem, done, buf.payload_mut(n as usize))?;
                Ok::<_, RequestError>(disk.device.write_buffer_unordered(offset + done, buf)?)
            })?;
            // Lsns grow: waiting for the last covers the pieces before.
            after_others = after_others.max(lsn);
            done += n;
        }
        Ok(after_others)
    }

    /// A read served from the page cache: the bytes written into guest
    /// buffers, or None where it would wait for the disk.
    fn read_cached<M: GuestMemory>(
        &self,
        mem: &M,
        disk: &Disk<'_>,
    ) -> Result<Option<u32>, RequestError> {
        let len = self.data_len();
        let offset = self.sectors_of(len, disk)?;
        let mut buf = vec![0u8; len as usize];
        if len > 0 && !disk.device.read_cached(offset, &mut buf)? {
            return Ok(None);
        }
        self.scatter_at(mem, 0, &buf).map(Some)
    }

    /// The byte offset of a transfer of `len` bytes at the request's sector.
    fn sectors_of(&self, len: u64, disk: &Disk<'_>) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR) {
            return Err(RequestError::Unaligned(len));
        }
        disk.range(self.sector, len / SECTOR)
    }

    /// Discard/write-zeroes segments as (offset, length, unmap), all checked
    /// before any is run.
    fn segments<M: GuestMemory>(
        &self,
        mem: &M,
        disk: &Disk<'_>,
    ) -> Result<Vec<(u64, u64, bool)>, RequestError> {
        let len = self.data_len();
        if len == 0 || !len.is_multiple_of(SEGMENT_LEN) || len / SEGMENT_LEN > MAX_SEGMENTS {
            return Err(RequestError::Segments(len));
        }
        let raw = self.gather(mem)?;
        raw.chunks_exact(SEGMENT_LEN as usize)
            .map(|s| {
                let mut sector = [0u8; 8];
                sector.copy_from_slice(&s[0..8]);
                let sector = u64::from_le_bytes(sector);
                let sectors = u64::from(u32::from_le_bytes([s[8], s[9], s[10], s[11]]));
                let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
                let allowed = match self.kind {
                    Kind::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                    _ => 0,
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::Flags(flags));
                }
                if sectors == 0 {
                    return Err(RequestError::Segments(len));
                }
                let offset = disk.range(sector, sectors)?;
                Ok((offset, sectors * SECTOR, flags != 0))
            })
            .collect()
    }
}

/// How a descriptor chain was completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into the chain's buffers (for the used ring); 0 when
    /// the chain has no usable status byte.
    pub used: u32,
    pub status: Status,
    /// Whether it was a write, write-zeroes or discard (it may have
    /// changed the disk, even if it failed).
    pub modifying: bool,
    /// What the gate's per-operation counters take; None for a chain
    /// that held no request.
    pub sample: Option<Sample>,
}

/// One request as the gate's per-operation counters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub kind: Kind,
    /// Data bytes moved (reads and writes that succeeded), else 0.
    pub bytes: u64,
    /// From the parsed request to its status byte.
    pub nanos: u64,
    pub ok: bool,
}

/// A request taken from its chain, with where its status byte goes.
#[derive(Debug)]
struct Taken {
    request: Result<Request, RequestError>,
    status: GuestAddress,
    started: std::time::Instant,
}

/// What became of a chain once its request was taken.
#[derive(Debug)]
pub enum Step {
    /// Completed (written, read from the page cache, refused...).
    Done(Completion),
    /// It waits for the disk (a read of what the page cache does not hold,
    /// a flush): [`Waiting::finish`] it on a thread that may block.
    Waiting(Waiting),
}

/// A read, checked, for a caller that carries it out itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadInto<'a> {
    /// The disk bytes it reads.
    pub offset: u64,
    pub len: u64,
    /// The guest buffers they go to, in order.
    pub buffers: &'a [(GuestAddress, u32)],
}

/// A request that must wait for the disk before it completes.
#[derive(Debug)]
pub struct Waiting {
    taken: Taken,
    /// What is left to do.
    rest: Rest,
}

#[derive(Debug)]
enum Rest {
    /// Running the request.
    Run,
    /// Syncing a write that ran (writethrough mode).
    Sync,
    /// Waiting for the writes recorded before a write that ran, which
    /// other threads are still writing, up to its lsn.
    Ordered(u64),
}

impl Waiting {
    /// The lsn a write recorded behind records other threads still write
    /// waits for (`Rest::Ordered`); None for any other request.
    pub fn after_others(&self) -> Option<u64> {
        match self.rest {
            Rest::Ordered(lsn) => Some(lsn),
            Rest::Run | Rest::Sync => None,
        }
    }

    /// Whether all it waits for is a sync of the device: a flush, or in
    /// writethrough mode the sync after a write that ran. Any sync that
    /// starts after it was taken serves it (syncs.rs).
    pub fn only_syncs(&self) -> bool {
        match (&self.taken.request, &self.rest) {
            (Ok(r), Rest::Run) => r.kind == Kind::Flush,
            (Ok(_), Rest::Sync) => true,
            _ => false,
        }
    }

    /// Completes a request that only syncs ([`Waiting::only_syncs`]) with
    /// the outcome of a sync that started after it was taken.
    pub fn finish_synced<M: GuestMemory>(
        self,
        mem: &M,
        disk: &Disk<'_>,
        synced: &Result<(), Arc<rewind_journal::Error>>,
    ) -> Completion {
        let result = match synced {
            Ok(()) => Ok(0),
            Err(e) => Err(RequestError::Sync(e.clone())),
        };
        self.taken.complete(mem, disk, result)
    }

    /// The read the caller may carry out itself; None for any other
    /// request, and for a read that fails its checks (`finish` reports it).
    pub fn read_into(&self, disk: &Disk<'_>) -> Option<ReadInto<'_>> {
        match (&self.taken.request, &self.rest) {
            (Ok(r), Rest::Run) if r.kind == Kind::In => {
                let len = r.data_len();
                let offset = r.sectors_of(len, disk).ok()?;
                Some(ReadInto {
                    offset,
                    len,
                    buffers: &r.data,
                })
            }
            _ => None,
        }
    }

    /// Completes a read ([`Waiting::read_into`]) whose guest buffers the
    /// caller filled.
    pub fn finish_filled<M: GuestMemory>(self, mem: &M, disk: &Disk<'_>) -> Completion {
        let result = match &self.taken.request {
            // At most u32::MAX (`parse`).
            Ok(r) => Ok(r.data_len() as u32),
            Err(_) => Ok(0),
        };
        self.taken.complete(mem, disk, result)
    }

    /// Runs the rest of the request and writes its status byte.
    pub fn finish<M: GuestMemory>(self, mem: &M, disk: &Disk<'_>) -> Completion {
        let result = match (&self.taken.request, self.rest) {
            (Ok(r), Rest::Run) => r.execute(mem, disk).and_then(|n| {
                // A large write left to an IO thread (`runs_bulk`) is synced
                // like the others if the guest turned writethrough on since.
                if r.modifies() && disk.device.writethrough() {
                    disk.device.flush()?;
                }
                Ok(n)
            }),
            (Ok(_), Rest::Sync) => disk.device.flush().map(|()| 0).map_err(RequestError::from),
            (Ok(_), Rest::Ordered(lsn)) => disk
                .device
                .wait_written(lsn)
                .map(|()| 0)
                .map_err(RequestError::from),
            (Err(_), _) => Ok(0),
        };
        self.taken.complete(mem, disk, result)
    }
}

impl Taken {
    /// Writes the status byte of `result` and describes the completion.
    fn complete<M: GuestMemory>(
        self,
        mem: &M,
        disk: &Disk<'_>,
        result: Result<u32, RequestError>,
    ) -> Completion {
        let (kind, bytes, modifying) = match &self.request {
            Ok(r) => (
                Some(r.kind),
                if matches!(r.kind, Kind::In | Kind::Out) {
                    r.data_len()
                } else {
                    0
                },
                r.modifies() && !disk.read_only,
            ),
            Err(_) => (None, 0, false),
        };
        let (code, written) = match self.request.and(result) {
            Ok(written) => (Status::Ok, written),
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                (e.status(), 0)
            }
        };
        let sample = kind.map(|kind| Sample {
            kind,
            bytes: if code == Status::Ok { bytes } else { 0 },
            nanos: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            ok: code == Status::Ok,
        });
        match mem.write_obj(code as u8, self.status) {
            Ok(()) => Completion {
                used: written + 1,
                status: code,
                modifying,
                sample,
            },
            Err(e) => {
                tracing::warn!(
                    event = rewind_journal::events::GUEST_PROTOCOL_ERROR,
                    error = %e,
                    "cannot write the status byte"
                );
                Completion {
                    modifying,
                    sample,
                    ..UNUSABLE
                }
            }
        }
    }
}

/// A chain with no usable status byte.
const UNUSABLE: Completion = Completion {
    used: 0,
    status: Status::IoErr,
    modifying: false,
    sample: None,
};

/// Largest read the queue's thread copies itself when the page cache
/// holds it; larger ones go to the IO threads, which copy beside it.
const INLINE_READ_MAX: u64 = 64 << 10;

/// Takes one descriptor chain: parses it and runs what needs no wait for
/// the disk (writes are appends to the journal; reads of up to 64 KiB the
/// page cache answers), leaving the rest [`Step::Waiting`]: other reads,
/// large writes while the device takes them straight to the disk
/// (`BlockDevice::bulk_writes`), in writethrough mode the sync after a
/// write, and a write recorded after one another queue's thread is still
/// writing (`Rest::Ordered`). With `defer_reads` every read is left
/// waiting: the caller reads it (a queue's ring). Other writes run here,
/// in the order the chains were taken, so the journal records them in
/// that order; large ones left waiting are recorded as their IO threads
/// get to them, as writes the guest has in flight together may be.
///
/// A flush is left waiting too: it covers every write completed before
/// it (and every write taken before it but a large one still waiting), so
/// it syncs on an IO thread while the queue takes and completes the
/// writes behind it. Concurrent flushes share a sync (syncs.rs).
pub fn start<M: GuestMemory>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    disk: &Disk<'_>,
    defer_reads: bool,
) -> Step {
    let descs: Vec<Descriptor> = chain.into_iter().collect();
    let Some(status) = status_byte(mem, &descs) else {
        tracing::warn!(
            event = rewind_journal::events::GUEST_PROTOCOL_ERROR,
            "descriptor chain without a device-writable status byte in guest memory at its end"
        );
        return Step::Done(UNUSABLE);
    };
    let taken = Taken {
        request: Request::parse(mem, &descs),
        status,
        started: std::time::Instant::now(),
    };
    let waiting = |taken, rest| Step::Waiting(Waiting { taken, rest });
    let result = match &taken.request {
        // The caller reads it (the queue's ring); else copying a large
        // read is work enough for a thread of its own.
        Ok(r) if r.kind == Kind::In && (defer_reads || r.data_len() > INLINE_READ_MAX) => {
            return waiting(taken, Rest::Run)
        }
        Ok(r) if r.kind == Kind::Flush => return waiting(taken, Rest::Run),
        Ok(r) if r.kind == Kind::Out && r.data_len() >= LARGE_PAYLOAD && runs_bulk(disk) => {
            return waiting(taken, Rest::Run)
        }
        // Recorded here, in the order taken; reported done on an IO thread
        // if another queue's thread still writes a record placed before
        // it, so that this queue goes on meanwhile.
        Ok(r) if r.kind == Kind::Out && !disk.device.writethrough() => {
            match r.write_unordered(mem, disk) {
                Ok(Some(lsn)) => return waiting(taken, Rest::Ordered(lsn)),
                written => written.map(|_| 0),
            }
        }
        Ok(r) if r.kind == Kind::In => match r.read_cached(mem, disk) {
            Ok(Some(written)) => Ok(written),
            Ok(None) => return waiting(taken, Rest::Run),
            Err(e) => Err(e),
        },
        Ok(r) => match r.execute(mem, disk) {
            Ok(_) if r.modifies() && disk.device.writethrough() => {
                return waiting(taken, Rest::Sync)
            }
            done => done,
        },
        Err(_) => Ok(0),
    };
    Step::Done(taken.complete(mem, disk, result))
}

/// The parts of `buffers` (a request's data buffers, in order) that data
/// bytes `at..at + len` are in.
pub(crate) fn spans(
    buffers: &[(GuestAddress, u32)],
    mut at: usize,
    mut len: usize,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    buffers.iter().filter_map(move |&(addr, size)| {
        let size = size as usize;
        if at >= size {
            at -= size;
            return None;
        }
        if len == 0 {
            return None;
        }
        let n = (size - at).min(len);
        // A buffer running past the top of the address space (not
        // checked for a request of one piece) saturates to an address no
        // access succeeds at.
        let span = (GuestAddress(addr.0.saturating_add(at as u64)), n);
        at = 0;
        len -= n;
        Some(span)
    })
}

/// Where a chain's status byte goes: the last byte of its last
/// descriptor, which must be device-writable and in guest memory (else the
/// guest could never learn the request's outcome, so it is not run).
fn status_byte<M: GuestMemory>(mem: &M, chain: &[Descriptor]) -> Option<GuestAddress> {
    let last = chain.last().filter(|d| d.is_write_only() && d.len() > 0)?;
    let status = last.addr().checked_add(u64::from(last.len() - 1))?;
    mem.check_range(status, 1, Permissions::Write)
        .then_some(status)
}

/// Whether large writes run on IO threads (`start`): not in writethrough
/// mode, where what is left of a write is its sync (`Rest::Sync`).
fn runs_bulk(disk: &Disk<'_>) -> bool {
    !disk.read_only && !disk.device.writethrough() && disk.device.bulk_writes()
}

/// Handles one descriptor chain to its end: parses, runs, writes the
/// status byte.
pub fn handle<M: GuestMemory>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    disk: &Disk<'_>,
) -> Completion {
    match start(mem, chain, disk, false) {
        Step::Done(done) => done,
        Step::Waiting(waiting) => waiting.finish(mem, disk),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy;
    use rewind_journal::fault::FaultStorage;
    use rewind_journal::{OpenOptions, Volume};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x40_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const DISK: u64 = 1 << 20;

    fn volume() -> Volume {
        crate::test_support::volume(DISK)
    }

    fn volume_on(fs: &FaultStorage, options: OpenOptions) -> Volume {
        crate::test_support::volume_on(fs, DISK, options)
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory")
    }

    fn header(mem: &GuestMemoryMmap<()>, code: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&code.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).expect("header");
    }

    fn desc(addr: u64, len: u32, device_writes: bool) -> RawDescriptor {
        let flags = if device_writes {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Runs a chain of (header, data..., status) and returns (used len, status byte).
    fn run(mem: &GuestMemoryMmap<()>, disk: &Disk<'_>, descs: &[RawDescriptor]) -> (u32, u8) {
        mem.write_obj(0xffu8, GuestAddress(STATUS))
            .expect("poison status");
        let q = MockSplitQueue::new(mem, (descs.len() as u16).next_power_of_two().max(16));
        let chain = q.build_desc_chain(descs).expect("chain");
        let done = handle(mem, chain, disk);
        LAST_DONE.with(|last| last.set(Some(done)));
        (
            done.used,
            mem.read_obj(GuestAddress(STATUS)).expect("status"),
        )
    }

    thread_local! {
        /// The completion `run` got last: what the queue worker hands the gate.
        static LAST_DONE: std::cell::Cell<Option<Completion>> = const { std::cell::Cell::new(None) };
    }

    fn disk(volume: &Volume) -> Disk<'_> {
        let mut id = [0u8; 20];
        id[..4].copy_from_slice(b"vol1");
        Disk {
            device: volume,
            read_only: false,
            id,
        }
    }

    fn write(mem: &GuestMemoryMmap<()>, disk: &Disk<'_>, sector: u64, data: &[u8]) -> (u32, u8) {
        header(mem, VIRTIO_BLK_T_OUT, sector);
        mem.write_slice(data, GuestAddress(DATA)).expect("data");
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, data.len() as u32, false),
            desc(STATUS, 1, true),
        ];
        run(mem, disk, &descs)
    }

    fn read(
        mem: &GuestMemoryMmap<()>,
        disk: &Disk<'_>,
        sector: u64,
        len: u32,
    ) -> (u32, u8, Vec<u8>) {
        header(mem, VIRTIO_BLK_T_IN, sector);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, len / 2, true),
            desc(DATA + 0x1000 * 8, len - len / 2, true),
            desc(STATUS, 1, true),
        ];
        let (used, status) = run(mem, disk, &descs);
        let mut out = vec![0u8; len as usize];
        mem.read_slice(&mut out[..(len / 2) as usize], GuestAddress(DATA))
            .expect("read back");
        mem.read_slice(&mut out[(len / 2) as usize..], GuestAddress(DATA + 0x8000))
            .expect("read back");
        (used, status, out)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    #[test]
    fn each_request_leaves_a_sample_the_gate_counts_by_operation() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        let gate = std::sync::Arc::new(crate::gate::Gate::new(1));
        let counted = |f: &dyn Fn()| {
            let pass = gate.enter(1).expect("serving");
            f();
            match LAST_DONE.with(|last| last.take()) {
                Some(done) => pass.finish_request(&done),
                None => pass.finish(Status::Ok, false),
            }
        };
        let data = pattern(4096);
        counted(&|| assert_eq!(write(&mem, &d, 8, &data).1, 0));
        counted(&|| assert_eq!(read(&mem, &d, 8, 4096).1, 0));
        counted(&|| assert_eq!(read(&mem, &d, 8, 4096).1, 0));
        counted(&|| {
            header(&mem, VIRTIO_BLK_T_FLUSH, 0);
            run(&mem, &d, &[desc(HDR, 16, false), desc(STATUS, 1, true)]);
        });
        // A read past the end: counted as a read that failed, no bytes.
        counted(&|| assert_eq!(read(&mem, &d, 1 << 40, 512).1, Status::IoErr as u8));
        // Without a request handled first, nothing is counted by operation.
        counted(&|| {});
        let stats = gate.op_stats();
        let of = |kind: Kind| stats.iter().find(|s| s.kind == kind).expect("kind");
        let (w, r, f) = (of(Kind::Out), of(Kind::In), of(Kind::Flush));
        assert_eq!((w.requests, w.errors, w.bytes), (1, 0, 4096));
        assert_eq!((r.requests, r.errors, r.bytes), (3, 1, 8192));
        assert_eq!((f.requests, f.errors, f.bytes), (1, 0, 0));
        assert_eq!(of(Kind::Discard).requests, 0);
        assert!(r.buckets.iter().sum::<u64>() <= r.requests);
        assert!(r.seconds > 0.0);
        assert_eq!(gate.counters().completed, 6);
    }

    #[test]
    fn large_writes_wait_for_an_io_thread_while_the_volume_writes_them_direct() {
        const LARGE: u64 = rewind_journal::LARGE_PAYLOAD;
        let tmp = tempfile::tempdir().expect("tmp");
        let settings = rewind_journal::VolumeSettings {
            segment_size: 1 << 20,
            journal_max: 512 << 20,
            journal_warn: 400 << 20,
            ..rewind_journal::VolumeSettings::new(64 << 20)
        };
        let v = crate::test_support::os_volume_with(tmp.path(), &settings);
        let (mem, d) = (memory(), disk(&v));
        let write = |sector: u64, len: u64| {
            let q = MockSplitQueue::new(&mem, 16);
            header(&mem, VIRTIO_BLK_T_OUT, sector);
            mem.write_slice(&pattern(len as usize), GuestAddress(DATA))
                .expect("data");
            let descs = [
                desc(HDR, 16, false),
                desc(DATA, len as u32, false),
                desc(STATUS, 1, true),
            ];
            start(&mem, q.build_desc_chain(&descs).expect("chain"), &d, false)
        };
        // Until the volume has learnt the writes are large, they run here.
        let mut sector = 0;
        while !v.bulk_writes() {
            assert!(sector < 1024 * LARGE / 512, "never bulk");
            assert!(matches!(write(sector, LARGE), Step::Done(_)));
            sector += LARGE / 512;
        }
        // Then on an IO thread, which writes it; small ones still here.
        let Step::Waiting(waiting) = write(0, LARGE) else {
            panic!("a large write ran on the queue's thread");
        };
        let before = v.last_lsn();
        let done = waiting.finish(&mem, &d);
        assert_eq!((done.status, v.last_lsn()), (Status::Ok, before + 1));
        let mut back = vec![0u8; LARGE as usize];
        v.read(0, &mut back).expect("read");
        assert!(back == pattern(LARGE as usize));
        assert!(matches!(write(0, 4096), Step::Done(_)));
        // Not in writethrough mode: what waits there is the sync.
        v.set_writethrough(true);
        let Step::Waiting(waiting) = write(0, LARGE) else {
            panic!("a writethrough write completed before its sync");
        };
        assert_eq!(v.last_lsn(), before + 3, "written on the queue's thread");
        assert_eq!(waiting.finish(&mem, &d).status, Status::Ok);
        assert!(v.durable_lsn() >= before + 3);
    }

    #[test]
    fn a_write_behind_one_another_thread_still_writes_completes_on_an_io_thread() {
        let fs = FaultStorage::new();
        let v = volume_on(&fs, OpenOptions::default());
        let (mem, d) = (memory(), disk(&v));
        let q = MockSplitQueue::new(&mem, 16);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 4096, false),
            desc(STATUS, 1, true),
        ];
        header(&mem, VIRTIO_BLK_T_OUT, 8);
        mem.write_slice(&pattern(4096), GuestAddress(DATA))
            .expect("data");
        // Another queue's write stalls in the storage after its record is
        // placed (in the first segment, which only the writer writes to).
        let slow = rewind_journal::fault::FaultOp::Write;
        fs.slow_down(slow, "00000000.seg", std::time::Duration::from_secs(1));
        std::thread::scope(|s| {
            let other = s.spawn(|| v.write(0, &[7u8; 4096]).expect("other queue's write"));
            fs.wait_stalled("the other queue's write");
            assert_eq!(v.last_lsn(), 1, "placed");
            fs.clear_faults();
            mem.write_obj(0xffu8, GuestAddress(STATUS))
                .expect("poison status");
            let chain = q.build_desc_chain(&descs).expect("chain");
            let Step::Waiting(waiting) = start(&mem, chain, &d, false) else {
                panic!("completed before the record placed ahead of it was written");
            };
            assert_eq!(v.last_lsn(), 2, "recorded on the queue's thread");
            let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
            assert_eq!(status, 0xff, "no status before it is done");
            assert_eq!(waiting.finish(&mem, &d).status, Status::Ok);
            let mut back = vec![0u8; 4096];
            v.read(0, &mut back).expect("read");
            assert_eq!(back, vec![7u8; 4096], "the write ahead is done too");
            assert_eq!(other.join().expect("other queue's thread"), 1);
        });
        // With nothing ahead of it in flight, a write completes at once.
        let chain = q.build_desc_chain(&descs).expect("chain");
        assert!(matches!(start(&mem, chain, &d, false), Step::Done(c) if c.status == Status::Ok));
    }

    #[test]
    fn a_writethrough_write_runs_at_once_and_leaves_its_sync_waiting() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        v.set_writethrough(true);
        header(&mem, VIRTIO_BLK_T_OUT, 8);
        mem.write_slice(&pattern(4096), GuestAddress(DATA))
            .expect("data");
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 4096, false),
            desc(STATUS, 1, true),
        ];
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q.build_desc_chain(&descs).expect("chain");
        let Step::Waiting(waiting) = start(&mem, chain, &d, false) else {
            panic!("a writethrough write completed before its sync");
        };
        let mut back = vec![0u8; 4096];
        v.read(4096, &mut back).expect("read");
        assert_eq!(back, pattern(4096), "written at once");
        let written = v.last_lsn();
        assert!(v.durable_lsn() < written, "not synced yet");
        let done = waiting.finish(&mem, &d);
        assert_eq!(done.status, Status::Ok);
        assert!(done.modifying);
        assert!(v.durable_lsn() >= written, "durable once complete");

        v.set_writethrough(false);
        let chain = q.build_desc_chain(&descs).expect("chain");
        assert!(
            matches!(start(&mem, chain, &d, false), Step::Done(_)),
            "a writeback write completes at once"
        );
    }

    #[test]
    fn a_deferred_read_says_where_it_reads_to_and_completes_once_the_caller_filled_it() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        let read_chain = |sector: u64| {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
            [
                desc(HDR, 16, false),
                desc(DATA, 4096, true),
                desc(STATUS, 1, true),
            ]
        };
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q.build_desc_chain(&read_chain(8)).expect("chain");
        let Step::Waiting(waiting) = start(&mem, chain, &d, true) else {
            panic!("a deferred read completed");
        };
        let read = waiting.read_into(&d).expect("a read");
        assert_eq!((read.offset, read.len), (4096, 4096));
        assert_eq!(read.buffers, &[(GuestAddress(DATA), 4096)][..]);
        mem.write_slice(&pattern(4096), GuestAddress(DATA))
            .expect("the caller reads");
        let done = waiting.finish_filled(&mem, &d);
        assert_eq!((done.used, done.status), (4097, Status::Ok));
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
        assert_eq!(got, pattern(4096));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("st"), 0);

        // Past the disk: no range to read; it fails when finished.
        let chain = q.build_desc_chain(&read_chain(DISK / 512)).expect("chain");
        let Step::Waiting(waiting) = start(&mem, chain, &d, true) else {
            panic!("a deferred read completed");
        };
        assert!(waiting.read_into(&d).is_none());
        assert_eq!(waiting.finish(&mem, &d).status, Status::IoErr);
    }

    #[test]
    fn writes_reads_flushes_and_ids_round_trip() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        let data = pattern(4096);
        assert_eq!(write(&mem, &d, 8, &data), (1, Status::Ok as u8));
        let (used, status, got) = read(&mem, &d, 8, 4096);
        assert_eq!((used, status), (4097, Status::Ok as u8));
        assert_eq!(got, data);

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            run(&mem, &d, &[desc(HDR, 16, false), desc(STATUS, 1, true)]),
            (1, 0)
        );
        assert!(v.stats().durable_lsn >= 1);

        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 20, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs), (21, 0));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(id, d.id);
    }

    fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    }

    fn zero_request(mem: &GuestMemoryMmap<()>, d: &Disk<'_>, code: u32, segs: &[[u8; 16]]) -> u8 {
        header(mem, code, 0);
        mem.write_slice(&segs.concat(), GuestAddress(DATA))
            .expect("segments");
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 16 * segs.len() as u32, false),
            desc(STATUS, 1, true),
        ];
        run(mem, d, &descs).1
    }

    #[test]
    fn discard_and_write_zeroes_clear_their_segments_only() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        write(&mem, &d, 0, &pattern(8192));
        let segs = [segment(1, 1, 0), segment(4, 2, 0)];
        assert_eq!(zero_request(&mem, &d, VIRTIO_BLK_T_DISCARD, &segs), 0);
        let unmap = [segment(10, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)];
        assert_eq!(zero_request(&mem, &d, VIRTIO_BLK_T_WRITE_ZEROES, &unmap), 0);
        let mut want = pattern(8192);
        for s in [1usize, 4, 5, 10] {
            want[s * 512..(s + 1) * 512].fill(0);
        }
        assert_eq!(read(&mem, &d, 0, 8192).2, want);
    }

    #[test]
    fn bad_segments_are_refused_before_any_runs() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        write(&mem, &d, 0, &pattern(4096));
        let lsn = v.last_lsn();
        let unsupp = Status::Unsupp as u8;
        let ioerr = Status::IoErr as u8;
        let cases: Vec<(u32, Vec<[u8; 16]>, u8)> = vec![
            // The first segment is fine, the second is not: nothing runs.
            (
                VIRTIO_BLK_T_DISCARD,
                vec![segment(0, 1, 0), segment(DISK / 512, 1, 0)],
                ioerr,
            ),
            (VIRTIO_BLK_T_DISCARD, vec![segment(u64::MAX, 2, 0)], ioerr),
            (VIRTIO_BLK_T_DISCARD, vec![segment(0, 0, 0)], ioerr),
            (
                VIRTIO_BLK_T_DISCARD,
                vec![segment(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
                unsupp,
            ),
            (VIRTIO_BLK_T_WRITE_ZEROES, vec![segment(0, 1, 0x80)], unsupp),
            (VIRTIO_BLK_T_WRITE_ZEROES, vec![segment(0, 1, 0); 33], ioerr),
        ];
        for (code, segs, want) in cases {
            assert_eq!(zero_request(&mem, &d, code, &segs), want, "{segs:?}");
        }
        assert_eq!(v.last_lsn(), lsn, "no bad segment reached the journal");
        // Data that is not whole segments.
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 15, false),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs).1, ioerr);
    }

    #[test]
    fn malformed_chains_get_an_error_status_and_touch_nothing() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        write(&mem, &d, 0, &pattern(4096));
        let lsn = v.last_lsn();
        let ioerr = (1, Status::IoErr as u8);
        let far = MEM + 0x1000; // outside guest memory

        header(&mem, VIRTIO_BLK_T_IN, 0);
        // Header device-writable, too short, missing.
        assert_eq!(
            run(&mem, &d, &[desc(HDR, 16, true), desc(STATUS, 1, true)]),
            ioerr
        );
        assert_eq!(
            run(&mem, &d, &[desc(HDR, 15, false), desc(STATUS, 1, true)]),
            ioerr
        );
        assert_eq!(run(&mem, &d, &[desc(STATUS, 1, true)]), ioerr);
        // Header outside guest memory.
        assert_eq!(
            run(&mem, &d, &[desc(far, 16, false), desc(STATUS, 1, true)]),
            ioerr
        );
        // A read into a device-readable buffer, a read past memory.
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 512, false),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs), ioerr);
        let descs = [
            desc(HDR, 16, false),
            desc(far, 512, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs).1, Status::IoErr as u8);
        // Unaligned, past the end, overflowing sector numbers.
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 100, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs), ioerr);
        for sector in [DISK / 512, DISK / 512 - 1, u64::MAX, u64::MAX / 512 + 1] {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            let descs = [
                desc(HDR, 16, false),
                desc(DATA, 1024, true),
                desc(STATUS, 1, true),
            ];
            assert_eq!(run(&mem, &d, &descs), ioerr, "sector {sector}");
        }
        // A write whose data lies outside guest memory writes nothing.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 512, false),
            desc(far, 512, false),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs), ioerr);
        // An unknown request type.
        header(&mem, 0x99, 0);
        assert_eq!(
            run(&mem, &d, &[desc(HDR, 16, false), desc(STATUS, 1, true)]),
            (1, Status::Unsupp as u8)
        );
        assert_eq!(v.last_lsn(), lsn, "no bad request reached the journal");
        assert_eq!(read(&mem, &d, 0, 4096).2, pattern(4096));
    }

    #[test]
    fn spans_cut_a_range_of_data_out_of_its_buffers() {
        let buffers = [
            (GuestAddress(0x1000), 512),
            (GuestAddress(0x8000), 1024),
            (GuestAddress(0x2000), 512),
        ];
        let all: Vec<_> = spans(&buffers, 0, 2048).collect();
        assert_eq!(
            all,
            [
                (GuestAddress(0x1000), 512),
                (GuestAddress(0x8000), 1024),
                (GuestAddress(0x2000), 512)
            ]
        );
        let middle: Vec<_> = spans(&buffers, 256, 1536).collect();
        assert_eq!(
            middle,
            [
                (GuestAddress(0x1100), 256),
                (GuestAddress(0x8000), 1024),
                (GuestAddress(0x2000), 256)
            ]
        );
        let inside: Vec<_> = spans(&buffers, 1024, 256).collect();
        assert_eq!(inside, [(GuestAddress(0x8200), 256)]);
        assert_eq!(spans(&buffers, 2048, 0).count(), 0);
    }

    /// Virtio 1.x lets the driver split a request's bytes among
    /// descriptors as it likes: a header sharing its descriptor with the
    /// data, or split in two, a read's data sharing one with the status.
    #[test]
    fn any_layout_of_header_data_and_status_is_one_request() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        let data = pattern(4096);
        header(&mem, VIRTIO_BLK_T_OUT, 8);
        mem.write_slice(&data, GuestAddress(HDR + 16))
            .expect("data");
        let descs = [desc(HDR, 16 + 4096, false), desc(STATUS, 1, true)];
        assert_eq!(run(&mem, &d, &descs), (1, Status::Ok as u8));
        assert_eq!(read(&mem, &d, 8, 4096).2, data, "header and data in one");

        let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        header(&mem, VIRTIO_BLK_T_OUT, 16);
        mem.write_slice(&other, GuestAddress(DATA)).expect("data");
        let descs = [
            desc(HDR, 8, false),
            desc(HDR + 8, 8, false),
            desc(DATA, 4096, false),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs), (1, Status::Ok as u8));
        assert_eq!(read(&mem, &d, 16, 4096).2, other, "a header in two");

        // A read into 4097 bytes: the data, then the status byte.
        header(&mem, VIRTIO_BLK_T_IN, 8);
        mem.write_slice(&[0xee; 4097], GuestAddress(DATA))
            .expect("poison");
        let (used, _) = run(&mem, &d, &[desc(HDR, 16, false), desc(DATA, 4097, true)]);
        assert_eq!(used, 4097);
        let mut got = vec![0u8; 4097];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("read");
        assert_eq!(got[4096], Status::Ok as u8, "the status is the last byte");
        assert_eq!(got[..4096], data[..]);
    }

    #[test]
    fn too_many_buffers_or_readable_bytes_after_writable_ones_are_refused() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        let ioerr = (1, Status::IoErr as u8);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&pattern(4096), GuestAddress(DATA))
            .expect("data");
        let chain = |buffers: u64| {
            let mut descs = vec![desc(HDR, 16, false)];
            descs.extend((0..buffers).map(|i| desc(DATA + i % 8 * 512, 512, false)));
            descs.push(desc(STATUS, 1, true));
            descs
        };
        assert_eq!(run(&mem, &d, &chain(u64::from(SEG_MAX) + 1)), ioerr);
        assert_eq!(v.last_lsn(), 0, "nothing written");
        assert_eq!(
            run(&mem, &d, &chain(u64::from(SEG_MAX))),
            (1, Status::Ok as u8)
        );
        let lsn = v.last_lsn();
        assert_ne!(lsn, 0, "the longest chain allowed is written");

        header(&mem, VIRTIO_BLK_T_IN, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(DATA + 512, 512, false),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs), ioerr);
        assert_eq!(v.last_lsn(), lsn);
    }

    /// A request larger than [`PIECE`], in buffers whose edges are not
    /// the pieces' edges, reads and writes every byte where it belongs.
    #[test]
    fn a_request_larger_than_a_piece_runs_piece_by_piece() {
        const BUFFER: u64 = 768 << 10;
        const AT: u64 = 4 << 20; // past the header and status
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory");
        let v = crate::test_support::volume(8 << 20);
        let d = disk(&v);
        let len = 8 * BUFFER; // 6 MiB
        assert!(len > PIECE && !PIECE.is_multiple_of(BUFFER));
        let data: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
            .collect();
        mem.write_slice(&data, GuestAddress(AT)).expect("data");
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let mut descs = vec![desc(HDR, 16, false)];
        descs.extend((0..8).map(|i| desc(AT + i * BUFFER, BUFFER as u32, false)));
        descs.push(desc(STATUS, 1, true));
        assert_eq!(run(&mem, &d, &descs), (1, Status::Ok as u8));
        let mut stored = vec![0u8; len as usize];
        v.read(0, &mut stored).expect("read");
        assert!(stored == data, "the write's bytes in order");

        let back = AT + len;
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(back, (len / 3) as u32, true),
            desc(back + len / 3, (len - len / 3) as u32, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(run(&mem, &d, &descs), (len as u32 + 1, Status::Ok as u8));
        let mut got = vec![0u8; len as usize];
        mem.read_slice(&mut got, GuestAddress(back))
            .expect("read back");
        assert!(got == data, "the read's bytes in order");
    }

    /// A chain whose status byte lies outside guest memory is returned
    /// unused, and the write it carries is not run: its guest could never
    /// learn whether it was.
    #[test]
    fn a_write_whose_status_byte_is_outside_memory_changes_nothing() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&pattern(512), GuestAddress(DATA))
            .expect("data");
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q
            .build_desc_chain(&[
                desc(HDR, 16, false),
                desc(DATA, 512, false),
                desc(MEM + 8, 1, true),
            ])
            .expect("chain");
        let done = handle(&mem, chain, &d);
        assert_eq!(done.used, 0, "returned without a status byte");
        assert_eq!(
            v.last_lsn(),
            0,
            "a chain returned without a status byte must not have written the disk"
        );
    }

    #[test]
    fn chains_without_a_status_byte_are_returned_without_writing() {
        let (mem, v) = (memory(), volume());
        let d = disk(&v);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        // The last descriptor is device-readable: no status can be written.
        let descs = [desc(HDR, 16, false), desc(STATUS, 1, false)];
        assert_eq!(run(&mem, &d, &descs), (0, 0xff));
        // Status byte outside memory.
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q
            .build_desc_chain(&[desc(HDR, 16, false), desc(MEM + 8, 1, true)])
            .expect("chain");
        assert_eq!(handle(&mem, chain, &d).used, 0);
        assert_eq!(v.last_lsn(), 0);
    }

    #[test]
    fn storage_errors_are_held_and_retried_then_fail_with_ioerr() {
        use rewind_journal::fault::{Fault, FaultOp};
        use rewind_journal::RetryPolicy;
        const EIO: i32 = 5;
        const ENOSPC: i32 = 28;
        let fs = FaultStorage::new();
        let options = OpenOptions {
            retry: RetryPolicy {
                max_hold: std::time::Duration::from_millis(100),
                first_backoff: std::time::Duration::from_millis(1),
            },
            ..OpenOptions::default()
        };
        let (mem, v) = (memory(), volume_on(&fs, options));
        let d = disk(&v);
        // A transient fault: the guest sees latency, not an error.
        fs.inject(Fault::once_after(FaultOp::Write, 0, EIO).on_paths_containing(".seg"));
        fs.inject(Fault::once_after(FaultOp::Write, 0, ENOSPC).on_paths_containing(".seg"));
        assert_eq!(write(&mem, &d, 0, &pattern(4096)).1, Status::Ok as u8);
        fs.inject(Fault::once_after(FaultOp::Read, 0, EIO).on_paths_containing(".seg"));
        assert_eq!(read(&mem, &d, 0, 4096).2, pattern(4096));
        // A lasting one: IOERR once the hold is over; reads still work.
        fs.inject(Fault::always(FaultOp::Write, EIO).on_paths_containing(".seg"));
        assert_eq!(write(&mem, &d, 8, &pattern(512)).1, Status::IoErr as u8);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [desc(HDR, 16, false), desc(STATUS, 1, true)];
        assert_eq!(run(&mem, &d, &flush).1, Status::IoErr as u8);
        assert_eq!(read(&mem, &d, 0, 4096).2, pattern(4096));
    }

    #[test]
    fn a_read_only_export_refuses_every_change() {
        let (mem, v) = (memory(), volume());
        let mut d = disk(&v);
        d.read_only = true;
        assert_eq!(write(&mem, &d, 0, &pattern(512)).1, Status::IoErr as u8);
        assert_eq!(
            zero_request(&mem, &d, VIRTIO_BLK_T_DISCARD, &[segment(0, 1, 0)]),
            Status::IoErr as u8
        );
        assert_eq!(
            zero_request(&mem, &d, VIRTIO_BLK_T_WRITE_ZEROES, &[segment(0, 1, 0)]),
            Status::IoErr as u8
        );
        assert_eq!(v.last_lsn(), 0);
        assert_eq!(read(&mem, &d, 0, 1024).1, Status::Ok as u8);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Arbitrary chains: no panic, a valid status or none, and no guest
        /// memory changed outside the chain's device-writable buffers.
        #[test]
        fn arbitrary_chains_only_touch_their_own_writable_buffers(
            code in proptest::prop_oneof![
                proptest::sample::select(vec![
                    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
                ]),
                proptest::prelude::any::<u32>(),
            ],
            sector in proptest::prop_oneof![4 => 0u64..2100, 1 => proptest::prelude::any::<u64>()],
            // (where in 512-byte units, whole sectors or a raw length, flip direction)
            descs in proptest::collection::vec(
                (
                    0u64..(MEM / 512 + 4),
                    proptest::prop_oneof![4 => (0u32..9).prop_map(|k| k * 512), 1 => 0u32..5000],
                    proptest::prop_oneof![7 => proptest::strategy::Just(false), 1 => proptest::strategy::Just(true)],
                ),
                0..6,
            ),
            segs in proptest::collection::vec(proptest::prelude::any::<[u8; 16]>(), 0..3),
        ) {
            let device_writes = Kind::from_code(code).is_some_and(Kind::device_writes);
            let descs: Vec<(u64, u32, bool)> = descs
                .into_iter()
                .map(|(at, len, flip)| (at, len, device_writes != flip))
                .collect();
            let (mem, v) = (memory(), volume());
            let d = disk(&v);
            // Guest memory filled with a known pattern, plus a header and segments.
            static FILL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let fill = FILL.get_or_init(|| (0..MEM).map(|i| (i % 251) as u8).collect());
            mem.write_slice(fill, GuestAddress(0)).expect("fill");
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&code.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(HDR)).expect("header");
            mem.write_slice(&segs.concat(), GuestAddress(DATA)).expect("segments");
            let mut raw: Vec<RawDescriptor> = vec![desc(HDR, 16, false)];
            raw.extend(descs.iter().map(|&(at, len, w)| desc(at * 512, len, w)));
            let before = {
                let mut b = vec![0u8; MEM as usize];
                mem.read_slice(&mut b, GuestAddress(0)).expect("snapshot");
                b
            };
            let q = MockSplitQueue::new(&mem, 16);
            let chain = q.build_desc_chain(&raw).expect("chain");
            let used = handle(&mem, chain, &d).used;
            let mut after = vec![0u8; MEM as usize];
            mem.read_slice(&mut after, GuestAddress(0)).expect("snapshot");
            // The mock queue's own rings live below HDR; ignore them.
            let writable: Vec<(u64, u64)> = raw
                .iter()
                .map(|r| Descriptor::from(*r))
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr().0, d.addr().0 + u64::from(d.len())))
                .collect();
            let page = 4096;
            for (n, (b, a)) in before.chunks(page).zip(after.chunks(page)).enumerate() {
                if n * page < HDR as usize || b == a {
                    continue;
                }
                for (i, _) in b.iter().zip(a).enumerate().filter(|(_, (x, y))| x != y) {
                    let at = (n * page + i) as u64;
                    proptest::prop_assert!(
                        writable.iter().any(|&(s, e)| s <= at && at < e),
                        "byte {at:#x} changed outside the writable buffers"
                    );
                }
            }
            if used > 0 {
                let last = Descriptor::from(*raw.last().expect("non-empty"));
                let at = last.addr().unchecked_add(u64::from(last.len()) - 1);
                let status: u8 = mem.read_obj(at).expect("status");
                proptest::prop_assert!(status <= 2, "status {status}");
                let room: u64 = writable.iter().map(|&(s, e)| e - s).sum();
                proptest::prop_assert!(u64::from(used) <= room);
            }
        }
    }
}
