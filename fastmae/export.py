"""Export a pretrained MAE encoder for use elsewhere; import official MAE and DeepSpeed checkpoints.

    python -m fastmae.export CKPT [--model NAME] [--timm OUT.safetensors] [--mae OUT.pth [--full]]

CKPT is anything `fastmae.checkpoint_io.read_state_dict` reads: an official MAE .pth (visualisation or
encoder-only), a fastmae export, or a DeepSpeed checkpoint folder (ZeRO 0-3, consolidated here in-process).

- `--timm`: the encoder as a timm `VisionTransformer` state dict (safetensors) that loads with strict=True
  into `timm.create_model("vit_base_patch16_224", num_classes=0)` (large: vit_large_patch16_224, huge:
  vit_huge_patch14_224; the default token pooling). The file's metadata names the timm model and its
  constructor arguments, so the CPU-sized models load too (`timm_model_from_export`).
- `--mae`: an official-MAE-style `{"model": state_dict}` .pth: encoder only, like mae_pretrain_vit_base.pth
  (what the official main_linprobe / main_finetune `--finetune` read), or with `--full` encoder + decoder,
  like mae_visualize_vit_large.pth.
"""

import argparse
import json
import os
import sys

import torch

from fastmae.checkpoint_io import CheckpointError, describe, mae_from_state_dict, read_run_meta, read_state_dict, select
from fastmae.models.registry import ALIASES, model_config, model_names

TIMM_NAMES = {
    "mae_vit_base_patch16_dec512d8b": "vit_base_patch16_224",
    "mae_vit_large_patch16_dec512d8b": "vit_large_patch16_224",
    "mae_vit_huge_patch14_dec512d8b": "vit_huge_patch14_224",
}


def timm_name(model_name: str) -> str | None:
    """The timm model with the same encoder, or None for fastmae's CPU-sized configs."""
    return TIMM_NAMES.get(ALIASES.get(model_name, model_name))


def timm_kwargs(model_name: str, img_size: int | None = None) -> dict:
    """Arguments for `timm.models.vision_transformer.VisionTransformer` giving this model's encoder
    (token pooling, no head; timm's LayerNorm eps 1e-6 matches the MAE's), at `img_size` if the run used
    another input size than the registry's."""
    cfg = model_config(model_name)
    return dict(
        img_size=img_size or cfg.get("img_size", 224),
        patch_size=cfg["patch_size"],
        in_chans=cfg.get("in_chans", 3),
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
    )


def export_state_dict(sd: dict[str, torch.Tensor], full: bool) -> dict[str, torch.Tensor]:
    """Encoder (or encoder + decoder) tensors as contiguous fp32 CPU copies, in a stable order."""
    chosen = select(sd, "full" if full else "encoder")
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in chosen.items()}


def save_timm(path: str, sd: dict[str, torch.Tensor], model_name: str, img_size: int | None = None) -> None:
    from safetensors.torch import save_file

    kwargs = timm_kwargs(model_name, img_size)
    # timm's named models are 224 px: at another input size (another position table) the kwargs describe it
    same_size = kwargs["img_size"] == model_config(model_name).get("img_size", 224)
    meta = {
        "format": "timm.VisionTransformer",
        "fastmae_model": model_name,
        "timm_model": (timm_name(model_name) or "") if same_size else "",
        "timm_kwargs": json.dumps(kwargs),
    }
    save_file(export_state_dict(sd, full=False), path, metadata=meta)


def save_mae(path: str, sd: dict[str, torch.Tensor], model_name: str, full: bool = False) -> None:
    torch.save({"model": export_state_dict(sd, full=full), "model_name": model_name}, path)


def timm_model_from_export(path: str):
    """A timm VisionTransformer (no head) with the weights of a `--timm` export loaded strictly."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "timm.VisionTransformer":
        raise CheckpointError(f"{path} is not a fastmae timm export (metadata format={meta.get('format')!r})")
    kwargs = json.loads(meta["timm_kwargs"])
    if meta.get("timm_model"):
        model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0)
    else:
        model = VisionTransformer(**kwargs)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def _makedirs_for(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastmae.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="official MAE .pth, fastmae export, or DeepSpeed checkpoint folder")
    p.add_argument("--model", default=None, help=f"model name (default: guessed from shapes); one of {model_names()}")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: the 'latest' file)")
    p.add_argument("--timm", default=None, metavar="OUT.safetensors", help="write the timm-compatible encoder here")
    p.add_argument("--mae", default=None, metavar="OUT.pth", help="write an official-MAE-style checkpoint here")
    p.add_argument("--full", action="store_true", help="--mae with the decoder too (visualisation-style)")
    p.add_argument("--trust_checkpoint", action="store_true", help="torch.load with weights_only=False")
    args = p.parse_args(argv)
    if not args.timm and not args.mae:
        p.error("nothing to write: pass --timm OUT.safetensors and/or --mae OUT.pth")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sd = read_state_dict(args.checkpoint, tag=args.tag, trust=args.trust_checkpoint)
        # building the model proves the weights load into fastmae (every key, every shape)
        model, name = mae_from_state_dict(sd, args.checkpoint, args.model, "full" if args.full else "encoder",
                                          read_run_meta(args.checkpoint, args.tag))
    except (CheckpointError, ValueError) as e:
        print(f"fastmae.export: error: {e}", file=sys.stderr)
        return 2
    weights = model.state_dict()
    print(f"read {args.checkpoint}: {describe(sd)}; model {name}")
    if args.timm:
        _makedirs_for(args.timm)
        img_size = model.patch_embed.img_size[0]
        save_timm(args.timm, weights, name, img_size)
        shown = timm_name(name) if img_size == model_config(name).get("img_size", 224) else None
        print(f"wrote {args.timm} (timm {shown or 'VisionTransformer(**metadata timm_kwargs)'}, {img_size} px, "
              "num_classes=0)")
    if args.mae:
        _makedirs_for(args.mae)
        save_mae(args.mae, weights, name, full=args.full)
        print(f"wrote {args.mae} ({'encoder + decoder' if args.full else 'encoder only'}, official MAE keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
