"""host_resize (the CPU DALI path's resize + flip + normalise) against the torchvision loader's PIL steps."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.host_resize import resize_flip_normalize
from fastmae.data.synth_files import textured_image

LSB = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(1, 3, 1, 1)  # one 1/255 step, in normalised units


def _torchvision(crop: np.ndarray, flip: bool, size: int) -> torch.Tensor:
    """What the torchvision loader does after its crop: PIL bicubic resize, flip, ToTensor, Normalize."""
    im = Image.fromarray(crop).resize((size, size), Image.BICUBIC)
    if flip:
        im = TF.hflip(im)
    return TF.normalize(TF.to_tensor(im), IMAGENET_MEAN, IMAGENET_STD)  # [3, S, S]


# down, up, mixed (down in one axis, up in the other), 1-pixel and unchanged sizes; odd output sizes
SHAPES = [(301, 449), (449, 301), (57, 91), (439, 150), (150, 439), (1, 7), (33, 33), (224, 224)]


@pytest.mark.parametrize("size", [33, 224])
def test_matches_pil_on_textured_crops(size):
    crops = [textured_image(seed=3, index=i, height=h, width=w) for i, (h, w) in enumerate(SHAPES)]  # [h, w, 3]
    flips = [i % 2 == 1 for i in range(len(crops))]
    ours = resize_flip_normalize(crops, flips, size)
    ref = torch.stack([_torchvision(c, f, size) for c, f in zip(crops, flips)])
    assert ours.shape == (len(SHAPES), 3, size, size) and ours.dtype == torch.float32
    diff = (ours - ref).abs() / LSB  # in 1/255 steps
    # Same filter (Keys cubic, a=-0.5, widened by the downscale factor); the two differ only in fixed-point
    # rounding and in which axis goes first, whose intermediate uint8 clipping moves a pixel by a few steps.
    assert diff.mean() < 0.1, diff.mean().item()
    assert diff.amax() <= 6, diff.amax().item()  # measured: 1 step, 4 for the mixed (439, 150) crop at 224
    # a wrong flip or a swapped image would be far off (textured images are unrelated to each other)
    assert (ours.flip(-1) - ref).abs().mean() / LSB.mean() > 20 * diff.mean()


def test_flip_and_normalisation_are_exact():
    crop = textured_image(seed=5, index=0, height=64, width=48)  # [64, 48, 3]
    plain, mirrored = resize_flip_normalize([crop, crop], [False, True], 40)
    assert torch.equal(mirrored, plain.flip(-1))
    same_size = textured_image(seed=5, index=1, height=40, width=40)
    (out,) = resize_flip_normalize([same_size], [False], 40)  # no resampling at the output size
    expected = TF.normalize(torch.from_numpy(same_size).permute(2, 0, 1).double() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 3)


def test_bad_input_is_a_clear_error():
    good = textured_image(seed=1, index=0, height=20, width=30)
    with pytest.raises(ValueError, match="2 crops but 1 flips"):
        resize_flip_normalize([good, good], [True], 16)
    with pytest.raises(ValueError, match=r"crop 1: expected \[h, w, 3\] uint8"):
        resize_flip_normalize([good, good[..., :2]], [True, False], 16)
    with pytest.raises(ValueError, match="crop 0"):
        resize_flip_normalize([good.astype(np.float32)], [False], 16)

