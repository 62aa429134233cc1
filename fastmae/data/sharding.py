"""Which sample indices each rank reads in each epoch: exactly torch's DistributedSampler order.

The epoch order is `torch.randperm(n)` seeded with `seed + epoch`; it is padded by repeating its first
`pad = ceil(n / world) * world - n` entries so every rank gets the same count, then rank r takes
every world-th index starting at r. Each rank then drops its last incomplete batch (drop_last).
So per epoch: up to world_size - 1 images are seen twice (padding) and up to batch_size - 1 images
per rank are not seen (a different set each epoch, since the order is reshuffled).
"""

import math

import numpy as np
import torch


def rank_indices(num_images: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The indices rank `rank` reads in `epoch`, in order: [ceil(num_images / world_size)] int64."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)  # DistributedSampler's seeding, so the orders match it exactly
    order = torch.randperm(num_images, generator=g).numpy()
    per_rank = math.ceil(num_images / world_size)
    pad = per_rank * world_size - num_images
    if pad:
        order = np.concatenate([order, np.resize(order, pad)])  # np.resize repeats when pad > n
    return order[rank::world_size].astype(np.int64)


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Full batches per rank per epoch (drop_last)."""
    return math.ceil(num_images / world_size) // batch_size
