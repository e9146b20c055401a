//! What the journal's bench binaries share: where they run, how big, the
//! result table and the group filter.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A fresh directory under REWIND_BENCH_DIR (default: the temp dir).
pub fn bench_dir() -> PathBuf {
    let base = std::env::var_os("REWIND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::tempdir_in(base).expect("bench dir").keep()
}

/// REWIND_BENCH_QUICK=1: a small smoke run whose numbers mean little.
pub fn quick() -> bool {
    std::env::var_os("REWIND_BENCH_QUICK").is_some()
}

pub fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// The table's head; every row follows it.
pub fn header() {
    println!("| benchmark | rewind | baseline | ratio (higher is better for rewind) |");
    println!("|---|---|---|---|");
}

/// One result; `ratio` is baseline time over ours, if there is a baseline.
pub fn row(what: &str, ours: String, baseline: String, ratio: Option<f64>) {
    let ratio = ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
    println!("| {what} | {ours} | {baseline} | {ratio} |");
}

/// Which groups to run: `None` when not run as a benchmark (`cargo test
/// --benches` runs bench binaries without `--bench`), else a predicate
/// over group names (every group when no filter was given).
pub fn groups() -> Option<impl Fn(&str) -> bool> {
    if !std::env::args().any(|a| a == "--bench") {
        return None;
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    Some(move |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
}

/// Drops a file's clean pages from the page cache (after syncing it).
pub fn evict(path: &Path) {
    let f = File::open(path).expect("open for evict");
    f.sync_all().expect("sync");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
}
