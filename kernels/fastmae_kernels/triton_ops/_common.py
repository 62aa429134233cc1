"""Helpers shared by the Triton ops: availability, dtype rules, block sizes, inverse index maps."""

import os

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode
from triton import knobs

from fastmae_kernels import checks
from fastmae_kernels.dispatch import device_smoke_test

# Kernels are defined (interpreted or compiled) when their module is imported: Triton reads
# TRITON_INTERPRET at @triton.jit time, so setting it later has no effect on these kernels.
INTERPRETED = bool(knobs.runtime.interpret)
_compiles: dict[int, str | None] = {}  # CUDA device index -> None when a kernel compiled and ran correctly there


@triton.jit
def _toolchain_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=ok) + 1.0, mask=ok)


def _run_toolchain_kernel(device: torch.device) -> bool:
    src = torch.arange(5, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    _toolchain_copy_kernel[(1,)](src, dst, 5, BLOCK=8)
    return torch.equal(dst.cpu(), src.cpu() + 1)


def compile_check(device: torch.device) -> str | None:
    """Compiles and runs one tiny kernel on the CUDA `device`, once per device: None if it worked, else one line.

    Importing Triton proves little: its first launch builds a C launcher (a C compiler must be installed) and
    runs ptxas for the card, so a runtime image without a compiler fails there, at the first training step.
    Triton's build failures come as many exception types (RuntimeError, CalledProcessError, ...): all count."""
    return device_smoke_test(
        _compiles, device, _run_toolchain_kernel, wrong="a smoke-test Triton kernel gave wrong values on this device",
        failed="Triton cannot compile or run a kernel on this device ({error})", errors=(Exception,),
    )


def unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of `device`, else one line saying why not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return compile_check(device)
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before import"
        if not INTERPRETED:
            return "TRITON_INTERPRET=1 was set after fastmae_kernels.triton_ops was imported (kernels are compiled)"
        return None
    return f"Triton kernels run on CUDA (or CPU with TRITON_INTERPRET=1), not on {device.type}"


def skip_custom_op() -> bool:
    """True in plain eager mode, where the fused block ops call their launchers through an autograd.Function:
    the custom op's dispatch and autograd wrapper cost host time that short eager steps cannot hide (ViT-H/14
    at batch 64 on an H200 kept the GPU 38% busy, 2026-12-04). torch.compile must trace the custom op, and a
    TorchDispatchMode (fake tensors; fastmae.profiling.WrittenBytes, which counts ops and bytes) must see it."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def check_kernel_dtype(op: str, **tensors: torch.Tensor | None) -> None:
    checks.check_kernel_dtypes("triton", op, **tensors)


def row_blocks(width: int, max_cols: int = 256, elements: int = 4096) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a [rows, width] copy: up to `max_cols` columns per tile and about
    `elements` per tile (16 KiB of fp32, enough in flight per program for a memory-bound copy)."""
    block_c = min(triton.next_power_of_2(max(width, 1)), max_cols)
    if INTERPRETED:  # the interpreter pays per program, not per element: fewer, larger tiles
        elements *= 4
    return max(1, elements // block_c), block_c


def check_ids_unique(op: str, ok: torch.Tensor, what: str) -> None:
    """Raises unless the 0-d bool `ok` holds: at once on CPU, as an async device assert on GPU (no host sync)."""
    message = f"fastmae_kernels.{op} (triton backward): {what}"
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    elif not torch.compiler.is_compiling():
        torch._assert_async(ok, message)


def inverse_ids(op: str, ids: torch.Tensor, length: int) -> torch.Tensor:
    """ids [N, K] of distinct positions in [0, length) -> inv [N, length] int64: inv[n, ids[n, k]] = k, else -1.

    Backward passes use it to write every gradient row exactly once (a gather, no atomics, deterministic)."""
    n, keep = ids.shape
    inv = torch.full((n, length), -1, dtype=torch.int64, device=ids.device)
    inv.scatter_(1, ids, torch.arange(keep, device=ids.device).expand(n, keep))
    # A repeated id in a row leaves that row with fewer than K hits, so the total falls short of N * K.
    covered = (inv >= 0).sum() == n * keep
    check_ids_unique(op, covered, "ids must be distinct within each row (as random_masking gives)")
    return inv
