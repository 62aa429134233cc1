"""The row-select kernel behind gather_tokens (forward and backward) and insert_mask_tokens (forward).

out[n, l, :] = src[n, idx[n, l], :] where 0 <= idx < SRC_LEN, else the fill row (or zeros),
then optionally + pos[row] with one fp32 add and one rounding to the output dtype (reference._add_pos).
Every output row is written exactly once, so there are no atomics and the result is deterministic.
"""

import torch
import triton
import triton.language as tl

from fastmae_kernels.triton_ops._cast import round_to
from fastmae_kernels.triton_ops._common import row_blocks


@triton.jit
def _select_rows_kernel(
    src_ptr, idx_ptr, fill_ptr, pos_ptr, out_ptr,
    rows, out_len, src_len, dim,
    s_src_n, s_src_l, s_src_d,
    s_idx_n, s_idx_l,
    s_fill_d,
    s_pos_l, s_pos_d,
    HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr, POS_AT_SRC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 row index: N * L * D passes 2**31 at ViT-H batch 1024.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows of out
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = r < rows
    col_ok = cols < dim
    n = r // out_len
    l = r % out_len
    idx = tl.load(idx_ptr + n * s_idx_n + l * s_idx_l, mask=row_ok, other=-1)  # [BLOCK_R] int64
    take = row_ok & (idx >= 0) & (idx < src_len)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    src = src_ptr + (n * s_src_n + idx * s_src_l)[:, None] + cols[None, :] * s_src_d
    # Values go through fp32: exact for every input dtype here (all are fp32 or narrower and the
    # output dtype is at least as wide as each of them), and the single rounding point of the add.
    val = tl.load(src, mask=take[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols * s_fill_d, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
        val = tl.where(take[:, None], val, fill[None, :])
    if HAS_POS:
        if POS_AT_SRC:  # gather: the kept row's own position
            pos_rows = idx
            pos_ok = take[:, None] & col_ok[None, :]
        else:  # insertion: the destination position
            pos_rows = l
            pos_ok = tile_ok
        pos = tl.load(pos_ptr + pos_rows[:, None] * s_pos_l + cols[None, :] * s_pos_d, mask=pos_ok, other=0.0)
        val = val + pos.to(tl.float32)
    out = out_ptr + r[:, None] * dim + cols[None, :]
    tl.store(out, round_to(val, out_ptr.dtype.element_ty), mask=tile_ok)


def select_rows(
    src: torch.Tensor,
    idx: torch.Tensor,
    out_dtype: torch.dtype,
    fill: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    pos_at_src: bool = False,
) -> torch.Tensor:
    """src [N, S, D] (any strides), idx [N, L] int64, fill [1, 1, D], pos [1, *, D] -> new [N, L, D]."""
    n, src_len, dim = src.shape
    out_len = idx.shape[1]
    out = torch.empty((n, out_len, dim), dtype=out_dtype, device=src.device)
    rows = n * out_len
    if rows == 0 or dim == 0:
        return out
    block_r, block_d = row_blocks(dim)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(dim, block_d))
    _select_rows_kernel[grid](
        src, idx, fill if fill is not None else src, pos if pos is not None else src, out,
        rows, out_len, src_len, dim,
        src.stride(0), src.stride(1), src.stride(2),
        idx.stride(0), idx.stride(1),
        fill.stride(2) if fill is not None else 0,
        pos.stride(1) if pos is not None else 0, pos.stride(2) if pos is not None else 0,
        HAS_FILL=fill is not None, HAS_POS=pos is not None, POS_AT_SRC=pos_at_src,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out
