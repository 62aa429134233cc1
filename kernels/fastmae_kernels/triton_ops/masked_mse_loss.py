"""masked_mse_loss: the official norm-pix forward_loss, with the target patchified on the fly.

Forward: per patch row, read the image patch and the prediction (masked rows only: visible rows are
never read), normalise the target (mean, UNBIASED var as torch.var), and sum the rows' masked MSE per
tile; a one-program kernel sums the tiles in a fixed order (deterministic) and divides by sum(mask).
Backward: the same kernel recomputes the target and writes d(pred) = g * m / sum(m) * 2 (pred - t) / P,
zeros on visible rows (recomputing reads 2 inputs again but avoids storing an fp32 [N, L, P] target).
Two launches forward, one backward, no host sync (the scale is read from device memory).
All arithmetic is fp32 whatever the input dtypes.
"""

import torch
import triton
import triton.language as tl

from fastmae_kernels.triton_ops._cast import round_to
from fastmae_kernels.triton_ops._common import INTERPRETED, check_kernel_dtype
from fastmae_kernels.triton_ops.gather_patches import patch_offsets


@triton.jit
def _mse_rows_kernel(
    pred_ptr, img_ptr, mask_ptr, out_ptr, mask_sum_ptr, grad_ptr,
    rows, length, width, grid_w, p, channels, eps, num_programs,
    s_p_n, s_p_l, s_p_e, s_n, s_c, s_h, s_w, s_m_n, s_m_l,
    NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Forward: out[0, pid] = sum of this tile's masked row losses, out[1, pid] = sum of its mask.
    Backward: out = d pred [N, L, P], scaled by d loss (grad_ptr) / sum(mask) (mask_sum_ptr)."""
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] patches (n, l)
    cols = tl.arange(0, BLOCK_E)  # the whole patch in one tile: two-pass variance in registers
    row_ok = r < rows
    col_ok = cols < width
    n = r // length
    patch = r % length
    m = tl.load(mask_ptr + n * s_m_n + patch * s_m_l, mask=row_ok, other=0).to(tl.float32)  # [BLOCK_R]
    active = (row_ok & (m != 0))[:, None] & col_ok[None, :]  # visible rows are not read at all
    img = img_ptr + patch_offsets(n, patch, cols, grid_w, p, channels, s_n, s_c, s_h, s_w)
    t = tl.load(img, mask=active, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_E]
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / width  # [BLOCK_R]
        centred = tl.where(active, t - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (width - 1)  # unbiased, as torch.var
        t = centred / tl.sqrt(var + eps)[:, None]
    pred = pred_ptr + (n * s_p_n + patch * s_p_l)[:, None] + cols[None, :] * s_p_e
    diff = tl.where(active, tl.load(pred, mask=active, other=0.0).to(tl.float32) - t, 0.0)
    if BACKWARD:
        scale = tl.load(grad_ptr).to(tl.float32) * 2.0 / (tl.load(mask_sum_ptr) * width)
        d = diff * (m * scale)[:, None]
        out = out_ptr + r[:, None] * width + cols[None, :]
        tl.store(out, round_to(d, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        loss = tl.sum(diff * diff, axis=1) / width * m  # [BLOCK_R] masked mean per patch
        tl.store(out_ptr + pid, tl.sum(loss, axis=0))
        tl.store(out_ptr + num_programs + pid, tl.sum(m, axis=0))


@triton.jit
def _mse_finish_kernel(partial_ptr, loss_ptr, mask_sum_ptr, num_programs, BLOCK: tl.constexpr):
    """One program sums the per-tile partials in a fixed order: loss and sum(mask). Deterministic."""
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    weight = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_programs, BLOCK):
        i = start + tl.arange(0, BLOCK)
        loss += tl.load(partial_ptr + i, mask=i < num_programs, other=0.0)
        weight += tl.load(partial_ptr + num_programs + i, mask=i < num_programs, other=0.0)
    total = tl.sum(weight, axis=0)
    tl.store(loss_ptr, tl.sum(loss, axis=0) / total)
    tl.store(mask_sum_ptr, total)


def _tiles(pred: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_E, programs): a whole patch per tile row, ~4096 elements per tile."""
    block_e = triton.next_power_of_2(pred.shape[2])
    block_r = max(1, (16384 if INTERPRETED else 4096) // block_e)
    return block_r, block_e, triton.cdiv(pred.shape[0] * pred.shape[1], block_r)


def _launch(pred, imgs, mask, patch_size, norm_pix, eps, out, mask_sum=None, grad=None):
    """Forward when `grad` is None (out: [2, programs] partials), else backward (out: d pred)."""
    n, channels, height, width = imgs.shape
    block_r, block_e, programs = _tiles(pred)
    _mse_rows_kernel[(programs,)](
        pred, imgs, mask, out, out if mask_sum is None else mask_sum, out if grad is None else grad,
        n * pred.shape[1], pred.shape[1], pred.shape[2], width // patch_size, patch_size, channels, float(eps),
        programs, *pred.stride(), *imgs.stride(), *mask.stride(),
        NORM_PIX=norm_pix, BACKWARD=grad is not None, BLOCK_R=block_r, BLOCK_E=block_e,
        num_warps=4 if block_e <= 1024 else 8,
    )


@torch.library.custom_op("fastmae_triton::masked_mse_loss", mutates_args=())
def masked_mse_loss_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss [] fp32, sum(mask) [] fp32, kept for the backward): two launches, no host sync."""
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    mask_sum = torch.empty((), dtype=torch.float32, device=pred.device)
    if pred.numel() == 0:
        return loss.fill_(float("nan")), mask_sum.zero_()  # the reference's 0 / 0
    programs = _tiles(pred)[2]
    partial = torch.empty((2, programs), dtype=torch.float32, device=pred.device)  # [loss, mask] per tile
    _launch(pred, imgs, mask, patch_size, norm_pix, eps, partial)
    _mse_finish_kernel[(1,)](partial, loss, mask_sum, programs, BLOCK=1024)
    return loss, mask_sum


@masked_mse_loss_op.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, eps):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmae_triton::masked_mse_loss_backward", mutates_args=())
def masked_mse_loss_backward_op(
    grad: torch.Tensor, mask_sum: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
    patch_size: int, norm_pix: bool, eps: float,
) -> torch.Tensor:
    """grad [] -> d pred [N, L, P] in pred's dtype (one launch)."""
    d_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if d_pred.numel():
        _launch(pred, imgs, mask, patch_size, norm_pix, eps, d_pred, mask_sum, grad)
    return d_pred


@masked_mse_loss_backward_op.register_fake
def _(grad, mask_sum, pred, imgs, mask, patch_size, norm_pix, eps):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix, eps = inputs
    ctx.save_for_backward(pred, imgs, mask, output[1])
    ctx.args = (patch_size, norm_pix, eps)


def _backward(ctx, grad, _grad_mask_sum):
    pred, imgs, mask, mask_sum = ctx.saved_tensors
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "fastmae_kernels.masked_mse_loss (triton): not differentiable w.r.t. imgs or mask "
            "(the official MAE never needs it); detach them or use backend='torch'"
        )
    d_pred = masked_mse_loss_backward_op(grad, mask_sum, pred, imgs, mask, *ctx.args)
    return d_pred, None, None, None, None, None


masked_mse_loss_op.register_autograd(_backward, setup_context=_setup_context)


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    check_kernel_dtype("masked_mse_loss", pred=pred, imgs=imgs)
    loss, _ = masked_mse_loss_op(pred, imgs, mask, patch_size, bool(norm_pix), float(eps))
    return loss
