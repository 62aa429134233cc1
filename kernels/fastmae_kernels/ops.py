"""Public MAE ops. Each validates its inputs once, then runs on the chosen backend."""

import torch
import torch.nn.functional as F

from fastmae_kernels import checks
from fastmae_kernels.dispatch import backend_module

ATTENTION_BACKENDS = ("sdpa", "triton")


def random_masking(noise: torch.Tensor, mask_ratio: float, backend: str = "auto"):
    """noise [N, L] -> (ids_keep [N, K] int64, ids_restore [N, L] int64, mask [N, L]); K = int(L*(1-ratio)).

    Ascending noise is kept; mask is 1 on removed patches, in noise's dtype (the official semantics).
    """
    checks.check_random_masking(noise, mask_ratio)
    return backend_module(backend, noise.device).random_masking(noise, mask_ratio)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str = "auto") -> torch.Tensor:
    """imgs [N, C, H, W], ids_keep [N, K] -> visible patches [N, K, p*p*C] in the official (p, q, c) order."""
    checks.check_gather_patches(imgs, ids_keep, patch_size)
    return backend_module(backend, imgs.device).gather_patches(imgs, ids_keep, patch_size)


def gather_tokens(
    x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """x [N, L, D], ids_keep [N, K], pos_embed [1, L, D] -> [N, K, D] with the kept rows' positions added."""
    checks.check_gather_tokens(x, ids_keep, pos_embed)
    return backend_module(backend, x.device).gather_tokens(x, ids_keep, pos_embed)


def insert_mask_tokens(
    x_vis: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x_vis [N, K, D], mask_token [1, 1, D], ids_restore [N, L], pos_embed [1, L, D] -> [N, L, D]."""
    checks.check_insert_mask_tokens(x_vis, mask_token, ids_restore, pos_embed)
    return backend_module(backend, x_vis.device).insert_mask_tokens(x_vis, mask_token, ids_restore, pos_embed)


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """pred [N, L, p*p*C], imgs [N, C, H, W], mask [N, L] -> fp32 scalar: the official MAE loss."""
    checks.check_masked_mse_loss(pred, imgs, mask, patch_size)
    return backend_module(backend, pred.device).masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, eps)


def add_layer_norm(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [*, D], branch [*, D] or None, weight/bias [D] -> (h = x + branch, y = LayerNorm(h) in out_dtype).

    A pre-norm block's residual add and the LayerNorm after it; out_dtype (default: h's dtype) is the dtype the
    next Linear reads, e.g. bf16 under autocast. Without a branch h is x (the same tensor)."""
    checks.check_add_layer_norm(x, branch, weight, bias, eps)
    if out_dtype is None:
        out_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    return backend_module(backend, x.device).add_layer_norm(x, branch, weight, bias, float(eps), out_dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [*, F] (a Linear's output without its bias), bias [F] -> GELU(x + bias) [*, F] in x's dtype.

    The ViT MLP's fc1 bias and exact (erf) GELU; on the triton/cuda backends one kernel each way, the backward
    returning the bias gradient (fp32 sums) from the same pass as x's."""
    checks.check_bias_gelu(x, bias)
    return backend_module(backend, x.device).bias_gelu(x, bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """q [B, H, M, D], k and v [B, H, N, D] -> softmax(q k^T / sqrt(D)) v [B, H, M, D], no mask, no dropout.

    backend "sdpa": torch's scaled_dot_product_attention (cuDNN or FlashAttention on a GPU, as torch picks).
    "triton": fastmae's kernels for short sequences (fastmae_kernels.triton_ops.attention), whose output and
    gradients are [B, H, *, D] views of [B, *, H, D] buffers. Under autocast both compute in autocast's dtype,
    as scaled_dot_product_attention does."""
    checks.check_attention(q, k, v)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend != "triton":
        raise ValueError(f"fastmae_kernels.attention: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    device = q.device.type
    if torch.is_autocast_enabled(device) and q.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return backend_module("triton", q.device).attention(q, k, v)
