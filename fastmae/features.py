"""The pretrained MAE encoder as a plain ViT feature extractor (all patches, no masking), computing what
timm's VisionTransformer / the official models_vit compute with the same weights.

Pooling, as the official linear probe offers it:
- "cls": the final LayerNorm (`norm`) then the cls token (the paper's linear-probing default);
- "avg": the mean of the patch tokens before `norm`, then a LayerNorm without affine (the official
  `fc_norm` is created fresh and stays frozen at weight 1, bias 0 in linear probing), eps 1e-6.
"""

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

POOLS = ("cls", "avg")


class FrozenEncoder(nn.Module):
    """Shares (does not copy) the encoder modules of an MAE; the decoder is left behind."""

    def __init__(self, mae: nn.Module, pool: str = "cls"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        self.patch_embed, self.blocks, self.norm = mae.patch_embed, mae.blocks, mae.norm
        self.cls_token, self.pos_embed = mae.cls_token, mae.pos_embed
        self.embed_dim = mae.cls_token.shape[-1]
        self.img_size = mae.patch_embed.img_size
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # frozen: no mode change (no dropout / drop-path anyway)

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> the block outputs [N, 1+L, D], before the final norm."""
        expected = (self.patch_embed.proj.in_channels, *self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"encoder expects images [N, {expected[0]}, {expected[1]}, {expected[2]}], got {list(imgs.shape)}")
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [N, L, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1+L, D]
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> pooled features [N, D]."""
        x = self.forward_tokens(imgs)  # [N, 1+L, D]
        if self.pool == "cls":
            return self.norm(x)[:, 0]
        return F.layer_norm(x[:, 1:].mean(dim=1), (x.shape[-1],), eps=1e-6)


@torch.no_grad()
def encode(encoder: FrozenEncoder, imgs: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Pooled fp32 features [N, D] of imgs [N, C, H, W] on `device`; bf16 autocast on CUDA (as the
    official probe runs under autocast)."""
    on_cuda = torch.device(device).type == "cuda"
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda):
        return encoder(imgs.to(device, non_blocking=True)).float()


@torch.no_grad()
def extract_features(
    encoder: FrozenEncoder,
    batches: Iterable,
    device: torch.device | str = "cpu",
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the encoder over (images, labels) batches; returns (features [N, D] fp32, labels [N] int64) on CPU.
    On CUDA the encoder runs under bf16 autocast (as the official probe runs under autocast)."""
    feats, labels = [], []
    for imgs, y in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        feats.append(encode(encoder, imgs, device).cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
    if not feats:
        raise ValueError(f"no images to extract {desc} from")
    return torch.cat(feats), torch.cat(labels)
