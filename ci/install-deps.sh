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

# Pacemaker and Corosync for the two-node cluster test (ci/ha/cluster.sh,
# vhost-blk/tests/pacemaker.rs); resource-agents brings ocf-tester and the
# agents' shell library. The test runs its own nodes in namespaces; host
# daemons, if the packages start any, are not used.
if ! command -v pacemakerd >/dev/null || ! command -v corosync >/dev/null \
   || ! command -v crm_mon >/dev/null || ! command -v ocf-tester >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    pacemaker corosync pacemaker-cli-utils resource-agents
fi

# libvirt's daemon and QEMU driver for the libvirt guest test
# (vhost-blk/tests/guest_libvirt.rs), which runs libvirtd and virtlogd in
# the foreground with its own directories; nothing starts them here.
if ! command -v libvirtd >/dev/null || ! command -v virtlogd >/dev/null \
   || [ ! -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libvirt-daemon libvirt-daemon-driver-qemu
fi

# The operations tests (vhost-blk/tests/operations.rs): man and groff render
# the man pages, systemd-analyze verifies the units, systemd-socket-activate
# hands the service its socket, dpkg installs the packages into a scratch
# root.
if ! command -v man >/dev/null || ! command -v groff >/dev/null \
   || ! command -v systemd-analyze >/dev/null || ! command -v systemd-socket-activate >/dev/null \
   || ! command -v dpkg-deb >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    man-db groff-base systemd dpkg
fi

# promtool, from Prometheus, checks the metrics text and the example alert
# rules (vhost-blk/tests/metrics.rs). The package's service is not used.
if ! command -v promtool >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi

# The application-consistent bookmark test (vhost-blk/tests/guest_quiesce.rs):
# Debian's QEMU guest agent, whose binary and libraries guest-tests/build.sh
# packs for the guest (its service on this host is not used), and
# e2fsprogs for mkfs.ext4 and fsck.ext4 on the host.
if ! command -v qemu-ga >/dev/null || ! command -v mkfs.ext4 >/dev/null \
   || ! command -v fsck.ext4 >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    qemu-guest-agent e2fsprogs
fi

# The test guest: a Debian cloud kernel and a busybox initramfs.
bash guest-tests/build.sh target/guest

# cargo-fuzz, for the bounded fuzzing run of the request parser.
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

# cargo-deb builds the Debian packages (vhost-blk/OPERATIONS.md); pinned,
# because the test packages the dev profile's binaries, which later
# versions plan to refuse.
if ! cargo deb --version 2>/dev/null | grep -qx 'cargo-deb 3\.8\.0'; then
  cargo install --locked cargo-deb --version 3.8.0
fi

# Fetch every crate up front so a registry hiccup fails here, clearly.
cargo fetch --locked
