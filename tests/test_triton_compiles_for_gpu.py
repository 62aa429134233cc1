"""Every Triton kernel variant compiles for an H100 (sm_90) here, with no GPU: the CPU tests run the
interpreter, which does not type-check like the compiler, so this is the CI guard for the GPU build."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _triton_helpers import requires_triton

pytestmark = requires_triton
SCRIPT = Path(__file__).with_name("triton_aot_compile.py")


def test_all_kernel_variants_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "90"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90 ok")]
    assert len(lines) == 32, result.stdout


def test_row_select_moves_16_bytes_per_access_at_vit_shapes():
    """Read off the PTX, no GPU: gather_tokens' kernel, specialised as at run time for ViT-B, loads and stores
    16 bytes per thread access (ld/st.global.v4.b32), as a memory-bound copy should."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "widths", "90"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("sm_90 widths"))
    assert "ld.global.v4.b32" in line and "st.global.v4.b32" in line, line


def test_bias_gelu_moves_16_bytes_per_access_at_vit_shapes():
    """bias_gelu forward and backward at ViT-B's MLP width in bf16 load and store the [rows, F] tensors 16 bytes
    per thread access (the bias row and the backward's partial-sum row are the narrow accesses)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "widths", "90"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90 widths bias_gelu")]
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert "ld.global.v4.b32" in line and "st.global.v4.b32" in line, line
