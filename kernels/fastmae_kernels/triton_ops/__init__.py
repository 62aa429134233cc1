"""The "triton" backend: fused Triton kernels for the five MAE ops, add_layer_norm and bias_gelu, forward and backward;
and attention for short sequences (reached through fastmae_kernels.attention(..., backend="triton") only).

One file per op (kernel -> launcher -> autograd), each op registered as a `torch.library.custom_op`
in the `fastmae_triton` namespace with a fake implementation, so torch.compile traces it as a single
node. Inputs arrive validated by `fastmae_kernels.checks`; this backend adds its own dtype rule
(fp32/bf16/fp16; fp64 raises, use backend="torch"). On CPU tensors the kernels run only under the
Triton interpreter (TRITON_INTERPRET=1 set before import), which is for tests, not for speed.
"""

from fastmae_kernels.triton_ops._common import unavailable_reason
from fastmae_kernels.triton_ops.add_layer_norm import add_layer_norm
from fastmae_kernels.triton_ops.attention import attention
from fastmae_kernels.triton_ops.bias_gelu import bias_gelu
from fastmae_kernels.triton_ops.gather_patches import gather_patches
from fastmae_kernels.triton_ops.gather_tokens import gather_tokens
from fastmae_kernels.triton_ops.insert_mask_tokens import insert_mask_tokens
from fastmae_kernels.triton_ops.masked_mse_loss import masked_mse_loss
from fastmae_kernels.triton_ops.random_masking import random_masking

__all__ = [
    "unavailable_reason",
    "random_masking",
    "gather_patches",
    "gather_tokens",
    "insert_mask_tokens",
    "masked_mse_loss",
    "add_layer_norm",
    "bias_gelu",
    "attention",
]
