#!/usr/bin/env bash
# Creates (or reuses) the project venv in .venv and installs fastmae with its test extras.
# Idempotent: a stamp records the hash of the install inputs, so a second call is instant.
# Source it (`. scripts/setup_env.sh`) to get the venv activated.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTMAE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# torch: a CUDA 13.0 build (it runs on CPU too); users on other stacks bring their own CUDA torch.
TORCH_PINS="${FASTMAE_TORCH_PINS:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "fastmae: creating venv at $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.fastmae-installed"
# csrc/ is in the hash: the editable install compiles it, so a changed kernel must trigger a rebuild.
want="$(cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" "$ROOT"/csrc/* 2>/dev/null | sha256sum | cut -c1-16) $TORCH_PINS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "fastmae: installing dependencies into $VENV (first run takes a few minutes)" >&2
  python -m pip install -q --upgrade pip setuptools wheel
  # shellcheck disable=SC2086
  python -m pip install -q $TORCH_PINS
  # The CUDA extension (csrc/) builds here whenever nvcc is found, no GPU needed; FASTMAE_BUILD_CUDA=0 skips it.
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  python -m pip install -q --no-build-isolation -e "$ROOT[test]"
  echo "$want" > "$stamp"
fi
