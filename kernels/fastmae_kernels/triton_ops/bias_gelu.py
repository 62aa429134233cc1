"""bias_gelu: y = GELU(x + bias) (exact erf GELU) from a Linear's output without its bias, one pass each way.

The ViT MLP's fc1 -> GELU in eager torch is addmm (the bias added in cuBLAS's epilogue), then gelu; backward
is gelu_backward, then the Linear's bias gradient as a separate column sum that reads gelu_backward's output
again (plus, under autocast, a cast of that bf16 sum to the fp32 bias). Here fc1 runs as a plain GEMM and this
op adds the bias and applies GELU in one pass; its backward reads dy and x once, writes dx and, in the same
pass, per-program partial column sums of dx that one torch `sum` over programs finishes (fixed order:
deterministic, no atomics) into the fp32 bias gradient. The forward moves the same bytes as torch's; the
backward saves one read of the [rows, F] gradient and two launches per MLP.

Arithmetic in fp32 whatever the storage dtype: x + bias is not rounded before GELU (torch rounds the addmm
output to bf16 under autocast), and the bias gradient is summed and returned in fp32 (torch returns its sum
rounded to bf16 under autocast, then casts it to the fp32 bias).

kernels -> launchers -> two custom ops (`fastmae_triton::bias_gelu` and its backward) -> autograd; in eager mode an
autograd.Function calls the same launchers without the custom ops' dispatch (`_EagerBiasGelu`).
"""

import torch
import triton
import triton.language as tl

from fastmae_kernels.triton_ops._cast import round_to
from fastmae_kernels.triton_ops._common import INTERPRETED, check_kernel_dtype, skip_custom_op

SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2); constexpr: a jitted kernel reads no other globals
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _bias_gelu_forward_kernel(x_ptr, bias_ptr, y_ptr, rows, features, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    col_ok = cols < features
    ok = (r < rows)[:, None] & col_ok[None, :]
    at = r[:, None] * features + cols[None, :]  # [BLOCK_R, BLOCK_F]
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    t = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
    y = 0.5 * t * (1.0 + tl.erf(t * SQRT1_2))
    tl.store(y_ptr + at, round_to(y, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_backward_kernel(
    dy_ptr, x_ptr, bias_ptr, dx_ptr, db_ptr, rows, features, tiles_per_program,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Program (pid, c) walks `tiles_per_program` consecutive row tiles of column block c, writes their dx and
    one row of bias-gradient partial sums: db_ptr[pid, c * BLOCK_F : (c + 1) * BLOCK_F]."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    col_ok = cols < features
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        r = (pid.to(tl.int64) * tiles_per_program + i) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        ok = (r < rows)[:, None] & col_ok[None, :]
        at = r[:, None] * features + cols[None, :]
        t = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(t * SQRT1_2))
        pdf = INV_SQRT_2PI * tl.exp(-0.5 * t * t)
        dx = tl.where(ok, dy * (cdf + t * pdf), 0.0)  # masked lanes add nothing to the bias partials
        tl.store(dx_ptr + at, round_to(dx, dx_ptr.dtype.element_ty), mask=ok)
        db += dx
    tl.store(db_ptr + pid * features + cols, tl.sum(db, axis=0), mask=col_ok)


def _tiles(rows: int, features: int, elements: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_F): up to 256 columns (a bias slice per program) and about `elements` per tile
    (x4 in the interpreter, which pays per program and per op, not per element). Compiled for sm_90
    (tests/triton_aot_compile.py) with 8 warps: forward 16 x 256 uses 80 registers, backward 8 x 256 48 (at
    16 x 256 the backward used 174: one block of 8 warps per SM), both with 16-byte loads and stores."""
    block_f = min(triton.next_power_of_2(max(features, 1)), 256)
    block_r = max(1, (4 * elements if INTERPRETED else elements) // block_f)
    return min(block_r, triton.next_power_of_2(max(rows, 1))), block_f


FORWARD_ELEMENTS, BACKWARD_ELEMENTS, WARPS = 4096, 2048, 8


def _backward_programs(row_tiles: int, column_blocks: int, device: torch.device) -> int:
    """Row programs per column block: about 4 per SM in all (each keeps a partial bias row), few enough that
    the final sum over them stays small next to the [rows, F] passes."""
    if device.type == "cuda":
        budget = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(row_tiles, budget // column_blocks))
    return min(row_tiles, 4)  # the interpreter: a handful of programs


def _flat(t: torch.Tensor, features: int) -> torch.Tensor:
    return t.contiguous().view(-1, features)


def _forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [*, F], bias [F] -> GELU(x + bias) [*, F] in x's dtype."""
    features = x.shape[-1]
    x2 = _flat(x, features)  # [rows, F]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and features:
        block_r, block_f = _tiles(rows, features, FORWARD_ELEMENTS)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(features, block_f))
        _bias_gelu_forward_kernel[grid](x2, bias.contiguous(), y, rows, features, BLOCK_R=block_r, BLOCK_F=block_f,
                              num_warps=WARPS)
    return y


bias_gelu_op = torch.library.custom_op("fastmae_triton::bias_gelu", _forward, mutates_args=())


@bias_gelu_op.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_launch(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [*, F] in x's dtype, d bias [F] fp32)."""
    features = x.shape[-1]
    x2 = _flat(x, features)
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0 or features == 0:
        return dx, torch.zeros(features, dtype=torch.float32, device=x.device)
    block_r, block_f = _tiles(rows, features, BACKWARD_ELEMENTS)
    column_blocks = triton.cdiv(features, block_f)
    row_tiles = triton.cdiv(rows, block_r)
    programs = _backward_programs(row_tiles, column_blocks, x.device)
    partial = torch.empty((programs, features), dtype=torch.float32, device=x.device)  # bias partials per program
    _bias_gelu_backward_kernel[(programs, column_blocks)](
        _flat(dy, features), x2, bias.contiguous(), dx, partial, rows, features, triton.cdiv(row_tiles, programs),
        BLOCK_R=block_r, BLOCK_F=block_f, num_warps=WARPS,
    )
    return dx, partial.sum(dim=0)  # [F]: one fixed-order reduction over the programs


bias_gelu_backward_op = torch.library.custom_op("fastmae_triton::bias_gelu_backward", _backward_launch, mutates_args=())


@bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    return _gradients(ctx, dy, bias_gelu_backward_op)


def _gradients(ctx, dy, backward_launch):
    x, bias = ctx.saved_tensors
    dx, db = backward_launch(dy, x, bias)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (db.to(bias.dtype) if need[1] else None)


bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBiasGelu(torch.autograd.Function):
    """The custom ops' forward and backward, called directly: eager mode skips the custom op's dispatch and
    autograd wrapper (host time; see add_layer_norm's `_EagerAddLayerNorm`); torch.compile traces the custom op."""

    @staticmethod
    def forward(ctx, x, bias):
        y = _forward(x, bias)
        _setup_context(ctx, (x, bias), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _gradients(ctx, dy, _backward_launch)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    check_kernel_dtype("bias_gelu", x=x, bias=bias)
    if skip_custom_op():
        return _EagerBiasGelu.apply(x, bias)
    return bias_gelu_op(x, bias)
