"""End-to-end MAE training-step benchmark: fastmae against the plain reference MAE, same init, same run.

One step = forward + backward + AdamW update, bf16 autocast, synthetic images. For each model it prints
images/s, TFLOP/s, MFU, peak memory and the fastmae/reference ratios, and writes e2e.csv / e2e.json /
e2e.md / e2e.png (every row carries card, versions, date and git commit).

    python benchmarks/e2e.py                                   # GPU: ViT-B/16, ViT-L/16, ViT-H/14
    python benchmarks/e2e.py --device cpu --models tiny --batch 8 --steps 3   # CPU smoke run (CI)

FLOPs are counted with torch.utils.flop_counter over one forward+backward (the optimizer is not counted):
  own_gflop_per_img  what that model itself executes (fastmae embeds only visible patches: a little less);
  ref_gflop_per_img  what the reference executes; `effective_tflops` = ref FLOPs/img x img/s, the
                     like-for-like rate; MFU = effective_tflops / the card's bf16 matmul rate measured here.
"""

import argparse
import gc
import re
import statistics
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/e2e.py` from anywhere

from benchmarks import common  # noqa: E402
from fastmae import profiling  # noqa: E402
from fastmae.cuda_graph import GraphedTrainStep  # noqa: E402
from fastmae.models import create_model, model_config  # noqa: E402
from fastmae.speed import COMPILE_MODES, make_optimizer, optimize_model  # noqa: E402
from fastmae.train.optim import param_groups  # noqa: E402  (the official no-decay split, as in training)

MODELS = {
    "B": ("mae_vit_base_patch16_dec512d8b", 256),
    "L": ("mae_vit_large_patch16_dec512d8b", 128),
    "H": ("mae_vit_huge_patch14_dec512d8b", 64),
    "tiny": ("mae_vit_tiny_patch4_dec64d2b", 8),
    "small": ("mae_vit_small_patch8_dec128d2b", 8),
}


@dataclass(frozen=True)
class Variant:
    reference: bool  # the plain reference MAE (else fastmae)
    mode: str | None = None  # torch.compile mode; None: eager
    ckpt: bool = False  # activation checkpointing per block (fastmae only)
    adamw: str | None = None  # AdamW implementation; None: foreach for the reference, "auto" (fused) for fastmae
    backend: str | None = None  # fastmae_kernels backend of fastmae; None: --backend
    sdpa: str | None = None  # force one SDPA backend ("flash", "cudnn", "efficient", "math"); None: torch picks
    masked_only: bool = True  # fastmae: the trainer's forward (decoder's last block and head on masked rows)
    norm_backend: str | None = None  # fastmae's residual add + LayerNorm; None: "auto" (torch's ops: Inductor's own
    # fusion under torch.compile; "triton": the fused kernel, NOTES §7.3)
    gelu_backend: str | None = None  # fastmae's MLP fc1 bias + GELU, likewise ("torch": nn.Linear + nn.GELU)
    caller_thread_backward: bool = False  # backward on the calling thread, not autograd's CUDA worker thread
    graphed: bool = False  # the whole step (forward, backward, AdamW) captured once into a CUDA graph, replayed
    attn: str | None = None  # fastmae's attention, encoder and decoder: "sdpa" (None) or "triton" (NOTES §7.5)
    decoder_attn: str | None = None  # the decoder's alone, where it differs from `attn`

    def forward_kwargs(self) -> dict:
        return {"masked_only": True} if self.masked_only and not self.reference else {}

    def counted_as(self) -> str:
        """Which FLOP count (bench_model's three) applies to this variant."""
        return "ref" if self.reference else ("fast" if self.masked_only else "fast-fullpred")


VARIANTS = {
    "ref-eager": Variant(reference=True),
    "ref-compiled": Variant(reference=True, mode="default"),
    "fast-eager": Variant(reference=False),
    "fast-compiled": Variant(reference=False, mode="default"),
    "fast-cudagraphs": Variant(reference=False, mode="reduce-overhead"),
    "fast-compiled-ckpt": Variant(reference=False, mode="default", ckpt=True),
    # Controls that split fastmae's gain into its parts (benchmarks/NOTES.md §6.2):
    "ref-compiled-fusedadamw": Variant(reference=True, mode="default", adamw="auto"),  # only the optimizer differs
    "fast-compiled-torchops": Variant(reference=False, mode="default", backend="torch"),  # Inductor fuses the MAE ops
    "fast-compiled-triton": Variant(reference=False, mode="default", backend="triton"),  # when no CUDA extension
    "fast-compiled-flash": Variant(reference=False, mode="default", sdpa="flash"),
    "fast-compiled-fullpred": Variant(reference=False, mode="default", masked_only=False),  # decoder on all rows
    "fast-compiled-fusednorm": Variant(reference=False, mode="default", norm_backend="triton"),  # kernel vs Inductor
    "fast-compiled-fusedgelu": Variant(reference=False, mode="default", gelu_backend="triton"),  # kernel vs Inductor
    # The fused block kernels in the eager step (opt-in since 2026-12-04, NOTES §7.3): against fast-eager's add,
    # LayerNorm and cast (fusednorm), nn.Linear + nn.GELU (fusedgelu), or both (fusedblocks)
    "fast-eager-fusednorm": Variant(reference=False, norm_backend="triton"),
    "fast-eager-fusedgelu": Variant(reference=False, gelu_backend="triton"),
    "fast-eager-fusedblocks": Variant(reference=False, norm_backend="triton", gelu_backend="triton"),
    # their Python autograd nodes cost ~500 us each way on autograd's CUDA worker thread on the H200's host (NOTES
    # §7.3): the same step with the backward on this thread
    "fast-eager-fusedblocks-callerthread": Variant(reference=False, norm_backend="triton", gelu_backend="triton",
                                                   caller_thread_backward=True),
    # The whole step as one CUDA-graph replay (fastmae/cuda_graph.py; CUDA only): no host time per kernel, so the
    # eager step runs at its kernels' speed (NOTES §7.4). The reference's too, as a control; and the compiled step
    # with its AdamW in the same graph (reduce-overhead, fast-cudagraphs, graphs forward and backward apart).
    "fast-eager-graphed": Variant(reference=False, graphed=True),
    "fast-eager-fusedblocks-graphed": Variant(reference=False, norm_backend="triton", gelu_backend="triton",
                                              graphed=True),
    "ref-eager-graphed": Variant(reference=True, graphed=True),
    "fast-compiled-graphed": Variant(reference=False, mode="default", graphed=True),
    # fastmae_kernels' Triton attention (head dim tiled at its size) instead of SDPA's cuDNN kernel, everywhere or
    # in the decoder only (head dim 32, which cuDNN's 64x64x64 tile pads; NOTES §7.5)
    "fast-compiled-tritonattn": Variant(reference=False, mode="default", attn="triton"),
    "fast-compiled-tritonattn-dec": Variant(reference=False, mode="default", decoder_attn="triton"),
    "fast-eager-tritonattn": Variant(reference=False, attn="triton"),
    # GEMMs autotuned against Inductor's Triton templates, the GELU and its gradient fusable into their epilogues
    "fast-compiled-autotune": Variant(reference=False, mode="max-autotune-no-cudagraphs"),
}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
GPU_DEFAULT = "ref-eager,ref-compiled,fast-eager,fast-compiled,fast-cudagraphs"
CPU_DEFAULT = "ref-eager,fast-eager"
COLUMNS = ["model", "variant", "batch", "status", "img_s", "step_ms", "step_ms_p20", "step_ms_p80",
           "effective_tflops", "mfu", "own_tflops", "own_gflop_per_img", "ref_gflop_per_img", "peak_mem_gib",
           "first_step_s", "final_loss", "adamw", "kernels", "norms", "gelus", "attention", "rounds", "round_spread",
           "alloc_events"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS) + " (default B,L,H on GPU)")
    p.add_argument("--batch", type=int, default=None, help="batch for every model (default: per model, B256/L128/H64)")
    p.add_argument("--variants", default=None, help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--repeat-first", action="store_true",
                   help="time the first variant again after the others (row '<variant>#2'): the run-to-run drift")
    p.add_argument("--rounds", type=int, default=1,
                   help="R > 1: keep every variant alive and time them in turn R times (A B C A B C ...), so drift "
                        "hits all alike; img/s from the median of the round medians, spread reported")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (per round)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first one compiles)")
    p.add_argument("--fast-compile-mode", default=None, choices=COMPILE_MODES,
                   help="compile mode of the fast-compiled variant (default: default)")
    p.add_argument("--backend", default="auto", help="fastmae_kernels backend of the fastmae side")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured bf16 matmul)")
    p.add_argument("--count-only", action="store_true",
                   help="no timing: count FLOPs per image and saved activation bytes (any device, e.g. CPU)")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler breakdown per variant")
    p.add_argument("--trace", action="store_true", help="with --profile, also write chrome traces (tens of MB each)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/e2e-<device>-<date>)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.models = (args.models or ("B,L,H" if gpu else "tiny")).split(",")
    args.variants = (args.variants or (GPU_DEFAULT if gpu else CPU_DEFAULT)).split(",")
    for name, table in (("model", MODELS), ("variant", VARIANTS)):
        bad = [x for x in (args.models if name == "model" else args.variants) if x not in table]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {', '.join(table)}")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be >= 1")
    return args


class SdpaBackend(torch.nn.Module):
    """Runs the wrapped model under one SDPA backend, with the context *inside* the module, so torch.compile
    traces it: a compiled graph fixes its attention kernel when it is traced, and a context entered around a
    call to an already-compiled model would not reach it."""

    def __init__(self, model: torch.nn.Module, sdpa: str):
        super().__init__()
        self.inner, self.sdpa = model, sdpa

    @property
    def backend(self) -> str:  # the wrapped model's kernels backend, for the row's `kernels` column
        return self.inner.backend

    def norm_backend_for(self, compiled: bool, device) -> str:  # and its norms' (the row's `norms` column)
        return self.inner.norm_backend_for(compiled, device)

    def gelu_backend_for(self, compiled: bool, device) -> str:  # and its MLPs' (the row's `gelus` column)
        return self.inner.gelu_backend_for(compiled, device)

    def forward(self, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[self.sdpa])):
            return self.inner(*args, **kwargs)


def create_variant_model(spec: Variant, name: str, backend: str):
    """The model of one variant, on the CPU with its initial weights, neither compiled nor moved."""
    if spec.reference:
        return create_model(name, reference=True)
    kwargs = {"backend": spec.backend or backend, "norm_backend": spec.norm_backend or "auto",
              "gelu_backend": spec.gelu_backend or "auto", "attn_backend": spec.attn or "sdpa",
              "decoder_attn_backend": spec.decoder_attn}
    return create_model(name, reference=spec.reference, **kwargs)


def build(spec: Variant, name: str, state: dict | None, device: torch.device, lr: float, backend: str):
    model = create_variant_model(spec, name, backend)
    if state is not None:  # None in --count-only: counts do not depend on the weights, and it saves memory
        model.load_state_dict(state, strict=True)  # the same initial weights on every side
    model.to(device).train()
    if spec.reference:  # the plain baseline: torch.compile as anyone would, foreach AdamW (torch's default)
        if spec.mode is not None:
            model.compile(mode=spec.mode)
        optimizer = make_optimizer(param_groups(model, 0.05), lr=lr, impl=spec.adamw or "torch-foreach",
                                   capturable=spec.graphed)
    else:
        compile_here = spec.mode is not None and spec.sdpa is None
        optimize_model(model, compile=compile_here, mode=spec.mode or "default", grad_checkpointing=spec.ckpt)
        optimizer = make_optimizer(param_groups(model, 0.05), lr=lr, impl=spec.adamw or "auto", capturable=spec.graphed)
        if spec.sdpa is not None:
            model = SdpaBackend(model, spec.sdpa)
            if spec.mode is not None:
                model.compile(mode=spec.mode, fullgraph=True)  # a graph break: an error, not a mislabelled row
    return model, optimizer


def fused_path(spec: Variant, model, device: torch.device, op: str) -> str:
    """How the variant's residual add + LayerNorm (`op` "add_layer_norm") or MLP fc1 bias + GELU ("bias_gelu")
    ran: torch ops (eager), Inductor (compiled) or the op's fused kernel on a fastmae_kernels backend (fastmae's
    norm_backend / gelu_backend as they resolve, benchmarks/NOTES.md §6.5, §6.6)."""
    if not spec.reference:
        backend_for = model.norm_backend_for if op == "add_layer_norm" else model.gelu_backend_for
        backend = backend_for(compiled=spec.mode is not None, device=device)
        if backend != "torch":
            return f"{op} ({backend})"
    return "inductor" if spec.mode else "torch ops"


def attention_path(spec: Variant) -> str:
    """Which attention the variant's encoder and decoder ran, e.g. "sdpa" or "encoder sdpa, decoder triton"."""
    encoder = "sdpa" if spec.reference else spec.attn or "sdpa"
    decoder = encoder if spec.reference or spec.decoder_attn is None else spec.decoder_attn
    return encoder if encoder == decoder else f"encoder {encoder}, decoder {decoder}"


GRAPH_EAGER_STEPS = 3  # a graphed variant's eager steps before its capture (all within the untimed warm-up)


def make_step(model, optimizer, imgs: torch.Tensor, mask_ratio: float, caller_thread_backward: bool = False,
              graphed: bool = False, **forward_kwargs):
    if graphed:
        return make_graphed_step(model, optimizer, imgs, mask_ratio, **forward_kwargs)
    autocast = torch.autocast(imgs.device.type, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(imgs, mask_ratio, **forward_kwargs)[0]
        with torch.autograd.set_multithreading_enabled(not caller_thread_backward):  # sets the mode when built
            loss.backward()
        optimizer.step()
        return loss

    return step


def make_graphed_step(model, optimizer, imgs: torch.Tensor, mask_ratio: float, **forward_kwargs):
    """The same step as one CUDA-graph replay per call. Each call copies `imgs` into the graph's input buffer,
    as a training loop copies each new batch; the masking noise is drawn anew by every replay."""
    autocast = torch.autocast(imgs.device.type, dtype=torch.bfloat16, cache_enabled=False)  # capture needs no cache

    def body(static_imgs: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(static_imgs, mask_ratio, **forward_kwargs)[0]
        loss.backward()
        optimizer.step()
        return loss

    graphed = GraphedTrainStep(body, optimizer, [torch.empty_like(imgs)], eager_steps=GRAPH_EAGER_STEPS)

    def step() -> torch.Tensor:
        return graphed(imgs)

    step.graphed = graphed  # run_variant reports its capture time
    return step


def count_step(spec: Variant, name: str, state: dict, imgs: torch.Tensor, args) -> tuple[common.FlopCount, dict]:
    """One eager forward+backward (no optimizer) of the model `spec` describes: counted FLOPs; in --count-only
    mode also the activation bytes saved for backward at batch N and 2N, split into per image and fixed."""
    model, _ = build(Variant(reference=spec.reference), name, state, imgs.device, lr=0.0, backend=args.backend)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x, args.mask_ratio, **spec.forward_kwargs())[0]

    count = common.count_flops(lambda: forward(imgs).backward())
    saved = {}
    if args.count_only:
        one = common.saved_tensor_bytes(lambda: forward(imgs), exclude=model.parameters())
        two = common.saved_tensor_bytes(lambda: forward(torch.cat([imgs, imgs])), exclude=model.parameters())
        per_img = (two - one) / imgs.shape[0]
        saved = {"saved_act_mib_per_img": per_img / 2**20, "saved_fixed_mib": (one - per_img * imgs.shape[0]) / 2**20}
    return count, saved  # the model goes with this frame (the closure holds it only until then)


def flop_breakdown(count: common.FlopCount, batch: int) -> dict:
    """GFLOP per image, forward+backward: encoder blocks, decoder blocks, the attention core (QK^T, PV inside
    SDPA, also part of the blocks), and the rest (patch embedding, decoder embed/pred).

    A block's FLOPs are its attention's and MLP's (its norms count none), summed per submodule: torch's module
    tracker places a block's own backward by hooks on its outputs, which misses part of it when the block
    returns (stream, MLP output) for the next block's fused norm (fastmae's stacks)."""
    def modules(pattern: str) -> int:
        return sum(v for k, v in count.per_module.items() if re.fullmatch(pattern, k))

    enc = modules(r"[^.]+\.blocks\.\d+\.(attn|mlp)")
    dec = modules(r"[^.]+\.decoder_blocks\.\d+\.(attn|mlp)")
    attn = sum(v for k, v in count.per_op.items() if "attention" in k)
    parts = {"total": count.total, "encoder_blocks": enc, "decoder_blocks": dec, "attention_core": attn,
             "rest": count.total - enc - dec}
    return {f"{k}_gflop_per_img": v / batch / 1e9 for k, v in parts.items()}


def free(device: torch.device) -> None:
    torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph pools
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(variant: str, name: str, state: dict, imgs: torch.Tensor, args, out: Path, keep: bool = False):
    """Builds, times and frees one variant: its row. With `keep` (for --rounds) it returns (row, step or
    None) and keeps the model alive for more rounds, without profiling or freeing."""
    device = imgs.device
    spec = VARIANTS[variant]
    if variant == "fast-compiled" and args.fast_compile_mode:
        spec = replace(spec, mode=args.fast_compile_mode)
    row = {"variant": variant, "status": "ok", "compile_mode": spec.mode, "grad_ckpt": spec.ckpt,
           "sdpa": spec.sdpa or "default", "attention": attention_path(spec)}
    try:
        with common.PeakMemory(device, above_current=keep) as mem:
            model, optimizer = build(spec, name, state, device, args.lr, args.backend)
            flavour = next((k for k in ("fused", "foreach") if optimizer.defaults.get(k)), None)
            row["adamw"] = type(optimizer).__name__ + (f"({flavour})" if flavour else "")
            row["kernels"] = getattr(model, "backend", "torch (reference ops)")  # resolved: auto -> cuda/triton
            row["norms"] = fused_path(spec, model, device, "add_layer_norm")
            row["gelus"] = fused_path(spec, model, device, "bias_gelu")
            step = make_step(model, optimizer, imgs, args.mask_ratio, spec.caller_thread_backward, spec.graphed,
                             **spec.forward_kwargs())
            warmup = max(args.warmup, GRAPH_EAGER_STEPS + 1) if spec.graphed else args.warmup  # capture untimed
            timing = common.time_steps(step, device, warmup=warmup, iters=args.steps)
            row["final_loss"] = float(step().detach().float())
            if spec.graphed:
                row["capture_s"] = step.graphed.capture_s
        row.update(
            step_ms=timing["median_s"] * 1e3,
            step_ms_p20=timing["p20_s"] * 1e3,
            step_ms_p80=timing["p80_s"] * 1e3,
            steps_ms=[[round(t * 1e3, 4) for t in timing["times_s"]]],
            steps_started_unix_s=[timing["started_unix_s"]],
            alloc_events=None,
            first_step_s=timing["first_call_s"],
            img_s=imgs.shape[0] / timing["median_s"],
            peak_mem_gib=mem.peak_bytes / 2**30,
            peak_mem_kind=mem.kind,
        )
        add_allocator_events(row, timing["allocator_events"])
        if keep:
            return row, step  # the step's closure holds the model and optimizer
        if args.profile:
            row["profile"] = profiling.profile_step(step, device, 3, out / "profiles", f"{name}-{variant}",
                                                    trace=args.trace)
        del model, optimizer, step
    except Exception as exc:  # keep the other variants' numbers; the traceback goes to stderr
        row["status"] = _failure(exc)
    if keep:
        return row, None
    free(device)
    return row


def add_allocator_events(row: dict, events: dict[str, int] | None) -> None:
    """Sums one timing pass's CUDA allocator events into the row: `allocator_events` by kind (JSON) and
    `alloc_events` in all (driver allocations/frees, cache-flush retries, device-wide syncs inside the timed
    steps; a steady step should have 0). Nothing off CUDA."""
    if events is None:
        return
    total = row.setdefault("allocator_events", dict.fromkeys(events, 0))
    for key, count in events.items():
        total[key] += count
    row["alloc_events"] = sum(total.values())


def _failure(exc: Exception) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom"
    traceback.print_exc()
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def run_interleaved(labels: list[str], name: str, state: dict, imgs: torch.Tensor, args, out: Path, bar,
                    report=None) -> list[dict]:
    """--rounds R: every variant is built and timed once (round 1, which also compiles), then timed R-1 more
    times in turn (A B C A B C ...), so clock or thermal drift during the run hits every variant alike instead
    of whichever ran last. img/s comes from the median of the round medians; `round_spread` = (max - min) /
    median of the round medians (the p20/p80 columns are dropped: they would be round 1's alone; `steps_ms`
    keeps every timed step, one list per round, each started at its `steps_started_unix_s`). All variants
    stay in memory together (peak memory counts each one's own). `report(rows so far)` after every timing."""
    device = imgs.device
    live: list[tuple[dict, object, list[float]]] = []  # (row, step or None, round medians in ms)

    def summarise() -> list[dict]:
        for row, step, medians in live:
            if step is not None and row["status"] == "ok" and medians:
                ms = statistics.median(medians)
                row.update(step_ms=ms, img_s=imgs.shape[0] / (ms / 1e3), rounds=len(medians),
                           round_spread=(max(medians) - min(medians)) / ms, round_ms=list(medians),
                           step_ms_p20=None, step_ms_p80=None)
        rows = [row for row, _, _ in live]
        if report is not None:
            report(rows)
        return rows

    for label in labels:
        row, step = run_variant(label.split("#")[0], name, state, imgs, args, out, keep=True)
        row["variant"] = label
        live.append((row, step, [row["step_ms"]] if step is not None else []))
        bar.update()
        summarise()
    for _ in range(args.rounds - 1):
        for row, step, medians in live:
            if step is None or row["status"] != "ok":
                continue
            try:
                timing = common.time_steps(step, device, warmup=1, iters=args.steps)
                medians.append(timing["median_s"] * 1e3)
                row["steps_ms"].append([round(t * 1e3, 4) for t in timing["times_s"]])
                row["steps_started_unix_s"].append(timing["started_unix_s"])
                add_allocator_events(row, timing["allocator_events"])
            except Exception as exc:  # noqa: BLE001
                row["status"] = _failure(exc)
        summarise()
    for row, step, _ in live:
        if args.profile and step is not None and row["status"] == "ok":
            row["profile"] = profiling.profile_step(step, device, 3, out / "profiles", f"{name}-{row['variant']}",
                                                    trace=args.trace)
    rows = summarise()
    live.clear()  # the steps hold the models and optimizers: drop them before freeing
    step = None
    free(device)
    return rows


def bench_model(key: str, args, peak_tflops: float, out: Path, bar, on_row=None) -> list[dict]:
    """Every variant of one model. `on_row(rows so far)` runs after each variant: outputs are rewritten as
    results arrive, so a run cut short (a device lease, an OOM kill) keeps what it measured."""
    name, default_batch = MODELS[key]
    batch = args.batch or default_batch
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    # one official init, shared by every variant
    state = None if args.count_only else create_model(name, reference=True).state_dict()
    img = model_config(name).get("img_size", 224)
    imgs = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(args.seed)).to(device)
    flops, breakdown = {}, []
    sides = {"ref": ("reference", VARIANTS["ref-eager"]), "fast": ("fastmae", VARIANTS["fast-eager"]),
             "fast-fullpred": ("fastmae, full prediction", Variant(reference=False, masked_only=False))}
    for side, (label, spec) in sides.items():
        try:
            count, saved = count_step(spec, name, state, imgs, args)
            flops[side] = count.total / batch
            row = {"model": key, "side": label, "batch": batch}
            breakdown.append({**row, **flop_breakdown(count, batch), **saved})
        except torch.OutOfMemoryError:
            flops[side] = None
        free(device)
    if args.count_only:
        return breakdown
    rows = []
    labels = args.variants + ([f"{args.variants[0]}#2"] if args.repeat_first else [])
    def finish(row: dict, label: str) -> dict:  # FLOP-based columns from the counts above
        row.update(model=key, model_name=name, batch=batch, variant=label)
        own = flops[VARIANTS[label.split("#")[0]].counted_as()]
        row["own_gflop_per_img"] = own / 1e9 if own else None
        row["ref_gflop_per_img"] = flops["ref"] / 1e9 if flops["ref"] else None
        if row["status"] == "ok":
            if own:
                row["own_tflops"] = own * row["img_s"] / 1e12
            if flops["ref"]:
                row["effective_tflops"] = flops["ref"] * row["img_s"] / 1e12
                row["mfu"] = row["effective_tflops"] / peak_tflops
        return row

    if args.rounds > 1:
        bar.set_description(f"{key} {args.rounds} rounds")

        def report(so_far: list[dict]) -> None:
            if on_row is not None:
                on_row([finish(row, row["variant"]) for row in so_far])

        return [finish(row, row["variant"]) for row in
                run_interleaved(labels, name, state, imgs, args, out, bar, report)]
    for label in labels:
        bar.set_description(f"{key} {label}")
        rows.append(finish(run_variant(label.split("#")[0], name, state, imgs, args, out), label))
        bar.update()
        if on_row is not None:
            on_row(rows)
    return rows


def step_range(row: dict) -> tuple[float, float] | None:
    """How far one variant's step time moved while it was measured, in ms: (p20, p80) of a single pass, or
    (fastest, slowest) round median with --rounds; None when the row has neither."""
    if row.get("round_ms"):
        return min(row["round_ms"]), max(row["round_ms"])
    if row.get("step_ms_p20") and row.get("step_ms_p80"):
        return row["step_ms_p20"], row["step_ms_p80"]
    return None


PAIRS = ("eager", "compiled", "best_vs_ref_compiled", "repeat_drift")


def ratios(rows: list[dict]) -> list[dict]:
    """fastmae / reference images/s per model: eager/eager, compiled/compiled, best fastmae / compiled ref;
    with --repeat-first also the drift: the first variant's second timing over its first. Each ratio comes with
    `<pair>_range` = [lo, hi], the ratio at the two variants' opposite ends of their step_range (slowest
    fastmae over fastest reference, and the reverse): a range that contains 1 is no measured difference."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = {r["variant"]: r for r in rows if r["model"] == model and r["status"] == "ok"}
        fast_best = max((k for k in ok if k.startswith("fast") and "#" not in k), key=lambda k: ok[k]["img_s"],
                        default=None)
        repeat = next((k for k in ok if k.endswith("#2")), None)
        pairs = {
            "eager": ("fast-eager", "ref-eager"),
            "compiled": ("fast-compiled", "ref-compiled"),
            "best_vs_ref_compiled": (fast_best, "ref-compiled"),
            "repeat_drift": (repeat, repeat.split("#")[0] if repeat else None),
        }
        row = {"model": model}
        for pair, (a, b) in pairs.items():
            if a not in ok or b not in ok:
                row[pair] = row[f"{pair}_range"] = None
                continue
            row[pair] = ok[a]["img_s"] / ok[b]["img_s"]  # = step time of b / step time of a
            row[f"{pair}_range"] = common.speedup_range(step_range(ok[a]), step_range(ok[b]))
        out.append(row)
    return out


def ratio_table(ratio_rows: list[dict]) -> str:
    """Markdown: each ratio with its range, `1.107 [1.106, 1.109]`; ranges that contain 1 are flagged."""
    table = [{"model": r["model"], **{p: common.format_speedup(r[p], r[f"{p}_range"]) for p in PAIRS}}
             for r in ratio_rows]
    return (common.markdown_table(table, ["model", *PAIRS])
            + "\n[lo, hi]: the ratio at the two variants' opposite ends of their measured step times (p20 and p80 "
              "of one pass; fastest and slowest round median with --rounds). A range that contains 1 is no "
              "measured difference.\n")


def step_breakdown(rows: list[dict]) -> str:
    """Markdown: where each profiled variant's step goes, in ms of kernel time per step by kernel kind, and
    `busy` = kernel time / measured step time (well below 1: launch gaps, so CUDA graphs can help)."""
    profiled = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("profile"), dict)]
    if not profiled:
        return ""
    kinds = list(dict.fromkeys(k for r in profiled for k in r["profile"]["shares"]))
    table = []
    for r in profiled:
        ms = r["profile"]["device_ms_per_step"]
        spans = r["profile"].get("annotation_spans_ms", {})
        optimizer_span = next((v for k, v in spans.items() if k.startswith("Optimizer.step")), None)
        table.append({"model": r["model"], "variant": r["variant"], "step_ms": r["step_ms"], "kernel_ms": ms,
                      "busy": ms / r["step_ms"], **{k: r["profile"]["shares"].get(k, 0.0) * ms for k in kinds},
                      "optimizer_span_ms": optimizer_span})
    return ("\nWhere the step goes (profiler, ms of kernel time per step by kind; on CPU aten self time). "
            "optimizer_span_ms: the optimizer step's span on the GPU timeline, launch gaps included:\n\n"
            + common.markdown_table(table, list(table[0])))


def write_outputs(out: Path, env: dict, args, rows: list[dict], ratio_rows: list[dict], peak: float,
                  quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"matmul_peak_tflops": peak, "mask_ratio": args.mask_ratio, "steps": args.steps, "warmup": args.warmup}
    common.write_json({"environment": env, "settings": meta, "rows": rows, "ratios": ratio_rows}, out / "e2e.json")
    json_only = ("profile", "steps_ms", "steps_started_unix_s", "allocator_events")  # nested: the JSON has them
    common.write_csv([{k: v for k, v in r.items() if k not in json_only} for r in rows], out / "e2e.csv", env)
    text = (
        f"# e2e training step: {env['device']}\n\n{common.markdown_table([env], list(env))}\n"
        f"MFU denominator: {peak:,.1f} TFLOP/s ({'given' if args.peak_tflops else 'measured bf16 matmul'}). "
        "effective_tflops = reference FLOPs/img x img/s; own_tflops = the model's own counted FLOPs/img x img/s.\n\n"
        + common.markdown_table(rows, COLUMNS)
        + "\nfastmae / reference images/s:\n\n"
        + ratio_table(ratio_rows)
        + step_breakdown(rows)
    )
    (out / "e2e.md").write_text(text)
    models = list(dict.fromkeys(r["model"] for r in rows))
    series = {
        v: [next((r["img_s"] for r in rows if r["model"] == m and r["variant"] == v and r["status"] == "ok"), None)
            for m in models]
        for v in dict.fromkeys(r["variant"] for r in rows)
    }
    title = (f"MAE train step, bf16, {env['device']}, torch {env['torch']}, "
             f"{env['date_utc'][:10]}, {env['git_commit'][:9]}")
    common.bar_chart(models, series, "images/s", title, out / "e2e.png")
    if not quiet:
        print(text)


def write_counts(out: Path, env: dict, rows: list[dict]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    common.write_json({"environment": env, "rows": rows}, out / "counts.json")
    common.write_csv(rows, out / "counts.csv", env)
    text = (
        "# Counted per training step (bf16 autocast, eager): FLOPs of forward+backward "
        "(torch.utils.flop_counter, GFLOP per image) and the activations autograd saves for backward "
        "(MiB per image, and a fixed part: autocast's bf16 weight copies; fp32 weights themselves excluded)\n\n"
        f"{common.markdown_table([env], list(env))}\n" + common.markdown_table(rows, list(rows[0]))
    )
    (out / "counts.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = common.environment(device)
    stamp = env["date_utc"][:16].replace(":", "").replace("-", "")
    out = Path(args.out) if args.out else common.REPO / "benchmarks" / "results" / f"e2e-{device.type}-{stamp}"
    if args.count_only:
        return write_counts(out, env, [r for key in tqdm(args.models) for r in bench_model(key, args, 0.0, out, None)])
    peak = args.peak_tflops or common.matmul_peak_tflops(device, size=8192 if device.type == "cuda" else 1024)
    rows: list[dict] = []

    def write(partial: list[dict]) -> None:
        done = rows + partial
        write_outputs(out, env, args, done, ratios(done), peak, quiet=True)

    with tqdm(total=len(args.models) * (len(args.variants) + args.repeat_first), file=sys.stderr) as bar:
        for key in args.models:
            rows += bench_model(key, args, peak, out, bar, on_row=write)
    write_outputs(out, env, args, rows, ratios(rows), peak)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
