"""benchmarks/kernel_bandwidth.py: a GPU profile's kernel times against Inductor's byte count of the same kernels
(inductor_cuda_codegen's kernels.json). Checked on made-up tables whose rates are worked out by hand."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import kernel_bandwidth as kb  # noqa: E402

LN12 = "triton_per_fused_add_native_layer_norm_backward_view_12"
LN34 = "triton_per_fused_add_native_layer_norm_backward_view_34"
GELU = "triton_poi_fused_gelu_view_9"
COPY = "triton_poi_fused__to_copy_5"


def write_codegen(folder: Path) -> Path:
    """kernels.json as inductor_cuda_codegen writes it: per graph, each kernel's calls and bytes per step."""
    folder.mkdir()
    (folder / "kernels.json").write_text(json.dumps({
        "00-forward.py": {GELU: {"calls": 8, "bytes": 3_000_000_000, "category": "gelu"},
                          COPY: {"calls": 10, "bytes": 1_000_000_000, "category": "masking/gather/copy"}},
        "01-backward.py": {LN12: {"calls": 15, "bytes": 6_000_000_000, "category": "layernorm"},
                           LN34: {"calls": 22, "bytes": 2_000_000_000, "category": "layernorm"},
                           COPY: {"calls": 6, "bytes": 500_000_000, "category": "masking/gather/copy"}}}))
    return folder


def test_kernel_times_join_by_full_name(tmp_path):
    counted = kb.load_bytes(write_codegen(tmp_path / "gen"))
    assert counted[COPY] == {"calls": 16, "bytes": 1_500_000_000, "category": "masking/gather/copy"}  # both graphs
    times = tmp_path / "x.kernel_times.json"  # as fastmae.profiling writes it: per step, us
    times.write_text(json.dumps({
        LN12: {"calls": 15, "us": 2000.0, "category": "layernorm"},
        GELU: {"calls": 8, "us": 1500.0, "category": "gelu"},
        COPY: {"calls": 16, "us": 500.0, "category": "masking/gather/copy"},
        "triton_poi_fused_mul_77": {"calls": 1, "us": 3.0, "category": "elementwise"},  # not generated here
        LN34: {"calls": 11, "us": 700.0, "category": "layernorm"},  # generated here 22 times a step: another graph
        "nvjet_sm90_tst_256x128": {"calls": 99, "us": 9000.0, "category": "matmul"}}))  # a library kernel
    rows, unmatched = kb.join(counted, kb.load_times(times, steps=3))
    by_name = {r["kernel"]: r for r in rows}
    assert by_name[LN12]["gbps"] == pytest.approx(6.0 / 2e-3)  # 6 GB in 2 ms: 3000 GB/s
    assert by_name[GELU]["gbps"] == pytest.approx(3.0 / 1.5e-3)
    assert by_name[COPY]["gbps"] == pytest.approx(1.5 / 0.5e-3)
    assert [r["kernel"] for r in rows] == [LN12, GELU, COPY]  # slowest first
    assert unmatched == ["triton_poi_fused_mul_77", LN34]  # library kernels are not Inductor's to match
    cats = kb.by_category(rows)
    assert cats["layernorm"]["gb"] == pytest.approx(6.0) and cats["gelu"]["ms"] == pytest.approx(1.5)
    text = kb.report(rows, unmatched, copy_gbps=3000.0)
    assert f"| `{LN12}` | 15 | 6.000 | 2.000 | 3000 | 100% |" in text
    assert "| gelu | 1 | 3.00 | 1.500 | 2000 | 67% |" in text and "triton_poi_fused_mul_77" in text


def test_a_top_table_matches_cut_names_by_their_calls(tmp_path):
    """An older profile's top.txt (3 steps, each kernel printed twice, long names cut): a cut name is the
    generated kernel with that prefix and the same calls per step; two such kernels leave it unmatched."""
    counted = kb.load_bytes(write_codegen(tmp_path / "gen"))
    row = "{:<55}  0.00%  0.000us  0.00%  0.000us  0.000us  {}  1.0%  {}  1.0us  {}\n"
    top = tmp_path / "x.top.txt"
    cut = "triton_per_fused_add_native_layer_norm_backward_view..."
    top.write_text("".join(row.format(name, ms, ms, calls) for name, ms, calls in [
        ("aten::mm", "41.053ms", 492), (cut, "6.000ms", 45), (cut, "6.000ms", 45), (cut, "3.000ms", 66),
        (cut, "3.000ms", 66), (GELU, "4.500ms", 24), (GELU, "4.500ms", 24)]))
    assert sorted(kb.top_table_kernels(top), key=lambda k: k["calls"]) == [
        {"name": GELU, "calls": 24, "ms": 4.5}, {"name": cut, "calls": 45, "ms": 6.0},
        {"name": cut, "calls": 66, "ms": 3.0}]
    rows, unmatched = kb.join(counted, kb.load_times(top, steps=3))
    by_name = {r["kernel"]: r for r in rows}
    assert by_name[LN12]["calls"] == 15 and by_name[LN12]["ms"] == pytest.approx(2.0)  # 45 calls over 3 steps
    assert by_name[LN34]["calls"] == 22 and by_name[LN34]["gbps"] == pytest.approx(2.0 / 1e-3)
    assert by_name[GELU]["gbps"] == pytest.approx(3.0 / 1.5e-3) and not unmatched

    both_15 = json.loads((tmp_path / "gen" / "kernels.json").read_text())
    both_15["01-backward.py"][LN34]["calls"] = 15  # now two generated kernels fit the cut name's 15 per step
    (tmp_path / "gen" / "kernels.json").write_text(json.dumps(both_15))
    rows, unmatched = kb.join(kb.load_bytes(tmp_path / "gen"), kb.load_times(top, steps=3))
    assert LN12 not in {r["kernel"] for r in rows} and unmatched.count(cut) == 2  # 45 ambiguous, 66 none


def test_main_says_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        kb.main(["--codegen", str(tmp_path), "--profile", str(tmp_path / "none.json")])
    assert "has no kernels.json" in capsys.readouterr().err
    gen = write_codegen(tmp_path / "gen")
    with pytest.raises(SystemExit):
        kb.main(["--codegen", str(gen), "--profile", str(gen / "kernels.json"), "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    other = tmp_path / "other.kernel_times.json"
    other.write_text(json.dumps({"triton_poi_fused_sin_1": {"calls": 1, "us": 1.0, "category": "elementwise"}}))
    assert kb.main(["--codegen", str(gen), "--profile", str(other)]) == 1
    assert "no profiled kernel" in capsys.readouterr().err
