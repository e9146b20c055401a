#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh machine of this kind.
set -euo pipefail

# The machine's toolchain comes from rustup; make sure the linters are there.
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "${component}"
  fi
done

# Fetch every crate up front so a registry hiccup fails here, clearly.
cargo fetch --locked
