"""Backend selection for the MAE ops: "torch" (reference), "triton", "cuda", or "auto".

A backend is a module exposing `is_available(device) -> bool` (and `unavailable_reason(device)`)
plus the seven op functions (the five MAE ops, add_layer_norm and bias_gelu) with the public signatures, taking inputs
already validated by `checks`.
Backends are imported lazily, so `import fastmae_kernels` needs neither Triton nor the CUDA extension.
"""

import importlib
import logging
from collections.abc import Callable
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "torch")  # fastest first
_MODULES = {
    "torch": "fastmae_kernels.torch_ops",
    "triton": "fastmae_kernels.triton_ops",
    "cuda": "fastmae_kernels.cuda_ops",
}
_loaded: dict[str, ModuleType | Exception] = {}
_auto_logged: set[tuple[str, str]] = set()
log = logging.getLogger("fastmae_kernels")


def _load(name: str) -> ModuleType | Exception:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # ImportError, or a broken build of the extension
            _loaded[name] = exc
    return _loaded[name]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else one line saying why not."""
    module = _load(name)
    if isinstance(module, Exception):
        return f"cannot import {_MODULES[name]}: {module}"
    return module.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on `device`, fastest first."""
    return [name for name in AUTO_ORDER if unavailable_reason(name, torch.device(device)) is None]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turns "auto" into a concrete backend for `device`; checks an explicit one can run there."""
    device = torch.device(device)
    if backend == "auto":
        # On CPU, Triton is its interpreter (a test tool, far slower than torch): auto never picks it there.
        chosen = "torch" if device.type == "cpu" else available_backends(device)[0]
        _load(chosen)  # imported now, not lazily on the first op call, which may be inside torch.compile's trace
        if (device.type, chosen) not in _auto_logged:
            _auto_logged.add((device.type, chosen))
            log.info("fastmae_kernels: backend 'auto' chose '%s' on %s", chosen, device.type)
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"fastmae_kernels: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"fastmae_kernels: backend '{backend}' cannot run on {device}: {reason}")
    return backend


def backend_module(backend: str, device: torch.device | str) -> ModuleType:
    return _load(resolve_backend(backend, device))


def block_ops_backend(backend: str, device: torch.device | str) -> str:
    """The backend the fused block ops (add_layer_norm, bias_gelu) really run on for `backend` on `device`:
    `resolve_backend`'s answer, except "torch" where that is "cuda" and their Triton kernels cannot run there
    (the cuda backend then runs the references), so callers can say, and choose, what runs."""
    chosen = resolve_backend(backend, device)
    if chosen == "cuda" and _load("cuda").fused_kernels_reason(torch.device(device)) is not None:
        return "torch"
    return chosen


def device_smoke_test(cache: dict[int, str | None], device: torch.device, run: Callable[[torch.device], bool],
                      wrong: str, failed: str, errors: tuple[type[BaseException], ...] = (RuntimeError,)) -> str | None:
    """A backend's one-time check that its kernels run on a CUDA device: `run(device)` launches a tiny op and
    says whether it gave the known answer. None when it did, else `wrong`, or `failed` with the first line of
    the error (`{error}`) when it raised one of `errors`; cached per device index in `cache`. While torch.compile
    traces (no real tensors) only the cache is read: eager calls ran the check first."""
    if torch.compiler.is_compiling():
        return cache.get(device.index if device.index is not None else 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in cache:
        try:
            cache[index] = None if run(torch.device("cuda", index)) else wrong
        except errors as exc:
            text = str(exc).strip()
            cache[index] = failed.format(error=text.splitlines()[0] if text else type(exc).__name__)
    return cache[index]
