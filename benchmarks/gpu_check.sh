#!/usr/bin/env bash
# The prepared device check for a session lent a GPU (one H100/H200, ~10 minutes): build the CUDA
# extension, run the GPU test cases, then benchmark the kernels and the ViT-B training step.
# Usage on the device machine (its image has torch + triton + timm, no DeepSpeed or DALI):
#   bash benchmarks/gpu_check.sh            # results in $OUT (device tool) or benchmarks/results/gpu-<date>
# Stage limits add up to 580 s: run it with the device tool's timeout_s=600. One hang cannot eat the
# lease, and all output is kept in one tarball (the device tool returns at most 8 files) plus summary.log.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}"
WORK="$(mktemp -d)/gpu_check"
mkdir -p "$DEST" "$WORK"
export PYTHONUNBUFFERED=1 FASTMAE_CUDA_ARCH_LIST="${FASTMAE_CUDA_ARCH_LIST:-9.0}" TORCH_CUDA_ARCH_LIST=9.0
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$DEST/summary.log"; }
stage() {  # stage NAME SECONDS CMD...: run with a limit, log its exit code and last lines
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc"; tail -n 15 "$WORK/$name.log" | sed 's/^/    /' >>"$DEST/summary.log"
}

nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())" | tee -a "$DEST/summary.log"
stage build 150 python -m pip install --no-build-isolation --no-deps -e .
stage gpu_tests 90 python -m pytest -q -x tests/test_cuda_ops.py tests/test_triton_gathers.py tests/test_triton_loss.py tests/test_model.py
stage kernels_bench 120 python -m benchmarks.kernels.run --shapes ViT-B/16 --out "$WORK/kernels"
stage e2e_vitb 220 python benchmarks/e2e.py --models B --steps 10 --warmup 3 --profile \
  --variants ref-eager,ref-compiled,fast-eager,fast-compiled,fast-cudagraphs --out "$WORK/e2e"
tar -czf "$DEST/gpu_check.tgz" -C "$(dirname "$WORK")" gpu_check
log "done: $DEST/gpu_check.tgz"
