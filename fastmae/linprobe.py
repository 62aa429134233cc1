"""Linear probing of a pretrained MAE encoder, the paper's protocol (MAE appendix A.2):

    python -m fastmae.linprobe --checkpoint CKPT [--data_path IMAGENET] [flags]
    python -m fastmae.linprobe --random_init --model NAME ...        # the same probe on a random encoder

Frozen encoder; features = cls token after the final norm (or --pool avg); BatchNorm without affine
(eps 1e-6) before a linear head initialised trunc_normal(std 0.01); LARS (or --optimizer sgd) with
momentum 0.9, weight decay 0, lr = blr x batch / 256 (blr 0.1), linear warmup then half-cycle cosine per
step; cross-entropy. Defaults are the paper's: batch 16384, 90 epochs, 10 warmup epochs.

With --no-augment the encoder's features do not change between epochs, so they are computed once and
the head trains on the cached features (the same math, minutes instead of hours on a CPU).
Prints top-1 / top-5 on the val set after each eval and at the end; with --output_dir also writes
log.txt (one JSON line per eval), result.json and TensorBoard scalars.
"""

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fastmae.checkpoint_io import CheckpointError
from fastmae.features import FrozenEncoder, encode, extract_features
from fastmae.optim_lars import LARS
from fastmae.probe_data import add_data_args, add_model_args, build_datasets, build_encoder, check_args, loader
from fastmae.train import schedule

OPTIMIZERS = ("lars", "sgd")


@dataclass(kw_only=True)
class ProbeConfig:
    batch_size: int = 16384
    """Images per optimizer step (the paper's 16384 = 512 per GPU x 32 GPUs)."""
    epochs: int = 90
    warmup_epochs: float = 10
    blr: float = 0.1
    """Base lr; the lr used is blr x batch_size / 256 unless `lr` is set."""
    lr: float | None = None
    min_lr: float = 0.0
    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 1
    """Evaluate on val every this many epochs (and always after the last)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.batch_size <= 0 or self.epochs <= 0 or self.eval_every <= 0:
            raise ValueError("batch_size, epochs and eval_every must be positive")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0) or self.min_lr < 0:
            raise ValueError("blr and lr must be positive, min_lr >= 0")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


def lr_at(cfg: ProbeConfig, epoch: float) -> float:
    """The official schedule at fractional epoch (the trainer's: linear warmup, then half-cycle cosine to min_lr)."""
    return schedule.lr_at(epoch, lr=cfg.peak_lr, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, epochs=cfg.epochs)


class LinearHead(nn.Module):
    """BatchNorm1d(affine=False, eps=1e-6) -> Linear, as the official linear probe."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # bounds +-2 absolute (as timm's): a plain normal here
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(feats))  # [N, num_classes]


def make_optimizer(head: nn.Module, cfg: ProbeConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "lars":
        return LARS(head.parameters(), lr=cfg.peak_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.SGD(head.parameters(), lr=cfg.peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is in the top-k predictions, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top == labels[:, None]  # [N, kmax]
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


# --------------------------------------------------------------------------------------------------
# feature batches: fixed-size batches of (features, labels) for one epoch


FeatureBatches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def cached_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> FeatureBatches:
    """Shuffled full batches (drop_last, as the official train loader) of precomputed features."""
    if feats.shape[0] < batch_size:
        raise ValueError(f"the train set has {feats.shape[0]} images, fewer than one batch of {batch_size}; lower --batch_size")

    def epoch_batches(epoch: int):
        order = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        for i in range(feats.shape[0] // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield feats[idx], labels[idx]

    return epoch_batches


def online_batches(encoder: FrozenEncoder, make_loader, batch_size: int, device) -> FeatureBatches:
    """Batches of `batch_size` features computed from freshly augmented images each epoch; the loader's
    (smaller) batches are encoded one at a time and regrouped, so a 16384 batch needs no 16384-image tensor."""

    def epoch_batches(epoch: int):
        buf_f, buf_y, have = [], [], 0
        for imgs, y in make_loader(epoch):
            buf_f.append(encode(encoder, imgs, device))  # [b, D]
            buf_y.append(y.to(device))
            have += y.shape[0]
            while have >= batch_size:
                f, yy = torch.cat(buf_f), torch.cat(buf_y)
                yield f[:batch_size], yy[:batch_size]
                buf_f, buf_y, have = [f[batch_size:]], [yy[batch_size:]], have - batch_size
        # the remainder is dropped (drop_last)

    return epoch_batches


# --------------------------------------------------------------------------------------------------
# training and evaluation


@torch.no_grad()
def evaluate(head: LinearHead, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> dict:
    head.eval()
    device = next(head.parameters()).device
    correct, loss_sum = [0, 0], 0.0
    for i in range(0, feats.shape[0], chunk):
        f, y = feats[i : i + chunk].to(device), labels[i : i + chunk].to(device)
        logits = head(f)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct = [a + b for a, b in zip(correct, topk_correct(logits, y))]
    n = feats.shape[0]
    return {"top1": 100.0 * correct[0] / n, "top5": 100.0 * correct[1] / n, "loss": loss_sum / n, "num_images": n}


def train_probe(
    head: LinearHead,
    batches: FeatureBatches,
    steps_per_epoch: int,
    val: tuple[torch.Tensor, torch.Tensor],
    cfg: ProbeConfig,
    on_eval: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Trains `head` with the official schedule; returns the last evaluation (plus the best top-1)."""
    device = next(head.parameters()).device
    opt = make_optimizer(head, cfg)
    best, result = 0.0, {}
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="linprobe", disable=not progress, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        head.train()
        loss_sum, steps = 0.0, 0
        for step, (f, y) in enumerate(batches(epoch)):
            for group in opt.param_groups:  # per-step schedule, as the official engine
                group["lr"] = lr_at(cfg, epoch + step / steps_per_epoch)
            loss = F.cross_entropy(head(f.to(device)), y.to(device))
            loss_val = loss.item()  # the one host sync of the step: the finite check, the sum and the bar share it
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"linear probe loss is {loss_val} at epoch {epoch} step {step}; lower --blr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, steps = loss_sum + loss_val, steps + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss_val:.3f}", lr=f"{opt.param_groups[0]['lr']:.3g}")
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            result = evaluate(head, *val)
            best = max(best, result["top1"])
            result.update(epoch=epoch + 1, train_loss=loss_sum / max(steps, 1), best_top1=best)
            if on_eval is not None:
                on_eval(result)
    bar.close()
    return result


# --------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastmae.linprobe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("probe")
    d = ProbeConfig()
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="images per optimizer step")
    g.add_argument("--encoder_batch_size", type=int, default=256, help="images per encoder forward")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--warmup_epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--blr", type=float, default=d.blr, help="base lr: lr = blr x batch_size / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", type=float, default=d.min_lr)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument("--eval_every", type=int, default=d.eval_every, help="epochs between val evaluations")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--output_dir", default=None, help="write log.txt, result.json and TensorBoard scalars here")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        args.cfg = ProbeConfig(**{k: getattr(args, k) for k in asdict(d)})
    except ValueError as e:
        p.error(str(e))
    return args


class _Logger:
    def __init__(self, output_dir: str | None, header: dict):
        self.dir, self.tb = output_dir, None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({"run": header}) + "\n")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=output_dir)

    def eval(self, r: dict) -> None:
        tqdm.write(f"epoch {r['epoch']}: val top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  "
                   f"val loss {r['loss']:.4f}  train loss {r['train_loss']:.4f}")
        if self.dir:
            with open(os.path.join(self.dir, "log.txt"), "a") as f:
                f.write(json.dumps(r) + "\n")
            for k in ("top1", "top5", "loss"):
                self.tb.add_scalar(f"val/{k}", r[k], r["epoch"])
            self.tb.add_scalar("train/loss", r["train_loss"], r["epoch"])

    def final(self, r: dict) -> None:
        if self.dir:
            with open(os.path.join(self.dir, "result.json"), "w") as f:
                json.dump(r, f, indent=1)
            self.tb.close()


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    encoder, name = build_encoder(args)
    train_ds, val_ds, num_classes = build_datasets(args, encoder.img_size[0])
    cfg, device, ebs = args.cfg, args.device, args.encoder_batch_size
    progress = not args.quiet
    val = extract_features(encoder, loader(val_ds, ebs, False, args.num_workers), device, "val features", progress)
    if args.augment:
        make_loader = lambda epoch: loader(train_ds, ebs, True, args.num_workers, args.seed * 1000003 + epoch)  # noqa: E731
        batches, steps = online_batches(encoder, make_loader, cfg.batch_size, device), len(train_ds) // cfg.batch_size
        if steps == 0:
            raise ValueError(f"the train set has {len(train_ds)} images, fewer than one batch of {cfg.batch_size}; lower --batch_size")
    else:
        feats, labels = extract_features(encoder, loader(train_ds, ebs, False, args.num_workers), device,
                                         "train features", progress)
        batches, steps = cached_batches(feats, labels, cfg.batch_size, cfg.seed), feats.shape[0] // cfg.batch_size
    head = LinearHead(encoder.embed_dim, num_classes).to(device)
    source = args.checkpoint or f"random init (seed {args.init_seed})"
    header = {"model": name, "encoder": source, "pool": args.pool, "train_images": len(train_ds),
              "val_images": len(val_ds), "num_classes": num_classes, "peak_lr": cfg.peak_lr, **asdict(cfg)}
    print(f"linprobe: {name} from {source}, pool={args.pool}, {len(train_ds)} train / {len(val_ds)} val images, "
          f"{num_classes} classes, {cfg.optimizer} lr {cfg.peak_lr:.4g} (blr {cfg.blr} x {cfg.batch_size}/256), "
          f"{cfg.epochs} epochs, features {'recomputed per epoch (augment)' if args.augment else 'cached (no augment)'}",
          flush=True)
    log = _Logger(args.output_dir, header)
    t0 = time.perf_counter()
    result = train_probe(head, batches, steps, val, cfg, on_eval=log.eval, progress=progress)
    result.update(model=name, encoder=source, seconds=round(time.perf_counter() - t0, 1))
    log.final(result)
    print(f"linprobe result: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"(best top-1 {result['best_top1']:.2f}%, {result['num_images']} val images, {name}, {source})", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ValueError, FloatingPointError) as e:
        print(f"fastmae.linprobe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
