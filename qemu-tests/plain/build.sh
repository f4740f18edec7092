#!/bin/bash
# A plain Debian 12 VM image, for proving the Debian package on a host that is not ours:
# Debian's own packages only (no kubespan, none of image/'s files), an ext4 root the VM may
# write to, booted directly (kernel and initramfs beside it).
# Usage: build.sh OUTDIR   -> OUTDIR/{vmlinuz,initrd.img,root.ext4}
set -euo pipefail

out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security
# What a minimal server has, the guest agent and ping the lab drives it with, and what the
# package depends on or recommends (python3, nftables; wireguard-tools): the lab has no
# mirror for apt to fetch them from.
packages=linux-image-amd64,initramfs-tools,systemd,systemd-sysv,udev,dbus,kmod,iproute2,e2fsprogs,qemu-guest-agent,iputils-ping,python3,nftables,wireguard-tools

work=$(mktemp -d "${TMPDIR:-/tmp}/plain-debian.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# A small initramfs that mounts an ext4 root from a virtio disk (the default, MODULES=most,
# boots too slowly under emulation).
mmdebstrap --quiet --variant=minbase --include="$packages" \
    --essential-hook="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" \"\$1/usr/share/initramfs-tools/modules.d\"" \
    --essential-hook="copy-in $here/initramfs.conf /etc/initramfs-tools/conf.d/" \
    --essential-hook="copy-in $here/initramfs-modules /usr/share/initramfs-tools/modules.d/" \
    --customize-hook="echo 'plain' > \"\$1/etc/hostname\"" \
    --customize-hook="echo '/dev/vda / ext4 defaults 0 1' > \"\$1/etc/fstab\"" \
    --customize-hook="chroot \"\$1\" systemctl enable systemd-networkd.service" \
    --customize-hook="rm -rf \"\$1\"/var/cache/apt/archives/*.deb" \
    bookworm "$root" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main"

mkdir -p "$out"
cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/initrd.img"
mke2fs -q -t ext4 -L plain-root -d "$root" "$work/root.ext4" 2G
for f in vmlinuz initrd.img root.ext4; do mv "$work/$f" "$out/$f"; done
echo "plain Debian image: $out/root.ext4"
