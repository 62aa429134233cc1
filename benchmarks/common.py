"""Shared benchmark utilities: environment record, timing, FLOP counting, peak memory, result writers.

Every result row a benchmark writes should carry `environment()` (card, versions, date, git commit), so a
number is never separated from where and when it was measured.
"""

import csv
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils import flop_counter

from fastmae.profiling import allocator_events, allocator_events_since

REPO = Path(__file__).resolve().parents[1]


def _version(distribution: str) -> str | None:
    """Installed version without importing (importing deepspeed alone takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """The HEAD commit, "+dirty" when tracked code differs from it; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        code = ["fastmae", "kernels", "benchmarks"]  # the code a benchmark runs; other folders do not count
        diff = ["git", "diff", "--quiet", "HEAD", "--", *code]
        dirty = subprocess.run(diff, cwd=REPO, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{os.cpu_count()} ({torch.backends.cpu.get_cpu_capability()})"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Where a measurement was taken: card, software versions, UTC date and git commit."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "deepspeed": _version("deepspeed"),
        "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "host": platform.node(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device | str, warmup: int, iters: int) -> dict[str, Any]:
    """Runs `step` warmup times, then times `iters` calls; seconds per call (median, mean, p20, p80, and every
    call's in order as `times_s` from `started_unix_s`, so slow calls show where and when they fall), and on
    CUDA the caching allocator's events during the timed calls (`allocator_events`).

    On CUDA each call is bracketed by events and the host synchronises once, after the loop, so the GPU
    queue never drains between steps (no .item() or synchronize inside the timed loop). On CPU each call
    is timed with perf_counter (CPU ops are synchronous). The first warmup call is reported separately
    (`first_call_s`): it holds compilation / autotuning / CUDA-graph capture.
    """
    device = torch.device(device)
    if iters < 1 or warmup < 1:
        raise ValueError(f"need warmup >= 1 and iters >= 1, got warmup={warmup}, iters={iters}")
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    started = time.time()  # wall clock, to set the calls against other logs (e.g. sampled GPU clocks)
    events_before = allocator_events(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record()
        for i in range(iters):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        times = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(iters)]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    events = allocator_events_since(events_before, device)
    # inclusive: p20/p80 stay within the measured calls (the default, exclusive, extrapolates past them at small n)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "p20_s": q[0],
        "p80_s": q[3],
        "first_call_s": first,
        "iters": iters,
        "times_s": times,
        "started_unix_s": started,
        "allocator_events": events,  # what the timed calls made the allocator do (None off CUDA)
    }


# FlopCounterMode has formulas for the CUDA attention kernels only; on CPU SDPA runs its own flash op,
# which would otherwise count 0 FLOPs. Same formula (4*B*H*N*N*hd forward, 2.5x that backward).
def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


class FlopCount(NamedTuple):
    total: int
    per_op: dict[str, int]  # aten op -> FLOPs
    per_module: dict[str, int]  # module path ("Model.blocks.0.attn") -> FLOPs inside it


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """FLOPs torch.utils.flop_counter counts while `fn` runs (matmuls, convolutions, attention; elementwise
    ops count 0, as in every MFU convention)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    counts = counter.get_flop_counts()
    per_op = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    per_module = {name: int(sum(ops.values())) for name, ops in counts.items() if name != "Global"}
    return FlopCount(int(counter.get_total_flops()), per_op, per_module)


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs a forward: the activation
    memory a training step holds at its peak (before backward frees it), on any device. `exclude`
    (the parameters) is not counted: weights are there anyway. Autocast's bf16 weight copies are counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def matmul_peak_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, size: int = 8192) -> float:
    """The card's measured dense matmul rate (TFLOP/s) for `dtype`: the denominator of MFU here."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 3
    timing = time_steps(lambda: torch.mm(a, b), device, warmup=3, iters=iters)
    return 2 * size**3 / timing["median_s"] / 1e12


class PeakMemory:
    """Peak memory over a `with` block: CUDA allocator peak (bytes) on GPU. On CPU torch keeps no allocator
    statistics, so it reports the process's peak RSS, which only ever grows (an upper bound, labelled)."""

    def __init__(self, device: torch.device | str, above_current: bool = False):
        """`above_current`: on CUDA count only what the block adds over what is allocated when it starts
        (other models kept alive beside it are not its memory)."""
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.above_current = above_current and self.device.type == "cuda"
        self.base = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_process_peak_rss"
        if self.above_current:
            self.kind += "_above_live_models"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) if self.above_current else 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def write_json(payload: Any, path: Path | str) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_csv(rows: Sequence[dict[str, Any]], path: Path | str, env: dict[str, Any] | None = None) -> None:
    """One line per row; the environment's fields are repeated on every line so each row stands alone."""
    rows = [{**row, **(env or {})} for row in rows]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def speedup_range(time_range: tuple[float, float] | None, base_range: tuple[float, float] | None):
    """[lo, hi] of base time / time when each of the two was measured anywhere in its (low, high) range, e.g. its
    steps' p20 and p80: the speed-up at the two measurements' opposite ends. None if either range is missing."""
    if not time_range or not base_range:
        return None
    return [base_range[0] / time_range[1], base_range[1] / time_range[0]]


def format_speedup(value: float | None, rng: list[float] | None, digits: int = 3, ratio: bool = True) -> str | None:
    """`1.107 [1.106, 1.109]`; for a ratio, a range that contains 1 is flagged `(no difference)`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not rng or any(math.isnan(x) for x in rng):
        return f"{value:.{digits}f}"
    flag = " (no difference)" if ratio and rng[0] <= 1 <= rng[1] else ""
    return f"{value:.{digits}f} [{rng[0]:.{digits}f}, {rng[1]:.{digits}f}]{flag}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_chart(
    groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str, title: str, path: Path | str
) -> None:
    """Grouped bars: one group per x label (e.g. model), one bar per series (e.g. variant); None = no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
