#!/usr/bin/env bash
# Every GPU check of the kernels in one run (< 8 minutes, DEADLINE_S, on one H100/H200-class GPU), so a short
# lease of a GPU machine is enough:
#   1. build _core and _cuda in place for this GPU's architecture (CMake + Ninja, no pip install);
#   2. the flash path's tests (tests/test_ops_flash.py compiled for this GPU, the flash cases of
#      tests/test_ops_cuda.py) against float64 references, then the other CUDA paths' tests (tc, tc with
#      torch-op epilogues, simt: passed on 12-04, but the simt backward's scale-gradient reduction and the tc
#      top-k's score split changed since): correctness before any timing;
#   3. bench/flash_kernels.py --sweep: each flash kernel alone against cuBLAS of the same shape, several tile
#      configurations;
#   4. bench/kernels.py --device cuda: loss at B = 4096, 16384, 65536, bf16 inputs (LOSS_DTYPES=bf16,fp32 adds
#      fp32, unchanged since the 12-04 figures): the flash path (Triton, epilogue inside the GEMM), the
#      tensor-core path with the _cuda tile epilogues, the open_clip composite (LOSS_IMPLS=... picks others:
#      fused-tc-torch, fused-simt); top-k with host and device-resident matrices (TOPK_PATHS, default
#      "flash tc");
#   5. bench/embed.py --device cuda: a ViT-B-16-sized open_clip model (random weights), sources/s and
#      GPU utilisation through NVML;
# Each bench writes its JSON after every case, so a step stopped by its time limit keeps what it measured.
# Usage: bash bench/gpu_check.sh [OUTDIR]   (default: $OUT, else ./gpu-check). Logs and JSON land in OUTDIR.
# Python packages the machine lacks may be given as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 GALAXALIGN_PROGRESS=0
PY="${PYTHON:-python3}"
log() { echo "== $(date +%T) $*"; }
# Every step runs under `timeout`: its own limit or what is left of DEADLINE_S (default 480 s: the whole check
# in under 8 minutes), whichever is smaller; a step started with under 20 s left is skipped.
DEADLINE_S="${DEADLINE_S:-480}"
step() {
  local limit=$1; shift
  local left=$(( DEADLINE_S - SECONDS ))
  if (( left < 20 )); then echo "   skipped: ${left} s left of DEADLINE_S=$DEADLINE_S"; return 0; fi
  (( left < limit )) && limit=$left
  timeout "$limit" "$@" || echo "   exit $? (limit ${limit} s)"
}

{
  log "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  lscpu | grep -m1 'Model name'
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  fi

  log "build (CMake, CUDA architecture of device 0)"
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')")
  BUILD=/tmp/galaxalign-build
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGALAXALIGN_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$OUTDIR/cmake.log" 2>&1 \
    && cmake --build "$BUILD" -j "$(nproc)" >>"$OUTDIR/cmake.log" 2>&1 \
    || { tail -30 "$OUTDIR/cmake.log"; exit 2; }
  cp "$BUILD"/_core*.so "$BUILD"/_cuda*.so galaxalign_batch/
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  "$PY" -c "import galaxalign_batch._cuda as c, galaxalign_batch._core as k; print('_cuda runtime', c.runtime_version(), 'devices', c.device_count(), '| _core', k.similarity_isa())"

  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton missing: the flash path will be skipped"

  log "tests of the flash path (tests/test_ops_flash.py, tests/test_ops_cuda.py -k flash)"
  step 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_flash.py tests/test_ops_cuda.py -k flash \
    >"$OUTDIR/test_ops_flash.log" 2>&1
  grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$OUTDIR/test_ops_flash.log" | head -40

  log "the other CUDA paths' tests (tests/test_ops_cuda.py: tc, tc with torch epilogues, simt)"
  step 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py -k "not flash" >"$OUTDIR/test_ops_cuda.log" 2>&1
  grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$OUTDIR/test_ops_cuda.log" | head -40

  log "bench/flash_kernels.py --sweep (each flash kernel against cuBLAS, tile configurations)"
  step 100 "$PY" bench/flash_kernels.py --sweep --json "$OUTDIR/flash_kernels.json"

  log "bench/kernels.py --device cuda (loss)"
  step 150 "$PY" bench/kernels.py --device cuda --skip-topk --loss-sizes 4096,16384,65536 --dtypes "${LOSS_DTYPES:-bf16}" \
    --impls "${LOSS_IMPLS:-fused-flash,fused-tc,composite}" --json "$OUTDIR/kernels_loss.json"
  for path in ${TOPK_PATHS:-flash tc}; do
    log "bench/kernels.py --device cuda (top-k, $path path)"
    GALAXALIGN_CUDA_TOPK=$path step 80 "$PY" bench/kernels.py --device cuda --skip-loss --json "$OUTDIR/kernels_topk_$path.json"
  done

  log "bench/embed.py --device cuda (ViT-B-16, random weights)"
  step 100 "$PY" bench/embed.py --device cuda --model ViT-B-16 --sources 20480 --batch 512 --json "$OUTDIR/embed_gpu.json"

  log "done"
} 2>&1 | tee "$OUTDIR/gpu_check.log"
