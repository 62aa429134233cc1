"""Patch embedding that keeps the official Conv2d parameter (`patch_embed.proj`) but can also run as a
Linear on already-gathered patches, so the encoder embeds only the visible 25%."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """All patches: [N, C, H, W] -> [N, L, D] (the official path)."""
        return self.proj(imgs).flatten(2).transpose(1, 2)

    def linear_weight(self) -> torch.Tensor:
        """The conv kernel [D, C, p, q] as a Linear weight [D, p*q*C] for patches in (p, q, c) order."""
        w = self.proj.weight
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Gathered patches [N, K, p*p*C] -> [N, K, D]; equal to the conv on those patches."""
        return F.linear(patches, self.linear_weight(), self.proj.bias)
