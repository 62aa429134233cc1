"""Triton backend plumbing: availability, backend choice, clear errors, torch.compile without graph breaks."""

import pytest
import torch
from _triton_helpers import DEVICE, masking, randn, requires_triton

import fastmae_kernels as fk
from fastmae_kernels import reference, resolve_backend

pytestmark = requires_triton


def test_cpu_needs_the_interpreter_and_auto_never_picks_triton_on_cpu(monkeypatch):
    from fastmae_kernels import triton_ops

    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in triton_ops.unavailable_reason(torch.device("cpu"))
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu"):
        resolve_backend("triton", "cpu")
    assert triton_ops.unavailable_reason(torch.device("meta")) is not None


def test_float64_is_refused_with_a_clear_error():
    ids_keep, ids_restore, mask = masking(2, 49)
    x = randn(2, 49, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="use backend='torch' for float64"):
        fk.gather_tokens(x, ids_keep, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        fk.masked_mse_loss(randn(2, 49, 48, dtype=torch.float64), randn(2, 3, 28, 28), mask, 4, backend="triton")
    # random_masking only writes ids and 0/1, so fp64 noise is fine (the tests of the torch model use it)
    noise = randn(2, 49, dtype=torch.float64)
    assert torch.equal(fk.random_masking(noise, 0.75, backend="triton")[2], reference.random_masking(noise, 0.75)[2])


def test_out_of_range_and_repeated_ids():
    ids_keep, _, _ = masking(2, 49)
    x = randn(2, 49, 24)
    bad = ids_keep.clone()
    bad[1, 3] = 49
    if DEVICE.type == "cpu":  # on CUDA the range check is an async assert
        with pytest.raises(IndexError, match="outside"):
            fk.gather_tokens(x, bad, backend="triton")
        repeated = ids_keep.clone()
        repeated[0, 1] = repeated[0, 0]
        out = fk.gather_tokens(x.requires_grad_(True), repeated, backend="triton")
        assert torch.equal(out, reference.gather_tokens(x, repeated))  # forward: any ids are fine
        with pytest.raises(ValueError, match="distinct"):
            out.sum().backward()  # backward writes each row once: needs distinct ids
        _, ids_restore, _ = masking(2, 49)
        not_perm = ids_restore.clone()
        not_perm[1, 5] = not_perm[1, 6]
        x_vis = randn(2, 12, 24).requires_grad_(True)
        full = fk.insert_mask_tokens(x_vis, randn(1, 1, 24), not_perm, backend="triton")
        assert torch.equal(full, reference.insert_mask_tokens(x_vis, randn(1, 1, 24), not_perm))
        with pytest.raises(ValueError, match="permutation"):
            full.sum().backward()


def test_torch_compile_traces_all_ops_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager also traces the backward through the fakes."""
    n, channels, size, patch, dim = 2, 3, 28, 4, 40
    length = (size // patch) ** 2

    def step(imgs, noise, weight, token, pos):
        ids_keep, ids_restore, mask = fk.random_masking(noise, 0.75, backend="triton")
        patches = fk.gather_patches(imgs, ids_keep, patch, backend="triton")  # [N, K, p*p*C]
        x = (patches @ weight)[..., :dim]  # [N, K, D]
        x = fk.insert_mask_tokens(x, token, ids_restore, pos, backend="triton")  # [N, L, D]
        vis = fk.gather_tokens(x, ids_keep, pos, backend="triton")  # [N, K, D]
        x = fk.insert_mask_tokens(vis, token, ids_restore, backend="triton")  # [N, L, D]
        x = x + vis.mean(dim=1, keepdim=True)  # masked rows (the loss's) depend on the weight too
        pred = torch.cat([x, x[..., : patch * patch * channels - dim]], dim=-1)  # [N, L, p*p*C]
        return fk.masked_mse_loss(pred, imgs, mask, patch, backend="triton")

    imgs = randn(n, channels, size, size, seed=1)
    noise = randn(n, length, seed=2)
    weight = randn(48, 48, seed=3, scale=0.2)
    token = randn(1, 1, dim, seed=4)
    pos = randn(1, length, dim, seed=5)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (weight, token)]
        loss = fn(imgs, noise, leaves[0], leaves[1], pos)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    torch._dynamo.reset()
    eager = run(step)
    compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=0)
    for got, want in zip(compiled[1], eager[1]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
