"""Triton attention for short sequences (fastmae_kernels.attention(..., backend="triton")) against the references.

Output and gradients are arithmetic: each may be off fp64 by at most twice the error of the naive formulation
in the same dtype (`reference.attention`: scores, probabilities and output rounded to the inputs' dtype;
FlashAttention's test rule, as the other Triton tests) plus a few fp32 ulps of the largest value.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from _triton_helpers import DEVICE, assert_close_to_fp64, randn, requires_triton

import fastmae_kernels as fk
from fastmae_kernels import reference

pytestmark = requires_triton
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (B, H, query rows, key rows, head dim): the ViT-B encoder's 50 tokens at head dim 64; the decoder's head dim 32
# with a query count that is not the key count (the last block's masked rows); ViT-H's head dim 80 (padded to
# 128) and its 65 tokens; a head dim below tl.dot's 16; partial blocks everywhere (the interpreter's tiles are
# 32 x 32). One key, one query row: the tests after this one.
SHAPES = [(2, 3, 50, 50, 64), (1, 2, 37, 70, 32), (1, 2, 65, 65, 80), (2, 2, 4, 12, 16), (1, 2, 9, 12, 8),
          (1, 1, 33, 97, 32)]


def _qkv(b, h, m, n, d, dtype, seed):
    q = randn(b, h, m, d, dtype=dtype, seed=seed, scale=1.5)  # scores spread enough that the softmax is not flat
    k = randn(b, h, n, d, dtype=dtype, seed=seed + 1, scale=1.5)
    v = randn(b, h, n, d, dtype=dtype, seed=seed + 2)
    return q, k, v


def _run(fn, q, k, v, grad_out, cast=None):
    """-> (out, dq, dk, dv); the inputs are cast to `cast` first (the fp64 reference)."""
    leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    (out.double() * grad_out).sum().backward()
    return (out.detach(), *(t.grad for t in leaves))


def _triton(q, k, v):
    return fk.attention(q, k, v, backend="triton")


@pytest.fixture(params=["head", "split"])
def backward(request, monkeypatch):
    """Each backward (`backward_kind`): one program per head, or the three split kernels."""
    monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_attention_matches_references(shape, dtype, backward):
    q, k, v = _qkv(*shape, dtype, seed=sum(shape))
    b, h, m, _, d = shape
    grad_out = randn(b, h, m, d, dtype=torch.float64, seed=5).to(dtype).double()  # representable in out's dtype

    got = _run(_triton, q, k, v, grad_out)
    same = _run(reference.attention, q, k, v, grad_out)
    exact = _run(reference.attention, q, k, v, grad_out, cast=torch.float64)
    for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact):
        assert g.shape == e.shape, name
        assert g.abs().sum() > 0, name
        assert_close_to_fp64(g, s, e, dtype, name)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_attention_over_one_key(dtype, backward):
    """Softmax over one key is 1: the output is v exactly, dv is the output gradient exactly, and dq, dk are 0
    up to the rounding of dO.V - dO.O (FlashAttention's backward computes the two apart)."""
    q, k, v = _qkv(2, 3, 4, 1, 16, dtype, seed=6)
    grad_out = randn(2, 3, 4, 16, dtype=torch.float64, seed=7).to(dtype).double()
    out, dq, dk, dv = _run(_triton, q, k, v, grad_out)
    assert torch.equal(out, v.expand_as(out))
    dv_exact = grad_out.sum(2, keepdim=True)
    ulp = torch.finfo(dtype).eps * dv_exact.abs().max().item()  # one rounding to dtype (and fp32 summation order)
    assert (dv.double() - dv_exact).abs().max().item() <= ulp
    bound = 4 * torch.finfo(torch.float32).eps * (grad_out.abs().max() * v.double().abs().max() * 16).item()
    assert dq.abs().max().item() <= bound and dk.abs().max().item() <= bound


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("keys", [2, 5])
def test_attention_one_query_row_within_the_delta_bound(dtype, keys, backward):
    """With one query row and few keys dQ and dK are differences of nearly equal terms: dS = P * (dP - delta), and
    delta = rowsum(dO * O) reads the output rounded to its dtype (FlashAttention-2's backward, which cuDNN's and
    torch's flash kernels share). The naive reference computes delta from unrounded probabilities, so here the
    kernels may exceed twice its error, by at most what that rounding adds: |delta error| <= eps / 2 *
    sum_d |dO O| (+ fp32), which reaches dQ as scale * |delta error| * max|k| (P sums to 1 over keys) and dK as
    scale * |delta error| * max|q| * (P summed over query rows, 1 here)."""
    for seed in range(4):
        q, k, v = _qkv(2, 2, 1, keys, 16, dtype, seed=40 + 3 * seed)
        grad_out = randn(2, 2, 1, 16, dtype=torch.float64, seed=41 + seed).to(dtype).double()
        got = _run(_triton, q, k, v, grad_out)
        same = _run(reference.attention, q, k, v, grad_out)
        exact = _run(reference.attention, q, k, v, grad_out, cast=torch.float64)
        scale = 16 ** -0.5
        delta_err = (torch.finfo(dtype).eps / 2 * (grad_out * exact[0]).abs().sum(-1).max()).item()
        extra = {"dq": scale * delta_err * k.double().abs().max().item(),
                 "dk": scale * delta_err * q.double().abs().max().item()}
        for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact):
            err = (g.double() - e).abs().max().item()
            bound = 2 * (s.double() - e).abs().max().item() + extra.get(name, 0.0) \
                + 8 * torch.finfo(torch.float32).eps * e.abs().max().item()
            assert err <= bound, f"{name} seed {seed}: {err} > {bound}"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on a GPU tensor cores may accumulate dS K in another order")
@pytest.mark.parametrize("shape", [(2, 3, 50, 50, 64), (1, 2, 37, 70, 32), (1, 2, 65, 65, 80)])
def test_the_two_backwards_give_the_same_bits_in_the_interpreter(shape, monkeypatch):
    """Both backwards round dS once and add dQ's per-tile products in the same order, so where each product is
    exact fp32 math (the interpreter) every gradient is bit for bit the same."""
    q, k, v = _qkv(*shape, BF16, seed=19)
    b, h, m, _, d = shape
    grad_out = randn(b, h, m, d, dtype=torch.float64, seed=20).to(BF16).double()
    grads = {}
    for kind in ("head", "split"):
        monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", kind)
        grads[kind] = _run(_triton, q, k, v, grad_out)
    for name, a, c in zip(("out", "dq", "dk", "dv"), grads["head"], grads["split"]):
        assert torch.equal(a, c), name


def test_head_backward_writes_its_scratch_before_reading_it(monkeypatch):
    """The dQ scratch comes uninitialised: handed one full of NaN, the head backward's gradients are unchanged."""
    module = importlib.import_module("fastmae_kernels.triton_ops.attention")

    monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", "head")
    q, k, v = _qkv(1, 2, 37, 70, 32, BF16, seed=21)
    grad_out = randn(1, 2, 37, 32, dtype=torch.float64, seed=22).to(BF16).double()
    clean = _run(_triton, q, k, v, grad_out)
    monkeypatch.setattr(module, "_dq_scratch", lambda *shape_and_device: torch.full(
        shape_and_device[:3], float("nan"), dtype=torch.float32, device=shape_and_device[3]))
    for a, c in zip(clean, _run(_triton, q, k, v, grad_out)):
        assert torch.equal(a, c)


def test_backward_kind_picks_by_heads_and_rejects_unknown_names(monkeypatch):
    """auto: one program per head from HEAD_BACKWARD_MIN_HEADS heads (B * H) up, the split kernels below; each
    kind launches its own kernels."""
    module = importlib.import_module("fastmae_kernels.triton_ops.attention")

    monkeypatch.delenv("FASTMAE_ATTENTION_BACKWARD", raising=False)
    assert module.backward_kind(module.HEAD_BACKWARD_MIN_HEADS) == "head"
    assert module.backward_kind(module.HEAD_BACKWARD_MIN_HEADS - 1) == "split"
    monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", "split")
    assert module.backward_kind(10 ** 6) == "split"
    monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", "head")
    assert module.backward_kind(1) == "head"

    launched = []
    real_launch = module._launch
    monkeypatch.setattr(module, "_launch", lambda name, *a, **kw: (launched.append(name), real_launch(name, *a, **kw)))
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 9, 12, 16, BF16, seed=23))
    for kind, names in (("head", ["forward", "backward_head"]), ("split", ["forward", "dkdv", "dq"])):
        monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", kind)
        launched.clear()
        _triton(q, k, v).sum().backward()
        assert launched == names, kind
    monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", "fused")
    with pytest.raises(ValueError, match="FASTMAE_ATTENTION_BACKWARD must be one of auto, head, split"):
        _triton(q, k, v).sum().backward()


def test_attention_reference_is_sdpa_in_fp64():
    """The naive reference is torch's attention (math) in fp64, output and gradients."""
    q, k, v = _qkv(2, 3, 11, 13, 24, torch.float64, seed=3)
    grad_out = randn(2, 3, 11, 24, dtype=torch.float64, seed=4)
    ours = _run(reference.attention, q, k, v, grad_out)
    theirs = _run(F.scaled_dot_product_attention, q, k, v, grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_attention_reads_views_of_the_qkv_gemm_and_returns_heads_last():
    """The ViT's q, k, v are strided views of one [B, N, 3, H, D] buffer: the kernels read them in place, with
    the same bits as from contiguous copies; the output and every gradient are [B, H, N, D] views of [B, N, H, D]
    buffers, so the block's transpose(1, 2).reshape(B, N, H * D) is free."""
    b, n, h, d = 2, 29, 4, 32
    qkv = randn(b, n, 3, h, d, dtype=BF16, seed=8)
    views = [t.transpose(1, 2) for t in qkv.unbind(2)]  # each [B, H, N, D], strides (3NHD, D, 3HD, 1)
    copies = [t.contiguous() for t in views]
    grad_out = randn(b, h, n, d, dtype=torch.float64, seed=9).to(BF16).double()
    from_views = _run(_triton, *views, grad_out)
    from_copies = _run(_triton, *copies, grad_out)
    for a, c in zip(from_views, from_copies):
        assert torch.equal(a, c)
    leaves = [t.detach().requires_grad_() for t in views]
    out = _triton(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(BF16))  # as the kernels return them (.grad may restride)
    for t in (out, *grads):
        assert t.transpose(1, 2).is_contiguous()
    # a head dim that is not the last in memory is copied first (the kernels need unit stride there)
    q_t = views[0].transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(_triton(q_t, *views[1:]), from_views[0], rtol=0, atol=0)


def test_sdpa_backend_is_torch_sdpa():
    q, k, v = _qkv(2, 2, 7, 9, 16, F32, seed=10)
    assert torch.equal(fk.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_autocast_computes_in_its_dtype():
    """As scaled_dot_product_attention under autocast: fp32 inputs are cast to autocast's dtype first."""
    q, k, v = _qkv(1, 2, 17, 17, 32, F32, seed=11)
    with torch.autocast(DEVICE.type, dtype=BF16):
        out = _triton(q, k, v)
    assert out.dtype == BF16
    assert torch.equal(out, _triton(q.to(BF16), k.to(BF16), v.to(BF16)))


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_eager_calls_skip_the_custom_op_with_the_same_bits(dtype):
    """Eager calls run the launchers through an autograd.Function; the custom op (what torch.compile traces)
    gives the same bits, output and every gradient."""
    from fastmae_kernels.triton_ops.attention import attention_op

    q, k, v = _qkv(2, 2, 21, 40, 32, dtype, seed=12)
    grad_out = randn(2, 2, 21, 32, dtype=torch.float64, seed=13).to(dtype).double()
    eager = _run(_triton, q, k, v, grad_out)
    op = _run(lambda *t: attention_op(*t)[0], q, k, v, grad_out)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)
    out = _triton(*(t.detach().requires_grad_() for t in (q, k, v)))
    assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"


def test_attention_traces_as_one_op_with_its_backward():
    """torch.compile sees the op and its backward as nodes (fakes and autograd registered, no graph break)."""
    q, k, v = _qkv(1, 2, 19, 19, 32, BF16, seed=14)

    def step(q, k, v):
        return _triton(q, k, v).float().pow(2).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves).backward()
    step(*eager).backward()
    for a, b in zip(leaves, eager):
        assert a.grad is not None and torch.equal(a.grad, b.grad)


def test_attention_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom op (torch.library.opcheck)."""
    from fastmae_kernels.triton_ops.attention import attention_op

    q, k, v = _qkv(1, 2, 10, 12, 16, BF16, seed=15)
    torch.library.opcheck(attention_op, tuple(t.requires_grad_() for t in (q, k, v)))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_attention_rejects_bad_input(backend):
    q, k, v = _qkv(1, 2, 5, 6, 16, F32, seed=16)
    with pytest.raises(ValueError, match="share a dtype"):
        fk.attention(q, k.to(BF16), v, backend=backend)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        fk.attention(q, k, v[:, :, :4], backend=backend)
    with pytest.raises(ValueError, match="share batch, heads and head_dim"):
        fk.attention(q[:, :1], k, v, backend=backend)
    with pytest.raises(ValueError, match=r"\[B, H, rows, head_dim\]"):
        fk.attention(q[0], k[0], v[0], backend=backend)
    with pytest.raises(ValueError, match="at least one row"):
        fk.attention(q, k[:, :, :0], v[:, :, :0], backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.attention(q, k, v, backend="flash")


def test_attention_fp64_stays_on_sdpa():
    q, k, v = (t.double() for t in _qkv(1, 1, 4, 4, 16, F32, seed=17))
    with pytest.raises(ValueError, match="use backend='sdpa'"):
        _triton(q, k, v)
    assert fk.attention(q, k, v).dtype == torch.float64


def test_attention_without_query_rows():
    q, k, v = _qkv(1, 2, 0, 7, 16, BF16, seed=18)
    q.requires_grad_()
    out = _triton(q, k, v)
    assert out.shape == (1, 2, 0, 16)
