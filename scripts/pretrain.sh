#!/usr/bin/env bash
# The README's pretrain command: installs what it needs (first run only), then pretrains with DeepSpeed
# on the embedded default data set (no download). Extra arguments go to fastmae/pretrain.py.
# On a CPU-only machine: the CPU preset (tiny MAE at 32 px, one process over gloo, a few minutes).
# On a GPU machine: every local GPU, official ViT-L/16 defaults. See docs/training.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.build/torch_extensions}"
cd "$ROOT"
if python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  exec deepspeed fastmae/pretrain.py "$@"
fi
export DS_ACCELERATOR=cpu
exec deepspeed --num_gpus 1 fastmae/pretrain.py "$@"
