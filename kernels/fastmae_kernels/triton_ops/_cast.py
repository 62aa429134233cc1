"""fp32 -> storage dtype rounding that is identical in compiled kernels and in the Triton interpreter."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 `x` rounded to DTYPE, to nearest even like torch's .to(). For bf16 the rounding is done on
    the bits, because the interpreter truncates fp32 -> bf16 (a few integer ops, free in a memory-bound
    kernel; the compiled cvt.rn.bf16 gives the same bits)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
