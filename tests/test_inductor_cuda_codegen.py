"""benchmarks/inductor_cuda_codegen.py: Inductor's CUDA code for a training step, generated on this CPU-only
machine through benchmarks/fakecuda. Checked on the tiny model: both compiled graphs come out as CUDA code
(Triton kernels for sm_90, cuBLAS and cuDNN calls), with fastmae's kernels as opaque custom ops."""

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import fakecuda, inductor_fallbacks  # noqa: E402


def test_unavailable_reason_names_a_cpu_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "not a CUDA build" in fakecuda.unavailable_reason()


def test_install_refuses_a_process_without_the_preload(monkeypatch):
    monkeypatch.delenv(fakecuda.MARK, raising=False)
    with pytest.raises(RuntimeError, match="run_under_fake_cuda"):
        fakecuda.install()


def test_triton_gemms_puts_inductor_back_as_it_was():
    """The max-autotune settings hold for one variant's trace only: a default-mode variant traced after it in the
    same process must get cuBLAS GEMMs and the real autotuner back."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.coordinate_descent_tuner import CoordescTuner
    from torch._inductor.select_algorithm import AlgorithmSelectorCache

    from benchmarks.inductor_cuda_codegen import gemm_mode, triton_gemms

    before = (inductor_config.max_autotune, inductor_config.max_autotune_gemm_backends,
              inductor_config.benchmark_epilogue_fusion, AlgorithmSelectorCache.do_autotuning,
              CoordescTuner.__dict__["autotune_single_field"])
    with triton_gemms():
        assert inductor_config.max_autotune and inductor_config.max_autotune_gemm_backends == "TRITON"
        assert not inductor_config.benchmark_epilogue_fusion
        choices = ["first", "second"]
        timings = AlgorithmSelectorCache.do_autotuning(None, "mm", [], None, None, None, choices, None)
        assert min(timings, key=timings.get) == "first"
        assert CoordescTuner.autotune_single_field(lambda size: 1.0, 64, 8) == 64
    after = (inductor_config.max_autotune, inductor_config.max_autotune_gemm_backends,
             inductor_config.benchmark_epilogue_fusion, AlgorithmSelectorCache.do_autotuning,
             CoordescTuner.__dict__["autotune_single_field"])
    assert after == before
    assert gemm_mode("fast-compiled", "library") == "library"
    assert gemm_mode("fast-compiled", "triton") == "triton"
    assert gemm_mode("fast-compiled-autotune", "library") == "triton"  # nothing can be timed here


def _fast_backend() -> str:
    from fastmae_kernels import dispatch

    return "cuda" if not isinstance(dispatch._load("cuda"), Exception) else "triton"


@pytest.mark.slow
def test_every_compiled_e2e_variant_compiles_to_cuda_code(tmp_path):
    """Every compiled variant e2e (and so gpu_check.sh) runs on the GPU traces as one graph on the CUDA paths,
    and its code is CUDA code."""
    from benchmarks.inductor_cuda_codegen import COMPILED

    reason = fakecuda.unavailable_reason()
    if reason:
        pytest.skip(f"no fake CUDA here: {reason}")
    backend = _fast_backend()
    out = tmp_path / "codegen"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inductor_cuda_codegen", "--model", "tiny",
                           "--variants", "all", "--backend", backend, "--out", str(out),
                           "--build-dir", str(tmp_path / "libs")],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    meta = json.loads((out / "meta.json").read_text())
    assert meta["torch"] == torch.__version__ and meta["backend"] == backend
    assert list(meta["variants"]) == COMPILED
    for variant in COMPILED:
        wrappers = sorted(p.name for p in (out / variant).glob("*.py"))
        assert wrappers == ["00-forward.py", "01-backward.py"], variant
        code = (out / variant / "01-backward.py").read_text()
        assert "@triton.jit" in code and "device_str='cuda'" in code and "cc=90" in code  # sm_90 Triton
        assert "empty_strided_cuda(" in code and "empty_strided_cpu(" not in code

    graphs = {v: inductor_fallbacks.scan(out / v) for v in COMPILED}
    # kernels.json: every generated kernel call of each wrapper, with Inductor's bytes for it and its category
    for variant in COMPILED:
        tables = json.loads((out / variant / "kernels.json").read_text())
        for graph in graphs[variant]:
            table = tables[graph["file"]]
            assert {name: row["calls"] for name, row in table.items()} == dict(graph["kernels"]), variant
            assert all(row["bytes"] > 0 for row in table.values()), variant
    ref_categories = {row["category"] for t in json.loads((out / "ref-compiled/kernels.json").read_text()).values()
                      for row in t.values()}
    assert {"layernorm", "gelu", "reduction"} <= ref_categories

    def total(variant: str, kind: str) -> Counter:
        return sum((g[kind] for g in graphs[variant]), Counter())

    # the reference: each Linear layer is one addmm forward (the bias in cuBLAS's epilogue) and two mm backward
    # (input and weight gradients; its patch embedding is a convolution)
    from fastmae.models import create_model

    model = create_model("mae_vit_tiny_patch4_dec64d2b", reference=True)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    ref = total("ref-compiled", "library")
    assert ref["extern_kernels.addmm"] == n_linear and ref["extern_kernels.mm"] == 2 * n_linear
    assert any("cudnn_attention" in name for name in ref)  # SDPA picks cuDNN on sm_90 in these versions
    # no aten.sum op (the mix-order LayerNorm backwards of larger models finish with Tensor.sum: NOTES §6.10)
    assert not any(name.startswith("aten.sum") for name in total("ref-compiled", "fallbacks"))
    # fastmae: its MAE ops are opaque custom ops on the chosen backend, torch ops when the variant says so
    assert {f"fastmae_{backend}.masked_mse_loss.default",
            f"fastmae_{backend}.insert_mask_tokens_backward.default"} <= set(total("fast-compiled", "custom"))
    assert not total("fast-compiled-torchops", "custom")
    # the forced-flash variant calls flash attention where the others call cuDNN's
    assert any("flash" in name for name in total("fast-compiled-flash", "library"))
    # the fused-norm control puts the Triton add + LayerNorm into the compiled graph
    assert any("add_layer_norm" in name for name in total("fast-compiled-fusednorm", "custom"))
    assert any("bias_gelu" in name for name in total("fast-compiled-fusedgelu", "custom"))

    # max-autotune, generated as if Inductor's Triton GEMM templates won: no cuBLAS call is left, and fastmae's MLP
    # (tokens as one [T, C] matrix) has its GELU and GELU gradient in the templates' epilogues, no kernel of their
    # own. The reference's MLP on [B, N, C] keeps both as separate kernels under the same settings (a second run
    # into the same folder, which keeps the first run's variants in meta.json).
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inductor_cuda_codegen", "--model", "tiny",
                           "--variants", "ref-compiled", "--gemm", "triton", "--backend", backend, "--out", str(out),
                           "--build-dir", str(tmp_path / "libs")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert list(meta["variants"]) == COMPILED + ["ref-compiled.triton-gemm"]
    assert meta["variants"]["fast-compiled-autotune"]["gemm"] == "triton"
    assert meta["variants"]["fast-compiled"]["gemm"] == "library"

    def category_calls(folder: str) -> Counter:
        tables = json.loads((out / folder / "kernels.json").read_text())
        return sum((Counter({row["category"]: row["calls"]}) for t in tables.values() for row in t.values()),
                   Counter())

    autotuned = total("fast-compiled-autotune", "library")
    assert not any(name.startswith(("extern_kernels.mm", "extern_kernels.addmm")) for name in autotuned), autotuned
    fast, fast_autotuned = category_calls("fast-compiled"), category_calls("fast-compiled-autotune")
    ref_triton = category_calls("ref-compiled.triton-gemm")
    assert fast["gelu"] > 0 and fast["matmul"] == 0  # the default mode: Inductor's GELU kernels, cuBLAS GEMMs
    assert fast_autotuned["gelu"] == 0 and fast_autotuned["matmul"] >= 3 * n_linear
    assert ref_triton["gelu"] > 0 and ref_triton["matmul"] > 0


@pytest.mark.slow
def test_bf16_pure_moves_fewer_bytes_than_autocast(tmp_path):
    """--precision bf16-pure (the trainer's DeepSpeed bf16 mode: bf16 weights, no autocast): the same step with a
    bf16 residual stream, so Inductor's kernels move fewer bytes than under autocast over fp32 weights."""
    reason = fakecuda.unavailable_reason()
    if reason:
        pytest.skip(f"no fake CUDA here: {reason}")
    totals = {}
    for precision in ("bf16", "bf16-pure"):
        out = tmp_path / precision
        proc = subprocess.run([sys.executable, "-m", "benchmarks.inductor_cuda_codegen", "--model", "tiny",
                               "--variants", "fast-compiled", "--backend", _fast_backend(), "--precision", precision,
                               "--out", str(out), "--build-dir", str(tmp_path / "libs")],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        meta = json.loads((out / "meta.json").read_text())
        folder = "fast-compiled" if precision == "bf16" else "fast-compiled.bf16-pure"
        assert list(meta["variants"]) == [folder] and meta["variants"][folder]["precision"] == precision
        tables = json.loads((out / folder / "kernels.json").read_text())
        totals[precision] = sum(row["bytes"] for t in tables.values() for row in t.values())
    assert 0 < totals["bf16-pure"] < totals["bf16"]


PROBE = r"""
#include <stdio.h>
#include <cuda_runtime_api.h>
#ifdef cudaGetDeviceProperties
#undef cudaGetDeviceProperties
#endif
int main(void) {
  struct cudaDeviceProp p;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || cudaGetDeviceProperties(&p, 0) != cudaSuccess) return 1;
  printf("%d|%s|%d|%d|%d|%zu|%d|%zu|%d\n", n, p.name, p.major, p.minor, p.multiProcessorCount, p.totalGlobalMem,
         p.l2CacheSize, p.sharedMemPerBlockOptin, p.memoryBusWidth);
  return 0;
}
"""


def test_the_c_runtime_shim_reports_the_card_python_reports(tmp_path):
    """One card for both halves: what torch's C++ reads from the shim is fakecuda.CARD, as torch.cuda's is."""
    reason = fakecuda.unavailable_reason()
    if reason:
        pytest.skip(f"no fake CUDA here: {reason}")
    lib_dir = fakecuda.build(tmp_path / "libs")
    (tmp_path / "probe.c").write_text(PROBE)
    subprocess.run(["gcc", f"-I{fakecuda.header_dirs()[0]}", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c"),
                    f"-L{lib_dir}", "-l:libfakecudart.so", f"-Wl,-rpath,{lib_dir}"], check=True)
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout.strip()
    card = fakecuda.CARD
    assert out.split("|") == [str(v) for v in (1, card["name"], card["major"], card["minor"],
                                               card["multi_processor_count"], card["total_memory"],
                                               card["L2_cache_size"], card["shared_memory_per_block_optin"],
                                               card["memory_bus_width"])]
    assert vars(fakecuda.device_properties()).items() >= card.items()


def test_compare_with_profile_matches_names_cut_names_and_counts(tmp_path):
    """`--against`: a profile's Inductor kernels (3 steps; a long name cut with '...' can stand for two kernels,
    each printed twice: CPU launch and GPU run) against the calls in generated wrappers."""
    from benchmarks.inductor_cuda_codegen import compare_with_profile, profile_counts

    (tmp_path / "gen").mkdir()
    # the scanner counts call sites, so write each call out as often as it runs
    body = ("triton_poi_fused_gelu_backward_9.run(b, stream=s)\n" * 8
            + "triton_per_fused_native_layer_norm_backward_view_12.run(b, stream=s)\n" * 15
            + "triton_per_fused_native_layer_norm_backward_view_34.run(b, stream=s)\n" * 22
            + "triton_poi_fused_view_5.run(b, stream=s)\n")
    (tmp_path / "gen" / "01-backward.py").write_text(
        "class Runner:\n    def call(self, args):\n" + textwrap.indent(body, " " * 8) + "        return ()\n")
    top = tmp_path / "x.top.txt"
    row = "{:<55}  0.00%  0.000us  0.00%  0.000us  0.000us  1.0ms  1.0%  1.0ms  1.0us  {}\n"
    top.write_text("".join(row.format(name, calls) for name, calls in [
        ("aten::mm", 492), ("triton_poi_fused_gelu_backward_9", 24), ("triton_poi_fused_gelu_backward_9", 24),
        ("triton_per_fused_native_layer_norm_backward_view...", 45),
        ("triton_per_fused_native_layer_norm_backward_view...", 45),
        ("triton_per_fused_native_layer_norm_backward_view...", 66),
        ("triton_per_fused_native_layer_norm_backward_view...", 66),
        ("triton_poi_fused_view_5", 6), ("triton_poi_fused_view_5", 6)]))

    assert profile_counts(top) == {"triton_poi_fused_gelu_backward_9": [24],
                                   "triton_per_fused_native_layer_norm_backward_view...": [45, 66],
                                   "triton_poi_fused_view_5": [6]}
    rows = {r["kernel"]: r for r in compare_with_profile(tmp_path / "gen", top, steps=3)}
    assert rows["triton_poi_fused_gelu_backward_9"]["same"]
    cut = rows["triton_per_fused_native_layer_norm_backward_view..."]
    assert cut["same"] and cut["profile_per_step"] == [15.0, 22.0] and cut["generated_per_step"] == [15, 22]
    assert not rows["triton_poi_fused_view_5"]["same"]  # 2 per step profiled, 1 generated
