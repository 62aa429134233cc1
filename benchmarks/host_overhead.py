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
import threading
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


def _launcher_cases(device: torch.device, rows: int, dim: int) -> dict:
    """The fused ops' launchers called directly, forward then backward, no autograd: the empties, the Python
    around the launch and the launches themselves; the gap to the "eager function" rows is autograd's."""
    aln = importlib.import_module("fastmae_kernels.triton_ops.add_layer_norm")
    bg = importlib.import_module("fastmae_kernels.triton_ops.bias_gelu")
    g = torch.Generator().manual_seed(1)
    x, branch = (torch.randn(rows, dim, generator=g).to(device) for _ in range(2))  # [rows, D]
    weight, bias = (torch.randn(dim, generator=g).to(device) for _ in range(2))  # [D]

    def norm():
        h, y, mean, rstd = aln._forward(x, branch, weight, bias, 1e-6, torch.float32)
        aln._backward_launch(y, h, h, weight, mean, rstd, torch.float32, torch.float32)

    def gelu():
        bg._backward_launch(bg._forward(x, bias), x, bias)

    return {"add_layer_norm": norm, "bias_gelu": gelu}


def _launch_cases(device: torch.device) -> dict:
    """One tiny kernel launched three ways (CUDA only): an aten op, a Triton JITFunction launch (argument binding,
    specialisation key, cache lookup, then the launch) and the CompiledKernel it returns launched directly. The
    difference between the last two is what skipping Triton's per-call binding would save (NOTES §7.2)."""
    common = importlib.import_module("fastmae_kernels.triton_ops._common")
    kernel = common._toolchain_copy_kernel
    src = torch.arange(5, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    cases = {
        "aten op (torch.add, out=)": lambda: torch.add(src, 1.0, out=dst),
        "triton JITFunction launch": lambda: kernel[(1,)](src, dst, 5, BLOCK=8),
    }
    try:  # CompiledKernel's runner takes every argument, constexprs included (Triton 3.3+)
        runner = kernel[(1,)](src, dst, 5, BLOCK=8)[(1, 1, 1)]
        dst.zero_()
        runner(src, dst, 5, 8)
        if torch.equal(dst, src + 1):
            cases["triton CompiledKernel launch"] = lambda: runner(src, dst, 5, 8)
    except Exception as error:  # noqa: BLE001 - an API this Triton lacks: leave the row out, say why
        print(f"host_overhead: no direct CompiledKernel launch on this Triton ({error!r})", file=sys.stderr)
    return cases


class _Double(torch.autograd.Function):
    """x * 2 as a Python autograd node: what any Python Function costs, kernels aside."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def _node_cases(device: torch.device) -> dict:
    """x * 2 then its backward, as a torch op and as a Python autograd.Function (CUDA only, NOTES §7.3)."""
    x = torch.randn(64, 64, device=device, requires_grad=True)
    return {"torch op (x * 2)": lambda: (x * 2).sum(), "python Function (x * 2)": lambda: _Double.apply(x).sum()}


def _on_another_thread(measure):
    """measure() run on a new Python thread (the main one waits on it); its result."""
    result = []
    worker = threading.Thread(target=lambda: result.append(measure()))
    worker.start()
    worker.join()
    return result[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _us_per_call(fn, device: torch.device, calls: int, repeats: int, backward: bool = True,
                 worker_thread: bool = True) -> float:
    """Median over `repeats` of the wall time of `calls` calls (each forward + backward unless not `backward`),
    in microseconds per call. `worker_thread=False`: each backward on this thread, not autograd's CUDA worker."""
    def call():
        out = fn()
        if backward:
            with torch.autograd.set_multithreading_enabled(worker_thread):
                out.backward()

    for _ in range(max(10, calls // 10)):
        call()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        _sync(device)
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
        base_caller = _us_per_call(sums_only, device, args.calls, args.repeats, worker_thread=False)
        for op, ways in cases.items():
            for way, fn in ways.items():
                us = _us_per_call(fn, device, args.calls, args.repeats) - base
                rows.append({"op": op, "way": way, "host_us_per_fwd_bwd": round(us, 1)})
                if device.type == "cuda":  # on a CPU the backward runs on the calling thread anyway
                    us = _us_per_call(fn, device, args.calls, args.repeats, worker_thread=False) - base_caller
                    rows.append({"op": op, "way": f"{way}, backward on caller's thread",
                                 "host_us_per_fwd_bwd": round(us, 1)})
        for op, fn in _launcher_cases(device, args.rows, args.dim).items():
            us = _us_per_call(fn, device, args.calls, args.repeats, backward=False)
            rows.append({"op": op, "way": "launchers only (no autograd)", "host_us_per_fwd_bwd": round(us, 1)})
            # autograd runs CUDA backwards on a thread of its own: do the launchers cost more off the main thread?
            us = _on_another_thread(lambda: _us_per_call(fn, device, args.calls, args.repeats, backward=False))
            rows.append({"op": op, "way": "launchers only, on a second thread", "host_us_per_fwd_bwd": round(us, 1)})
    for row in rows:
        ref = next(r for r in rows if r["op"] == row["op"] and r["way"] == "torch ops")
        row["minus_torch_us"] = round(row["host_us_per_fwd_bwd"] - ref["host_us_per_fwd_bwd"], 1)
    launches, nodes = [], []
    if device.type == "cuda":
        for way, fn in _launch_cases(device).items():
            launches.append({"way": way, "host_us_per_launch": round(
                _us_per_call(fn, device, args.calls, args.repeats, backward=False), 1)})
        for way, fn in _node_cases(device).items():
            for worker in (True, False):
                us = _us_per_call(fn, device, args.calls, args.repeats, worker_thread=worker)
                nodes.append({"way": way, "backward_on": "autograd's CUDA worker" if worker else "caller's thread",
                              "host_us_per_fwd_bwd": round(us, 1)})
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
        "sums_only_caller_thread_us": round(base_caller, 1),
        "rows": rows,
        "launch_ways": launches,
        "autograd_nodes": nodes,
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
    if launches:
        lines += ["", "One tiny kernel per call, no autograd (wall time per launch: the GPU idles between them):", "",
                  "| launch | host us per launch |", "|---|---:|"]
        lines += [f"| {r['way']} | {r['host_us_per_launch']} |" for r in launches]
    if nodes:
        lines += ["", "x * 2 on a [64, 64] tensor, then .sum() and its backward (the sums not subtracted):", "",
                  "| node | backward on | host us per fwd+bwd |", "|---|---|---:|"]
        lines += [f"| {r['way']} | {r['backward_on']} | {r['host_us_per_fwd_bwd']} |" for r in nodes]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "host_overhead.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
