"""MAE pretraining with DeepSpeed.

    deepspeed fastmae/pretrain.py [flags]                     # one node, all its GPUs
    deepspeed --hostfile configs/hostfile fastmae/pretrain.py # many nodes
    torchrun --nproc_per_node 8 fastmae/pretrain.py [flags]
    python fastmae/pretrain.py                                # one process; CPU preset on a CPU-only machine

Exit codes: 0 done or preempted (checkpoint written), 2 bad input (one line, before anything is built),
3 too many consecutive NaN/Inf steps, 4 a checkpoint could not be written (previous ones intact).
See docs/training.md and docs/reliability.md.
"""

import os
import sys

if __package__ in (None, ""):  # `deepspeed fastmae/pretrain.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastmae.train import distributed as D  # noqa: E402
from fastmae.train.config import ConfigError, parse_config  # noqa: E402
from fastmae.train.signals import PreemptionFlag  # noqa: E402

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    preempt = PreemptionFlag().install()  # from the very start: a preemption during start-up is not lost
    rank, _, world = D.env_world()
    if D.device_type() == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would guess the same, with a warning
    try:
        cfg = parse_config(argv, device_type=D.device_type(), world_size=world, rank=rank)
    except ConfigError as e:
        if rank == 0:
            print(f"fastmae pretrain: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    dist = D.init_distributed()
    from fastmae.train.loop import run

    try:
        return run(cfg, dist, preempt)
    finally:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
