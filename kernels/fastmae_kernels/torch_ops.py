"""The "torch" backend: the plain references, differentiable through ordinary autograd."""

import torch

from fastmae_kernels.reference import (  # noqa: F401  (re-exported as this backend's ops)
    add_layer_norm,
    bias_gelu,
    gather_patches,
    gather_tokens,
    insert_mask_tokens,
    masked_mse_loss,
    random_masking,
)


def unavailable_reason(device: torch.device) -> str | None:
    return None
