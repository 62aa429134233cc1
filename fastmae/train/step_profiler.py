"""`--profile_steps N`: torch.profiler over N optimizer steps of the real trainer (after a warm-up), so the
trainer's own overheads (DeepSpeed's step, the guard's all-reduce, data, logging) show next to its kernels.

Rank 0 writes output_dir/profile/: trainer.top.txt (top ops), trainer.categories.json and
trainer.kernels.json (fastmae.profiling's kernel kinds) and trainer.summary.json: wall ms per step,
kernel ms per step and busy = kernel / wall, the host's waits for the device per step by call site
(fastmae/train/host_waits.py) and, on CUDA, the caching allocator's events in the window (`allocator_events`).
On a GPU, busy well below the e2e benchmark's (97% for ViT-B on an H100) says the device waits for the host
between kernels; on a CPU "kernel" is aten self time.
"""

import json
import os
import time

import torch

from fastmae import profiling
from fastmae.train.host_waits import HostWaitCounter

WARMUP_STEPS = 5  # past torch.compile's first steps and the allocator's growth


class StepProfiler:
    def __init__(self, steps: int, device: torch.device, output_dir: str, enabled: bool):
        self.steps, self.device, self.enabled = steps, torch.device(device), enabled and steps > 0
        self.out_dir = os.path.join(output_dir, "profile")
        self._prof = None
        self._waits: HostWaitCounter | None = None
        self._t0 = 0.0
        self._done = 0  # optimizer steps of this process (a resumed run counts from its own start)
        self._alloc0 = self._alloc_delta = None  # allocator_events at the window's start; what it did in it

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_done(self) -> None:
        """Called after every optimizer step: profiles this process's steps WARMUP+1 .. WARMUP+N."""
        if not self.enabled:
            return
        self._done += 1
        step = self._done
        if step == WARMUP_STEPS:
            self._sync()
            self._prof = torch.profiler.profile(activities=profiling.activities_for(self.device))
            self._prof.start()
            self._waits = HostWaitCounter(self.device)
            self._waits.start()
            self._alloc0 = profiling.allocator_events(self.device)
            self._t0 = time.perf_counter()
        elif step == WARMUP_STEPS + self.steps and self._prof is not None:
            self._waits.stop()  # before the profiler's own synchronize below
            self._sync()
            wall = time.perf_counter() - self._t0
            self._alloc_delta = profiling.allocator_events_since(self._alloc0, self.device)
            self._prof.stop()
            self.write(wall)
            self._prof = None

    def write(self, wall_s: float) -> dict:
        result = profiling.summarize(self._prof, self.device, self.steps, self.out_dir, "trainer")
        wall_ms = wall_s * 1e3 / self.steps
        summary = {"steps": self.steps, "after_warmup_steps": WARMUP_STEPS, "wall_ms_per_step": wall_ms,
                   "kernel_ms_per_step": result["device_ms_per_step"],
                   "busy": result["device_ms_per_step"] / wall_ms if wall_ms > 0 else None,
                   "kernel_kind": "CUDA kernels" if self.device.type == "cuda" else "aten self CPU time",
                   "shares": result["shares"], "annotation_spans_ms": result["annotation_spans_ms"],
                   "host_waits_per_step": sum(self._waits.sites.values()) / self.steps,
                   # cudaMalloc/Free calls, cache-flush retries and device-wide syncs of torch's allocator in the
                   # window (None off CUDA): a steady step should have none
                   "allocator_events": self._alloc_delta,
                   "host_wait_sites": dict(self._waits.sites.most_common()), "host_waits_counted": self._waits.counted}
        with open(os.path.join(self.out_dir, "trainer.summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def close(self) -> None:
        """A run that ended inside the window: stop without writing (too few steps to mean anything)."""
        if self._prof is not None:
            self._waits.stop()
            self._prof.stop()
            self._prof = None
