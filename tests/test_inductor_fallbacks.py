"""benchmarks/inductor_fallbacks.py reads Inductor's generated wrappers: its own kernels, library calls and the
aten ops it left unlowered. Checked on a CPU compile whose graph has one of each."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import inductor_fallbacks  # noqa: E402

PROGRAM = textwrap.dedent("""
    import torch

    def f(a, b):
        h = torch.relu(a @ b) * 2.0           # a library GEMM and a generated kernel
        return torch.sort(h, dim=1).values    # sort: Inductor calls aten's on the CPU

    torch.compile(f)(torch.randn(8, 16), torch.randn(16, 32))
""")


@pytest.mark.slow
def test_scan_counts_kernels_library_calls_and_fallbacks(tmp_path):
    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, timeout=300, capture_output=True)
    (graph,) = inductor_fallbacks.scan(cache)
    assert sum(graph["kernels"].values()) >= 1 and all(k.startswith("cpp_") for k in graph["kernels"])
    assert graph["library"] == {"extern_kernels.mm": 1}
    assert graph["fallbacks"] == {"aten.sort.stable": 1} or graph["fallbacks"] == {"aten.sort.default": 1}
    text = inductor_fallbacks.report([graph])
    assert text.startswith("1 compiled graphs: ") and "extern_kernels.mm" in text and "aten.sort" in text


def test_files_that_are_not_wrappers_are_skipped(tmp_path):
    (tmp_path / "kernel.py").write_text("import triton\n@triton.jit\ndef triton_poi_0(x): pass\n")
    (tmp_path / "wrapper.py").write_text(textwrap.dedent("""
        class Runner:
            def call(self, args):
                # Topologically Sorted Source Nodes: [s], Original ATen: [aten.sum]
                triton_poi_fused_add_0.run(buf0, stream=stream0)
                buf1 = torch.ops.inductor._alloc_from_pool(pool0, 0, torch.float32, (4,), (1,))
                aten.sum.dim_IntList(buf0, [0], out=buf1)
                extern_kernels.mm(buf0, buf2, out=buf3)
                buf4 = torch.ops.fastmae_cuda.masked_mse_loss.default(buf3, buf1)
                return (buf1,)

        def get_args():
            return aten.empty(4)
    """))
    (graph,) = inductor_fallbacks.scan(tmp_path)
    assert graph["kernels"] == {"triton_poi_fused_add_0": 1}
    assert graph["library"] == {"extern_kernels.mm": 1}
    assert graph["fallbacks"] == {"aten.sum.dim_IntList": 1}  # get_args' aten.empty is not in call()
    assert graph["custom"] == {"fastmae_cuda.masked_mse_loss.default": 1}  # not counted as an aten fallback
    assert "1 aten fallbacks, 1 custom op calls" in inductor_fallbacks.report([graph])
    assert graph["sources"]["aten.sum.dim_IntList"].startswith("after kernel triton_poi_fused_add_0; ")


def test_kernel_sources_embedded_in_the_wrapper_are_not_its_call(tmp_path):
    """With config.benchmark_kernel each kernel's source (a string in the wrapper) carries its own
    `def call(args)`; the scan reads the wrapper's own call()."""
    quotes = "'" * 3
    (tmp_path / "wrapper.py").write_text(textwrap.dedent(f"""
        triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', {quotes}
        @triton_heuristics.pointwise(
            inductor_meta={{'grid_type': 'Grid1D', 'kernel_name': 'triton_poi_fused_add_0', 'kernel_num_gb': 0.0015}},
        )
        @triton.jit
        def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
            pass

        def call(args):
            triton_poi_fused_add_0.run(*args, stream=0)
            aten.sum.default(args[0])
        {quotes}, device_str='cuda')

        def call(args):
            triton_poi_fused_add_0.run(buf0, buf1, 1024, stream=stream0)
            triton_poi_fused_add_0.run(buf1, buf2, 1024, stream=stream0)
            extern_kernels.mm(buf2, buf3, out=buf4)
            return (buf4,)
    """))
    (graph,) = inductor_fallbacks.scan(tmp_path)
    assert graph["kernels"] == {"triton_poi_fused_add_0": 2} and graph["library"] == {"extern_kernels.mm": 1}
    assert not graph["fallbacks"]  # the aten.sum sits in the kernel's source string, not in the wrapper's call


def test_a_mix_order_reductions_last_stage_counts_as_a_fallback(tmp_path):
    """torch 2.11 finishes a LayerNorm backward's weight/bias gradients (partial sums per row block, written by the
    fused Triton kernel into a workspace) with a tensor method in the wrapper: one eager reduction each."""
    (tmp_path / "wrapper.py").write_text(textwrap.dedent("""
        class Runner:
            def call(self, args):
                # Call mix order reduction kernel
                # Topologically Sorted Source Nodes: [sum_16, sum_17], Original ATen: [aten.native_layer_norm_backward]
                workspace_2 = empty_strided_cuda((1613824, ), (1, ), torch.float32)
                triton_per_fused_native_layer_norm_backward_21.run(buf49, workspace_2, 50432, 512, stream=stream0)
                buf57 = workspace_2[0 * 1576 * 512 : (0 + 1) * 1576 * 512].view(1576, 512).sum(dim=0)
                buf59 = workspace_2[1 * 1576 * 512 : (1 + 1) * 1576 * 512].view(1576, 512).sum(dim=0).to(torch.bfloat16)
                buf60 = reinterpret_tensor(buf57, (512, ), (1, ), 0)
                return (buf57, buf59)
    """))
    (graph,) = inductor_fallbacks.scan(tmp_path)
    assert graph["kernels"] == {"triton_per_fused_native_layer_norm_backward_21": 1}
    assert graph["fallbacks"] == {"Tensor.sum": 2}
    assert "after kernel triton_per_fused_native_layer_norm_backward_21" in graph["sources"]["Tensor.sum"]
