"""Every Triton kernel variant compiles for an H100 (sm_90) here, with no GPU: the CPU tests run the
interpreter, which does not type-check like the compiler, so this is the CI guard for the GPU build."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _triton_helpers import requires_triton

pytestmark = requires_triton
SCRIPT = Path(__file__).with_name("triton_aot_compile.py")
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may take on sm_90 (opt-in)


def test_all_kernel_variants_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "90"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90 ok")]
    # 32 for the MAE and block ops; 61 for attention: 3 head dims (32, 64, 128) x every autotuner candidate (3 each
    # for the forward, dK/dV, dQ and the one-program-per-head backward) in bf16, fp32 and fp16 at the first
    # candidate, and the delta kernel
    assert len(lines) == 32 + 61, result.stdout
    attention = [line for line in lines if " attention" in line and " bf16 " in line]
    assert len(attention) == 3 * 12 + 1 and all("0 bytes spilled" in line for line in attention), attention
    # shared memory is checked only at launch (Triton's OutOfResources): every variant within an H100's 227 KiB
    shared = [int(re.search(r"(\d+) bytes shared", line).group(1)) for line in lines]
    assert len(shared) == len(lines) and max(shared) <= SM90_SHARED_BYTES, result.stdout


@pytest.fixture(scope="module")
def widths() -> str:
    """`triton_aot_compile.py widths 90`'s output: the kernels specialised as at run time, compiled once for the
    three tests that read it."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "widths", "90"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_row_select_moves_16_bytes_per_access_at_vit_shapes(widths):
    """Read off the PTX, no GPU: gather_tokens' kernel, specialised as at run time for ViT-B, loads and stores
    16 bytes per thread access (ld/st.global.v4.b32), as a memory-bound copy should."""
    line = next(line for line in widths.splitlines() if line.startswith("sm_90 widths"))
    assert "ld.global.v4.b32" in line and "st.global.v4.b32" in line, line


def test_bias_gelu_moves_16_bytes_per_access_at_vit_shapes(widths):
    """bias_gelu forward and backward at ViT-B's MLP width in bf16 load and store the [rows, F] tensors 16 bytes
    per thread access (the bias row and the backward's partial-sum row are the narrow accesses)."""
    lines = [line for line in widths.splitlines() if line.startswith("sm_90 widths bias_gelu")]
    assert len(lines) == 2, widths
    for line in lines:
        assert "ld.global.v4.b32" in line and "st.global.v4.b32" in line, line


def test_attention_loops_are_pipelined_with_16_byte_loads_as_launched(widths):
    """The attention kernels specialised as at run time for ViT-B's decoder (bf16, each at its first tile): each
    loop's loads are software-pipelined (cp.async), the bf16 rows are read 16 bytes per access, nothing spills."""
    lines = [line for line in widths.splitlines() if line.startswith("sm_90 as launched attention")]
    assert len(lines) == 4, widths
    for line in lines:
        copies = int(line.split(" cp.async")[0].rsplit(", ", 1)[1])
        assert copies > 0 and "0 bytes spilled" in line and "ld.global.v4.b32" in line, line
