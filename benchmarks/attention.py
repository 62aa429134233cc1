"""Attention forward + backward at the MAE's shapes: fastmae_kernels' Triton kernels against torch's SDPA, as torch
picks its kernel and with each of its backends forced (flash, cuDNN, efficient), in bf16. "triton" is what the
model runs (its backward picked by B * H: column "backward"); "triton-head" or "triton-split" is the other
backward forced (FASTMAE_ATTENTION_BACKWARD), so every shape times both.

Each (model, stack) shape is one attention call of that stack at the e2e batch: ViT-B/16 b256's encoder (50
tokens, head dim 64), decoder (197 tokens, head dim 32) and the decoder's last block (147 masked query rows);
ViT-L/16 b128; ViT-H/14 b64 (65 and 257 tokens, head dims 80 and 32). Every implementation is first checked
against fp32 math on the same inputs (output and the three gradients; a row over the tolerance is marked
"mismatch" and not timed); then timed with triton.testing.do_bench (median, p20, p80). The per-step table adds
each stack's calls (B: 12 encoder + 7 decoder + 1 last-block calls) per implementation: what a step would
gain or lose, before any overlap.

    python benchmarks/attention.py --out benchmarks/results/<card>-<date>/attention   # CUDA
    python benchmarks/attention.py --smoke --out /tmp/attention                          # CPU, interpreter, tiny
"""

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastmae_kernels.triton_ops is imported
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastmae_kernels as fk  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.kernels.timing import _time as time_ms  # noqa: E402
from fastmae_kernels.triton_ops.attention import backward_kind  # noqa: E402


@dataclass(frozen=True)
class Shape:
    model: str
    stack: str  # encoder, decoder, decoder-last (the masked query rows only)
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    calls_per_step: int


GPU_SHAPES = [  # B first, then H (its head dims 80 and 32, 65 and 257 tokens), then L (B's shapes at half the batch)
    Shape("B", "encoder", 256, 12, 50, 50, 64, 12), Shape("B", "decoder", 256, 16, 197, 197, 32, 7),
    Shape("B", "decoder-last", 256, 16, 147, 197, 32, 1),
    Shape("H", "encoder", 64, 16, 65, 65, 80, 32), Shape("H", "decoder", 64, 16, 257, 257, 32, 7),
    Shape("H", "decoder-last", 64, 16, 192, 257, 32, 1),
    Shape("L", "encoder", 128, 16, 50, 50, 64, 24), Shape("L", "decoder", 128, 16, 197, 197, 32, 7),
    Shape("L", "decoder-last", 128, 16, 147, 197, 32, 1),
]
SMOKE_SHAPES = [Shape("tiny", "encoder", 2, 3, 17, 17, 32, 4), Shape("tiny", "decoder-last", 2, 4, 12, 65, 16, 1)]
TRITON_FORCED = {"triton-head": "head", "triton-split": "split"}  # row -> the backward it forces; "triton" picks
SDPA_FORCED = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
               "sdpa-efficient": "EFFICIENT_ATTENTION"}
COLUMNS = ["model", "stack", "impl", "backward", "status", "fwd_bwd_ms", "fwd_bwd_ms_p20", "fwd_bwd_ms_p80", "fwd_ms",
           "tflops", "vs_sdpa", "max_rel_err"]


def implementations(device: torch.device) -> dict:
    """name -> attention(q, k, v); SDPA's forced backends only on CUDA (the CPU has its own kernel)."""
    impls = {"sdpa": F.scaled_dot_product_attention}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in SDPA_FORCED.items():
            def forced(q, k, v, _backend=getattr(SDPBackend, backend)):
                with sdpa_kernel(_backend):
                    return F.scaled_dot_product_attention(q, k, v)
            impls[name] = forced
    for name in ("triton", *TRITON_FORCED):  # the forced ones differ in `measure`'s FASTMAE_ATTENTION_BACKWARD
        impls[name] = lambda q, k, v: fk.attention(q, k, v, backend="triton")
    return impls


def backward_forced(kind: str | None):
    """FASTMAE_ATTENTION_BACKWARD=kind inside (nothing changed for None); the backward reads it when autograd
    runs it, so a whole forward + backward must run inside."""
    if kind is None:
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, {"FASTMAE_ATTENTION_BACKWARD": kind})


def inputs(shape: Shape, device: torch.device, dtype: torch.dtype):
    """q, k, v as the ViT makes them (views of one qkv buffer when q and k have the same rows), and dO."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device, dtype)

    b, h, m, n, d = shape.batch, shape.heads, shape.q_len, shape.kv_len, shape.head_dim
    qkv = rand(b, n, 3, h, d)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, H, N, D], strided as in the model
    if m != n:
        q = q[:, :, :m].contiguous()  # the last block's gathered query rows
    return q, k, v, rand(b, h, m, d)


def fwd_bwd(impl, q, k, v, do):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = impl(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    return out, grads


def max_rel_error(impl, q, k, v, do) -> float:
    """Largest error of the output and the three gradients against fp32 math, relative to each one's largest value."""
    got = fwd_bwd(impl, q, k, v, do)
    exact = fwd_bwd(lambda *t: torch.softmax((t[0] @ t[1].transpose(-2, -1)) * t[0].shape[-1] ** -0.5, -1) @ t[2],
                    q.float(), k.float(), v.float(), do.float())
    pairs = [(got[0], exact[0]), *zip(got[1], exact[1])]
    return max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in pairs)


def flops(shape: Shape) -> float:
    """Matmul FLOPs of forward (2) + backward (5, P recomputed) products of [M, N, D] per head."""
    return 7 * 2 * shape.batch * shape.heads * shape.q_len * shape.kv_len * shape.head_dim


def measure(shape: Shape, name: str, impl, device: torch.device, tolerance: float, smoke: bool) -> dict:
    row = {"model": shape.model, "stack": shape.stack, "impl": name, "status": "ok",
           "shape": f"{shape.batch}x{shape.heads}x{shape.q_len}x{shape.kv_len}x{shape.head_dim}"}
    q, k, v, do = inputs(shape, device, torch.bfloat16)
    with backward_forced(TRITON_FORCED.get(name)):
        return _measure(shape, row, impl, q, k, v, do, device, tolerance, smoke)


def _measure(shape, row, impl, q, k, v, do, device, tolerance, smoke) -> dict:
    try:
        row["max_rel_err"] = max_rel_error(impl, q, k, v, do)  # also the triton autotuner's first call
    except RuntimeError as exc:  # a forced SDPA backend that does not take this shape
        row["status"] = f"unsupported: {str(exc).splitlines()[0][:100]}"
        return row
    if row["max_rel_err"] > tolerance:
        row["status"] = "mismatch"
        return row
    timed = time_ms(lambda: fwd_bwd(impl, q, k, v, do), device, smoke)  # the kernel benchmark's timing
    row["fwd_bwd_ms"], row["fwd_bwd_ms_p20"], row["fwd_bwd_ms_p80"] = timed["ms"], timed["ms_p20"], timed["ms_p80"]
    with torch.no_grad():
        row["fwd_ms"] = time_ms(lambda: impl(q, k, v), device, smoke)["ms"]
    row["tflops"] = flops(shape) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return row


def per_step(rows: list[dict], shapes: list[Shape]) -> list[dict]:
    """Per model and implementation: the attention ms of one training step (every stack's calls), and its
    difference from SDPA as torch picks it; None where a stack's row was not timed."""
    calls = {(s.model, s.stack): s.calls_per_step for s in shapes}
    out = []
    for model in dict.fromkeys(s.model for s in shapes):
        totals = {}
        for name in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["impl"] == name]
            timed = all(r.get("fwd_bwd_ms") is not None for r in mine) and len(mine) == sum(
                1 for s in shapes if s.model == model)
            totals[name] = sum(r["fwd_bwd_ms"] * calls[(model, r["stack"])] for r in mine) if timed else None
        for name, total in totals.items():
            base = totals.get("sdpa")
            out.append({"model": model, "impl": name, "step_attention_ms": total,
                        "minus_sdpa_ms": None if total is None or base is None else total - base})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (attention.csv/.json/.md)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: the Triton interpreter)")
    p.add_argument("--models", default=None, help="comma list of B,L,H (default all)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("attention: nothing measured: the full shapes need a CUDA GPU (use --smoke on a CPU)", file=sys.stderr)
        return 2
    models = args.models.split(",") if args.models else None
    unknown = set(models or ()) - {s.model for s in GPU_SHAPES}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from B, L, H")
    shapes = SMOKE_SHAPES if args.smoke else [s for s in GPU_SHAPES if not models or s.model in models]
    # bf16 output and gradients against fp32 math: a few bf16 ulps of each one's largest value
    tolerance = 16 * torch.finfo(torch.bfloat16).eps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment(device)
    impls = implementations(device)
    rows: list[dict] = []
    from tqdm import tqdm

    with tqdm(total=len(shapes) * len(impls), desc="attention", unit="run") as bar:
        for shape in shapes:
            base = None
            picked = backward_kind(shape.batch * shape.heads)  # what "triton" runs at this shape
            for name, impl in impls.items():
                if TRITON_FORCED.get(name) == picked:
                    bar.update()
                    continue  # the "triton" row, timed once
                row = measure(shape, name, impl, device, tolerance, args.smoke)
                if name == "triton":
                    row["backward"] = picked
                if name == "sdpa":
                    base = row.get("fwd_bwd_ms")
                if base and row.get("fwd_bwd_ms"):
                    row["vs_sdpa"] = base / row["fwd_bwd_ms"]  # > 1: faster than SDPA as torch picks
                rows.append(row)
                bar.update()
                with contextlib.suppress(Exception):
                    write(out, rows, per_step(rows, shapes), env, args.smoke)  # a cut run keeps what it measured
    write(out, rows, per_step(rows, shapes), env, args.smoke)
    print((out / "attention.md").read_text())
    return 0


def write(out: Path, rows: list[dict], steps: list[dict], env: dict, smoke: bool) -> None:
    kind = "CPU SMOKE (Triton interpreter): not kernel speed" if smoke and env["device_type"] != "cuda" else "measured"
    env = {**env, "run_kind": kind}
    common.write_csv(rows, out / "attention.csv", env)
    common.write_json({"environment": env, "rows": rows, "per_step": steps}, out / "attention.json")
    text = (f"# Attention forward + backward, bf16 ({env.get('device')}, torch {env.get('torch')}, "
            f"{env.get('date_utc', '')}; {kind})\n\n" + common.markdown_table(rows, COLUMNS)
            + "\n## Per training step (every stack's calls)\n\n"
            + common.markdown_table(steps, ["model", "impl", "step_attention_ms", "minus_sdpa_ms"]))
    (out / "attention.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
