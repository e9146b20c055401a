//! rewind-blk: serves rewind volumes to QEMU guests as vhost-user-blk
//! devices. This crate grows toward the daemon of DESIGN.md; for now it
//! holds the virtio-blk request path (parsing untrusted descriptor chains
//! and running them on a volume).

pub mod request;
