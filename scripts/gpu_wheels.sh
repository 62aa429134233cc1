#!/usr/bin/env bash
# Wheels the lent GPU machine lacks for running the trainer there (its image has torch, Triton, timm, ninja,
# einops, msgpack, psutil, py-cpuinfo, tqdm, tensorboard, but no DeepSpeed): DeepSpeed built here as a
# pure-Python wheel, and its pydantic stack for CPython 3.12 x86-64. They go to .whl/ (git-ignored), which
# the device call carries (`carry: [".whl"]`); benchmarks/gpu_check.sh installs them when the folder is there.
#   bash scripts/gpu_wheels.sh        # ~3 MB, needs a package index (here: the local PyPI mirror)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
DS_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))' 2>/dev/null || echo 0.19.8)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DS_VERSION"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
  "typing-inspection==0.4.5" "typing-extensions==4.16.0"
ls -la .whl
