"""random_masking: noise [N, L] -> (ids_keep [N, K], ids_restore [N, L], mask [N, L]), official semantics.

The sort stays torch.argsort (the same call as the reference, so ties break identically); one kernel
then writes ids_keep, the inverse permutation ids_restore and the mask by scatter, replacing the
reference's second argsort and its ones/gather for the mask.
"""

import torch
import triton
import triton.language as tl

from fastmae_kernels.reference import num_kept
from fastmae_kernels.triton_ops._cast import round_to
from fastmae_kernels.triton_ops._common import INTERPRETED


@triton.jit
def _invert_kernel(
    shuffle_ptr, keep_ptr, restore_ptr, mask_ptr,
    batch, length, keep,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rank = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L] position in the sorted order
    ok = (n < batch)[:, None] & (rank < length)[None, :]
    row = n[:, None] * length
    src = tl.load(shuffle_ptr + row + rank[None, :], mask=ok, other=0)  # [BLOCK_N, BLOCK_L] patch ids
    tl.store(restore_ptr + row + src, rank[None, :].to(tl.int64) + tl.zeros_like(src), mask=ok)
    removed = (rank >= keep)[None, :] & ok
    removed = tl.where(removed, 1.0, 0.0)  # via fp32: the interpreter casts int1 -> bf16 wrongly
    tl.store(mask_ptr + row + src, round_to(removed, mask_ptr.dtype.element_ty), mask=ok)
    is_kept = (rank < keep)[None, :] & ok
    tl.store(keep_ptr + n[:, None] * keep + rank[None, :], src, mask=is_kept)


@torch.library.custom_op("fastmae_triton::random_masking", mutates_args=())
def random_masking_op(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, length = noise.shape
    keep = num_kept(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1).contiguous()  # [N, L] ascending: small is keep
    ids_keep = torch.empty((n, keep), dtype=torch.int64, device=noise.device)
    ids_restore = torch.empty((n, length), dtype=torch.int64, device=noise.device)
    mask = torch.empty((n, length), dtype=noise.dtype, device=noise.device)
    if n * length:
        block_l = min(triton.next_power_of_2(length), 256)
        block_n = max(1, (8192 if INTERPRETED else 1024) // block_l)
        grid = (triton.cdiv(n, block_n), triton.cdiv(length, block_l))
        _invert_kernel[grid](
            ids_shuffle, ids_keep, ids_restore, mask, n, length, keep, BLOCK_N=block_n, BLOCK_L=block_l
        )
    return ids_keep, ids_restore, mask


@random_masking_op.register_fake
def _(noise, mask_ratio):
    n, length = noise.shape
    keep = num_kept(length, mask_ratio)
    return (
        noise.new_empty((n, keep), dtype=torch.int64),
        noise.new_empty((n, length), dtype=torch.int64),
        noise.new_empty((n, length)),
    )


def random_masking(noise: torch.Tensor, mask_ratio: float):
    return random_masking_op(noise.detach(), float(mask_ratio))
