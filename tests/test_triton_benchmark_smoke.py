"""The kernel benchmark's CPU smoke mode runs end to end and labels its output as a smoke run."""

import csv

import pytest
import torch
from _triton_helpers import requires_triton

pytestmark = [
    requires_triton,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the benchmark runs full size; run it by hand"),
]


def test_benchmark_smoke_writes_labelled_csv_markdown_and_png(tmp_path):
    from benchmarks.kernels.run import main

    main(["--out", str(tmp_path)])
    stem = next(tmp_path.glob("*.csv")).with_suffix("")
    rows = list(csv.DictReader(open(f"{stem}.csv")))
    assert {r["impl"] for r in rows} == {"torch eager", "triton"}
    ops = {"gather_patches", "insert_mask_tokens", "masked_mse_loss", "add_layer_norm", "bias_gelu", "three_ops"}
    assert {r["op"] for r in rows} >= ops
    assert all(r["error"] == "" and float(r["ms"]) > 0 for r in rows)
    assert all("CPU SMOKE" in r["run_kind"] and r["commit"] and r["torch"] for r in rows)
    assert "not kernel speed" in open(f"{stem}.md").read()
    assert stem.with_suffix(".png").stat().st_size > 10_000


def test_host_overhead_times_every_way_and_puts_the_kernels_back(tmp_path):
    """benchmarks/host_overhead.py on the CPU (launches stubbed for the run): a row per op and way, measured (not
    zero), written as JSON and markdown; afterwards the fused ops run their real kernels again."""
    import json

    import fastmae_kernels as fk
    from benchmarks.host_overhead import main
    from fastmae_kernels import reference

    result = main(["--calls", "20", "--repeats", "2", "--out", str(tmp_path)])
    ways = {(r["op"], r["way"]) for r in result["rows"]}
    assert ways == {(op, way) for op in ("add_layer_norm", "bias_gelu")
                    for way in ("torch ops", "custom op", "eager function", "launchers only (no autograd)",
                                "launchers only, on a second thread")}
    assert all(r["host_us_per_fwd_bwd"] != 0 for r in result["rows"]) and result["sums_only_us"] > 0
    assert "no-op" in result["launches"] and result["launch_ways"] == []  # the launch rows need a GPU
    assert json.loads((tmp_path / "host_overhead.json").read_text())["rows"] == result["rows"]
    assert "| add_layer_norm | eager function |" in (tmp_path / "host_overhead.md").read_text()
    x, bias = torch.randn(5, 24), torch.randn(24)
    torch.testing.assert_close(fk.bias_gelu(x, bias, backend="triton"), reference.bias_gelu(x, bias))


def test_attention_benchmark_smoke_checks_times_and_sums_per_step(tmp_path):
    """benchmarks/attention.py --smoke on the CPU: SDPA and the Triton kernels each checked against fp32 math and
    timed at every shape, the per-step sums weighted by the calls per step, the run labelled a smoke run."""
    import json

    from benchmarks.attention import SMOKE_SHAPES, main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "attention.json").read_text())
    rows = result["rows"]
    # the smoke shapes have few heads: "triton" runs the split backward, and the head backward is timed forced
    impls = ("sdpa", "triton", "triton-head")
    assert {(r["stack"], r["impl"]) for r in rows} == {(s.stack, i) for s in SMOKE_SHAPES for i in impls}
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and 0 < r["max_rel_err"] < 0.07 for r in rows)
    assert {r.get("backward") for r in rows if r["impl"] == "triton"} == {"split"}
    calls = {s.stack: s.calls_per_step for s in SMOKE_SHAPES}
    for impl in impls:
        step = next(s for s in result["per_step"] if s["impl"] == impl)
        want = sum(r["fwd_bwd_ms"] * calls[r["stack"]] for r in rows if r["impl"] == impl)
        assert abs(step["step_attention_ms"] - want) <= 1e-9 * want
    assert result["environment"]["run_kind"].startswith("CPU SMOKE")
    assert "not kernel speed" in (tmp_path / "attention.md").read_text()
