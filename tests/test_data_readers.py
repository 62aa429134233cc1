"""Readers: ImageFolder, file list and webdataset shards (packed by fastmae.data.pack) give the same data."""

import os

import pytest
import torch

from fastmae.data import pack
from fastmae.data.loader import DataConfig, build_pretrain_loader, validate_data_path
from fastmae.data.sources import open_source
from fastmae.data.synth_files import write_bad_files, write_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("imgs") / "train")
    write_imagefolder(root, 30, seed=5, num_classes=3)
    return root


def _epoch(path: str, loader: str = "torchvision") -> torch.Tensor:
    cfg = DataConfig(data_path=path, input_size=24, batch_size=5, num_workers=0, loader=loader, seed=3)
    ld = build_pretrain_loader(cfg)
    ld.set_epoch(1)
    return torch.stack(list(ld))  # [steps, B, 3, S, S]


def test_file_list_reads_same_images(folder, tmp_path):
    paths = open_source(folder).paths
    lines = ["# a comment", ""]
    for i, p in enumerate(paths):  # mix relative and absolute paths, trailing labels
        lines.append((os.path.relpath(p, tmp_path) if i % 2 else p) + f"\t{i % 3}")
    lines.append("readme.md")  # not an image: ignored and counted
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    validate_data_path(str(tmp_path / "train.txt"))
    src = open_source(str(tmp_path / "train.txt"))
    assert src.kind == "filelist" and src.paths == paths and src.num_ignored == 1
    assert torch.equal(_epoch(str(tmp_path / "train.txt")), _epoch(folder))


def test_pack_shards_read_same_images(folder, tmp_path, capsys):
    out = str(tmp_path / "shards")
    pack.main([folder, out, "--samples-per-shard", "8"])
    assert "wrote 30 images in 4 shard(s)" in capsys.readouterr().err
    shards = sorted(os.listdir(out))
    assert shards == [f"shard-{i:06d}.tar" for i in range(4)]
    src = open_source(out)
    assert src.kind == "webdataset" and len(src) == 30
    # same bytes, same order as the ImageFolder, so the loader delivers identical batches
    assert all(src.read(i) == open_source(folder).read(i) for i in range(30))
    ref = _epoch(folder)
    assert torch.equal(_epoch(out), ref)
    single = open_source(os.path.join(out, shards[0]))
    assert len(single) == 8 and single.read(3) == src.read(3)


def test_shards_are_webdataset_compatible(folder, tmp_path):
    wds = pytest.importorskip("webdataset")
    out = str(tmp_path / "shards")
    pack.pack(folder, out, samples_per_shard=16)
    samples = list(wds.WebDataset(sorted(os.path.join(out, s) for s in os.listdir(out)), shardshuffle=False))
    assert len(samples) == 30 and all("jpg" in s and "cls" in s for s in samples)
    assert sorted({int(s["cls"]) for s in samples}) == [0, 1, 2]


def test_pack_rejects_non_imagefolder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no class subfolders"):
        pack.main([str(tmp_path / "empty"), str(tmp_path / "out")])


def test_dali_reads_shards_with_bad_members(folder, tmp_path):
    pytest.importorskip("nvidia.dali")
    root = str(tmp_path / "train")
    write_imagefolder(root, 10, seed=6, num_classes=2)
    write_bad_files(os.path.join(root, "disk"))
    out = str(tmp_path / "shards")
    pack.pack(root, out, samples_per_shard=7)
    cfg = DataConfig(data_path=out, input_size=24, batch_size=1, num_workers=1, loader="dali")
    ld = build_pretrain_loader(cfg)
    ld.set_epoch(0)
    x = torch.stack(list(ld))
    assert x.shape == (20, 1, 3, 24, 24) and torch.isfinite(x).all()
    assert ld.stats() == {"skipped_files": 4, "unreadable_files": 4, "non_image_files": 0, "converted_files": 5}
