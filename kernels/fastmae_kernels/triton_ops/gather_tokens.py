"""gather_tokens: x [N, L, D], ids_keep [N, K] (+ pos_embed [1, L, D]) -> [N, K, D] in one pass.

kernel: _rows._select_rows_kernel -> launcher: _rows.select_rows -> autograd: register_autograd below,
all behind the custom op `fastmae_triton::gather_tokens` so torch.compile traces it as one node.
"""

import torch

from fastmae_kernels.triton_ops._common import check_kernel_dtype, inverse_ids
from fastmae_kernels.triton_ops._rows import select_rows


def _out_dtype(x: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.dtype:
    return x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)


@torch.library.custom_op("fastmae_triton::gather_tokens", mutates_args=())
def gather_tokens_op(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    return select_rows(x, ids_keep, _out_dtype(x, pos_embed), pos=pos_embed, pos_at_src=True)  # [N, K, D]


@gather_tokens_op.register_fake
def _(x, ids_keep, pos_embed):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]), dtype=_out_dtype(x, pos_embed))


@torch.library.custom_op("fastmae_triton::gather_tokens_backward", mutates_args=())
def gather_tokens_backward_op(
    grad: torch.Tensor, ids_keep: torch.Tensor, length: int, dtype: torch.dtype
) -> torch.Tensor:
    """grad [N, K, D] -> [N, L, D] in `dtype`: each kept row's gradient, zeros on the others."""
    inv = inverse_ids("gather_tokens", ids_keep, length)  # [N, L], -1 where not kept
    return select_rows(grad, inv, dtype)


@gather_tokens_backward_op.register_fake
def _(grad, ids_keep, length, dtype):
    return grad.new_empty((grad.shape[0], length, grad.shape[2]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, ids_keep, pos_embed = inputs
    ctx.save_for_backward(ids_keep)
    ctx.length = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    grad_x = grad_pos = None
    if ctx.needs_input_grad[0]:
        grad_x = gather_tokens_backward_op(grad, ids_keep, ctx.length, ctx.x_dtype)  # [N, L, D]
    if ctx.needs_input_grad[2]:
        # Positions are shared by the batch: scatter per sample, then one deterministic sum over N
        # (the reference's expand-backward). A rare path (MAE's tables are frozen), so left unfused.
        per_sample = gather_tokens_backward_op(grad, ids_keep, ctx.length, ctx.pos_dtype)  # [N, L, D]
        grad_pos = per_sample.sum(dim=0, keepdim=True)  # [1, L, D]
    return grad_x, None, grad_pos


gather_tokens_op.register_autograd(_backward, setup_context=_setup_context)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    check_kernel_dtype("gather_tokens", x=x, pos_embed=pos_embed)
    return gather_tokens_op(x, ids_keep, pos_embed)
