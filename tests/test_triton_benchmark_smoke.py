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
