"""AdamW with the official MAE parameter groups, and a switch that turns one optimizer step into a no-op.

No weight decay on biases, norm weights and the cls/mask tokens (every parameter with ndim <= 1, any
name ending in ".bias", and the tokens); the fixed sin-cos position embeddings are frozen and left out.
"""

import torch
import torch.nn as nn

from fastmae.speed import make_optimizer

NO_DECAY_NAMES = ("cls_token", "mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # pos_embed, decoder_pos_embed
        if p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class StepGate:
    """Wraps `optimizer.step` so the trainer can skip one step (a NaN/Inf step). DeepSpeed (ZeRO 0-3,
    bf16 or fp32) always ends its engine.step() by calling the client optimizer's step on the
    (partitioned) fp32 parameters, so a skipped step changes neither parameters nor optimizer state;
    DeepSpeed then clears the gradients as usual.

    Two ways to skip: `found_inf`, a device flag (1.0 = skip) that torch's fused AdamW reads in its kernel
    (the GradScaler interface: parameters, moments and step count stay as they were), so the host need not
    know yet whether the step is bad; or `veto`, a host bool, for optimizers without that interface."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.veto, self.calls = optimizer, False, 0
        self.found_inf: torch.Tensor | None = None
        inner = optimizer.step

        def gated_step(*args, **kwargs):
            self.calls += 1
            if self.veto:
                return None
            if self.found_inf is None:
                return inner(*args, **kwargs)
            optimizer.found_inf = self.found_inf.float().reshape(())  # 0-dim, like the step counts
            try:
                return inner(*args, **kwargs)
            finally:
                del optimizer.found_inf

        optimizer.step = gated_step

    @property
    def skips_on_device(self) -> bool:
        """Whether `found_inf` works: torch's fused Adam/AdamW (CUDA and CPU) honour it; the foreach and
        per-tensor versions raise on it, apex's and DeepSpeed's ignore it."""
        opt = self.optimizer
        return isinstance(opt, torch.optim.Adam | torch.optim.AdamW) and bool(opt.defaults.get("fused"))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, StepGate]:
    """AdamW(betas 0.9, 0.95) on fastmae.speed's fastest implementation for the device (fused on CUDA)."""
    opt = make_optimizer(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    return opt, StepGate(opt)
