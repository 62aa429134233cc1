"""add_layer_norm: h = x + branch, y = LayerNorm(h) stored in the dtype the next Linear reads, one pass each way.

In a pre-norm ViT block every LayerNorm but the first follows a residual add, and under bf16 autocast eager
torch runs add (fp32 out), layer_norm (fp32 out, autocast's fp32 policy) and the next Linear's cast to bf16
as three kernels; backward another three or four (the cast's grad, layer_norm's backward, autograd's sum of
the residual gradients, the branch gradient's cast). Here: forward reads x and the branch once and writes h
and y (plus a mean and 1/std per row); backward reads dy, the residual gradient and h once and writes the
gradients of x and of the branch in their own dtypes, with the weight and bias gradients as per-program
partial sums that one torch `sum` over programs finishes (fixed order: deterministic, no atomics).

kernels -> launchers -> two custom ops (`fastmae_triton::add_layer_norm` and its backward) -> autograd; in eager
mode an autograd.Function calls the same launchers without the custom ops' dispatch (host time, see
`_EagerAddLayerNorm`).
The LayerNorm is computed in fp32 whatever the storage dtypes; h is rounded to its dtype before it is
normalised, as the reference normalises the stored sum.
"""

import torch
import triton
import triton.language as tl

from fastmae_kernels.triton_ops._cast import round_to
from fastmae_kernels.triton_ops._common import INTERPRETED, check_kernel_dtype, skip_custom_op

MAX_DIM = 16384  # one row per tile row: a [BLOCK_R, next_pow2(D)] fp32 tile must fit in registers


@triton.jit
def _add_layer_norm_forward_kernel(
    x_ptr, branch_ptr, weight_ptr, bias_ptr, h_ptr, y_ptr, mean_ptr, rstd_ptr,
    rows, dim, eps,
    HAS_BRANCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows
    cols = tl.arange(0, BLOCK_D)  # the whole row in one tile: two-pass variance in registers
    row_ok = r < rows
    col_ok = cols < dim
    ok = row_ok[:, None] & col_ok[None, :]
    at = r[:, None] * dim + cols[None, :]  # [BLOCK_R, BLOCK_D]
    h = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        h += tl.load(branch_ptr + at, mask=ok, other=0.0).to(tl.float32)
        h_stored = round_to(h, h_ptr.dtype.element_ty)
        tl.store(h_ptr + at, h_stored, mask=ok)
        h = h_stored.to(tl.float32)  # normalise the sum as stored, as the reference does
    mean = tl.sum(h, axis=1) / dim  # [BLOCK_R]
    centred = tl.where(ok, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)  # biased variance, as LayerNorm
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(y_ptr + at, round_to(y, y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + r, mean, mask=row_ok)
    tl.store(rstd_ptr + r, rstd, mask=row_ok)


@triton.jit
def _add_layer_norm_backward_kernel(
    dy_ptr, dh_ptr, h_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dbranch_ptr, dw_ptr, db_ptr,
    rows, dim, tiles_per_program,
    HAS_DH: tl.constexpr, HAS_BRANCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Each program walks `tiles_per_program` consecutive row tiles, writes their dx (and d branch, the same
    values in the branch's dtype) and one row of weight/bias partial sums: dw_ptr[pid, :], db_ptr[pid, :]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for t in range(0, tiles_per_program):
        r = (pid.to(tl.int64) * tiles_per_program + t) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_ok = r < rows
        ok = row_ok[:, None] & col_ok[None, :]
        at = r[:, None] * dim + cols[None, :]
        mean = tl.load(mean_ptr + r, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=row_ok, other=0.0)
        h = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        x_hat = tl.where(ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        g = dy * weight[None, :]  # d x_hat
        c1 = tl.sum(g * x_hat, axis=1) / dim
        c2 = tl.sum(g, axis=1) / dim
        dx = (g - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:  # the residual stream's own gradient: h also feeds the next residual add
            dx += tl.load(dh_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, round_to(dx, dx_ptr.dtype.element_ty), mask=ok)
        if HAS_BRANCH:
            tl.store(dbranch_ptr + at, round_to(dx, dbranch_ptr.dtype.element_ty), mask=ok)
        dw += dy * x_hat
        db += dy
    tl.store(dw_ptr + pid * dim + cols, tl.sum(dw, axis=0), mask=col_ok)
    tl.store(db_ptr + pid * dim + cols, tl.sum(db, axis=0), mask=col_ok)


def _tiles(rows: int, dim: int, elements: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, row tiles): whole rows, about `elements` per tile (16384 in the interpreter, which
    pays per program and per op, not per element). Compiled for sm_90 (tests/triton_aot_compile.py): forward
    4096 elements with 4 warps (8 from 2048 columns) and backward 2048 with 8 warps use <= 128 registers and
    spill nothing; the backward at 4096 with 4 warps used 255 registers and spilled."""
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, (16384 if INTERPRETED else elements) // block_d)
    block_r = min(block_r, triton.next_power_of_2(max(rows, 1)))
    return block_r, block_d, triton.cdiv(rows, block_r)


FORWARD_ELEMENTS, BACKWARD_ELEMENTS, BACKWARD_WARPS = 4096, 2048, 8


def _forward_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


def _backward_programs(tiles: int, device: torch.device) -> int:
    """Programs for the backward: enough to fill the card (each keeps a partial weight/bias row), few enough
    that the final sum over them stays small next to the [rows, D] passes."""
    if device.type == "cuda":
        return min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(tiles, 4)  # the interpreter: a handful of programs


def _flat(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.contiguous().view(-1, dim)


def _forward(
    x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (h [*, D] (empty without a branch: h is x), y [*, D] in out_dtype, mean [rows] fp32, rstd [rows] fp32)."""
    dim = x.shape[-1]
    x2 = _flat(x, dim)  # [rows, D]
    rows = x2.shape[0]
    h_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    h = torch.empty((0,) if branch is None else x.shape, dtype=h_dtype, device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block_r, block_d, tiles = _tiles(rows, dim, FORWARD_ELEMENTS)
        _add_layer_norm_forward_kernel[(tiles,)](
            x2, x2 if branch is None else _flat(branch, dim), weight.contiguous(), bias.contiguous(),
            x2 if branch is None else h, y, mean, rstd, rows, dim, float(eps),
            HAS_BRANCH=branch is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_forward_warps(block_d),
        )
    return h, y, mean, rstd


add_layer_norm_op = torch.library.custom_op("fastmae_triton::add_layer_norm", _forward, mutates_args=())


@add_layer_norm_op.register_fake
def _(x, branch, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    h_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    h = x.new_empty((0,) if branch is None else x.shape, dtype=h_dtype)
    y = x.new_empty(x.shape, dtype=out_dtype)
    return h, y, x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _backward_launch(
    dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, x_dtype: torch.dtype, branch_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [*, D] in x_dtype, d branch in branch_dtype (empty without a branch), [dw, db] [2, D] fp32)."""
    dim = h.shape[-1]
    rows = mean.shape[0]
    dx = torch.empty(h.shape, dtype=x_dtype, device=h.device)
    has_branch = branch_dtype is not None
    dbranch = torch.empty(h.shape if has_branch else (0,), dtype=branch_dtype or x_dtype, device=h.device)
    if rows == 0:
        return dx, dbranch, torch.zeros((2, dim), dtype=torch.float32, device=h.device)
    block_r, block_d, tiles = _tiles(rows, dim, BACKWARD_ELEMENTS)
    programs = _backward_programs(tiles, h.device)
    partial = torch.empty((2, programs, dim), dtype=torch.float32, device=h.device)  # [dw, db] per program
    dy2 = _flat(dy, dim)
    _add_layer_norm_backward_kernel[(programs,)](
        dy2, dy2 if dh is None else _flat(dh, dim), _flat(h, dim), weight.contiguous(), mean, rstd, dx,
        dbranch if has_branch else dx, partial[0], partial[1], rows, dim, triton.cdiv(tiles, programs),
        HAS_DH=dh is not None, HAS_BRANCH=has_branch, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=BACKWARD_WARPS,
    )
    return dx, dbranch, partial.sum(dim=1)  # [2, D]: one fixed-order reduction over the programs


add_layer_norm_backward_op = torch.library.custom_op(
    "fastmae_triton::add_layer_norm_backward", _backward_launch, mutates_args=()
)


@add_layer_norm_backward_op.register_fake
def _(dy, dh, h, weight, mean, rstd, x_dtype, branch_dtype):
    dim = h.shape[-1]
    dbranch = h.new_empty(h.shape if branch_dtype is not None else (0,), dtype=branch_dtype or x_dtype)
    return h.new_empty(h.shape, dtype=x_dtype), dbranch, h.new_empty((2, dim), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, branch, weight, bias, eps, out_dtype = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(x if branch is None else h, weight, mean, rstd)
    ctx.dtypes = (x.dtype, None if branch is None else branch.dtype, weight.dtype, bias.dtype)
    ctx.set_materialize_grads(False)  # an unused h (the stack's final norm) sends no zeros to read


def _backward(ctx, dh, dy, _dmean, _drstd):
    return _gradients(ctx, dh, dy, add_layer_norm_backward_op)


def _gradients(ctx, dh, dy, backward_launch):
    h, weight, mean, rstd = ctx.saved_tensors
    x_dtype, branch_dtype, w_dtype, b_dtype = ctx.dtypes
    if branch_dtype is None:  # no branch: h is x itself and the op's h output an unused empty placeholder
        dh = None
    if dy is None:  # y unused: the gradient is the residual's alone
        dx = None if dh is None else dh.to(x_dtype)
        dbranch = None if dh is None else dh.to(branch_dtype)
        return dx, dbranch, None, None, None, None
    dx, dbranch, dwdb = backward_launch(dy, dh, h, weight, mean, rstd, x_dtype, branch_dtype)
    dw, db = dwdb  # [D] each
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dbranch if need[1] else None,
        dw.to(w_dtype) if need[2] else None,
        db.to(b_dtype) if need[3] else None,
        None,
        None,
    )


add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAddLayerNorm(torch.autograd.Function):
    """The custom ops' forward, backward and saved tensors, called directly. In eager mode the custom op's
    dispatch and autograd wrapper cost more host time than the kernels take on short steps (eager ViT-H/14 at
    batch 64 on an H200 ran at 38% GPU busy, 2026-12-04); torch.compile still traces the custom op."""

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, out_dtype):
        h, y, mean, rstd = _forward(x, branch, weight, bias, eps, out_dtype)
        _setup_context(ctx, (x, branch, weight, bias, eps, out_dtype), (h, y, mean, rstd))
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        return _gradients(ctx, dh, dy, _backward_launch)


def add_layer_norm(
    x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_kernel_dtype("add_layer_norm", x=x, branch=branch, weight=weight, bias=bias)
    if x.shape[-1] > MAX_DIM:
        raise ValueError(
            f"fastmae_kernels.add_layer_norm (triton): rows up to {MAX_DIM} wide, got {x.shape[-1]}; "
            "use backend='torch'"
        )
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fastmae_kernels.add_layer_norm (triton): out_dtype must be fp32/bf16/fp16, got {out_dtype}")
    if skip_custom_op():
        h, y = _EagerAddLayerNorm.apply(x, branch, weight, bias, float(eps), out_dtype)
    else:
        h, y, _, _ = add_layer_norm_op(x, branch, weight, bias, float(eps), out_dtype)
    return (x if branch is None else h), y
