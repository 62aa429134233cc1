"""Installs `fastmae` (the trainer) and `fastmae_kernels` (the kernels library, from kernels/).

The CUDA extension `fastmae_kernels._C` (sources in csrc/) is built when torch is a CUDA build and
nvcc is found. Switches:
  FASTMAE_BUILD_CUDA=0   never build it
  FASTMAE_BUILD_CUDA=1   build it or fail (no silent skip)
  FASTMAE_CUDA_ARCH_LIST="8.0;9.0"   target archs (default sm_80 and sm_90)
Build it with `pip install --no-build-isolation .` so the installed torch is the one compiled against.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_CUDA = os.environ.get("FASTMAE_BUILD_CUDA", "auto").lower()
DEFAULT_ARCHS = "8.0;9.0"


def _say(message: str) -> None:
    print(f"fastmae setup: {message}", file=sys.stderr)


def _why_no_cuda_build() -> str | None:
    """None when the CUDA extension can be built here, else one line saying why not."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not importable in the build environment (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    if not glob.glob(os.path.join(HERE, "csrc", "*.cu")):
        return "no CUDA sources in csrc/"
    return None


def cuda_extensions():
    if BUILD_CUDA in ("0", "false", "no", "off"):
        _say("FASTMAE_BUILD_CUDA=0: skipping the CUDA extension")
        return [], {}
    reason = _why_no_cuda_build()
    if reason is not None:
        if BUILD_CUDA in ("1", "true", "yes", "on"):
            raise RuntimeError(f"fastmae setup: FASTMAE_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("FASTMAE_CUDA_ARCH_LIST", DEFAULT_ARCHS))
    _say(f"building the CUDA extension for archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        name="fastmae_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="fastmae",
    version="0.1.0",
    description="Fast, exact Masked Autoencoder pretraining for Vision Transformers, with fused MAE kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmae", "fastmae.*"]) + find_packages("kernels"),
    package_dir={"fastmae_kernels": "kernels/fastmae_kernels"},
    install_requires=[
        "torch>=2.4,<2.16",
        "triton>=3.0",
        "numpy",
        "deepspeed>=0.15",
        "nvidia-dali-cuda130>=1.50; platform_machine == 'x86_64' or platform_machine == 'aarch64'",
        "ninja",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "safetensors",
        "webdataset",
    ],
    extras_require={"test": ["pytest>=8", "timm>=1.0", "torchvision"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
