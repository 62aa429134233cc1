"""A DeepSpeed ZeRO-3 checkpoint (2 CPU ranks over gloo, every parameter partitioned) is consolidated
in-process by fastmae.checkpoint_io and fastmae.export, with no separate zero_to_fp32 run."""

import glob
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from fastmae import export  # noqa: E402
from fastmae.checkpoint_io import load_mae, read_state_dict  # noqa: E402
from fastmae.models import create_model  # noqa: E402
from fastmae.train.launch_local import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "mae_vit_tiny_patch4_dec64d2b"


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TMPDIR=str(out),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions")))
    shm_before = set(glob.glob("/dev/shm/deepspeed_*"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "tests", "_make_zero3_checkpoint.py"), str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        for path in set(glob.glob("/dev/shm/deepspeed_*")) - shm_before:  # only what this run created
            try:
                os.remove(path)
            except OSError:
                pass
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_zero3_checkpoint_is_partitioned(zero3_run):
    files = sorted(os.listdir(zero3_run / "checkpoints" / "step1"))
    assert files == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (zero3_run / "checkpoints" / "latest").read_text().strip() == "step1"


@pytest.mark.parametrize("where", ["root", "tag"])
def test_zero3_consolidates_exactly(zero3_run, where):
    expected = torch.load(zero3_run / "expected.pt", weights_only=True)  # gathered from the live engine
    path = zero3_run / "checkpoints" / ("step1" if where == "tag" else "")
    sd = read_state_dict(str(path))
    assert sorted(sd) == sorted(expected)
    for k, v in expected.items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v), k  # pure data movement: exact
    model, name = load_mae(str(path))  # the model is guessed from the shapes
    assert name == TINY and all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_zero3_weights_are_trained_not_init(zero3_run):
    torch.manual_seed(0)  # the helper script's initialisation
    init = create_model(TINY).state_dict()
    sd = read_state_dict(str(zero3_run / "checkpoints"))
    changed = {k for k in sd if not torch.equal(sd[k], init[k])}
    frozen = {"pos_embed", "decoder_pos_embed"}  # fixed sin-cos, requires_grad=False
    assert changed == set(sd) - frozen
    assert all(torch.equal(sd[k], init[k]) for k in frozen)


def test_export_cli_reads_zero3(zero3_run, tmp_path):
    out = tmp_path / "enc.safetensors"
    assert export.main([str(zero3_run / "checkpoints"), "--timm", str(out), "--mae", str(tmp_path / "m.pth")]) == 0
    from safetensors.torch import load_file

    got, expected = load_file(str(out)), torch.load(zero3_run / "expected.pt", weights_only=True)
    assert got and all(torch.equal(v, expected[k]) for k, v in got.items())
    assert "decoder_embed.weight" not in got and "blocks.3.mlp.fc2.bias" in got
