"""MAE pretraining with DeepSpeed.

    deepspeed fastmae/pretrain.py [flags]                     # one node, all its GPUs
    deepspeed --hostfile configs/hostfile fastmae/pretrain.py # many nodes
    torchrun --nproc_per_node 8 fastmae/pretrain.py [flags]
    python fastmae/pretrain.py                                # one process; CPU preset on a CPU-only machine

Exit codes: 0 done or preempted (checkpoint written), 2 bad input (one line, before anything is built),
3 too many consecutive NaN/Inf steps, 4 a checkpoint could not be written (previous ones intact).
Under torchrun a non-zero code from one rank makes the agent SIGTERM the others; every rank has passed a
final barrier by then, so nothing is lost (docs/reliability.md, "Exit").
See docs/training.md and docs/reliability.md.
"""

import contextlib
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
    from fastmae.train.checkpoint import CheckpointError
    from fastmae.train.loop import run

    try:
        code = run(cfg, dist, preempt)
    except BaseException as e:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            D.finish_distributed(wait_for_peers=False)  # the other ranks may never reach a barrier
        if not isinstance(e, CheckpointError):
            raise
        # a --resume that cannot be used: the same on every rank, one line
        if rank == 0:
            print(f"fastmae pretrain: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    D.finish_distributed(wait_for_peers=True)  # tear the process group down while the interpreter is whole
    return code


def exit_without_finalizing(code: int) -> None:
    """Flush and leave with `code`, skipping interpreter finalization: objects DeepSpeed still holds (its
    process groups, gloo's finished async work holding tensors) would otherwise be destroyed while the
    interpreter is half torn down, which can abort the process (SIGABRT, "terminate called without an
    active exception") after the run has already ended cleanly."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_finalizing(main())
