"""Trainer settings: bad input fails at start with one line (exit 2), the lr rule and schedule, the
no-decay parameter groups, the DeepSpeed config, and the reconstruction PNG."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.models.registry import create_model
from fastmae.train.config import ConfigError, parse_config
from fastmae.train.optim import param_groups
from fastmae.train.schedule import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(argv, tmp_path, world=1, device="cpu"):
    return parse_config([*argv, "--output_dir", str(tmp_path / "out")], device_type=device, world_size=world)


def bad(argv, tmp_path, world=1, device="cpu") -> str:
    with pytest.raises(ConfigError) as e:
        cfg(argv, tmp_path, world, device)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_cpu_preset(tmp_path):
    c = cfg([], tmp_path)
    assert (c.model, c.input_size, c.precision, c.zero_stage, c.mask_ratio) == (
        "mae_vit_tiny_patch4_dec64d2b", 32, "fp32", 0, 0.75)
    assert c.data_path is None and c.norm_pix_loss is False and c.weight_decay == 0.05 and c.min_lr == 0.0
    assert c.lr == pytest.approx(c.blr * c.batch_size / 256)


def test_cuda_preset_is_official(tmp_path):
    c = cfg([], tmp_path, device="cuda")
    assert (c.model, c.input_size, c.batch_size, c.epochs, c.warmup_epochs, c.blr, c.precision) == (
        "mae_vit_large_patch16", 224, 64, 400, 40, 1.5e-4, "bf16")


def test_lr_is_blr_times_effective_batch(tmp_path):
    c = cfg(["--batch_size", "24", "--accum_iter", "3", "--blr", "1e-3"], tmp_path, world=4)
    assert c.eff_batch_size == 24 * 3 * 4
    assert c.lr == pytest.approx(1e-3 * 288 / 256)
    assert cfg(["--lr", "0.5"], tmp_path).lr == 0.5


def test_global_batch_size_splits_over_ranks(tmp_path):
    c = cfg(["--global_batch_size", "96", "--accum_iter", "2"], tmp_path, world=4)
    assert (c.batch_size, c.eff_batch_size) == (12, 96)


def test_schedule_matches_official_formula():
    kw = dict(lr=1.0, min_lr=0.1, warmup_epochs=4, epochs=20)
    assert lr_at(0.0, **kw) == 0.0
    assert lr_at(2.0, **kw) == pytest.approx(0.5)
    assert lr_at(4.0, **kw) == pytest.approx(1.0)
    assert lr_at(12.0, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20.0, **kw) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_tokens():
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= nd
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= d
    assert "pos_embed" not in nd | d and "decoder_pos_embed" not in nd | d  # frozen
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert all(n.endswith(".weight") and model.get_parameter(n).ndim >= 2 for n in d)


def test_ds_config_takes_file_values_and_flags_win(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 2,
                                "zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": True}}))
    c = cfg(["--deepspeed_config", str(path)], tmp_path, world=2)
    # DeepSpeed's bf16 section means its bf16-weights mode, which fastmae calls bf16-pure
    assert (c.batch_size, c.accum_iter, c.zero_stage, c.precision) == (5, 2, 3, "bf16-pure")
    ds = c.ds_config
    assert ds["train_batch_size"] == 20 and ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"]
    c = cfg(["--deepspeed_config", str(path), "--zero_stage", "1", "--precision", "fp32"], tmp_path, world=2)
    assert c.ds_config["zero_optimization"]["stage"] == 1 and not c.ds_config["bf16"]["enabled"]
    assert not c.ds_config["torch_autocast"]["enabled"]


@pytest.mark.parametrize("flag, file_section, want", [
    (None, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "bf16"),
    ("bf16", {}, "bf16"),
    ("bf16-pure", {"torch_autocast": {"enabled": True}}, "bf16-pure"),  # the flag wins over the file
])
def test_bf16_is_autocast_with_fp32_weights_and_fp32_gradient_reduction(tmp_path, flag, file_section, want):
    """--precision bf16 is the official AMP recipe in bf16: DeepSpeed's torch_autocast (fp32 weights), its bf16
    mode off, and no layer's gradients reduced in bf16; bf16-pure is DeepSpeed's bf16 mode."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(file_section))
    c = cfg(["--deepspeed_config", str(path)] + (["--precision", flag] if flag else []), tmp_path, world=2)
    ds = c.ds_config
    assert c.precision == want
    if want == "bf16":
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    else:
        assert ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"]


def test_bad_fp16_autocast_in_deepspeed_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"torch_autocast": {"enabled": True, "dtype": "float16"}}))
    assert "torch_autocast dtype float16" in bad(["--deepspeed_config", str(path)], tmp_path)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_shipped_ds_configs_parse(tmp_path, name):
    c = cfg(["--deepspeed_config", os.path.join(ROOT, "configs", f"ds_{name}.json")], tmp_path, world=2)
    assert c.zero_stage == int(name[4]) and c.precision == "bf16"  # the official AMP recipe, in bf16


def test_ds_config_turns_off_the_synchronizing_throughput_timer_unless_the_file_sets_it(tmp_path):
    """DeepSpeed's throughput timer synchronizes the device twice per step (tests/test_host_syncs.py)."""
    assert cfg([], tmp_path).ds_config["timers"] == {"throughput": {"enabled": False}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"timers": {"throughput": {"enabled": True, "synchronized": False}}}))
    assert cfg(["--deepspeed_config", str(path)], tmp_path).ds_config["timers"]["throughput"]["enabled"]


@pytest.mark.parametrize("argv, file, want", [
    (["--zero_stage", "2"], {}, False),
    (["--zero_stage", "1", "--precision", "fp32"], {}, False),
    (["--zero_stage", "2", "--precision", "bf16-pure"], {}, False),
    (["--zero_stage", "2", "--clip_grad", "1.0"], {}, None),  # clipping needs the norm
    (["--zero_stage", "2", "--precision", "fp16"], {}, None),  # loss scaling needs DeepSpeed's checks
    # ZeRO-1 with bf16 weights and fp32 gradient accumulation is DeepSpeed's bf16 optimizer: no switch there
    (["--zero_stage", "1", "--precision", "bf16-pure"], {"data_types": {"grad_accum_dtype": "fp32"}}, None),
    (["--zero_stage", "0"], {}, None),
    (["--zero_stage", "3"], {}, None),  # DeepSpeed has the switch for ZeRO 1/2 only
    (["--zero_stage", "2"], {"zero_optimization": {"compute_grad_norm": True}}, True),  # the user's file wins
])
def test_grad_norm_is_off_where_nothing_uses_it(tmp_path, argv, file, want):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from fastmae.train.engine import without_grad_norm

    if "compute_grad_norm" not in DeepSpeedZeroConfig.model_fields:
        pytest.skip("this DeepSpeed has no zero_optimization.compute_grad_norm")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(file))
    c = cfg(["--deepspeed_config", str(path), *argv], tmp_path, device="cuda")  # cuda: fp16 is allowed
    ds = without_grad_norm(c.ds_config, c)
    assert ds["zero_optimization"].get("compute_grad_norm") is want
    assert "compute_grad_norm" not in c.ds_config["zero_optimization"] or file  # the resolved config is untouched


def test_start_up_warnings_name_the_slow_gpu_settings_and_the_fix(tmp_path):
    from fastmae.train.engine import setup_warnings

    def warnings(argv, world=1, device="cuda"):
        return setup_warnings(cfg(argv, tmp_path, world=world, device=device))

    (pure,) = warnings(["--precision", "bf16-pure", "--zero_stage", "0"])
    assert "bf16-pure with ZeRO-0" in pure and "--zero_stage 1 or 2" in pure and "\n" not in pure
    (one_gpu,) = warnings(["--zero_stage", "2"])
    assert "ZeRO-2 on one GPU" in one_gpu and "--zero_stage 0" in one_gpu
    assert warnings(["--zero_stage", "2"], world=2) == []  # several GPUs: ZeRO-2 partitions
    assert warnings(["--precision", "bf16", "--zero_stage", "0"]) == []
    assert warnings(["--zero_stage", "3"]) == []
    assert warnings(["--precision", "bf16-pure", "--zero_stage", "1"], device="cpu") == []  # no GPU to wait for
    (fused,) = warnings(["--fused_block_ops", "--zero_stage", "0"])
    assert "--fused_block_ops in eager mode" in fused and "host time" in fused and "\n" not in fused
    assert warnings(["--fused_block_ops", "--compile", "--zero_stage", "0"]) == []  # compiled: no autograd nodes


def test_bf16_pure_leaves_the_nan_check_to_fastmaes_guard_unless_the_file_sets_it(tmp_path):
    """DeepSpeed's bf16 overflow check reads the device every step; fastmae's guard skips bad steps on it."""
    assert cfg(["--precision", "bf16-pure"], tmp_path).ds_config["bf16"]["check_grad_overflow"] is False
    assert "check_grad_overflow" not in cfg(["--precision", "bf16"], tmp_path).ds_config["bf16"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True, "check_grad_overflow": True}}))
    assert cfg(["--deepspeed_config", str(path)], tmp_path).ds_config["bf16"]["check_grad_overflow"] is True


# -- bad input: one line each ------------------------------------------------------------------------
def test_bad_missing_data_folder(tmp_path):
    assert "does not exist" in bad(["--data_path", str(tmp_path / "nope")], tmp_path)


def test_bad_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in bad(["--data_path", str(tmp_path / "empty")], tmp_path)


def test_bad_deepspeed_config_missing(tmp_path):
    assert "no such file" in bad(["--deepspeed_config", str(tmp_path / "ds.json")], tmp_path)


def test_bad_deepspeed_config_json(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"zero_optimization": {"stage": 2,}}')
    assert "not valid JSON" in bad(["--deepspeed_config", str(p)], tmp_path)


def test_bad_deepspeed_config_with_optimizer(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"optimizer": {"type": "Adam"}}')
    assert "'optimizer'" in bad(["--deepspeed_config", str(p)], tmp_path)


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_bad_mask_ratio(tmp_path, ratio):
    assert "(0, 1)" in bad(["--mask_ratio", ratio], tmp_path)


def test_bad_input_size_not_divisible_by_patch(tmp_path):
    assert "not divisible by" in bad(["--input_size", "30"], tmp_path)


def test_bad_global_batch_not_divisible_by_world(tmp_path):
    assert "not divisible by world_size 4" in bad(["--global_batch_size", "66"], tmp_path, world=4)


def test_bad_ds_train_batch_not_divisible_by_world(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"train_batch_size": 30}')
    assert "not divisible by world_size 4" in bad(["--deepspeed_config", str(p)], tmp_path, world=4)


@pytest.mark.parametrize("stage", ["4", "-1"])
def test_bad_zero_stage(tmp_path, stage):
    assert "ZeRO stage" in bad(["--zero_stage", stage], tmp_path)


def test_bad_zero_stage_in_ds_config(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"zero_optimization": {"stage": 7}}')
    assert "ZeRO stage" in bad(["--deepspeed_config", str(p)], tmp_path)


def test_bad_compile_with_zero3(tmp_path):
    assert "--compile does not work with ZeRO stage 3" in bad(["--compile", "--zero_stage", "3"], tmp_path)
    p = tmp_path / "ds.json"
    p.write_text('{"zero_optimization": {"stage": 3}}')
    assert "--compile does not work with ZeRO stage 3" in bad(["--compile", "--deepspeed_config", str(p)], tmp_path)


def test_bad_output_dir_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        parse_config(["--output_dir", str(blocker / "out")], device_type="cpu", world_size=1)


def test_bad_fp16_on_cpu(tmp_path):
    assert "CUDA" in bad(["--precision", "fp16"], tmp_path)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    """The real entry point: exit code 2, exactly one stderr line, no traceback, nothing built."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "fastmae", "pretrain.py"), "--mask_ratio", "1.2",
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert lines == ["fastmae pretrain: error: --mask_ratio must be in (0, 1), got 1.2"], proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


# -- reconstruction PNG -------------------------------------------------------------------------------
class _Oracle(torch.nn.Module):
    """Wraps a model but predicts the exact (norm-pix) target, so a correct un-normalisation returns the
    original image."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.norm_pix_loss = inner.norm_pix_loss
        self.patch_embed = inner.patch_embed

    def patchify(self, x):
        return self.inner.patchify(x)

    def unpatchify(self, x):
        return self.inner.unpatchify(x)

    def forward(self, imgs, mask_ratio, noise):
        _, _, mask = self.inner(imgs, mask_ratio=mask_ratio, noise=noise)
        t = self.patchify(imgs)
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return None, t, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_unnormalises_and_pastes(norm_pix):
    from fastmae.reconstruction import reconstruct

    torch.manual_seed(0)
    model = _Oracle(create_model("mae_vit_tiny_patch4_dec64d2b", norm_pix_loss=norm_pix))
    imgs = torch.randn(3, 3, 32, 32)
    out = reconstruct(model, imgs, 0.75, seed=1)
    torch.testing.assert_close(out["reconstruction"], imgs, atol=1e-4, rtol=1e-4)
    vis = out["mask"] == 0
    assert vis.float().mean().item() == pytest.approx(0.25)
    assert torch.equal(out["pasted"][vis], imgs[vis])  # pasting is pure data movement
    assert torch.equal(out["masked"][~vis], torch.zeros_like(imgs[~vis]))


def test_reconstruction_of_a_compiled_model_runs_its_eager_forward():
    """--compile binds a compiled forward to the model; the end-of-run reconstruction (8 images, no grad)
    must not recompile it (a minute or more on a GPU) but give the same pictures."""
    from fastmae.reconstruction import reconstruct

    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    imgs = torch.randn(2, 3, 32, 32)
    want = reconstruct(model, imgs, 0.75, seed=1)
    calls = []
    # where fastmae.speed.optimize_model(compile=True) binds the compiled forward; here one that must not run
    model.forward = lambda *a, **k: calls.append(1)
    got = reconstruct(model, imgs, 0.75, seed=1)
    assert not calls
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_reconstruction_grid_png(tmp_path):
    from fastmae.reconstruction import save_reconstruction_grid

    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    imgs = torch.randn(2, 3, 32, 32)
    path = save_reconstruction_grid(model, imgs, str(tmp_path / "r.png"), mask_ratio=0.75, seed=0, scale=2)
    arr = np.asarray(Image.open(path))
    assert arr.shape == (2 * (64 + 2) + 2, 4 * (64 + 2) + 2, 3)
    # the first column is the un-normalised original (nearest-upsampled x2)
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    want = ((imgs[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(arr[2:66:2, 2:66:2], want)


def test_start_up_check_names_the_precision_and_refuses_a_mismatch():
    """The trainer checks what DeepSpeed really did: weights' dtype and autocast must match --precision (a
    DeepSpeed that ignored its torch_autocast section would otherwise train in plain fp32 silently)."""
    import torch

    from fastmae.train.engine import check_precision

    class Engine:
        def __init__(self, dtype, autocast):
            self.module, self.autocast = torch.nn.Linear(2, 2).to(dtype), autocast

        def torch_autocast_enabled(self):
            return self.autocast

    def with_precision(p):
        return type("Cfg", (), {"precision": p})()

    want = "bf16 (float32 weights, bf16 autocast)"
    assert check_precision(Engine(torch.float32, True), with_precision("bf16")) == want
    assert check_precision(Engine(torch.bfloat16, False), with_precision("bf16-pure")) == "bf16-pure (bfloat16 weights)"
    for dtype, autocast, precision in [(torch.float32, False, "bf16"), (torch.bfloat16, False, "bf16"),
                                       (torch.float32, False, "bf16-pure"), (torch.float32, True, "fp32")]:
        with pytest.raises(RuntimeError, match=f"--precision {precision}: DeepSpeed left"):
            check_precision(Engine(dtype, autocast), with_precision(precision))


def test_compile_mode_reaches_the_model_and_needs_compile(tmp_path):
    c = cfg(["--compile", "--compile_mode", "max-autotune-no-cudagraphs"], tmp_path)
    assert c.compile and c.compile_mode == "max-autotune-no-cudagraphs"
    assert cfg([], tmp_path).compile_mode == "default"
    assert "needs --compile" in bad(["--compile_mode", "max-autotune-no-cudagraphs"], tmp_path)
    with pytest.raises(SystemExit):  # CUDA-graph modes are not offered by the trainer (argparse: exit 2)
        cfg(["--compile", "--compile_mode", "reduce-overhead"], tmp_path)


def test_bad_profile_steps(tmp_path):
    assert "--profile_steps must be >= 0" in bad(["--profile_steps", "-1"], tmp_path)


@pytest.mark.parametrize("argv, want", [([], "torch"), (["--fused_block_ops"], "triton")])
def test_block_ops_are_torchs_unless_fused_block_ops(tmp_path, argv, want):
    """The trainer's model runs torch's add + LayerNorm and nn.Linear + nn.GELU by default; --fused_block_ops puts
    them on the MAE ops' backend (here the Triton interpreter, conftest's TRITON_INTERPRET=1), eager and compiled
    (benchmarks/NOTES.md §7.3)."""
    import fastmae_kernels as fk
    from fastmae.train.engine import build_model

    if "triton" not in fk.available_backends("cpu"):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
    c = cfg(["--model", "mae_vit_tiny_patch4_dec64d2b", "--backend", "triton", *argv], tmp_path)
    model = build_model(c, torch.device("cpu"))
    for compiled in (False, True):
        assert model.norm_backend_for(compiled=compiled, device="cpu") == want
        assert model.gelu_backend_for(compiled=compiled, device="cpu") == want


@pytest.mark.parametrize("argv, encoder, decoder", [
    ([], "sdpa", "sdpa"), (["--attn_backend", "triton"], "triton", "triton"),
    (["--decoder_attn_backend", "triton"], "sdpa", "triton"),
    (["--attn_backend", "triton", "--decoder_attn_backend", "sdpa"], "triton", "sdpa"),
])
def test_attn_backend_flags_reach_every_block(tmp_path, argv, encoder, decoder):
    """--attn_backend sets every block's attention, --decoder_attn_backend the decoder's over it; SDPA by default
    (the Triton kernels are not yet timed on a GPU, benchmarks/NOTES.md §7.5)."""
    import fastmae_kernels as fk
    from fastmae.train.engine import build_model

    c = cfg(["--model", "mae_vit_tiny_patch4_dec64d2b", *argv], tmp_path)
    assert (c.attn_backend, c.decoder_attn_backend) == (encoder, decoder)
    if "triton" in (encoder, decoder) and "triton" not in fk.available_backends("cpu"):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
    model = build_model(c, torch.device("cpu"))
    assert {b.attn.backend for b in model.blocks} == {encoder}
    assert {b.attn.backend for b in model.decoder_blocks} == {decoder}


def test_attn_backend_triton_where_triton_cannot_run_fails_at_build(tmp_path, monkeypatch):
    """Not at the first step, after the data and DeepSpeed are up: at model build, with Triton's reason."""
    import fastmae_kernels.dispatch as dispatch
    from fastmae.train.engine import build_model

    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, device: "no Triton here (test)")
    c = cfg(["--model", "mae_vit_tiny_patch4_dec64d2b", "--decoder_attn_backend", "triton"], tmp_path)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu: no Triton here"):
        build_model(c, torch.device("cpu"))


def test_attn_backend_rejects_unknown_names(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cfg(["--attn_backend", "flash"], tmp_path)
    assert "invalid choice: 'flash'" in capsys.readouterr().err
