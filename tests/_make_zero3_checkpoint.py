"""Writes a tiny DeepSpeed ZeRO-3 checkpoint for tests/test_export_zero.py (run with 2 processes on CPU):

    torchrun --nproc_per_node 2 tests/_make_zero3_checkpoint.py OUT_DIR

Trains the tiny MAE for one step under ZeRO-3 (so the weights differ from init and every parameter is
partitioned over the 2 ranks), saves a DeepSpeed checkpoint under OUT_DIR/checkpoints/ (tag "step1",
`latest` pointer), and on rank 0 writes OUT_DIR/expected.pt: the full parameters gathered from the live
engine, which the consolidated checkpoint must reproduce exactly.
"""

import os
import sys

import deepspeed
import torch

from fastmae.models import create_model


def main(out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,  # plain torch AdamW: DeepSpeed's fused ones need CUDA
        "steps_per_print": 1000,
    }
    # The registry's tiny model as is (~1M parameters), so readers can guess it from the shapes.
    model = create_model("mae_vit_tiny_patch4_dec64d2b", backend="torch")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=config)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    loss, _, _ = engine(imgs)
    engine.backward(loss)
    engine.step()
    ckpt = os.path.join(out_dir, "checkpoints")
    engine.save_checkpoint(ckpt, tag="step1")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        full = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "expected.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
