"""The profile's kernel categories place fastmae_kernels' own kernels with the work they do, so a GPU profile's
LayerNorm and GELU shares still count them after the fusions (a Triton kernel shows under its function's name)."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

from fastmae.profiling import category

ROOT = Path(__file__).resolve().parents[1]


def _triton_kernel_names() -> list[str]:
    triton_ops = pytest.importorskip("fastmae_kernels.triton_ops")
    names = set()
    for info in pkgutil.iter_modules(triton_ops.__path__):
        module = importlib.import_module(f"fastmae_kernels.triton_ops.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                names.add(name)
    return sorted(names)


def _cuda_kernel_names() -> list[str]:
    """csrc's __global__ kernels, the row-functor templates as the profiler names them (with their functor, e.g.
    `for_each_kernel<fastmae::SelectRows<float>>`), and every device functor a generic kernel runs."""
    source = "\n".join(path.read_text() for path in sorted((ROOT / "csrc").glob("*.cu*")))
    declared = r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\("  # name after launch bounds
    kernels = set(re.findall(declared, source))
    # structs with a call operator (in the text up to the next struct)
    functors = {m.group(1) for m in re.finditer(r"struct (\w+)\s*{(.*?)(?=\nstruct |\Z)", source, re.S)
                if "operator()" in m.group(2)}
    generic = [k for k in kernels if k in ("for_each_kernel",)]
    return sorted(kernels - set(generic)) + [f"{g}<fastmae::{f}<float>>" for g in generic for f in sorted(functors)]


def test_every_fastmae_kernel_has_a_category():
    triton_names, cuda_names = _triton_kernel_names(), _cuda_kernel_names()
    assert len(triton_names) >= 10 and len(cuda_names) >= 10, (triton_names, cuda_names)
    uncategorised = [n for n in triton_names + cuda_names if category(n) == "other"]
    assert not uncategorised, uncategorised


@pytest.mark.parametrize("name, kind", [
    ("_add_layer_norm_forward_kernel", "layernorm"),
    ("_add_layer_norm_backward_kernel", "layernorm"),
    ("_bias_gelu_forward_kernel", "gelu"),
    ("_bias_gelu_backward_kernel", "gelu"),
    ("_select_rows_kernel", "masking/gather/copy"),
    ("_mse_rows_kernel", "reduction"),
    ("void at::native::vectorized_layer_norm_kernel<float, float>(int, float, float const*)", "layernorm"),
    ("triton_per_fused_native_layer_norm_0", "layernorm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl", "gelu"),
    # max-autotune's Triton GEMM templates are GEMMs, whatever epilogue or prologue they fused
    ("triton_tem_fused__to_copy_addmm_gelu_t_view_15", "matmul"),
    ("triton_tem_fused_gelu_gelu_backward_mm_view_42", "matmul"),
    ("triton_tem_fused_mm_47", "matmul"),
])
def test_fused_kernels_count_with_the_work_they_replace(name, kind):
    assert name in _triton_kernel_names() or not name.startswith("_")
    assert category(name) == kind


def _profiled_events(step, steps: int = 2):
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up (compiles)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.events()


def _linear_step(model):
    import torch

    x = torch.randn(16, 8)

    def step():
        model(x).square().mean().backward()

    return step


def test_op_callers_name_the_eager_backward_that_called_a_sum():
    import torch

    from fastmae.profiling import format_callers, op_callers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    chains = op_callers(_profiled_events(_linear_step(model)))
    # eager: each Linear's bias gradient is an aten::sum under its AddmmBackward node (2 per step, 2 steps)
    bias_sums = sum(n for chain, n in chains["aten::sum"].items() if "AddmmBackward0" in chain)
    assert bias_sums == 4, chains["aten::sum"]
    text = format_callers(chains, steps=2)
    assert any(line.startswith("aten::sum: ") for line in text.splitlines()) and "AddmmBackward0" in text


@pytest.mark.slow
def test_op_callers_find_no_eager_bias_sum_in_a_compiled_step():
    import torch

    from fastmae.profiling import op_callers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    model.compile()
    chains = op_callers(_profiled_events(_linear_step(model)))
    # Inductor writes the bias sums into its own kernels: no aten::sum under an eager AddmmBackward0
    assert not any("AddmmBackward0" in chain for chain in chains.get("aten::sum", {})), chains
