#!/usr/bin/env bash
# The README's two commands on a fresh Debian 13, as a new user would run them (not in the
# default test run: it takes minutes and needs root, debootstrap and Debian's package pool).
#
#   bash tests/fresh_host.sh [ROOTFS]
#   bash tests/fresh_host.sh --carried [ROOTFS]
#   bash tests/fresh_host.sh --arch=arm64 [ROOTFS]
#
# Makes a minimal Debian 13 (trixie) root with debootstrap in ROOTFS (default /srv/trixie;
# an existing one is reused), copies this clone's tracked files and a local copy of
# CIFAR-10 ($CIFAR10_REAL_DATADIR, else ./data) into it, and runs there, exactly as written:
#   bash setup.sh && .venv/bin/python cifar10_convnet.py --nepoch=1
#   bash setup.sh --test && .venv/bin/python -m pytest -q
# Debian 13 has Python 3.13 and no 3.11, so setup.sh has to bring its own.
# --carried: instead, what the GPU machine does with .gpu-carry/venv-gpu.tar.xz (`bash setup.sh
# --pack`): with no network at all (a network namespace of its own) and at another path than
# the one it was packed at, `bash setup.sh --gpu --from=...`, then a CPU run of the driver, and
# device=cuda refused at once (no GPU here).
# --arch=arm64: the same two commands on a Debian 13 for 64-bit ARM (default root /srv/trixie-arm64),
# run through qemu-user-static (installed and registered with the kernel's binfmt_misc if need be):
# g++ about 12 times slower, training about 250 times, so the tests are those of the layers and
# the ops only, and the data folder's ZCA cache is copied in if there is one (about an hour).
set -euo pipefail
cd "$(dirname "$0")/.."
carried=0; arch=""; emulated=0
[ "${1:-}" != --carried ] || { carried=1; shift; }
case "${1:-}" in --arch=?*) arch=${1#--arch=}; shift ;; esac
[ $carried -eq 0 ] || [ -z "$arch" ] || { echo "fresh_host.sh: --carried is the GPU machine's x86 set-up, not for --arch" >&2; exit 2; }
ROOTFS=${1:-/srv/trixie${arch:+-$arch}}
DATA=${CIFAR10_REAL_DATADIR:-data}
[ -d "$DATA/cifar-10-batches-py" ] || { echo "fresh_host.sh: no CIFAR-10 at $DATA/cifar-10-batches-py" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "fresh_host.sh: run as root (debootstrap, chroot)" >&2; exit 1; }

if [ -n "$arch" ] && [ "$arch" != "$(dpkg --print-architecture)" ]; then   # another CPU's programs through qemu
  emulated=1
  qemu=$(dpkg-architecture -a "$arch" -qDEB_HOST_GNU_CPU 2>/dev/null || echo "${arch/arm64/aarch64}")
  [ -f /usr/lib/binfmt.d/qemu-$qemu.conf ] || { apt-get update -qq && apt-get install -y -qq qemu-user-static >/dev/null; }
  [ -f /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -f "/proc/sys/fs/binfmt_misc/qemu-$qemu" ] || cat "/usr/lib/binfmt.d/qemu-$qemu.conf" > /proc/sys/fs/binfmt_misc/register
fi
if [ ! -x "$ROOTFS/bin/bash" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  # (|| true: a host without one of these files, or a head that closes the pipe early, is no error)
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
           grep -Eo '(https?|file)://[^ ]*/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)
  debootstrap ${arch:+--arch="$arch"} --variant=minbase trixie "$ROOTFS" ${mirror:+"$mirror"}
fi

repo=$ROOTFS/home/user/project
[ $carried -eq 0 ] || { [ -f .gpu-carry/venv-gpu.tar.xz ] || { echo "fresh_host.sh: run bash setup.sh --pack first" >&2; exit 1; }
                        repo=$ROOTFS/home/user/carried; }
rm -rf "$repo" && mkdir -p "$repo/data"
git ls-files -z | (cd . && xargs -0 cp --parents -t "$repo")
cp -r "$DATA/cifar-10-batches-py" "$repo/data/"
# emulated, numpy's ZCA fit alone ran for over a quarter of an hour: the one fitted here is taken
[ $emulated -eq 0 ] || [ ! -d "$DATA/cache" ] || cp -r "$DATA/cache" "$repo/data/"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
# this machine's network goes through its own certificate authority: the root gets the same bundle
for bundle in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}"; do
  [ -n "$bundle" ] && [ -f "$bundle" ] && mkdir -p "$ROOTFS$(dirname "$bundle")" && cp "$bundle" "$ROOTFS$bundle"
done
for fs in proc sys dev; do mount --bind "/$fs" "$ROOTFS/$fs"; done
trap 'for fs in dev sys proc; do umount -l "$ROOTFS/$fs"; done' EXIT

echo "== $(. "$ROOTFS/etc/os-release"; echo "$PRETTY_NAME"); python3: $(chroot "$ROOTFS" sh -c 'command -v python3 || echo none')"
if [ $carried -eq 1 ]; then
  mkdir -p "$repo/.gpu-carry" && cp .gpu-carry/venv-gpu.tar.xz "$repo/.gpu-carry/"
  chroot "$ROOTFS" sh -c 'command -v xz >/dev/null || command -v python3 >/dev/null' ||  # minbase has neither
    chroot "$ROOTFS" sh -c 'apt-get install -y -qq xz-utils >/dev/null'
  unshare --net chroot "$ROOTFS" /bin/bash -lc 'cd /home/user/carried &&
    time bash setup.sh --gpu --from=.gpu-carry/venv-gpu.tar.xz &&
    .venv/bin/python -c "import machine, pygpu; print(\"pygpu\", pygpu.__version__)" &&
    time .venv/bin/python cifar10_convnet.py --nepoch=1 &&
    { THEANO_FLAGS=device=cuda .venv/bin/python cifar10_convnet.py; echo "device=cuda: exit $?"; }'
  exit
fi
tests=""; [ $emulated -eq 0 ] || tests="tests/test_convnet.py tests/test_nnet.py tests/test_cpuops.py tests/test_cpublas.py"
chroot "$ROOTFS" /bin/bash -lc "uname -m && cd /home/user/project &&
  time (bash setup.sh && .venv/bin/python cifar10_convnet.py --nepoch=1) &&
  time (bash setup.sh --test && .venv/bin/python -m pytest -q $tests)"
