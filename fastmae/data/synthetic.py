"""Synthetic batches made on the delivery device: for benchmarks that must not wait on decoding."""

from typing import Iterator

import torch

from fastmae.data.base import LoaderBase
from fastmae.data.config import DataConfig


class SyntheticLoader(LoaderBase):
    """Standard-normal images (the scale of normalised real images), seeded by (seed, epoch, batch, rank)
    so resume reproduces them; `num_images` is cfg.default_num_images."""

    name = "synthetic"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg, cfg.default_num_images)

    def _batches(self, start: int) -> Iterator[torch.Tensor]:
        cfg, device = self.cfg, torch.device(self.cfg.device)
        gen = torch.Generator(device=device)
        for b in range(start, self.steps_per_epoch):
            gen.manual_seed(hash((cfg.seed, self.epoch, b, cfg.rank)) & (2**63 - 1))
            S = cfg.input_size
            yield torch.randn(cfg.batch_size, 3, S, S, generator=gen, device=device)  # [B, 3, S, S]
