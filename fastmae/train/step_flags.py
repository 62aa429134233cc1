"""The two flags every rank must agree on at each optimizer step (a NaN/Inf loss or gradient seen, a
preemption signal), all-reduced on the device and read by the host one step late.

Reading a step's flags right away would make the host wait at every step for the device to finish that
step's backward: the GPU then idles while the host runs engine.step()'s Python, the loader and the next
forward's launches. Instead each step's flags are copied to host memory without blocking and read at the
next step, by when the copy is long done. What must act on a step's own flags does not need them early:
the optimizer skips a bad step on the device (fused AdamW's `found_inf`, see optim.StepGate), the
interval loss leaves it out on the device, and the rest (the skipped-step count, the stop after too many bad
steps, a preemption checkpoint) happens one step later, the same step on every rank. Steps that read the
device anyway (a log line, a checkpoint, the last step) read their own flags at once.
"""

from collections import deque
from dataclasses import dataclass

import torch

from fastmae.train.distributed import all_reduce_max_


@dataclass(frozen=True)
class StepFlags:
    step: int
    bad: bool  # some rank saw a non-finite loss or gradient: the step was skipped
    preempted: bool  # some rank got SIGTERM/SIGUSR1 by this step


class LaggedFlags:
    def __init__(self, device: torch.device):
        self.device = device
        self._pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    def publish(self, step: int, local_bad: torch.Tensor, preempted: bool) -> torch.Tensor:
        """All-reduces (max over ranks) this rank's flags for `step` and starts their copy to the host;
        returns them on the device, [2] float32: (bad, preempted). No host wait."""
        # torch.full launches a fill: unlike torch.tensor(host value), no blocking host-to-device copy
        flags = torch.stack([local_bad.float().reshape(()), torch.full((), float(preempted), device=self.device)])
        all_reduce_max_(flags)
        if self.device.type == "cuda":
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = flags.clone(), None
        self._pending.append((step, host, done))
        return flags

    def take(self, up_to_step: int) -> list[StepFlags]:
        """The flags of every published step <= up_to_step not taken yet, oldest first (waits for their copies:
        for an older step that wait is already over)."""
        taken = []
        while self._pending and self._pending[0][0] <= up_to_step:
            step, host, done = self._pending.popleft()
            if done is not None:
                done.synchronize()
            bad, preempted = host.tolist()
            taken.append(StepFlags(step, bad > 0, preempted > 0))
        return taken
