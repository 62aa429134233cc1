"""Runs the real trainer in this process (one rank, CPU) and records, per optimizer step, every place where
the host would wait for the device on a GPU: a tensor read back to the host (item, tolist, bool, float, int,
cpu, numpy) and every DeepSpeed accelerator synchronize(), each by its call site (file:line, the innermost
frame outside torch). For tests/test_host_syncs.py:

    python tests/_host_sync_worker.py OUT.json -- [pretrain.py flags]

Only sites in the trainer, the model and DeepSpeed are recorded. Left out: the loader (torchvision's random
crop parameters are host tensors on a GPU machine too) and fastmae_kernels' index check, which reads the
ids' range on CPU tensors only (on a GPU it is a torch._assert_async, no wait).

On a CPU, DeepSpeed takes its `resolves_data_dependency()` branches, so the ZeRO-1/2 synchronize()s that
guard overlapped reductions on CUDA (stage_1_and_2.py) are not reached here; see benchmarks/NOTES.md §6.4.
"""

import collections
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RECORDED = ("fastmae/train/", "fastmae/models/", "fastmae/speed.py", "deepspeed/")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

steps: list[collections.Counter] = []
current: collections.Counter = collections.Counter()


def _site() -> str | None:
    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return None
    path = frame.f_code.co_filename.replace(os.sep, "/")
    for root in RECORDED:
        at = path.rfind(root)
        if at >= 0:
            return f"{path[at:]}:{frame.f_lineno}"
    return None


def _counted(kind: str, original):
    def wrapper(*args, **kwargs):
        site = _site()
        if site is not None:
            current[f"{kind} {site}"] += 1
        return original(*args, **kwargs)

    return wrapper


def install() -> None:
    for name in READS:
        setattr(torch.Tensor, name, _counted(name, getattr(torch.Tensor, name)))
    from deepspeed.accelerator import get_accelerator

    accel = type(get_accelerator())
    accel.synchronize = _counted("synchronize", accel.synchronize)

    from fastmae.train.step_profiler import StepProfiler

    step_done = StepProfiler.step_done

    def step_boundary(self):  # called once after every optimizer step
        steps.append(collections.Counter(current))
        current.clear()
        return step_done(self)

    StepProfiler.step_done = step_boundary


def main() -> int:
    out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    install()
    from fastmae.pretrain import main as pretrain

    code = pretrain(argv)
    with open(out, "w") as f:
        json.dump({"exit_code": code, "steps": [dict(c) for c in steps]}, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
