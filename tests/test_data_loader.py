"""Loader interface: shapes, dtypes, value ranges, sharding, resume, validation and bad files (CPU)."""

import os

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.base import PretrainLoader
from fastmae.data.loader import DataConfig, build_pretrain_loader, validate_data_path
from fastmae.data.sharding import rank_indices
from fastmae.data.synth_files import write_bad_files, write_imagefolder

# normalised values of pixels in [0, 1]: the exact bounds of a correct ToTensor + Normalize
LO = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HI = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("imgs"))
    write_imagefolder(root, 40, seed=3)
    return root


def _cfg(**kw) -> DataConfig:
    base = dict(data_path=None, input_size=32, batch_size=8, num_workers=0, default_num_images=64, loader="torchvision")
    return DataConfig(**{**base, **kw})


def _epoch(loader, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("data", ["default", "folder"])
def test_torchvision_batches(data, folder):
    loader = build_pretrain_loader(_cfg(data_path=None if data == "default" else folder, input_size=24))
    assert isinstance(loader, PretrainLoader) and loader.name == "torchvision"
    batches = _epoch(loader, 0)
    assert len(batches) == loader.steps_per_epoch == loader.num_images // 8
    for x in batches:
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert LO - 1e-5 <= x.min() and x.max() <= HI + 1e-5
        assert x.std() > 0.2  # real content, not a constant
    assert loader.state_dict() == {"epoch": 0, "batch": len(batches)}


def test_synthetic_loader():
    loader = build_pretrain_loader(_cfg(loader="synthetic"))
    assert loader.name == "synthetic"
    a = _epoch(loader, 1)
    assert len(a) == 8 and a[0].shape == (8, 3, 32, 32) and a[0].dtype == torch.float32
    assert (a[0] != 0).all() and not torch.equal(a[0], a[1])
    assert all(torch.equal(x, y) for x, y in zip(a, _epoch(loader, 1)))  # seeded
    assert not torch.equal(a[0], _epoch(loader, 2)[0])


@pytest.mark.parametrize("num_images,world_size", [(64, 1), (61, 2), (37, 3), (10, 4)])
def test_shards_match_distributed_sampler(num_images, world_size):
    for epoch in (0, 3):
        ours = [rank_indices(num_images, 5, epoch, r, world_size) for r in range(world_size)]
        for r in range(world_size):
            ds = DistributedSampler(range(num_images), num_replicas=world_size, rank=r, shuffle=True, seed=5)
            ds.set_epoch(epoch)
            assert ours[r].tolist() == list(ds)
        flat = np.concatenate(ours)
        assert set(flat.tolist()) == set(range(num_images))  # together they cover the data
        assert len(flat) - num_images < world_size  # padding repeats fewer than world_size images


def test_ranks_disjoint_and_reshuffled():
    cfgs = [_cfg(default_num_images=96, world_size=3, rank=r) for r in range(3)]
    seen = [build_pretrain_loader(c) for c in cfgs]
    idx = [set(L.epoch_indices().tolist()) for L in seen]
    assert not (idx[0] & idx[1]) and not (idx[1] & idx[2]) and not (idx[0] & idx[2])
    assert set().union(*idx) == set(range(96))
    first = seen[0].epoch_indices().copy()
    seen[0].set_epoch(1)
    assert not np.array_equal(first, seen[0].epoch_indices())


@pytest.mark.parametrize("stop", [0, 3, 7])
def test_resume_restores_position_and_images(stop):
    full = build_pretrain_loader(_cfg())
    ref = _epoch(full, 2)
    run = build_pretrain_loader(_cfg())
    run.set_epoch(2)
    for i, x in enumerate(run):
        if i == stop:
            break
    state = run.state_dict()
    assert state == {"epoch": 2, "batch": stop + 1}
    resumed = build_pretrain_loader(_cfg())
    resumed.load_state_dict(state)
    rest = _epoch(resumed, 2)
    assert len(rest) == len(ref) - stop - 1
    assert all(torch.equal(a, b) for a, b in zip(rest, ref[stop + 1 :]))  # bit-identical augmented images
    assert resumed.state_dict() == {"epoch": 2, "batch": len(ref)}
    assert not torch.equal(_epoch(resumed, 3)[0], ref[0])  # the next epoch starts afresh


def test_workers_give_same_images_as_main_process():
    a = _epoch(build_pretrain_loader(_cfg(num_workers=0)), 1)
    b = _epoch(build_pretrain_loader(_cfg(num_workers=2)), 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_validate_data_path_errors(tmp_path):
    validate_data_path(None)
    with pytest.raises(ValueError, match="does not exist"):
        validate_data_path(str(tmp_path / "missing"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        validate_data_path(str(tmp_path / "file.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        validate_data_path(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="no image files"):
        validate_data_path(str(tmp_path / "noimg"))
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "a.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match="none of its 1 image files is a readable image"):
        validate_data_path(str(tmp_path / "bad"))


def test_bad_files_skipped_and_counted(tmp_path):
    root = str(tmp_path / "data")
    write_imagefolder(root, 12, seed=1, num_classes=2)
    expected = write_bad_files(os.path.join(root, "disk"))
    validate_data_path(root)
    loader = build_pretrain_loader(_cfg(data_path=root, batch_size=1))
    assert loader.num_images == 12 + sum(h != "non_image" for h in expected.values())
    batches = _epoch(loader, 0)  # batch 1: every file is met in one epoch
    assert len(batches) == loader.num_images and all(torch.isfinite(x).all() for x in batches)
    n = {k: sum(h == k for h in expected.values()) for k in ("unreadable", "non_image", "converted")}
    assert loader.stats() == {
        "skipped_files": n["unreadable"] + n["non_image"],
        "unreadable_files": n["unreadable"],
        "non_image_files": n["non_image"],
        "converted_files": n["converted"],
    }


def test_config_errors():
    with pytest.raises(ValueError, match="loader must be one of"):
        DataConfig(data_path=None, loader="ffcv")
    with pytest.raises(ValueError, match="rank must be in"):
        DataConfig(data_path=None, rank=2, world_size=2)
    with pytest.raises(ValueError, match="do not fill one batch"):
        build_pretrain_loader(_cfg(default_num_images=10, batch_size=8, world_size=2))


def test_resume_at_epoch_end_yields_nothing_then_next_epoch():
    loader = build_pretrain_loader(_cfg())
    loader.load_state_dict({"epoch": 4, "batch": loader.steps_per_epoch})
    assert _epoch(loader, 4) == []
    fresh = _epoch(build_pretrain_loader(_cfg()), 5)
    assert all(torch.equal(a, b) for a, b in zip(_epoch(loader, 5), fresh)) and len(fresh) == 8
    assert len(list(loader)) == 8  # a finished epoch iterated again replays it (as a DataLoader would)


def test_auto_falls_back_to_torchvision_when_dali_cannot_start(monkeypatch):
    from fastmae.data import dali_loader

    def broken(*a, **k):
        raise RuntimeError("no usable DALI here")

    monkeypatch.setattr(dali_loader, "unavailable_reason", lambda cfg: None)
    monkeypatch.setattr(dali_loader, "_build_pipeline", broken)
    assert build_pretrain_loader(_cfg(loader="auto")).name == "torchvision"
    with pytest.raises(RuntimeError, match="no usable DALI here"):
        build_pretrain_loader(_cfg(loader="dali"))


def test_abandoned_epoch_with_workers_then_resume_in_same_loader():
    """Persistent DataLoader workers hold prefetched batches of the abandoned pass; none may leak."""
    ref = _epoch(build_pretrain_loader(_cfg(num_workers=0)), 1)
    loader = build_pretrain_loader(_cfg(num_workers=2))
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    del it
    loader.load_state_dict(state)
    rest = _epoch(loader, 1)
    assert len(rest) == 6 and all(torch.equal(a, b) for a, b in zip(rest, ref[2:]))
