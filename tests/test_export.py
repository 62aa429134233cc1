"""fastmae.export / fastmae.checkpoint_io: timm-compatible export, official MAE checkpoint import, and
one-line errors naming the key for checkpoints that do not fit."""

import argparse

import pytest
import torch

from fastmae import export
from fastmae.checkpoint_io import CheckpointError, load_mae, read_state_dict, select
from fastmae.features import FrozenEncoder
from fastmae.models import create_model

timm = pytest.importorskip("timm")  # test-only dependency

TINY = "mae_vit_tiny_patch4_dec64d2b"
SMALL = "mae_vit_small_patch8_dec128d2b"
BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)


def official_encoder_keys(depth: int) -> list[str]:
    """The key names of the official encoder-only release (mae_pretrain_vit_base.pth), written out."""
    blocks = [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    return ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", *blocks, "norm.weight", "norm.bias"]


def official_full_keys(depth: int, decoder_depth: int) -> list[str]:
    """... and of the full visualisation models (mae_visualize_vit_large.pth)."""
    dec = [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in BLOCK_KEYS]
    return [
        *official_encoder_keys(depth), "mask_token", "decoder_pos_embed", "decoder_embed.weight",
        "decoder_embed.bias", *dec, "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
    ]


def randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor replaced by random values (so a copy is detectable)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def assert_one_line(msg: str, *needles: str) -> None:
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# ---------------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("name", [TINY, SMALL])
def test_timm_export_gives_same_features(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():  # perturb LayerNorms too, so a swapped / missing norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path / "mae.pth"
    torch.save({"model": model.state_dict()}, src)
    out = tmp_path / "enc.safetensors"
    assert export.main([str(src), "--model", name, "--timm", str(out)]) == 0

    tm = export.timm_model_from_export(str(out))  # strict load into VisionTransformer(**metadata)
    size = model.patch_embed.img_size[0]
    imgs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = FrozenEncoder(model, pool="cls")(imgs)  # [2, D]
        theirs = tm(imgs)  # [2, D]
        ours_tokens = model.norm(FrozenEncoder(model).forward_tokens(imgs))  # [2, 1+L, D]
        theirs_tokens = tm.forward_features(imgs)
    assert ours.shape == (2, model.cls_token.shape[-1])
    torch.testing.assert_close(ours, theirs)  # fp32 defaults: same ops in the same order
    torch.testing.assert_close(ours_tokens, theirs_tokens)


def test_vit_base_export_loads_strictly_into_timm_vit_base_patch16_224():
    # in memory: two 350 MB files would cost more time than the check
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16")
    with torch.device("meta"):  # skip timm's own init: every tensor is assigned from the export
        tm = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    tm.load_state_dict(export.export_state_dict(model.state_dict(), full=False), strict=True, assign=True)
    imgs = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(FrozenEncoder(model)(imgs), tm(imgs))


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_timm_key_set_matches_registered_vit(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        tm = timm.create_model(export.timm_name(name), pretrained=False, num_classes=0)
        model = create_model(name)
    ours = {k: tuple(v.shape) for k, v in select(model.state_dict(), "encoder").items()}
    assert ours == {k: tuple(v.shape) for k, v in tm.state_dict().items()}


def test_avg_pool_is_layernorm_of_mean_patch_token():
    torch.manual_seed(0)
    model = create_model(TINY)
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = FrozenEncoder(model).forward_tokens(imgs)[:, 1:].double()  # [3, L, D]
        feats = FrozenEncoder(model, pool="avg")(imgs)
    mean = tokens.mean(1)
    ref = (mean - mean.mean(-1, keepdim=True)) / (mean.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(feats.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- official import


def test_fastmae_keys_are_the_official_keys():
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16")
    assert sorted(model.state_dict()) == sorted(official_full_keys(12, 8))


def test_official_full_checkpoint_imports(tmp_path):
    model = create_model(TINY)
    sd = randomised(model, 0)
    assert sorted(sd) == sorted(official_full_keys(4, 2))
    path = tmp_path / "mae_visualize_tiny.pth"
    # official training checkpoints also carry the run's argparse Namespace and non-tensor entries
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_tiny"), "epoch": 3}, path)
    loaded, name = load_mae(str(path), part="full")
    assert name == TINY  # guessed from the shapes
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_official_encoder_only_checkpoint_imports(tmp_path):
    model = create_model(TINY)
    sd = {k: v for k, v in randomised(model, 1).items() if k in official_encoder_keys(4)}
    assert len(sd) == len(official_encoder_keys(4))
    path = tmp_path / "mae_pretrain_tiny.pth"
    torch.save({"model": sd}, path)
    loaded, _ = load_mae(str(path), TINY, part="encoder")
    for k in sd:
        assert torch.equal(loaded.state_dict()[k], sd[k]), k
    with pytest.raises(CheckpointError) as err:  # a decoder is needed for the full model
        load_mae(str(path), TINY, part="full")
    assert_one_line(str(err.value), "no decoder", "'mask_token'")


def test_wrapped_and_prefixed_state_dicts_read(tmp_path):
    sd = randomised(create_model(TINY), 2)
    for i, obj in enumerate([{"module": {f"module.{k}": v for k, v in sd.items()}}, {"state_dict": sd}, sd]):
        torch.save(obj, tmp_path / f"{i}.pt")
        got = read_state_dict(str(tmp_path / f"{i}.pt"))
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_mae_export_roundtrip(tmp_path):
    sd = randomised(create_model(TINY), 3)
    torch.save({"model": sd}, tmp_path / "src.pth")
    assert export.main([str(tmp_path / "src.pth"), "--mae", str(tmp_path / "enc.pth")]) == 0
    assert export.main([str(tmp_path / "src.pth"), "--mae", str(tmp_path / "full.pth"), "--full"]) == 0
    enc = torch.load(tmp_path / "enc.pth", weights_only=True)["model"]
    full = torch.load(tmp_path / "full.pth", weights_only=True)["model"]
    assert sorted(enc) == sorted(official_encoder_keys(4))
    assert sorted(full) == sorted(official_full_keys(4, 2))
    assert all(torch.equal(full[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------------------- bad input


def _save(tmp_path, sd, name="bad.pth"):
    torch.save({"model": sd}, tmp_path / name)
    return str(tmp_path / name)


def test_other_architecture_names_the_key(tmp_path):
    resnet = {"conv1.weight": torch.randn(8, 3, 7, 7), "bn1.weight": torch.randn(8), "fc.weight": torch.randn(10, 8)}
    with pytest.raises(CheckpointError) as err:
        load_mae(_save(tmp_path, resnet), TINY, part="encoder")
    assert_one_line(str(err.value), "not an MAE/ViT checkpoint", "missing key 'cls_token'", "conv1.weight")


def test_missing_key_is_named(tmp_path):
    sd = randomised(create_model(TINY), 4)
    del sd["blocks.2.mlp.fc2.bias"]
    with pytest.raises(CheckpointError) as err:
        load_mae(_save(tmp_path, sd), TINY, part="encoder")
    assert_one_line(str(err.value), "missing key 'blocks.2.mlp.fc2.bias'")


def test_shape_mismatch_is_named_with_a_hint(tmp_path):
    path = _save(tmp_path, randomised(create_model(TINY), 5))
    with pytest.raises(CheckpointError) as err:
        load_mae(path, SMALL, part="encoder")
    assert_one_line(str(err.value), "shape mismatch for key 'cls_token'", "[1, 1, 96]", "[1, 1, 192]", f"--model {TINY}")


def test_extra_block_is_named(tmp_path):
    deeper = randomised(create_model(TINY, depth=5), 6)
    with pytest.raises(CheckpointError) as err:
        load_mae(_save(tmp_path, deeper), TINY, part="encoder")
    assert_one_line(str(err.value), "unexpected key 'blocks.4.norm1.weight'")


def test_cli_error_is_one_line(tmp_path, capsys):
    sd = randomised(create_model(TINY), 7)
    del sd["norm.weight"]
    rc = export.main([_save(tmp_path, sd), "--model", TINY, "--timm", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not (tmp_path / "x.safetensors").exists()
    assert_one_line(err, "fastmae.export: error:", "missing key 'norm.weight'")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(str(tmp_path / "junk.pth"))
    assert_one_line(str(err.value), "cannot read")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(str(tmp_path / "nope.pth"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        read_state_dict(str(tmp_path / "folder"))


def test_export_keeps_the_runs_input_size(tmp_path):
    """A fastmae checkpoint from a run at another input size (its COMPLETE record says 64 px for the 32 px tiny
    model): export builds that grid, and the timm export loads strictly into a VisionTransformer of that size."""
    import json

    torch.manual_seed(0)
    model = create_model(TINY, img_size=64)
    folder = tmp_path / "ckpt" / "step_00000003"
    folder.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, folder / "mp_rank_00_model_states.pt")
    (folder / "COMPLETE").write_text(json.dumps({"step": 3, "model": {"name": TINY, "input_size": 64}}))
    (tmp_path / "ckpt" / "latest").write_text("step_00000003\n")
    out = tmp_path / "enc.safetensors"
    assert export.main([str(tmp_path / "ckpt"), "--timm", str(out)]) == 0
    timm_model = export.timm_model_from_export(str(out))
    assert timm_model.patch_embed.img_size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(timm_model(x)).all()
