"""Model + AdamW + DeepSpeed engine for a resolved TrainConfig."""

import torch

from fastmae.models.registry import create_model
from fastmae.train.config import AUTOCAST_PRECISIONS, TrainConfig
from fastmae.train.optim import build_optimizer


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = create_model(cfg.model, backend=cfg.backend, img_size=cfg.input_size, norm_pix_loss=cfg.norm_pix_loss)
    model.to(device)
    if cfg.grad_checkpointing or cfg.compile:
        from fastmae.speed import optimize_model

        optimize_model(model, compile=cfg.compile, grad_checkpointing=cfg.grad_checkpointing)
    return model


def build_engine(cfg: TrainConfig, device: torch.device):
    """(engine, client optimizer, StepGate). The client optimizer is a torch AdamW (fused on CUDA): passing
    it to deepspeed.initialize avoids JIT-building DeepSpeed's own Adam ops, which costs minutes on a
    fresh machine and a compiler on CPU."""
    import deepspeed

    model = build_model(cfg, device)
    optimizer, gate = build_optimizer(model, cfg.lr, cfg.weight_decay)
    config = without_grad_norm(cfg.ds_config, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer, gate


def without_grad_norm(ds: dict, cfg: TrainConfig) -> dict:
    """ZeRO-1/2 compute the global gradient norm every step and, for fp32 weights, read whether it is finite
    on the host (DeepSpeed 0.19: `is_invalid_grad_norm` in stage_1_and_2.py), a wait for the device per step.
    fastmae needs neither: no clipping by default (as official pretraining) and its own NaN guard, which
    skips a bad step on the device. So `compute_grad_norm: false` is set where DeepSpeed has it (newer than
    0.17) and allows it: ZeRO 1/2, no clipping, fp32 weights (bf16 autocast or fp32; DeepSpeed's bf16 and
    fp16 modes have their own optimizers and overflow checks). A value in the user's file wins."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = ds.get("zero_optimization", {})
    if ("compute_grad_norm" not in DeepSpeedZeroConfig.model_fields or "compute_grad_norm" in zero
            or cfg.zero_stage not in (1, 2) or cfg.clip_grad > 0 or WEIGHT_DTYPES[cfg.precision] != torch.float32):
        return ds
    return {**ds, "zero_optimization": {**zero, "compute_grad_norm": False}}


# --precision -> the dtype DeepSpeed keeps the model's weights in (autocast: fp32); the images fed to the engine
# take it too (autocast casts fp32 images itself)
WEIGHT_DTYPES = {"bf16": torch.float32, "bf16-pure": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def input_dtype(cfg: TrainConfig) -> torch.dtype:
    return WEIGHT_DTYPES[cfg.precision]


def check_precision(engine, cfg: TrainConfig) -> str:
    """Checks that DeepSpeed set the model up as --precision asked (weights' dtype, autocast on or off) and
    returns a short description for the start-up line. A DeepSpeed that ignored its torch_autocast section
    would otherwise train in plain fp32 without a word."""
    dtypes = {p.dtype for p in engine.module.parameters()}
    autocast = bool(engine.torch_autocast_enabled()) if hasattr(engine, "torch_autocast_enabled") else False
    want_autocast = cfg.precision in AUTOCAST_PRECISIONS
    weight_dtype = WEIGHT_DTYPES[cfg.precision]
    if dtypes != {weight_dtype} or autocast != want_autocast:
        raise RuntimeError(f"--precision {cfg.precision}: DeepSpeed left the weights in {sorted(map(str, dtypes))} "
                           f"with autocast {'on' if autocast else 'off'}")
    weights = str(weight_dtype).replace("torch.", "")
    cast = f", {AUTOCAST_PRECISIONS[cfg.precision].replace('bfloat16', 'bf16')} autocast" if autocast else ""
    return f"{cfg.precision} ({weights} weights{cast})"
