#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh machine of this kind.
set -euo pipefail
cd "$(dirname "$0")/.."

# The machine's toolchain comes from rustup; make sure the linters are there.
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "${component}"
  fi
done

# QEMU 7.2 (vhost-user-blk-pci, qemu-storage-daemon), busybox and cpio for
# the guest, libvirt's XML validator. The machine may ship a newer
# qemu-utils from a backport; pin every QEMU package to the system's 7.2 so
# they install together.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v virt-xml-validate >/dev/null \
   || ! command -v busybox >/dev/null || ! command -v cpio >/dev/null \
   || ! command -v xmllint >/dev/null; then
  apt-get update -qq
  qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$qemu" "qemu-system-common=$qemu" "qemu-utils=$qemu" "qemu-block-extra=$qemu" \
    busybox-static cpio libvirt-clients libxml2-utils
fi
qemu-system-x86_64 --version | head -n 1

# The test guest: a Debian cloud kernel and a busybox initramfs.
bash guest-tests/build.sh target/guest

# cargo-fuzz, for the bounded fuzzing run of the request parser.
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

# Fetch every crate up front so a registry hiccup fails here, clearly.
cargo fetch --locked
