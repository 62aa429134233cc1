"""Bytes moved per image by a ViT-B/16 MAE training step's forward + backward (bf16 autocast, eager, the
trainer's masked_only forward, the fused add + LayerNorm on), with each MLP's fc1 bias + GELU as torch ops
(addmm, gelu; backward gelu_backward, the bias gradient's column sum and its cast to fp32) vs the fused
bias_gelu kernel (`gelu_backend="triton"`, run here by the Triton interpreter), counted op by op on the CPU.

    TRITON_INTERPRET=1 python benchmarks/results/counts-cpu-20261128/fused_gelu_bytes.py \
        > benchmarks/results/counts-cpu-20261128/fused_gelu_bytes.txt

Method as fused_norm_bytes.py beside it: per image = (count at batch 16 - count at batch 8) / 8, read + written
bytes of each op's tensors (fastmae.profiling.WrittenBytes); CPU autocast has CUDA's policy for these ops. The
MAE ops run on the torch backend, the norms on the fused kernel on both sides: only the MLP activations differ.
"""

import os
import sys
from collections import Counter

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the Triton kernels run in its interpreter on the CPU)")

import torch  # noqa: E402

from fastmae.profiling import bytes_per_image  # noqa: E402
from fused_norm_bytes import NAME, count_step  # noqa: E402  (the script beside this one)


def per_image(gelu_backend: str) -> tuple[Counter, Counter, Counter]:
    return bytes_per_image(lambda batch: count_step(batch, norm_backend="triton", gelu_backend=gelu_backend))


def main() -> None:
    print(f"torch {torch.__version__}; {NAME}, bf16 autocast, eager, masked_only, add + LayerNorm fused; "
          "MB per image (read + written)")
    plain, plain_w, plain_calls = per_image("torch")
    fused, fused_w, fused_calls = per_image("triton")
    total_p, total_f = sum(plain.values()), sum(fused.values())
    print(f"\nnn.Linear + nn.GELU: {total_p / 1e6:.1f} MB/img moved ({sum(plain_w.values()) / 1e6:.1f} written), "
          f"{sum(plain_calls.values())} ops per step at batch 16")
    print(f"fused bias_gelu:     {total_f / 1e6:.1f} MB/img moved ({sum(fused_w.values()) / 1e6:.1f} written), "
          f"{sum(fused_calls.values())} ops per step at batch 16")
    print(f"difference:          {(total_p - total_f) / 1e6:.1f} MB/img = {(total_p - total_f) * 256 / 1e9:.1f} GB "
          f"per batch-256 step ({(total_f / total_p):.3f} of the bytes)")
    print("\nops whose traffic or count changed (MB/img; calls per step at batch 16):")
    ops = sorted(set(plain) | set(fused), key=lambda k: (-abs(plain[k] - fused[k]), k))
    for op in ops:
        if abs(plain[op] - fused[op]) < 0.05e6 and plain_calls[op] == fused_calls[op]:
            continue
        print(f"  {op:22s} nn modules {plain[op] / 1e6:7.2f} x{plain_calls[op]:4d}   "
              f"fused {fused[op] / 1e6:7.2f} x{fused_calls[op]:4d}")


if __name__ == "__main__":
    main()
