"""The pretraining command line and its validated run settings.

Flags keep the official `main_pretrain.py` names and meanings (--batch_size is per GPU, lr = blr x
effective batch / 256, ...), plus DeepSpeed's own (--deepspeed_config, --local_rank) and fastmae's.

Every check that can fail on bad input runs here, before the process group, the data or the model
exists; a failure is one line on stderr and exit code 2 (see `ConfigError`).

Precedence for the settings DeepSpeed also knows (micro batch, accumulation, ZeRO stage, precision,
clipping): an explicit flag wins, then the --deepspeed_config file, then the device preset below.
"""

import argparse
import json
import os
from dataclasses import dataclass, field

from fastmae.models.registry import model_config, model_names

# bf16: the official mixed-precision recipe (fp32 weights and gradients, forward under torch.autocast, here in
#   bf16 instead of the paper's fp16, so no loss scaling), through DeepSpeed's `torch_autocast` section.
# bf16-pure: DeepSpeed's `bf16` mode: weights, activations and gradients in bf16 (the residual stream, LayerNorm
#   inputs and the fixed sin-cos tables too), fp32 master weights in the optimizer. Not the paper's numerics.
# fp16: DeepSpeed's `fp16` mode (fp16 weights, dynamic loss scaling); fp32: no mixed precision.
PRECISIONS = ("bf16", "bf16-pure", "fp16", "fp32")
AUTOCAST_PRECISIONS = {"bf16": "bfloat16"}  # precision -> the torch_autocast dtype DeepSpeed runs the forward in
BACKENDS = ("auto", "torch", "triton", "cuda")
# torch.compile modes the trainer offers. The CUDA-graph modes (reduce-overhead, max-autotune) are left out: a
# graph replay reuses its output buffers, gradients included, and DeepSpeed's gradient handling around them is
# untested (benchmarks/e2e.py times them on a plain step).
TRAINER_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
LOADERS = ("auto", "dali", "torchvision", "synthetic")

# No-argument presets. CPU: a model that trains visibly in minutes on 2 cores. CUDA: the official
# main_pretrain.py defaults (ViT-L/16 at 224, 64 per GPU, 400 epochs, 40 warmup) with the paper's blr.
CPU_PRESET = dict(
    model="mae_vit_tiny_patch4_dec64d2b", input_size=32, batch_size=64, epochs=8, warmup_epochs=1,
    blr=1.5e-3, num_workers=1, precision="fp32", log_every=5, save_every_steps=100, default_num_images=2048,
    default_image_size=64,
)
CUDA_PRESET = dict(
    model="mae_vit_large_patch16", input_size=224, batch_size=64, epochs=400, warmup_epochs=40,
    blr=1.5e-4, num_workers=10, precision="bf16", log_every=20, save_every_steps=1000, default_num_images=4096,
    default_image_size=256,
)


class ConfigError(ValueError):
    """Bad input found before anything was built; the CLI prints its message as one line, exit code 2."""


@dataclass(kw_only=True)
class TrainConfig:
    """Resolved run settings (after presets, the DeepSpeed config file and the world size)."""

    model: str
    """Registry name, e.g. mae_vit_large_patch16."""
    input_size: int
    batch_size: int
    """Images per GPU (per rank) per micro-step, as official."""
    accum_iter: int
    epochs: int
    warmup_epochs: float
    mask_ratio: float
    norm_pix_loss: bool
    weight_decay: float
    lr: float
    """Absolute peak lr (blr x effective batch / 256 unless --lr was given)."""
    blr: float
    min_lr: float
    clip_grad: float
    """0 = no clipping (official pretraining does not clip)."""
    data_path: str | None
    output_dir: str
    log_dir: str
    resume: str
    seed: int
    num_workers: int
    zero_stage: int
    precision: str
    max_steps: int
    """0 = no cap; else stop after this many optimizer steps (the lr schedule still spans --epochs)."""
    loader: str
    backend: str
    save_every_steps: int
    keep_last: int
    log_every: int
    max_bad_steps: int
    grad_checkpointing: bool
    compile: bool
    compile_mode: str
    default_num_images: int
    default_image_size: int
    device_type: str
    world_size: int
    ds_config: dict = field(default_factory=dict)
    """The DeepSpeed config this run hands to deepspeed.initialize."""
    fused_block_ops: bool = False
    """Every block's residual add + LayerNorm and MLP bias + GELU as fastmae_kernels' fused Triton kernels (else
    torch's ops, which Inductor fuses under --compile; eager, the kernels cost more host time than they save on
    the H200: benchmarks/NOTES.md §7.3)."""
    attn_backend: str = "sdpa"
    """Attention in the encoder: torch's SDPA, or "triton", fastmae_kernels' kernels for short sequences (opt-in
    until measured on a GPU: benchmarks/NOTES.md §7.5)."""
    decoder_attn_backend: str = "sdpa"
    """Attention in the decoder (head dim 32, where SDPA's cuDNN kernel pads most); --attn_backend's by default."""
    profile_steps: int = 0
    """torch.profiler over this many optimizer steps after a 5-step warm-up (output_dir/profile/); 0 = off."""
    fault_nan_steps: tuple[int, ...] = ()
    fault_inf_grad_steps: tuple[int, ...] = ()
    fault_disk_full_step: int = 0
    fault_step_sleep: float = 0.0

    @property
    def eff_batch_size(self) -> int:
        return self.batch_size * self.accum_iter * self.world_size

    @property
    def patch_size(self) -> int:
        return model_config(self.model)["patch_size"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "fastmae pretrain",
        description="MAE pretraining with DeepSpeed. With no arguments: the embedded default data set and a "
        "device preset (CPU: tiny model at 32 px; CUDA: official ViT-L/16 defaults). See docs/training.md.",
    )
    # official main_pretrain.py flags (None = take the preset / DeepSpeed config value)
    p.add_argument("--model", default=None, help=f"one of {', '.join(model_names())}")
    p.add_argument("--batch_size", type=int, default=None, help="images per GPU per micro-step (official)")
    p.add_argument("--global_batch_size", type=int, default=None,
                   help="alternative to --batch_size: images per optimizer step over all ranks; must divide by "
                   "world_size x accum_iter")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--accum_iter", type=int, default=None, help="gradient accumulation micro-steps per optimizer step")
    p.add_argument("--input_size", type=int, default=None, help="image side in px")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixel targets (paper recipe)")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--blr", type=float, default=None, help="base lr: lr = blr x effective batch / 256")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--warmup_epochs", type=float, default=None)
    p.add_argument("--data_path", default=None, help="ImageFolder / file list / .tar shards; none = embedded default")
    p.add_argument("--output_dir", default="./output_dir")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    p.add_argument("--resume", default="", help="'auto' (newest complete checkpoint in output_dir), a checkpoint "
                   "folder, or empty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--pin_mem", action="store_true", help=argparse.SUPPRESS)  # official flag; loaders pin on CUDA
    p.add_argument("--no_pin_mem", action="store_true", help=argparse.SUPPRESS)
    # DeepSpeed's own
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    try:
        import deepspeed

        deepspeed.add_config_arguments(p)
    except ImportError:  # the CLI still parses (and validates) without DeepSpeed installed
        p.add_argument("--deepspeed_config", default=None)
    # fastmae's
    p.add_argument("--zero_stage", type=int, default=None, help="ZeRO stage 0-3 (default: config file, else 0)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="bf16: fp32 weights + bf16 autocast, the official AMP recipe (default on CUDA); bf16-pure: "
                        "DeepSpeed's bf16 mode (bf16 weights and activations); fp16: DeepSpeed's fp16 mode with "
                        "loss scaling; fp32 (default on CPU)")
    p.add_argument("--clip_grad", type=float, default=None, help="max grad norm; 0 = off (default, as official)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = no cap)")
    p.add_argument("--loader", default="auto", choices=LOADERS)
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="fastmae_kernels backend for the MAE ops (gathers, mask tokens, loss)")
    p.add_argument("--fused_block_ops", action="store_true",
                   help="run every block's residual add + LayerNorm and MLP bias + GELU as fused Triton kernels "
                        "(off: torch's ops, faster in eager mode on an H200 and fused by Inductor under --compile)")
    p.add_argument("--attn_backend", default="sdpa", choices=("sdpa", "triton"),
                   help="attention kernels: torch's SDPA (cuDNN/flash, default) or fastmae's Triton kernels for short "
                        "sequences (not yet measured against SDPA on a GPU)")
    p.add_argument("--decoder_attn_backend", default=None, choices=("sdpa", "triton"),
                   help="the decoder's attention alone (default: --attn_backend)")
    p.add_argument("--save_every_steps", type=int, default=None, help="checkpoint period in optimizer steps")
    p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept on disk")
    p.add_argument("--log_every", type=int, default=None, help="log period in optimizer steps")
    p.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many consecutive NaN/Inf steps")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile_mode", default="default", choices=TRAINER_COMPILE_MODES,
                   help="torch.compile mode with --compile (max-autotune-no-cudagraphs: GEMM autotuning, minutes "
                        "at start)")
    p.add_argument("--num_images", type=int, default=None, help="size of the embedded default data set")
    p.add_argument("--image_size", type=int, default=None, help="side of the embedded default images (px)")
    # fault injection for the reliability tests and the soak benchmark (not for users)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="profile this many optimizer steps after 5 warm-up steps into output_dir/profile/ (rank 0)")
    p.add_argument("--fault_nan_steps", default="", help=argparse.SUPPRESS)
    p.add_argument("--fault_inf_grad_steps", default="", help=argparse.SUPPRESS)
    p.add_argument("--fault_disk_full_step", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fault_step_sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def _read_ds_config(path: str | None) -> dict:
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path}: no such file")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--deepspeed_config {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config {path}: must hold a JSON object, got {type(cfg).__name__}")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(
                f"--deepspeed_config {path}: remove its '{key}' section; fastmae builds AdamW and the "
                "warmup+cosine schedule from --blr/--lr, --weight_decay and --warmup_epochs"
            )
    return cfg


def _ds_precision(ds: dict, path: str | None) -> str | None:
    """The precision a DeepSpeed config file asks for, in --precision's words."""
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled"):
        dtype = str(autocast.get("dtype", "bfloat16")).replace("torch.", "")
        if dtype not in ("bfloat16", "bf16"):
            raise ConfigError(f"--deepspeed_config {path}: torch_autocast dtype {dtype} is not supported (DeepSpeed "
                              "scales no fp16 loss under ZeRO); use bfloat16, or --precision fp16")
        return "bf16"
    if ds.get("bf16", {}).get("enabled") or ds.get("bfloat16", {}).get("enabled"):
        return "bf16-pure"  # DeepSpeed's bf16 mode: bf16 weights
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return None


def _resolve_batch(a: argparse.Namespace, ds: dict, preset: dict, world: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps); the global batch must split evenly over the ranks."""
    accum = a.accum_iter if a.accum_iter is not None else int(ds.get("gradient_accumulation_steps", 1))
    if accum < 1:
        raise ConfigError(f"--accum_iter must be >= 1, got {accum}")
    if a.batch_size is not None and a.global_batch_size is not None:
        raise ConfigError("give --batch_size (per GPU) or --global_batch_size, not both")
    global_bs = a.global_batch_size
    if global_bs is None and a.batch_size is None and "train_micro_batch_size_per_gpu" not in ds:
        global_bs = ds.get("train_batch_size")
    if global_bs is not None:
        global_bs = int(global_bs)
        if global_bs < 1 or global_bs % (world * accum):
            raise ConfigError(
                f"global batch {global_bs} is not divisible by world_size {world} x accum_iter {accum}"
            )
        return global_bs // (world * accum), accum
    micro = a.batch_size if a.batch_size is not None else int(ds.get("train_micro_batch_size_per_gpu",
                                                                     preset["batch_size"]))
    if micro < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {micro}")
    return micro, accum


def _check_output_dir(path: str) -> None:
    """Create it and prove it is writable now, instead of failing at the first checkpoint."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--output_dir {path} is not writable: {e.strerror or e}") from None


def _check_resume(resume: str) -> None:
    if resume and resume != "auto" and not os.path.isdir(resume):
        raise ConfigError(f"--resume {resume}: no such checkpoint folder (use 'auto' for the newest in output_dir)")


def _step_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated ints, got {text!r}") from None


def resolve(a: argparse.Namespace, *, device_type: str, world_size: int, rank: int = 0) -> TrainConfig:
    """Namespace -> TrainConfig, raising ConfigError on any bad input. Touches only the file system."""
    preset = CUDA_PRESET if device_type == "cuda" else CPU_PRESET
    ds = _read_ds_config(getattr(a, "deepspeed_config", None))
    model = a.model or preset["model"]
    try:
        mcfg = model_config(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    input_size = a.input_size if a.input_size is not None else preset["input_size"]
    if input_size <= 0 or input_size % mcfg["patch_size"]:
        raise ConfigError(f"--input_size {input_size} is not divisible by {model}'s patch size {mcfg['patch_size']}")
    if not 0.0 < a.mask_ratio < 1.0:
        raise ConfigError(f"--mask_ratio must be in (0, 1), got {a.mask_ratio}")
    zero_stage = a.zero_stage if a.zero_stage is not None else int(ds.get("zero_optimization", {}).get("stage", 0))
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    if a.compile and zero_stage == 3:
        # ZeRO-3 keeps each parameter partitioned (an empty placeholder) outside its layer's forward and gathers it
        # in hooks that the whole-model compile cannot trace (it fails on the placeholders' shapes).
        raise ConfigError("--compile does not work with ZeRO stage 3; use --zero_stage 0-2 (every preset model, "
                          "ViT-H included, fits one 80 GB GPU with its optimizer state) or drop --compile")
    if a.compile_mode != "default" and not a.compile:
        raise ConfigError(f"--compile_mode {a.compile_mode} needs --compile")
    precision = a.precision or _ds_precision(ds, a.deepspeed_config) or preset["precision"]
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    micro, accum = _resolve_batch(a, ds, preset, world_size)
    epochs = a.epochs if a.epochs is not None else preset["epochs"]
    warmup = a.warmup_epochs if a.warmup_epochs is not None else preset["warmup_epochs"]
    if epochs < 1 or warmup < 0:
        raise ConfigError(f"--epochs must be >= 1 and --warmup_epochs >= 0, got {epochs} and {warmup}")
    if a.max_steps < 0:
        raise ConfigError(f"--max_steps must be >= 0, got {a.max_steps}")
    if a.data_path is not None:
        from fastmae.data.loader import validate_data_path

        try:
            validate_data_path(a.data_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_resume(a.resume)
    if rank == 0:
        _check_output_dir(a.output_dir)
    blr = a.blr if a.blr is not None else preset["blr"]
    eff = micro * accum * world_size
    clip = a.clip_grad if a.clip_grad is not None else float(ds.get("gradient_clipping", 0.0))
    save_every = a.save_every_steps if a.save_every_steps is not None else preset["save_every_steps"]
    log_every = a.log_every if a.log_every is not None else preset["log_every"]
    for name, value in (("--save_every_steps", save_every), ("--log_every", log_every),
                        ("--keep_last", a.keep_last), ("--max_bad_steps", a.max_bad_steps)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if a.profile_steps < 0:
        raise ConfigError(f"--profile_steps must be >= 0, got {a.profile_steps}")
    nan_steps = _step_list("--fault_nan_steps", a.fault_nan_steps)
    inf_grad_steps = _step_list("--fault_inf_grad_steps", a.fault_inf_grad_steps)
    cfg = TrainConfig(
        model=model, input_size=input_size, batch_size=micro, accum_iter=accum, epochs=epochs,
        warmup_epochs=warmup, mask_ratio=a.mask_ratio, norm_pix_loss=a.norm_pix_loss,
        weight_decay=a.weight_decay, lr=a.lr if a.lr is not None else blr * eff / 256, blr=blr, min_lr=a.min_lr,
        clip_grad=clip, data_path=a.data_path, output_dir=a.output_dir, log_dir=a.log_dir or a.output_dir,
        resume=a.resume, seed=a.seed,
        num_workers=a.num_workers if a.num_workers is not None else preset["num_workers"],
        zero_stage=zero_stage, precision=precision, max_steps=a.max_steps, loader=a.loader, backend=a.backend,
        save_every_steps=save_every, keep_last=a.keep_last, log_every=log_every, max_bad_steps=a.max_bad_steps,
        grad_checkpointing=a.grad_checkpointing, compile=a.compile, compile_mode=a.compile_mode,
        fused_block_ops=a.fused_block_ops, attn_backend=a.attn_backend,
        decoder_attn_backend=a.decoder_attn_backend or a.attn_backend,
        default_num_images=a.num_images if a.num_images is not None else preset["default_num_images"],
        default_image_size=a.image_size if a.image_size is not None else preset["default_image_size"],
        device_type=device_type, world_size=world_size, profile_steps=a.profile_steps, fault_nan_steps=nan_steps,
        fault_inf_grad_steps=inf_grad_steps,
        fault_disk_full_step=a.fault_disk_full_step, fault_step_sleep=a.fault_step_sleep,
    )
    if cfg.num_workers < 0 or cfg.default_num_images < 1 or cfg.default_image_size < 1:
        raise ConfigError("--num_workers must be >= 0, --num_images and --image_size >= 1")
    if cfg.default_num_images < micro * world_size and a.data_path is None and a.loader != "synthetic":
        raise ConfigError(
            f"--num_images {cfg.default_num_images} does not fill one batch of {micro} on {world_size} rank(s)"
        )
    cfg.ds_config = build_ds_config(ds, cfg)
    return cfg


def build_ds_config(base: dict, cfg: TrainConfig) -> dict:
    """The DeepSpeed config: the user's file with fastmae's resolved values written over its batch,
    ZeRO stage, precision and clipping keys (so the two can never disagree)."""
    ds = json.loads(json.dumps(base))  # deep copy
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.accum_iter
    ds["train_batch_size"] = cfg.eff_batch_size
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.zero_stage
    ds.pop("bfloat16", None)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16-pure"}
    if cfg.precision == "bf16-pure":
        # DeepSpeed (0.19.8: on by default; 0.17.2: off) reads on the host whether each step's gradients are
        # finite, to skip a bad step; fastmae's NaN guard does that on the device, without the wait
        ds["bf16"].setdefault("check_grad_overflow", False)
    autocast = ds.get("torch_autocast", {})
    if cfg.precision in AUTOCAST_PRECISIONS:
        # every gradient reduced in fp32, as the official DDP run did (DeepSpeed's default would reduce the
        # Linear layers' gradients in bf16)
        autocast = {"lower_precision_safe_modules": [], **autocast, "dtype": AUTOCAST_PRECISIONS[cfg.precision]}
    ds["torch_autocast"] = {**autocast, "enabled": cfg.precision in AUTOCAST_PRECISIONS}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    if cfg.precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic scaling
        ds["fp16"].setdefault("initial_scale_power", 16)
    ds["gradient_clipping"] = cfg.clip_grad
    ds.setdefault("steps_per_print", 10**12)  # fastmae logs; keep DeepSpeed's own step print quiet
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer (on by default) synchronizes the device at the start of every forward and
    # the end of every step (utils/timer.py) to time them; fastmae logs its own images/s from host time
    # between log lines, so the timer would only stall the host twice a step.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    ds["zero_allow_untested_optimizer"] = True  # the client AdamW (fused torch) under ZeRO
    return ds


def parse_config(argv: list[str] | None, *, device_type: str, world_size: int, rank: int = 0) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return resolve(args, device_type=device_type, world_size=world_size, rank=rank)
