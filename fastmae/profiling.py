"""Where a training step's device time goes: torch.profiler over a few steps, kernels grouped by kind
(matmul, attention, LayerNorm, GELU, optimizer, ...), so each optimisation starts from a measured share.
Used by benchmarks/e2e.py (`profile_step`, a step closure) and by the trainer (`--profile_steps`, which
drives its own profiler and calls `summarize`). `WrittenBytes` counts bytes written per aten op instead of
time: device-independent, so it runs on a CPU (or on meta tensors) where no profile of a GPU step can."""

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# First match wins; names are lower-cased kernel / op names (cuBLAS, cuDNN, flash, Triton "fused_*" names, and
# fastmae_kernels' own: the fused add + LayerNorm and bias + GELU kernels land with the work they replace, the MAE
# ops' row copies with masking/gather/copy and the norm-pix loss with the reductions; Inductor's Triton GEMM
# templates ("triton_tem_*", max-autotune) are matmuls whatever they fused; tests/test_profiling.py).
CATEGORIES = [
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "sm80_", "addmm", "aten::mm", "cublas", "matmul",
                "triton_tem_")),
    ("layernorm", ("layer_norm", "layernorm")),
    ("gelu", ("gelu",)),
    ("reduction", ("reduce", "sum", "mean", "var", "mse")),
    ("masking/gather/copy", ("gather", "scatter", "index", "cat", "copy", "sort", "mask", "fill", "select_rows",
                             "selectrows", "insert_backward", "insertbackward", "invert", "tokengrad")),
    ("elementwise", ("elementwise", "vectorized", "triton_poi", "unrolled", "add", "mul")),
]


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lowered for k in keys):
            return label
    return "other"


def profile_step(step: Callable[[], Any], device: torch.device, steps: int, out_dir: Path, tag: str,
                 trace: bool = False) -> dict:
    """Profiles `steps` calls of `step` (already warmed up); writes <tag>.top.txt (top ops),
    <tag>.categories.json, <tag>.kernels.json (each category's top kernels), <tag>.kernel_times.json (every
    kernel: calls and us per step), <tag>.callers.txt (who called each aten::sum, copy and fill: `op_callers`),
    with `trace` also <tag>.trace.json
    (chrome trace, tens of MB for a ViT-B step). Returns {"shares": {category: share of kernel time},
    "device_ms_per_step": summed kernel time per step (on CPU: summed aten self time), "annotation_spans_ms":
    {range name: its span on the GPU timeline per step} (e.g. the optimizer step, gaps included)}."""
    device = torch.device(device)
    with profile(activities=activities_for(device)) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return summarize(prof, device, steps, out_dir, tag, trace)


def activities_for(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])


def summarize(prof, device: torch.device, steps: int, out_dir: Path, tag: str, trace: bool = False) -> dict:
    """The files and numbers of `profile_step` from a finished profiler that covered `steps` steps."""
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if trace:
        prof.export_chrome_trace(str(out_dir / f"{tag}.trace.json"))
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out_dir / f"{tag}.top.txt").write_text(prof.key_averages().table(sort_by=sort_key, row_limit=40))
    times: dict[str, list] = {}  # kernel (on CPU: aten op) -> [calls, time] over the profiled steps
    spans: dict[str, float] = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            t = event.self_device_time_total
            if t <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
                continue  # only kernels: host-side ops would double count
            if getattr(event, "is_user_annotation", False):
                # A record_function range drawn on the GPU timeline (e.g. "Optimizer.step#AdamW.step"): its
                # "time" is the span from its first to its last kernel, gaps included, and those kernels are
                # counted on their own too. Kept apart: a span far above its kernels' time means launch gaps.
                spans[event.key] = t / steps / 1e3
                continue
        else:
            t = event.self_cpu_time_total
            if not event.key.startswith("aten::") or t <= 0:
                continue
        entry = times.setdefault(event.key, [0, 0.0])
        entry[0] += event.count
        entry[1] += t
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, list] = defaultdict(list)
    for name, (_, t) in times.items():
        totals[category(name)] += t
        kernels[category(name)].append((name, t))
    total = sum(totals.values()) or 1.0
    shares = {k: v / total for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    (out_dir / f"{tag}.categories.json").write_text(json.dumps(shares, indent=2) + "\n")
    # which kernels each category is (e.g. cuDNN vs flash attention): names and us per profiled step, top 8
    top = {k: [[name, round(t / steps, 1)] for name, t in sorted(v, key=lambda kv: -kv[1])[:8]]
           for k, v in kernels.items()}
    (out_dir / f"{tag}.kernels.json").write_text(json.dumps(top, indent=2) + "\n")
    # every kernel under its full name (the top table cuts names to 50 characters), per profiled step: what
    # benchmarks/kernel_bandwidth.py sets against Inductor's byte count of the same kernels
    by_time = {name: {"calls": calls / steps, "us": round(t / steps, 3), "category": category(name)}
               for name, (calls, t) in sorted(times.items(), key=lambda kv: -kv[1][1])}
    (out_dir / f"{tag}.kernel_times.json").write_text(json.dumps(by_time, indent=1) + "\n")
    (out_dir / f"{tag}.callers.txt").write_text(format_callers(op_callers(prof.events()), steps))
    return {"shares": shares, "device_ms_per_step": sum(totals.values()) / steps / 1e3, "annotation_spans_ms": spans}


# Ops whose callers `op_callers` records: the reductions and copies that a compiled step should have folded into
# its own kernels (the H100 profile of 2026-11-27 had 84 `aten::sum` per compiled step; NOTES §6.7-6.8).
CALLER_OPS = ("aten::sum", "aten::copy_", "aten::to", "aten::_to_copy", "aten::fill_", "aten::zero_")


def op_callers(events, ops: tuple[str, ...] = CALLER_OPS, depth: int = 4) -> dict[str, Counter]:
    """For each op in `ops`, how many of its calls sat under each chain of enclosing ops and ranges (innermost
    `depth` of them, outermost first): e.g. "autograd::engine::evaluate_function: AddmmBackward0 >
    AddmmBackward0 > aten::sum" (an eager backward) against "## Call CompiledFxGraph ... ##" or
    "CompiledFunctionBackward" (a compiled graph's own call). `events` is a finished profiler's `.events()`."""
    chains: dict[str, Counter] = defaultdict(Counter)
    for event in events:
        if event.name not in ops:
            continue
        names, parent = [], event.cpu_parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        nested = [n for n in names if n not in ops]  # aten::to inside aten::to: keep the caller, not the nesting
        chains[event.name][" > ".join(reversed(nested[:depth])) or "(top level)"] += 1
    return chains


def format_callers(chains: dict[str, Counter], steps: int) -> str:
    """`op_callers` as text: per op, its calls per step under each chain of callers, most first."""
    lines = [f"# calls per profiled step ({steps} steps) of each op, by the ops and ranges around it (outermost first)"]
    for op in sorted(chains, key=lambda o: -sum(chains[o].values())):
        lines.append(f"{op}: {sum(chains[op].values()) / steps:g} per step")
        lines += [f"  {n / steps:8g}  {chain}" for chain, n in chains[op].most_common(12)]
    return "\n".join(lines) + "\n"


# The CUDA caching allocator's event counters (torch.cuda.memory_stats): driver allocations and frees (a cudaFree
# waits for the device), cache flushes after a failed allocation, and its synchronize-all-streams calls.
ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_events(device: torch.device | str) -> dict[str, int] | None:
    """The allocator's event counters on a CUDA device (None elsewhere). A steady training step should add none:
    each is a driver call or a device-wide wait inside the step."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {key: int(stats.get(key, 0)) for key in ALLOCATOR_EVENTS}


def allocator_events_since(before: dict[str, int] | None, device: torch.device | str) -> dict[str, int] | None:
    """What the allocator did since `before` (an allocator_events reading on the same device); None off CUDA."""
    if before is None:
        return None
    now = allocator_events(device)
    return {key: now[key] - count for key, count in before.items()}


class WrittenBytes(TorchDispatchMode):
    """`with WrittenBytes() as w:` counts, per aten op name, its calls (`w.calls`), the bytes of its
    outputs (`w.bytes`) and of its tensor inputs (`w.read`: what a kernel that reads each input once moves;
    a GEMM re-reads its operands from cache, so for it this is a floor). Views and reshapes write no memory
    and are left out. A custom op (e.g. a Triton kernel's) counts as one op with its own inputs and outputs."""

    NO_WRITE = ("detach", "alias", "lift_fresh", "_unsafe_view")

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.read: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in self.NO_WRITE:
            return out
        outs = out if isinstance(out, (tuple, list)) else [out]
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.calls[name] += 1
        self.bytes[name] += sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
        self.read[name] += sum(t.numel() * t.element_size() for t in ins)
        return out


def bytes_per_image(count: Callable[[int], "WrittenBytes"], small: int = 8, large: int = 16):
    """Per aten op: (bytes moved = read + written, bytes written) per image and the calls at batch `large`, from
    `count(batch)` (a finished WrittenBytes of one step at that batch) at two batch sizes: (large - small) /
    (large - small images) is what grows with the batch (activations), without the per-step weight traffic."""
    lo, hi = count(small), count(large)
    images = large - small
    moved = Counter({k: (hi.bytes[k] + hi.read[k] - lo.bytes[k] - lo.read[k]) / images for k in hi.calls})
    written = Counter({k: (hi.bytes[k] - lo.bytes[k]) / images for k in hi.calls})
    return moved, written, hi.calls
