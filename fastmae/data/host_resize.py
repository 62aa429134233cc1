"""The end of the CPU augmentation for crops that are already decoded: resize, flip, normalise.

DALI's CPU resize is its slow step (224 px, cubic, antialiased, one thread: ~1.6 ms per image, against
~0.7 ms for the ROI decode before it); torch's uint8 antialiased bicubic kernel (vectorised, channels-last)
does the same resampling in ~0.25 ms (docs/data.md, "Speed"). It is the filter PIL applies in the
torchvision loader (Keys cubic, a = -0.5, widened by the downscale factor); rounding differs by a few 1/255
steps, like DALI's own resize. Only the CPU DALI path uses this (in its background thread, background.py):
on a GPU, DALI resizes on the device.
"""

import numpy as np
import torch
import torch.nn.functional as F

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD


def resize_flip_normalize(crops: list[np.ndarray], flips: list[bool], size: int) -> torch.Tensor:
    """crops: B arrays [h_i, w_i, 3] uint8 (RGB, any sizes) -> [B, 3, size, size] float32, ImageNet-normalised,
    the images with flips[i] mirrored left-right."""
    B = len(crops)
    if B != len(flips):
        raise ValueError(f"{B} crops but {len(flips)} flips")
    # per image, while its pixels are in cache: resize, mirror, then uint8 -> float and normalise in place
    scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
    x = torch.empty(B, 3, size, size)  # [B, 3, S, S]
    for i, (crop, flip) in enumerate(zip(crops, flips)):
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crop {i}: expected [h, w, 3] uint8, got {list(crop.shape)} {crop.dtype}")
        # an [h, w, 3] array seen as [1, 3, h, w] is channels-last, the layout of torch's fast uint8 kernel
        chw = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w]
        out = F.interpolate(chw, size=(size, size), mode="bicubic", antialias=True)[0]  # [3, S, S] uint8
        if flip:
            out = out.flip(-1)
        x[i].copy_(out).mul_(scale).add_(shift)
    return x
