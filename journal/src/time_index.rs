//! Time -> lsn: the timestamp of every record in the journal, by lsn.
//!
//! Lsns are dense and timestamps never decrease along them, so the index is
//! a sorted array searched by bisection. It is kept in fixed-size chunks so
//! that growing it never copies what is already there (it grows under the
//! append lock).

const CHUNK: usize = 4096;

#[derive(Debug)]
pub struct TimeIndex {
    first_lsn: u64,
    chunks: Vec<Vec<u64>>,
    len: u64,
}

impl TimeIndex {
    /// An empty index whose first record will have `first_lsn`.
    pub fn new(first_lsn: u64) -> Self {
        TimeIndex {
            first_lsn,
            chunks: Vec::new(),
            len: 0,
        }
    }

    /// Adds the timestamp of the next lsn.
    pub fn push(&mut self, timestamp: u64) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(timestamp),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(timestamp);
                self.chunks.push(c);
            }
        }
        self.len += 1;
    }

    fn get(&self, i: u64) -> u64 {
        self.chunks[(i / CHUNK as u64) as usize][(i % CHUNK as u64) as usize]
    }

    /// First and last timestamps, if any record is indexed.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        (self.len > 0).then(|| (self.get(0), self.get(self.len - 1)))
    }

    /// The newest lsn whose timestamp is at or before `timestamp`.
    pub fn lsn_at(&self, timestamp: u64) -> Option<u64> {
        // First index with a later timestamp.
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.get(mid) <= timestamp {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo > 0).then(|| self.first_lsn + lo - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_newest_lsn_at_or_before_a_time() {
        let mut t = TimeIndex::new(11);
        assert_eq!(t.lsn_at(5), None);
        for i in 0..10_000u64 {
            t.push(100 + i / 3 * 10); // runs of three equal timestamps
        }
        assert_eq!(t.bounds(), Some((100, 100 + 3333 * 10)));
        assert_eq!(t.lsn_at(99), None);
        assert_eq!(t.lsn_at(100), Some(13));
        assert_eq!(t.lsn_at(109), Some(13));
        assert_eq!(t.lsn_at(110), Some(16));
        assert_eq!(t.lsn_at(u64::MAX), Some(11 + 9_999));
    }
}
