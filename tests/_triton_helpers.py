"""Shared bits of the Triton backend tests: the device to run on and a skip when Triton can't run."""

import pytest
import torch

from fastmae_kernels.dispatch import unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REASON = unavailable_reason("triton", DEVICE)
requires_triton = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def masking(n: int, length: int, ratio: float = 0.75, seed: int = 0):
    """A reproducible random masking from the reference: (ids_keep, ids_restore, mask)."""
    from fastmae_kernels import reference

    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, length, generator=g).to(DEVICE)
    return reference.random_masking(noise, ratio)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(DEVICE, dtype)


def assert_close_to_fp64(got, same, exact, dtype, what, ulps: int = 8):
    """An arithmetic kernel's output `got` against fp64 `exact`: its error at most twice the torch reference's
    (`same`, in the same dtypes; flash-attention's rule) plus `ulps` fp32 ulps of the largest value."""
    assert got.dtype == dtype, what
    scale = exact.abs().max().item()
    got_err = (got.double() - exact).abs().max().item()
    same_err = (same.double() - exact).abs().max().item()
    bound = 2 * same_err + ulps * torch.finfo(torch.float32).eps * scale
    assert got_err <= bound, f"{what}: {got_err} vs the reference's {same_err}"
