"""Speed-up ranges in the benchmarks' reports: a ratio of two timings is only known to within the ratio at the
two timings' opposite ends (p20-p80), and one whose range contains 1 is no measured difference."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.kernels import report  # noqa: E402


def test_speedup_range_takes_the_opposite_ends():
    # candidate 10-12 ms against a baseline of 15-16 ms: at worst 15/12, at best 16/10
    assert common.speedup_range((10.0, 12.0), (15.0, 16.0)) == pytest.approx([1.25, 1.6])
    assert common.speedup_range(None, (15.0, 16.0)) is None and common.speedup_range((1.0, 2.0), None) is None


def test_format_speedup_flags_a_range_that_contains_one():
    assert common.format_speedup(1.2, [1.1, 1.3]) == "1.200 [1.100, 1.300]"
    assert common.format_speedup(1.02, [0.97, 1.08], 2) == "1.02 [0.97, 1.08] (no difference)"
    assert common.format_speedup(0.9, None) == "0.900" and common.format_speedup(None, [1.0, 1.0]) is None
    assert common.format_speedup(float("nan"), None) is None
    assert common.format_speedup(0.98, [0.97, 1.03], ratio=False) == "0.980 [0.970, 1.030]"  # e.g. milliseconds


def test_kernel_report_speedups_carry_their_range():
    def row(impl, ms, p20, p80):
        return {"shape": "S", "op": "op", "mode": "fwd", "impl": impl, "ms": ms, "ms_p20": p20, "ms_p80": p80}

    rows = [row("torch eager", 3.0, 2.9, 3.3), row("torch.compile", 1.0, 0.98, 1.05), row("triton", 1.0, 0.9, 1.2),
            row("cuda", float("nan"), float("nan"), float("nan"))]
    report._speedups(rows)
    eager, compiled, triton, cuda = rows
    assert triton["x_vs_compile"] == pytest.approx(1.0)
    assert triton["x_vs_compile_range"] == pytest.approx([0.98 / 1.2, 1.05 / 0.9])
    assert triton["x_vs_eager"] == pytest.approx(3.0)
    assert triton["x_vs_eager_range"] == pytest.approx([2.9 / 1.2, 3.3 / 0.9])
    assert compiled["x_vs_compile"] == pytest.approx(1.0) and eager["x_vs_eager"] == pytest.approx(1.0)
    assert cuda["x_vs_compile"] is None and cuda["x_vs_compile_range"] is None  # a failed timing has no ratio
    env = {"run_kind": "GPU", "card": "card", "torch": "t", "triton": "tr", "cuda": "c", "date_utc": "d", "commit": "x"}
    for r in rows:
        r.update(error="", frac_copy_bw=None, **{"GB/s": None})
    text = report._markdown(rows, env, 3000.0)
    assert "| 1.00 [0.82, 1.17] (no difference) | 3.00 [2.42, 3.67] |" in text
