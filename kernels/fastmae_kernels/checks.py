"""Input validation shared by every backend: one clear error before any kernel runs.

Index range checks cost a device sync on GPU, so there they are done with `torch._assert_async`
(raised at the next sync, no stall); on CPU they raise at once.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # fp64: reference backend, for tests
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton and CUDA kernels store


def _fail(op: str, message: str) -> None:
    raise ValueError(f"fastmae_kernels.{op}: {message}")


def _check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(op, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        _fail(op, f"all inputs must be on one device, got {listed}")


def _check_ids(op: str, name: str, ids: torch.Tensor, batch: int, upper: int) -> None:
    if ids.dtype != torch.int64:
        _fail(op, f"{name} must be int64, got {ids.dtype}")
    if ids.shape[0] != batch:
        _fail(op, f"{name} has batch {ids.shape[0]} but the data has batch {batch}")
    if ids.numel() == 0:
        return
    message = f"fastmae_kernels.{op}: {name} has ids outside [0, {upper})"
    if torch.compiler.is_compiling():  # skipped when traced: a .item() or an assert would break the graph
        return
    lo, hi = torch.aminmax(ids)  # one reduction: on GPU every extra tiny launch counts at ~0.3 ms per step
    if ids.device.type == "cpu":
        if int(lo) < 0 or int(hi) >= upper:
            raise IndexError(message)
    else:
        torch._assert_async((lo >= 0) & (hi < upper), message)


def _check_pos(op: str, pos_embed: torch.Tensor | None, length: int, dim: int) -> None:
    if pos_embed is None:
        return
    _check_float(op, "pos_embed", pos_embed)
    if tuple(pos_embed.shape) != (1, length, dim):
        _fail(op, f"pos_embed must be [1, {length}, {dim}], got {tuple(pos_embed.shape)}")


def check_patch_grid(op: str, imgs: torch.Tensor, patch_size: int) -> int:
    """Validates an image batch against the patch size; returns the number of patches L."""
    _check_ndim(op, "imgs", imgs, 4, "[N, C, H, W]")
    _check_float(op, "imgs", imgs)
    if not isinstance(patch_size, int) or patch_size <= 0:
        _fail(op, f"patch_size must be a positive int, got {patch_size!r}")
    height, width = imgs.shape[2], imgs.shape[3]
    if height % patch_size or width % patch_size:
        _fail(op, f"image size {height}x{width} is not divisible by patch_size {patch_size}")
    return (height // patch_size) * (width // patch_size)


def check_random_masking(noise: torch.Tensor, mask_ratio: float) -> None:
    _check_ndim("random_masking", "noise", noise, 2, "[N, L]")
    if not noise.is_floating_point():
        _fail("random_masking", f"noise must be floating point, got {noise.dtype}")
    if not 0.0 < float(mask_ratio) < 1.0:
        _fail("random_masking", f"mask_ratio must be in (0, 1), got {mask_ratio}")


def check_gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> None:
    length = check_patch_grid("gather_patches", imgs, patch_size)
    _check_ndim("gather_patches", "ids_keep", ids_keep, 2, "[N, K]")
    _check_same_device("gather_patches", imgs=imgs, ids_keep=ids_keep)
    _check_ids("gather_patches", "ids_keep", ids_keep, imgs.shape[0], length)


def check_gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None) -> None:
    _check_ndim("gather_tokens", "x", x, 3, "[N, L, D]")
    _check_float("gather_tokens", "x", x)
    _check_ndim("gather_tokens", "ids_keep", ids_keep, 2, "[N, K]")
    _check_same_device("gather_tokens", x=x, ids_keep=ids_keep, pos_embed=pos_embed)
    _check_pos("gather_tokens", pos_embed, x.shape[1], x.shape[2])
    _check_ids("gather_tokens", "ids_keep", ids_keep, x.shape[0], x.shape[1])


def check_insert_mask_tokens(
    x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None
) -> None:
    op = "insert_mask_tokens"
    _check_ndim(op, "x_vis", x_vis, 3, "[N, K, D]")
    _check_float(op, "x_vis", x_vis)
    _check_float(op, "mask_token", mask_token)
    _check_ndim(op, "ids_restore", ids_restore, 2, "[N, L]")
    n, keep, dim = x_vis.shape
    length = ids_restore.shape[1]
    if tuple(mask_token.shape) != (1, 1, dim):
        _fail(op, f"mask_token must be [1, 1, {dim}], got {tuple(mask_token.shape)}")
    if length < keep:
        _fail(op, f"ids_restore has L={length} < K={keep} visible tokens")
    _check_same_device(op, x_vis=x_vis, mask_token=mask_token, ids_restore=ids_restore, pos_embed=pos_embed)
    _check_pos(op, pos_embed, length, dim)
    _check_ids(op, "ids_restore", ids_restore, n, length)


def check_masked_mse_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int) -> None:
    op = "masked_mse_loss"
    length = check_patch_grid(op, imgs, patch_size)
    _check_ndim(op, "pred", pred, 3, "[N, L, p*p*C]")
    _check_float(op, "pred", pred)
    _check_ndim(op, "mask", mask, 2, "[N, L]")
    n, channels = imgs.shape[0], imgs.shape[1]
    expected = (n, length, patch_size * patch_size * channels)
    if tuple(pred.shape) != expected:
        _fail(op, f"pred must be {list(expected)} for these images, got {list(pred.shape)}")
    if tuple(mask.shape) != (n, length):
        _fail(op, f"mask must be [{n}, {length}], got {list(mask.shape)}")
    _check_same_device(op, pred=pred, imgs=imgs, mask=mask)


def check_kernel_dtypes(backend: str, op: str, **tensors: torch.Tensor | None) -> None:
    """The fused kernels compute in fp32 and store fp32/bf16/fp16; fp64 stays on the torch backend."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"fastmae_kernels.{op}: the {backend} backend supports float32, bfloat16 and float16, "
                f"got {name} {t.dtype} (use backend='torch' for float64)"
            )


def check_add_layer_norm(
    x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> None:
    op = "add_layer_norm"
    if x.dim() < 1:
        _fail(op, "x must have at least one dimension (the normalised one last)")
    _check_float(op, "x", x)
    dim = x.shape[-1]
    if branch is not None:
        _check_float(op, "branch", branch)
        if branch.shape != x.shape:
            _fail(op, f"branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_float(op, name, t)
        if tuple(t.shape) != (dim,):
            _fail(op, f"{name} must be [{dim}] (x's last dimension), got {tuple(t.shape)}")
    _check_same_device(op, x=x, branch=branch, weight=weight, bias=bias)
    if not float(eps) > 0.0:
        _fail(op, f"eps must be > 0, got {eps}")


def check_bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> None:
    op = "bias_gelu"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        _fail(op, "x must be a tensor with at least one dimension (the features last)")
    _check_float(op, "x", x)
    _check_float(op, "bias", bias)
    if tuple(bias.shape) != (x.shape[-1],):
        _fail(op, f"bias must be [{x.shape[-1]}] (x's last dimension), got {tuple(bias.shape)}")
    _check_same_device(op, x=x, bias=bias)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_ndim(op, name, t, 4, "[B, H, rows, head_dim]")
        _check_float(op, name, t)
    _check_same_device(op, q=q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        _fail(op, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        _fail(op, f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        _fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, heads and head_dim")
    if k.shape[2] == 0 and q.shape[2] > 0:
        _fail(op, "k and v need at least one row (a softmax over no keys is undefined)")
