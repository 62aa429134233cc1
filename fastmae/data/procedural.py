"""The embedded default data set: labelled images drawn procedurally, so pretraining and the linear
probe run on a fresh machine with no download.

Each image is a smooth two-colour background with one textured shape from one of ten families (the
label). Drawing is deterministic in (seed, index), so every rank and every resume sees the same image
for the same index, and the structure (edges, periodic textures, smooth gradients) gives MAE
something real to reconstruct from 25% of the patches.
"""

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

CLASS_NAMES = (
    "disk", "square", "triangle", "rings", "checker",
    "h_stripes", "v_stripes", "d_stripes", "dots", "cross",
)


def _shape_mask(family: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float mask in [0, 1] for one shape family on coordinates in [-1, 1]."""
    cy, cx = rng.uniform(-0.3, 0.3, size=2)
    r = rng.uniform(0.35, 0.7)
    y, x = yy - cy, xx - cx
    period = rng.uniform(0.15, 0.35)
    inside_box = (np.abs(y) < r) & (np.abs(x) < r)
    if family == 0:
        return (y**2 + x**2 < r**2).astype(np.float32)
    if family == 1:
        return inside_box.astype(np.float32)
    if family == 2:
        return ((y < r) & (y > -r + 2 * np.abs(x))).astype(np.float32)
    if family == 3:
        d = np.sqrt(y**2 + x**2)
        return ((np.floor(d / period) % 2 == 0) & (d < r * 1.4)).astype(np.float32)
    if family == 4:
        return (((np.floor(y / period) + np.floor(x / period)) % 2 == 0) & inside_box).astype(np.float32)
    if family == 5:
        return ((np.floor(y / period) % 2 == 0) & inside_box).astype(np.float32)
    if family == 6:
        return ((np.floor(x / period) % 2 == 0) & inside_box).astype(np.float32)
    if family == 7:
        return ((np.floor((x + y) / period) % 2 == 0) & inside_box).astype(np.float32)
    if family == 8:
        fy, fx = (y / period) % 1.0 - 0.5, (x / period) % 1.0 - 0.5
        return ((fy**2 + fx**2 < 0.09) & inside_box).astype(np.float32)
    if family == 9:
        w = r * 0.3
        return (((np.abs(y) < w) | (np.abs(x) < w)) & inside_box).astype(np.float32)
    raise ValueError(f"unknown shape family {family}")


def draw_image(seed: int, index: int, size: int) -> tuple[np.ndarray, int]:
    """One image [size, size, 3] uint8 and its label, deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASS_NAMES)))
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    # background: a linear gradient between two random colours in a random direction
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0  # [size, size] in (0, 1)
    c0, c1, fg = rng.uniform(0, 1, size=(3, 3)).astype(np.float32)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    mask = _shape_mask(label, yy, xx, rng)[..., None]
    img = img * (1 - mask) + fg * mask
    img += rng.normal(0, 0.02, size=img.shape).astype(np.float32)  # sensor-like noise
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), label


class ProceduralImages(Dataset):
    """`num_images` labelled RGB PIL images of `image_size` px; `transform` applies to the image."""

    classes = list(CLASS_NAMES)

    def __init__(self, num_images: int = 4096, image_size: int = 64, seed: int = 0, transform=None):
        if num_images <= 0 or image_size <= 0:
            raise ValueError(f"num_images and image_size must be positive, got {num_images}, {image_size}")
        self.num_images, self.image_size, self.seed, self.transform = num_images, image_size, seed, transform

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        pixels, label = draw_image(self.seed, index, self.image_size)
        img = Image.fromarray(pixels, mode="RGB")
        return (self.transform(img) if self.transform is not None else img), label
