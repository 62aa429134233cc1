"""Smoke test of benchmarks/e2e.py on CPU with the tiny model: it runs, measures, and writes every output."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmae_kernels as fk
from fastmae import profiling

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common, e2e  # noqa: E402

FIELDS = ["img_s", "step_ms", "effective_tflops", "own_tflops", "mfu", "peak_mem_gib", "own_gflop_per_img",
          "ref_gflop_per_img", "final_loss"]


@pytest.mark.slow
def test_e2e_cpu_tiny_writes_measured_results(tmp_path):
    variants = "ref-eager,fast-eager,fast-compiled"  # one compile (~40 s on 2 cores) covers the compiled path
    cmd = [sys.executable, str(REPO / "benchmarks/e2e.py"), "--device", "cpu", "--models", "tiny", "--batch", "4",
           "--steps", "2", "--warmup", "1", "--variants", variants, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("e2e.csv", "e2e.json", "e2e.md", "e2e.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "e2e.json").read_text())
    env = result["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and env["git_commit"] and env["date_utc"]
    assert result["settings"]["matmul_peak_tflops"] > 0
    rows = result["rows"]
    assert [r["variant"] for r in rows] == variants.split(",")
    for row in rows:
        assert row["status"] == "ok", row
        for field in FIELDS:
            assert row[field] > 0, (row["variant"], field, row[field])
        # img/s is what the timing says: batch / median step time
        assert row["img_s"] == pytest.approx(4 / (row["step_ms"] / 1e3), rel=1e-9)
        (steps,) = row["steps_ms"]  # one pass: its timed steps, whose median and quantiles the row reports
        assert len(steps) == 2 and statistics.median(steps) == pytest.approx(row["step_ms"], rel=1e-5)
        assert min(steps) <= row["step_ms_p20"] <= row["step_ms"] <= row["step_ms_p80"] <= max(steps)
    ref, fast = rows[0], rows[1]
    # fastmae embeds only the visible 25% of patches: fewer own FLOPs, same reference FLOPs
    assert fast["own_gflop_per_img"] < ref["own_gflop_per_img"] == ref["ref_gflop_per_img"] == fast["ref_gflop_per_img"]
    assert "AdamW(fused)" == fast["adamw"] and "AdamW(foreach)" == ref["adamw"]
    # the residual add + LayerNorm: torch ops in eager on a CPU (the kernel is for GPUs), Inductor's when compiled
    assert [r["norms"] for r in rows] == ["torch ops", "torch ops", "inductor"]
    assert [r["gelus"] for r in rows] == ["torch ops", "torch ops", "inductor"]  # fc1 bias + GELU, likewise
    assert result["ratios"][0]["eager"] == pytest.approx(fast["img_s"] / ref["img_s"])
    with open(tmp_path / "e2e.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 3 and lines[0]["device"] == env["device"] and lines[2]["git_commit"] == env["git_commit"]
    assert "fastmae / reference" in (tmp_path / "e2e.md").read_text()


def test_rounds_interleave_the_variants_and_report_the_spread(tmp_path):
    """--rounds 3: each variant timed in 3 turns; img/s is batch / the median of the round medians."""
    assert e2e.main(["--device", "cpu", "--models", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                     "--variants", "ref-eager,fast-eager", "--rounds", "3", "--profile", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    # --profile: each variant's kernel (here aten) time per step, split by kind, in the markdown too
    for row in rows:
        assert row["profile"]["device_ms_per_step"] > 0
        assert sum(row["profile"]["shares"].values()) == pytest.approx(1.0)
    assert "Where the step goes" in (tmp_path / "e2e.md").read_text()
    assert (tmp_path / "profiles" / "mae_vit_tiny_patch4_dec64d2b-fast-eager.kernels.json").is_file()
    # every kernel (here aten op) under its full name, per step: together the step's kernel time
    tag = tmp_path / "profiles" / "mae_vit_tiny_patch4_dec64d2b-fast-eager"
    times = json.loads(tag.with_name(tag.name + ".kernel_times.json").read_text())
    assert "aten::mm" in times and all(t["calls"] > 0 and t["us"] > 0 for t in times.values())
    fast_profile = next(r["profile"] for r in rows if r["variant"] == "fast-eager")
    assert sum(t["us"] for t in times.values()) / 1e3 == pytest.approx(fast_profile["device_ms_per_step"], rel=1e-3)
    assert [r["variant"] for r in rows] == ["ref-eager", "fast-eager"]
    for row in rows:
        assert row["status"] == "ok" and row["rounds"] == 3 and len(row["round_ms"]) == 3
        assert all(ms > 0 for ms in row["round_ms"])
        median = statistics.median(row["round_ms"])
        assert row["img_s"] == pytest.approx(4 / (median / 1e3), rel=1e-9)
        assert row["round_spread"] == pytest.approx((max(row["round_ms"]) - min(row["round_ms"])) / median, rel=1e-9)
        # every timed step is kept, one list per round, and each round's median is its entry in round_ms
        assert [len(steps) for steps in row["steps_ms"]] == [2, 2, 2]
        started = row["steps_started_unix_s"]  # wall clock of each round's timing, in order
        assert len(started) == 3 and started == sorted(started) and started[0] > 1.7e9
        assert [statistics.median(s) for s in row["steps_ms"]] == pytest.approx(row["round_ms"], rel=1e-5)
        assert row["own_tflops"] > 0 and row["mfu"] > 0


def test_allocator_events_are_counted_per_timing_pass(monkeypatch):
    """On CUDA each timing pass records what the caching allocator did inside the timed steps (a steady step
    should do nothing: a cudaFree waits for the device); the row sums the passes. Off CUDA: nothing."""
    assert profiling.allocator_events("cpu") is None and profiling.allocator_events_since(None, "cpu") is None
    assert common.time_steps(lambda: None, "cpu", warmup=1, iters=2)["allocator_events"] is None
    counters = iter([{"num_device_alloc": 3, "num_device_free": 1, "num_alloc_retries": 0, "other": 9},
                     {"num_device_alloc": 5, "num_device_free": 1, "num_alloc_retries": 1, "num_sync_all_streams": 2}])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: next(counters))
    before = profiling.allocator_events("cuda")
    assert set(before) == set(profiling.ALLOCATOR_EVENTS) and before["num_sync_all_streams"] == 0  # missing: 0
    row = {}
    e2e.add_allocator_events(row, profiling.allocator_events_since(before, "cuda"))
    e2e.add_allocator_events(row, {k: 1 for k in profiling.ALLOCATOR_EVENTS})
    assert row["allocator_events"] == {"num_device_alloc": 3, "num_device_free": 1, "num_alloc_retries": 2,
                                       "num_sync_all_streams": 3}
    assert row["alloc_events"] == 9
    e2e.add_allocator_events(row, None)  # a CPU pass adds nothing
    assert row["alloc_events"] == 9


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(SystemExit):
        e2e.parse_args(["--models", "gigantic"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--variants", "fast-turbo"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--rounds", "0"])


def test_ratios_pair_the_right_variants():
    rows = [
        {"model": "B", "variant": "ref-eager", "status": "ok", "img_s": 100.0},
        {"model": "B", "variant": "ref-compiled", "status": "ok", "img_s": 150.0},
        {"model": "B", "variant": "fast-eager", "status": "ok", "img_s": 200.0},
        {"model": "B", "variant": "fast-compiled", "status": "ok", "img_s": 300.0},
        {"model": "B", "variant": "fast-cudagraphs", "status": "ok", "img_s": 330.0},
        {"model": "H", "variant": "ref-eager", "status": "oom", "img_s": None},
        {"model": "H", "variant": "fast-eager", "status": "ok", "img_s": 50.0},
    ]
    b, h = e2e.ratios(rows)
    assert (b["eager"], b["compiled"], b["best_vs_ref_compiled"]) == (2.0, 2.0, 2.2)
    assert b["repeat_drift"] is None
    assert h["eager"] is None and h["best_vs_ref_compiled"] is None
    # --repeat-first: the repeat gives the drift and never counts as fastmae's best
    rows.append({"model": "B", "variant": "fast-cudagraphs#2", "status": "ok", "img_s": 363.0})
    b, _ = e2e.ratios(rows)
    assert b["repeat_drift"] == pytest.approx(1.1) and b["best_vs_ref_compiled"] == 2.2


def test_ratio_ranges_come_from_the_measured_step_times():
    """Each ratio carries the range its two variants' step times allow: a single pass's p20-p80, the
    round medians' min-max with --rounds; a range containing 1 is flagged as no measured difference."""
    rows = [  # the committed H100 ViT-H eager pair (2026-11-27): median 0.966x, but wide step times
        {"model": "H", "variant": "fast-eager", "status": "ok", "img_s": 64 / 0.09403,
         "step_ms": 94.03, "step_ms_p20": 85.37, "step_ms_p80": 103.17},
        {"model": "H", "variant": "ref-eager", "status": "ok", "img_s": 64 / 0.09080,
         "step_ms": 90.80, "step_ms_p20": 90.51, "step_ms_p80": 110.21},
        {"model": "B", "variant": "fast-compiled", "status": "ok", "img_s": 256 / 0.050, "step_ms": 50.0,
         "round_ms": [49.0, 50.0, 51.0], "step_ms_p20": None, "step_ms_p80": None},
        {"model": "B", "variant": "ref-compiled", "status": "ok", "img_s": 256 / 0.060, "step_ms": 60.0,
         "round_ms": [60.0, 59.0, 62.0], "step_ms_p20": None, "step_ms_p80": None},
        {"model": "B", "variant": "fast-eager", "status": "ok", "img_s": 256 / 0.07, "step_ms": 70.0},
        {"model": "B", "variant": "ref-eager", "status": "ok", "img_s": 256 / 0.08, "step_ms": 80.0},
    ]
    h, b = e2e.ratios(rows)
    assert h["eager"] == pytest.approx(90.80 / 94.03)
    lo, hi = h["eager_range"]
    assert lo == pytest.approx(90.51 / 103.17) and hi == pytest.approx(110.21 / 85.37)
    assert lo < 1 < hi
    assert b["compiled"] == pytest.approx(1.2) and b["compiled_range"] == pytest.approx([59 / 51, 62 / 49])
    assert b["eager"] == pytest.approx(80 / 70) and b["eager_range"] is None  # no spread recorded: no range
    assert b["best_vs_ref_compiled"] == pytest.approx(1.2) and b["best_vs_ref_compiled_range"][0] > 1
    table = e2e.ratio_table([h, b])
    assert "| H | 0.966 [0.877, 1.291] (no difference) |" in table
    assert "| B | 1.143 | 1.200 [1.157, 1.265] | 1.200 [1.157, 1.265] | - |" in table


@pytest.mark.parametrize("variant, reference, adamw, backend", [
    ("ref-compiled", True, "AdamW(foreach)", None),
    ("ref-compiled-fusedadamw", True, "AdamW(fused)", None),  # the control: only the optimizer differs
    ("fast-compiled", False, "AdamW(fused)", "torch"),  # auto resolves to torch on a CPU
    ("fast-compiled-torchops", False, "AdamW(fused)", "torch"),
])
def test_control_variants_build_what_they_say(variant, reference, adamw, backend):
    import torch

    model, optimizer = e2e.build(e2e.VARIANTS[variant], "mae_vit_tiny_patch4_dec64d2b", None, torch.device("cpu"),
                                 lr=1e-3, backend="auto")
    flavour = next(k for k in ("fused", "foreach") if optimizer.defaults.get(k))
    assert f"{type(optimizer).__name__}({flavour})" == adamw
    assert hasattr(model, "backend") != reference and getattr(model, "backend", None) == backend


@pytest.mark.parametrize("variant, reference, flavour", [
    ("fast-eager-graphed", False, "fused"),
    ("fast-eager-fusedblocks-graphed", False, "fused"),
    ("ref-eager-graphed", True, "foreach"),  # the reference keeps its AdamW, made capturable
    ("fast-compiled-graphed", False, "fused"),
])
def test_graphed_variants_build_a_capturable_adamw_and_need_cuda(variant, reference, flavour):
    """The CUDA-graph variants' optimizers hold their lr as tensors (a float would be frozen into the graph);
    on a CPU their step is refused with the reason, which e2e writes into the row's status."""
    import torch

    spec = e2e.VARIANTS[variant]
    if spec.norm_backend == "triton" and "triton" not in fk.available_backends("cpu"):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
    model, optimizer = e2e.build(spec, "mae_vit_tiny_patch4_dec64d2b", None, torch.device("cpu"), lr=1e-3,
                                 backend="auto")
    assert hasattr(model, "backend") != reference and optimizer.defaults.get(flavour)
    assert all(g["capturable"] and isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups)
    assert [float(g["lr"]) for g in optimizer.param_groups] == pytest.approx([1e-3] * len(optimizer.param_groups))
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="CUDA device"):
        e2e.make_step(model, optimizer, imgs, 0.75, graphed=True, **spec.forward_kwargs())


@pytest.mark.parametrize("variant, norms, gelus", [
    ("fast-eager", "torch ops", "torch ops"),  # auto: torch's ops
    ("fast-eager-fusednorm", "add_layer_norm (triton)", "torch ops"),
    ("fast-eager-fusedgelu", "torch ops", "bias_gelu (triton)"),
    ("fast-eager-fusedblocks", "add_layer_norm (triton)", "bias_gelu (triton)"),
    ("fast-compiled-fusednorm", "add_layer_norm (triton)", "inductor"),
    ("fast-compiled-fusedgelu", "inductor", "bias_gelu (triton)"),
])
def test_fusion_controls_say_how_their_norms_and_gelus_run(variant, norms, gelus):
    import torch

    if fk.resolve_backend("auto", "cpu") != "torch" or "triton" not in fk.available_backends("cpu"):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
    spec = e2e.VARIANTS[variant]
    model, _ = e2e.build(spec, "mae_vit_tiny_patch4_dec64d2b", None, torch.device("cpu"), lr=1e-3, backend="auto")
    assert e2e.fused_path(spec, model, torch.device("cpu"), "add_layer_norm") == norms
    assert e2e.fused_path(spec, model, torch.device("cpu"), "bias_gelu") == gelus


def test_sdpa_variant_runs_each_forward_under_the_forced_backend(monkeypatch):
    import torch
    import torch.nn.attention as attention

    entered = []
    real = attention.sdpa_kernel

    def spy(backends, *args, **kwargs):
        entered.append(backends)
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_kernel", spy)
    spec = e2e.Variant(reference=False, sdpa="flash")  # fast-compiled-flash without the compile (CPU test)
    assert e2e.VARIANTS["fast-compiled-flash"] == e2e.Variant(reference=False, mode="default", sdpa="flash")
    model, optimizer = e2e.build(spec, "mae_vit_tiny_patch4_dec64d2b", None, torch.device("cpu"), lr=1e-3,
                                 backend="auto")
    assert isinstance(model, e2e.SdpaBackend) and model.backend == "torch"
    step = e2e.make_step(model, optimizer, torch.randn(2, 3, 32, 32), 0.75)
    assert torch.isfinite(step()) and torch.isfinite(step())
    assert entered == [attention.SDPBackend.FLASH_ATTENTION] * 2  # inside the module: every forward
    plain, optimizer = e2e.build(e2e.Variant(reference=False), "mae_vit_tiny_patch4_dec64d2b", None,
                                 torch.device("cpu"), lr=1e-3, backend="auto")
    e2e.make_step(plain, optimizer, torch.randn(2, 3, 32, 32), 0.75)()  # default: torch picks, no context
    assert len(entered) == 2


def test_count_flops_counts_cpu_attention():
    """FlopCounterMode alone counts 0 for CPU SDPA; common.count_flops adds the CUDA kernels' formula."""
    import torch

    q = torch.randn(2, 3, 16, 8, requires_grad=True)
    attention = torch.nn.functional.scaled_dot_product_attention
    total, per_op, _ = common.count_flops(lambda: attention(q, q, q).sum().backward())
    forward = 4 * 2 * 3 * 16 * 16 * 8  # QK^T and PV: 2 matmuls of 2*B*H*N*N*hd
    assert total == forward + 2.5 * forward  # backward: 5 matmuls
    assert set(per_op) == {"aten._scaled_dot_product_flash_attention_for_cpu",
                           "aten._scaled_dot_product_flash_attention_for_cpu_backward"}


def test_count_only_mode(tmp_path):
    """FLOPs and saved activations, no timing: fastmae does less of both (visible-only patch embedding; the
    masked-only decoder tail on top, in the trainer's forward)."""
    argv = ["--device", "cpu", "--models", "tiny", "--batch", "2", "--count-only", "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    ref, fast, full = json.loads((tmp_path / "counts.json").read_text())["rows"]
    assert (ref["side"], fast["side"], full["side"]) == ("reference", "fastmae", "fastmae, full prediction")
    assert 0 < fast["total_gflop_per_img"] < full["total_gflop_per_img"] < ref["total_gflop_per_img"]
    assert fast["encoder_blocks_gflop_per_img"] == ref["encoder_blocks_gflop_per_img"] > 0  # same blocks, same math
    assert full["decoder_blocks_gflop_per_img"] == ref["decoder_blocks_gflop_per_img"] > 0
    assert 0 < fast["decoder_blocks_gflop_per_img"] < full["decoder_blocks_gflop_per_img"]
    assert 0 < fast["saved_act_mib_per_img"] < full["saved_act_mib_per_img"] < ref["saved_act_mib_per_img"]
    assert ref["saved_fixed_mib"] > 0  # autocast's bf16 weight copies


def test_h100_breakdown_recomputes_from_the_committed_profiles():
    """The corrected ViT-B breakdown of the 2026-11-27 H100 run (benchmarks/NOTES.md §6.1) comes from the
    committed profiler files; the script asserts its kinds add up to torch's kernel total."""
    script = REPO / "benchmarks/results/h100-20261127/recompute_breakdown.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"ref-eager", "ref-compiled", "fast-eager", "fast-compiled", "fast-cudagraphs"}
    assert "| 59.51 | 57.92 | 97% | 7.82 | 22.62 |" in rows["ref-compiled"]


def test_h100_kernel_rates_recompute_from_the_committed_profiles_and_codegen():
    """NOTES §6.9's rates (the 2026-11-27 profile's kernel times over the torch 2.11 codegen's bytes) are what the
    committed files give: the script's --check compares its output with the committed bandwidth.txt."""
    script = REPO / "benchmarks/results/h100-20261127/recompute_bandwidth.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (script.parent / "bandwidth.txt").read_text()
    assert "| layernorm | 20.22 | 7.33 | 0.00 | 2759 | 92% |" in text and "| together | 50.28 | 18.78 |" in text


def test_gpu_check_names_only_known_models_and_variants():
    """A typo in the prepared GPU script would cost a stage of scarce device time: every --models and
    --variants list it passes to e2e.py must name entries e2e.py knows."""
    import re
    import shlex

    text = (REPO / "benchmarks/gpu_check.sh").read_text().replace("\\\n", " ")
    lists = {"--models": e2e.MODELS, "--variants": e2e.VARIANTS}
    seen = {flag: 0 for flag in lists}
    for line in text.splitlines():
        if "E2E[@]" not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(re.sub(r'"\$[^"]*"', "X", line))
        for flag, table in lists.items():
            if flag in words:
                names = words[words.index(flag) + 1].split(",")
                assert set(names) <= set(table), f"{flag}: unknown {set(names) - set(table)}"
                seen[flag] += 1
    assert seen["--models"] >= 2 and seen["--variants"] >= 2, seen  # the parse found the e2e stages
