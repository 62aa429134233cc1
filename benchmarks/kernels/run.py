"""Kernel benchmark: each MAE op and the three fused ops together, forward / backward / both, for torch
eager, torch.compile of the reference, and the fused backends; ms, GB/s and the fraction of the card's
measured copy bandwidth. Writes CSV + markdown + PNG with card, versions, date and commit on every row.

    python -m benchmarks.kernels.run                    # CUDA: ViT-B/L/H shapes
    python -m benchmarks.kernels.run --smoke            # tiny shapes (the default without CUDA)

Without CUDA it runs a CPU smoke mode (Triton in its interpreter): it checks the benchmark works, and
its numbers are labelled as such; they say nothing about kernel speed.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():  # Triton reads this when the kernels are defined: before fastmae_kernels.triton_ops
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.kernels import report  # noqa: E402
from benchmarks.kernels.cases import GPU_SHAPES, SMOKE_SHAPES, implementations, make_cases, make_inputs  # noqa: E402
from benchmarks.kernels.timing import copy_bandwidth, environment, measure  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
RUNS_PER_SHAPE = 1 + 7 * len(MODES)  # random_masking: forward only


def _rows_for_shape(shape, device, impls, env, copy_gbs, smoke, progress, on_case=None):
    """Every (case, implementation, mode) of one shape; `on_case(rows so far)` runs after each case."""
    inputs = make_inputs(shape, device)
    rows = []
    for case in make_cases(shape, inputs):
        modes = MODES if case.bytes_bwd else ("fwd",)
        for impl in impls:
            for mode in modes:
                timing = measure(case, impl, mode, smoke=smoke)
                moved = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd, "fwd+bwd": case.bytes_fwd + case.bytes_bwd}[mode]
                gbs = moved / (timing["ms"] * 1e-3) / 1e9
                rows.append({
                    **env, "shape": shape.name, "batch": shape.batch, "op": case.op, "mode": mode, "impl": impl.name,
                    **timing, "bytes": moved, "GB/s": gbs, "frac_copy_bw": gbs / copy_gbs if copy_gbs else None,
                })
                progress.update(1)
        if on_case is not None:
            on_case(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (always on without CUDA)")
    parser.add_argument("--shapes", default="all", help="comma list of shape names, e.g. ViT-B/16 (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--out", default="benchmarks/kernels/results", help="output folder")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    if args.shapes != "all":
        shapes = [s for s in shapes if s.name in args.shapes.split(",")]
    # CPU smoke skips torch.compile: minutes of C++ compilation on a small CPU to time microseconds.
    impls = implementations(device, compile_reference=not args.no_compile and device.type == "cuda")
    env = environment(device, smoke)
    copy_gbs = copy_bandwidth(device, smoke)
    total = RUNS_PER_SHAPE * len(impls) * len(shapes)
    rows = []

    def write_so_far(partial):  # a run cut short (a device lease) keeps what it measured
        report.write(rows + partial, args.out, env, copy_gbs, smoke)

    with tqdm(total=total, desc="kernel benchmark", unit="run") as progress:
        for shape in shapes:
            rows += _rows_for_shape(shape, device, impls, env, copy_gbs, smoke, progress, on_case=write_so_far)
    out = report.write(rows, args.out, env, copy_gbs, smoke)
    print(f"wrote {out}.csv / .md / .png")


if __name__ == "__main__":
    main()
