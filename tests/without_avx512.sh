#!/usr/bin/env bash
# The suite as on a CPU without AVX-512 (AMD EPYC before Zen 4, Intel's desktop parts), run on
# this one: every module Theano compiles is built without AVX-512 (a g++ that drops the detected
# -march and -mavx512* flags from compiles and adds -mno-avx512f; AVX2 and FMA stay), every
# OpenBLAS in the process runs its Haswell kernels, and Theano compiles into a directory of its
# own (its cache keys do not see the missing flags).  CI runs it after the suite.
#
#   bash tests/without_avx512.sh [pytest arguments]     # minutes with a cold compile cache
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
base=${WITHOUT_AVX512_COMPILEDIR:-$HOME/.theano/without-avx512}
real=$(command -v g++) || { echo 'error: no g++ (bash setup.sh installs it)' >&2; exit 1; }
mkdir -p "$base/bin"
# Theano gives a compiler its -march flags only if its name has g++ in it; detection (-E) untouched
cat > "$base/bin/g++.new" <<EOF
#!/bin/bash
case " \$* " in *" -E "*) exec $real "\$@" ;; esac
args=()
for a in "\$@"; do
  case "\$a" in -march=*|-mavx512*) ;; *) args+=("\$a") ;; esac
done
exec $real "\${args[@]}" -mno-avx512f
EOF
chmod +x "$base/bin/g++.new" && mv "$base/bin/g++.new" "$base/bin/g++"
export OPENBLAS_CORETYPE=Haswell
export THEANO_FLAGS="${THEANO_FLAGS:+$THEANO_FLAGS,}cxx=$base/bin/g++,base_compiledir=$base"
cd "$here"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
# the proof that it ran as said: no compiled module holds an AVX-512 (zmm) instruction
built=0 avx512=0
while IFS= read -r -d '' module; do
  built=$((built + 1))
  if objdump -d "$module" | grep -q zmm; then avx512=$((avx512 + 1)); echo "AVX-512 in $module"; fi
done < <(find "$base" -name '*.so' -print0)
echo "without_avx512.sh: $built compiled modules, $avx512 with AVX-512 instructions"
[ "$avx512" -eq 0 ] || status=1
exit $status
