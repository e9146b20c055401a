#!/usr/bin/env bash
# The project's test command (README.md): a short smoke run of the
# benchmarks so they keep working (their numbers are not checked here; see
# journal/BENCHMARKS.md), then every crate's unit, property, integration and
# guest tests, and a total.
set -euo pipefail
cd "$(dirname "$0")/.."
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-journal --bench journal
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-journal --bench history
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-vhost-blk --bench vs_qsd
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-vhost-blk --bench cold
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-vhost-blk --bench drain
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-vhost-blk --bench replication
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-vhost-blk --bench failover
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-vhost-blk --bench at_limit
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-vhost-blk --bench detach
# Fuzz the virtio-blk request parser for a bounded time. The machine has
# only a stable toolchain; cargo-fuzz needs -Z flags for its sanitizer,
# which RUSTC_BOOTSTRAP allows.
(cd vhost-blk && RUSTC_BOOTSTRAP=1 cargo fuzz run request -- -max_total_time=30 2>&1 | tail -n 2)
# And the replication frame decoder, which takes bytes from the network.
(cd vhost-blk && RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_total_time=30 2>&1 | tail -n 2)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
