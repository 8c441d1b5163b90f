#!/usr/bin/env bash
# The project on a fresh Debian, as a new user would run it (not in the default test run: it takes
# minutes and needs root, debootstrap and Debian's package pool).
#
#   bash tests/fresh_host.sh [--release=R] [--suite=S] [ROOTFS]
#   bash tests/fresh_host.sh --carried [ROOTFS]
#   bash tests/fresh_host.sh --arch=arm64 [ROOTFS]
#
# Makes a minimal Debian root with debootstrap in ROOTFS (default /srv/RELEASE; an existing one is
# reused), copies this clone's tracked files and a local copy of CIFAR-10 ($CIFAR10_REAL_DATADIR,
# else ./data) into it, and runs there:
#   --release=trixie (Debian 13, the default): Python 3.13 and no 3.11, so setup.sh brings its own;
#     bookworm (Debian 12) and bullseye (Debian 11: Python 3.9, glibc 2.31) come with their python3.
#   --suite=readme (the default): the README's two commands, exactly as written:
#       bash setup.sh && .venv/bin/python cifar10_convnet.py --nepoch=1
#       bash setup.sh --test && .venv/bin/python -m pytest -q
#   --suite=gpu: bash setup.sh --gpu, then a bare `import pygpu`, NVRTC and cuBLAS in .venv,
#     device=cuda refused in one line (no GPU there), and the CPU run's first epoch.
#   --suite=ci: CI's own script, `CI=true bash .ci/run`, with ../shared beside the clone and an
#     empty HOME (no compile cache): the check to run before a release and after a change to the
#     set-up or to compiling.
# --carried: instead, what the GPU machine does with .gpu-carry/venv-gpu.tar.xz (`bash setup.sh
# --pack`): with no network at all (a network namespace of its own) and at another path than
# the one it was packed at, `bash setup.sh --gpu --from=...`, then a CPU run of the driver, and
# device=cuda refused at once (no GPU here).
# --arch=arm64: the README's two commands on a Debian 13 for 64-bit ARM (default root
# /srv/trixie-arm64), run through qemu-user-static (installed and registered with the kernel's
# binfmt_misc if need be): g++ about 12 times slower, training about 250 times, so the tests are
# those of the layers and the ops only, and the data folder's ZCA cache is copied in if there is
# one (about an hour).
set -euo pipefail
cd "$(dirname "$0")/.."
carried=0; arch=""; emulated=0; release=trixie; suite=readme
for arg in "$@"; do
  case "$arg" in
    --carried) carried=1 ;;
    --arch=?*) arch=${arg#--arch=} ;;
    --release=bullseye|--release=bookworm|--release=trixie) release=${arg#--release=} ;;
    --suite=readme|--suite=gpu|--suite=ci) suite=${arg#--suite=} ;;
    -*) echo "usage: bash tests/fresh_host.sh [--release=bullseye|bookworm|trixie] [--suite=readme|gpu|ci] [ROOTFS]" \
             "| --carried [ROOTFS] | --arch=ARCH [ROOTFS]" >&2; exit 2 ;;
    *) ROOTFS=$arg ;;
  esac
done
[ $carried -eq 0 ] || [ -z "$arch" ] || { echo "fresh_host.sh: --carried is the GPU machine's x86 set-up, not for --arch" >&2; exit 2; }
[ -z "$arch" ] || [ $suite = readme ] || { echo "fresh_host.sh: --arch runs the README's commands only" >&2; exit 2; }
ROOTFS=${ROOTFS:-/srv/$release${arch:+-$arch}}
DATA=${CIFAR10_REAL_DATADIR:-data}
[ $suite = ci ] || [ -d "$DATA/cifar-10-batches-py" ] || { echo "fresh_host.sh: no CIFAR-10 at $DATA/cifar-10-batches-py" >&2; exit 1; }
[ $suite != ci ] || [ -d ../shared ] || { echo "fresh_host.sh: --suite=ci needs ../shared, as CI has it" >&2; exit 1; }
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
  debootstrap ${arch:+--arch="$arch"} --variant=minbase "$release" "$ROOTFS" ${mirror:+"$mirror"}
fi

repo=$ROOTFS/home/user/project
[ $carried -eq 0 ] || { [ -f .gpu-carry/venv-gpu.tar.xz ] || { echo "fresh_host.sh: run bash setup.sh --pack first" >&2; exit 1; }
                        repo=$ROOTFS/home/user/carried; }
rm -rf "$repo" && mkdir -p "$repo/data"
git ls-files -z | (cd . && xargs -0 cp --parents -t "$repo")
[ $suite = ci ] || cp -r "$DATA/cifar-10-batches-py" "$repo/data/"
[ $suite != ci ] || { rm -rf "$ROOTFS/home/user/shared" && cp -r ../shared "$ROOTFS/home/user/shared"; }
# emulated, numpy's ZCA fit alone ran for over a quarter of an hour: the one fitted here is taken
[ $emulated -eq 0 ] || [ ! -d "$DATA/cache" ] || cp -r "$DATA/cache" "$repo/data/"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
# this machine's network may go through its own certificate authority: the root gets the same
# bundle, and the same authorities for its ca-certificates (installed with python3) to keep
for bundle in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}"; do
  [ -n "$bundle" ] && [ -f "$bundle" ] && mkdir -p "$ROOTFS$(dirname "$bundle")" && cp "$bundle" "$ROOTFS$bundle"
done
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  mkdir -p "$ROOTFS/usr/local/share/ca-certificates" && cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
fi
# with their submounts (/sys/fs/cgroup: slurmd needs it), as slaves: unmounting them here never
# unmounts the host's
for fs in proc sys dev; do mount --rbind "/$fs" "$ROOTFS/$fs" && mount --make-rslave "$ROOTFS/$fs"; done
trap 'for fs in dev sys proc; do umount -l "$ROOTFS/$fs"; done' EXIT
in_root() { HOME=/home/user/home chroot "$ROOTFS" /usr/bin/env -u CIFAR10_REAL_DATADIR /bin/bash -lc "$1"; }   # the host's data path means nothing there

# Debian 11 and 12 as their users have them: with their python3 (Debian 13 stays without, so
# setup.sh brings its Python 3.11); CI's machines have a python3 and its venv
want=(); [ $release = trixie ] || want+=(python3); [ $suite != ci ] || want+=(python3 python3-venv git)
if [ ${#want[@]} -gt 0 ] && [ $carried -eq 0 ]; then
  in_root "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${want[*]} >/dev/null &&
           { ! command -v update-ca-certificates >/dev/null || update-ca-certificates >/dev/null; }"
fi
rm -rf "$ROOTFS/home/user/home" && mkdir -p "$ROOTFS/home/user/home"     # an empty HOME: no compile cache
echo "== $(. "$ROOTFS/etc/os-release"; echo "$PRETTY_NAME"); python3: $(in_root 'command -v python3 && python3 -V || echo none' | tr '\n' ' ')"
if [ $carried -eq 1 ]; then
  mkdir -p "$repo/.gpu-carry" && cp .gpu-carry/venv-gpu.tar.xz "$repo/.gpu-carry/"
  in_root 'command -v xz >/dev/null || command -v python3 >/dev/null' ||  # minbase has neither
    in_root 'apt-get install -y -qq xz-utils >/dev/null'
  unshare --net chroot "$ROOTFS" /bin/bash -lc 'cd /home/user/carried &&
    time bash setup.sh --gpu --from=.gpu-carry/venv-gpu.tar.xz &&
    .venv/bin/python -c "import pygpu; print(\"pygpu\", pygpu.__version__)" &&
    time .venv/bin/python cifar10_convnet.py --nepoch=1 &&
    { THEANO_FLAGS=device=cuda .venv/bin/python cifar10_convnet.py; echo "device=cuda: exit $?"; }'
  exit
fi
case $suite in
  readme)
    tests=""; [ $emulated -eq 0 ] || tests="tests/test_convnet.py tests/test_nnet.py tests/test_cpuops.py tests/test_cpublas.py"
    in_root "uname -m && cd /home/user/project &&
      time (bash setup.sh && .venv/bin/python cifar10_convnet.py --nepoch=1) &&
      time (bash setup.sh --test && .venv/bin/python -m pytest -q $tests)" ;;
  gpu)
    in_root 'cd /home/user/project && set -o pipefail &&
      time bash setup.sh --gpu &&
      (cd / && /home/user/project/.venv/bin/python -c "import pygpu; print(\"bare import pygpu:\", pygpu.__version__, pygpu.__file__)") &&
      ls .venv/lib/python3*/site-packages/nvidia/*/lib/libnvrtc.so.* .venv/lib/python3*/site-packages/nvidia/*/lib/libcublas.so.* &&
      { THEANO_FLAGS=device=cuda .venv/bin/python cifar10_convnet.py > /tmp/refused 2>&1; echo "device=cuda: exit $?, $(wc -l < /tmp/refused) line(s):"; cat /tmp/refused; } &&
      [ "$(wc -l < /tmp/refused)" -eq 1 ] &&
      time .venv/bin/python cifar10_convnet.py --nepoch=1' ;;
  ci)
    in_root 'cd /home/user/project && git init -q && git add -A && git -c user.name=ci -c user.email=ci@localhost commit -qm clone &&
      time CI=true bash .ci/run' ;;
esac
