"""The fast path for a training step: compile the model, pick a fused AdamW, checkpoint blocks if asked.

None of this changes the math: the compiled model computes the same function, fused AdamW the same
update (tests/test_fast_path.py checks both against the plain versions on CPU).

    model = create_model("mae_vit_base_patch16", backend="auto").cuda()
    optimize_model(model, compile=True, mode="max-autotune-no-cudagraphs")
    optimizer = make_optimizer(param_groups, lr=1.5e-4, betas=(0.9, 0.95))
"""

import importlib.util
import logging
import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger("fastmae.speed")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ADAMW_IMPLS = ("auto", "torch-fused", "torch-foreach", "torch-loop", "apex", "deepspeed")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def optimize_model(
    model: nn.Module,
    compile: bool = True,
    mode: str = "default",
    fullgraph: bool = True,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """Makes `model` fast in place and returns it (the same object, so state_dict keys stay official).

    - resolves the kernels backend ("auto" -> "cuda"/"triton"/"torch") now, so the compiled graph does not
      trace the backend search;
    - `grad_checkpointing`: recompute each block in backward (memory for ~1/3 more compute; ViT-H / big batches);
    - `compile`: torch.compile of the model's forward, bound to it in place (no `_orig_mod.` prefix in
      checkpoints; a deepcopy rebinds it to the copy). Not
      `nn.Module.compile`, which compiles `__call__` with the module's hooks: DeepSpeed's engine puts a forward
      pre-hook on the model (its throughput timer calls time.time() from step 3 on), which fullgraph refuses;
      compiling forward keeps such hooks eager and the model's own code one graph. `fullgraph=True` makes any
      graph break in the model an error instead of a silent slowdown. "reduce-overhead" adds CUDA graphs:
      the step's shapes are static (batch, image size and mask ratio fixed), so one capture serves every step.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    if hasattr(model, "backend"):
        import fastmae_kernels as fk

        model.backend = fk.resolve_backend(model.backend, _model_device(model))
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    if compile:
        # the class's forward, compiled, bound to this model: a deepcopy then rebinds it to the copy (a compiled
        # bound method `model.forward` would keep running the original model's weights)
        compiled = torch.compile(type(model).forward, mode=mode, fullgraph=fullgraph)
        model.forward = types.MethodType(compiled, model)
    return model


def _fused_supported(params: list[torch.Tensor]) -> bool:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = {p.device.type for p in params}
    floats = all(p.is_floating_point() for p in params)
    return floats and devices <= set(_get_fused_kernels_supported_devices())


def _flat_params(param_groups: Iterable) -> list[torch.Tensor]:
    groups = list(param_groups)
    if groups and isinstance(groups[0], dict):
        return [p for g in groups for p in g["params"]]
    return groups


def choose_adamw_impl(params: list[torch.Tensor], impl: str = "auto") -> str:
    """"auto": torch's fused AdamW (one multi-tensor kernel per step, no per-tensor launches) where the
    device has it (CUDA, and CPU in recent torch), else apex's FusedAdam if installed and on CUDA,
    else torch's foreach AdamW."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"AdamW impl must be one of {ADAMW_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if _fused_supported(params):
        return "torch-fused"
    on_cuda = all(p.is_cuda for p in params)
    if on_cuda and importlib.util.find_spec("apex") is not None:
        return "apex"
    return "torch-foreach"


def make_optimizer(
    param_groups: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.05,
    eps: float = 1e-8,
    impl: str = "auto",
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, the official MAE optimizer) from parameters or param-group dicts
    (e.g. the official no-decay split for biases/norms), on the fastest available implementation.

    Per-group "weight_decay" / "lr" keys win over the defaults here, as in any torch optimizer.

    `capturable`: for a step captured into a CUDA graph (fastmae.cuda_graph): torch's AdamW with
    capturable=True and every group's lr as a 0-d fp32 tensor on the parameters' device, which
    fastmae.train.schedule.set_lr changes in place (a float lr would be frozen into the graph)."""
    groups = list(param_groups)
    params = _flat_params(groups)
    if not params:
        raise ValueError("make_optimizer got no parameters")
    chosen = choose_adamw_impl(params, impl)
    kwargs: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if capturable:
        if impl == "auto" and not chosen.startswith("torch-"):
            chosen = "torch-foreach"  # auto found apex, whose FusedAdam a CUDA graph cannot capture
        if not chosen.startswith("torch-"):
            raise ValueError(f"a capturable AdamW needs torch's implementation (torch-fused, torch-foreach, "
                             f"torch-loop), not {chosen}")
        device = params[0].device

        def as_tensor(value) -> torch.Tensor:
            return torch.as_tensor(value, dtype=torch.float32, device=device).clone()

        if isinstance(groups[0], dict):  # a tensor of its own per group: set_lr scales each by its "lr_scale"
            groups = [dict(g, lr=as_tensor(g.get("lr", lr))) for g in groups]
        kwargs.update(lr=as_tensor(lr), capturable=True)
    log.info("fastmae: AdamW implementation %s", chosen)
    if chosen == "torch-fused":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if chosen == "torch-foreach":
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if chosen == "torch-loop":
        return torch.optim.AdamW(groups, foreach=False, **kwargs)
    if chosen == "apex":
        from apex.optimizers import FusedAdam  # optional: apex is not on PyPI

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    from deepspeed.ops.adam import FusedAdam  # builds its CUDA op on first use

    return FusedAdam(groups, adam_w_mode=True, **kwargs)
