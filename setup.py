"""Installs `fastmae` (the trainer) and `fastmae_kernels` (the kernels library, from kernels/).

The CUDA extension `fastmae_kernels._C` (sources in csrc/) is built when torch is a CUDA build and
nvcc is found. Switches:
  FASTMAE_BUILD_CUDA=0   never build it
  FASTMAE_BUILD_CUDA=1   build it or fail (no silent skip)
  FASTMAE_CUDA_ARCH_LIST="8.0;9.0"   target archs (default sm_80 and sm_90; CI builds "9.0" only)
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


def _arch_list() -> str:
    """FASTMAE_CUDA_ARCH_LIST, else TORCH_CUDA_ARCH_LIST, else sm_80 and sm_90 ("9.0" alone builds ~2x faster)."""
    return os.environ.get("FASTMAE_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS


def cuda_extensions():
    """([CUDAExtension fastmae_kernels._C], {"build_ext": ...}) or ([], {}) with one line saying why not."""
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

    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
    _say(f"building the CUDA extension fastmae_kernels._C for archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh")))

    class BuildCudaExtension(BuildExtension):
        """A compile error fails the install with one clear line after the compiler's output (never a silent skip)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                _say(
                    f"building the CUDA extension fastmae_kernels._C failed ({type(exc).__name__}: {exc}); "
                    "the compiler output is above. Fix csrc/, or set FASTMAE_BUILD_CUDA=0 to install without it."
                )
                raise

    ext = CUDAExtension(
        name="fastmae_kernels._C",
        sources=sources,
        depends=headers,
        # No --use_fast_math: the loss must divide and take sqrt exactly as the torch reference does.
        # The C++ standard is torch's own (C++20 for torch 2.14), added by BuildExtension.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildCudaExtension.with_options(use_ninja=True)}


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
        "torchvision",  # the official augmentation and the fallback loader
        "triton>=3.0",
        "numpy",
        "deepspeed>=0.17.2",  # torch_autocast with ZeRO (--precision bf16)
        "nvidia-dali-cuda130>=1.50; platform_machine == 'x86_64' or platform_machine == 'aarch64'",
        "ninja",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "safetensors",
        "webdataset",
    ],
    extras_require={"test": ["pytest>=8", "timm>=1.0", "psutil"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
