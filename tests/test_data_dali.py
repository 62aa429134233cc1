"""The DALI loader on CPU (device_id=None): same images as the torchvision loader, exact resume, bad files."""

import io
import os

import pytest
import torch
from PIL import Image

from fastmae.data.loader import DataConfig, build_pretrain_loader, dali_unavailable_reason
from fastmae.data.synth_files import textured_image, write_bad_files, write_imagefolder

pytestmark = pytest.mark.skipif(
    dali_unavailable_reason(DataConfig(data_path=None)) is not None, reason="nvidia-dali not usable here"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("imgs"))
    write_imagefolder(root, 36, seed=4, min_side=80, max_side=200)
    return root


def _cfg(**kw) -> DataConfig:
    base = dict(data_path=None, input_size=32, batch_size=6, num_workers=2, default_num_images=36, loader="dali")
    return DataConfig(**{**base, **kw})


def _epoch(loader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.stack(list(loader))  # [steps, B, 3, S, S]


def test_auto_picks_dali_cpu():
    loader = build_pretrain_loader(_cfg(loader="auto"))
    assert loader.name == "dali-cpu" and loader.steps_per_epoch == 6


# Who finishes the decoded crops, and how far from torchvision that may land (normalised units; one 1/255 step
# is ~0.0175). "host": the CPU path, torch's uint8 antialiased cubic (host_resize.py) against PIL's, measured
# max 1 step, mean 0.0004. "dali": the graph a GPU runs (DALI's resize + crop_mirror_normalize, flips fed to
# DALI), built on the CPU; DALI's cubic rounds further from PIL's, measured mean 0.003, max 0.19.
FINISHERS = {"host": (False, 0.002, 0.06), "dali": (True, 0.01, 0.5)}


@pytest.mark.parametrize("finisher", list(FINISHERS))
@pytest.mark.parametrize("data", ["default", "folder"])
def test_same_images_as_torchvision(data, finisher, folder, monkeypatch):
    """Same samples, crops and flips as the torchvision loader; both decode with libjpeg-turbo, so only the
    resampler's rounding differs."""
    from fastmae.data.dali_loader import DaliLoader

    dali_finishes, mean_bound, max_bound = FINISHERS[finisher]
    monkeypatch.setattr(DaliLoader, "dali_finishes", dali_finishes)
    path = None if data == "default" else folder
    dali = _epoch(build_pretrain_loader(_cfg(data_path=path)), 2)
    tv = _epoch(build_pretrain_loader(_cfg(data_path=path, loader="torchvision", num_workers=0)), 2)
    assert dali.shape == tv.shape == (6, 6, 3, 32, 32) and dali.dtype == torch.float32
    diff = (dali - tv).abs()
    assert diff.mean() < mean_bound and diff.max() < max_bound, (diff.mean().item(), diff.max().item())
    # a wrong crop, flip or normalisation would be far off: the images are unrelated to each other
    assert (dali[:, 1:] - tv[:, :-1]).abs().mean() > 0.3
    assert (dali.flip(-1) - tv).abs().mean() > 10 * diff.mean()  # the flips reach whoever mirrors


def test_deterministic_across_threads_and_resume(folder):
    ref = _epoch(build_pretrain_loader(_cfg(data_path=folder, num_workers=1)), 1)
    run = build_pretrain_loader(_cfg(data_path=folder, num_workers=2))
    run.set_epoch(1)
    for i, _ in enumerate(run):
        if i == 2:
            break
    resumed = build_pretrain_loader(_cfg(data_path=folder, num_workers=2))
    resumed.load_state_dict(run.state_dict())
    rest = _epoch(resumed, 1)
    assert rest.shape[0] == 3 and torch.equal(rest, ref[3:])  # bit-identical after resume


def test_sharded_ranks_disjoint(folder):
    seen = []
    for r in range(3):
        loader = build_pretrain_loader(_cfg(data_path=folder, world_size=3, rank=r, batch_size=4))
        assert loader.steps_per_epoch == 3
        seen.append(set(loader.epoch_indices().tolist()))
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2]) and len(set().union(*seen)) == 36


def test_bad_files_counted_like_torchvision(tmp_path):
    root = str(tmp_path / "data")
    write_imagefolder(root, 10, seed=1, num_classes=2)
    write_bad_files(os.path.join(root, "disk"))
    stats = {}
    for kind in ("dali", "torchvision"):
        loader = build_pretrain_loader(_cfg(data_path=root, loader=kind, batch_size=1, num_workers=1))
        x = _epoch(loader, 0)
        assert x.shape[0] == loader.num_images and torch.isfinite(x).all()
        stats[kind] = loader.stats()
    assert stats["dali"] == stats["torchvision"] == {
        "skipped_files": 5, "unreadable_files": 4, "non_image_files": 1, "converted_files": 5,
    }


def test_decode_failure_inside_dali_is_recovered(tmp_path):
    """A PNG with intact header and IEND but damaged pixel data passes the host checks and makes DALI's
    decoder fail; the loader finds it, skips it, and delivers the same images as torchvision."""
    root = str(tmp_path / "data")
    write_imagefolder(root, 11, seed=2, num_classes=1)
    buf = io.BytesIO()
    Image.fromarray(textured_image(0, 5, 200, 180)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 3 : len(data) // 3 + 400] = bytes(400)
    (tmp_path / "data" / "disk" / "zz_damaged.png").write_bytes(bytes(data))
    dali = build_pretrain_loader(_cfg(data_path=root, batch_size=3, num_workers=1))
    tv = build_pretrain_loader(_cfg(data_path=root, batch_size=3, loader="torchvision", num_workers=0))
    a, b = _epoch(dali, 0), _epoch(tv, 0)
    assert a.shape == b.shape == (4, 3, 3, 32, 32) and (a - b).abs().mean() < 0.01
    assert dali.stats()["unreadable_files"] == tv.stats()["unreadable_files"] == 1
