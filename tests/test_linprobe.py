"""fastmae.linprobe / fastmae.knn / fastmae.optim_lars: the paper's probe pieces, and end-to-end runs on a
tiny labelled ImageFolder that must beat chance. (Whether pretraining helps is the README demonstration,
scripts/linprobe_demo.sh: too long for a unit test.)"""

import json
import math

import pytest
import torch

from fastmae import knn, linprobe
from fastmae.linprobe import LinearHead, ProbeConfig, cached_batches, lr_at, topk_correct
from fastmae.models import create_model
from fastmae.optim_lars import LARS

TINY = "mae_vit_tiny_patch4_dec64d2b"
SMALL_SET = ["--num_train", "64", "--num_val", "32", "--val_start", "64", "--num_workers", "0", "--quiet"]


def test_lars_matches_a_hand_computed_step():
    torch.manual_seed(0)
    w, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    gw, gb = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = LARS([pw, pb], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(3):
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + 0.1 * w
        d = d * (0.001 * w.norm() / d.norm())  # trust ratio on the matrix only
        mu_w, mu_b = 0.9 * mu_w + d, 0.9 * mu_b + gb  # the bias: no decay, no scaling
        w, b = w - 0.5 * mu_w, b - 0.5 * mu_b
    torch.testing.assert_close(pw.detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pb.detach(), b, rtol=1e-12, atol=1e-12)


def test_lars_zero_weight_uses_ratio_one():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.ones(3, 4)
    LARS([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), torch.full((3, 4), -0.1))


def test_lr_schedule_and_scaling():
    cfg = ProbeConfig(batch_size=16384, epochs=90, warmup_epochs=10, blr=0.1)
    assert cfg.peak_lr == pytest.approx(6.4)  # 0.1 x 16384 / 256, the paper's lr
    assert lr_at(cfg, 0) == 0 and lr_at(cfg, 5) == pytest.approx(3.2) and lr_at(cfg, 10) == pytest.approx(6.4)
    assert lr_at(cfg, 50) == pytest.approx(6.4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 90) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="optimizer"):
        ProbeConfig(optimizer="adam")


def test_head_is_the_official_bn_linear():
    torch.manual_seed(0)
    head = LinearHead(1024, 1000)
    assert not head.bn.affine and head.bn.eps == 1e-6
    assert abs(head.fc.weight.std().item() - 0.01) < 0.0005  # trunc_normal_ cuts at +-2 absolute, as timm's
    assert torch.count_nonzero(head.fc.bias) == 0
    assert [n for n, _ in head.named_parameters()] == ["fc.weight", "fc.bias"]  # BN has nothing to train


def test_topk_correct_and_cached_batches():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.5], [0.2, 0.3, 0.4]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5)) == [1, 2, 3]
    feats, labels = torch.arange(10.0)[:, None], torch.arange(10)
    batches = list(cached_batches(feats, labels, 4, seed=0)(0))
    assert len(batches) == 2 and all(f.shape == (4, 1) for f, _ in batches)  # drop_last
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 8 and all(torch.equal(f[:, 0].long(), y) for f, y in batches)
    with pytest.raises(ValueError, match="fewer than one batch"):
        cached_batches(feats, labels, 11, seed=0)


def make_colour_folder(root, per_class: dict[str, int], seed: int) -> None:
    """An ImageFolder split (root/<class>/<i>.png): 4 classes told apart by their dominant colour, with
    per-image noise and brightness so no two images are alike. 32 px."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    colours = {"red": (0.8, 0.2, 0.2), "green": (0.2, 0.8, 0.2), "blue": (0.2, 0.2, 0.8), "grey": (0.5, 0.5, 0.5)}
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            base = torch.tensor(colours[cls]).view(3, 1, 1) * (0.7 + 0.6 * torch.rand(1, generator=g))
            img = (base + 0.15 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)  # [3, 32, 32]
            Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(root / cls / f"{i}.png")


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    make_colour_folder(root / "train", {c: 16 for c in ("red", "green", "blue", "grey")}, seed=0)
    make_colour_folder(root / "val", {c: 8 for c in ("red", "green", "blue", "grey")}, seed=1)
    return root


# 32 val images, 4 classes: chance top-1 is 25% (8 +- 2.4 images); 60% (19.2 images) is 4.6 sigma above.
COLOUR_ABOVE_CHANCE = 60.0


def test_linprobe_cli_beats_chance_on_an_imagefolder_and_logs(tmp_path, colour_folder, capsys):
    ckpt = tmp_path / "enc.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model(TINY).state_dict()}, ckpt)  # an official-style encoder checkpoint
    out = tmp_path / "probe"
    rc = linprobe.main([
        "--checkpoint", str(ckpt), "--data_path", str(colour_folder), "--no-augment", "--optimizer", "sgd",
        "--blr", "1.0", "--batch_size", "16", "--epochs", "20", "--warmup_epochs", "2", "--eval_every", "10",
        "--output_dir", str(out), "--num_workers", "0", "--quiet",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "linprobe result: top-1" in printed and "top-5" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["top1"] > COLOUR_ABOVE_CHANCE, result
    assert result["top5"] == 100.0 and result["num_images"] == 32  # 4 classes: top-5 covers them all
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines[1:]] == [10, 20] and lines[0]["run"]["model"] == TINY


def test_linprobe_lars_paper_settings_beat_chance(colour_folder, capsys):
    rc = linprobe.main([
        "--random_init", "--model", TINY, "--data_path", str(colour_folder), "--no-augment", "--optimizer", "lars",
        "--blr", "20", "--batch_size", "16", "--epochs", "20", "--warmup_epochs", "2", "--num_workers", "0", "--quiet",
    ])
    out = capsys.readouterr().out
    assert rc == 0
    assert float(out.split("linprobe result: top-1 ")[1].split("%")[0]) > COLOUR_ABOVE_CHANCE, out


def test_linprobe_with_augmentation_runs_online(capsys):
    rc = linprobe.main([
        "--random_init", "--model", TINY, "--batch_size", "64", "--encoder_batch_size", "24", "--epochs", "1",
        "--warmup_epochs", "0", "--num_train", "128", "--num_val", "32", "--val_start", "128", "--num_workers", "0",
        "--quiet",
    ])
    assert rc == 0 and "linprobe result" in capsys.readouterr().out


def test_knn_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    train_y, test_y = torch.arange(40) % 4, torch.arange(20) % 4
    train = centers[train_y] + torch.randn(40, 16, generator=g)
    test = centers[test_y] + torch.randn(20, 16, generator=g)
    r = knn.knn_accuracy((train, train_y), (test, test_y), num_classes=4, k=5)
    assert r["top1"] == 100.0 and r["num_images"] == 20
    shuffled = knn.knn_accuracy((train, train_y[torch.randperm(40, generator=g)]), (test, test_y), 4, k=5)
    assert shuffled["top1"] < 75.0


def test_knn_cli_beats_chance(colour_folder, capsys):
    rc = knn.main(["--random_init", "--model", TINY, "--data_path", str(colour_folder), "--k", "5",
                   "--num_workers", "0", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert float(out.split("knn result: top-1 ")[1].split("%")[0]) > COLOUR_ABOVE_CHANCE, out


def test_procedural_default_split_runs(capsys):
    rc = knn.main(["--random_init", "--model", TINY, "--num_train", "64", "--num_val", "32", "--val_start", "64",
                   "--num_workers", "0", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "64 train / 32 val images" in out, out


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        linprobe.main(["--model", TINY])  # neither --checkpoint nor --random_init
    assert "--random_init" in capsys.readouterr().err
    torch.save({"model": {"conv1.weight": torch.randn(4, 3, 3, 3)}}, tmp_path / "resnet.pth")
    rc = linprobe.main(["--checkpoint", str(tmp_path / "resnet.pth"), "--model", TINY, *SMALL_SET])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "missing key 'cls_token'" in err, err
