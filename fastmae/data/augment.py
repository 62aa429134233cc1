"""MAE's pretraining augmentation, with randomness drawn per sample from (seed, epoch, index).

Official MAE: RandomResizedCrop(input_size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic),
RandomHorizontalFlip, ToTensor, Normalize(ImageNet mean/std). The crop window is sampled by the
same algorithm as torchvision's RandomResizedCrop.get_params, but from a numpy generator seeded by
(seed, epoch, index) instead of the worker's global RNG: the augmented image of a sample then does
not depend on which worker, thread or resume produced it, so a resumed run sees identical inputs.
Every loader (torchvision, DALI) draws its crop and flip from `augment_params`.
"""

import math

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_AUG_STREAM = 0xA09  # keeps this RNG stream apart from any other use of (seed, epoch, index)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([_AUG_STREAM, seed, epoch, index])


def crop_params(
    rng: np.random.Generator, height: int, width: int, scale=SCALE, ratio=RATIO
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, torchvision RandomResizedCrop.get_params' algorithm."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback after 10 misses: the central crop with the aspect clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_params(seed: int, epoch: int, index: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) for sample `index` of `epoch`: deterministic in its arguments."""
    rng = sample_rng(seed, epoch, index)
    top, left, h, w = crop_params(rng, height, width)
    flip = bool(rng.random() < 0.5)
    return top, left, h, w, flip
