//! Arbitrary descriptor chains and guest memory through the virtio-blk
//! request path: it must never panic, and a status, if written, is valid.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rewind_journal::fault::FaultStorage;
use rewind_journal::{BaseImage, OpenOptions, RetryPolicy, Volume, VolumeSettings};
use rewind_vhost_blk::request::{handle, Disk};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;
const DATA: u64 = 0x8_0000;

fn volume() -> &'static Volume {
    static VOLUME: OnceLock<Volume> = OnceLock::new();
    VOLUME.get_or_init(|| {
        let fs = FaultStorage::new();
        let dir = Path::new("/vol");
        // The storage is in memory: a short window and a small journal keep
        // it bounded (the applier folds every second), and a full journal
        // fails a write at once instead of holding it.
        let settings = VolumeSettings {
            segment_size: 1 << 20,
            journal_max: 64 << 20,
            journal_warn: 48 << 20,
            window: Duration::from_secs(1),
            ..VolumeSettings::new(1 << 20)
        };
        Volume::create(&fs, dir, &settings, BaseImage::Empty, &mut |_, _| {}).expect("create");
        let options = OpenOptions {
            retry: RetryPolicy {
                max_hold: Duration::from_millis(10),
                ..RetryPolicy::default()
            },
            ..OpenOptions::default()
        };
        Volume::open(fs.arc(), dir, options).expect("open").0
    })
}

fuzz_target!(|input: &[u8]| {
    // Up to 8 descriptors of 12 bytes (addr, len, flags), then memory content.
    let count = input.first().map_or(0, |n| usize::from(n % 8) + 1);
    let table = input.get(1..1 + 12 * count).unwrap_or_default();
    let content = input.get(1 + 12 * count..).unwrap_or_default();
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = content.len().min(MEM - DATA as usize);
    mem.write_slice(&content[..n], GuestAddress(DATA))
        .expect("content");
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(12)
        .map(|d| {
            let addr = u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]])) % (2 * MEM as u64);
            let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) % 0x2_0000;
            let flags = u16::from_le_bytes([d[8], d[9]]) & 2; // WRITE only; chaining is the mock's
            RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
        })
        .collect();
    if descs.is_empty() {
        return;
    }
    let queue = MockSplitQueue::new(&mem, 16);
    let Ok(chain) = queue.build_desc_chain(&descs) else {
        return;
    };
    let disk = Disk {
        device: volume(),
        read_only: false,
        id: [7; 20],
    };
    let used = handle(&mem, chain, &disk).used;
    if used > 0 {
        // The status is the chain's last byte (any layout, virtio 1.x).
        let last = Descriptor::from(*descs.last().expect("non-empty"));
        let status_addr = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);
        let status: u8 = mem.read_obj(status_addr).expect("status was written");
        assert!(status <= 2, "invalid status {status}");
    }
});
