"""A PNG of what an MAE sees and predicts, one row per image:

    original | masked input | reconstruction | reconstruction with the visible patches pasted back

Works with any model exposing the official interface (forward(imgs, mask_ratio, noise) -> (loss, pred,
mask), patchify, unpatchify, norm_pix_loss). With norm_pix_loss the model predicts each patch
normalised by its own mean and variance, so predictions are mapped back with the target patch's
statistics, as the official visualisation demo does.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD  # the normalisation the loaders apply

_GAP = 2  # px between tiles


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, seed: int) -> dict[str, torch.Tensor]:
    """imgs [N, C, H, W] normalised -> dict of normalised images [N, C, H, W] (fp32):
    original, masked, reconstruction, pasted."""
    param = next(model.parameters())
    imgs = imgs.to(param.device)
    n, length = imgs.shape[0], model.patch_embed.num_patches
    g = torch.Generator(device=imgs.device).manual_seed(seed)
    noise = torch.rand(n, length, generator=g, device=imgs.device)  # [N, L]
    was_training = model.training
    model.eval()
    try:
        # the class's forward: a compiled forward bound to the model (--compile) would recompile for this batch
        _, pred, mask = type(model).forward(model, imgs.to(param.dtype), mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    pred, imgs = pred.float(), imgs.float()  # [N, L, p*p*C]
    if getattr(model, "norm_pix_loss", False):
        target = model.patchify(imgs)  # [N, L, p*p*C]
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)  # [N, C, H, W]
    p2c = pred.shape[-1]
    mask_img = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p2c))  # 1 on removed patches
    return {
        "original": imgs,
        "masked": imgs * (1 - mask_img),
        "reconstruction": recon,
        "pasted": imgs * (1 - mask_img) + recon * mask_img,
        "mask": mask_img,
    }


def _to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[C, H, W] normalised -> [H, W, C] uint8."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def save_reconstruction_grid(
    model,
    imgs: torch.Tensor,
    path: str,
    mask_ratio: float = 0.75,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: int | None = None,
) -> str:
    """Writes the grid PNG for imgs [N, C, H, W] (normalised with mean/std) to `path`; returns path.

    Masked patches are shown grey in the masked-input column. `scale` upsamples small images
    (nearest) so 32 px inputs stay visible; default: up to ~128 px per tile."""
    out = reconstruct(model, imgs, mask_ratio, seed)
    n, _, h, w = out["original"].shape
    scale = scale or max(1, 128 // max(h, w))
    grey = torch.tensor(mean, device=out["mask"].device).view(1, -1, 1, 1)
    grey = (0.5 - grey) / torch.tensor(std, device=grey.device).view(1, -1, 1, 1)  # normalised mid-grey
    masked = out["masked"] + out["mask"] * grey
    cols = [out["original"], masked, out["reconstruction"], out["pasted"]]
    th, tw = h * scale, w * scale
    canvas = np.full((n * (th + _GAP) + _GAP, len(cols) * (tw + _GAP) + _GAP, 3), 255, np.uint8)
    for i in range(n):
        for j, col in enumerate(cols):
            tile = _to_uint8(col[i], mean, std).repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = _GAP + i * (th + _GAP), _GAP + j * (tw + _GAP)
            canvas[y : y + th, x : x + tw] = tile
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
