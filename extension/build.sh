#!/bin/bash
# Build the kubespan system extension: an erofs image holding, under /usr, the tree
# extension/stage.sh stages (the kubespan package with all its Python dependencies, the
# discovery service's included, as wheels for the guest: CPython 3.11, x86_64, glibc 2.36;
# the `kubespan` command, its systemd unit, tmpfiles entry and sysctl file), plus what only
# an extension has: the unit's enablement link and the extension-release file systemd-sysext
# matches against the base image.
# Usage: build.sh OUTPUT.raw   (run from anywhere; PYTHON defaults to .venv/bin/python)
# The build's identity goes into the package as kubespan/BUILD (`kubespan --version`, the
# agent's start line): $KUBESPAN_BUILD, or the UTC time and the git commit (-dirty when the
# tree has changes), or the UTC time alone outside a git checkout (stage.sh).
set -euo pipefail

out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)

work=$(mktemp -d)
trap 'rm -rf "$work" "$out.tmp"' EXIT
root=$work/root

"$here/stage.sh" "$root"
build=$(cat "$root/usr/lib/kubespan/site-packages/kubespan/BUILD")

# systemd-sysext does not apply [Install] sections: ship the enablement link itself.
mkdir -p "$root/usr/lib/systemd/system/multi-user.target.wants"
ln -s ../kubespan.service "$root/usr/lib/systemd/system/multi-user.target.wants/kubespan.service"
install -D -m 0644 "$here/extension-release" \
    "$root/usr/lib/extension-release.d/extension-release.kubespan"

mkdir -p "$(dirname "$out")"
mkfs.erofs --quiet -zlz4hc --all-root "$out.tmp" "$root"
mv "$out.tmp" "$out"
echo "extension: $out ($(du -h --apparent-size "$out" | cut -f1)), build $build"
