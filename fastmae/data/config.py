"""DataConfig: everything the pretraining loaders need, validated at construction."""

from dataclasses import dataclass

LOADERS = ("auto", "dali", "torchvision", "synthetic")


@dataclass(kw_only=True)
class DataConfig:
    data_path: str | None
    """ImageFolder root, a file list (.txt), a webdataset shard folder / .tar; None -> embedded ProceduralImages."""
    input_size: int = 224
    """Side of the square crops fed to the model (RandomResizedCrop output)."""
    batch_size: int = 64
    """Images per batch, per rank."""
    num_workers: int = 8
    """DataLoader worker processes (torchvision) or decoding threads (DALI)."""
    seed: int = 0
    """Seeds the per-epoch shuffle and the per-sample augmentation."""
    loader: str = "auto"
    """"auto" | "dali" | "torchvision" | "synthetic"; auto = dali when importable and usable, else torchvision."""
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    """Where batches are delivered ("cpu", "cuda", "cuda:3")."""
    default_num_images: int = 4096
    """Size of the embedded default set (data_path None), and the epoch size of the synthetic loader."""
    default_image_size: int = 64
    """Side in px of the embedded default images, before RandomResizedCrop."""

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {self.loader!r}")
        for name in ("input_size", "batch_size", "world_size", "default_num_images", "default_image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
