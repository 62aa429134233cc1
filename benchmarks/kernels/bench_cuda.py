"""Kernel benchmark of the CUDA C++ backend (fastmae_kernels._C) beside torch eager and Triton.

    python -m benchmarks.kernels.bench_cuda                      # ViT-B/L/H shapes, needs a CUDA GPU
    python -m benchmarks.kernels.bench_cuda --shapes ViT-B/16 --out benchmarks/kernels/results_cuda

The same cases, byte counts, timing (triton.testing.do_bench, median and p20/p80), copy-bandwidth fraction
and report (CSV + markdown + PNG, card/versions/date/commit on every row) as benchmarks.kernels.run, so the
numbers of the two entries can be read together; only the implementations differ (no torch.compile here).
Without a CUDA GPU, or when the cuda backend cannot run on it, it says why and measures nothing.
"""

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="all", help="comma list of shape names, e.g. ViT-B/16 (default: all)")
    parser.add_argument("--out", default="benchmarks/kernels/results_cuda", help="output folder")
    args = parser.parse_args(argv)

    from fastmae_kernels.dispatch import unavailable_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = unavailable_reason("cuda", device)
    if reason is not None:
        print(f"bench_cuda: nothing measured: the cuda backend cannot run on {device}: {reason}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from benchmarks.kernels import report
    from benchmarks.kernels.cases import GPU_SHAPES, implementations
    from benchmarks.kernels.run import RUNS_PER_SHAPE, _rows_for_shape
    from benchmarks.kernels.timing import copy_bandwidth, environment

    shapes = GPU_SHAPES if args.shapes == "all" else [s for s in GPU_SHAPES if s.name in args.shapes.split(",")]
    impls = implementations(device, compile_reference=False)  # torch eager, triton (if it runs), cuda
    env = environment(device, smoke=False)
    copy_gbs = copy_bandwidth(device, smoke=False)
    rows = []
    with tqdm(total=RUNS_PER_SHAPE * len(impls) * len(shapes), desc="cuda kernel benchmark", unit="run") as bar:
        for shape in shapes:
            rows += _rows_for_shape(shape, device, impls, env, copy_gbs, False, bar)
    out = report.write(rows, args.out, env, copy_gbs, smoke=False)
    print(f"wrote {out}.csv / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
