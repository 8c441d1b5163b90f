#!/usr/bin/env bash
# The GPU measurements on the device machine (H100/H200), in one call: logs under $OUT.
#
# Prepare here (.gpu-carry/ is ignored by git and travels with `carry`, about 62 MB):
#   bash bench/gpu_session.sh prepare     # bash setup.sh --pack, the CIFAR-10 JPEGs and their rebuild tool
# Run there (with the device call's timeout about DEADLINE + 60 s: data, set-up, caches); the
# set-up is the user's own, offline: bash setup.sh --gpu --from=.gpu-carry/venv-gpu.tar.xz
#   bash bench/gpu_session.sh                       # every step below, in this order
#   bash bench/gpu_session.sh cpu-default gpu-64    # chosen steps (data and .venv are set up anyway)
# Steps, most wanted first (each appends to $OUT/session.log; its own log and the runs' records
# and parameters go to a scratch folder, of which $OUT gets the records (as results.jsonl) and logs.tgz: the
# device call brings back at most 8 files of $OUT, 16 MiB each, 64 MiB in all):
#   check             nvidia-smi, lscpu, the layer and gradient tests on the GPU (against numpy)
#   gpu-default       `time` of the published run, compile cache cold
#   bench             seconds per training epoch: Theano (conv im2col and conv2d) and the PyTorch twin, eager and as one CUDA graph a step
#                     (the machine's own python3) on the same GPU, default and 64-overlap
#   profile           Theano's profile of the default training step on the GPU
#   cpu-default       the published run on this machine's CPU (device=cpu; engine/machine.py picks the BLAS)
#   gpu-default-warm  the published run again, compile cache warm: the 60 s target
#   gpu-64-overlap    64 filters, overlapping 4x4 pooling at stride 2
#   gpu-64            64 filters
#   compile           Theano's compile with an empty cache on the GPU, g++ on every core against
#                     one at a time (bench_compile.py; libgpuarray's kernel cache stays warm)
# DEADLINE (seconds, default 540) bounds the whole call: a step still running then gets
# SIGTERM, and the driver writes its partial record (every logged epoch, with seconds);
# steps not started are listed as skipped.  NEPOCH (default 50) and CONV (default auto,
# i.e. im2col on the GPU) for every run; if gpu-default fails, CONV=conv2d for the rest.
# The compile caches (Theano's modules, libgpuarray's kernels) come back as
# $OUT/compile-cache.tgz.part-* (at most 4 parts of 15 MB, else none): put those files in
# .gpu-carry/ and the next call on the same kind of machine starts warm (a fresh machine
# otherwise compiles for minutes), if they fit: the carried set-up and data take 60 MiB of
# the call's 64 (the CPU default run's cache alone came to 2.6 MB, tried here without a GPU).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ "${1:-}" = prepare ]; then
  bash setup.sh --pack || exit 1
  cp -f ../shared/data/cifar10-jpeg.tar.gz ../shared/tools/make_cifar10.py .gpu-carry/
  du -sh .gpu-carry
  exit 0
fi

OUT=${OUT:-/tmp/gpu-out}
work=/tmp/gpu-session-work          # step logs, records, parameters: packed into $OUT at the end
mkdir -p "$OUT" "$work"
NEPOCH=${NEPOCH:-50}
CONV=${CONV:-auto}
DEADLINE_AT=$(( $(date +%s) + ${DEADLINE:-540} ))
data=/tmp/cifar-data
note='CIFAR-10 rebuilt from ../shared JPEGs'
exec > >(tee -a "$OUT/session.log") 2>&1
tee_pid=$!
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(check gpu-default bench profile cpu-default gpu-default-warm gpu-64-overlap gpu-64 compile)

# The machine's own python3 (numpy, Pillow, PyTorch) rebuilds the data and runs the twin;
# Theano runs in .venv, made by setup.sh from the carried file (Debian 12's Python 3.11).
bash setup.sh --gpu --from=.gpu-carry/venv-gpu.tar.xz || exit 1
if [ ! -d "$data/cifar-10-batches-py" ]; then
  mkdir -p .gpu-carry/tools .gpu-carry/data
  cp .gpu-carry/make_cifar10.py .gpu-carry/tools/
  cp .gpu-carry/cifar10-jpeg.tar.gz .gpu-carry/data/
  python3 .gpu-carry/tools/make_cifar10.py "$data" || exit 1
fi
cache=/tmp/gpu-session-cache
mkdir -p "$cache/theano" "$cache/kernels"
if ls .gpu-carry/compile-cache.tgz.part-* >/dev/null 2>&1; then
  cat .gpu-carry/compile-cache.tgz.part-* | tar -C "$cache" -xzf - && echo "compile caches restored: $(du -sh "$cache" | cut -f1)"
fi
export GPUARRAY_CACHE_PATH=$cache/kernels
export NNET_DATADIR=$data PYTHONUNBUFFERED=1 OUT NEPOCH CONV data note cache work

theano() {  # THEANO_FLAGS, then a command run by .venv's python
  local flags=$1; shift
  THEANO_FLAGS=$flags,base_compiledir=$cache/theano .venv/bin/python "$@"
}

drive() {  # THEANO_FLAGS, then driver arguments: the published run, timed
  local flags=$1; shift
  echo "THEANO_FLAGS=$flags python cifar10_convnet.py $*"
  time theano "$flags" cifar10_convnet.py --outdir="$work/runs" "--datanote=$note" --nepoch="$NEPOCH" --conv="$CONV" "$@"
}

step() {
  case $1 in
    check)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || return 3
      lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core)'
      theano device=cuda -m pytest -q -p no:cacheprovider tests/test_nnet.py tests/test_convnet.py \
        -k 'matches or conv_layer or pool_layer or one_step or learns' --junitxml="$work/check.xml" ;;
    gpu-default|gpu-default-warm) drive device=cuda ;;
    gpu-64) drive device=cuda --W1dim="(64,5,5)" ;;
    gpu-64-overlap) drive device=cuda --W1dim="(64,5,5)" --st1="(2,2)" ;;
    cpu-default) drive device=cpu ;;
    compile) theano device=cuda bench/bench_compile.py --configs=default --rounds=1 ;;
    bench)
      for conv in im2col conv2d; do
        theano device=cuda bench/bench_train.py --only=theano --conv=$conv \
          --configs=default,64-overlap --batches=100 --repeats=3
      done
      if python3 -c 'import torch; assert torch.cuda.is_available()'; then
        for mode in eager graph; do
          python3 bench/bench_train.py --only=pytorch --torch-device=cuda --torch-mode=$mode \
            --configs=default,64-overlap --batches=100 --repeats=3
        done
      else
        echo 'no PyTorch with CUDA in the machine python3: no twin'
      fi ;;
    profile)   # Theano refuses to profile the GPU without blocking launches (profiling.py)
      CUDA_LAUNCH_BLOCKING=1 theano device=cuda,profile=True,profiling.ignore_first_call=True \
        bench/bench_train.py --only=theano --configs=default --batches=200 --repeats=1 ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}
export -f theano drive step

for s in "${steps[@]}"; do
  left=$(( DEADLINE_AT - $(date +%s) ))
  if [ $left -lt 30 ]; then
    echo "== $s: skipped, ${left} s left before the deadline"
    continue
  fi
  echo "== $s ($(date +%T), ${left} s left)"
  # timeout signals the step's whole process group: the driver inside gets the SIGTERM
  timeout --signal=TERM --kill-after=20 $left bash -c "step $s" 2>&1 | tee "$work/$s.log"
  code=${PIPESTATUS[0]}
  echo "== $s: exit $code"
  if [ "$s" = check ] && [ "$code" = 3 ]; then   # a failed test is reported; each run checks its own GPU ops
    echo '== no GPU here (nvidia-smi failed): no GPU runs'
    break
  fi
  if [ "$s" = gpu-default ] && [ "$code" != 0 ] && [ "$code" != 124 ] && [ "$CONV" = auto ]; then
    export CONV=conv2d
    echo '== gpu-default failed: the other runs use --conv=conv2d (GpuCorrMM)'
  fi
done
# What comes back: session.log (everything above), the records, the logs (no parameter files:
# up to 86 MB each) and the compile caches if 4 parts of 15 MB hold them: 8 files at most.
cat "$work"/runs/*.record.json > "$OUT/results.jsonl" 2>/dev/null      # a line each: sweep.py reads them so
tar -C "$work" --exclude='*.npz' -czf "$OUT/logs.tgz" .
tar -C "$cache" -czf "$work/compile-cache.tgz" .
if [ "$(stat -c %s "$work/compile-cache.tgz")" -le $((60 * 1000 * 1000)) ]; then
  split -b 15M "$work/compile-cache.tgz" "$OUT/compile-cache.tgz.part-"
else
  echo "compile caches not sent back: $(du -h "$work/compile-cache.tgz" | cut -f1) is over 4 parts of 15 MB"
fi
ls -l "$OUT"
exec >&- 2>&-; wait $tee_pid   # session.log complete before $OUT is collected
