"""Reading MAE weights from any checkpoint a user is likely to hold, with one-line errors naming the key.

Accepted inputs (`read_state_dict`):
- official MAE checkpoints: `{"model": state_dict, ...}`, the full visualisation models
  (mae_visualize_vit_*.pth, encoder + decoder) and the encoder-only releases (mae_pretrain_vit_*.pth);
- fastmae exports: the official-style `.pth` and the timm-style `.safetensors` of `python -m fastmae.export`;
- DeepSpeed checkpoint folders (ZeRO 0-3), either the root holding the `latest` pointer or one tag folder,
  consolidated in-process to fp32 with `deepspeed.utils.zero_to_fp32` (no separate script to run);
- plain state dicts, also wrapped as `{"module": ...}` / `{"state_dict": ...}` or with the `module.`
  (DDP) / `_orig_mod.` (torch.compile) prefixes.

fastmae's parameter names are the official ones, so no renaming is needed: only picking the encoder or
the full model, and checking that names and shapes fit the model asked for.
"""

import argparse
import glob
import json
import logging
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from fastmae.train.checkpoint import COMPLETE

log = logging.getLogger("fastmae.checkpoint_io")

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
DECODER_PREFIXES = ("mask_token", "decoder_")
# Keys a fine-tuned / classification checkpoint adds on top of the encoder; never part of the MAE.
HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.")
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
PARTS = ("encoder", "full")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


def is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_PREFIXES)


def is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PREFIXES)


# --------------------------------------------------------------------------------------------------
# reading


def _torch_load(path: str, trust: bool) -> object:
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        # Official MAE training checkpoints carry the argparse Namespace of their run under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a refused pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read {path} with weights_only=True ({first}); if you trust the file, "
            f"pass --trust_checkpoint (torch.load weights_only=False)"
        ) from e


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object: itself, or under one of WRAPPER_KEYS."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                return dict(obj[key])
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise CheckpointError(f"{source} holds no state dict (looked for {WRAPPER_KEYS}; it has keys {keys})")
    raise CheckpointError(f"{source} is a {type(obj).__name__}, not a state dict")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    # torch.compile nests `_orig_mod.` anywhere in a name (e.g. blocks.0._orig_mod.attn...)
    return {k.replace("._orig_mod.", ".").removeprefix("_orig_mod."): v for k, v in sd.items()}


def resolve_deepspeed_dir(path: str, tag: str | None = None) -> tuple[str, str] | None:
    """(root, tag) when `path` is a DeepSpeed checkpoint folder (root with `latest`, or a tag folder)."""
    if glob.glob(os.path.join(path, "*_model_states.pt")):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    if tag is None and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            tag = f.read().strip()
    if tag is not None and glob.glob(os.path.join(path, tag, "*_model_states.pt")):
        return os.path.abspath(path), tag
    return None


def read_run_meta(path: str, tag: str | None = None) -> dict:
    """What the fastmae run recorded about its model in a checkpoint's COMPLETE marker ({"name",
    "norm_pix_loss", "input_size"}); {} for files, foreign checkpoints and checkpoints from before it did."""
    found = resolve_deepspeed_dir(path, tag) if os.path.isdir(path) else None
    if found is None:
        return {}
    try:
        with open(os.path.join(*found, COMPLETE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return dict(meta.get("model") or {}) if isinstance(meta, dict) else {}


def _to_fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def consolidate_deepspeed(root: str, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint: merged from the ZeRO optimizer partitions when there
    are any (stages 1-3; the fp32 masters), else the `module` of the model-states file (stage 0)."""
    folder = os.path.join(root, tag)
    if glob.glob(os.path.join(folder, "*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        except Exception as e:  # noqa: BLE001 - deepspeed raises bare ValueError/KeyError/...
            raise CheckpointError(f"cannot consolidate DeepSpeed checkpoint {folder}: {type(e).__name__}: {e}") from e
        return _to_fp32(sd)
    model_file = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not os.path.isfile(model_file):
        raise CheckpointError(f"DeepSpeed checkpoint {folder} has no optimizer partitions and no mp_rank_00_model_states.pt")
    # DeepSpeed's own files pickle its config objects; they come from the user's own run.
    obj = torch.load(model_file, map_location="cpu", weights_only=False)
    return _to_fp32(_unwrap(obj, model_file))


def read_state_dict(path: str, tag: str | None = None, trust: bool = False) -> dict[str, torch.Tensor]:
    """The flat state dict (CPU tensors, official key names) of any supported checkpoint; see module doc."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        found = resolve_deepspeed_dir(path, tag)
        if found is None:
            raise CheckpointError(f"{path} is a folder but not a DeepSpeed checkpoint (no 'latest' file or *_model_states.pt)")
        sd = consolidate_deepspeed(*found)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    else:
        sd = _unwrap(_torch_load(path, trust), path)
    return _strip_prefixes(sd)


# --------------------------------------------------------------------------------------------------
# checking and loading


def select(sd: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The encoder keys (part="encoder") or encoder + decoder keys (part="full") of a state dict."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    keep = is_encoder_key if part == "encoder" else (lambda k: is_encoder_key(k) or is_decoder_key(k))
    return {k: v for k, v in sd.items() if keep(k)}


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_fits(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    part: str,
    model_name: str,
    source: str = "checkpoint",
) -> None:
    """Raises CheckpointError (one line, naming the first offending key) unless `given` has exactly the
    `part` keys of `expected` with the same shapes. Classification heads and, for part="encoder", the
    decoder are ignored."""
    want = select(expected, part)
    hint = guess_model_name(given)
    hint_txt = f" (it looks like {hint}; pass --model {hint})" if hint and hint != model_name else ""
    ours = select(given, part)
    if not ours:
        sample = ", ".join(repr(k) for k in list(given)[:3])
        first = next(iter(want))
        raise CheckpointError(
            f"{source} is not an MAE/ViT checkpoint for {model_name}: missing key {first!r} (it has keys {sample}, ...)"
        )
    for key, ref in want.items():
        if key not in ours:
            more = sum(k not in ours for k in want) - 1
            extra = f" (and {more} more)" if more else ""
            if part == "full" and is_decoder_key(key) and not any(is_decoder_key(k) for k in given):
                raise CheckpointError(
                    f"{source} has no decoder (missing key {key!r}): it is encoder-only; this needs a full MAE "
                    f"checkpoint (e.g. mae_visualize_vit_large.pth or a fastmae pretraining checkpoint)"
                )
            raise CheckpointError(f"{source} does not fit {model_name}: missing key {key!r}{extra}{hint_txt}")
        if tuple(ours[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source} does not fit {model_name}: shape mismatch for key {key!r}: "
                f"checkpoint {_shape(ours[key])}, model {_shape(ref)}{hint_txt}"
            )
    for key in ours:
        if key not in want:
            raise CheckpointError(f"{source} does not fit {model_name}: unexpected key {key!r}{hint_txt}")


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], part: str, model_name: str, source: str) -> None:
    """Copies the `part` weights of `sd` into `model` after `check_fits`; the rest of `model` is untouched."""
    expected = model.state_dict()
    check_fits(expected, sd, part, model_name, source)
    chosen = select(sd, part)
    with torch.no_grad():
        for key, value in chosen.items():
            expected[key].copy_(value)


def guess_model_name(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The registered model whose encoder shapes (width, depth, patch, image size) match `sd`, or None."""
    from fastmae.models.registry import CONFIGS

    w, pos = sd.get("patch_embed.proj.weight"), sd.get("pos_embed")
    if w is None or pos is None or w.dim() != 4 or pos.dim() != 3:
        return None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = round((pos.shape[1] - 1) ** 0.5)
    found = (w.shape[0], depth, w.shape[-1], grid * w.shape[-1])
    for name, cfg in CONFIGS.items():
        if (cfg["embed_dim"], cfg["depth"], cfg["patch_size"], cfg.get("img_size", 224)) == found:
            return name
    return None


def load_mae(
    path: str,
    model_name: str | None = None,
    part: str = "full",
    tag: str | None = None,
    trust: bool = False,
    **model_overrides,
) -> tuple[nn.Module, str]:
    """A fastmae MAE built for `model_name` (guessed from the checkpoint when None) with the checkpoint's
    `part` weights loaded; returns (model, model_name). With part="encoder" the decoder stays at init."""
    sd = read_state_dict(path, tag=tag, trust=trust)
    return mae_from_state_dict(sd, path, model_name, part, read_run_meta(path, tag), **model_overrides)


def mae_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    source: str,
    model_name: str | None = None,
    part: str = "full",
    meta: Mapping | None = None,
    **model_overrides,
) -> tuple[nn.Module, str]:
    """load_mae for a state dict already read: the model name comes from the argument, else the run's
    record (`meta`, see read_run_meta), else the shapes; the run's input size unless overridden."""
    from fastmae.models.registry import create_model

    meta = meta or {}
    if model_name is None:
        model_name = meta.get("name") or guess_model_name(sd)
        if model_name is None:
            raise CheckpointError(f"cannot tell which model {source} is for; "
                                  "pass --model (one of the registered names)")
    if meta.get("input_size") and "img_size" not in model_overrides:  # the run's grid, not the registry default
        model_overrides["img_size"] = meta["input_size"]
    model = create_model(model_name, **model_overrides)
    load_weights(model, sd, part, model_name, source=source)
    return model, model_name


def describe(sd: Mapping[str, torch.Tensor]) -> str:
    """One line: how many encoder / decoder / other tensors and parameters a state dict holds."""
    enc = [v for k, v in sd.items() if is_encoder_key(k)]
    dec = [v for k, v in sd.items() if is_decoder_key(k)]
    other = len(sd) - len(enc) - len(dec)
    n = sum(v.numel() for v in enc) / 1e6
    return f"{len(enc)} encoder tensors ({n:.1f}M params), {len(dec)} decoder tensors, {other} other"

