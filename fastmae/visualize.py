"""A PNG grid of what a pretrained MAE reconstructs, one row per image:

    original | masked input | reconstruction | reconstruction with the visible patches pasted back

    python -m fastmae.visualize --checkpoint CKPT [--images FOLDER] [--num_images 4] [--output grid.png]

CKPT must hold the decoder: a fastmae pretraining checkpoint (DeepSpeed folder), a `--full` export, or
an official visualisation model (mae_visualize_vit_large.pth). Without --images the embedded default
(procedural) images are used. Images are resized (shorter side) and center-cropped to the model's input
size and normalised with the ImageNet mean / std, as in pretraining. The grid itself is
`fastmae.reconstruction.save_reconstruction_grid`, the same one the trainer writes during pretraining.
"""

import argparse
import os
import sys

import torch
import torchvision.transforms as T
from PIL import Image, UnidentifiedImageError

from fastmae.checkpoint_io import CheckpointError, mae_from_state_dict, read_run_meta, read_state_dict
from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.procedural import ProceduralImages
from fastmae.models.registry import model_names
from fastmae.reconstruction import save_reconstruction_grid

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def image_files(folder: str) -> list[str]:
    """Image files under `folder` (recursive), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def load_images(folder: str | None, count: int, size: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size] normalised images: the first `count` of `folder`, or procedural ones."""
    tf = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    if folder is None:
        ds = ProceduralImages(count, image_size=max(size, 64), seed=seed)
        return torch.stack([tf(ds[i][0]) for i in range(count)])
    if not os.path.isdir(folder):
        raise ValueError(f"--images {folder} is not a folder")
    imgs = []
    for path in image_files(folder):
        try:
            with Image.open(path) as im:
                imgs.append(tf(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            print(f"fastmae.visualize: skipping unreadable image {path} ({e})", file=sys.stderr)
        if len(imgs) == count:
            break
    if not imgs:
        raise ValueError(f"no readable images in {folder} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return torch.stack(imgs)  # [n, 3, size, size]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastmae.visualize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full MAE checkpoint (with decoder)")
    p.add_argument("--model", default=None, help=f"model name (default: guessed from the checkpoint); {model_names()}")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: 'latest')")
    p.add_argument("--trust_checkpoint", action="store_true", help="torch.load with weights_only=False")
    p.add_argument("--images", default=None, help="folder of images (default: the embedded procedural images)")
    p.add_argument("--num_images", type=int, default=4, help="rows in the grid")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask (and of the procedural images)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="the model was pretrained with --norm_pix_loss (predictions are per-patch normalised); "
                        "default: what a fastmae checkpoint recorded, else off")
    p.add_argument("--scale", type=int, default=None, help="integer upsampling of each tile (default: ~128 px tiles)")
    p.add_argument("--output", default="reconstruction.png", help="PNG path to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.num_images <= 0:
        p.error("--num_images must be positive")
    if not 0.0 <= args.mask_ratio < 1.0:
        p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.scale is not None and args.scale <= 0:
        p.error("--scale must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sd = read_state_dict(args.checkpoint, tag=args.tag, trust=args.trust_checkpoint)
        meta = read_run_meta(args.checkpoint, args.tag)  # read once: the flag's default and the model's record
        norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(meta.get("norm_pix_loss", False))
        model, name = mae_from_state_dict(sd, args.checkpoint, args.model, "full", meta, norm_pix_loss=norm_pix)
        imgs = load_images(args.images, args.num_images, model.patch_embed.img_size[0], args.seed)
    except (CheckpointError, ValueError) as e:
        print(f"fastmae.visualize: error: {e}", file=sys.stderr)
        return 2
    model.to(args.device).eval()
    path = save_reconstruction_grid(model, imgs, args.output, mask_ratio=args.mask_ratio, seed=args.seed,
                                    mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=args.scale)
    print(f"wrote {path}: {imgs.shape[0]} images x (original | masked | reconstruction | reconstruction + visible), "
          f"{name}, mask ratio {args.mask_ratio}, norm_pix_loss {norm_pix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
