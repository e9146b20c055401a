#!/usr/bin/env bash
# Builds the test guest into $1 (default target/guest): the Debian cloud
# kernel and a busybox initramfs with the virtio-blk modules and ./init.
# Each test appends its own /test.sh as a second initramfs archive.
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
echo "guest ready in $out"
