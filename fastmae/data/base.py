"""What every pretraining loader shares: the PretrainLoader protocol, the position in the data
(epoch, batches consumed) that checkpoints save, and the bad-file counters."""

import logging
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from fastmae.data.config import DataConfig
from fastmae.data.sharding import rank_indices, steps_per_epoch

log = logging.getLogger("fastmae.data")


@runtime_checkable
class PretrainLoader(Protocol):
    name: str  # "dali-cpu", "dali-gpu", "torchvision", "synthetic"
    num_images: int
    steps_per_epoch: int  # per rank, drop_last
    epoch: int  # the current epoch (set_epoch)
    batch: int  # batches handed out in the current epoch, the one in hand included (= state_dict()["batch"])

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[torch.Tensor]: ...  # [B, 3, S, S] float32 on cfg.device, normalised
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def stats(self) -> dict: ...


class LoaderBase:
    """Position bookkeeping and the epoch's batch plan; subclasses implement `_batches(start)`.

    `batch` counts the batches handed to the consumer in the current epoch, so a checkpoint taken after
    training on k batches says {"epoch": e, "batch": k} and the resumed run continues with batch k.
    """

    name = "?"

    def __init__(self, cfg: DataConfig, num_images: int):
        self.cfg, self.num_images = cfg, num_images
        self.steps_per_epoch = steps_per_epoch(num_images, cfg.batch_size, cfg.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_images} images over {cfg.world_size} rank(s) do not fill one batch of {cfg.batch_size}"
            )
        self.epoch, self.batch = 0, 0
        self._resume: dict | None = None
        self._bad: dict[int, str] = {}  # index -> reason, for each distinct unreadable file met
        self._converted: set[int] = set()
        self.num_non_image_files = 0

    # -- position ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles deterministically from (seed, epoch)); starts at batch 0, or at the
        restored batch when `load_state_dict` saved a position in this epoch."""
        resume = self._resume
        self.epoch = int(epoch)
        if resume is not None and int(resume["epoch"]) == self.epoch:
            self.batch = int(resume["batch"])  # keep the restored position (and _resume, for __iter__)
        else:
            self.batch, self._resume = 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= self.steps_per_epoch:
            raise ValueError(f"loader state batch={batch} is outside [0, {self.steps_per_epoch}] for this data")
        self.epoch, self.batch = epoch, batch
        self._resume = {"epoch": epoch, "batch": batch}

    def epoch_indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, [steps_per_epoch * batch_size] int64."""
        cfg = self.cfg
        idx = rank_indices(self.num_images, cfg.seed, self.epoch, cfg.rank, cfg.world_size)
        return idx[: self.steps_per_epoch * cfg.batch_size]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A restored position is honoured exactly (a completed epoch then yields nothing); otherwise an
        # epoch that was fully consumed is replayed from its start, like a DataLoader without set_epoch.
        restored = self._resume is not None
        start = self.batch if restored or self.batch < self.steps_per_epoch else 0
        self.batch = start
        self._resume = None
        for imgs in self._batches(start):
            self.batch += 1  # counted before the consumer sees it: "consumed" includes the one in hand
            yield imgs

    def _batches(self, start: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    # -- counters -----------------------------------------------------------------------------------
    def _note_bad(self, index: int, where: str, reason: str) -> None:
        if index not in self._bad:
            self._bad[index] = reason
            log.warning("skipped unreadable image %s (%s); a neighbouring image is used instead", where, reason)

    def _note_converted(self, index: int) -> None:
        self._converted.add(index)

    def stats(self) -> dict:
        return {
            "skipped_files": len(self._bad) + self.num_non_image_files,
            "unreadable_files": len(self._bad),
            "non_image_files": self.num_non_image_files,
            "converted_files": len(self._converted),
        }
