#!/usr/bin/env bash
# Set up this project on a Debian/Ubuntu machine:  bash setup.sh [--test] [--plot]
#   - system packages Theano compiles against: g++, Python headers, OpenBLAS (apt-get, when
#     run as root or with password-less sudo; otherwise it prints the command to run).
#     OpenBLAS is optional: without it machine.py links the one in scipy's wheel.
#   - .venv with requirements.txt (+ requirements-test.txt with --test, + requirements-plot.txt with --plot)
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

want_test=0; want_plot=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --plot) want_plot=1 ;;
    *) echo "usage: bash setup.sh [--test] [--plot]" >&2; exit 2 ;;
  esac
done

# Theano 1.0.5 runs on Python <= 3.11.
PY=""
for candidate in "${PYTHON:-}" python3.11 python3; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null &&
     "$candidate" -c 'import sys; sys.exit(not (3, 8) <= sys.version_info[:2] <= (3, 11))'; then
    PY="$candidate"; break
  fi
done
if [ -z "$PY" ]; then
  echo "setup.sh: needs Python 3.8-3.11 (Theano 1.0.5 does not run on 3.12+)." >&2
  echo "  Debian/Ubuntu: apt-get install python3.11 python3.11-venv python3.11-dev, or set PYTHON=/path/to/python3.11" >&2
  exit 1
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

[ -x .venv/bin/python ] || "$PY" -m venv .venv
reqs=(-r requirements.txt)
[ $want_test -eq 0 ] || reqs+=(-r requirements-test.txt)
[ $want_plot -eq 0 ] || reqs+=(-r requirements-plot.txt)
.venv/bin/python -m pip install -q --disable-pip-version-check "${reqs[@]}"
echo "setup.sh: ready: $(.venv/bin/python -c 'import platform, machine, theano; print("Python", platform.python_version(), "| Theano", theano.__version__, "| BLAS", machine.blas_description())')"
