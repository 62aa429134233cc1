#!/usr/bin/env bash
# README demonstration: does MAE pretraining help? A short CPU pretraining on the embedded default data
# (2048 procedural images, 10 shape classes, no download), then the same linear probe on the pretrained
# encoder and on a randomly initialised one. Prints both top-1 numbers. ~4 min on an idle 2-core CPU.
#   bash scripts/linprobe_demo.sh [OUT_DIR]        (default .build/linprobe_demo)
# Probe: the paper's protocol (frozen encoder, cls token, BatchNorm w/o affine + linear head, LARS,
# warmup + cosine) with settings for a 2048-image set: batch 128, blr 16 (lr 8), 300 epochs on cached
# features (--no-augment). Train images [0, 2048) are the pretraining images; val images [2048, 3072)
# were never seen in pretraining.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.build/torch_extensions}"
cd "$ROOT"
OUT="${1:-$ROOT/.build/linprobe_demo}"
MODEL=mae_vit_tiny_patch4_dec64d2b
rm -rf "$OUT/pretrain"
mkdir -p "$OUT"

# 1. pretraining: the trainer's CPU preset (tiny MAE at 32 px, batch 64, blr 1.5e-3) for 40 epochs
python fastmae/pretrain.py --model "$MODEL" --output_dir "$OUT/pretrain" --num_images 2048 --image_size 64 \
  --epochs 40 --warmup_epochs 4 --save_every_steps 100000 --seed 0

# 2. the same probe on the pretrained and on a randomly initialised encoder
PROBE=(--no-augment --pool cls --optimizer lars --blr 16 --batch_size 128 --epochs 300 --warmup_epochs 10
       --eval_every 50 --num_train 2048 --val_start 2048 --num_val 1024 --image_size 64 --data_seed 0 --quiet)
python -m fastmae.linprobe --checkpoint "$OUT/pretrain/checkpoints" "${PROBE[@]}" --output_dir "$OUT/probe_pretrained"
python -m fastmae.linprobe --random_init --model "$MODEL" --init_seed 0 "${PROBE[@]}" --output_dir "$OUT/probe_random"

python - "$OUT" <<'PY'
import json, sys
pre = json.load(open(f"{sys.argv[1]}/probe_pretrained/result.json"))
rnd = json.load(open(f"{sys.argv[1]}/probe_random/result.json"))
print(f"linear probe top-1 on {pre['num_images']} unseen images (10 classes, chance 10%): "
      f"pretrained {pre['top1']:.2f}%  vs  random init {rnd['top1']:.2f}%  "
      f"(top-5 {pre['top5']:.2f}% vs {rnd['top5']:.2f}%)")
PY
