"""masked_mse_loss: the official norm-pix forward_loss, with the target patchified on the fly.

Forward: per patch row, read the image patch and the prediction (masked rows only: visible rows are
never read), normalise the target (mean, UNBIASED var as torch.var), and write the row's masked MSE;
the [N*L] row losses are summed by torch (deterministic) and divided by mask.sum().
Backward: the same kernel recomputes the target and writes d(pred) = g * m / sum(m) * 2 (pred - t) / P,
zeros on visible rows (recomputing reads 2 inputs again but avoids storing an fp32 [N, L, P] target).
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
    pred_ptr, img_ptr, mask_ptr, out_ptr, scale_ptr,
    rows, length, width, grid_w, p, channels, eps,
    s_p_n, s_p_l, s_p_e, s_n, s_c, s_h, s_w, s_m_n, s_m_l,
    NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] patches (n, l)
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
        scale = tl.load(scale_ptr)  # d loss * 2 / (P * sum(mask)): a device scalar, no host sync
        d = diff * (m * scale)[:, None]
        out = out_ptr + r[:, None] * width + cols[None, :]
        tl.store(out, round_to(d, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        loss = tl.sum(diff * diff, axis=1) / width * m  # [BLOCK_R] masked mean per patch
        tl.store(out_ptr + r, loss, mask=row_ok)


def _launch(pred, imgs, mask, patch_size, norm_pix, eps, out, scale):
    n, channels, height, width = imgs.shape
    length, cols = pred.shape[1], pred.shape[2]
    rows = n * length
    block_e = triton.next_power_of_2(cols)
    block_r = max(1, (16384 if INTERPRETED else 4096) // block_e)
    _mse_rows_kernel[(triton.cdiv(rows, block_r),)](
        pred, imgs, mask, out, scale if scale is not None else out,
        rows, length, cols, width // patch_size, patch_size, channels, float(eps),
        *pred.stride(), *imgs.stride(), *mask.stride(),
        NORM_PIX=norm_pix, BACKWARD=scale is not None, BLOCK_R=block_r, BLOCK_E=block_e,
        num_warps=4 if block_e <= 1024 else 8,
    )


@torch.library.custom_op("fastmae_triton::masked_mse_loss", mutates_args=())
def masked_mse_loss_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float
) -> torch.Tensor:
    row_loss = torch.empty(mask.shape, dtype=torch.float32, device=pred.device)  # [N, L]
    if row_loss.numel():
        _launch(pred, imgs, mask, patch_size, norm_pix, eps, row_loss, None)
    return row_loss.sum() / mask.sum(dtype=torch.float32)


@masked_mse_loss_op.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, eps):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmae_triton::masked_mse_loss_backward", mutates_args=())
def masked_mse_loss_backward_op(
    grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
    patch_size: int, norm_pix: bool, eps: float,
) -> torch.Tensor:
    """grad [] fp32 -> d pred [N, L, P] in pred's dtype."""
    d_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if d_pred.numel():
        scale = (grad.float() * 2.0 / (pred.shape[2] * mask.sum(dtype=torch.float32))).reshape(1)
        _launch(pred, imgs, mask, patch_size, norm_pix, eps, d_pred, scale)
    return d_pred


@masked_mse_loss_backward_op.register_fake
def _(grad, pred, imgs, mask, patch_size, norm_pix, eps):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix, eps = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.args = (patch_size, norm_pix, eps)


def _backward(ctx, grad):
    pred, imgs, mask = ctx.saved_tensors
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "fastmae_kernels.masked_mse_loss (triton): not differentiable w.r.t. imgs or mask "
            "(the official MAE never needs it); detach them or use backend='torch'"
        )
    return masked_mse_loss_backward_op(grad, pred, imgs, mask, *ctx.args), None, None, None, None, None


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
    return masked_mse_loss_op(pred, imgs, mask, patch_size, bool(norm_pix), float(eps))
