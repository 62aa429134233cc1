"""The pretraining data entry point: DataConfig, validate_data_path, build_pretrain_loader.

    cfg = DataConfig(data_path=args.data_path, input_size=224, batch_size=64, rank=r, world_size=w, device="cuda")
    validate_data_path(cfg.data_path)          # before building the model: fails fast with one line
    loader = build_pretrain_loader(cfg)
    loader.load_state_dict(ckpt["data"])       # on resume
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for imgs in loader:                    # [B, 3, S, S] float32 on cfg.device
            ...
            ckpt["data"] = loader.state_dict()
"""

from fastmae.data.base import PretrainLoader, log
from fastmae.data.config import DataConfig
from fastmae.data.sources import open_source, validate_data_path
from fastmae.data.synthetic import SyntheticLoader
from fastmae.data.torchvision_loader import TorchvisionLoader

__all__ = ["DataConfig", "PretrainLoader", "build_pretrain_loader", "validate_data_path", "dali_unavailable_reason"]


def dali_unavailable_reason(cfg: DataConfig) -> str | None:
    """None when the DALI loader can serve `cfg` here, else one line saying why not."""
    try:
        from fastmae.data import dali_loader
    except ImportError as e:
        return f"fastmae.data.dali_loader cannot be imported: {e}"
    return dali_loader.unavailable_reason(cfg)


def build_pretrain_loader(cfg: DataConfig) -> PretrainLoader:
    """The loader `cfg.loader` names; "auto" is DALI when it can serve cfg here, else torchvision."""
    if cfg.loader == "synthetic":
        return SyntheticLoader(cfg)
    source = open_source(
        cfg.data_path, num_images=cfg.default_num_images, image_size=cfg.default_image_size, seed=cfg.seed
    )
    kind = cfg.loader
    if kind in ("auto", "dali"):
        reason = dali_unavailable_reason(cfg)
        if reason is None:
            from fastmae.data.dali_loader import DaliLoader

            try:
                return DaliLoader(cfg, source)
            except Exception as e:  # noqa: BLE001 - any failure to start DALI here means "not usable"
                if kind == "dali":
                    raise
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if kind == "dali":
            raise RuntimeError(f"loader 'dali' requested but unusable: {reason}")
        log.warning("data: DALI not usable (%s); using the torchvision loader", reason)
    return TorchvisionLoader(cfg, source)
