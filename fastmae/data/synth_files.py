"""Real-looking image files on disk for tests and benchmarks (never downloaded).

Images are ProceduralImages drawn at the requested size plus multi-scale texture noise, so JPEGs have
realistic entropy (flat-colour JPEGs decode several times faster than photos and would flatter any
decoder). Optional bad files cover what real folders contain: truncated and corrupt JPEGs,
non-image files, grayscale, CMYK, palette and RGBA PNG inputs.
"""

import io
import os

import numpy as np
from PIL import Image

from fastmae.data.procedural import CLASS_NAMES, draw_image


def textured_image(seed: int, index: int, height: int, width: int) -> np.ndarray:
    """[height, width, 3] uint8: a procedural shape image with photo-like texture."""
    side = max(height, width)
    base, _ = draw_image(seed, index, side)
    img = base[:height, :width].astype(np.float32)
    rng = np.random.default_rng([seed, index, 7])
    for cell, amplitude in ((32, 12.0), (8, 12.0), (2, 6.0)):  # blotches, texture, fine texture
        small = rng.normal(0, 1, size=(height // cell + 2, width // cell + 2)).astype(np.float32)
        noise = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))[..., None]
        img += noise * amplitude
    img += rng.normal(0, 7.0, size=img.shape).astype(np.float32)  # per-pixel colour grain, like sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_imagefolder(
    root: str, num_images: int, *, seed: int = 0, min_side: int = 96, max_side: int = 160,
    num_classes: int = 4, quality: int = 90,
) -> list[str]:
    """Write `num_images` textured JPEGs as root/<class>/<i>.jpg; returns their paths in listing order."""
    rng = np.random.default_rng([seed, 1])
    paths = []
    for i in range(num_images):
        cls = CLASS_NAMES[i % num_classes]
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        path = os.path.join(root, cls, f"{i:06d}.jpg")
        with open(path, "wb") as f:
            f.write(jpeg_bytes(textured_image(seed, i, h, w), quality))
        paths.append(path)
    return sorted(paths)


def write_bad_files(folder: str, seed: int = 0) -> dict[str, str]:
    """Write one file of each awkward kind into `folder`; returns {file name: expected handling}.

    Handling: "unreadable" (skipped, counted), "non_image" (ignored at listing, counted),
    "converted" (decoded to RGB, counted)."""
    os.makedirs(folder, exist_ok=True)
    px = textured_image(seed, 99, 120, 100)
    good = jpeg_bytes(px)
    corrupt = bytearray(good)
    corrupt[2:40] = bytes(range(38))  # destroys the JPEG header segments
    files = {
        "zz_truncated.jpg": (good[: len(good) // 2], "unreadable"),
        "zz_corrupt.jpg": (bytes(corrupt), "unreadable"),
        "zz_random_bytes.jpg": (np.random.default_rng(seed).bytes(5000), "unreadable"),
        "zz_empty.jpg": (b"", "unreadable"),
        "zz_notes.txt": (b"not an image\n", "non_image"),
        "zz_gray.jpg": (jpeg_bytes(px, mode="L"), "converted"),
        "zz_cmyk.jpg": (jpeg_bytes(px, mode="CMYK"), "converted"),
    }
    for mode in ("RGB", "RGBA", "P", "L"):
        buf = io.BytesIO()
        Image.fromarray(px, mode="RGB").convert(mode).save(buf, format="PNG")
        files[f"zz_png_{mode.lower()}.png"] = (buf.getvalue(), "ok" if mode == "RGB" else "converted")
    for name, (data, _) in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return {name: handling for name, (_, handling) in files.items()}
