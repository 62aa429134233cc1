"""Fixed 2-D sin-cos position embeddings, computed exactly as the official MAE code does (float64 numpy)."""

import numpy as np
import torch


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """positions [M] -> [M, dim]: sin on the first half of the channels, cos on the second."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)  # [M, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """[1, (1 +) grid_h*grid_w, dim] fp32; the cls row (if any) is zeros.

    Like the official code, the first half of the channels encodes the w coordinate of the
    np.meshgrid(w, h) grid and the second half the h coordinate; patches are row-major.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(dim // 2, grid[0]), _sincos_1d(dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)
