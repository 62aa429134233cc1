"""Bytes moved per image by a ViT-B/16 MAE training step's forward + backward (bf16 autocast, eager, the
trainer's masked_only forward), with the residual add + LayerNorm as torch ops vs the fused add_layer_norm
kernel (`norm_backend="triton"`, run here by the Triton interpreter), counted op by op on the CPU.

    TRITON_INTERPRET=1 python benchmarks/results/counts-cpu-20261128/fused_norm_bytes.py \
        > benchmarks/results/counts-cpu-20261128/fused_norm_bytes.txt

Per image = (count at batch 16 - count at batch 8) / 8: what grows with the batch (activations), without the
per-step weight traffic (casts of the weights, their gradients). Read = bytes of each op's tensor inputs,
written = of its outputs (fastmae.profiling.WrittenBytes). CPU autocast has CUDA's policy for these ops
(linear in bf16, layer_norm in fp32), so the counts are the GPU's; they are counts, not timings. The MAE
ops (gathers, mask tokens, loss) run on the torch backend on both sides: only the norms differ.
"""

import os
import sys
from collections import Counter

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the Triton kernel runs in its interpreter on the CPU)")

import torch  # noqa: E402

from fastmae.models.registry import create_model  # noqa: E402
from fastmae.profiling import WrittenBytes, bytes_per_image  # noqa: E402

NAME = "mae_vit_base_patch16_dec512d8b"


def count_step(batch: int, **model_kwargs) -> WrittenBytes:
    """One bf16-autocast forward (masked_only) + backward of ViT-B at `batch`, counted op by op (also used by
    fused_gelu_bytes.py beside this file)."""
    torch.manual_seed(0)
    model = create_model(NAME, backend="torch", norm_pix_loss=True, **model_kwargs)
    imgs = torch.randn(batch, 3, 224, 224)  # [N, 3, 224, 224]
    counter = WrittenBytes()
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, mask_ratio=0.75, masked_only=True)[0]
        loss.backward()
    return counter


def per_image(norm_backend: str) -> tuple[Counter, Counter, Counter]:
    return bytes_per_image(lambda batch: count_step(batch, norm_backend=norm_backend))


def main() -> None:
    print(f"torch {torch.__version__}; {NAME}, bf16 autocast, eager, masked_only; MB per image (read + written)")
    plain, plain_w, plain_calls = per_image("torch")
    fused, fused_w, fused_calls = per_image("triton")
    total_p, total_f = sum(plain.values()), sum(fused.values())
    print(f"\nreference ops: {total_p / 1e6:.1f} MB/img moved ({sum(plain_w.values()) / 1e6:.1f} written), "
          f"{sum(plain_calls.values())} ops per step at batch 16")
    print(f"fused norms:   {total_f / 1e6:.1f} MB/img moved ({sum(fused_w.values()) / 1e6:.1f} written), "
          f"{sum(fused_calls.values())} ops per step at batch 16")
    print(f"difference:    {(total_p - total_f) / 1e6:.1f} MB/img = {(total_p - total_f) * 256 / 1e9:.1f} GB per "
          f"batch-256 step ({(total_f / total_p):.3f} of the bytes)")
    print("\nops whose traffic changed (MB/img; calls per step at batch 16):")
    ops = sorted(set(plain) | set(fused), key=lambda k: (-abs(plain[k] - fused[k]), k))
    for op in ops:
        if abs(plain[op] - fused[op]) < 0.05e6:
            continue
        print(f"  {op:28s} reference ops {plain[op] / 1e6:7.2f} x{plain_calls[op]:4d}   "
              f"fused {fused[op] / 1e6:7.2f} x{fused_calls[op]:4d}")


if __name__ == "__main__":
    main()
