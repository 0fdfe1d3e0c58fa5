#!/usr/bin/env bash
# Builds the base image that images/Dockerfile's CPU variant starts from, on a machine that can
# run containers but cannot pull `python:3.11-slim` from a registry. A user who can pull never needs it.
#
#   make offline-base                  # prints the image name, e.g. localhost/dlu-pybase:3f2a...
#   make image-cpu CONTAINER_ENGINE=podman CPU_BASE_IMAGE=$(make -s offline-base)
#
# Cached by content hash (this folder, the interpreter, the torch wheel, the CA bundle): with the
# same inputs a second call builds nothing. Needs root, debootstrap, Debian's mirror, a container
# engine (CONTAINER_ENGINE, podman by default) and a self-contained CPython (PYTHON) to copy.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/../podman-containers.conf}
engine=${CONTAINER_ENGINE:-podman}
python=${PYTHON:-python3}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
torch_version=${TORCH_VERSION:-2.13.0}
mirror=${DEBIAN_MIRROR:-$(awk '$1 == "URIs:" {print $2; exit} $1 == "deb" {print $2; exit}' \
  /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)}

say() { echo "offline-base: $*" >&2; }
die() { say "$*"; exit 1; }

command -v "$engine" >/dev/null || die "$engine not found; install it (apt-get install podman runc)"
# the interpreter's own installation, not a virtual environment's (a venv holds no stdlib)
prefix=$("$python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null) || die "cannot run $python; set PYTHON"
case "$prefix" in
  /usr|/usr/|/) die "$python is installed under $prefix (a distribution's Python): copying it would copy the whole of $prefix; set PYTHON to a self-contained CPython (e.g. one from uv or pyenv, installed under /opt or your home)" ;;
esac
[ -r "$ca_bundle" ] || die "no CA bundle at $ca_bundle; set CA_BUNDLE"

work=$(mktemp -d -t dlu-offline-base-XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ctx"
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$work/ctx" "torch==$torch_version" >&2 \
  || die "could not get the torch $torch_version wheel (pip download torch==$torch_version)"
wheel=$(cd "$work/ctx" && ls torch-*.whl)

hash=$( { cat "$here/Containerfile"; "$python" -VV; echo "$prefix $wheel"; sha256sum "$ca_bundle"; } \
  | sha256sum | cut -c1-16)
image=localhost/dlu-pybase:$hash
if "$engine" image inspect "$image" >/dev/null 2>&1; then
  say "$image is up to date"
  echo "$image"
  exit 0
fi

if ! "$engine" image inspect localhost/dlu-bookworm:minbase >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || die "debootstrap not found; apt-get install debootstrap"
  [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR"
  say "debootstrap bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -5 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  tar -C "$work/rootfs" -c . | "$engine" import - localhost/dlu-bookworm:minbase >/dev/null
  rm -rf "$work/rootfs"
fi

say "copying the interpreter from $prefix"
mkdir -p "$work/ctx/python"
tar -C "$prefix" -c --exclude='./lib/python3*/site-packages/*' --exclude='./lib/python3*/test' \
  --exclude='__pycache__' . | tar -C "$work/ctx/python" -x
cp "$ca_bundle" "$work/ctx/ca-certificates.crt"
cp "$here/Containerfile" "$work/ctx/Containerfile"
say "building $image"
"$engine" build --quiet -f "$work/ctx/Containerfile" --build-arg "PY_PREFIX=$prefix" \
  --build-arg "TORCH_WHEEL=$wheel" -t "$image" "$work/ctx" >&2
echo "$image"
