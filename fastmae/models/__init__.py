from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.reference_mae import ReferenceMAE
from fastmae.models.registry import create_model, model_config, model_names

__all__ = ["MaskedAutoencoderViT", "ReferenceMAE", "create_model", "model_config", "model_names"]
