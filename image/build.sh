#!/bin/sh
# Build the stand-in eBuilder image from Debian's busybox-static.
# Usage: image/build.sh [TAG]   (default: ebuilder-standin:latest)
set -eu
tag=${1:-ebuilder-standin:latest}
here=$(cd "$(dirname "$0")" && pwd)
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 1; }
if ! file -L "$busybox" 2>/dev/null | grep -q static && ! ldd "$busybox" 2>&1 | grep -q "not a dynamic"; then
    echo "$busybox is not static: apt-get install busybox-static" >&2; exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$here/entrypoint.sh" "$here/login.cgi" "$ctx/"
cp "$busybox" "$ctx/busybox"
# The legacy builder warns about buildx on every build; show output only on failure.
if ! out=$(docker build -q -t "$tag" "$ctx" 2>&1); then echo "$out" >&2; exit 1; fi
echo "built $tag"
