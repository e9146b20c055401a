#!/usr/bin/env bash
# The project's test command (README.md): every crate's unit, property and
# integration tests, then a short smoke run of the benchmarks so they keep
# working (their numbers are not checked here; see journal/BENCHMARKS.md).
set -euo pipefail
cargo test --workspace --locked
REWIND_BENCH_QUICK=1 cargo bench --workspace --locked
