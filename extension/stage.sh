#!/bin/bash
# Stage kubespan's /usr tree into ROOT: the kubespan package with all its Python dependencies
# (the discovery service's included) as wheels for Debian 12 (CPython 3.11, x86_64, glibc
# 2.36) under /usr/lib/kubespan/site-packages, precompiled; the `kubespan` command; its
# systemd unit, tmpfiles entry and sysctl file; the discovery service's unit (not enabled).
# Both packagings start from this tree: extension/build.sh (the systemd-sysext image) and
# deb/build.sh (the Debian package) add only what is their own.
# Usage: stage.sh ROOT   (ROOT must not exist yet, or be empty; PYTHON defaults to
# .venv/bin/python)
# The build's identity goes into the package as kubespan/BUILD (`kubespan --version`, the
# agent's start line): $KUBESPAN_BUILD, or the UTC time and the git commit (-dirty when the
# tree has changes), or the UTC time alone outside a git checkout.
set -euo pipefail

root=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=$(realpath -m "${PYTHON:-$repo/.venv/bin/python}")
site=/usr/lib/kubespan/site-packages
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ -e $root && -n $(ls -A "$root") ]]; then
    echo "stage.sh: $root is not empty" >&2
    exit 1
fi

"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "need CPython 3.11 (the guest'"'"'s) to precompile"'

build=${KUBESPAN_BUILD:-}
if [[ -z $build ]]; then
    build=$(date -u +%Y%m%dT%H%M%SZ)
    if commit=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null); then
        build+="-$commit"
        [[ -z $(git -C "$repo" --no-optional-locks status --porcelain 2>/dev/null) ]] ||
            build+="-dirty"
    fi
fi
# The shape kubespan.BUILD_ID_PATTERN accepts (anything else would read as no stamp).
if ! [[ $build =~ ^[A-Za-z0-9][A-Za-z0-9._+:-]{0,63}$ ]]; then
    echo "KUBESPAN_BUILD=$build: use 1 to 64 of A-Z a-z 0-9 . _ + : - (first a letter or digit)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$repo/extension/wheel.sh" "$python" "$work/wheels"

# Install it with its dependencies as binary wheels for the guest, not for this host.
"$python" -m pip install --quiet --no-compile --no-warn-script-location \
    --target "$root$site" --only-binary=:all: \
    --platform manylinux_2_36_x86_64 --platform manylinux2014_x86_64 \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    "$(echo "$work"/wheels/kubespan-*.whl)[server]"
rm -rf "${root:?}$site/bin"
printf '%s\n' "$build" > "$root$site/kubespan/BUILD"
chmod 0644 "$root$site/kubespan/BUILD"
# The root file system is read-only: precompile, and never check sources again at run time.
"$python" -m compileall -q -j0 --invalidation-mode unchecked-hash -s "$root" -p / "$root$site"

install -D -m 0755 "$here/kubespan.py" "$root/usr/bin/kubespan"
install -D -m 0644 "$here/kubespan.service" "$root/usr/lib/systemd/system/kubespan.service"
install -D -m 0644 "$here/kubespan.tmpfiles" "$root/usr/lib/tmpfiles.d/kubespan.conf"
# The discovery service's unit: shipped, not enabled (a node is not a discovery service).
install -D -m 0644 "$repo/deploy/discovery/kubespan-discovery.service" \
    "$root/usr/lib/systemd/system/kubespan-discovery.service"
install -D -m 0644 "$here/kubespan.sysctl" "$root/usr/lib/sysctl.d/60-kubespan.conf"
