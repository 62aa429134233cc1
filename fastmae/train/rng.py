"""Every RNG a rank owns, captured and restored for exact resume.

The masking noise does not need saving: it is drawn from a generator seeded by (seed, epoch, batch),
see `masking_noise`. The loader's randomness is keyed by (seed, epoch, index) and its position is
in its own state_dict. Saving the global RNGs as well keeps anything else (a future dropout, a user
hook) exact.
"""

import random

import numpy as np
import torch

_NOISE_STREAM = 0x3A5C  # keeps the masking stream apart from other uses of the seed


def capture() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def masking_noise(
    seed: int, epoch: int, batch: int, rank: int, world_size: int, batch_size: int, num_patches: int,
    device: torch.device,
) -> torch.Tensor:
    """This rank's uniform masking noise [batch_size, L] for the loader's batch `batch` of `epoch`.

    The noise of the whole global batch [world_size * batch_size, L] comes from one generator seeded by
    (seed, epoch, batch); rank r takes rows r, r + W, r + 2W, ... . The loader shards like
    DistributedSampler (rank r reads every W-th sample of the epoch order, fastmae/data/sharding.py),
    so row k of the global noise always belongs to the same image whatever the world size: one process
    with batch W*B and W processes with batch B see identical (image, noise) pairs.
    """
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([_NOISE_STREAM, seed, epoch, batch]).generate_state(1, np.uint64)[0] >> 1))
    noise = torch.rand(world_size * batch_size, num_patches, generator=g, device=device)  # [W*B, L]
    return noise[rank::world_size]  # [B, L]
