"""Triton masked_mse_loss against the fp64 reference: forward and d(pred), both norm_pix settings.

Tolerance (flash-attention's rule): the kernel's error against fp64 may be at most twice the error of the
torch reference run in the same input dtype (which computes in fp32 too), plus a few fp32 ulps.
"""

import pytest
import torch
from _triton_helpers import DTYPES, masking, randn, requires_triton

import fastmae_kernels as fk
from fastmae_kernels import reference

pytestmark = requires_triton
FP32_EPS = torch.finfo(torch.float32).eps


def _loss_and_grad(fn, pred, imgs, mask):
    pred = pred.detach().clone().requires_grad_(True)
    loss = fn(pred, imgs, mask)
    (loss * 1.5).backward()  # a non-unit upstream gradient
    return loss.detach(), pred.grad


CASES = [  # (n, channels, height, width, patch): 7x7 and 5x7 grids, C=1, the 224/16 ViT grid
    (3, 3, 28, 28, 4), (3, 3, 20, 28, 4), (4, 1, 15, 9, 3), (1, 3, 224, 224, 16),
]


@pytest.mark.parametrize("n, channels, height, width, patch", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_mse_loss_matches_fp64_reference(n, channels, height, width, patch, dtype, norm_pix):
    length = (height // patch) * (width // patch)
    _, _, mask = masking(n, length, seed=height)
    # pixels with an offset and a spread per patch, so normalisation matters
    imgs = randn(n, channels, height, width, dtype=dtype, seed=1, scale=0.7, shift=0.4)
    pred = randn(n, length, patch * patch * channels, dtype=dtype, seed=2)
    args = dict(patch_size=patch, norm_pix=norm_pix)

    triton_loss = lambda p, i, m: fk.masked_mse_loss(p, i, m, backend="triton", **args)  # noqa: E731
    got, got_grad = _loss_and_grad(triton_loss, pred, imgs, mask)
    same, same_grad = _loss_and_grad(lambda p, i, m: reference.masked_mse_loss(p, i, m, **args), pred, imgs, mask)
    exact, exact_grad = _loss_and_grad(
        lambda p, i, m: reference.masked_mse_loss(p, i, m, **args), pred.double(), imgs.double(), mask.double()
    )
    assert got.dtype == torch.float32 and got.shape == ()
    floor = 8 * FP32_EPS * exact.abs().item()
    assert (got.double() - exact).abs().item() <= 2 * (same.double() - exact).abs().item() + floor

    # d(pred) is stored in pred's dtype: one rounding of an fp32 value, plus the error of the fp32 ops before
    # it (mean, var, sqrt, divisions: on a GPU Triton's fp32 `/` and sqrt are the ~2-ulp approximate PTX
    # forms, so fp32 outputs were seen 3 ulps off on an H100; 8 fp32 ulps bounds a few such ops).
    assert got_grad.dtype == dtype
    visible = mask == 0
    assert torch.all(got_grad[visible] == 0)
    assert got_grad[~visible].abs().sum() > 0
    eps = torch.finfo(dtype).eps + 8 * FP32_EPS
    scale = exact_grad.abs().max().item()
    torch.testing.assert_close(got_grad.double(), exact_grad, rtol=eps, atol=eps * scale)
    same_err = (same_grad.double() - exact_grad).abs().max().item()
    assert (got_grad.double() - exact_grad).abs().max().item() <= 2 * same_err + 4 * FP32_EPS * scale


def test_masked_mse_loss_strided_pred_and_images():
    """pred as the model passes it (the decoder output without its cls row) and a channels-last image."""
    n, patch, length = 3, 4, 49
    _, _, mask = masking(n, length, seed=3)
    imgs = randn(n, 3, 28, 28, seed=4).to(memory_format=torch.channels_last)
    pred = randn(n, 1 + length, 48, seed=5)[:, 1:]
    got = fk.masked_mse_loss(pred, imgs, mask, patch, backend="triton")
    want = reference.masked_mse_loss(pred.double(), imgs.double(), mask.double(), patch)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_masked_mse_loss_is_not_differentiable_wrt_images():
    _, _, mask = masking(2, 49)
    imgs = randn(2, 3, 28, 28).requires_grad_(True)
    pred = randn(2, 49, 48).requires_grad_(True)
    loss = fk.masked_mse_loss(pred, imgs, mask, 4, backend="triton")
    with pytest.raises(RuntimeError, match="not differentiable w.r.t. imgs"):
        loss.backward()
