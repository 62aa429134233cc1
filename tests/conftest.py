import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when fastmae_kernels.triton_ops is first
# imported, so it must be set before any test module imports it. Only without CUDA: on a GPU the kernels compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
