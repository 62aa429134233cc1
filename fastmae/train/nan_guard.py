"""NaN/Inf guard: a step whose loss or gradients are not finite on any rank is skipped on every rank.

Two ways to see the gradients, by where they still are when the step's flag is taken:
- ZeRO-1/2/3 (`grads_kept=False`): DeepSpeed moves each gradient into its buckets and partitions during
  backward, so gradient hooks write each parameter's local gradient sum (fp32) into its slot of one device
  vector as backward runs (NaN and Inf propagate through a sum): one reduction kernel per parameter, no host
  sync (ViT-B has 252 parameter tensors; the first version also launched an add per parameter, and a cast
  for bf16 gradients). The slots are folded into one scalar before the next backward and when the flag is
  read, so no micro-batch of an accumulated step is overwritten unseen. Local gradients are checked before
  DeepSpeed reduces them: a non-finite local gradient on any rank makes the reduced one non-finite too.
- ZeRO-0 (`grads_kept=True`): every parameter keeps its (all-reduced, accumulated) .grad until the optimizer
  step, so one multi-tensor norm over all of them when the flag is taken replaces the 252 hook kernels
  (a handful of launches; NaN and Inf propagate through a norm as through a sum).
The trainer reads the flag once per optimizer step, in the same all-reduce as the preemption flag.
"""

import functools

import torch
import torch.nn as nn


class NanGuard:
    """`check_grads=False` (fp16): gradients are loss-scaled, and an overflow there is routine while
    DeepSpeed's dynamic loss scaler looks for its scale (it skips those steps itself); only a non-finite
    loss then counts as a bad step, so a run of early overflows cannot stop the run."""

    def __init__(self, model: nn.Module, device: torch.device, max_bad_steps: int, check_grads: bool = True,
                 grads_kept: bool = False):
        self.max_bad_steps = max_bad_steps
        self.consecutive_bad = 0
        self.skipped_steps = 0
        self._acc = torch.zeros((), dtype=torch.float32, device=device)
        params = [p for p in model.parameters() if p.requires_grad] if check_grads else []
        self._kept = params if grads_kept else []  # checked at local_bad() through their .grad
        hooked = [] if grads_kept else params
        self._sums = torch.zeros(len(hooked), dtype=torch.float32, device=device)  # this backward's, per param
        # a leaf's hook runs once per backward (a leaf used twice gets its gradients summed first)
        self._handles = [p.register_hook(functools.partial(self._hook, i)) for i, p in enumerate(hooked)]

    def _hook(self, slot: int, grad: torch.Tensor) -> None:
        # finite iff every element is finite (barring overflow); fp32 accumulation without a cast copy
        torch.sum(grad.detach(), dim=tuple(range(grad.dim())), dtype=torch.float32, out=self._sums[slot])

    def _fold(self) -> None:
        """The slots into the scalar, then zeroed: a parameter without a gradient next time keeps no stale value."""
        if self._handles:  # no hooks (kept gradients, or fp16): no slots, no kernels to launch
            self._acc.add_(self._sums.sum())
            self._sums.zero_()

    def note_loss(self, loss: torch.Tensor) -> None:
        """Called before each backward: the previous micro-batch's gradient sums are folded in first."""
        self._fold()
        self._acc.add_(loss.detach().float() * 0)  # 0 * nan = nan, 0 * inf = nan: poisons the flag

    def local_bad(self) -> torch.Tensor:
        """1.0 when this rank saw a non-finite loss or gradient since the last reset (device scalar)."""
        self._fold()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self._kept:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad.detach())
        for grads in by_dtype.values():
            self._acc.add_(torch.stack(torch._foreach_norm(grads)).float().sum())
        return (~torch.isfinite(self._acc)).float()

    def reset(self) -> None:
        self._acc.zero_()
        self._sums.zero_()

    def record(self, bad: bool) -> None:
        if bad:
            self.skipped_steps += 1
            self.consecutive_bad += 1
        else:
            self.consecutive_bad = 0

    @property
    def should_stop(self) -> bool:
        return self.consecutive_bad >= self.max_bad_steps

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def params_finite_local(module: nn.Module) -> bool:
    """Whether this rank's parameters (its ZeRO-3 partition when partitioned) are all finite; checked
    before every checkpoint so a non-finite state can never be written."""
    total = None
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps the local partition here; p.data is empty
        t = p.data if t is None else t
        if t.numel():
            s = t.detach().float().sum()
            total = s if total is None else total + s
    return total is None or bool(torch.isfinite(total))
