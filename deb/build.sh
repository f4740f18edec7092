#!/bin/bash
# Build the kubespan Debian package (Debian 12, amd64): the /usr tree extension/stage.sh
# stages for the system extension, plus /etc/kubespan with an example machine config (a
# conffile), the documentation Debian asks for, and the maintainer scripts of this directory.
# Usage: build.sh OUTDIR   (PYTHON defaults to .venv/bin/python; KUBESPAN_BUILD as stage.sh;
# DEB_MAINTAINER overrides the Maintainer field)
# Writes OUTDIR/kubespan_VERSION_amd64.deb and removes other kubespan_*_amd64.deb there, so
# `apt install ./OUTDIR/kubespan_*.deb` names one package. VERSION is pyproject.toml's
# version (PEP 440 pre-releases as Debian's ~) + the build stamp, with the stamp's _ : -
# turned into dots: 0.1.0+20250101T120000Z.0123456789ab sorts after every earlier build.
set -euo pipefail

outdir=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=$(realpath -m "${PYTHON:-$repo/.venv/bin/python}")
maintainer=${DEB_MAINTAINER:-kubespan maintainers <maintainers@kubespan.invalid>}
# Files are root's whatever the builder's umask; scripts and directories 0755, the rest 0644.
umask 022

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root

"$here/../extension/stage.sh" "$root"
build=$(cat "$root/usr/lib/kubespan/site-packages/kubespan/BUILD")

upstream=$("$python" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])' "$repo/pyproject.toml")
upstream=$(sed -E 's/[.-]?(a|b|rc|dev)([0-9]+)/~\1\2/g' <<<"$upstream")
version="$upstream+$(tr '_:-' '...' <<<"$build")"
if ! [[ $version =~ ^[0-9][A-Za-z0-9.+~]*$ ]]; then
    echo "deb: $version is not a Debian version (from pyproject.toml's version and the stamp)" >&2
    exit 1
fi

# /etc/kubespan holds the cluster secret (machineconfig.yaml): root's alone, whatever mode a
# copy of the example ends up with.
install -d -m 0700 "$root/etc/kubespan"
install -m 0644 "$here/machineconfig.yaml.example" "$root/etc/kubespan/machineconfig.yaml.example"
install -D -m 0644 "$here/kubespan-package.conf" \
    "$root/usr/lib/systemd/system/kubespan.service.d/10-package.conf"
install -D -m 0644 "$here/copyright" "$root/usr/share/doc/kubespan/copyright"
# Debian wants a changelog with every package: this build's entry (the project's history is
# its git log).
printf '%s\n' "kubespan ($version) unstable; urgency=medium" "" \
    "  * Build $build of kubespan $upstream." "" \
    " -- $maintainer  $(date -u -R ${SOURCE_DATE_EPOCH:+-d "@$SOURCE_DATE_EPOCH"})" |
    gzip -9n >"$root/usr/share/doc/kubespan/changelog.gz"
chmod 0644 "$root/usr/share/doc/kubespan/changelog.gz"

size=$(du -s -k --apparent-size "$root" | cut -f1)
mkdir -p "$root/DEBIAN"
# dpkg --verify's sums: every file but the conffile (dpkg keeps its own sum of that).
(cd "$root" && find usr -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
control=$(<"$here/control")
control=${control//@VERSION@/"$version"}
control=${control//@INSTALLED_SIZE@/"$size"}
control=${control//@MAINTAINER@/"$maintainer"}
printf '%s\n' "$control" >"$root/DEBIAN/control"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
echo /etc/kubespan/machineconfig.yaml.example >"$root/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"

mkdir -p "$outdir"
deb=$outdir/kubespan_${version}_amd64.deb
# xz as Debian's own packages, at level 1: 9 MB in 3 s where the default level's 8 MB takes 15.
dpkg-deb -Zxz -z1 --build --root-owner-group "$root" "$work/kubespan.deb" >/dev/null
for old in "$outdir"/kubespan_*_amd64.deb; do
    [[ $old == "$deb" ]] || rm -f "$old"
done
mv "$work/kubespan.deb" "$deb"
echo "deb: $deb ($(du -h --apparent-size "$deb" | cut -f1)), build $build"
