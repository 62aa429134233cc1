"""Plain-torch references for the MAE ops: the single source of truth for tests and benchmarks.

Each function follows the official MAE code (facebookresearch/mae, models_mae.py) step by step, so
that every fused backend can be checked against the formulation the paper was trained with.
"""

import torch
import torch.nn.functional as F


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: the official `int(L * (1 - mask_ratio))`."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float):
    """Per-sample random masking by argsort of noise; ascending noise is kept.

    noise: [N, L] -> ids_keep [N, K] int64, ids_restore [N, L] int64, mask [N, L] (1 = removed).
    """
    n, length = noise.shape
    keep = num_kept(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # [N, L] ascending: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    ids_keep = ids_shuffle[:, :keep]  # [N, K]
    mask = torch.ones(n, length, device=noise.device, dtype=noise.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # [N, L] unshuffled
    return ids_keep, ids_restore, mask


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C] in the official (p, q, c) order, patches row-major."""
    n, c, height, width = imgs.shape
    p = patch_size
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: [N, L, p*p*C] -> [N, C, H, W]."""
    p = patch_size
    h, w = height // p, width // p
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def _gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [N, L, D], ids [N, K] -> [N, K, D] (the official gather with a repeated index)."""
    return torch.gather(x, dim=1, index=ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _add_pos(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The position add every backend must reproduce bit for bit: one fp32 add, one rounding to the
    promoted dtype (so bf16 activations + an fp32 table give fp32, as the official code does under autocast)."""
    out_dtype = torch.promote_types(x.dtype, pos.dtype)
    acc_dtype = torch.promote_types(out_dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    return (x.to(acc_dtype) + pos.to(acc_dtype)).to(out_dtype)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Visible patches only: [N, C, H, W], ids_keep [N, K] -> [N, K, p*p*C]."""
    return _gather_rows(patchify(imgs, patch_size), ids_keep)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, L, D], ids_keep [N, K], pos_embed [1, L, D] or None -> [N, K, D] (+ pos of each kept row)."""
    out = _gather_rows(x, ids_keep)  # [N, K, D]
    if pos_embed is not None:
        pos = _gather_rows(pos_embed.expand(x.shape[0], -1, -1), ids_keep)  # [N, K, D]
        out = _add_pos(out, pos)
    return out


def insert_mask_tokens(
    x_vis: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official decoder unshuffle: cat(x_vis, mask tokens) then gather by ids_restore (+ pos).

    x_vis [N, K, D], mask_token [1, 1, D], ids_restore [N, L], pos_embed [1, L, D] -> [N, L, D] in the
    promoted dtype of the inputs, as torch.cat promotes: under autocast bf16 x_vis and the fp32 mask
    token give fp32, exactly what the official decoder feeds its first block.
    """
    n, keep, dim = x_vis.shape
    length = ids_restore.shape[1]
    dtype = torch.promote_types(x_vis.dtype, mask_token.dtype)
    mask_tokens = mask_token.to(dtype).expand(n, length - keep, dim)  # [N, L-K, D]
    x_full = torch.cat([x_vis.to(dtype), mask_tokens], dim=1)  # [N, L, D] shuffled order
    out = _gather_rows(x_full, ids_restore)  # [N, L, D] original order
    if pos_embed is not None:
        out = _add_pos(out, pos_embed.expand(n, -1, -1))
    return out


def patch_targets(imgs: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets [N, L, p*p*C] in fp32: pixels, or per-patch normalised pixels.

    The official code uses torch.var's default unbiased estimator; so do we.
    """
    target = patchify(imgs.to(torch.promote_types(imgs.dtype, torch.float32)), patch_size)
    return normalize_patches(target, eps) if norm_pix else target


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels [..., P] (zero mean, unit unbiased variance + eps), as the official norm_pix."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The official forward_loss: mean squared error per patch, averaged over removed patches.

    A scalar in fp32 (fp64 for fp64 images): half-precision inputs are accumulated in fp32."""
    target = patch_targets(imgs, patch_size, norm_pix, eps)  # [N, L, P]
    loss = (pred.to(target.dtype) - target) ** 2
    loss = loss.mean(dim=-1)  # [N, L] mean per patch
    mask = mask.to(target.dtype)
    return (loss * mask).sum() / mask.sum()


def add_layer_norm(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add and the LayerNorm after it, op for op as timm's block runs them:
    h = x + branch (torch's promotion; h is x without a branch), y = layer_norm(h) cast to out_dtype (the cast
    the next Linear makes under autocast, done here). x, branch [*, D]; weight, bias [D] -> (h, y).

    The norm runs in h's and the weights' common dtype (fp32 for bf16 h with fp32 weights, as autocast runs it)
    and y is rounded once, to out_dtype: CUDA's layer_norm refuses a bf16/fp16 input with fp32 weights, which
    the CPU's accepts (2026-12-04, H200), so the reference casts rather than rely on either."""
    h = x if branch is None else x + branch
    norm_dtype = torch.promote_types(h.dtype, torch.promote_types(weight.dtype, bias.dtype))
    y = F.layer_norm(h.to(norm_dtype), (h.shape[-1],), weight.to(norm_dtype), bias.to(norm_dtype), eps)
    return h, y.to(out_dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The ViT MLP's bias add and exact (erf) GELU on a Linear's output without its bias: GELU(x + bias),
    computed in fp32 (fp64 for fp64 inputs) and stored once in x's dtype. x [*, F], bias [F] -> [*, F].

    (nn.Linear + nn.GELU under bf16 autocast round x + bias to bf16 before the GELU; computing the sum in fp32
    is what the fused kernel does and is the more exact of the two.)"""
    acc_dtype = torch.promote_types(torch.promote_types(x.dtype, bias.dtype), torch.float32)
    return F.gelu(x.to(acc_dtype) + bias.to(acc_dtype)).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, step by step in the inputs' dtype (the naive formulation FlashAttention's
    tests hold kernels to): the scores and the output rounded to that dtype by their matmuls, the softmax
    computed in fp32 (fp64 for fp64) and rounded. q [B, H, M, D], k, v [B, H, N, D] -> [B, H, M, D]."""
    scale = q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-2, -1)  # [B, H, M, N]
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    probs = torch.softmax(scores.to(acc_dtype), dim=-1).to(v.dtype)
    return probs @ v
