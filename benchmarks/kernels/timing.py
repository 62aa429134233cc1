"""Timing, copy bandwidth and the environment record for the kernel benchmark."""

import contextlib
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
_compiled: dict = {}


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "kernels"], cwd=REPO).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()[:12] + ("+dirty-kernels" if dirty else "")


def environment(device: torch.device, smoke: bool) -> dict:
    """Card, versions, date and commit: carried by every result row."""
    import triton

    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU {platform.machine()} x{os.cpu_count()}"
    return {
        "card": card,
        "run_kind": "CPU SMOKE (Triton interpreter, not a speed claim)" if smoke and device.type != "cuda"
        else ("smoke shapes" if smoke else "benchmark"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda or "none",
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": _git_commit(),
    }


def _time(fn, device: torch.device, smoke: bool) -> dict:
    """Median / 20th / 80th percentile milliseconds; on CUDA via triton.testing.do_bench (L2 flushed
    between calls, no host sync inside the timed region)."""
    if device.type == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "ms_p20": low, "ms_p80": high}
    fn()  # warm-up (first interpreter call)
    times = []
    for _ in range(1 if smoke else 10):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "ms_p20": min(times), "ms_p80": max(times)}


def _graph_time(fn) -> dict:
    """The same call captured in a CUDA graph and replayed: device time without the host's launch cost
    (dispatch, checks, Triton's launcher), which is what a compiled, graphed training step pays. A call that
    cannot be captured gets NaN and the reason, not a crash."""
    import triton.testing

    try:
        median, low, high = triton.testing.do_bench_cudagraph(fn, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"graph_ms": median, "graph_ms_p20": low, "graph_ms_p80": high, "graph_error": ""}
    except Exception as exc:  # noqa: BLE001
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        nan = float("nan")
        return {"graph_ms": nan, "graph_ms_p20": nan, "graph_ms_p80": nan,
                "graph_error": f"{type(exc).__name__}: {exc}"[:120]}


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """The card's measured device-to-device copy bandwidth, GB/s (read + write bytes / time)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB on GPU; 16 MiB CPU smoke
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), device, smoke=False)["ms"]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _callable(case, impl):
    if not impl.compiled:
        return lambda x: case.call(x, impl)
    from benchmarks.kernels.cases import EAGER

    key = (case.op, id(case.inputs))
    if key not in _compiled:  # the whole case is one compiled region: the reference's best case
        _compiled[key] = torch.compile(lambda x: case.call(x, EAGER), dynamic=False)
    return _compiled[key]


def measure(case, impl, mode: str, smoke: bool) -> dict:
    """Times one (case, implementation, mode); a failure becomes a row with its error, not a crash."""
    device = next(t.device for t in case.inputs.values())
    inputs = dict(case.inputs)
    leaves = []
    for name in case.grad_names:
        inputs[name] = inputs[name].detach().requires_grad_(True)
        leaves.append(inputs[name])
    fn = _callable(case, impl)
    try:
        outputs = [o for o in fn(inputs) if o.requires_grad]
        grads = [torch.randn_like(o) for o in outputs]

        def forward():
            return fn(inputs)

        def backward():
            torch.autograd.grad(outputs, leaves, grads, retain_graph=True)

        def both():
            outs = [o for o in fn(inputs) if o.requires_grad]
            torch.autograd.grad(outs, leaves, grads)

        run = {"fwd": forward, "bwd": backward, "fwd+bwd": both}[mode]
        result = _time(run, device, smoke)
        if device.type == "cuda":
            result.update(_graph_time(run))
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            result["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        result["error"] = ""
        return result
    except Exception as exc:  # noqa: BLE001  (reported in the results, e.g. a compile failure)
        nan = float("nan")
        return {"ms": nan, "ms_p20": nan, "ms_p80": nan, "error": f"{type(exc).__name__}: {exc}"[:200]}
