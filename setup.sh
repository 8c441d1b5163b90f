#!/usr/bin/env bash
# Set up this project on a Debian/Ubuntu machine:  bash setup.sh [--test] [--plot] [--gpu]
#   - system packages Theano compiles against: g++, Python headers, OpenBLAS (apt-get, when
#     run as root or with password-less sudo; otherwise it prints the command to run).
#     OpenBLAS is optional: without it machine.py links the one in scipy's wheel.
#   - .venv with requirements.txt (+ requirements-test.txt with --test, + requirements-plot.txt with --plot)
#   - no Python 3.8-3.11 on the host: Debian 12's python3.11 in .python3.11 (see the README)
#   - --gpu: Theano's GPU back end, Debian 12's pygpu/libgpuarray 0.7.6 (+ requirements-gpu.txt)
# Safe to run again: it only adds what is missing.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")"

want_test=0; want_plot=0; want_gpu=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --plot) want_plot=1 ;;
    --gpu) want_gpu=1 ;;
    *) echo "usage: bash setup.sh [--test] [--plot] [--gpu]" >&2; exit 2 ;;
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

bookworm_download() {   # Debian 12 .debs into .python3.11/debs, through a private apt list (no root)
  local mirror=${DEBIAN_MIRROR:-$(debian_mirror)} keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  local apt=$PRIVATE/apt
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null && [ -n "$mirror" ] && [ -f "$keyring" ] || return 1
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$PRIVATE/debs"
  echo "deb [signed-by=$keyring] $mirror bookworm main" > "$apt/sources.list"
  local opts=(-o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Debug::NoLocking=1
              -o Dir::State::status=/dev/null
              -o APT::Architecture=amd64 -o APT::Sandbox::User="$(id -un)" -qq)
  ls "$apt/lists" | grep -q _Packages || apt-get "${opts[@]}" update >&2
  (cd "$PRIVATE/debs" && apt-get "${opts[@]}" download "$@" >&2)
}

private_python() {   # prints the path of the private python3.11, fetching it first if need be
  local prefix=$PRIVATE/prefix
  if [ ! -x "$prefix/usr/bin/python3.11" ]; then
    echo "setup.sh: no Python 3.8-3.11 here: fetching Debian 12's python3.11 into $PRIVATE (no root needed)" >&2
    if ! bookworm_download "${PY_DEBS[@]}" "${LIB_DEBS[@]}"; then
      echo "setup.sh: this host has no Python 3.8-3.11 (Theano 1.0.5 does not run on 3.12+), and no Debian" >&2
      echo "  archive to fetch Debian 12's python3.11 from.  Install Python 3.11 with its headers and venv" >&2
      echo "  (e.g. apt-get install python3.11-dev python3.11-venv) and run again, or set PYTHON=/path/to/python3.11;" >&2
      echo "  on a Debian-like host without Debian sources, set DEBIAN_MIRROR to a Debian archive URL." >&2
      exit 1
    fi
    rm -rf "$prefix.tmp" "$PRIVATE/libs.tmp" "$PRIVATE/lib" && mkdir -p "$prefix.tmp" "$PRIVATE/libs.tmp" "$PRIVATE/lib"
    for name in "${PY_DEBS[@]}"; do dpkg-deb -x "$PRIVATE"/debs/"$name"_*.deb "$prefix.tmp"; done
    for name in "${LIB_DEBS[@]}"; do dpkg-deb -x "$PRIVATE"/debs/"$name"_*.deb "$PRIVATE/libs.tmp"; done
    # only what the host lacks: the host's own copies stay in charge of everything else
    for lib in "$PRIVATE"/libs.tmp/{usr/,}lib/x86_64-linux-gnu/*.so.*; do
      [ -e "$lib" ] && ! /sbin/ldconfig -p | grep -q "^[[:space:]]$(basename "$lib") " && cp -a "$lib" "$PRIVATE/lib/"
    done
    rm -rf "$PRIVATE/libs.tmp"
    # Debian's pyconfig.h only points at the multiarch copy; Theano compiles with -I.../python3.11
    cp "$prefix.tmp/usr/include/x86_64-linux-gnu/python3.11/pyconfig.h" "$prefix.tmp/usr/include/python3.11/pyconfig.h"
    rm -rf "$prefix" && mv "$prefix.tmp" "$prefix"
  fi
  echo "$prefix/usr/bin/python3.11"
}

gpu_stack() {   # Debian 12's pygpu/libgpuarray 0.7.6 into .venv: the package, and in .venv/gpu its library and headers
  .venv/bin/python -c 'import machine, pygpu' 2>/dev/null && return
  echo "setup.sh --gpu: fetching Debian 12's pygpu and libgpuarray 0.7.6 into .venv" >&2
  if ! bookworm_download "${GPU_DEBS[@]}"; then
    echo "setup.sh --gpu: no Debian archive to fetch python3-pygpu, libgpuarray3 and libgpuarray-dev 0.7.6 from;" >&2
    echo "  set DEBIAN_MIRROR to a Debian archive URL, or install pygpu 0.7.x into .venv by hand." >&2
    exit 1
  fi
  local site unpacked=.venv/gpu.tmp
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf "$unpacked" .venv/gpu && mkdir -p "$unpacked" .venv/gpu/lib .venv/gpu/include
  for name in "${GPU_DEBS[@]}"; do dpkg-deb -x "$PRIVATE"/debs/"$name"_*.deb "$unpacked"; done
  rm -rf "$site"/pygpu "$site"/pygpu-*
  cp -a "$unpacked"/usr/lib/python3/dist-packages/pygpu* "$site/"
  cp -a "$unpacked"/usr/lib/libgpuarray.so* .venv/gpu/lib/
  cp -a "$unpacked"/usr/include/gpuarray .venv/gpu/include/
  rm -rf "$unpacked"
}

private_venv() {   # .venv on the private python: its interpreter is a script that finds the private libraries
  LD_LIBRARY_PATH=$PRIVATE/lib "$PY" -m venv --without-pip .venv
  rm .venv/bin/python3.11
  printf '#!/bin/bash\n# setup.sh: Debian 12 python3.11, with the libraries this host lacks\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec -a "$0" "%s" "$@"\n' \
    "$PRIVATE/lib" "$PY" > .venv/bin/python3.11
  chmod +x .venv/bin/python3.11
  # Debian's ensurepip looks for its wheels in /usr/share/python-wheels: bring pip in from ours
  local wheels=("$PRIVATE"/prefix/usr/share/python-wheels/*.whl)
  .venv/bin/python "$(ls "$PRIVATE"/prefix/usr/share/python-wheels/pip-*.whl)/pip" install -q --no-index "${wheels[@]}"
}

PY=""
for candidate in "${PYTHON:-}" python3.11 python3 "$PRIVATE/prefix/usr/bin/python3.11"; do
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
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
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
echo "setup.sh: ready: $(.venv/bin/python -c 'import platform, machine, theano; print("Python", platform.python_version(), "| Theano", theano.__version__, "| BLAS", machine.blas_description())')"
