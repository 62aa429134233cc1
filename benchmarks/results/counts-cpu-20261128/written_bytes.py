"""Bytes written per training step (forward + backward, fp32, no optimizer), fastmae (torch backend) vs the
reference MAE, counted op by op on meta tensors (shapes only: no memory, any size runs on a laptop).

    python benchmarks/results/counts-cpu-20261128/written_bytes.py \
        > benchmarks/results/counts-cpu-20261128/written_bytes.txt

Every aten op's outputs are counted except views and _unsafe_view (reshapes: no memory written). A structural
count, not a timing: it asks whether fastmae's step at ViT-H shapes does extra passes that ViT-B's does not
(2026-11-28: it does not; the ratio is the same for both, NOTES §6.4).
"""

import torch

from fastmae.models.registry import create_model
from fastmae.profiling import WrittenBytes

SHAPES = (("mae_vit_base_patch16_dec512d8b", 256), ("mae_vit_huge_patch14_dec512d8b", 64))


def count(name: str, batch: int, reference: bool) -> WrittenBytes:
    model = create_model(name, reference=reference, **({} if reference else {"backend": "torch"})).to("meta")
    imgs = torch.empty(batch, 3, 224, 224, device="meta")  # [N, 3, 224, 224]
    noise = torch.empty(batch, model.patch_embed.num_patches, device="meta")  # [N, L]
    counter = WrittenBytes()
    with counter:
        loss = model(imgs, mask_ratio=0.75, noise=noise)[0]
        loss.backward()
    return counter


def main() -> None:
    print(f"torch {torch.__version__}; bytes written per fwd+bwd step, fp32, views excluded")
    for name, batch in SHAPES:
        fast, ref = count(name, batch, reference=False), count(name, batch, reference=True)
        total_f, total_r = sum(fast.bytes.values()), sum(ref.bytes.values())
        print(f"\n{name} batch {batch}: fastmae {total_f / 1e9:.2f} GB in {sum(fast.calls.values())} ops, "
              f"reference {total_r / 1e9:.2f} GB in {sum(ref.calls.values())} ops, ratio {total_f / total_r:.3f}")
        ops = sorted(set(fast.bytes) | set(ref.bytes), key=lambda k: (-abs(fast.bytes[k] - ref.bytes[k]), k))
        for op in ops[:10]:
            print(f"  {op:24s} fastmae {fast.bytes[op] / 1e9:7.3f} GB x{fast.calls[op]:4d}   "
                  f"reference {ref.bytes[op] / 1e9:7.3f} GB x{ref.calls[op]:4d}")


if __name__ == "__main__":
    main()
