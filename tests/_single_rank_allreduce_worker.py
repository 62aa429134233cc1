"""One process, ZeRO-0: the gradients after DeepSpeed's all-reduce over one rank equal those without it, bit
for bit, and skipping it drops the flatten + copy-back. For tests/test_single_rank_allreduce.py; prints JSON."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastmae.profiling import WrittenBytes  # noqa: E402
from fastmae.train.config import parse_config  # noqa: E402
from fastmae.train.distributed import init_distributed  # noqa: E402
from fastmae.train.engine import build_engine  # noqa: E402


def main() -> None:
    cfg = parse_config(["--zero_stage", "0", "--output_dir", sys.argv[1]], device_type="cpu", world_size=1)
    init_distributed()
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, torch.device("cpu"))
    result = {"allreduce_on": engine.enable_backward_allreduce}
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # [N, 3, 32, 32]
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(2))  # [N, L]
    grads = {}
    for allreduce in (True, False):
        engine.enable_backward_allreduce = allreduce
        engine.zero_grad()
        loss = engine(imgs, mask_ratio=0.75, noise=noise)[0]
        counter = WrittenBytes()
        with counter:
            engine.backward(loss)
        grads[allreduce] = [p.grad.clone() for p in engine.module.parameters() if p.grad is not None]
        result[f"bytes_{allreduce}"] = sum(counter.bytes.values())
    result["grad_tensors"] = len(grads[True])
    result["grad_bytes"] = sum(g.numel() * g.element_size() for g in grads[True])
    result["equal"] = len(grads[True]) == len(grads[False]) and all(
        torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
