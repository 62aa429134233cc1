"""insert_mask_tokens: x_vis [N, K, D], mask_token [1, 1, D], ids_restore [N, L] (+ pos [1, L, D]) -> [N, L, D].

Forward: one write of the unshuffled sequence (_rows.select_rows with the token as fill row), instead of
the official cat + gather (+ add), which writes [N, L, D] two or three times.
Backward: one kernel reads grad once, scatters the kept rows to d(x_vis) and sums the masked rows per
sample in fp32 for d(mask_token); the [N, D] partials are then summed over N by torch (deterministic,
no float atomics).
"""

import torch
import triton
import triton.language as tl

from fastmae_kernels.triton_ops._cast import round_to
from fastmae_kernels.triton_ops._common import check_ids_unique, check_kernel_dtype, row_blocks
from fastmae_kernels.triton_ops._rows import select_rows

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _insert_backward_kernel(
    grad_ptr, ids_ptr, gx_ptr, partial_ptr,
    length, keep, dim,
    s_g_n, s_g_l, s_g_d,
    s_ids_n, s_ids_l,
    MID_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = cols < dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_R):
        l = start + tl.arange(0, BLOCK_R).to(tl.int64)  # [BLOCK_R]
        row_ok = l < length
        r = tl.load(ids_ptr + n * s_ids_n + l * s_ids_l, mask=row_ok, other=0)  # [BLOCK_R] int64
        tile_ok = row_ok[:, None] & col_ok[None, :]
        g = tl.load(grad_ptr + n * s_g_n + l[:, None] * s_g_l + cols[None, :] * s_g_d, mask=tile_ok, other=0.0)
        # The reference's graph casts the output gradient to the cat dtype (promote(x_vis, token)) first.
        g = round_to(g.to(tl.float32), MID_DTYPE).to(tl.float32)
        kept = (r < keep)[:, None] & tile_ok
        gx = gx_ptr + (n * keep + r)[:, None] * dim + cols[None, :]
        tl.store(gx, round_to(g, gx_ptr.dtype.element_ty), mask=kept)
        masked = (r >= keep)[:, None] & tile_ok
        acc += tl.sum(tl.where(masked, g, 0.0), axis=0)
    tl.store(partial_ptr + n * dim + cols, acc, mask=col_ok)


def _insert_backward(
    grad: torch.Tensor, ids_restore: torch.Tensor, keep: int, x_dtype: torch.dtype, mid_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n, length, dim = grad.shape
    grad_x = torch.empty((n, keep, dim), dtype=x_dtype, device=grad.device)  # [N, K, D]
    partial = torch.empty((n, dim), dtype=torch.float32, device=grad.device)  # [N, D] per-sample token grads
    if n * length == 0 or dim == 0:
        return grad_x, partial.zero_()
    # A permutation writes every d(x_vis) row once; anything else would leave rows unwritten.
    # L ids hit all L slots of their row exactly when they are a permutation.
    hit = torch.zeros((n, length), dtype=torch.bool, device=grad.device).scatter_(1, ids_restore, True)
    check_ids_unique("insert_mask_tokens", hit.all(), "ids_restore must be a permutation of [0, L) per row")
    block_r, block_d = row_blocks(dim, max_cols=128)
    grid = (n, triton.cdiv(dim, block_d))
    _insert_backward_kernel[grid](
        grad, ids_restore, grad_x, partial,
        length, keep, dim,
        grad.stride(0), grad.stride(1), grad.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        MID_DTYPE=_TL_DTYPES[mid_dtype], BLOCK_R=min(block_r, triton.next_power_of_2(length)), BLOCK_D=block_d,
    )
    return grad_x, partial


def _dtypes(x_vis, mask_token, pos_embed) -> tuple[torch.dtype, torch.dtype]:
    """(cat dtype, output dtype), the reference's promotion rules."""
    mid = torch.promote_types(x_vis.dtype, mask_token.dtype)
    return mid, (mid if pos_embed is None else torch.promote_types(mid, pos_embed.dtype))


@torch.library.custom_op("fastmae_triton::insert_mask_tokens", mutates_args=())
def insert_mask_tokens_op(
    x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None
) -> torch.Tensor:
    _, out_dtype = _dtypes(x_vis, mask_token, pos_embed)
    return select_rows(x_vis, ids_restore, out_dtype, fill=mask_token, pos=pos_embed)  # [N, L, D]


@insert_mask_tokens_op.register_fake
def _(x_vis, mask_token, ids_restore, pos_embed):
    _, out_dtype = _dtypes(x_vis, mask_token, pos_embed)
    return x_vis.new_empty((x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2]), dtype=out_dtype)


@torch.library.custom_op("fastmae_triton::insert_mask_tokens_backward", mutates_args=())
def insert_mask_tokens_backward_op(
    grad: torch.Tensor, ids_restore: torch.Tensor, keep: int, x_dtype: torch.dtype, mid_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [N, L, D] -> (d x_vis [N, K, D] in x_dtype, per-sample masked-row sums [N, D] fp32)."""
    return _insert_backward(grad, ids_restore, keep, x_dtype, mid_dtype)


@insert_mask_tokens_backward_op.register_fake
def _(grad, ids_restore, keep, x_dtype, mid_dtype):
    n, _, dim = grad.shape
    return grad.new_empty((n, keep, dim), dtype=x_dtype), grad.new_empty((n, dim), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x_vis, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.keep = x_vis.shape[1]
    ctx.dtypes = (x_vis.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)
    ctx.mid_dtype = _dtypes(x_vis, mask_token, pos_embed)[0]


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    x_dtype, token_dtype, pos_dtype = ctx.dtypes
    grad_x = grad_token = grad_pos = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x, partial = insert_mask_tokens_backward_op(grad, ids_restore, ctx.keep, x_dtype, ctx.mid_dtype)
        if ctx.needs_input_grad[1]:
            grad_token = partial.sum(dim=0).to(ctx.mid_dtype).to(token_dtype).view(1, 1, -1)  # [1, 1, D]
        if not ctx.needs_input_grad[0]:
            grad_x = None
    if ctx.needs_input_grad[3]:
        grad_pos = grad.to(pos_dtype).sum(dim=0, keepdim=True)  # [1, L, D], the reference's expand-backward
    return grad_x, grad_token, None, grad_pos


insert_mask_tokens_op.register_autograd(_backward, setup_context=_setup_context)


def insert_mask_tokens(
    x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    check_kernel_dtype("insert_mask_tokens", x_vis=x_vis, mask_token=mask_token, pos_embed=pos_embed)
    return insert_mask_tokens_op(x_vis, mask_token, ids_restore, pos_embed)
