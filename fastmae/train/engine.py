"""Model + AdamW + DeepSpeed engine for a resolved TrainConfig."""

import torch

from fastmae.models.registry import create_model
from fastmae.train.config import AUTOCAST_PRECISIONS, TrainConfig
from fastmae.train.optim import StepGate, build_optimizer


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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg.ds_config)
    return engine, optimizer, gate


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
