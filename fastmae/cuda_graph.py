"""A whole training step (forward, backward and the optimizer) recorded once into a CUDA graph and replayed.

Why: an eager MAE step launches thousands of kernels, each through Python, the dispatcher and autograd. On
ViT-H/14 at batch 64 the H200's host could not keep up: torch's block ops left the GPU idle ~20% of the step,
the fused Triton block ops 60% (benchmarks/NOTES.md §7.2-7.3). A replay launches the whole step at once, so
the step runs at its kernels' speed, and the fused kernels' GPU savings (4.8 ms per ViT-H step) can show.

A step can be captured when (each is checked here where it can be; CUDA's capture error says the rest):
- its shapes and Python path are the same every step (MAE: a fixed mask ratio keeps the visible count fixed);
- its inputs live in fixed tensors: each call copies the new batch into them (`static_inputs`);
- it reads no device value on the host (.item(), bool(tensor), nonzero): fastmae's step reads none
  (tests/test_host_syncs.py); its random numbers come from torch's CUDA generator, which is graph-safe, so
  every replay draws new masking noise;
- its optimizer was built with capturable=True and a tensor lr (`make_optimizer(..., capturable=True)`),
  changed in place between replays (`fastmae.train.schedule.set_lr`): a float lr would be frozen into the
  graph at capture;
- autocast runs without its cast cache (`torch.autocast(..., cache_enabled=False)`, as torch's CUDA-graph
  notes require).

The first `eager_steps` calls run the step eagerly on a side stream: they build cuBLAS workspaces, compile
Triton kernels and the optimizer's state before capture (none of that may happen while capturing). The next
call captures and replays. Every call is one optimizer step on the batch it was given.
"""

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def check_capturable_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raises ValueError unless every param group is capturable and holds its lr as a tensor."""
    for i, group in enumerate(optimizer.param_groups):
        if not group.get("capturable", False):
            raise ValueError(f"fastmae: a CUDA-graph step needs a capturable optimizer; param group {i} of "
                             f"{type(optimizer).__name__} is not (build it with make_optimizer(..., capturable=True))")
        if not isinstance(group["lr"], torch.Tensor):
            raise ValueError(f"fastmae: param group {i} holds its lr as a {type(group['lr']).__name__}; a captured "
                             "step would keep the value it had at capture for ever. Give it a tensor lr "
                             "(make_optimizer(..., capturable=True) does) and change it with "
                             "fastmae.train.schedule.set_lr")


def cuda_device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    """The one CUDA device all `tensors` are on; ValueError if they are elsewhere or on several."""
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"fastmae: CUDA graphs need the step's inputs on one CUDA device, got "
                         f"{sorted(map(str, devices))}")
    if not torch.cuda.is_available():
        raise RuntimeError("fastmae: CUDA graphs need CUDA, which is not available")
    return next(iter(devices))


class GraphedTrainStep:
    """Calls `body(*static_inputs)` (one optimizer step: zero_grad, forward, backward, optimizer.step; it
    returns a tensor or a tuple of tensors, e.g. the loss) as one CUDA-graph replay per call.

    `step(*batch)` copies each batch tensor into its static input (same shape and dtype) and runs one step; it
    returns the body's outputs from the graph's memory: the next call overwrites them, so clone what you keep.
    """

    def __init__(self, body: Callable[..., Any], optimizer: torch.optim.Optimizer,
                 static_inputs: Sequence[torch.Tensor], eager_steps: int = 3):
        if not static_inputs:
            raise ValueError("fastmae: GraphedTrainStep needs at least one static input tensor")
        device = cuda_device_of(static_inputs)
        if eager_steps < 1:
            raise ValueError(f"fastmae: eager_steps must be >= 1 (the optimizer's state and every kernel must exist "
                             f"before capture), got {eager_steps}")
        check_capturable_optimizer(optimizer)
        self.body, self.optimizer, self.static_inputs = body, optimizer, tuple(static_inputs)
        self.eager_steps = eager_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self.capture_s: float | None = None  # host seconds the capture took (it synchronizes first)
        self.side_stream = torch.cuda.Stream(device=device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *batch: torch.Tensor) -> Any:
        self._load(batch)
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < self.eager_steps:
            self.outputs = self._eager()
        else:
            self._capture()
            self.graph.replay()  # capture records the step without running it
        self.calls += 1
        return self.outputs

    def _load(self, batch: Sequence[torch.Tensor]) -> None:
        if len(batch) not in (0, len(self.static_inputs)):
            raise ValueError(f"fastmae: the step takes {len(self.static_inputs)} input tensors, got {len(batch)}")
        for i, (static, new) in enumerate(zip(self.static_inputs, batch)):
            if new is static:
                continue
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(f"fastmae: a captured step's input {i} is fixed at {list(static.shape)} "
                                 f"{static.dtype}, got {list(new.shape)} {new.dtype} (drop the last partial batch)")
            static.copy_(new, non_blocking=True)

    def _eager(self) -> Any:
        """One step on a side stream, as torch's whole-network capture recipe warms up."""
        current = torch.cuda.current_stream(self.side_stream.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            outputs = self.body(*self.static_inputs)
        current.wait_stream(self.side_stream)
        return outputs

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        start = time.perf_counter()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.body(*self.static_inputs)
        except RuntimeError as exc:
            raise RuntimeError(
                "fastmae: the training step could not be captured into a CUDA graph. A captured step must not "
                "read device values on the host (.item(), bool(tensor), nonzero, printing a tensor), copy from "
                "pageable host memory, synchronize, or change shapes between steps; run it without CUDA graphs. "
                f"CUDA said: {exc}") from exc
        self.graph = graph
        self.capture_s = time.perf_counter() - start
