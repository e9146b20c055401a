//! A journal file's O_DIRECT descriptor (cold reads use it): an open
//! refused for want of descriptors is not remembered, so direct reads come
//! back once descriptors are free again. Alone in its test binary, as it
//! lowers the process's descriptor limit.

use std::fs::File;
use std::os::fd::AsRawFd;

use rewind_journal::{OsStorage, Storage};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

#[test]
fn a_direct_descriptor_refused_for_want_of_descriptors_is_tried_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = OsStorage
        .create_new(&dir.path().join("segment"))
        .expect("create");
    let limit = getrlimit(Resource::Nofile);
    // The lowest free descriptor becomes the limit: the next open fails
    // with EMFILE.
    let lowest = File::open("/dev/null").expect("probe").as_raw_fd();
    let lowered = Rlimit {
        current: Some(lowest as u64),
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, lowered).expect("lower the limit");
    let refused = file.direct_fd();
    setrlimit(Resource::Nofile, limit).expect("restore the limit");
    assert_eq!(refused, None, "no descriptor was free");
    let fd = file.direct_fd().expect("opened once descriptors are free");
    assert_eq!(file.direct_fd(), Some(fd), "and kept");
}
