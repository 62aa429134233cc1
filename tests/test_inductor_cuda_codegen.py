"""benchmarks/inductor_cuda_codegen.py: Inductor's CUDA code for a training step, generated on this CPU-only
machine through benchmarks/fakecuda. Checked on the tiny model: both compiled graphs come out as CUDA code
(Triton kernels for sm_90, cuBLAS and cuDNN calls), with fastmae's kernels as opaque custom ops."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import fakecuda, inductor_fallbacks  # noqa: E402


def test_unavailable_reason_names_a_cpu_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "not a CUDA build" in fakecuda.unavailable_reason()


def test_install_refuses_a_process_without_the_preload(monkeypatch):
    monkeypatch.delenv(fakecuda.MARK, raising=False)
    with pytest.raises(RuntimeError, match="run_under_fake_cuda"):
        fakecuda.install()


def _fast_backend() -> str:
    from fastmae_kernels import dispatch

    return "cuda" if not isinstance(dispatch._load("cuda"), Exception) else "triton"


@pytest.mark.slow
def test_tiny_step_compiles_to_cuda_code(tmp_path):
    reason = fakecuda.unavailable_reason()
    if reason:
        pytest.skip(f"no fake CUDA here: {reason}")
    backend = _fast_backend()
    out = tmp_path / "codegen"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inductor_cuda_codegen", "--model", "tiny",
                           "--backend", backend, "--out", str(out), "--build-dir", str(tmp_path / "libs")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    meta = json.loads((out / "meta.json").read_text())
    assert meta["torch"] == torch.__version__ and meta["fast_backend"] == backend
    assert set(meta["sides"]) == {"ref", "fast"}
    for side in ("ref", "fast"):
        wrappers = sorted(p.name for p in (out / side).glob("*.py"))
        assert wrappers == ["00-forward.py", "01-backward.py"]
        code = (out / side / "01-backward.py").read_text()
        assert "@triton.jit" in code and "device_str='cuda'" in code and "cc=90" in code  # sm_90 Triton
        assert "empty_strided_cuda(" in code and "empty_strided_cpu(" not in code

    ref, fast = (inductor_fallbacks.scan(out / side) for side in ("ref", "fast"))
    ref_library = sum((g["library"] for g in ref), start=type(ref[0]["library"])())
    # each Linear layer: one addmm forward (the bias in cuBLAS's epilogue), two mm backward (input and weight
    # gradients; the patch embedding is a convolution)
    n_linear = sum(isinstance(m, torch.nn.Linear)
                   for m in __import__("fastmae.models", fromlist=["x"]).create_model(
                       "mae_vit_tiny_patch4_dec64d2b", reference=True).modules())
    assert ref_library["extern_kernels.addmm"] == n_linear
    assert ref_library["extern_kernels.mm"] == 2 * n_linear
    assert any("cudnn_attention" in name for name in ref_library)  # SDPA picks cuDNN on sm_90 in these versions
    ref_fallbacks = {name.split(".")[1] for g in ref for name in g["fallbacks"]}
    assert "sum" not in ref_fallbacks  # bias and norm gradients are Inductor's own reductions (NOTES §6.8)
    custom = {name for g in fast for name in g["custom"]}
    assert {f"fastmae_{backend}.masked_mse_loss.default",
            f"fastmae_{backend}.insert_mask_tokens_backward.default"} <= custom, custom
