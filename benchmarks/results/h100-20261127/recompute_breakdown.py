"""Recomputes the ViT-B step breakdown of this run without the profiler artifact of the first analysis.

The profiling code of commit 3eafa47 summed every CUDA-side event, and that includes the GPU range of
"Optimizer.step#AdamW.step" (a user annotation whose "time" is its span, gaps included) on top of the
optimizer's own kernels. torch's own "Self CUDA time total" (the last line of each *.top.txt) leaves user
annotations out. So here: counted = torch total + annotation; ms per kind = share x counted / steps, and the
optimizer's kernels = its ms minus the annotation. The kinds then add up to torch's total exactly.

    python benchmarks/results/h100-20261127/recompute_breakdown.py
"""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for benchmarks.*

from benchmarks.kernel_bandwidth import to_ms as ms  # noqa: E402  (a profiler table's time cell, in ms)

HERE = Path(__file__).parent / "e2e_B" / "profiles"
STEPS = 3  # profiled steps per variant
STEP_MS = {r["variant"]: r["step_ms"] for r in json.loads((HERE.parent / "e2e.json").read_text())["rows"]}


def breakdown() -> tuple[list[str], list[tuple]]:
    """The kinds in order of first appearance, and per variant (variant, kernel ms, optimizer span ms,
    {kind: ms per step})."""
    kinds, rows = [], []
    for path in sorted(HERE.glob("*.top.txt")):
        variant = path.name.split("-", 1)[1].removesuffix(".top.txt")
        text = path.read_text()
        total = ms(re.search(r"Self CUDA time total: (\S+)", text).group(1))
        line = next(l for l in text.splitlines() if "Optimizer.step#AdamW.step" in l)
        annotation = ms(re.findall(r"[\d.]+(?:ms|us|s)\b", line)[3])  # Self CPU, CPU total, CPU avg, Self CUDA
        shares = json.loads(path.with_name(path.name.replace(".top.txt", ".categories.json")).read_text())
        counted = total + annotation
        per_kind = {k: v * counted / STEPS for k, v in shares.items()}
        per_kind["optimizer"] -= annotation / STEPS
        kinds += [k for k in per_kind if k not in kinds]
        rows.append((variant, total / STEPS, annotation / STEPS, per_kind))
    return kinds, rows


def main() -> None:
    kinds, rows = breakdown()
    print("| variant | step ms | kernel ms | busy | optimizer span | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * (4 + len(kinds)))
    for variant, kernel, span, per_kind in rows:
        cells = " | ".join(f"{per_kind.get(k, 0.0):.2f}" for k in kinds)
        assert abs(sum(per_kind.values()) - kernel) < 1e-6 * kernel  # the kinds add up to torch's total
        print(f"| {variant} | {STEP_MS[variant]:.2f} | {kernel:.2f} | {kernel / STEP_MS[variant]:.0%} | {span:.2f} | {cells} |")


if __name__ == "__main__":
    main()
