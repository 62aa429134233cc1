"""The per-sample RandomResizedCrop matches torchvision's crop statistics; augmentation is reproducible."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from fastmae.data.augment import RATIO, SCALE, augment_params, crop_params, sample_rng

N = 4000  # crops per shape: the mean of a uniform(0.2, 1) scale has standard error 0.0037


def _stats(crops, height, width):
    crops = np.asarray(crops, dtype=np.float64)  # [N, 4] top, left, h, w
    scale = crops[:, 2] * crops[:, 3] / (height * width)
    log_aspect = np.log(crops[:, 3] / crops[:, 2])
    centre = crops[:, :2] + crops[:, 2:] / 2
    inside = (crops[:, 0] >= 0).all() and (crops[:, 1] >= 0).all()
    inside &= (crops[:, 0] + crops[:, 2] <= height).all() and (crops[:, 1] + crops[:, 3] <= width).all()
    return scale, log_aspect, centre, inside


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (224, 224), (64, 64), (90, 700)])
def test_crop_statistics_match_torchvision(height, width):
    ours = [crop_params(sample_rng(0, 0, i), height, width) for i in range(N)]
    torch.manual_seed(0)
    img = torch.empty(3, height, width)
    theirs = [RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(N)]
    s_o, a_o, c_o, in_o = _stats(ours, height, width)
    s_t, a_t, c_t, in_t = _stats(theirs, height, width)
    assert in_o and in_t
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(s_o, q) - np.quantile(s_t, q)) < 0.02, ("scale", q)
        assert abs(np.quantile(a_o, q) - np.quantile(a_t, q)) < 0.03, ("log aspect", q)
    assert abs(s_o.mean() - s_t.mean()) < 0.015 and abs(a_o.std() - a_t.std()) < 0.015
    assert np.allclose(c_o.mean(0), c_t.mean(0), atol=0.02 * max(height, width))  # crop centres
    if width / height < 3:  # a normal image: within the scale and ratio ranges (up to pixel rounding)
        assert s_o.min() >= SCALE[0] - 0.02 and abs(a_o).max() <= math.log(RATIO[1]) + 0.05
    else:  # 90x700: many tries miss, the central fallback crop appears in both at the same rate
        fb_o = np.mean([c[2] == height for c in ours])
        fb_t = np.mean([c[2] == height for c in theirs])
        assert abs(fb_o - fb_t) < 0.03 and fb_o > 0.2


def test_augment_params_deterministic_and_varied():
    a = augment_params(3, 1, 17, 300, 400)
    assert a == augment_params(3, 1, 17, 300, 400)
    others = {augment_params(3, e, i, 300, 400) for e in range(3) for i in range(20)}
    assert len(others) == 60  # every (epoch, index) draws its own crop
    flips = [augment_params(0, 0, i, 300, 400)[4] for i in range(2000)]
    assert abs(np.mean(flips) - 0.5) < 0.04
