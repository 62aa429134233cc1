"""benchmarks/gpu_check_report.py reads a GPU check's files against the predictions of benchmarks/NOTES.md; tested
here on the CPU with e2e's real output, hand-made trainer logs and a hand-made clock log."""

import json
import re
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import e2e, gpu_check_report, gpu_clocks  # noqa: E402
from benchmarks.common import speedup_range  # noqa: E402
from benchmarks.kernels.cases import SMOKE_SHAPES, make_cases, make_inputs  # noqa: E402
from benchmarks.predictions import DECISIONS, PREDICTIONS  # noqa: E402
from fastmae.profiling import CATEGORIES  # noqa: E402

CLOCK_HEADER = ("timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], temperature.gpu, "
                "utilization.gpu [%], clocks_event_reasons.active\n")


def _clock_line(t: float, sm: int, reasons: int) -> str:
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    return f"{stamp}, {sm} MHz, 2619 MHz, 650.25 W, 61, 100 %, 0x{reasons:016x}\n"


def _trainer_run_started(run: str, script: str) -> bool:
    """gpu_check.sh starts trainer run `run`: named in it, or the bf16 pair's through its loop variable."""
    return run in script or run.rsplit("_", 1)[0] + "_$precision" in script


def test_predictions_name_what_the_check_measures():
    """A typo in a prediction would leave it 'not measured' forever: every name must be one e2e, the kernel
    benchmark or gpu_check.sh produces."""
    script = (REPO / "benchmarks/gpu_check.sh").read_text()
    kernel_ops = {c.op for c in make_cases(SMOKE_SHAPES[0], make_inputs(SMOKE_SHAPES[0], torch.device("cpu")))}
    for p in PREDICTIONS:
        if p.kind == "e2e":
            assert p.model in e2e.MODELS and {p.a, p.b} <= set(e2e.VARIANTS), p
        elif p.kind == "kernel":
            op, impl, mode = p.a.split("/")
            assert op in kernel_ops and impl in ("triton", "cuda") and mode in ("fwd", "fwd+bwd"), p
            assert p.b in ("torch eager", "torch.compile", "graph_ms"), p
        elif p.kind == "attention":  # a row (or the per-step sum) of benchmarks/attention.py, which the script runs
            from benchmarks.attention import GPU_SHAPES, SDPA_FORCED, TRITON_FORCED

            stack, impl = p.a.split("/")
            impls = {"sdpa", "triton", *SDPA_FORCED, *TRITON_FORCED}
            assert stack in {s.stack for s in GPU_SHAPES} | {"step"} and {impl, p.b} <= impls, p
            assert p.model in {s.model for s in GPU_SHAPES} and "benchmarks/attention.py" in script, p
        elif p.kind == "bandwidth":  # a profiled e2e stage of the script, and a committed codegen of its variant
            folder, variant = p.a.split("/")
            stage = next(line for line in script.splitlines() if f'"$WORK/{folder}"' in line)
            assert "--profile" in stage and variant in e2e.VARIANTS, p
            assert p.b in {label for label, _ in CATEGORIES}, p
            assert list(gpu_check_report.RESULTS.glob(f"codegen-*/torch-*/{variant}/kernels.json")), p
        else:
            runs = [p.a] + ([p.b] if p.b and not p.b.startswith("e2e:") else [])
            for run in runs:
                assert _trainer_run_started(run, script), run
            if p.b.startswith("e2e:"):
                folder, variant = p.b[4:].split("/")
                assert f'"$WORK/{folder}"' in script and variant in e2e.VARIANTS, p
        assert p.lo <= p.hi and p.kind in ("e2e", "kernel", "trainer", "busy", "waits", "bandwidth", "attention"), p


def _e2e_stages(script: str) -> list[tuple[set[str], set[str]]]:
    """(models, variants) of every e2e stage in gpu_check.sh, its continued lines joined."""
    joined = script.replace("\\\n", " ")
    return [(set(models.split(",")), set(variants.split(",")))
            for models, variants in re.findall(r"--models ([\w,]+).*?--variants ([\w,-]+)", joined)]


def test_decisions_are_measured_by_the_check():
    """A decision whose two sides no single stage runs could never be settled: each e2e pair must share one stage's
    variants, each attention pair be rows the benchmark writes, each trainer pair be runs the script starts."""
    from benchmarks.attention import GPU_SHAPES, TRITON_FORCED

    script = (REPO / "benchmarks/gpu_check.sh").read_text()
    stages = _e2e_stages(script)
    assert len(stages) >= 8 and DECISIONS
    for d in DECISIONS:
        assert d.change and d.a != d.b, d
        if d.kind == "e2e":
            assert any(d.model in models and {d.a, d.b} <= variants for models, variants in stages), d
        elif d.kind == "attention":
            stack, impl = d.a.split("/")
            assert {impl, d.b} <= {"sdpa", "triton", *TRITON_FORCED}, d
            assert (d.model, stack) in {(s.model, s.stack) for s in GPU_SHAPES}, d
        else:
            assert d.kind == "trainer", d
            for run in (d.a, d.b):
                assert _trainer_run_started(run, script), run


@pytest.mark.parametrize("value, rng, expected", [
    (1.04, [1.01, 1.06], "change"),
    (0.97, [0.95, 0.99], "keep"),
    (1.01, [0.99, 1.03], "undecided: the range holds 1"),
    (1.10, None, "undecided: one value, no range"),
    (1.10, [float("nan"), 1.2], "undecided: one value, no range"),
    (None, None, "not measured"),
    (float("nan"), None, "not measured"),
])
def test_decide(value, rng, expected):
    assert gpu_check_report.decide(value, rng) == expected


@pytest.mark.parametrize("value, rng, expected", [
    (1.07, [1.065, 1.08], "as predicted"),
    (1.07, [1.02, 1.12], "as predicted (median; its range is wider)"),
    (1.12, [1.09, 1.15], "above (its range overlaps the prediction)"),
    (1.00, [0.99, 1.01], "below: missed"),
    (1.08, None, "as predicted (one value, no range)"),
    (None, None, "not measured"),
])
def test_verdict(value, rng, expected):
    assert gpu_check_report.verdict(value, rng, 1.06, 1.10) == expected


def test_clock_log_is_read_with_units_and_reasons(tmp_path):
    path = tmp_path / "gpu_clocks.csv"
    path.write_text(CLOCK_HEADER + _clock_line(1.8e9, 1980, 0) + "Unable to determine the device handle\n"
                    + _clock_line(1.8e9 + 0.2, 1410, 0x4 | 0x8))
    first, second = gpu_clocks.read(path)
    assert (first.t, first.sm_mhz, first.mem_mhz, first.power_w, first.temp_c, first.util_pct) == pytest.approx(
        (1.8e9, 1980, 2619, 650.25, 61, 100))
    assert second.sm_mhz == 1410 and gpu_clocks.describe(second.reasons) == "SW power cap + HW slowdown"
    assert gpu_clocks.describe(0) == "none" and gpu_clocks.describe(0x4000) == "0x4000"
    assert gpu_clocks.during([first, second], 1.8e9 + 0.25, 1.8e9 + 0.3, slack=0.0) == []
    assert gpu_clocks.during([first, second], 1.8e9 + 0.25, 1.8e9 + 0.3) == [second]


def test_slow_steps_are_set_against_the_clocks():
    t0 = 1.8e9
    row = {"model": "L", "variant": "ref-compiled", "steps_started_unix_s": [t0, t0 + 10], "alloc_events": 4,
           "steps_ms": [[500.0, 500.0, 900.0, 500.0], [500.0, 500.0]]}
    # the third step of the first pass (t0 + 1.0 .. 1.9 s) runs at 1410 MHz under a power cap; the rest at 1980
    samples = [gpu_clocks.Sample(t0 + 0.1 * i, 1410 if 11 <= i <= 18 else 1980, 2619, 650, 60, 100,
                                 0x4 if 11 <= i <= 18 else 0) for i in range(130)]
    (line,) = gpu_check_report.slow_steps({"e2e_L": [row]}, samples)
    assert (line["steps"], line["slow"], line["median ms"], line["slowest ms"]) == (6, 1, 500.0, 900.0)
    assert line["SM MHz in slow (min)"] == 1410 and line["SM MHz otherwise (median)"] == 1980
    assert line["reasons in slow"] == "SW power cap" and line["allocator events"] == 4


def _trainer_run(folder: Path, img_s: list[float], busy: float | None = None) -> None:
    folder.mkdir(parents=True)
    lines = [{"step": 10 * (i + 1), "loss": 1.0, "img_per_s": v, "skipped_steps": 0, "bad_step": False}
             for i, v in enumerate(img_s)]
    (folder / "train_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if busy is not None:
        (folder / "profile").mkdir()
        (folder / "profile/trainer.summary.json").write_text(json.dumps(
            {"steps": 5, "after_warmup_steps": 5, "busy": busy, "wall_ms_per_step": 55.0, "host_waits_per_step": 0,
             "allocator_events": {"num_device_alloc": 2, "num_device_free": 1}}))


def test_report_reads_a_check_against_the_predictions(tmp_path):
    root = tmp_path / "gpu_check"
    # the eager A/B stage, from e2e itself (CPU, tiny model), its rows then labelled as ViT-B's
    out = root / "e2e_B_eager_norm"
    assert e2e.main(["--device", "cpu", "--models", "tiny", "--batch", "2", "--steps", "3", "--warmup", "1",
                     "--variants", "fast-eager,fast-eager-fusednorm,fast-eager-fusedgelu", "--rounds", "2",
                     "--out", str(out)]) == 0
    result = json.loads((out / "e2e.json").read_text())
    for row in result["rows"]:
        row["model"] = "B"
    (out / "e2e.json").write_text(json.dumps(result))
    # the trainer: compile + profile in the first window (dropped), steady 4,700-4,800 img/s after it
    _trainer_run(root / "pretrain_B_compiled", [900.0, 4700.0, 4800.0, 4750.0], busy=0.955)
    _trainer_run(root / "pretrain_B_compiled_timer", [900.0, 4400.0, 4420.0, 4410.0])
    # the precision pair a decision reads: bf16-pure faster over its whole range
    _trainer_run(root / "pretrain_B_z2_compiled_bf16", [900.0, 4500.0, 4520.0, 4510.0])
    _trainer_run(root / "pretrain_B_z2_compiled_bf16-pure", [900.0, 4800.0, 4850.0, 4820.0])
    # e2e's compiled row the trainer is read against (another run), and kernel rows (written as the benchmark does)
    (root / "e2e_B").mkdir()
    (root / "e2e_B/e2e.json").write_text(json.dumps({"rows": [
        {"model": "B", "variant": "fast-compiled", "status": "ok", "batch": 256, "img_s": 256 / 0.054,
         "step_ms": 54.0, "step_ms_p20": 53.9, "step_ms_p80": 54.2}]}))
    (root / "kernels").mkdir()
    impls = (("torch eager", 1.2, ""), ("torch.compile", 0.5, ""), ("triton", 0.65, 0.45))
    kernel_csv = ("shape,op,mode,impl,ms,ms_p20,ms_p80,graph_ms,graph_ms_p20,graph_ms_p80,error,GB/s,frac_copy_bw\n"
                  + "".join(f"ViT-B/16,add_layer_norm,fwd+bwd,{impl},{ms},{ms * 0.99},{ms * 1.01},{graph},{graph},"
                            f"{graph},,,\n" for impl, ms, graph in impls))
    kernel_csv += "ViT-B/16,three_ops,fwd+bwd,triton,2.5,2.4,2.6,0.98,0.97,1.03,,1500.0,0.5\n"  # copy: 3,000 GB/s
    (root / "kernels/kernels_NVIDIA_H200.csv").write_text(kernel_csv)
    (root / "inductor_fallbacks.txt").write_text("2 compiled graphs: 10 generated kernel calls, 4 library calls, "
                                                 "1 aten fallbacks\n\nper graph (...):\n  c1.py: 5 / 2 / 1\n")
    (root / "summary.log").write_text("python 3.12 torch 2.11 gpu NVIDIA H200\n[00:01 +5s] end triton_tests rc=0\n")
    (root / "e2e_B/profiles").mkdir()
    (root / "e2e_B/profiles/B-ref-compiled.callers.txt").write_text(
        "# calls per profiled step (3 steps) ...\naten::copy_: 6 per step\n         6  x > aten::addmm\n"
        "aten::sum: 84 per step\n        84  CompiledFunctionBackward > aten::foo\n")
    # a compiled variant's kernel times, and Inductor's bytes for its kernels (inductor_cuda_codegen's output)
    kernel = "triton_per_fused_add_native_layer_norm_backward_12"
    (root / "e2e_B/profiles/mae_vit_base_patch16_dec512d8b-fast-compiled.kernel_times.json").write_text(json.dumps(
        {kernel: {"calls": 15, "us": 2000.0, "category": "layernorm"},
         "nvjet_sm90_tst": {"calls": 99, "us": 9000.0, "category": "matmul"}}))
    (root / "pretrain_B_compiled/profile").mkdir(parents=True, exist_ok=True)  # the trainer's own: no variant
    (root / "pretrain_B_compiled/profile/trainer.kernel_times.json").write_text(json.dumps(
        {kernel: {"calls": 15, "us": 1000.0, "category": "layernorm"}}))
    codegen = tmp_path / "codegen"
    (codegen / "fast-compiled").mkdir(parents=True)
    (codegen / "meta.json").write_text(json.dumps({"model": "mae_vit_base_patch16_dec512d8b"}))
    (codegen / "fast-compiled/kernels.json").write_text(json.dumps(
        {"01-backward.py": {kernel: {"calls": 15, "bytes": 5_400_000_000, "category": "layernorm"}}}))
    tgz = tmp_path / "gpu_check.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="gpu_check")

    assert gpu_check_report.main([str(tgz), "--out", str(tmp_path / "report.md"), "--codegen", str(codegen)]) == 0
    text = (tmp_path / "report.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("§"):
            rows.setdefault(cells[2], []).append(cells)
    # the eager A/Bs were measured (CPU numbers: any verdict but "not measured") in the folder they ran in
    for what in ("fast-eager-fusednorm / fast-eager", "fast-eager-fusedgelu / fast-eager"):
        (cells,) = rows[what]
        assert cells[3] == "e2e_B_eager_norm" and cells[6] != "not measured"
        assert re.fullmatch(r"\d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\]( \(no difference\))?", cells[5]), cells
    # trainer: the timer run at 4,410 of 4,750 img/s = 0.928x; range 4,400 / 4,800 to 4,420 / 4,700
    (cells,) = rows["pretrain_B_compiled_timer / pretrain_B_compiled"]
    assert cells[5] == "0.928 [0.917, 0.940]" and cells[6] == "as predicted (median; its range is wider)"  # 0.92-0.98
    (cells,) = rows["pretrain_B_compiled waits"]  # predicted exactly 0 per step
    assert (cells[4], cells[5], cells[6]) == ("0", "0.000", "as predicted (one value, no range)")
    assert rows["pretrain_B_compiled_timer waits"][0][6] == "not measured"  # that run has no profile here
    (cells,) = rows["pretrain_B_compiled busy"]
    assert cells[5] == "0.955" and cells[6] == "as predicted (one value, no range)"
    (cells,) = rows["pretrain_B_compiled / e2e:e2e_B/fast-compiled"]  # 4,750 img/s against 256 / 54 ms
    assert cells[5].startswith("1.002 [") and cells[6] == "as predicted"
    (cells,) = rows["add_layer_norm/triton/fwd+bwd / torch eager"]  # 1.2 / 0.65 ms, each +-1%
    assert cells[5] == "1.846 [1.810, 1.883]" and cells[6] == "as predicted"
    (cells,) = rows["add_layer_norm/triton/fwd+bwd / torch.compile"]
    assert cells[5] == "0.769 [0.754, 0.785]" and cells[6] == "below: missed"
    (cells,) = rows["three_ops/triton/fwd+bwd graph replay ms"]  # milliseconds, predicted <= 0.6
    assert cells[5] == "0.980 [0.970, 1.030]" and cells[6] == "above: missed"  # ms: no "no difference" flag
    assert rows["ref-compiled-fusedadamw / ref-compiled"][0][6] == "not measured"
    assert "## Round spreads" in text and "## Trainer runs" in text and "end triton_tests rc=0" in text
    decisions = {}
    for line in text.split("## Decisions", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("§"):
            decisions[cells[1], cells[2]] = cells
    assert len(decisions) == len(DECISIONS)
    cells = decisions["B", "pretrain_B_z2_compiled_bf16-pure / pretrain_B_z2_compiled_bf16"]
    assert cells[4].startswith("1.0") and cells[5] == "change" and cells[6].startswith("the README names")
    assert decisions["B", "fast-compiled-tritonattn-dec / fast-compiled"][5:] == ["not measured", "-"]
    trainer_row = next(line for line in text.splitlines() if line.startswith("| pretrain_B_compiled |"))
    assert trainer_row.rstrip().endswith("| 0 | 3 |")  # host waits per step, allocator events in the window
    assert "    2 compiled graphs: 10 generated kernel calls" in text and "c1.py" not in text  # totals only
    assert "    aten::sum: 84 per step\n            84  CompiledFunctionBackward > aten::foo" in text
    assert "aten::copy_" not in text  # only the sums' block
    assert "no gpu_clocks.csv: clocks unknown" in text  # per-step times were there, the clock log was not
    assert "were written for an H100 80GB HBM3; this card is not one" in text  # the summary names an H200
    # 5.4 GB in 2 ms per step: 2,700 GB/s, 90% of the kernel benchmark's copy rate
    assert "copy rate 3000 GB/s" in text and f"| `{kernel}` | 15 | 5.400 | 2.000 | 2700 | 90% |" in text
    (cells,) = rows["fast-compiled layernorm kernels, of copy rate"]  # §6.9: predicted 0.85-0.95
    assert (cells[3], cells[5], cells[6]) == ("e2e_B", "0.900", "as predicted (one value, no range)")
    assert rows["fast-compiled gelu kernels, of copy rate"][0][6] == "not measured"  # no GELU kernel profiled


def test_the_copy_rate_comes_from_the_kernel_rows_or_the_checks_own_copy(tmp_path):
    rows = [{"GB/s": "", "frac_copy_bw": ""}, {"GB/s": "1500.0", "frac_copy_bw": "0.5"}]
    assert gpu_check_report.copy_gbps(tmp_path, rows) == pytest.approx(3000.0)
    assert gpu_check_report.copy_gbps(tmp_path, []) is None
    (tmp_path / "copy_bandwidth.json").write_text("")  # the copy was cut short
    assert gpu_check_report.copy_gbps(tmp_path, []) is None
    (tmp_path / "copy_bandwidth.json").write_text(json.dumps({"copy_gbps": 4312.5, "card": "NVIDIA H200"}))
    assert gpu_check_report.copy_gbps(tmp_path, []) == pytest.approx(4312.5)  # the kernel stage was cut


def test_the_committed_codegen_is_found_for_the_runs_torch(tmp_path):
    (tmp_path / "e2e_B").mkdir()
    (tmp_path / "e2e_B/e2e.json").write_text(json.dumps({"environment": {"torch": "2.11.0+cu130"}, "rows": []}))
    found = gpu_check_report.default_codegen(tmp_path)
    assert found is not None and found.name == "torch-2.11" and (found / "ref-compiled/kernels.json").is_file()
    (tmp_path / "e2e_B/e2e.json").write_text(json.dumps({"environment": {"torch": "1.13.0"}, "rows": []}))
    assert gpu_check_report.default_codegen(tmp_path) is None


def test_report_reads_the_attention_benchmark(tmp_path):
    """benchmarks/attention.py's own output (CPU smoke, rows relabelled as ViT-B's decoder) against the §7.6
    kernel prediction: b's fwd+bwd ms / a's, with the p20/p80 range."""
    from benchmarks import attention

    out = tmp_path / "gpu_check" / "attention"
    assert attention.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads((out / "attention.json").read_text())
    for row in data["rows"]:
        row["model"], row["stack"] = "B", {"encoder": "encoder", "decoder-last": "decoder"}[row["stack"]]
    (out / "attention.json").write_text(json.dumps(data))
    rows = gpu_check_report.attention_rows(out.parent)
    table = gpu_check_report.prediction_table({}, [], {}, attention=rows)
    (line,) = [t for t in table if t["NOTES"] == "§7.6" and t["what"] == "decoder/triton / sdpa" and t["model"] == "B"]
    pick = {r["impl"]: r for r in data["rows"] if r["stack"] == "decoder"}
    want = pick["sdpa"]["fwd_bwd_ms"] / pick["triton"]["fwd_bwd_ms"]
    assert line["measured"].startswith(f"{want:.3f} [") and line["verdict"] != "not measured"
    # the decision on the head or split backward: at the smoke's 2 x 4 heads `auto` ran split, so the split side is
    # the "triton" row and the head side the forced one; head's ms / split's, and the outcome that number gives
    assert pick["triton"]["backward"] == "split" and "triton-split" not in pick
    (line,) = [t for t in gpu_check_report.decision_table({}, {}, rows)
               if t["model"] == "B" and t["candidate / now"] == "decoder/triton-split / triton-head"]
    head, split = pick["triton-head"], pick["triton"]
    want = head["fwd_bwd_ms"] / split["fwd_bwd_ms"]
    rng = speedup_range((split["fwd_bwd_ms_p20"], split["fwd_bwd_ms_p80"]),
                        (head["fwd_bwd_ms_p20"], head["fwd_bwd_ms_p80"]))
    assert line["measured"].startswith(f"{want:.3f} [") and line["outcome"] == gpu_check_report.decide(want, rng)
    assert line["action"] != "-"
