"""Triton backend, data-movement ops: bit-exact against fastmae_kernels.reference, forward and backward.

Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py), on CUDA when present. Shapes are small but odd:
7x7 and 5x7 patch grids, D not a power of two, one ViT-style L=196 case.
"""

import pytest
import torch
from _triton_helpers import DTYPES, masking, randn, requires_triton

import fastmae_kernels as fk
from fastmae_kernels import reference

pytestmark = requires_triton


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _run(fn, inputs, grad_out):
    """Output and input gradients of fn(*inputs) for the upstream gradient grad_out."""
    leaves = [_leaf(t) if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad for t in leaves if t.is_floating_point()]


@pytest.mark.parametrize("n, length, ratio", [(3, 49, 0.75), (2, 196, 0.75), (5, 35, 0.6), (1, 7, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_random_masking_equals_reference(n, length, ratio, dtype):
    noise = randn(n, length, dtype=dtype, seed=length)
    got = fk.random_masking(noise, ratio, backend="triton")
    want = reference.random_masking(noise, ratio)
    assert got[0].shape == (n, reference.num_kept(length, ratio))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("height, width, patch", [(28, 28, 4), (20, 28, 4), (15, 9, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_patches_forward_and_backward_exact(height, width, patch, dtype):
    n, channels = 3, 3
    length = (height // patch) * (width // patch)
    ids_keep, _, _ = masking(n, length, seed=height + width)
    imgs = randn(n, channels, height, width, dtype=dtype, seed=1)
    grad = randn(n, ids_keep.shape[1], patch * patch * channels, dtype=dtype, seed=2)
    out, (g_img,) = _run(lambda x: fk.gather_patches(x, ids_keep, patch, backend="triton"), [imgs], grad)
    ref, (r_img,) = _run(lambda x: reference.gather_patches(x, ids_keep, patch), [imgs], grad)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert torch.equal(g_img, r_img)
    assert (g_img != 0).any() and (g_img == 0).any()  # kept patches get gradient, removed ones zeros


def test_gather_patches_vit_grid_and_strided_image():
    """224 px at p=16 (L=196, P=768) from a channels-last image (no copy: the kernel takes strides)."""
    ids_keep, _, _ = masking(2, 196, seed=5)
    imgs = randn(2, 3, 224, 224, seed=3).to(memory_format=torch.channels_last)
    out = fk.gather_patches(imgs, ids_keep, 16, backend="triton")
    assert torch.equal(out, reference.gather_patches(imgs, ids_keep, 16))


@pytest.mark.parametrize("dim", [24, 40, 96])
@pytest.mark.parametrize("x_dtype, pos_dtype", [
    (torch.float32, None), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.bfloat16),
])
def test_gather_tokens_exact(dim, x_dtype, pos_dtype):
    n, length = 3, 49
    ids_keep, _, _ = masking(n, length, seed=dim)
    x = randn(n, length, dim, dtype=x_dtype, seed=1)
    pos = None if pos_dtype is None else randn(1, length, dim, dtype=pos_dtype, seed=2)
    inputs = [x] if pos is None else [x, pos]
    out_dtype = x_dtype if pos is None else torch.promote_types(x_dtype, pos_dtype)
    grad = randn(n, ids_keep.shape[1], dim, dtype=out_dtype, seed=3)
    out, grads = _run(lambda *t: fk.gather_tokens(t[0], ids_keep, *t[1:], backend="triton"), inputs, grad)
    ref, ref_grads = _run(lambda *t: reference.gather_tokens(t[0], ids_keep, *t[1:]), inputs, grad)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert torch.equal(grads[0], ref_grads[0])  # d x: pure movement (+ one cast)
    if pos is not None:  # d pos sums over the batch: exact up to summation order
        tol = torch.finfo(pos_dtype).eps * n
        torch.testing.assert_close(grads[1], ref_grads[1], rtol=tol, atol=tol * grad.abs().max().item())


@pytest.mark.parametrize("dim", [24, 40, 96])
@pytest.mark.parametrize("x_dtype, token_dtype, pos_dtype", [
    (torch.float32, torch.float32, None), (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),  # autocast: bf16 activations, fp32 token -> fp32
    (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float16, torch.float16, None),
    (torch.float16, torch.bfloat16, torch.float16),
])
def test_insert_mask_tokens_exact(dim, x_dtype, token_dtype, pos_dtype):
    n, length = 3, 49
    _, ids_restore, _ = masking(n, length, seed=dim)
    keep = reference.num_kept(length, 0.75)
    # x_vis as the model passes it: the decoder-embedded sequence without its cls row (a strided view).
    x_vis = randn(n, 1 + keep, dim, dtype=x_dtype, seed=1)[:, 1:]
    token = randn(1, 1, dim, dtype=token_dtype, seed=2)
    pos = None if pos_dtype is None else randn(1, length, dim, dtype=pos_dtype, seed=3)
    inputs = [x_vis, token] if pos is None else [x_vis, token, pos]
    ref = reference.insert_mask_tokens(*inputs[:2], ids_restore, *inputs[2:])
    grad = randn(n, length, dim, dtype=ref.dtype, seed=4)
    out, grads = _run(lambda *t: fk.insert_mask_tokens(t[0], t[1], ids_restore, *t[2:], backend="triton"), inputs, grad)
    ref, ref_grads = _run(lambda *t: reference.insert_mask_tokens(t[0], t[1], ids_restore, *t[2:]), inputs, grad)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert torch.equal(grads[0], ref_grads[0])  # d x_vis: pure movement (+ one cast)
    for got, want in zip(grads[1:], ref_grads[1:]):  # d token, d pos: sums, exact up to order
        tol = torch.finfo(want.dtype).eps * 4
        scale = want.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


def test_insert_mask_tokens_vit_like_length_and_token_grad_is_deterministic():
    n, length, dim = 2, 196, 40
    _, ids_restore, _ = masking(n, length, seed=7)
    x_vis = _leaf(randn(n, 49, dim, seed=1))
    token = _leaf(randn(1, 1, dim, seed=2))
    grad = randn(n, length, dim, seed=3)
    runs = []
    for _ in range(2):
        x_vis.grad = token.grad = None
        fk.insert_mask_tokens(x_vis, token, ids_restore, backend="triton").backward(grad)
        runs.append(token.grad.clone())
    assert torch.equal(runs[0], runs[1])
    want = reference.insert_mask_tokens(x_vis, token, ids_restore)
    assert torch.equal(fk.insert_mask_tokens(x_vis, token, ids_restore, backend="triton"), want)
