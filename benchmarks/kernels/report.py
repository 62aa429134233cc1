"""Writes the kernel benchmark's rows as CSV, a markdown table and a PNG, all under one file stem."""

import csv
import math
from pathlib import Path

from benchmarks.common import format_speedup, speedup_range

TARGET_SHAPE = "ViT-B/16"


def _speedups(rows: list[dict]) -> None:
    """x_vs_compile / x_vs_eager: the baseline's median ms over the row's; `<col>_range` the same at the two
    rows' opposite ends of their p20-p80 (a range that contains 1 is no measured difference)."""
    by_key = {(r["shape"], r["op"], r["mode"], r["impl"]): r for r in rows}
    for r in rows:
        for base, col in (("torch.compile", "x_vs_compile"), ("torch eager", "x_vs_eager")):
            ref = by_key.get((r["shape"], r["op"], r["mode"], base))
            if ref and ref["ms"] and r["ms"] and not math.isnan(ref["ms"]) and not math.isnan(r["ms"]):
                r[col] = ref["ms"] / r["ms"]
                r[f"{col}_range"] = speedup_range((r["ms_p20"], r["ms_p80"]), (ref["ms_p20"], ref["ms_p80"]))
            else:
                r[col] = r[f"{col}_range"] = None


def _fmt(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _targets(rows: list[dict]) -> list[str]:
    """The issue's H100 targets, checked against what was measured here (only meaningful on that card)."""
    get = {(r["shape"], r["op"], r["mode"], r["impl"]): r for r in rows}
    lines = []
    three = get.get((TARGET_SHAPE, "three_ops", "fwd+bwd", "triton"))
    if three:
        lines.append(f"- three ops fwd+bwd at {TARGET_SHAPE}: {_fmt(three['ms'], '.3f')} ms (target <= 0.3 ms), "
                     f"{_fmt(three['x_vs_compile'], '.2f')}x torch.compile (target >= 4x)")
    for op in ("gather_patches", "gather_tokens"):
        row = get.get((TARGET_SHAPE, op, "fwd", "triton"))
        if row and row["frac_copy_bw"] is not None:
            lines.append(f"- {op} fwd at {TARGET_SHAPE}: {row['frac_copy_bw']:.0%} of copy bandwidth (target >= 70%)")
    return lines


def _markdown(rows: list[dict], env: dict, copy_gbs: float) -> str:
    head = [
        "# fastmae_kernels benchmark", "",
        f"**{env['run_kind']}** — card: {env['card']}; "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"{env['date_utc']} UTC; commit {env['commit']}", "",
        f"Measured copy bandwidth: {copy_gbs:.0f} GB/s. GB/s counts the bytes each op must move at minimum "
        "(see benchmarks/kernels/cases.py); ms is the median (do_bench on CUDA). `x vs compile` / `x vs eager`: "
        "the baseline's median over the row's, with [lo, hi] at the two rows' opposite ends of their p20-p80 "
        "(a range that contains 1 is no measured difference).", "",
    ]
    if "SMOKE" in env["run_kind"]:
        head += ["> CPU smoke run: Triton runs in its interpreter. These numbers only show the benchmark works; "
                 "they are not kernel speed.", ""]
    else:
        head += ["## Targets (H100)", "", *_targets(rows), ""]
    if any("graph_ms" in r for r in rows):
        head += ["`graph ms`: the same call captured in a CUDA graph and replayed (device time without host launch "
                 "cost, as in a compiled, graphed step); `graph GB/s` and `graph % copy BW` use it.", ""]
    table = ["| shape | op | mode | impl | ms | GB/s | % copy BW | graph ms | graph % copy BW | x vs compile "
             "| x vs eager | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        frac = None if r["frac_copy_bw"] is None else 100 * r["frac_copy_bw"]
        graph = r.get("graph_ms")
        graph_frac = None
        if graph and not math.isnan(graph) and r["frac_copy_bw"] is not None:
            graph_frac = 100 * r["frac_copy_bw"] * r["ms"] / graph
        note = "; ".join(x for x in (r["error"], r.get("graph_error", "")) if x)
        table.append(
            f"| {r['shape']} | {r['op']} | {r['mode']} | {r['impl']} | {_fmt(r['ms'], '.3f')} "
            f"| {_fmt(r['GB/s'], '.0f')} | {_fmt(frac, '.0f')} | {_fmt(graph, '.3f')} | {_fmt(graph_frac, '.0f')} "
            f"| {format_speedup(r['x_vs_compile'], r['x_vs_compile_range'], 2) or ''} "
            f"| {format_speedup(r['x_vs_eager'], r['x_vs_eager_range'], 2) or ''} | {note} |"
        )
    return "\n".join(head + table) + "\n"


def _plot(rows: list[dict], path: Path, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(8, 6 * len(shapes)), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ms = []
            for op in ops:  # fwd+bwd where there is a backward, else fwd
                pick = [r for r in rows if r["shape"] == shape and r["op"] == op and r["impl"] == impl]
                best = next((r for r in pick if r["mode"] == "fwd+bwd"), pick[0] if pick else None)
                ms.append(best["ms"] if best else float("nan"))
            ax.bar([k + i * width for k in range(len(ops))], ms, width, label=impl)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(ops))], ops, rotation=30, ha="right")
        ax.set_ylabel("ms (fwd+bwd; random_masking fwd)")
        ax.set_title(shape)
        ax.legend()
    title = f"fastmae_kernels — {env['card']} — {env['date_utc']} — {env['commit']}"
    if "SMOKE" in env["run_kind"]:
        title += "\nCPU SMOKE: Triton interpreter, not a speed claim"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], out_dir: str, env: dict, copy_gbs: float, smoke: bool) -> Path:
    _speedups(rows)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    card = env["card"].replace(" ", "_").replace("/", "_")
    stem = folder / (f"kernels_{card}" + ("_cpu_smoke" if "SMOKE" in env["run_kind"] else ""))
    with open(f"{stem}.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{stem}.md").write_text(_markdown(rows, env, copy_gbs))
    _plot(rows, Path(f"{stem}.png"), env)
    return stem
