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

# A QEMU >= 9.1 beside the system's 7.2, for the test of a paused VM on a
# restarted daemon (vhost-blk/tests/guest_reattach.rs): before 9.1
# ("vhost-user: fix lost reconnect") QEMU never renegotiates on that
# reconnect, so `cont` cannot work. Its packages come from
# bookworm-backports and are only unpacked into $bpo (nothing installed,
# pinned or upgraded from backports); $bpo/bin/qemu-system-x86_64 runs it
# with its own firmware and modules. The libraries it needs come from
# bookworm.
bpo=/opt/rewind-qemu-bpo
bpo_ok() {
  local v
  v=$("$1/bin/qemu-system-x86_64" --version 2>/dev/null | awk '/version/ {print $4; exit}') || return 1
  [ -n "$v" ] && printf '9.1\n%s\n' "$v" | sort -C -V
}
if ! bpo_ok "$bpo"; then
  # Enable bookworm-backports from the machine's own Debian mirror, unless
  # some source already does.
  if ! grep -rqsE --include='*.list' --include='*.sources' '^[^#]*bookworm-backports' \
       /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri="" keyring=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
      read -r uri keyring < <(awk 'BEGIN { RS = ""; FS = "\n" }
        { uri = ""; key = ""; ok = 0
          for (i = 1; i <= NF; i++) {
            n = split($i, w, /[ \t]+/)
            if (w[1] == "URIs:") uri = w[2]
            if (w[1] == "Signed-By:") key = w[2]
            if (w[1] == "Suites:") for (j = 2; j <= n; j++) if (w[j] == "bookworm") ok = 1
          }
          if (ok && uri != "") { print uri, key; exit } }' /etc/apt/sources.list.d/debian.sources) || true
    fi
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
      uri=$(sed -E 's/\[[^]]*\]//' /etc/apt/sources.list | awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }')
    fi
    if [ -z "$uri" ]; then
      echo "install-deps: no bookworm source in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list to derive bookworm-backports from" >&2
      exit 1
    fi
    {
      echo "Types: deb"
      echo "URIs: $uri"
      echo "Suites: bookworm-backports"
      echo "Components: main"
      if [ -n "$keyring" ]; then echo "Signed-By: $keyring"; fi
    } > /etc/apt/sources.list.d/rewind-bookworm-backports.sources
  fi
  apt-get update -qq
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  chown _apt: "$work" 2>/dev/null || true
  (cd "$work" && apt-get download -qq qemu-system-x86/bookworm-backports \
    qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports \
    seabios/bookworm-backports)
  # The libraries it needs that are not installed yet, from bookworm (apt
  # fails if bookworm lacks one; a too old one fails the --version below).
  missing=$(for deb in "$work"/qemu-system-x86_*.deb "$work"/qemu-system-common_*.deb; do
    dpkg-deb -f "$deb" Depends; done | tr ',' '\n' | sed -E 's/\(.*//; s/\|.*//; s/[[:space:]]//g' \
    | grep '^lib' | sort -u | while read -r lib; do
      dpkg-query -W -f '${db:Status-Abbrev}' "$lib" 2>/dev/null | grep -q '^ii' || echo "$lib"
    done)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  fi
  rm -rf "$bpo.new"
  for deb in "$work"/*.deb; do dpkg -x "$deb" "$bpo.new"; done
  mkdir -p "$bpo.new/bin"
  cat > "$bpo.new/bin/qemu-system-x86_64" <<'WRAPPER'
#!/bin/sh
# QEMU from bookworm-backports unpacked beside the system's (ci/install-deps.sh):
# its own firmware first, its own modules.
prefix=$(dirname "$(dirname "$(readlink -f "$0")")")
QEMU_MODULE_DIR="$prefix/usr/lib/x86_64-linux-gnu/qemu" exec "$prefix/usr/bin/qemu-system-x86_64" \
  -L "$prefix/usr/share/seabios" -L "$prefix/usr/share/qemu" "$@"
WRAPPER
  chmod 755 "$bpo.new/bin/qemu-system-x86_64"
  if ldd "$bpo.new/usr/bin/qemu-system-x86_64" | grep 'not found'; then
    echo "install-deps: the backports QEMU lacks libraries (above)" >&2
    exit 1
  fi
  if ! bpo_ok "$bpo.new"; then
    echo "install-deps: the QEMU unpacked into $bpo.new does not run or is older than 9.1:" >&2
    "$bpo.new/bin/qemu-system-x86_64" --version >&2 || true
    exit 1
  fi
  rm -rf "$bpo"
  mv "$bpo.new" "$bpo"
  rm -rf "$work"
  trap - EXIT
fi
"$bpo/bin/qemu-system-x86_64" --version | head -n 1

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

# fio measures the device's own limit for the cold-cache bench
# (vhost-blk/benches/cold.rs).
if ! command -v fio >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fio
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
