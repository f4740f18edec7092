#!/bin/bash
# Build the base OS tarball: Debian bookworm (minbase) with the packages in packages.txt,
# trimmed of docs, locales and unneeded kernel modules, with a small initramfs that can
# mount an erofs root from a virtio disk. Only Debian's registry is contacted.
# Usage: build-base.sh OUTPUT.tar
set -euo pipefail

out=$1
here=$(cd "$(dirname "$0")" && pwd)
mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security

strip_comments() { sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$1"; }

packages=$(strip_comments "$here/packages.txt" | paste -sd, -)

dpkgopts=()
while read -r pattern; do
    case $pattern in
        +*) dpkgopts+=("--dpkgopt=path-include=${pattern#+}") ;;
        *) dpkgopts+=("--dpkgopt=path-exclude=$pattern") ;;
    esac
done < <(strip_comments "$here/dpkg-excludes.txt")

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.tar"
trap 'rm -f "$tmp"' EXIT

# The initramfs settings go in before the kernel is installed, so its postinst builds the
# right initramfs once.
mmdebstrap \
    --variant=minbase \
    --include="$packages" \
    "${dpkgopts[@]}" \
    --essential-hook="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" \"\$1/usr/share/initramfs-tools/modules.d\"" \
    --essential-hook="copy-in $here/initramfs.conf /etc/initramfs-tools/conf.d/" \
    --essential-hook="copy-in $here/initramfs-modules /usr/share/initramfs-tools/modules.d/" \
    --essential-hook="copy-in $here/initramfs-tools/hooks /etc/initramfs-tools/" \
    --essential-hook="copy-in $here/initramfs-tools/scripts /etc/initramfs-tools/" \
    --customize-hook="rm -rf \"\$1\"/var/cache/apt/* \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/log/*.log" \
    bookworm "$tmp" \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main"

mv "$tmp" "$out"
