"""The host side of the DALI loader: per sample, the encoded bytes (or pixels), the crop window and the
flip, drawn from `augment_params(seed, epoch, index, h, w)` exactly as the torchvision loader does.

Only the JPEG/PNG header is parsed here (PIL, ~20 us) to learn the size the crop needs; DALI decodes.
Inputs DALI's decoder might choke on are settled here, so the pipeline never fails mid-epoch:
  - truncated JPEG (no end-of-image marker) / truncated PNG (no IEND), unreadable or non-image bytes:
    skipped, the next readable index is used instead (counted "unreadable");
  - JPEG or PNG in grayscale: passed through, DALI converts to RGB (counted "converted");
  - any other mode (CMYK, RGBA, palette, 16-bit) or format (BMP, TIFF, WebP, ...): decoded by PIL to RGB
    and handed over as a PPM, which DALI reads without further conversion (counted "converted" when the
    colour mode was not RGB).
A file whose structure is intact but whose compressed data is corrupt passes these checks. If DALI's
decoder then fails, the loader calls `find_bad` on the batches in flight: files PIL cannot decode either
join `known_bad` and are skipped from then on (the pipeline is rebuilt at the same batch). If DALI's
decoder accepts it (libjpeg-turbo decodes damaged JPEG data with a warning), the damaged image is used.
"""

import io

import numpy as np
from PIL import Image

from fastmae.data.augment import augment_params
from fastmae.data.sources import ProceduralSource, Source, decode_rgb

# status codes returned per sample
OK, CONVERTED = 0, 1

_TAIL = 4096  # JPEGs may carry padding after the end-of-image marker; look for it in the last 4 KiB


def _complete(fmt: str, data: bytes) -> bool:
    if fmt == "JPEG":
        return data.rfind(b"\xff\xd9", max(0, len(data) - _TAIL)) != -1
    return data.rfind(b"IEND", max(0, len(data) - _TAIL)) != -1  # PNG


def prepare_encoded(data: bytes) -> tuple[bytes, int, int, bool]:
    """(bytes DALI can decode, height, width, converted). Raises on unreadable input."""
    img = Image.open(io.BytesIO(data))  # parses the header only
    width, height = img.size
    if img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") and _complete(img.format, data):
        return data, height, width, img.mode != "RGB"
    rgb, converted = decode_rgb(data)  # full decode; raises on truncated or corrupt data
    buf = io.BytesIO()
    rgb.save(buf, format="PPM")
    return buf.getvalue(), rgb.height, rgb.width, converted


class DaliFeed:
    """Builds the host arrays of one batch: see `batch(epoch, indices)`."""

    def __init__(self, source: Source, seed: int):
        self.source, self.seed = source, seed
        self.pixels = isinstance(source, ProceduralSource)  # decoded arrays instead of encoded files
        self.known_bad: dict[int, str] = {}  # index -> reason, found after a DALI decode failure

    def _load(self, index: int) -> tuple[np.ndarray, int, int, int, list[tuple[int, str]]]:
        """(payload, height, width, status, [(bad index, reason)]) for `index` or its first readable successor."""
        if self.pixels:
            arr = self.source.array(index)  # [H, W, 3] uint8
            return arr, arr.shape[0], arr.shape[1], OK, []
        bad, j, n = [], index, len(self.source)
        for _ in range(n):
            if j in self.known_bad:
                bad.append((j, self.known_bad[j]))
                j = (j + 1) % n
                continue
            try:
                data, h, w, converted = prepare_encoded(self.source.read(j))
                return np.frombuffer(data, dtype=np.uint8), h, w, (CONVERTED if converted else OK), bad
            except Exception as e:  # noqa: BLE001 - corrupt, truncated, missing, not an image: skip it
                bad.append((j, f"{type(e).__name__}: {e}"))
                j = (j + 1) % n
        raise RuntimeError(f"no readable image among the {n} files")

    def batch(self, epoch: int, indices: np.ndarray):
        """Payloads, crop starts [x, y] and shapes [w, h] (int32 [2] each), flips (int32), and per-sample
        (index used, status, bad list) for the loader's counters."""
        payloads, starts, shapes, flips, infos = [], [], [], [], []
        for index in indices.tolist():
            payload, h, w, status, bad = self._load(index)
            top, left, ch, cw, flip = augment_params(self.seed, epoch, index, h, w)
            payloads.append(payload)
            starts.append(np.array([left, top], dtype=np.int32))  # "WH" order
            shapes.append(np.array([cw, ch], dtype=np.int32))
            flips.append(np.array(int(flip), dtype=np.int32))
            used = bad[-1][0] + 1 if bad else index
            infos.append((used % max(1, len(self.source)), status, bad))
        return payloads, starts, shapes, flips, infos

    def find_bad(self, used_indices) -> int:
        """Fully decode these files with PIL; add the undecodable ones to known_bad. Returns how many were new."""
        new = 0
        for j in set(used_indices) - set(self.known_bad):
            try:
                decode_rgb(self.source.read(j))
            except Exception as e:  # noqa: BLE001
                self.known_bad[j] = f"{type(e).__name__}: {e} (after a DALI decode failure)"
                new += 1
        return new
