"""Host time per call of the eager step's fused block ops (add + LayerNorm, bias + GELU), forward + backward,
against torch's own ops: what an eager step pays on the CPU per call whether or not the GPU is busy.

On tiny tensors the GPU finishes each kernel before the host issues the next, so the wall time per call is
the host's. Three ways per op: torch's ops (the reference), the custom op (what torch.compile traces and the
eager path used until 2026-12-04) and the eager autograd.Function that calls the same launchers (the eager
default since). On a CPU the Triton launches are replaced by no-ops (the interpreter would time itself), so
the CPU numbers are the Python and dispatch cost alone; on CUDA the launches are real.

    python benchmarks/host_overhead.py --out benchmarks/results/host-overhead-cpu   # seconds
"""

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastmae_kernels.triton_ops is imported
import torch.nn.functional as F  # noqa: E402

import fastmae_kernels as fk  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _no_launches():
    """Replaces the fused ops' Triton kernels with no-ops for the block, then puts them back."""
    saved = []
    for module, names in (("add_layer_norm", ("_add_layer_norm_forward_kernel", "_add_layer_norm_backward_kernel")),
                          ("bias_gelu", ("_bias_gelu_forward_kernel", "_bias_gelu_backward_kernel"))):
        mod = importlib.import_module(f"fastmae_kernels.triton_ops.{module}")
        for name in names:
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, _NoLaunch())
    try:
        yield
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)


def _cases(device: torch.device, rows: int, dim: int):
    aln = importlib.import_module("fastmae_kernels.triton_ops.add_layer_norm")
    bg = importlib.import_module("fastmae_kernels.triton_ops.bias_gelu")
    g = torch.Generator().manual_seed(0)
    x, branch = (torch.randn(rows, dim, generator=g).to(device).requires_grad_() for _ in range(2))  # [rows, D]
    weight, bias = (torch.randn(dim, generator=g).to(device).requires_grad_() for _ in range(2))  # [D]

    def torch_norm():
        h = x + branch
        y = F.layer_norm(h, (dim,), weight, bias, 1e-6)
        return h.sum() + y.sum()

    def op_norm():
        h, y, _, _ = aln.add_layer_norm_op(x, branch, weight, bias, 1e-6, torch.float32)
        return h.sum() + y.sum()

    def eager_norm():
        h, y = fk.add_layer_norm(x, branch, weight, bias, 1e-6, torch.float32, backend="triton")
        return h.sum() + y.sum()

    def torch_gelu():
        return F.gelu(x + bias).sum()

    def op_gelu():
        return bg.bias_gelu_op(x, bias).sum()

    def eager_gelu():
        return fk.bias_gelu(x, bias, backend="triton").sum()

    def sums_only():  # what every case also does: the loss sums and their backward
        return x.sum() + branch.sum()

    return {
        "add_layer_norm": {"torch ops": torch_norm, "custom op": op_norm, "eager function": eager_norm},
        "bias_gelu": {"torch ops": torch_gelu, "custom op": op_gelu, "eager function": eager_gelu},
    }, sums_only


def _us_per_call(fn, device: torch.device, calls: int, repeats: int) -> float:
    """Median over `repeats` of the wall time of `calls` forward + backward calls, in microseconds per call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(max(10, calls // 10)):
        fn().backward()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn().backward()
        sync()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="folder for host_overhead.{json,md}")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases, sums_only = _cases(device, args.rows, args.dim)
    rows = []
    with _no_launches() if device.type == "cpu" else contextlib.nullcontext():
        base = _us_per_call(sums_only, device, args.calls, args.repeats)
        for op, ways in cases.items():
            for way, fn in ways.items():
                us = _us_per_call(fn, device, args.calls, args.repeats) - base
                rows.append({"op": op, "way": way, "host_us_per_fwd_bwd": round(us, 1)})
    for row in rows:
        ref = next(r for r in rows if r["op"] == row["op"] and r["way"] == "torch ops")
        row["minus_torch_us"] = round(row["host_us_per_fwd_bwd"] - ref["host_us_per_fwd_bwd"], 1)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "launches": "real" if device.type == "cuda" else "no-op (CPU: Python and dispatch cost only)",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": [args.rows, args.dim],
        "calls": args.calls,
        "repeats": args.repeats,
        "sums_only_us": round(base, 1),
        "rows": rows,
    }
    lines = [
        f"# Host time per fused block op call: {result['device']} ({result['date_utc']})",
        "",
        f"torch {result['torch']}, Python {result['python']}; launches: {result['launches']}; "
        f"[{args.rows}, {args.dim}] tensors; median of {args.repeats} x {args.calls} fwd+bwd calls, minus the "
        f"loss sums' own {base:.1f} us.",
        "",
        "| op | way | host us per fwd+bwd | minus torch ops |",
        "|---|---|---:|---:|",
    ] + [f"| {r['op']} | {r['way']} | {r['host_us_per_fwd_bwd']} | {r['minus_torch_us']:+} |" for r in rows]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "host_overhead.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
