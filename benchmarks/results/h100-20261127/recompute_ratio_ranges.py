"""The ratios of this run with the range their step times allow (benchmarks/e2e.py's `ratios`, added on
2026-11-28): each variant ran once, 10 timed steps, and its row keeps the steps' p20 and p80 besides the
median. The ratio's range is the ratio at the two variants' opposite ends (slowest fastmae step over fastest
reference step, and the reverse); one that contains 1 is no measured difference.

    python benchmarks/results/h100-20261127/recompute_ratio_ranges.py \
        > benchmarks/results/h100-20261127/ratio_ranges.txt
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, for benchmarks.e2e

from benchmarks import e2e  # noqa: E402


def main() -> None:
    rows = [r for model in "BLH" for r in json.loads((HERE / f"e2e_{model}" / "e2e.json").read_text())["rows"]]
    print("step time per variant, ms: p20 / median / p80, and (p80 - p20) / median\n")
    for r in rows:
        spread = (r["step_ms_p80"] - r["step_ms_p20"]) / r["step_ms"]
        print(f"  {r['model']} {r['variant']:16s} {r['step_ms_p20']:7.2f} / {r['step_ms']:7.2f} / "
              f"{r['step_ms_p80']:7.2f}   {spread:6.1%}")
    print("\nfastmae / reference images/s (median), [range]:\n")
    print(e2e.ratio_table(e2e.ratios(rows)))


if __name__ == "__main__":
    main()
