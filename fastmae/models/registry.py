"""Model registry: the official names (and short aliases), plus tiny configs for tests and CPU demos."""

from functools import partial

import torch.nn as nn

from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.reference_mae import ReferenceMAE
from fastmae.models.vit_block import LayerNorm

_LN = partial(LayerNorm, eps=1e-6)  # nn.LayerNorm that can also fuse the residual add
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

CONFIGS: dict[str, dict] = {
    "mae_vit_base_patch16_dec512d8b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER),
    "mae_vit_large_patch16_dec512d8b": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER),
    "mae_vit_huge_patch14_dec512d8b": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER),
    # CPU-sized: ViT-"tiny" shape on 32-64 px images; used by tests and the embedded-default demo.
    "mae_vit_tiny_patch4_dec64d2b": dict(
        img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
    ),
    "mae_vit_small_patch8_dec128d2b": dict(
        img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
}
ALIASES = {
    "mae_vit_base_patch16": "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16": "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14": "mae_vit_huge_patch14_dec512d8b",
}


def model_names() -> list[str]:
    return sorted([*CONFIGS, *ALIASES])


def model_config(name: str) -> dict:
    """The constructor arguments of a registered model (a copy)."""
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    return dict(mlp_ratio=4.0, norm_layer=_LN, **CONFIGS[key])


def create_model(name: str, reference: bool = False, **overrides) -> nn.Module:
    """Builds a registered MAE; `reference=True` gives the plain official formulation instead."""
    kwargs = {**model_config(name), **overrides}
    if reference:
        kwargs.pop("backend", None)
        return ReferenceMAE(**kwargs)
    return MaskedAutoencoderViT(**kwargs)
