"""gather_patches: imgs [N, C, H, W], ids_keep [N, K] -> visible patches [N, K, p*p*C], (p, q, c) order.

Forward reads only the kept patches of the image (25% of it at mask ratio 0.75) and writes each patch
row once, so the patch embedding can be a Linear on [N, K, p*p*C]. Backward writes the whole image
gradient once: kept patches get their row, the others zeros (via an inverse index map, no atomics).
"""

import torch
import triton
import triton.language as tl

from fastmae_kernels.triton_ops._common import check_kernel_dtype, inverse_ids, row_blocks


@triton.jit
def patch_offsets(n, patch, cols, grid_w, p, channels, s_n, s_c, s_h, s_w):
    """Element offsets into an [N, C, H, W] image of patch `patch` [R] of sample `n` [R], at
    patchified columns `cols` [E] = (i * p + j) * C + c: a [R, E] tile."""
    hi = patch // grid_w
    wi = patch % grid_w
    i = cols // (p * channels)
    j = (cols // channels) % p
    c = cols % channels
    row = n * s_n + (hi * p) * s_h + (wi * p) * s_w  # [R] the patch's top-left pixel
    col = c * s_c + i * s_h + j * s_w  # [E] offset inside the patch
    return row[:, None] + col[None, :]


@triton.jit
def _gather_patches_kernel(
    img_ptr, idx_ptr, out_ptr,
    rows, out_len, src_len, width, grid_w, p, channels,
    s_n, s_c, s_h, s_w, s_idx_n, s_idx_l,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[n, k, :] = patch idx[n, k] of image n; rows whose idx is outside [0, src_len) get zeros.
    With idx = the inverse map and out = a patch-major view, the same loop is the backward (see below)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows of out
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = r < rows
    col_ok = cols < width
    n = r // out_len
    idx = tl.load(idx_ptr + n * s_idx_n + (r % out_len) * s_idx_l, mask=row_ok, other=-1)
    take = row_ok & (idx >= 0) & (idx < src_len)
    src = img_ptr + patch_offsets(n, idx, cols, grid_w, p, channels, s_n, s_c, s_h, s_w)
    val = tl.load(src, mask=take[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + r[:, None] * width + cols[None, :], val, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_patches_kernel(
    grad_ptr, inv_ptr, out_ptr,
    rows, length, width, grid_w, p, channels,
    s_g_n, s_g_k, s_g_e, s_inv_n, s_inv_l,
    o_n, o_c, o_h, o_w,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """d imgs: for every patch (n, l) of the image, its gradient row grad[n, inv[n, l]] or zeros."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] patches (n, l)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = r < rows
    col_ok = cols < width
    n = r // length
    patch = r % length
    k = tl.load(inv_ptr + n * s_inv_n + patch * s_inv_l, mask=row_ok, other=-1)  # [BLOCK_R]
    take = (k >= 0)[:, None] & row_ok[:, None] & col_ok[None, :]
    g = tl.load(grad_ptr + (n * s_g_n + k * s_g_k)[:, None] + cols[None, :] * s_g_e, mask=take, other=0.0)
    dst = out_ptr + patch_offsets(n, patch, cols, grid_w, p, channels, o_n, o_c, o_h, o_w)
    tl.store(dst, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    n, channels, height, width = imgs.shape
    p = patch_size
    grid_w, length = width // p, (height // p) * (width // p)
    keep, cols = ids_keep.shape[1], p * p * channels
    out = torch.empty((n, keep, cols), dtype=imgs.dtype, device=imgs.device)  # [N, K, p*p*C]
    if out.numel() == 0:
        return out
    block_r, block_e = row_blocks(cols, max_cols=1024)
    grid = (triton.cdiv(n * keep, block_r), triton.cdiv(cols, block_e))
    _gather_patches_kernel[grid](
        imgs, ids_keep, out, n * keep, keep, length, cols, grid_w, p, channels,
        *imgs.stride(), ids_keep.stride(0), ids_keep.stride(1),
        BLOCK_R=block_r, BLOCK_E=block_e,
    )
    return out


def _launch_scatter(
    grad: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, channels: int, height: int, width: int
) -> torch.Tensor:
    n, _, cols = grad.shape
    p = patch_size
    grid_w, length = width // p, (height // p) * (width // p)
    out = torch.empty((n, channels, height, width), dtype=grad.dtype, device=grad.device)  # [N, C, H, W]
    if out.numel() == 0:
        return out
    inv = inverse_ids("gather_patches", ids_keep, length)  # [N, L], -1 on patches not kept
    block_r, block_e = row_blocks(cols, max_cols=1024)
    grid = (triton.cdiv(n * length, block_r), triton.cdiv(cols, block_e))
    _scatter_patches_kernel[grid](
        grad, inv, out, n * length, length, cols, grid_w, p, channels,
        *grad.stride(), inv.stride(0), inv.stride(1), *out.stride(),
        BLOCK_R=block_r, BLOCK_E=block_e,
    )
    return out


@torch.library.custom_op("fastmae_triton::gather_patches", mutates_args=())
def gather_patches_op(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    return _launch_gather(imgs, ids_keep, patch_size)


@gather_patches_op.register_fake
def _(imgs, ids_keep, patch_size):
    cols = patch_size * patch_size * imgs.shape[1]
    return imgs.new_empty((imgs.shape[0], ids_keep.shape[1], cols))


@torch.library.custom_op("fastmae_triton::gather_patches_backward", mutates_args=())
def gather_patches_backward_op(
    grad: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, channels: int, height: int, width: int
) -> torch.Tensor:
    """grad [N, K, p*p*C] -> d imgs [N, C, H, W]."""
    return _launch_scatter(grad, ids_keep, patch_size, channels, height, width)


@gather_patches_backward_op.register_fake
def _(grad, ids_keep, patch_size, channels, height, width):
    return grad.new_empty((grad.shape[0], channels, height, width))


def _setup_context(ctx, inputs, output):
    imgs, ids_keep, patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.geometry = (patch_size, imgs.shape[1], imgs.shape[2], imgs.shape[3])


def _backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    return gather_patches_backward_op(grad, ids_keep, *ctx.geometry), None, None


gather_patches_op.register_autograd(_backward, setup_context=_setup_context)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    check_kernel_dtype("gather_patches", imgs=imgs)
    return gather_patches_op(imgs, ids_keep, patch_size)
