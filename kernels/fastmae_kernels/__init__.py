"""fastmae_kernels: fused MAE ops (patch gathering, mask-token insertion, norm-pix masked MSE) and the ViT
block's residual add + LayerNorm and its MLP's bias + GELU; attention for short sequences (`attention`,
backend "sdpa" or "triton").

Every op takes `backend="auto"|"torch"|"triton"|"cuda"`; "torch" is the plain reference.
"""

from fastmae_kernels.dispatch import BACKENDS, available_backends, resolve_backend
from fastmae_kernels.ops import (
    ATTENTION_BACKENDS,
    add_layer_norm,
    attention,
    bias_gelu,
    gather_patches,
    gather_tokens,
    insert_mask_tokens,
    masked_mse_loss,
    random_masking,
)

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "random_masking",
    "gather_patches",
    "gather_tokens",
    "insert_mask_tokens",
    "masked_mse_loss",
    "add_layer_norm",
    "bias_gelu",
    "ATTENTION_BACKENDS",
    "attention",
]
