"""The open predictions of benchmarks/NOTES.md as data, so a GPU run's results can be read against them by
`benchmarks/gpu_check_report.py` instead of by hand. Each is written before its measurement; the NOTES
section holds its reasoning. Ratios are speed-ups of `a` over `b` (images/s of a / images/s of b; for the
kernel rows, b's ms / a's ms), measured in one run; [lo, hi] is the predicted interval.

kind:
- "e2e":     two variants of `benchmarks/e2e.py` in the same output folder, on model `model`;
- "kernel":  a row of the kernel benchmark: `a` = "op/impl/mode" against the baseline impl `b` at shape `model`
             ("ms" of a graph replay when b == "graph_ms": then [lo, hi] are milliseconds, not a ratio);
- "attention": a row of `benchmarks/attention.py`: `a` = "stack/impl" against impl `b` at model `model` (b's
             fwd+bwd ms / a's); stack "step" compares the per-step sums (every stack's calls per training step);
- "trainer": two trainer runs of `gpu_check.sh` (steady images/s from their train_steps.jsonl), or a trainer
             run against an e2e variant (`b` = "e2e:<folder>/<variant>");
- "busy":    a trainer run's kernel time / wall time per step from its `--profile_steps` summary;
- "waits":   the same summary's host waits for the device per profiled step (explicit synchronize() calls and,
             on CUDA, synchronizing tensor ops: fastmae/train/host_waits.py);
- "bandwidth": the Inductor kernels of profile category `b` in e2e run `a` ("<folder>/<variant>"): their bytes
             (Inductor's count, from the committed codegen of the run's torch) per second of their profiled time,
             as a fraction of the kernel benchmark's measured copy rate (benchmarks/kernel_bandwidth.py).
"""

from dataclasses import dataclass

INF = float("inf")

# The card the intervals were written for (from its measured 3.0 TB/s copy and ~800 TFLOP/s bf16 matmul rates).
# An H200 has the same matmul rate and ~4.3 TB/s: the memory-bound part of each step is ~30% shorter there, so a
# gain that comes from moving fewer bytes (§6.5, §6.6) should land nearer the low end, or below it.
PREDICTED_FOR = "H100 80GB HBM3"


@dataclass(frozen=True)
class Prediction:
    source: str  # section of benchmarks/NOTES.md
    kind: str
    model: str
    a: str
    b: str
    lo: float
    hi: float
    why: str  # one line; the reasoning is in the NOTES section


PREDICTIONS = [
    # §6.2: what splits fastmae's compiled gain (ViT-B b256)
    Prediction("6.2", "e2e", "B", "ref-compiled-fusedadamw", "ref-compiled", 1.03, 1.05,
               "the reference with the fused AdamW: the optimizer's 2.15 ms of 59.5"),
    Prediction("6.2", "e2e", "B", "fast-compiled", "ref-compiled-fusedadamw", 1.05, 1.08,
               "visible-only patch embedding (~3 ms) and the fused MAE ops (~0.5 ms)"),
    Prediction("6.2", "e2e", "B", "fast-compiled-torchops", "fast-compiled", 0.98, 1.02,
               "Inductor fuses the reference MAE ops as well as the CUDA kernels"),
    Prediction("6.2", "e2e", "B", "fast-compiled-triton", "fast-compiled-torchops", 0.97, 1.00,
               "below 0.99x, auto should prefer torch ops over Triton without the CUDA extension"),
    Prediction("6.2", "e2e", "B", "fast-compiled", "fast-compiled-fullpred", 1.01, 1.025,
               "masked_only: 1.5% fewer FLOPs in the decoder's last block"),
    Prediction("6.2", "e2e", "B", "fast-compiled-flash", "fast-compiled", 0.95, 1.05,
               "flash vs cuDNN attention on short sequences"),
    # §7.3: the eager step with torch's block ops (the default since 2026-12-04) and with the fused kernels
    Prediction("7.3", "e2e", "H", "fast-eager", "ref-eager", 0.93, 1.10,
               "1.04x and 0.93x on two H200 calls (2026-12-04): the reference's ops, fewer of them"),
    Prediction("7.3", "e2e", "B", "fast-eager", "ref-eager", 1.10, 1.25,
               "1.20x on the H200 (2026-12-04, second call)"),
    Prediction("7.3", "e2e", "H", "fast-eager-fusedblocks", "fast-eager", 0.55, 0.75,
               "0.59x and 0.66x: the kernels' Python autograd nodes cost ~500 us of host time per call"),
    # §7.4: the whole step as one CUDA-graph replay (fastmae/cuda_graph.py): no host time per kernel
    Prediction("7.4", "e2e", "H", "fast-eager-graphed", "fast-eager", 1.10, 1.45,
               "77 ms steps hold 62 ms of kernels (§7.3): the replay runs at the kernels' speed"),
    Prediction("7.4", "e2e", "H", "fast-eager-graphed", "ref-eager", 1.15, 1.40,
               "62-64 ms against the reference's 80 ms (its kernels 78 ms, 97% busy)"),
    Prediction("7.4", "e2e", "H", "fast-eager-fusedblocks-graphed", "fast-eager-graphed", 1.03, 1.12,
               "the fused kernels' 4.8 ms of GPU time saved per step, now that the host costs nothing"),
    Prediction("7.4", "e2e", "B", "fast-eager-graphed", "fast-eager", 1.00, 1.06,
               "ViT-B b256's kernels are long enough for the host to keep ahead already"),
    Prediction("7.4", "e2e", "B", "fast-eager-fusedblocks-graphed", "fast-eager-graphed", 1.05, 1.15,
               "§6.5 + §6.6 (1.07-1.13x) with the host out of the way; 1.13x measured for the norm alone"),
    Prediction("7.4", "e2e", "B", "fast-compiled-graphed", "fast-compiled", 0.99, 1.04,
               "the compiled step is 97% busy; reduce-overhead gained 1.5% on the H100"),
    # §7.5: fastmae_kernels' Triton attention (head dim tiled at its size) against SDPA as torch picks it (cuDNN);
    # made for the split backward (9 products per tile pair), which is "triton-split" since §7.6
    Prediction("7.5", "attention", "B", "decoder/triton-split", "sdpa", 0.80, 1.60,
               "64% of cuDNN's padded FLOPs (d 32 not padded to 64, 9 products not 7) at 50-100% of its efficiency"),
    Prediction("7.5", "attention", "B", "encoder/triton-split", "sdpa", 0.60, 1.10,
               "50 tokens at head dim 64: the same padding as cuDNN's tile and 9 products against its 7"),
    Prediction("7.5", "attention", "H", "decoder/triton-split", "sdpa", 0.80, 1.60,
               "257 tokens (5 blocks of 64, as cuDNN's), head dim 32: as ViT-B's decoder"),
    # §7.6: the one-program-per-head backward ("triton" at the e2e batches, B * H >= 512) against the split one;
    # §7.5's e2e intervals (0.96-1.06x, 0.94-1.07x) revised with it before measuring
    Prediction("7.6", "attention", "B", "decoder/triton", "triton-split", 0.85, 1.20,
               "2 of 9 products and two launches saved; ~0.9 GB of dQ scratch through L2 and a third of the occupancy"),
    Prediction("7.6", "attention", "B", "encoder/triton", "triton-split", 1.00, 1.35,
               "one tile pair per head: 5 backward products against 7, no delta or dQ launch, no scratch re-read"),
    Prediction("7.6", "attention", "H", "decoder/triton", "triton-split", 0.85, 1.20,
               "as ViT-B's decoder (5 x 5 tile pairs per head)"),
    Prediction("7.6", "attention", "B", "decoder/triton", "sdpa", 0.70, 1.90,
               "§7.5's 0.8-1.6x for the split kernels times 0.85-1.20x"),
    Prediction("7.6", "e2e", "B", "fast-compiled-tritonattn-dec", "fast-compiled", 0.94, 1.08,
               "the decoder's ~7.7 ms of cuDNN attention (of 49.5 ms, H200) at 0.7-1.9x"),
    Prediction("7.6", "e2e", "B", "fast-compiled-tritonattn", "fast-compiled", 0.92, 1.09,
               "plus the encoder's ~1.8 ms at 0.6-1.5x"),
    # §6.5 / §6.6: the eager fused kernels, and the same kernels inside the compiled graph
    Prediction("6.5", "e2e", "B", "fast-eager-fusednorm", "fast-eager", 1.06, 1.10,
               "fused add + LayerNorm: 20.2 GB less traffic per step (if the host keeps ahead, §7.3)"),
    Prediction("6.10", "e2e", "B", "fast-compiled-fusednorm", "fast-compiled", 0.98, 1.05,
               "4.1 GB fewer bytes and 42 fewer eager sums (§6.5's 0.97-1.03x revised before measuring)"),
    Prediction("6.6", "e2e", "B", "fast-eager-fusedgelu", "fast-eager", 1.01, 1.03,
               "fused bias + GELU: 2.5 GB less traffic per step (if the host keeps ahead, §7.3)"),
    Prediction("6.6", "e2e", "B", "fast-compiled-fusedgelu", "fast-compiled", 0.98, 1.02,
               "Inductor does the same fusion; >= 1.03x: auto should use the kernel under compile"),
    # §6.11: max-autotune, the GELU and its gradient in the GEMM templates' epilogues
    Prediction("6.11", "e2e", "B", "fast-compiled-autotune", "fast-compiled", 1.00, 1.08,
               "13.2 GB fewer in Inductor's kernels if the Triton templates win; autotune keeps cuBLAS where not"),
    Prediction("6.5", "kernel", "ViT-B/16", "add_layer_norm/triton/fwd+bwd", "torch eager", 1.5, INF,
               "~2x fewer bytes and ~6 fewer launches than torch's ops"),
    Prediction("6.5", "kernel", "ViT-B/16", "add_layer_norm/triton/fwd+bwd", "torch.compile", 0.85, 1.15,
               "torch.compile does the same fusion"),
    Prediction("6.6", "kernel", "ViT-B/16", "bias_gelu/triton/fwd+bwd", "torch eager", 3.0, 5.0,
               "5.6x fewer bytes than the fp32 reference's ops"),
    Prediction("6.6", "kernel", "ViT-B/16", "bias_gelu/triton/fwd+bwd", "torch.compile", 0.85, 1.15,
               "torch.compile does the same fusion"),
    Prediction("6.2", "kernel", "ViT-B/16", "three_ops/triton/fwd+bwd", "graph_ms", 0.0, 0.6,
               "ms in a CUDA-graph replay: most of the eager call's 2.5 ms is host overhead"),
    # §6.3 / §6.4: the trainer on one GPU (ViT-B b256, bf16 autocast)
    Prediction("6.4", "trainer", "B", "pretrain_B_compiled", "e2e:e2e_B/fast-compiled", 0.95, 1.05,
               "the steady step no longer waits for the device (different runs: drift included)"),
    Prediction("6.4", "busy", "B", "pretrain_B_compiled", "", 0.94, 1.0,
               "within 3 points of e2e's 97%"),
    Prediction("6.4", "waits", "B", "pretrain_B_compiled", "", 0.0, 0.0,
               "the steady step reads nothing back from the device on ZeRO-0 (0 per step on the CPU too)"),
    Prediction("6.4", "waits", "B", "pretrain_B_compiled_timer", "", 2.0, 2.0,
               "DeepSpeed's throughput timer: 2 synchronize() per step (counted on the CPU)"),
    Prediction("6.4", "trainer", "B", "pretrain_B_compiled_timer", "pretrain_B_compiled", 0.92, 0.98,
               "DeepSpeed's throughput timer puts back 2 device waits per step"),
    Prediction("6.3", "trainer", "B", "pretrain_B_z2_compiled_bf16-pure", "pretrain_B_z2_compiled_bf16", 1.03, 1.10,
               "a bf16 residual stream: fewer LayerNorm, GELU and residual bytes"),
    # §6.9: fastmae's compiled step's Inductor kernels, as fast as the reference's were on 2026-11-27's H100
    Prediction("6.9", "bandwidth", "B", "e2e_B/fast-compiled", "layernorm", 0.85, 0.95,
               "the reference's LayerNorm kernels ran at 92% of copy on the H100"),
    Prediction("6.9", "bandwidth", "B", "e2e_B/fast-compiled", "gelu", 0.85, 0.95,
               "the reference's GELU kernels ran at 92% of copy on the H100"),
    Prediction("6.9", "bandwidth", "B", "e2e_B/fast-compiled", "reduction", 0.75, 0.85,
               "the reference's reductions ran at 79% of copy (its 84 aten sums left out)"),
    Prediction("6.9", "bandwidth", "B", "e2e_B/fast-compiled", "masking/gather/copy", 0.75, 0.85,
               "the reference's casts and copies ran at 78% of copy"),
]

# §6.2: a variant's round medians should agree within this (max - min) / median
ROUND_SPREAD_MAX = 0.03


@dataclass(frozen=True)
class Decision:
    """A default in the code that one measurement of the GPU check settles: the candidate `a` against `b`, what the
    code does now, read as a Prediction of the same kind and model is. `change` is the edit to make when a is the
    faster over its whole measured range; when b is, the code stays as it is; otherwise the run cannot tell."""
    source: str  # section of benchmarks/NOTES.md
    kind: str  # "e2e", "attention" or "trainer", as Prediction.kind
    model: str
    a: str
    b: str
    change: str


_HEAD_OR_SPLIT = ("the split backward at this B * H: `auto` should pick it here (HEAD_BACKWARD_MIN_HEADS, "
                  "kernels/fastmae_kernels/triton_ops/attention.py, above it)")

DECISIONS = [
    Decision("7.6", "e2e", "B", "fast-compiled-tritonattn-dec", "fast-compiled",
             "'triton' as the CUDA default of --decoder_attn_backend (fastmae/train/config.py) and of the model's "
             "decoder_attn_backend"),
    Decision("7.6", "e2e", "B", "fast-compiled-tritonattn", "fast-compiled-tritonattn-dec",
             "'triton' as the CUDA default of --attn_backend too (the encoder's attention)"),
    *(Decision("7.6", "attention", model, f"{stack}/triton-split", "triton-head", _HEAD_OR_SPLIT)
      for model in ("B", "L", "H") for stack in ("decoder", "encoder")),
    Decision("6.11", "e2e", "B", "fast-compiled-autotune", "fast-compiled",
             "--compile_mode max-autotune-no-cudagraphs as the trainer's default under --compile"),
    Decision("6.2", "e2e", "B", "fast-compiled-flash", "fast-compiled",
             "SDPA held to its flash backend inside the compiled model"),
    Decision("6.6", "e2e", "B", "fast-compiled-fusedgelu", "fast-compiled",
             "the bias + GELU kernel under --compile by default (--fused_block_ops' GELU half)"),
    Decision("6.10", "e2e", "B", "fast-compiled-fusednorm", "fast-compiled",
             "the residual add + LayerNorm kernel under --compile by default (--fused_block_ops' norm half)"),
    *(Decision("7.4", "e2e", model, "fast-eager-fusedblocks-graphed", "fast-eager-graphed",
               "the fused block kernels by default where the eager step is one CUDA-graph replay")
      for model in ("B", "H")),
    Decision("6.3", "trainer", "B", "pretrain_B_z2_compiled_bf16-pure", "pretrain_B_z2_compiled_bf16",
             "the README names --precision bf16-pure as the faster choice (a bf16 residual stream, not the "
             "paper's fp32 one; the default stays bf16 autocast)"),
]
