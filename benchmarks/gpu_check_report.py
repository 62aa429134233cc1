"""Reads what `benchmarks/gpu_check.sh` brought back against the open predictions of benchmarks/NOTES.md
(`benchmarks/predictions.py`) and prints one markdown report: each prediction with the measured ratio, its range
and a verdict; the round spreads; the trainer runs; and which slow steps fell on clock drops.

    python benchmarks/gpu_check_report.py path/to/gpu_check.tgz          # or the unpacked folder
    python benchmarks/gpu_check_report.py path/to/gpu_check --out report.md

It reads what it finds (any `e2e.json`, kernel CSV, trainer run folder, `gpu_clocks.csv`, `summary.log` below
the path) and says "not measured" for the rest: a check cut short by its budget still gets a report.
"""

import argparse
import csv
import json
import math
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks.*`

from benchmarks import gpu_clocks, kernel_bandwidth  # noqa: E402
from benchmarks.attention import TRITON_FORCED  # noqa: E402  (the backward `auto` picked is timed as "triton")
from benchmarks.common import format_speedup, markdown_table, speedup_range  # noqa: E402
from benchmarks.e2e import step_range  # noqa: E402
from benchmarks.predictions import (  # noqa: E402
    DECISIONS, PREDICTED_FOR, PREDICTIONS, ROUND_SPREAD_MAX, Decision, Prediction)

SLOW = 1.10  # a step this much slower than its row's median counts as slow
RESULTS = Path(__file__).resolve().parent / "results"


def verdict(value: float | None, rng: list[float] | None, lo: float, hi: float) -> str:
    if value is None:
        return "not measured"
    if rng and lo <= rng[0] and rng[1] <= hi:
        return "as predicted"
    if lo <= value <= hi:
        return "as predicted (median; its range is wider)" if rng else "as predicted (one value, no range)"
    side = "above" if value > hi else "below"
    if rng and rng[0] <= hi and rng[1] >= lo:
        return f"{side} (its range overlaps the prediction)"
    return f"{side}: missed"


# --- what the check wrote ------------------------------------------------------------------------------------

def e2e_runs(root: Path) -> dict[str, list[dict]]:
    """{folder name: rows} for every e2e.json below root."""
    return {p.parent.name: json.loads(p.read_text())["rows"] for p in sorted(root.rglob("e2e.json"))}


def kernel_rows(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.rglob("kernels_*.csv")):
        if "smoke" not in path.name:
            with open(path, newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def attention_rows(root: Path) -> list[dict]:
    """Rows of benchmarks/attention.py (any attention.json below root) and its per-step sums, tagged "step"."""
    rows = []
    for path in sorted(root.rglob("attention.json")):
        data = json.loads(path.read_text())
        rows += data["rows"] + [{**s, "stack": "step"} for s in data.get("per_step", [])]
    return rows


def trainer_runs(root: Path) -> dict[str, dict]:
    """{run name: {img_s, img_s_range, windows, summary}} for every folder with a train_steps.jsonl. Steady
    images/s = median over the log windows after the first (compilation, warm-up) and after the profiled steps."""
    runs = {}
    for path in sorted(root.rglob("train_steps.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        summary_path = path.parent / "profile" / "trainer.summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        profiled_to = summary["after_warmup_steps"] + summary["steps"] if summary else 0
        first = records[0]["step"] if records else 0
        steady = [r["img_per_s"] for r in records
                  if r["step"] > max(first, profiled_to) and not r.get("bad_step") and r.get("img_per_s")]
        runs[path.parent.name] = {
            "img_s": statistics.median(steady) if steady else None,
            "img_s_range": (min(steady), max(steady)) if steady else None,
            "windows": len(steady), "last_step": records[-1]["step"] if records else None,
            "skipped_steps": records[-1].get("skipped_steps") if records else None, "summary": summary}
    return runs


# --- predictions ---------------------------------------------------------------------------------------------

def _time_per_image_e2e(row: dict) -> tuple[float, tuple[float, float] | None]:
    """ms per image (median) and its (low, high) from the row's step range."""
    rng = step_range(row)
    return row["step_ms"] / row["batch"], (rng[0] / row["batch"], rng[1] / row["batch"]) if rng else None


def _time_per_image_trainer(run: dict) -> tuple[float, tuple[float, float] | None] | None:
    if not run or not run["img_s"]:
        return None
    low, high = run["img_s_range"]
    return 1e3 / run["img_s"], (1e3 / high, 1e3 / low)


def _e2e_lines(p: Prediction, runs: dict[str, list[dict]]) -> list[dict]:
    lines = []
    for folder, rows in runs.items():
        ok = {r["variant"]: r for r in rows if r["model"] == p.model and r["status"] == "ok"}
        if p.a in ok and p.b in ok:
            (ta, ra), (tb, rb) = _time_per_image_e2e(ok[p.a]), _time_per_image_e2e(ok[p.b])
            lines.append({"where": folder, "value": tb / ta, "range": speedup_range(ra, rb)})
    return lines


def _kernel_lines(p: Prediction, rows: list[dict]) -> list[dict]:
    op, impl, mode = p.a.split("/")
    pick = {r["impl"]: r for r in rows if (r["shape"], r["op"], r["mode"]) == (p.model, op, mode)}
    row = pick.get(impl)
    if row is None or row.get("error"):
        return []
    if p.b == "graph_ms":
        value = float(row.get("graph_ms") or "nan")
        if value != value:  # NaN: not captured
            return []
        return [{"where": "kernels", "value": value,
                 "range": [float(row["graph_ms_p20"]), float(row["graph_ms_p80"])]}]
    base = pick.get(p.b)
    if base is None or base.get("error"):
        return []
    value = float(base["ms"]) / float(row["ms"])
    rng = speedup_range((float(row["ms_p20"]), float(row["ms_p80"])), (float(base["ms_p20"]), float(base["ms_p80"])))
    return [{"where": "kernels", "value": value, "range": rng}]


def _attention_row(pick: dict[str, dict], impl: str) -> dict | None:
    """The row of `impl` among one shape's rows, by impl; a forced backward's is the "triton" row where that ran it."""
    if impl in pick or impl not in TRITON_FORCED:
        return pick.get(impl)
    auto = pick.get("triton")
    return auto if auto and auto.get("backward") == TRITON_FORCED[impl] else None


def _attention_lines(p: Prediction | Decision, rows: list[dict]) -> list[dict]:
    """`a` = "stack/impl" against impl `b` at model `p.model`: b's fwd+bwd ms / a's, with its p20/p80 range; for
    stack "step", the per-step sums (no range: a sum of medians)."""
    stack, impl = p.a.split("/")
    pick = {r["impl"]: r for r in rows if r["model"] == p.model and r["stack"] == stack}
    a, b = _attention_row(pick, impl), _attention_row(pick, p.b)
    key = "step_attention_ms" if stack == "step" else "fwd_bwd_ms"
    if not a or not b or not a.get(key) or not b.get(key):
        return []
    rng = None if stack == "step" else speedup_range((a["fwd_bwd_ms_p20"], a["fwd_bwd_ms_p80"]),
                                                     (b["fwd_bwd_ms_p20"], b["fwd_bwd_ms_p80"]))
    return [{"where": "attention", "value": b[key] / a[key], "range": rng}]


def _trainer_lines(p: Prediction, runs: dict[str, dict], e2e: dict[str, list[dict]]) -> list[dict]:
    a = _time_per_image_trainer(runs.get(p.a))
    if p.b.startswith("e2e:"):
        folder, variant = p.b[4:].split("/")
        row = next((r for r in e2e.get(folder, []) if r["variant"] == variant and r["status"] == "ok"), None)
        b = _time_per_image_e2e(row) if row else None
    else:
        b = _time_per_image_trainer(runs.get(p.b))
    if a is None or b is None:
        return []
    return [{"where": "trainer", "value": b[0] / a[0], "range": speedup_range(a[1], b[1])}]


def _lines(p: Prediction | Decision, e2e: dict, kernels: list[dict], trainer: dict,
           bandwidth: dict[str, dict[str, float]] | None, attention: list[dict] | None) -> list[dict]:
    """What the check measured for `p`: one {"where", "value", "range"} per run that holds both sides."""
    if p.kind == "e2e":
        return _e2e_lines(p, e2e)
    if p.kind == "bandwidth":  # a fraction of the copy rate, from the kernel_bandwidth join
        frac = (bandwidth or {}).get(p.a, {}).get(p.b)
        return [{"where": p.a.split("/")[0], "value": frac, "range": None}] if frac is not None else []
    if p.kind == "kernel":
        return _kernel_lines(p, kernels)
    if p.kind == "attention":
        return _attention_lines(p, attention or [])
    if p.kind == "trainer":
        return _trainer_lines(p, trainer, e2e)
    summary = (trainer.get(p.a) or {}).get("summary")  # busy, waits: one number from the run's profile summary
    key = {"busy": "busy", "waits": "host_waits_per_step"}[p.kind]
    return [{"where": "trainer", "value": summary[key], "range": None}] if summary else []


def prediction_table(e2e: dict, kernels: list[dict], trainer: dict,
                     bandwidth: dict[str, dict[str, float]] | None = None,
                     attention: list[dict] | None = None) -> list[dict]:
    table = []
    for p in PREDICTIONS:
        lines = _lines(p, e2e, kernels, trainer, bandwidth, attention)
        what = f"{p.a} / {p.b}" if p.kind not in ("busy", "waits") else f"{p.a} {p.kind}"
        if p.kind == "bandwidth":
            what = f"{p.a.split('/')[1]} {p.b} kernels, of copy rate"
        if p.b == "graph_ms":
            what = f"{p.a} graph replay ms"
        predicted = f">= {p.lo:g}" if p.hi == float("inf") else f"{p.lo:g}" if p.lo == p.hi else f"{p.lo:g}-{p.hi:g}"
        base = {"NOTES": f"§{p.source}", "model": p.model, "what": what, "predicted": predicted}
        for line in lines or [{"where": "-", "value": None, "range": None}]:
            measured = format_speedup(line["value"], line["range"],
                                      ratio=p.kind in ("e2e", "kernel", "trainer", "attention")
                                      and p.b != "graph_ms")  # the others are ms, fractions or counts
            table.append({**base, "run": line["where"], "measured": measured,
                          "verdict": verdict(line["value"], line["range"], p.lo, p.hi), "why": p.why})
    return table


# --- decisions ---------------------------------------------------------------------------------------------

def decide(value: float | None, rng: list[float] | tuple[float, float] | None) -> str:
    """"change" when the candidate is the faster over its whole range, "keep" when the code's choice is, else why
    the run cannot tell."""
    if value is None or math.isnan(value):
        return "not measured"
    if rng is None or any(math.isnan(x) for x in rng):
        return "undecided: one value, no range"
    if rng[0] > 1.0:
        return "change"
    if rng[1] < 1.0:
        return "keep"
    return "undecided: the range holds 1"


def decision_table(e2e: dict, trainer: dict, attention: list[dict] | None = None) -> list[dict]:
    """Each of DECISIONS against what the check measured: the outcome and the edit it asks for."""
    table = []
    for d in DECISIONS:
        for line in _lines(d, e2e, [], trainer, None, attention) or [{"where": "-", "value": None, "range": None}]:
            outcome = decide(line["value"], line["range"])
            action = {"change": d.change, "keep": "none: the code's choice is the faster",
                      "not measured": "-"}.get(outcome, "none yet: measure it again, in more rounds")
            table.append({"NOTES": f"§{d.source}", "model": d.model, "candidate / now": f"{d.a} / {d.b}",
                          "run": line["where"], "measured": format_speedup(line["value"], line["range"]),
                          "outcome": outcome, "action": action})
    return table


# --- spreads, trainer, clocks --------------------------------------------------------------------------------

def spread_table(e2e: dict[str, list[dict]]) -> list[dict]:
    return [{"run": folder, "model": r["model"], "variant": r["variant"], "rounds": r.get("rounds"),
             "round_spread": r["round_spread"], "ok": r["round_spread"] <= ROUND_SPREAD_MAX}
            for folder, rows in e2e.items() for r in rows if r.get("round_spread") is not None]


def trainer_table(runs: dict[str, dict]) -> list[dict]:
    table = []
    for name, run in runs.items():
        s = run["summary"] or {}
        low_high = run["img_s_range"]
        table.append({"run": name, "last_step": run["last_step"], "steady img/s": run["img_s"],
                      "window min-max": f"{low_high[0]:,.0f}-{low_high[1]:,.0f}" if low_high else None,
                      "windows": run["windows"], "skipped steps": run["skipped_steps"], "busy": s.get("busy"),
                      "wall ms/step (profiled)": s.get("wall_ms_per_step"),
                      "host waits/step": s.get("host_waits_per_step"),
                      "allocator events (profiled)": sum(s["allocator_events"].values())
                      if s.get("allocator_events") else s.get("allocator_events")})
    return table


def slow_steps(e2e: dict[str, list[dict]], samples: list[gpu_clocks.Sample]) -> list[dict]:
    """Per e2e row with per-step times: how many steps ran > SLOW x the row's median, the SM clock and
    clock-event reasons while they ran against while the other steps ran, and the CUDA allocator's events in
    the timed steps (the other suspect: a cudaFree inside a step waits for the device)."""
    table = []
    for folder, rows in e2e.items():
        for r in rows:
            passes = list(zip(r.get("steps_started_unix_s") or [], r.get("steps_ms") or []))
            every = [ms for _, steps in passes for ms in steps]
            if not every:
                continue
            median = statistics.median(every)
            slow_clocks, other_clocks, reasons, slow = [], [], 0, []
            for start, steps in passes:
                t = start
                for ms in steps:
                    window = gpu_clocks.during(samples, t, t + ms / 1e3)
                    clocks = [s.sm_mhz for s in window if s.sm_mhz is not None]
                    if ms > SLOW * median:
                        slow.append(ms)
                        slow_clocks += clocks
                        for sample in window:  # idle included: a slow step on an idle card waited for the host
                            reasons |= sample.reasons
                    else:
                        other_clocks += clocks
                    t += ms / 1e3
            table.append({"run": folder, "model": r["model"], "variant": r["variant"], "steps": len(every),
                          "slow": len(slow), "median ms": median, "slowest ms": max(every),
                          "SM MHz in slow (min)": min(slow_clocks) if slow_clocks else None,
                          "SM MHz otherwise (median)": statistics.median(other_clocks) if other_clocks else None,
                          "reasons in slow": gpu_clocks.describe(reasons) if slow and samples else None,
                          "allocator events": r.get("alloc_events")})  # cudaMalloc/Free etc. in the timed steps
    return table


def sum_callers(root: Path, op: str = "aten::sum") -> str:
    """The `op` block of every profile's <tag>.callers.txt (fastmae.profiling.op_callers), indented, by file."""
    blocks = []
    for path in sorted(root.rglob("*.callers.txt")):
        lines, inside = [], False
        for line in path.read_text().splitlines():
            if not line.startswith(" "):
                inside = line.startswith(f"{op}: ")
            if inside:
                lines.append(line)
        if lines:
            blocks.append(f"    {path.relative_to(root)}\n" + "\n".join(f"    {line}" for line in lines))
    return "\n".join(blocks) + "\n" if blocks else ""


def copy_gbps(root: Path, kernels: list[dict]) -> float | None:
    """The card's copy rate: as the kernel benchmark measured it (each row's GB/s over its fraction of it), else
    the same 1 GiB copy that gpu_check.sh times at its start (copy_bandwidth.json)."""
    for r in kernels:
        try:
            gbps, frac = float(r["GB/s"]), float(r["frac_copy_bw"])
        except (KeyError, TypeError, ValueError):
            continue
        if gbps > 0 and frac > 0:
            return gbps / frac
    for path in root.rglob("copy_bandwidth.json"):
        try:
            return float(json.loads(path.read_text())["copy_gbps"])
        except (ValueError, KeyError, TypeError):  # an empty or cut file: the copy did not finish
            continue
    return None


def default_codegen(root: Path) -> Path | None:
    """The newest committed codegen (benchmarks/inductor_cuda_codegen.py) for the torch version of the run's e2e
    files: benchmarks/results/codegen-*/torch-<major.minor>."""
    versions = {json.loads(p.read_text()).get("environment", {}).get("torch") for p in root.rglob("e2e.json")}
    for version in sorted(v for v in versions if v):
        found = sorted(RESULTS.glob(f"codegen-*/torch-{'.'.join(version.split('.')[:2])}"))
        if found:
            return found[-1]
    return None


def bandwidth_joins(root: Path, codegen: Path | None) -> list[dict]:
    """Per profiled compiled variant (its <model>-<variant>.kernel_times.json), its kernels' times joined with the
    bytes Inductor counts for them (benchmarks/kernel_bandwidth.py against `codegen`/<variant>): {"profile", "run"
    (<e2e folder>/<variant>), "rows", "unmatched"}."""
    joins = []
    for times in sorted(root.rglob("*.kernel_times.json")):
        tag = times.name.removesuffix(".kernel_times.json")
        if "-" not in tag:  # the trainer's own profile ("trainer"): no e2e variant to look up
            continue
        model, variant = tag.split("-", 1)
        if codegen is None or not (codegen / variant / "kernels.json").is_file():
            continue
        meta = codegen / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("model") != model:
            continue
        rows, unmatched = kernel_bandwidth.join(kernel_bandwidth.load_bytes(codegen / variant),
                                                kernel_bandwidth.load_times(times, steps=3))
        if rows:
            joins.append({"profile": times.relative_to(root), "run": f"{times.parent.parent.name}/{variant}",
                          "rows": rows, "unmatched": unmatched})
    return joins


def bandwidth_fractions(joins: list[dict], copy: float | None) -> dict[str, dict[str, float]]:
    """{run: {category: its Inductor kernels' GB/s as a fraction of the copy rate}} (the "bandwidth" predictions)."""
    if not copy:
        return {}
    return {j["run"]: {cat: t["gbps"] / copy for cat, t in kernel_bandwidth.by_category(j["rows"]).items()}
            for j in joins}


def bandwidth_section(joins: list[dict], codegen: Path | None, copy: float | None) -> str:
    if not joins:
        return ""
    where = codegen.relative_to(RESULTS.parents[1]) if codegen.is_relative_to(RESULTS.parents[1]) else codegen
    rate = f"{copy:.0f} GB/s" if copy else "not measured"
    parts = [f"### {j['profile']}\n\n" + kernel_bandwidth.report(j["rows"], j["unmatched"], copy, top=10)
             for j in joins]
    return (f"\n## How fast Inductor's kernels moved their bytes (benchmarks/kernel_bandwidth.py; bytes from {where}, "
            f"copy rate {rate}; NOTES §6.9)\n\n" + "\n".join(parts))


def report(root: Path, codegen: Path | None = None) -> str:
    e2e, kernels, trainer, attention = e2e_runs(root), kernel_rows(root), trainer_runs(root), attention_rows(root)
    codegen = codegen or default_codegen(root)
    copy = copy_gbps(root, kernels)
    joins = bandwidth_joins(root, codegen)
    clocks_path = next(root.rglob("gpu_clocks.csv"), None)
    samples = gpu_clocks.read(clocks_path) if clocks_path else []
    summary_log = next(root.rglob("summary.log"), None)
    head = summary_log.read_text().splitlines()[0] if summary_log else "(no summary.log)"
    card_note = "" if PREDICTED_FOR in head else (
        f"\nThe predictions were written for an {PREDICTED_FOR}; this card is not one (benchmarks/predictions.py "
        "says how an H200 should differ).\n")
    parts = [f"# gpu_check report\n\n{head}\n{card_note}",
             "## Predictions (benchmarks/predictions.py; reasoning in benchmarks/NOTES.md)\n",
             "Speed-up of a over b, measured in one run, with [lo, hi] at the two rows' opposite ends of their "
             "measured times; a prediction is met when the whole range lies inside it.\n",
             markdown_table(prediction_table(e2e, kernels, trainer, bandwidth_fractions(joins, copy), attention),
                            ["NOTES", "model", "what", "run", "predicted", "measured", "verdict", "why"])]
    decisions = decision_table(e2e, trainer, attention)
    parts += ["\n## Decisions (benchmarks/predictions.py DECISIONS): the defaults this run settles\n",
              "Speed-up of the candidate over what the code does now; a default changes only when the candidate's "
              "whole range is above 1.\n", markdown_table(decisions, list(decisions[0]))]
    spreads = spread_table(e2e)
    if spreads:
        parts += [f"\n## Round spreads (NOTES §6.2 predicted <= {ROUND_SPREAD_MAX:.0%})\n", markdown_table(
            spreads, list(spreads[0]))]
    if trainer:
        rows = trainer_table(trainer)
        parts += ["\n## Trainer runs\n", markdown_table(rows, list(rows[0]))]
    slow = slow_steps(e2e, samples)
    if slow:
        note = (f"{len(samples)} clock samples" if samples else "no gpu_clocks.csv: clocks unknown")
        parts += [f"\n## Slow steps (> {SLOW:.2f}x the row's median) and the card's clocks ({note})\n",
                  markdown_table(slow, list(slow[0]))]
    fallbacks = next(root.rglob("inductor_fallbacks.txt"), None)
    if fallbacks:
        head_lines = fallbacks.read_text().split("\nper graph", 1)[0].rstrip()
        parts += ["\n## What Inductor left to eager kernels (benchmarks/inductor_fallbacks.py)\n",
                  "\n".join(f"    {line}" for line in head_lines.splitlines()) + "\n"]
    parts.append(bandwidth_section(joins, codegen, copy))
    callers = sum_callers(root)
    if callers:
        parts += ["\n## Who called aten::sum (profiles' .callers.txt; NOTES §6.10: 84 per compiled ViT-B step on "
                  "2026-11-27, the last stage of Inductor's mix-order LayerNorm backwards)\n", callers]
    if summary_log:
        stages = [line for line in summary_log.read_text().splitlines() if " end " in line or " skip " in line]
        parts += ["\n## Stages (summary.log)\n", "\n".join(f"    {line}" for line in stages) + "\n"]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="gpu_check.tgz or the folder it unpacks to (or any folder holding its files)")
    p.add_argument("--out", default=None, help="also write the report here")
    p.add_argument("--codegen", default=None, help="inductor_cuda_codegen output for the run's torch (default: the "
                                                   "newest benchmarks/results/codegen-*/torch-<version>)")
    args = p.parse_args(argv)
    path = Path(args.path)
    if not path.exists():
        p.error(f"{path} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        if path.is_file():
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
            root = Path(tmp)
            summary = path.parent / "summary.log"  # gpu_check.sh writes it beside the tarball
            if summary.is_file():
                (root / "summary.log").write_text(summary.read_text())
        else:
            root = path
        text = report(root, Path(args.codegen) if args.codegen else None)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
