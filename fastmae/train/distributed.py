"""Who am I in the job, before and after the process group exists.

Launchers (deepspeed, torchrun, SLURM via either) set RANK / WORLD_SIZE / LOCAL_RANK; a plain
`python fastmae/pretrain.py` is a world of one, for which we set the variables DeepSpeed expects.
"""

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment; (0, 0, 1) without one."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank if world == 1 else 0))
    return rank, local, world


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialises torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU)."""
    rank, local, world = env_world()
    if "RANK" not in os.environ:  # single process without a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device_type() == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    import importlib

    import deepspeed

    # not `import deepspeed.comm.torch as m`: deepspeed.comm has an attribute `torch` (the torch package)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    if backend == "gloo":
        # DeepSpeed JIT-builds a shared-memory op on CPU (~60 s, needs a C++ compiler) that only speeds up
        # its inference all-reduce; training never calls it, so skip the build.
        ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device)


def all_reduce_max(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Element-wise max over ranks of a few flags/numbers (one collective, one host sync). A value may be a
    device scalar tensor: it is stacked on the device, not read back first (no extra host sync)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    t = torch.stack([torch.as_tensor(v, dtype=dtype, device=device) for v in values])  # [len(values)]
    return all_reduce_max_(t).tolist()


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """In place, on the device: element-wise max over ranks (NCCL: ordered on the stream, no host wait)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def finish_distributed(wait_for_peers: bool) -> None:
    """End of a run: wait for all ranks (so none is torn down, or killed by a launcher that saw another rank
    exit, while a peer still works), then destroy the process groups. After an exception, don't wait."""
    import torch.distributed as dist

    if dist.is_initialized():
        if wait_for_peers:
            barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
