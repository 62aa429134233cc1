"""Model + AdamW + DeepSpeed engine for a resolved TrainConfig."""

import torch

import fastmae_kernels as fk
from fastmae.models.registry import create_model
from fastmae.train.config import AUTOCAST_PRECISIONS, TrainConfig
from fastmae.train.optim import build_optimizer


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    # --fused_block_ops: the block ops on the MAE ops' backend (its Triton kernels; torch where none can run)
    block_ops = fk.resolve_backend(cfg.backend, device) if cfg.fused_block_ops else "auto"
    if "triton" in (cfg.attn_backend, cfg.decoder_attn_backend):
        fk.resolve_backend("triton", device)  # says now, not at the first step, why Triton cannot run here
    model = create_model(cfg.model, backend=cfg.backend, img_size=cfg.input_size, norm_pix_loss=cfg.norm_pix_loss,
                         norm_backend=block_ops, gelu_backend=block_ops, attn_backend=cfg.attn_backend,
                         decoder_attn_backend=cfg.decoder_attn_backend)
    model.to(device)
    if cfg.grad_checkpointing or cfg.compile:
        from fastmae.speed import optimize_model

        optimize_model(model, compile=cfg.compile, mode=cfg.compile_mode, grad_checkpointing=cfg.grad_checkpointing)
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
    skip_single_rank_allreduce(engine)
    return engine, optimizer, gate


def skip_single_rank_allreduce(engine) -> None:
    """ZeRO-0 on one data-parallel rank: DeepSpeed's gradient all-reduce would flatten every gradient into
    one buffer, reduce it over that one rank and copy it back (ViT-B: ~0.9 GB written and ~255 ops per
    backward, counted on the CPU), changing no value. Turn it off there; ZeRO-1/2/3 keep their reduction,
    which also fills their partitions."""
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def without_grad_norm(ds: dict, cfg: TrainConfig) -> dict:
    """ZeRO-1/2 compute the global gradient norm every step and read on the host whether it is finite
    (DeepSpeed 0.19.8: `is_invalid_grad_norm` in stage_1_and_2.py; for bf16 weights also an overflow check,
    see config.build_ds_config), a wait for the device per step. fastmae needs neither: no clipping by
    default (as official pretraining) and its own NaN guard, which skips a bad step on the device. So
    `compute_grad_norm: false` is set where DeepSpeed has the switch (0.19.8 has it, 0.17.2 not) and allows
    it: ZeRO 1/2, no clipping, bf16/fp32 weights, not DeepSpeed's separate bf16 optimizer (ZeRO-1 with bf16
    weights and fp32 gradient accumulation). fp16 keeps DeepSpeed's checks (its loss scaling needs them).
    A value in the user's file wins."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = ds.get("zero_optimization", {})
    fp32_accum = str(ds.get("data_types", {}).get("grad_accum_dtype")) in ("fp32", "float32", "float", "torch.float32")
    bf16_optimizer = cfg.precision == "bf16-pure" and cfg.zero_stage == 1 and fp32_accum
    if ("compute_grad_norm" not in DeepSpeedZeroConfig.model_fields or "compute_grad_norm" in zero
            or cfg.zero_stage not in (1, 2) or cfg.clip_grad > 0 or cfg.precision == "fp16" or bf16_optimizer):
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


def setup_warnings(cfg: TrainConfig) -> list[str]:
    """Start-up warnings for GPU settings that cost speed for nothing (the ZeRO ones counted on the CPU with
    DeepSpeed 0.19.8, benchmarks/NOTES.md §6.4; the fused block ops' measured on an H200, §7.3)."""
    if cfg.device_type != "cuda":
        return []
    warnings = []
    if cfg.precision == "bf16-pure" and cfg.zero_stage == 0:
        warnings.append("fastmae: warning: --precision bf16-pure with ZeRO-0 runs DeepSpeed's bf16 optimizer, which "
                        "reads every gradient tensor's finiteness and two norms on the host each step (a GPU wait "
                        "each); --zero_stage 1 or 2 has none")
    if cfg.world_size == 1 and cfg.zero_stage in (1, 2):
        warnings.append(f"fastmae: warning: ZeRO-{cfg.zero_stage} on one GPU partitions nothing but still copies every "
                        "gradient into its buckets and flat partitions and back (ViT-B: ~2.7 GB written per step); "
                        "--zero_stage 0 is faster with the same memory")
    if cfg.fused_block_ops and not cfg.compile:
        warnings.append("fastmae: warning: --fused_block_ops in eager mode: each fused op's Python autograd node "
                        "costs 240-500 us of host time per call (H200 host, 2026-12-04: eager ViT-H b64 ran 0.61x "
                        "and ViT-B b256 0.84x the reference with them, 1.04x and 1.20x without); they pay only where "
                        "the GPU, not the host, limits the step (benchmarks/NOTES.md §7.3)")
    return warnings
