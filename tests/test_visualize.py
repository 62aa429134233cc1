"""fastmae.visualize: a valid PNG of the right size (rows = images, 4 columns) from a full checkpoint,
for a folder of images and for the embedded default; clear errors for encoder-only checkpoints."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import visualize
from fastmae.models import create_model
from fastmae.reconstruction import _GAP

TINY = "mae_vit_tiny_patch4_dec64d2b"


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("vis") / "mae_full.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model(TINY).state_dict()}, path)  # official visualisation-style keys
    return path


def _expected_size(rows: int, tile: int) -> tuple[int, int]:
    return 4 * (tile + _GAP) + _GAP, rows * (tile + _GAP) + _GAP  # (width, height)


def test_grid_from_image_folder(tmp_path, full_ckpt):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(40, 50), (64, 64), (33, 90)]):  # odd sizes: resized + center-cropped to 32
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / ("sub" if i == 2 else "") / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "grid.png"
    assert visualize.main(["--checkpoint", str(full_ckpt), "--images", str(folder), "--num_images", "5",
                           "--scale", "3", "--output", str(out)]) == 0
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == _expected_size(rows=3, tile=32 * 3)  # only 3 images exist
        px = np.array(im, dtype=np.float32)
    assert px.std() > 10  # real content, not a blank canvas


def test_grid_from_embedded_default(tmp_path, full_ckpt, capsys):
    out = tmp_path / "default.png"
    assert visualize.main(["--checkpoint", str(full_ckpt), "--num_images", "2", "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == _expected_size(rows=2, tile=32 * 4)  # default ~128 px tiles


def test_encoder_only_checkpoint_is_refused(tmp_path, capsys):
    sd = {k: v for k, v in create_model(TINY).state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": sd}, tmp_path / "enc.pth")
    rc = visualize.main(["--checkpoint", str(tmp_path / "enc.pth"), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no decoder" in err and not (tmp_path / "x.png").exists()


def _fake_zero0_checkpoint(root, state: dict, meta: dict | None):
    """The layout fastmae's trainer leaves at ZeRO stage 0: <root>/latest, <root>/<tag>/mp_rank_00_model_states.pt
    and the COMPLETE marker carrying the run's model record."""
    import json

    folder = root / "step_00000007"
    folder.mkdir(parents=True)
    torch.save({"module": state}, folder / "mp_rank_00_model_states.pt")
    (folder / "COMPLETE").write_text(json.dumps({"step": 7, **({"model": meta} if meta is not None else {})}))
    (root / "latest").write_text("step_00000007\n")


@pytest.mark.parametrize("recorded, flag, expected", [
    (True, [], True),  # no flag: what the run recorded
    (True, ["--no-norm_pix_loss"], False),  # an explicit flag wins
    (None, [], False),  # a checkpoint from before the record: off, as before
])
def test_norm_pix_loss_comes_from_the_checkpoint(tmp_path, capsys, recorded, flag, expected):
    from fastmae.checkpoint_io import read_run_meta

    torch.manual_seed(0)
    meta = None if recorded is None else {"name": TINY, "norm_pix_loss": recorded, "input_size": 32}
    _fake_zero0_checkpoint(tmp_path / "ckpt", create_model(TINY).state_dict(), meta)
    assert read_run_meta(str(tmp_path / "ckpt")) == (meta or {})
    out = tmp_path / "grid.png"
    assert visualize.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(out), "--num_images", "2",
                           *flag]) == 0
    assert f"norm_pix_loss {expected}" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert (width, height) == _expected_size(2, (height - _GAP) // 2 - _GAP)  # 2 rows, 4 columns


def test_run_meta_of_a_plain_file_is_empty(full_ckpt):
    from fastmae.checkpoint_io import read_run_meta

    assert read_run_meta(str(full_ckpt)) == {}
