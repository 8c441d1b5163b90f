#!/usr/bin/env bash
# The README's two commands on a fresh Debian 13, as a new user would run them (not in the
# default test run: it takes minutes and needs root, debootstrap and Debian's package pool).
#
#   bash tests/fresh_host.sh [ROOTFS]
#
# Makes a minimal Debian 13 (trixie) root with debootstrap in ROOTFS (default /srv/trixie;
# an existing one is reused), copies this clone's tracked files and a local copy of
# CIFAR-10 ($CIFAR10_REAL_DATADIR, else ./data) into it, and runs there, exactly as written:
#   bash setup.sh && .venv/bin/python cifar10_convnet.py --nepoch=1
#   bash setup.sh --test && .venv/bin/python -m pytest -q
# Debian 13 has Python 3.13 and no 3.11, so setup.sh has to bring its own.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOTFS=${1:-/srv/trixie}
DATA=${CIFAR10_REAL_DATADIR:-data}
[ -d "$DATA/cifar-10-batches-py" ] || { echo "fresh_host.sh: no CIFAR-10 at $DATA/cifar-10-batches-py" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "fresh_host.sh: run as root (debootstrap, chroot)" >&2; exit 1; }

if [ ! -x "$ROOTFS/bin/bash" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
           grep -Eo '(https?|file)://[^ ]*/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ')
  debootstrap --variant=minbase trixie "$ROOTFS" "$mirror"
fi

repo=$ROOTFS/home/user/project
rm -rf "$repo" && mkdir -p "$repo/data"
git ls-files -z | (cd . && xargs -0 cp --parents -t "$repo")
cp -r "$DATA/cifar-10-batches-py" "$repo/data/"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
# this machine's network goes through its own certificate authority: the root gets the same bundle
for bundle in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}"; do
  [ -n "$bundle" ] && [ -f "$bundle" ] && mkdir -p "$ROOTFS$(dirname "$bundle")" && cp "$bundle" "$ROOTFS$bundle"
done
for fs in proc sys dev; do mount --bind "/$fs" "$ROOTFS/$fs"; done
trap 'for fs in dev sys proc; do umount -l "$ROOTFS/$fs"; done' EXIT

echo "== $(. "$ROOTFS/etc/os-release"; echo "$PRETTY_NAME"); python3: $(chroot "$ROOTFS" sh -c 'command -v python3 || echo none')"
chroot "$ROOTFS" /bin/bash -lc 'cd /home/user/project &&
  time (bash setup.sh && .venv/bin/python cifar10_convnet.py --nepoch=1) &&
  time (bash setup.sh --test && .venv/bin/python -m pytest -q)'
