"""The official MAE learning-rate schedule: linear warmup, then a half-cycle cosine down to min_lr.

It is a function of the fractional epoch (epoch + batch_in_epoch / steps_per_epoch), evaluated once
per optimizer step at the first micro-batch of the step, exactly as the official
`adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)`.
"""

import math

import torch


def lr_at(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, value: float) -> None:
    """Sets every group's lr (groups may carry an `lr_scale`, as in fine-tuning recipes). A tensor lr (a
    capturable optimizer's, fastmae.cuda_graph) is written in place, no host wait: a captured step reads that
    tensor's memory and sees the new value at its next replay."""
    for group in optimizer.param_groups:
        scaled = value * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(scaled)
        else:
            group["lr"] = scaled
