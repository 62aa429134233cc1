"""Model + AdamW + DeepSpeed engine for a resolved TrainConfig."""

import torch

from fastmae.models.registry import create_model
from fastmae.train.config import TrainConfig
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


def input_dtype(cfg: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
