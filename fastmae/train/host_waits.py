"""Counts the places where the host waits for the device, by call site, while the step profiler runs.

What is counted: explicit device synchronizations (`torch.cuda.synchronize`, DeepSpeed's accelerator
`synchronize()`), and on CUDA every synchronizing tensor op (`.item()`, `.tolist()`, `bool()`, a blocking copy
to the host, ...) through torch's sync debug mode. On a CPU only the first kind means anything (a CPU tensor
read waits for nothing), and DeepSpeed's CPU synchronize() is a no-op: the count then says where a GPU run
would wait. Not counted: CUDA event waits (the trainer's one-step-late flag read) and waits inside C++.
"""

import collections
import os
import sys
import warnings

import torch

_SYNC_WARNING = "synchroniz"  # torch: "called a synchronizing CUDA operation"


def _site(depth: int) -> str:
    frame = sys._getframe(depth)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"


class HostWaitCounter:
    def __init__(self, device: torch.device):
        self.device = device
        self.sites: collections.Counter = collections.Counter()
        self._undo: list = []
        self._inside = False
        self._caught = None
        self._records: list = []

    def _wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self._inside:  # DeepSpeed's CUDA synchronize() calls torch.cuda.synchronize(): one wait
                return original(*args, **kwargs)
            self.sites[f"synchronize {_site(2)}"] += 1
            self._inside = True
            before = len(self._records)
            try:
                return original(*args, **kwargs)
            finally:
                self._inside = False
                # counted here: drop the sync debug mode's record of this same wait (turning the mode off around
                # the call is not enough: torch 2.11 still warned inside synchronize(), H200, 2026-12-04)
                self._records[before:] = [w for w in self._records[before:] if _SYNC_WARNING not in str(w.message)]

        setattr(owner, name, counted)
        self._undo.append((owner, name, original))

    def start(self) -> None:
        self._wrap(torch.cuda, "synchronize")
        if "deepspeed" in sys.modules:
            from deepspeed.accelerator import get_accelerator

            self._wrap(type(get_accelerator()), "synchronize")
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self._caught = None
            for w in self._records:
                if _SYNC_WARNING in str(w.message):
                    self.sites[f"sync op {_short(w.filename)}:{w.lineno}"] += 1
                else:  # not ours to swallow
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    @property
    def counted(self) -> str:
        if self.device.type == "cuda":
            return "synchronize() calls and synchronizing tensor ops (torch sync debug mode)"
        return "synchronize() calls only (on a CPU a tensor read waits for nothing)"


def _short(path: str) -> str:
    for root in ("fastmae", "deepspeed"):
        at = path.rfind(f"{os.sep}{root}{os.sep}")
        if at >= 0:
            return path[at + 1:]
    return path
