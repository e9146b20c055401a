#!/usr/bin/env bash
# Builds the test guest into $1 (default target/guest): the Debian cloud
# kernel and a busybox initramfs with the virtio-blk modules and ./init.
# Each test appends its own /test.sh as a second initramfs archive. qga.gz
# is an archive for tests to append too: the QEMU guest agent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-target/guest}" && cd "${1:-target/guest}" && pwd)
cd "$out"
if [ ! -f vmlinuz ]; then
  kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'
  }
  pkg=$(kernel_package)
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(kernel_package)
  fi
  [ -n "$pkg" ] || { echo "no linux-image-cloud-amd64 package in Debian's lists" >&2; exit 1; }
  rm -rf kernel ./*.deb
  apt-get download "$pkg"
  dpkg -x ./*.deb kernel
  cp kernel/boot/vmlinuz-* vmlinuz
fi
rm -rf root
mkdir -p root/bin root/dev root/proc root/sys root/mnt root/tmp root/lib/modules
cp "$(command -v busybox)" root/bin/busybox
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  f=$(find kernel/lib/modules -name "$m.ko" | head -n 1)
  [ -n "$f" ] || { echo "module $m not found in the kernel package" >&2; exit 1; }
  cp "$f" root/lib/modules/
done
install -m 0755 "$here/init" root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -9) > initramfs.gz

# The QEMU guest agent for the tests that freeze the guest's filesystems
# (vhost-blk/tests/guest_quiesce.rs): Debian's qemu-ga, the libraries it
# links and the virtio_console module, in an archive of its own that only
# those tests append (the other guests do not unpack its megabytes).
# Without qemu-ga only that test fails (it says why); the others boot.
qga=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
rm -rf qga-root qga.gz
if [ ! -x "$qga" ]; then
  echo "$qga is missing: no qga.gz (install qemu-guest-agent: ci/install-deps.sh)" >&2
  echo "guest ready in $out"
  exit 0
fi
mkdir -p qga-root/usr/sbin qga-root/lib/modules qga-root/var/run
cp "$qga" qga-root/usr/sbin/qemu-ga
for lib in $(ldd "$qga" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "qga-root$(dirname "$lib")"
  cp -L "$lib" "qga-root$lib"
done
f=$(find kernel/lib/modules -name virtio_console.ko | head -n 1)
[ -n "$f" ] || { echo "module virtio_console not found in the kernel package" >&2; exit 1; }
cp "$f" qga-root/lib/modules/
(cd qga-root && find . | cpio -o -H newc --quiet | gzip -9) > qga.gz
echo "guest ready in $out"
