#!/usr/bin/env bash
# The project's test command (README.md): a short smoke run of the
# benchmarks so they keep working (their numbers are not checked here; see
# journal/BENCHMARKS.md), then every crate's unit, property and integration
# tests.
set -euo pipefail
REWIND_BENCH_QUICK=1 cargo bench --locked -p rewind-journal --bench journal
cargo test --workspace --locked
