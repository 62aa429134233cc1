"""What the trainer reports (rank 0 only): a tqdm progress bar, TensorBoard scalars, and two JSON-lines
files in output_dir: train_steps.jsonl (every --log_every optimizer steps) and log.txt (one line per
epoch, the official MAE keys train_loss / train_lr / epoch).

Throughput is measured between two log points (the loss read at a log point is the only host sync
the loop adds), and `data_wait` is the share of that wall time spent waiting for the next batch.
"""

import json
import os
import time

from tqdm import tqdm


class StepTimer:
    """Wall time and data-wait time since the last log point."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


class TrainLogger:
    def __init__(self, cfg, *, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.world_size = cfg.world_size
        self.bar = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.steps_path = os.path.join(cfg.output_dir, "train_steps.jsonl")
        self.epoch_path = os.path.join(cfg.output_dir, "log.txt")
        try:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(cfg.log_dir, exist_ok=True)
            self.tb = SummaryWriter(log_dir=cfg.log_dir, purge_step=start_step if start_step else None)
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                        mininterval=1.0)

    def step(self, record: dict) -> None:
        """One --log_every record: step, epoch, loss, lr, img/s (per device, total), data_wait, ..."""
        if not self.enabled:
            return
        _append_json(self.steps_path, record)
        if self.tb is not None:
            for key in ("loss", "lr", "img_per_s_per_device", "img_per_s", "data_wait", "skipped_steps"):
                self.tb.add_scalar(f"train/{key}", record[key], record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             img_s=f"{record['img_per_s']:.0f}", wait=f"{record['data_wait']:.0%}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def epoch(self, record: dict) -> None:
        if self.enabled:
            _append_json(self.epoch_path, record)
            if self.tb is not None:
                self.tb.add_scalar("epoch/train_loss", record["train_loss"], record["epoch"])

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _append_json(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
