#!/usr/bin/env bash
# One GPU session, in order, for the device machine (H100/H200), logs under $OUT:
#   check.py, then the default run (time), the 64-filter and the overlapping-pool runs on the
#   GPU, then the default run on the same machine's CPU, so the ratio comes from one machine.
#
# Prepare here first (ignored by git, sent with `carry`):
#   bash ../shared/gpu-kit/make-bundle.sh .gpu-bundle
#   mkdir -p .gpu-carry && cp ../shared/data/cifar10-jpeg.tar.gz ../shared/tools/make_cifar10.py .gpu-carry/
# and run there:   bash bench/gpu_session.sh gpu     then    bash bench/gpu_session.sh cpu
# (carry: .gpu-bundle .gpu-carry; two calls, as one device command may run 10 minutes at most).
# Settings: NEPOCH (50) for the GPU runs, CPU_NEPOCH (5) for the CPU run: the bundle's CPU
# path uses numpy's BLAS fallback, so a 50-epoch CPU run may not fit one call; the log's
# per-epoch column gives the rate to compare.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
NEPOCH=${NEPOCH:-50}
CPU_NEPOCH=${CPU_NEPOCH:-5}
stage=${1:-gpu}
data=/tmp/cifar-data
note='CIFAR-10 rebuilt from ../shared JPEGs'
exec > >(tee -a "$OUT/session.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
# The machine's own python3 has numpy and Pillow: rebuild CIFAR-10 there (about 10 s).
if [ ! -d "$data/cifar-10-batches-py" ]; then
  mkdir -p .gpu-carry/tools .gpu-carry/data
  cp .gpu-carry/make_cifar10.py .gpu-carry/tools/
  cp .gpu-carry/cifar10-jpeg.tar.gz .gpu-carry/data/
  python3 .gpu-carry/tools/make_cifar10.py "$data" || exit 1
fi
source .gpu-bundle/activate.sh || exit 1
export NNET_DATADIR=$data PYTHONUNBUFFERED=1

if [ "$stage" = gpu ]; then
  echo "== check.py"
  THEANO_FLAGS=device=cuda,floatX=float32 python .gpu-bundle/check.py || exit 1
fi

run() {  # name, then THEANO_FLAGS, then driver arguments
  local name=$1 flags=$2; shift 2
  echo "== $name: THEANO_FLAGS=$flags $*"
  { time THEANO_FLAGS=$flags python cifar10_convnet.py --outdir="$OUT/runs" "--datanote=$note" "$@" ; } \
    2>&1 | tee "$OUT/$name.log"
}
if [ "$stage" = gpu ]; then
  run gpu-default device=cuda --nepoch="$NEPOCH"
  run gpu-default-warm device=cuda --nepoch="$NEPOCH"        # compile cache warm: the 60 s target
  run gpu-64 device=cuda --nepoch="$NEPOCH" --W1dim="(64,5,5)"
  run gpu-64-overlap device=cuda --nepoch="$NEPOCH" --W1dim="(64,5,5)" --st1="(2,2)"
else
  run cpu-default device=cpu --nepoch="$CPU_NEPOCH"
fi
