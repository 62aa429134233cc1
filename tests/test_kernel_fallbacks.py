"""Where Triton is installed but cannot compile (a runtime image without a C compiler: Triton builds its
launcher at the first launch), the cuda backend's fused block ops run their torch references, say so once, and
the model and trainer report torch ops instead of claiming a fusion that does not run."""

import logging

import pytest
import torch

from fastmae_kernels import cuda_ops, dispatch, reference

NO_CC = "Failed to find C compiler. Please specify via CC environment variable."


def test_triton_compile_check_names_the_failure_once_per_device(monkeypatch):
    common = pytest.importorskip("fastmae_kernels.triton_ops._common")
    calls = []

    def no_compiler(device):
        calls.append(device)
        raise RuntimeError(NO_CC + "\n(traceback lines)")

    monkeypatch.setattr(common, "_run_toolchain_kernel", no_compiler)
    monkeypatch.setattr(common, "_compiles", {})
    reason = common.compile_check(torch.device("cuda", 0))
    assert reason == f"Triton cannot compile or run a kernel on this device ({NO_CC})"
    assert common.compile_check(torch.device("cuda", 0)) == reason and len(calls) == 1  # cached per device
    monkeypatch.setattr(common, "_run_toolchain_kernel", lambda device: True)
    assert common.compile_check(torch.device("cuda", 1)) is None  # another device, checked on its own


def test_cuda_backend_runs_the_references_and_warns_once_per_op(monkeypatch, caplog):
    monkeypatch.setattr(cuda_ops, "fused_kernels_reason", lambda device: f"Triton cannot compile ({NO_CC})")
    monkeypatch.setattr(cuda_ops, "_fallbacks_logged", set())
    g = torch.Generator().manual_seed(0)
    x, branch = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    weight, bias = torch.randn(16, generator=g), torch.randn(16, generator=g)
    with caplog.at_level(logging.WARNING, logger="fastmae_kernels"):
        for _ in range(2):
            y = cuda_ops.bias_gelu(x, bias)
            h, normed = cuda_ops.add_layer_norm(x, branch, weight, bias, 1e-6, torch.bfloat16)
    assert torch.equal(y, reference.bias_gelu(x, bias))
    want_h, want_normed = reference.add_layer_norm(x, branch, weight, bias, 1e-6, torch.bfloat16)
    assert torch.equal(h, want_h) and torch.equal(normed, want_normed)
    said = [r.getMessage() for r in caplog.records if "runs the torch reference" in r.getMessage()]
    assert len(said) == 2 and all(NO_CC in line for line in said), said  # once per op, with the reason


def test_block_ops_backend_says_torch_where_the_kernels_cannot_run(monkeypatch):
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device: "cuda")
    monkeypatch.setattr(cuda_ops, "fused_kernels_reason", lambda device: "Triton cannot compile")
    assert dispatch.block_ops_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(cuda_ops, "fused_kernels_reason", lambda device: None)
    assert dispatch.block_ops_backend("auto", "cpu") == "cuda"
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device: "triton")  # explicit: no fallback
    assert dispatch.block_ops_backend("triton", "cpu") == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_compiles_on_this_card():
    from fastmae_kernels.triton_ops import _common

    assert _common.compile_check(torch.device("cuda", torch.cuda.current_device())) is None
    assert cuda_ops.fused_kernels_reason(torch.device("cuda")) is None


def test_device_smoke_test_caches_wrong_answers_and_catches_only_the_errors_named():
    """The one-time device check both GPU backends use (the CUDA extension's smoke op, Triton's compile check)."""
    cache: dict = {}
    assert dispatch.device_smoke_test(cache, torch.device("cuda", 3), lambda d: False, "wrong", "failed: {error}") \
        == "wrong" and cache == {3: "wrong"}

    def raises(error):
        def run(device):
            raise error
        return run

    got = dispatch.device_smoke_test({}, torch.device("cuda", 0), raises(RuntimeError("no kernel image\nmore")),
                                     "wrong", "failed: {error}")
    assert got == "failed: no kernel image"
    with pytest.raises(ValueError):  # not a RuntimeError: the CUDA extension's check lets it through
        dispatch.device_smoke_test({}, torch.device("cuda", 0), raises(ValueError("bug")), "wrong", "failed: {error}")
    got = dispatch.device_smoke_test({}, torch.device("cuda", 0), raises(ValueError("")), "wrong", "failed: {error}",
                                     errors=(Exception,))
    assert got == "failed: ValueError"  # an empty message names the exception type
