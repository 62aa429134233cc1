"""fastmae: a fast, exact Masked Autoencoder (MAE) pretraining trainer for Vision Transformers."""

__version__ = "0.1.0"
