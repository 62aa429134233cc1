"""The official-MAE input pipeline: PIL decode, RandomResizedCrop (bicubic), flip, ToTensor, Normalize,
in DataLoader worker processes, over DistributedSampler's shard order (sharding.py).

Crop and flip come from `augment_params(seed, epoch, index, ...)` rather than torch's global RNG, so
the images do not depend on worker scheduling and resume is exact.
"""

from typing import Iterator

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment_params
from fastmae.data.base import LoaderBase
from fastmae.data.config import DataConfig
from fastmae.data.sources import ProceduralSource, Source, decode_rgb


def load_image(source: Source, index: int) -> tuple[Image.Image, int, list[tuple[int, str]], bool]:
    """The RGB image of `index`, or of the next readable index when it is unreadable.

    Returns (image, index used, [(bad index, reason)], converted)."""
    if isinstance(source, ProceduralSource):
        return Image.fromarray(source.array(index), mode="RGB"), index, [], False
    bad, j = [], index
    for _ in range(len(source)):
        try:
            img, converted = decode_rgb(source.read(j))
            return img, j, bad, converted
        except Exception as e:  # noqa: BLE001 - corrupt, truncated, missing, not an image: skip it
            bad.append((j, f"{type(e).__name__}: {e}"))
            j = (j + 1) % len(source)
    raise RuntimeError(f"no readable image among the {len(source)} files")


def augment_pil(img: Image.Image, seed: int, epoch: int, index: int, size: int) -> torch.Tensor:
    """MAE's pretraining augmentation of one image: [3, size, size] float32, normalised."""
    top, left, h, w, flip = augment_params(seed, epoch, index, img.height, img.width)
    img = F.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC)
    if flip:
        img = F.hflip(img)
    return F.normalize(F.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)  # [3, S, S]


class _AugmentedImages(Dataset):
    """Indexed by (epoch, index) so persistent workers need no epoch broadcast."""

    def __init__(self, source: Source, seed: int, size: int):
        self.source, self.seed, self.size = source, seed, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        img, used, bad, converted = load_image(self.source, index)
        info = {"used": used, "bad": [(i, self.source.describe(i), r) for i, r in bad], "converted": converted}
        return augment_pil(img, self.seed, epoch, index, self.size), info


def _collate(samples):
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]  # [B, 3, S, S], infos


class _EpochBatchSampler:
    """Yields the (epoch, index) batches of the loader's current epoch from its start batch."""

    def __init__(self, loader: "TorchvisionLoader"):
        self.loader, self.start = loader, 0

    def __iter__(self):
        idx, B, epoch = self.loader.epoch_indices(), self.loader.cfg.batch_size, self.loader.epoch
        for b in range(self.start, self.loader.steps_per_epoch):
            yield [(epoch, int(i)) for i in idx[b * B : (b + 1) * B]]

    def __len__(self) -> int:
        return self.loader.steps_per_epoch - self.start


class TorchvisionLoader(LoaderBase):
    name = "torchvision"

    def __init__(self, cfg: DataConfig, source: Source):
        super().__init__(cfg, len(source))
        self.source = source
        self.num_non_image_files = source.num_ignored
        self._sampler = _EpochBatchSampler(self)
        workers = cfg.num_workers
        self._dl = DataLoader(
            _AugmentedImages(source, cfg.seed, cfg.input_size),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=cfg.device.startswith("cuda"),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _batches(self, start: int) -> Iterator[torch.Tensor]:
        self._sampler.start = start
        for imgs, infos in self._dl:
            for info in infos:
                for i, where, reason in info["bad"]:
                    self._note_bad(i, where, reason)
                if info["converted"]:
                    self._note_converted(info["used"])
            yield imgs.to(self.cfg.device, non_blocking=True)
