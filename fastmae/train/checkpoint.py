"""Crash-safe DeepSpeed checkpoints.

Layout under <output_dir>/checkpoints/:
    step_00001000/      one complete checkpoint: DeepSpeed's files (model, ZeRO shards), one
                        trainer_rank<r>.pt per rank (step, data position, RNGs), COMPLETE (written last)
    latest              the newest complete tag (plain text; replaced atomically)
    .tmp-step_00001100/ a checkpoint being written; never read
A checkpoint is written into .tmp-<tag>, every rank flushes and fsyncs its files, all ranks agree it
succeeded, then rank 0 writes COMPLETE, renames the folder to <tag> (atomic on POSIX), fsyncs, and
replaces `latest`. A process killed at any instant leaves either the previous set of complete
checkpoints or that set plus the new one; `--resume auto` only ever reads complete ones.
Old checkpoints are first renamed to .del-<tag> and then deleted, so a kill while deleting never
leaves a half-deleted folder that looks complete.
"""

import errno
import json
import os
import re
import shutil
import time

import torch

from fastmae.train import distributed as D
from fastmae.train.nan_guard import params_finite_local

TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous ones are untouched."""


def root_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str) -> bool:
    return TAG_RE.match(os.path.basename(os.path.normpath(path))) is not None and os.path.isfile(
        os.path.join(path, COMPLETE)
    )


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """[(step, path)] of the complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = TAG_RE.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: 'auto' -> newest complete one (None if there is none)."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(root_dir(output_dir))
        return found[-1][1] if found else None
    if not is_complete(resume):
        raise CheckpointError(f"--resume {resume} is not a complete fastmae checkpoint (no {COMPLETE} marker)")
    return resume


def clean_partial(root: str) -> None:
    """Rank 0 at start-up: drop what killed runs left behind (.tmp-*, .del-*)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith((".tmp-", ".del-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(dirpath, f))
        _fsync_path(dirpath)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _enough_space(root: str) -> str | None:
    """None, or why the next checkpoint will not fit (judged from the size of the newest one)."""
    found = complete_checkpoints(root)
    if not found:
        return None
    need = _dir_bytes(found[-1][1])
    free = shutil.disk_usage(root).free
    if free < need * 1.05:
        return f"{free / 2**20:.0f} MiB free, the last checkpoint took {need / 2**20:.0f} MiB"
    return None


def read_meta(path: str) -> dict:
    """What COMPLETE records: step, world size, time, model (name, norm_pix_loss, input size), precision."""
    with open(os.path.join(path, COMPLETE)) as f:
        return json.load(f)


def save(engine, output_dir: str, step: int, trainer_state: dict, rank: int, *, keep_last: int,
         model_meta: dict | None = None, precision: str | None = None, fault_disk_full: bool = False) -> str:
    """Writes checkpoint `step` on every rank (collective); returns its folder or raises CheckpointError.
    `model_meta` (model name, norm_pix_loss, input size) goes into the COMPLETE marker, so the tools that
    read the checkpoint later (visualize, export, linprobe) need not be told how the model was trained;
    `precision` too, so a resume can refuse one whose optimizer state has another layout."""
    root = root_dir(output_dir)
    tag = tag_for(step)
    tmp, final = os.path.join(root, f".tmp-{tag}"), os.path.join(root, tag)
    if D.all_reduce_max([0.0 if params_finite_local(engine.module) else 1.0], engine.device)[0]:
        raise CheckpointError(f"refusing to write checkpoint {tag}: the parameters are not finite")
    problem = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            problem = _enough_space(root)
        except OSError as e:
            problem = f"{e.strerror or e}"
    if D.all_reduce_max([1.0 if problem else 0.0], engine.device)[0]:
        raise CheckpointError(f"cannot write checkpoint {tag}: {problem or 'a rank could not prepare it'}")
    error = None
    try:
        engine.save_checkpoint(root, tag=f".tmp-{tag}", client_state={"fastmae_step": step}, save_latest=False)
        state_path = os.path.join(tmp, f"trainer_rank{rank:05d}.pt")
        if fault_disk_full:  # reliability test: the file system fills up mid-checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), state_path)
        torch.save(trainer_state, state_path)
        _fsync_tree(tmp)
    except OSError as e:
        error = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
    if D.all_reduce_max([1.0 if error else 0.0], engine.device)[0]:
        D.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {tag} failed ({error or 'on another rank'})")
    if rank == 0:
        meta = {"step": step, "world_size": D.env_world()[2], "time": time.time(), "model": model_meta or {},
                "precision": precision}
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): retire the old copy first
            os.rename(final, os.path.join(root, f".del-{tag}"))
            shutil.rmtree(os.path.join(root, f".del-{tag}"), ignore_errors=True)
        os.rename(tmp, final)
        _fsync_path(root)
        _write_atomic(os.path.join(root, "latest"), tag + "\n")
        prune(root, keep_last)
    D.barrier()
    return final


def prune(root: str, keep_last: int) -> None:
    for _, path in complete_checkpoints(root)[:-keep_last]:
        doomed = os.path.join(root, ".del-" + os.path.basename(path))
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def load(engine, path: str, rank: int) -> dict:
    """Restores model, optimizer (ZeRO shards included) and returns this rank's trainer state."""
    path = os.path.normpath(path)
    load_path, _ = engine.load_checkpoint(
        os.path.dirname(path), tag=os.path.basename(path), load_optimizer_states=True,
        load_lr_scheduler_states=False, load_module_strict=True,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    own = os.path.join(path, f"trainer_rank{rank:05d}.pt")
    if not os.path.isfile(own):  # a different world size: the step and data epoch still carry over
        own = os.path.join(path, "trainer_rank00000.pt")
    return torch.load(own, map_location="cpu", weights_only=False)
