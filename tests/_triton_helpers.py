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
