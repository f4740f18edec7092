#!/bin/bash
# Build an OCI image archive of the kubespan discovery service from Debian packages, without
# a container engine: mmdebstrap makes the root file system (bookworm: python3 and the
# service's three dependencies as Debian packages), the kubespan package is added as its
# wheel's files, and umoci wraps it as an OCI image with its configuration.
# Usage: build.sh OUTPUT.tar   (an oci-archive: `podman load -i`, `skopeo copy oci-archive:`)
# Needs: mmdebstrap, umoci, root (file ownership inside the image). PYTHON builds the wheel.
set -euo pipefail

out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
python=$(realpath -m "${PYTHON:-$repo/.venv/bin/python}")
mirror=http://deb.debian.org/debian
uid=65532
site=/usr/lib/kubespan/site-packages
state=/var/lib/kubespan-discovery
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$repo/extension/wheel.sh" "$python" "$work/wheels"
wheel=$(echo "$work"/wheels/kubespan-*.whl)
"$python" -m zipfile -e "$wheel" "$work/site"
rm -rf "$work"/site/kubespan-*.dist-info

# Only what serving needs: no shell tools beyond minbase, no apt lists, no docs.
mmdebstrap --variant=minbase --quiet \
    --include=python3-minimal,python3-nacl,python3-httptools,python3-uvloop \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="mkdir -p \"\$1$site\" && cp -a \"$work/site/.\" \"\$1$site/\"" \
    --customize-hook="install -m 0755 \"$repo/extension/kubespan.py\" \"\$1/usr/bin/kubespan\"" \
    --customize-hook="chroot \"\$1\" python3 -m compileall -q \"$site\"" \
    --customize-hook="echo 'kubespan:x:$uid:$uid:kubespan discovery:/nonexistent:/usr/sbin/nologin' >> \"\$1/etc/passwd\"" \
    --customize-hook="echo 'kubespan:x:$uid:' >> \"\$1/etc/group\"" \
    --customize-hook="install -d -m 0700 -o $uid -g $uid \"\$1$state\"" \
    --customize-hook="rm -rf \"\$1\"/var/cache/apt/* \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/log/*" \
    bookworm "$work/rootfs.tar" "deb $mirror bookworm main"

umoci init --layout "$work/oci"
umoci new --image "$work/oci:latest"
umoci unpack --image "$work/oci:latest" "$work/bundle"
tar -C "$work/bundle/rootfs" --numeric-owner -xpf "$work/rootfs.tar"
umoci repack --image "$work/oci:latest" "$work/bundle"
umoci config --image "$work/oci:latest" \
    --os linux --architecture amd64 \
    --config.user "$uid:$uid" \
    --config.workingdir / \
    --config.env PYTHONDONTWRITEBYTECODE=1 \
    --config.entrypoint /usr/bin/kubespan --config.entrypoint discovery \
    --config.entrypoint serve \
    --config.cmd --listen --config.cmd '[::]:3000' \
    --config.cmd --metrics-listen --config.cmd '[::]:9091' \
    --config.cmd --state-dir --config.cmd "$state" \
    --config.exposedports 3000/tcp --config.exposedports 3478/udp --config.exposedports 9091/tcp \
    --config.volume "$state" \
    --config.label org.opencontainers.image.title=kubespan-discovery \
    --config.label org.opencontainers.image.description="kubespan discovery service"
umoci gc --layout "$work/oci"

mkdir -p "$(dirname "$out")"
tar -C "$work/oci" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "container image: $out ($(du -h --apparent-size "$out" | cut -f1))"
