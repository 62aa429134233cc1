"""What the linear probe and the k-NN evaluation share: the labelled train / val sets and the frozen
encoder, built from the same command-line flags.

Data: an ImageFolder root with `train/` and `val/` class folders (the official layout), or, with no
`--data_path`, the embedded ProceduralImages (10 labelled shape classes, no download) split by index
ranges: train = [0, num_train), val = [val_start, val_start + num_val). The default val_start (2048)
is the CPU pretraining preset's image count, so validation images were never seen in pretraining.
"""

import argparse
import os

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Subset

from fastmae.checkpoint_io import load_mae
from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.procedural import ProceduralImages
from fastmae.features import POOLS, FrozenEncoder
from fastmae.models.registry import create_model, model_names

BICUBIC = T.InterpolationMode.BICUBIC


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="ImageFolder root with train/ and val/; none = embedded default")
    g.add_argument("--num_train", type=int, default=2048, help="embedded default: train images [0, num_train)")
    g.add_argument("--num_val", type=int, default=1024, help="embedded default: val images from val_start")
    g.add_argument("--val_start", type=int, default=2048, help="embedded default: first val index (after pretraining's)")
    g.add_argument("--image_size", type=int, default=64, help="embedded default: side the images are drawn at (px)")
    g.add_argument("--data_seed", type=int, default=0, help="embedded default: the seed pretraining used (--seed)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="train-time RandomResizedCrop + flip as the paper (--no-augment: fixed features, cached once)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument("--checkpoint", default=None, help="official MAE .pth, fastmae export or DeepSpeed checkpoint folder")
    g.add_argument("--model", default=None, help=f"model name (default: guessed from the checkpoint); {model_names()}")
    g.add_argument("--random_init", action="store_true", help="no checkpoint: the official random initialisation")
    g.add_argument("--init_seed", type=int, default=0, help="--random_init: torch seed of the initialisation")
    g.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: 'latest')")
    g.add_argument("--trust_checkpoint", action="store_true", help="torch.load with weights_only=False")
    g.add_argument("--pool", choices=POOLS, default="cls", help="cls token (paper default) or average pooling")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad combinations end here with argparse's one-line error."""
    if args.checkpoint is None and not args.random_init:
        p.error("pass --checkpoint PATH, or --random_init --model NAME for the randomly initialised baseline")
    if args.checkpoint is not None and args.random_init:
        p.error("--checkpoint and --random_init exclude each other")
    if args.random_init and args.model is None:
        p.error("--random_init needs --model")
    if args.data_path is None:
        if min(args.num_train, args.num_val, args.image_size) <= 0 or args.val_start < 0:
            p.error("--num_train, --num_val, --image_size must be positive and --val_start >= 0")
        if args.val_start < args.num_train:
            p.error(f"--val_start {args.val_start} overlaps the train images [0, {args.num_train})")
    else:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data_path, split)):
                p.error(f"--data_path {args.data_path} has no {split}/ folder (expected the ImageFolder layout root/{split}/<class>/<image>)")


def build_encoder(args: argparse.Namespace) -> tuple[FrozenEncoder, str]:
    """The frozen encoder (on args.device) and its model name."""
    if args.random_init:
        torch.manual_seed(args.init_seed)
        mae, name = create_model(args.model), args.model
    else:
        mae, name = load_mae(args.checkpoint, args.model, part="encoder", tag=args.tag, trust=args.trust_checkpoint)
    return FrozenEncoder(mae, pool=args.pool).to(args.device), name


def transforms_for(size: int, procedural: bool, augment: bool) -> tuple[T.Compose, T.Compose]:
    """(train, val) transforms: the official linear-probe ones (weak augmentation: RandomResizedCrop +
    flip; val: resize to size/0.875 and center-crop); the procedural images are resized whole for val."""
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    val_geo = [T.Resize((size, size), interpolation=BICUBIC)] if procedural else [
        T.Resize(int(round(size / 0.875)), interpolation=BICUBIC), T.CenterCrop(size)
    ]
    train_geo = [T.RandomResizedCrop(size, interpolation=BICUBIC), T.RandomHorizontalFlip()] if augment else val_geo
    return T.Compose(train_geo + norm), T.Compose(val_geo + norm)


def build_datasets(args: argparse.Namespace, input_size: int) -> tuple[Dataset, Dataset, int]:
    """(train, val, num_classes)."""
    procedural = args.data_path is None
    tf_train, tf_val = transforms_for(input_size, procedural, args.augment)
    if procedural:
        total = max(args.num_train, args.val_start + args.num_val)
        make = lambda tf: ProceduralImages(total, args.image_size, seed=args.data_seed, transform=tf)  # noqa: E731
        train = Subset(make(tf_train), range(args.num_train))
        val = Subset(make(tf_val), range(args.val_start, args.val_start + args.num_val))
        return train, val, len(ProceduralImages.classes)
    from torchvision.datasets import ImageFolder

    train = ImageFolder(os.path.join(args.data_path, "train"), transform=tf_train)
    val = ImageFolder(os.path.join(args.data_path, "val"), transform=tf_val)
    if train.classes != val.classes:
        raise ValueError(f"train/ and val/ of {args.data_path} have different class folders")
    return train, val, len(train.classes)


def loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=g,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
