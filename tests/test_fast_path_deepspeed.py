"""The fast-path training step runs under DeepSpeed ZeRO-2: two CPU ranks over gloo (torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmae.train.launch_local import free_port

HERE = Path(__file__).resolve().parent


def _run(tmp_path: Path, backend: str, zero: int = 2) -> list[dict]:
    """Both ranks' results of the worker on `backend` (auto: torch on CPU; triton: the interpreter)."""
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(HERE.parent / ".build/torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TMPDIR": str(tmp_path),  # torchelastic's scratch folders land here and go with tmp_path
        "FASTMAE_TEST_BACKEND": backend,
        "FASTMAE_TEST_ZERO": str(zero),
        "TRITON_INTERPRET": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(HERE / "_ds_fast_path_worker.py")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    runs = {backend: _run(tmp_path_factory.mktemp(backend), backend) for backend in ("auto", "triton")}
    for backend in ("auto", "triton"):
        runs[f"{backend}-zero3"] = _run(tmp_path_factory.mktemp(f"{backend}-zero3"), backend, zero=3)
    return runs


@pytest.mark.slow
def test_fast_path_step_under_deepspeed_zero2(results):
    for backend, runs in results.items():
        assert [r["rank"] for r in runs] == [0, 1]
        for r in runs:
            assert r["zero_stage"] == (3 if backend.endswith("zero3") else 2), r
            assert r["optimizer"] == "AdamW" and r["fused"], r
            assert r["checkpointing"], r
            assert all(0 < loss < 10 for loss in r["losses"]), r
            assert r["changed"] > 0 and r["ranks_agree"], r
        assert runs[0]["losses"][0] != runs[1]["losses"][0], "ranks should see different data"
    for backend in ("auto", "auto-zero3"):  # "auto" on CPU resolves to torch
        assert [r["backend"] for r in results[backend]] == ["torch", "torch"]


@pytest.mark.slow
def test_triton_kernels_under_deepspeed_zero2_track_the_torch_ops(results):
    """The same three steps with the Triton kernels (gathers, loss, the fused add + LayerNorm and bias + GELU,
    attention) under ZeRO-2, block checkpointing and bf16 autocast: every norm, MLP activation and attention runs
    its kernel, and the losses track the torch run's within bf16 autocast's rounding."""
    for r in results["triton"]:
        assert r["backend"] == "triton"
        norms = 2 * r["blocks"] + 2  # 2 per block + the 2 final norms
        # per step, forward: every norm once, then the blocks' norms again in backward (block checkpointing)
        assert r["norm_kernel_calls"] == [3 * (norms + 2 * r["blocks"]), 3 * norms], r
        assert r["gelu_kernel_calls"] == [3 * 2 * r["blocks"], 3 * r["blocks"]], r  # one MLP per block, likewise
        assert r["attn_kernel_calls"] == [3 * 2 * r["blocks"], 3 * r["blocks"]], r  # one attention per block
    assert all(r["norm_kernel_calls"] == r["gelu_kernel_calls"] == r["attn_kernel_calls"] == [0, 0]
               for r in results["auto"])
    for torch_run, triton_run in zip(results["auto"], results["triton"]):
        for want, got in zip(torch_run["losses"], triton_run["losses"]):
            assert abs(got - want) <= 2e-3 * abs(want), (torch_run["losses"], triton_run["losses"])


@pytest.mark.slow
def test_triton_kernels_under_zero3_with_every_parameter_partitioned(results):
    """ZeRO-3 with stage3_param_persistence_threshold 0 partitions every LayerNorm weight and bias and every
    fc1 bias, which the fused kernels read inside their modules' calls (where ZeRO-3 gathers them; a partition
    left ungathered is an empty tensor, which the ops' checks refuse) and save for backward: the kernels run as
    often as on ZeRO-2 and the losses track the torch ops' on ZeRO-3 as on ZeRO-2. (ZeRO-3 itself moves the
    bf16 autocast losses by ~1e-4 relative from ZeRO-2's, on either backend, from the first step.)"""
    for zero2, zero3 in zip(results["triton"], results["triton-zero3"]):
        assert zero3["norm_kernel_calls"] == zero2["norm_kernel_calls"], zero3
        assert zero3["gelu_kernel_calls"] == zero2["gelu_kernel_calls"], zero3
        assert zero3["attn_kernel_calls"] == zero2["attn_kernel_calls"], zero3
    for torch_run, triton_run in zip(results["auto-zero3"], results["triton-zero3"]):
        assert torch_run["norm_kernel_calls"] == torch_run["gelu_kernel_calls"] == [0, 0]
        for want, got in zip(torch_run["losses"], triton_run["losses"]):
            assert abs(got - want) <= 2e-3 * abs(want), (torch_run["losses"], triton_run["losses"])
