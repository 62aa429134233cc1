"""How fast the compiled reference's Inductor kernels moved their bytes in this run (ViT-B b256, H100), read
afterwards: the profile's kernel time per category and per named kernel (recompute_breakdown.py, the top-40
table) against Inductor's byte count of the same kernels, generated on a CPU for this run's torch 2.11
(benchmarks/results/codegen-cpu-20261128/torch-2.11/ref-compiled/kernels.json; NOTES §6.8 checked that the
names and calls per step are this run's). The copy rate is the one this run's kernel benchmark measured (1 GiB
device copy). Output: bandwidth.txt beside this file.

    python benchmarks/results/h100-20261127/recompute_bandwidth.py            # prints it, writes bandwidth.txt
    python benchmarks/results/h100-20261127/recompute_bandwidth.py --check    # exit 1 if bandwidth.txt differs
"""

import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from benchmarks import kernel_bandwidth  # noqa: E402
from recompute_breakdown import breakdown  # noqa: E402

VARIANT = "ref-compiled"
CODEGEN = ROOT / "benchmarks/results/codegen-cpu-20261128/torch-2.11" / VARIANT
TOP = HERE / "e2e_B/profiles" / f"mae_vit_base_patch16_dec512d8b-{VARIANT}.top.txt"
COPY_GBPS = 3000.0  # kernels/kernels_NVIDIA_H100_80GB_HBM3.md: "Measured copy bandwidth: 3000 GB/s"
STEPS = 3


def not_generated_ms() -> dict[str, float]:
    """Kernel time per step inside a category that is not Inductor's own kernels: the 84 eager sums per step that
    finish its mix-order LayerNorm backwards (NOTES §6.10), the top table's `at::native::reduce_kernel` row."""
    line = next(row for row in TOP.read_text().splitlines() if "at::native::reduce_kernel" in row)
    self_cuda = line.split()[-5]  # Self CUDA, as kernel_bandwidth.top_table_kernels reads it
    return {"reduction": kernel_bandwidth.to_ms(self_cuda) / STEPS}


def table() -> str:
    _, rows = breakdown()
    per_kind = next(r[3] for r in rows if r[0] == VARIANT)
    counted = kernel_bandwidth.load_bytes(CODEGEN)
    gb = defaultdict(float)
    for row in counted.values():
        gb[row["category"]] += row["bytes"] / 1e9
    not_generated = not_generated_ms()
    lines = [f"# {VARIANT}, ViT-B/16 b256, H100 80GB HBM3, torch 2.11 (2026-11-27): Inductor's bytes (generated on a "
             f"CPU) against the profile's kernel time, per step; copy rate {COPY_GBPS:.0f} GB/s", "",
             "## By category (all of its generated kernels; its time less the kernels that are not Inductor's)", "",
             "| category | Inductor GB / step | kernel ms / step | not Inductor's ms | GB/s | of copy |",
             "|---|---:|---:|---:|---:|---:|"]
    total_gb = total_ms = 0.0
    for kind in sorted(gb, key=lambda k: -gb[k]):
        ms, other = per_kind.get(kind, 0.0), not_generated.get(kind, 0.0)
        if kind == "other":  # cuDNN's own conversion kernels and the like, beside 0.08 GB of Inductor's
            lines.append(f"| {kind} | {gb[kind]:.2f} | {ms:.2f} | (mostly) | - | - |")
            continue
        rate = gb[kind] / ((ms - other) / 1e3)
        total_gb, total_ms = total_gb + gb[kind], total_ms + ms - other
        lines.append(f"| {kind} | {gb[kind]:.2f} | {ms:.2f} | {other:.2f} | {rate:.0f} | {rate / COPY_GBPS:.0%} |")
    rate = total_gb / (total_ms / 1e3)
    lines += [f"| together | {total_gb:.2f} | {total_ms:.2f} | | {rate:.0f} | {rate / COPY_GBPS:.0%} |", "",
              "## The Inductor kernels the top-40 table names (exact rates)", ""]
    joined, unmatched = kernel_bandwidth.join(counted, kernel_bandwidth.load_times(TOP, STEPS))
    lines.append(kernel_bandwidth.report(joined, unmatched, COPY_GBPS).split("\n\n", 1)[1])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = table()
    if "--check" in argv:  # the committed file is what the committed profiles and codegen give
        return 0 if (HERE / "bandwidth.txt").read_text() == text else 1
    (HERE / "bandwidth.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
