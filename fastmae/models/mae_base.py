"""Parameters and initialisation shared by fastmae's MAE and the plain reference MAE.

Parameter names are the official ones, so public MAE checkpoints load with strict=True.
"""

import torch
import torch.nn as nn

from fastmae.models.patch_embed import PatchEmbed
from fastmae.models.pos_embed import sincos_2d
from fastmae.models.vit_block import Block, LayerNorm
from fastmae_kernels.reference import patchify, unpatchify


class MAEParameters(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=LayerNorm,
        norm_pix_loss: bool = False,
        block_cls=Block,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                block_cls(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.initialize_weights()

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def initialize_weights(self) -> None:
        """The official initialisation: fixed sin-cos positions, xavier-uniform Linear (and the patch
        projection viewed as a Linear), normal(0.02) tokens, LayerNorm (1, 0)."""
        gh, gw = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], gh, gw, cls_token=True))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], gh, gw, cls_token=True))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        h, w = self.patch_embed.img_size
        return unpatchify(x, self.patch_size, self.in_chans, h, w)

    def check_images(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, *self.patch_embed.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"MAE expects images [N, {expected[0]}, {expected[1]}, {expected[2]}], got {list(imgs.shape)}")

    def make_noise(self, imgs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The masking noise [N, L]: the caller's, or uniform [0, 1) as the official code draws it."""
        length = self.patch_embed.num_patches
        if noise is None:
            return torch.rand(imgs.shape[0], length, device=imgs.device)
        if tuple(noise.shape) != (imgs.shape[0], length):
            raise ValueError(f"noise must be [{imgs.shape[0]}, {length}], got {list(noise.shape)}")
        return noise
