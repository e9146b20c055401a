//! rewind-blk: serves rewind volumes to QEMU guests as vhost-user-blk
//! devices (DESIGN.md, "The daemon").

pub mod backend;
pub mod config;
pub mod control;
pub mod daemon;
pub mod detach;
pub mod device;
pub mod export;
pub mod failover;
pub mod gate;
pub mod inflight;
mod inflight_region;
pub mod logging;
pub mod metrics;
pub mod replication;
pub mod request;
pub mod schedule;
mod syncs;
#[cfg(test)]
mod test_support;
mod uring;
