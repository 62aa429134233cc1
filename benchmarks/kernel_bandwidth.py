"""How fast a compiled step's generated kernels moved their bytes on a GPU: a profile's kernel times (e2e
--profile or the trainer's --profile_steps, on the card) set against Inductor's byte count for the same kernels
(benchmarks/inductor_cuda_codegen.py, generated on any machine for the same torch version, where each kernel
carries the same name: NOTES §6.8 checked the names against an H100 profile).

    python -m benchmarks.kernel_bandwidth --codegen <codegen dir>/ref-compiled \
        --profile <profiles>/mae_vit_base_patch16_dec512d8b-ref-compiled.kernel_times.json --copy-gbps 3000

A profile's `<tag>.kernel_times.json` lists every kernel; an older profile's `<tag>.top.txt` only its top 40
(names cut to 50 characters). A kernel matches by name and calls per step (a cut name: the one generated kernel
with that prefix and those calls); the rest are listed as unmatched. Per kernel and per category it prints
GB per step, ms per step and the rate, with `--copy-gbps` (the card's measured device-to-device copy rate) also
the fraction of it. A kernel near the copy rate can only get faster by moving fewer bytes (fusion); one far below
has headroom in the kernel itself.
Why: where the compiled step's memory-bound 30% goes, kernel by kernel (NOTES §6.9).
"""

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path


def load_bytes(variant_dir: Path) -> dict[str, dict]:
    """{kernel: {"calls", "bytes", "category"}} per step over a codegen variant's graphs (its kernels.json)."""
    merged: dict[str, dict] = {}
    for table in json.loads((Path(variant_dir) / "kernels.json").read_text()).values():
        for name, row in table.items():
            if name in merged:  # kernel names are unique per graph; two graphs may reuse one: add them up
                merged[name] = {"calls": merged[name]["calls"] + row["calls"], "category": row["category"],
                                "bytes": None if None in (merged[name]["bytes"], row["bytes"])
                                else merged[name]["bytes"] + row["bytes"]}
            else:
                merged[name] = dict(row)
    return merged


def to_ms(text: str) -> float:
    """A profiler table's time cell ("5.682ms", "13.452us") in milliseconds."""
    value, unit = re.fullmatch(r"([\d.]+)(ms|us|s)", text).groups()
    return float(value) * {"ms": 1.0, "us": 1e-3, "s": 1e3}[unit]


def top_table_kernels(top_txt: Path) -> list[dict]:
    """The Inductor kernels ("triton_" rows) of a profile's top-ops table (fastmae.profiling's <tag>.top.txt):
    one {"name" as printed, "calls", "ms" (self CUDA)} per kernel, over all the profiled steps. Each kernel has two
    rows there (its launch on the CPU, its run on the GPU) with the same calls and self CUDA time; the profiler
    cuts long names to 50 characters and '...', so two kernels can share one printed name."""
    rows: Counter = Counter()
    for line in Path(top_txt).read_text().splitlines():
        cells = line.split()
        if cells and cells[0].startswith("triton_") and cells[-1].isdigit():
            rows[(cells[0], int(cells[-1]), to_ms(cells[-5]))] += 1  # name, calls, self CUDA
    return [{"name": name, "calls": calls, "ms": ms} for (name, calls, ms), n in rows.items()
            for _ in range((n + 1) // 2)]


def load_times(profile: Path, steps: int) -> dict[str, dict]:
    """{kernel name as the profile gives it: {"calls", "ms"}} per step, from a kernel_times.json (full names,
    already per step) or from a top.txt table of `steps` steps (Inductor's kernels only; a cut name standing for
    several kernels appears once for each, as "<name>#<i>")."""
    profile = Path(profile)
    if profile.suffix == ".json":
        return {name: {"calls": row["calls"], "ms": row["us"] / 1e3}
                for name, row in json.loads(profile.read_text()).items()}
    found: dict[str, list] = defaultdict(list)
    for k in top_table_kernels(profile):
        found[k["name"]].append({"calls": k["calls"] / steps, "ms": k["ms"] / steps})
    return {(name if len(ts) == 1 else f"{name}#{i}"): t for name, ts in found.items() for i, t in enumerate(ts)}


def join(counted: dict[str, dict], times: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """One row per profiled kernel that the codegen has under the same name and with the same calls per step
    ("..."-cut names: the generated kernel with that prefix and those calls, if exactly one has them); and the
    profiled Inductor kernels that matched none (another graph, or another torch version)."""
    rows, unmatched = [], []
    for key, t in times.items():
        printed = key.split("#")[0]
        if printed.endswith("..."):
            candidates = [n for n in counted if n.startswith(printed[:-3])]
        else:
            candidates = [printed] if printed in counted else []
        names = [n for n in candidates if abs(counted[n]["calls"] - t["calls"]) < 1e-6]
        if len(names) != 1 or counted[names[0]]["bytes"] is None:
            if printed.startswith("triton_"):
                unmatched.append(printed)
            continue
        c = counted[names[0]]
        rows.append({"kernel": names[0], "category": c["category"], "calls": t["calls"], "gb": c["bytes"] / 1e9,
                     "ms": t["ms"], "gbps": c["bytes"] / 1e9 / (t["ms"] / 1e3) if t["ms"] > 0 else float("nan")})
    rows.sort(key=lambda r: -r["ms"])
    return rows, unmatched


def by_category(rows: list[dict]) -> dict[str, dict]:
    totals: dict[str, dict] = defaultdict(lambda: {"kernels": 0, "gb": 0.0, "ms": 0.0})
    for r in rows:
        t = totals[r["category"]]
        t["kernels"] += 1
        t["gb"] += r["gb"]
        t["ms"] += r["ms"]
    for t in totals.values():
        t["gbps"] = t["gb"] / (t["ms"] / 1e3) if t["ms"] > 0 else float("nan")
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]["ms"]))


def report(rows: list[dict], unmatched: list[str], copy_gbps: float | None, top: int = 40) -> str:
    def frac(gbps: float) -> str:
        return f" | {gbps / copy_gbps:.0%}" if copy_gbps else ""

    extra = " | of copy" if copy_gbps else ""
    rule = "|---|---:|---:|---:|---:|" + ("---:|" if copy_gbps else "")
    lines = ["| category | kernels | GB / step | ms / step | GB/s" + extra + " |", rule]
    for name, t in by_category(rows).items():
        lines.append(f"| {name} | {t['kernels']} | {t['gb']:.2f} | {t['ms']:.3f} | {t['gbps']:.0f}{frac(t['gbps'])} |")
    lines += ["", "| kernel | calls / step | GB / step | ms / step | GB/s" + extra + " |",
              "|---|---:|---:|---:|---:|" + ("---:|" if copy_gbps else "")]
    for r in rows[:top]:
        lines.append(f"| `{r['kernel']}` | {r['calls']:g} | {r['gb']:.3f} | {r['ms']:.3f} | {r['gbps']:.0f}"
                     f"{frac(r['gbps'])} |")
    if len(rows) > top:
        lines.append(f"| ({len(rows) - top} more kernels) | | | | |" + (" |" if copy_gbps else ""))
    if unmatched:
        lines += ["", f"Profiled Inductor kernels with no generated match ({len(unmatched)}; another torch version "
                      "or another graph?): " + ", ".join(f"`{n}`" for n in unmatched[:10])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codegen", required=True, help="a variant folder of inductor_cuda_codegen (has kernels.json)")
    p.add_argument("--profile", required=True, help="<tag>.kernel_times.json, or an older <tag>.top.txt")
    p.add_argument("--steps", type=int, default=3, help="profiled steps of a top.txt (e2e profiles 3)")
    p.add_argument("--copy-gbps", type=float, default=None, help="the card's measured copy rate, GB/s")
    p.add_argument("--out", default=None, help="also write the tables here")
    args = p.parse_args(argv)
    if args.steps < 1 or (args.copy_gbps is not None and args.copy_gbps <= 0):
        p.error("--steps must be >= 1 and --copy-gbps > 0")
    if not (Path(args.codegen) / "kernels.json").is_file():
        p.error(f"{args.codegen} has no kernels.json (run benchmarks/inductor_cuda_codegen.py)")
    if not Path(args.profile).is_file():
        p.error(f"{args.profile} is not a file")
    rows, unmatched = join(load_bytes(Path(args.codegen)), load_times(Path(args.profile), args.steps))
    if not rows:
        print(f"kernel_bandwidth: no profiled kernel of {args.profile} is among the generated ones", file=sys.stderr)
        return 1
    text = report(rows, unmatched, args.copy_gbps)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
