"""CUDA backend (csrc/ -> fastmae_kernels._C): build check, then every op against fastmae_kernels.reference.

- Build: where torch is a CUDA build, nvcc exists and FASTMAE_BUILD_CUDA != 0, the extension must have been
  built at install time, import, register torch.ops.fastmae_cuda.*, and be newer than csrc/ (else FAIL: CI
  then catches a .cu file that does not compile).
- CPU: the C++ ops also take CPU tensors, running the kernels' own functors in a host loop, so the index
  math, the 16-byte and scalar paths and every rounding are checked here without a GPU: exact equality for
  data movement, dtype tolerances for the loss. torch.library.opcheck checks schemas, fakes and autograd.
- CUDA: the same comparisons through the public API with backend="cuda" (skipped without a GPU), plus
  run-to-run bit equality of the reductions.
"""

import glob
import os
import shutil

import pytest
import torch

import fastmae_kernels as fk
from fastmae_kernels import cuda_ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BUILT = cuda_ops.IMPORT_ERROR is None
requires_ext = pytest.mark.skipif(not BUILT, reason=f"fastmae_kernels._C not built: {cuda_ops.IMPORT_ERROR}")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs the host twin)"),
    ),
]


def _nvcc() -> str | None:
    """nvcc as setup.py finds it (torch's CUDA_HOME: $CUDA_HOME, then nvcc on PATH, then /usr/local/cuda)."""
    from torch.utils.cpp_extension import CUDA_HOME

    path = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return path if path and os.path.exists(path) else shutil.which("nvcc")


def _build_expected() -> str | None:
    """None when setup.py must have built the extension here, else why it would not have."""
    if os.environ.get("FASTMAE_BUILD_CUDA", "auto").lower() in ("0", "false", "no", "off"):
        return "FASTMAE_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _nvcc() is None:
        return "no nvcc"
    return None


# ---------------------------------------------------------------------------------------------- build
def test_extension_built_and_registered():
    why_not = _build_expected()
    if why_not is not None:
        pytest.skip(f"the CUDA extension is not expected here: {why_not}")
    assert BUILT, (
        f"torch is a CUDA build and nvcc exists, but fastmae_kernels._C does not import ({cuda_ops.IMPORT_ERROR}): "
        "the CUDA build failed or was skipped; reinstall with pip install --no-build-isolation -e ."
    )
    from fastmae_kernels import _C

    for name in ("random_masking", "gather_patches", "gather_patches_backward", "gather_tokens",
                 "gather_tokens_backward", "insert_mask_tokens", "insert_mask_tokens_backward",
                 "masked_mse_loss", "masked_mse_loss_backward"):
        assert hasattr(torch.ops.fastmae_cuda, name), f"torch.ops.fastmae_cuda.{name} is not registered"
    built = os.path.getmtime(_C.__file__)
    stale = [p for p in glob.glob(os.path.join(ROOT, "csrc", "*")) if os.path.getmtime(p) > built]
    assert not stale, f"{_C.__file__} is older than {stale}: rebuild with pip install --no-build-isolation -e ."


def test_cuda_backend_refuses_cpu():
    assert cuda_ops.unavailable_reason(torch.device("cpu")) is not None
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        fk.gather_tokens(torch.randn(2, 4, 8), torch.zeros(2, 1, dtype=torch.int64), backend="cuda")


# ---------------------------------------------------------------------------------------------- helpers
def _randn(*shape, dtype=torch.float32, seed=0, device="cpu", scale=1.0, shift=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)


def _masking(n, length, seed=0, device="cpu", ratio=0.75):
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(seed)).to(device)
    return reference.random_masking(noise, ratio)


def _op(name: str, device: str):
    """The cuda backend's op: through the public API on a GPU, the backend module directly on CPU."""
    if device == "cuda":
        return lambda *args: getattr(fk, name)(*args, backend="cuda")
    return getattr(cuda_ops, name)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, starting one element past an aligned address (forces the scalar path)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view(t.shape).copy_(t)


def _grads(fn, inputs, grad_out):
    """Output and the gradients of fn(*inputs) w.r.t. its floating inputs, for the upstream gradient grad_out."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad for t in leaves if t is not None and t.is_floating_point()]


# ---------------------------------------------------------------------------------------------- random_masking
@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, length, ratio", [(3, 49, 0.75), (2, 196, 0.75), (5, 35, 0.6), (1, 7, 0.5)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_random_masking_exact(device, n, length, ratio, dtype):
    noise = _randn(n, length, dtype=dtype, seed=length, device=device)
    got = _op("random_masking", device)(noise, ratio)
    want = reference.random_masking(noise, ratio)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


# ---------------------------------------------------------------------------------------------- gather_patches
# (H, W, p, C): P = 48 and p = 8 take the 16-byte paths; P = 27 / p = 3 the scalar ones.
@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("height, width, patch, channels", [(28, 20, 4, 3), (24, 16, 8, 1), (15, 9, 3, 3), (16, 24, 8, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_patches_exact(device, height, width, patch, channels, dtype):
    n = 3
    length = (height // patch) * (width // patch)
    ids_keep, _, _ = _masking(n, length, seed=height + width, device=device)
    imgs = _randn(n, channels, height, width, dtype=dtype, seed=1, device=device)
    grad = _randn(n, ids_keep.shape[1], patch * patch * channels, dtype=dtype, seed=2, device=device)
    op = _op("gather_patches", device)
    out, (g_img,) = _grads(lambda x: op(x, ids_keep, patch), [imgs], grad)
    ref, (r_img,) = _grads(lambda x: reference.gather_patches(x, ids_keep, patch), [imgs], grad)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert torch.equal(g_img, r_img)
    assert (g_img != 0).any() and (g_img == 0).any()  # kept patches get gradient, removed ones zeros


# ---------------------------------------------------------------------------------------------- gather_tokens
@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [24, 13])  # 24: 16-byte path for every dtype pair; 13: scalar path
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [None] + DTYPES)
def test_gather_tokens_exact(device, dim, x_dtype, pos_dtype):
    n, length = 3, 35
    ids_keep, _, _ = _masking(n, length, seed=dim, device=device)
    x = _randn(n, length, dim, dtype=x_dtype, seed=3, device=device)
    pos = None if pos_dtype is None else _randn(1, length, dim, dtype=pos_dtype, seed=4, device=device)
    out_dtype = x_dtype if pos is None else torch.promote_types(x_dtype, pos_dtype)
    grad = _randn(n, ids_keep.shape[1], dim, dtype=out_dtype, seed=5, device=device)
    op = _op("gather_tokens", device)
    out, got = _grads(lambda a, b: op(a, ids_keep, b), [x, pos], grad)
    ref, want = _grads(lambda a, b: reference.gather_tokens(a, ids_keep, b), [x, pos], grad)
    assert out.dtype == ref.dtype == out_dtype and torch.equal(out, ref)
    assert torch.equal(got[0], want[0])  # d x: each kept row's gradient, zeros elsewhere
    if pos is not None:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_gather_tokens_misaligned_inputs(device):
    """Inputs one element off a 16-byte boundary take the scalar path and give the same bits."""
    ids_keep, _, _ = _masking(2, 49, seed=7, device=device)
    x = _randn(2, 49, 32, dtype=torch.bfloat16, seed=8, device=device)
    pos = _randn(1, 49, 32, seed=9, device=device)
    want = reference.gather_tokens(x, ids_keep, pos)
    got = _op("gather_tokens", device)(_misaligned(x), ids_keep, _misaligned(pos))
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- insert_mask_tokens
@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [24, 13])
@pytest.mark.parametrize("x_dtype, token_dtype", [(d, t) for d in DTYPES for t in DTYPES])
@pytest.mark.parametrize("with_pos", [False, True])
def test_insert_mask_tokens(device, dim, x_dtype, token_dtype, with_pos):
    n, length = 3, 35
    _, ids_restore, _ = _masking(n, length, seed=dim + 1, device=device)
    keep = reference.num_kept(length, 0.75)
    x_vis = _randn(n, keep, dim, dtype=x_dtype, seed=10, device=device)
    token = _randn(1, 1, dim, dtype=token_dtype, seed=11, device=device)
    pos = _randn(1, length, dim, seed=12, device=device) if with_pos else None
    out_dtype = torch.promote_types(x_dtype, token_dtype)
    out_dtype = torch.promote_types(out_dtype, torch.float32) if with_pos else out_dtype
    grad = _randn(n, length, dim, dtype=out_dtype, seed=13, device=device)
    op = _op("insert_mask_tokens", device)
    out, got = _grads(lambda a, b, c: op(a, b, ids_restore, c), [x_vis, token, pos], grad)
    ref, want = _grads(lambda a, b, c: reference.insert_mask_tokens(a, b, ids_restore, c), [x_vis, token, pos], grad)
    assert out.dtype == ref.dtype == out_dtype and torch.equal(out, ref)
    assert got[0].dtype == x_dtype and torch.equal(got[0], want[0])  # d x_vis: pure data movement
    # d mask_token: a sum of N*(L-K) rows in fp32 in another order than torch's; one rounding to the
    # token's dtype at the end, so allow a few fp32 ulps of the sum plus one ulp of the token dtype.
    eps = torch.finfo(torch.promote_types(x_dtype, token_dtype)).eps
    scale = grad.float().abs().sum(dim=(0, 1)).max().item()
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2 * eps, atol=1e-6 * scale)
    assert got[1].abs().sum() > 0
    if with_pos:
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- masked_mse_loss
def _loss_tol(dtype: torch.dtype) -> dict:
    """The loss is fp32 arithmetic whatever the input dtype: only the summation order differs from torch."""
    return {"rtol": 2e-5, "atol": 1e-6}


def _grad_tol(dtype: torch.dtype) -> dict:
    """d pred is computed in fp32 and rounded once to pred's dtype: one ulp of that dtype, plus fp32 slack."""
    return {"rtol": torch.finfo(dtype).eps, "atol": 1e-7}


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("height, width, patch, channels", [(28, 20, 4, 3), (15, 9, 3, 3), (16, 16, 8, 1)])
@pytest.mark.parametrize("pred_dtype", DTYPES)
@pytest.mark.parametrize("img_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_mse_loss(device, height, width, patch, channels, pred_dtype, img_dtype, norm_pix):
    n = 3
    length = (height // patch) * (width // patch)
    _, _, mask = _masking(n, length, seed=height * width, device=device)
    # Images with an offset, like unnormalised pixels: a one-pass variance would lose digits here.
    imgs = _randn(n, channels, height, width, dtype=img_dtype, seed=14, device=device, scale=0.2, shift=3.0)
    pred = _randn(n, length, patch * patch * channels, dtype=pred_dtype, seed=15, device=device)
    op = _op("masked_mse_loss", device)
    out, (g_pred,) = _grads(lambda p: op(p, imgs, mask, patch, norm_pix), [pred], torch.tensor(1.7, device=device))
    ref, (r_pred,) = _grads(
        lambda p: reference.masked_mse_loss(p, imgs, mask, patch, norm_pix), [pred], torch.tensor(1.7, device=device)
    )
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out, ref, **_loss_tol(pred_dtype))
    assert g_pred.dtype == pred_dtype
    torch.testing.assert_close(g_pred, r_pred, **_grad_tol(pred_dtype))
    assert torch.equal(g_pred[mask == 0], torch.zeros_like(g_pred[mask == 0]))  # visible rows: no gradient


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_masked_mse_loss_fp64_refused(device):
    pred = torch.zeros(1, 4, 12, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="backend='torch' for float64"):
        _op("masked_mse_loss", device)(pred, torch.zeros(1, 3, 4, 4, device=device), torch.ones(1, 4, device=device), 2)


# ---------------------------------------------------------------------------------------------- torch.library
@requires_ext
def test_opcheck_schemas_fakes_and_autograd():
    """Schema, fake kernel and autograd registration of every op agree with the real op (CPU tensors)."""
    ids_keep, ids_restore, mask = _masking(2, 16, seed=3)
    imgs = _randn(2, 3, 8, 8, seed=1)
    x = _randn(2, 16, 8, seed=2, dtype=torch.bfloat16).requires_grad_()
    pos = _randn(1, 16, 8, seed=3)
    x_vis = _randn(2, 4, 8, seed=4).requires_grad_()
    token = _randn(1, 1, 8, seed=5, dtype=torch.bfloat16).requires_grad_()
    pred = _randn(2, 16, 12, seed=6).requires_grad_()
    ops = torch.ops.fastmae_cuda
    cases = [
        (ops.random_masking, (_randn(2, 16, seed=7), 0.75)),
        (ops.gather_patches, (imgs.clone().requires_grad_(), ids_keep, 2)),
        (ops.gather_tokens, (x, ids_keep, pos)),
        (ops.insert_mask_tokens, (x_vis, token, ids_restore, pos)),
        (ops.masked_mse_loss, (pred, imgs, mask, 2, True, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)  # schema, fake tensor, autograd registration, aot_dispatch_dynamic


# ---------------------------------------------------------------------------------------------- GPU only
@requires_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: ViT-size grids and run-to-run bits")
def test_vit_shapes_match_reference_and_are_deterministic():
    """224 px, p=16 (L=196, P=768), decoder D=512, bf16 activations + fp32 token/pos as under autocast:
    many blocks, row chunks and loss partials; two runs give the same bits."""
    n, length, dim = 16, 196, 512
    ids_keep, ids_restore, mask = _masking(n, length, seed=21, device="cuda")
    keep = ids_keep.shape[1]
    imgs = _randn(n, 3, 224, 224, seed=22, device="cuda")
    pred = _randn(n, length, 768, dtype=torch.bfloat16, seed=23, device="cuda")
    x_vis = _randn(n, keep, dim, dtype=torch.bfloat16, seed=24, device="cuda")
    token = _randn(1, 1, dim, seed=25, device="cuda", scale=0.02)
    pos = _randn(1, length, dim, seed=26, device="cuda", scale=0.1)
    grad = _randn(n, length, dim, seed=27, device="cuda")
    op = _op("insert_mask_tokens", "cuda")
    runs = [_grads(lambda a, b: op(a, b, ids_restore, pos), [x_vis, token], grad) for _ in range(2)]
    ref, want = _grads(lambda a, b: reference.insert_mask_tokens(a, b, ids_restore, pos), [x_vis, token], grad)
    assert torch.equal(runs[0][0], ref) and torch.equal(runs[0][1][0], want[0])
    scale = grad.abs().sum(dim=(0, 1)).max().item()  # fp32 sums of N*(L-K) rows in another order
    torch.testing.assert_close(runs[0][1][1], want[1], rtol=1e-5, atol=1e-6 * scale)
    assert torch.equal(runs[0][1][1], runs[1][1][1])  # mask-token gradient: same bits every run
    loss_op = _op("masked_mse_loss", "cuda")
    losses = [_grads(lambda p: loss_op(p, imgs, mask, 16), [pred], torch.tensor(1.0, device="cuda")) for _ in range(2)]
    ref_loss, (ref_grad,) = _grads(lambda p: reference.masked_mse_loss(p, imgs, mask, 16), [pred],
                                   torch.tensor(1.0, device="cuda"))
    torch.testing.assert_close(losses[0][0], ref_loss, **_loss_tol(torch.bfloat16))
    torch.testing.assert_close(losses[0][1][0], ref_grad, **_grad_tol(torch.bfloat16))
    assert torch.equal(losses[0][0], losses[1][0])  # fixed-order reduction: same bits every run


@requires_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_cuda_on_gpu():
    reason = cuda_ops.unavailable_reason(torch.device("cuda"))
    assert reason is None, f"the cuda backend does not run on this GPU (built for FASTMAE_CUDA_ARCH_LIST?): {reason}"
    assert fk.resolve_backend("auto", "cuda") == "cuda"
