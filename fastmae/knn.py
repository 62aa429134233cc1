"""Quick k-NN evaluation of a frozen encoder: no training, one pass over train and val.

    python -m fastmae.knn --checkpoint CKPT [--data_path IMAGENET] [--k 20] [--temperature 0.07]

Features (cls token or --pool avg) are L2-normalised; each val image takes its k most cosine-similar
train images, which vote for their class with weight exp(similarity / T) (the weighted k-NN of Wu et
al. 2018 / DINO). Prints top-1 / top-5.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from fastmae.checkpoint_io import CheckpointError
from fastmae.features import extract_features
from fastmae.probe_data import add_data_args, add_model_args, build_datasets, build_encoder, check_args, loader


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [M, num_classes] for test_feats [M, D] from train_feats [N, D] / train_labels [N]."""
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}")
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)  # [N, D]
    scores = []
    for i in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[i : i + chunk].float(), dim=1)  # [m, D]
        sim, idx = (q @ train.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())  # [m, C]
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    """{"top1", "top5"} in percent (top-5 capped at the number of classes) and the number of test images."""
    from fastmae.linprobe import topk_correct

    scores = knn_classify(train[0], train[1], test[0], num_classes, k, temperature)
    c1, c5 = topk_correct(scores, test[1])
    n = test[1].shape[0]
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "num_images": n, "k": k, "temperature": temperature}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastmae.knn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    p.set_defaults(augment=False)  # k-NN uses the val transform for the train images too
    g = p.add_argument_group("k-NN")
    g.add_argument("--k", type=int, default=20)
    g.add_argument("--temperature", type=float, default=0.07)
    g.add_argument("--batch_size", type=int, default=256, help="images per encoder forward")
    g.add_argument("--output_dir", default=None, help="write knn.json here")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.k <= 0 or args.temperature <= 0:
        p.error("--k and --temperature must be positive")
    args.augment = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        encoder, name = build_encoder(args)
        train_ds, val_ds, num_classes = build_datasets(args, encoder.img_size[0])
        prog = not args.quiet
        train = extract_features(encoder, loader(train_ds, args.batch_size, False, args.num_workers), args.device,
                                 "train features", prog)
        val = extract_features(encoder, loader(val_ds, args.batch_size, False, args.num_workers), args.device,
                               "val features", prog)
    except (CheckpointError, ValueError) as e:
        print(f"fastmae.knn: error: {e}", file=sys.stderr)
        return 2
    r = knn_accuracy(train, val, num_classes, args.k, args.temperature)
    source = args.checkpoint or f"random init (seed {args.init_seed})"
    r.update(model=name, encoder=source, pool=args.pool, train_images=len(train_ds))
    print(f"knn result: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  (k={r['k']}, T={r['temperature']}, "
          f"{len(train_ds)} train / {r['num_images']} val images, {name}, {source})", flush=True)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "knn.json"), "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
