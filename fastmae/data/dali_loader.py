"""NVIDIA DALI pretraining loader (work in progress: not yet usable, auto falls back to torchvision)."""

from fastmae.data.config import DataConfig


def unavailable_reason(cfg: DataConfig) -> str | None:
    return "the DALI loader is not implemented yet"
