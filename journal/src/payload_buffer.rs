//! A write's payload in page-aligned memory with a page of room before it.
//!
//! An inline record goes to the device as one O_DIRECT request: its header,
//! the zeroes up to a page-aligned payload (`Layout::place`), then the
//! payload. From a plain slice that request is put together in a bounce
//! buffer, a second copy of every byte after the caller's own. A caller that
//! fills a [`PayloadBuffer`] instead (the daemon gathers guest memory into
//! one) lets the journal write the header into the room in front of the
//! payload and send the whole record from where it is.

/// The room kept before the payload: a header and its gap are at most a page.
const ROOM: usize = 4096;

/// Memory alignment of the payload, as O_DIRECT wants. The framed record
/// starts at most `ROOM` before it, at a multiple of the sector size, which
/// is the alignment a device of 512-byte sectors asks for; the journal's
/// file offsets are no more aligned than that either.
const ALIGN: usize = 4096;

/// A reusable payload buffer; see the module documentation.
#[derive(Debug, Default)]
pub struct PayloadBuffer {
    store: Vec<u8>,
    /// Where the payload starts in `store`: `ROOM` past an aligned address.
    start: usize,
    len: usize,
}

impl PayloadBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next payload's `len` bytes, page-aligned, for the caller to fill
    /// in full: they hold whatever the buffer's last payload left there.
    pub fn payload_mut(&mut self, len: usize) -> &mut [u8] {
        let needed = ALIGN + ROOM + len;
        if self.store.len() < needed {
            // Grown only, so a buffer kept for reuse is zeroed once.
            self.store = vec![0; needed];
        }
        self.start = self.store.as_ptr().align_offset(ALIGN) + ROOM;
        self.len = len;
        &mut self.store[self.start..self.start + len]
    }

    /// Bytes of memory the buffer holds.
    pub fn capacity(&self) -> usize {
        self.store.len()
    }

    /// The payload as last filled.
    pub fn payload(&self) -> &[u8] {
        &self.store[self.start..self.start + self.len]
    }

    /// `head`, then `gap` zero bytes, then the payload, in one slice: the
    /// record as it goes to the device. `head.len() + gap` is at most a
    /// page (a header and the gap to the next page).
    pub(crate) fn framed(&mut self, head: &[u8], gap: usize) -> &[u8] {
        debug_assert!(
            head.len() + gap <= ROOM,
            "a header and its gap fit the room"
        );
        let at = self.start - gap - head.len();
        self.store[at..at + head.len()].copy_from_slice(head);
        self.store[at + head.len()..self.start].fill(0);
        &self.store[at..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_page_aligned_and_the_frame_ends_with_it() {
        let mut buf = PayloadBuffer::new();
        for len in [0, 512, 65536, 4096] {
            let payload = buf.payload_mut(len);
            assert_eq!(payload.as_ptr() as usize % ALIGN, 0, "{len} bytes");
            payload.fill(0xab);
            let framed = buf.framed(&[7; 512], 3584);
            assert_eq!(framed.len(), ROOM + len);
            assert_eq!(framed.as_ptr() as usize % 512, 0);
            assert!(framed[..512].iter().all(|&b| b == 7));
            assert!(framed[512..ROOM].iter().all(|&b| b == 0));
            assert!(framed[ROOM..].iter().all(|&b| b == 0xab));
        }
    }

    #[test]
    fn a_frame_without_a_gap_puts_the_header_right_before_the_payload() {
        let mut buf = PayloadBuffer::new();
        buf.payload_mut(1024).copy_from_slice(&[3; 1024]);
        // A gap left by an earlier, larger frame does not stay in front.
        buf.framed(&[9; 512], 3584);
        let framed = buf.framed(&[8; 512], 0);
        assert_eq!(framed.len(), 1536);
        assert!(framed[..512].iter().all(|&b| b == 8));
        assert!(framed[512..].iter().all(|&b| b == 3));
        assert_eq!(buf.payload(), &[3; 1024][..]);
    }
}
