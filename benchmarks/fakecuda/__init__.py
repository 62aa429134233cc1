"""A machine without a GPU made to look like one H100 to torch, dynamo, AOTAutograd and Inductor, so Inductor's
CUDA code generation can be read on a CPU: which Triton kernels it writes for a training step, which library
kernels it calls and what it leaves to aten. Nothing can run on it; tensors are fake (shapes, dtypes, strides).

Three layers, because each stops the trace at a different depth:
- `fakecudart.c` (preloaded, carrying libcudart's symbol version): the runtime calls torch's C++ makes while
  tracing: device count and properties, the current device, streams and events. The autograd engine asks for a
  cuda tensor's stream in C++, which no Python patch reaches (NOTES §6.7: where the first try stopped).
- `libcuda.c` (as libcuda.so.1 on the library path): torch's lazily loaded driver API.
- `install()`: the Python side: torch.cuda's queries, Inductor's device interface, Triton's active driver
  (a target of sm_90, never a launch), and two places that make a real cuda tensor (fake tensors' first-use
  context and an RNG state copy).

`run_under_fake_cuda(argv)` re-runs a Python module in a child process with the two libraries in place (the
preload has to be set before the process starts). Needs gcc and the CUDA runtime headers (CUDA_HOME, or the
nvidia pip packages torch brings), and a CUDA build of torch.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MARK = "FASTMAE_FAKE_CUDA"  # set in the child's environment: install() may run
# The one card both halves describe: an H100 SXM as far as torch's C++ and Inductor read it (the H200 has the
# same chip; only memory differs). Python serves it from torch.cuda; the C runtime shim gets each value as a
# FAKE_<KEY> definition at build time (`build`).
CARD = {
    "name": "NVIDIA H100 80GB HBM3 (benchmarks/fakecuda)", "major": 9, "minor": 0, "multi_processor_count": 132,
    "total_memory": 80 * 2**30, "regs_per_multiprocessor": 65536, "max_threads_per_multi_processor": 2048,
    "max_threads_per_block": 1024, "warp_size": 32, "L2_cache_size": 50 * 2**20, "shared_memory_per_block": 49152,
    "shared_memory_per_block_optin": 232448, "shared_memory_per_multiprocessor": 233472, "memory_bus_width": 5120,
}


def header_dirs() -> list[Path]:
    """Where cuda_runtime_api.h may be: the CUDA toolkit, or the nvidia wheels beside torch."""
    dirs = []
    if os.environ.get("CUDA_HOME"):
        dirs.append(Path(os.environ["CUDA_HOME"]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    site = Path(torch.__file__).resolve().parent.parent
    dirs += sorted(site.glob("nvidia/*/include")) + sorted(site.glob("nvidia/cuda_runtime/include"))
    return [d for d in dirs if (d / "cuda_runtime_api.h").is_file()]


def cudart_version_node() -> str:
    """The symbol version torch's libraries bind the runtime with, e.g. 'libcudart.so.13'."""
    lib = Path(torch.__file__).resolve().parent / "lib" / "libc10_cuda.so"
    if not lib.is_file():
        raise RuntimeError(f"{lib} not found: fake CUDA needs a CUDA build of torch (this is {torch.__version__})")
    found = re.search(rb"libcudart\.so\.\d+", lib.read_bytes())
    if not found:
        raise RuntimeError(f"{lib} names no libcudart")
    return found.group().decode()


def unavailable_reason() -> str | None:
    """Why fake CUDA cannot be built here (None: it can)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if shutil.which("gcc") is None:
        return "no gcc"
    if not header_dirs():
        return "no cuda_runtime_api.h (set CUDA_HOME or install the CUDA runtime headers)"
    return None


def build(out_dir: Path) -> Path:
    """Compiles the two libraries into `out_dir` (once per torch build) and returns it."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"fake CUDA cannot be built: {reason}")
    node = cudart_version_node()
    card = [f'-DFAKE_{key.upper()}="{value}"' if isinstance(value, str) else f"-DFAKE_{key.upper()}={value}"
            for key, value in CARD.items()]
    card_hash = hashlib.sha1(" ".join(card).encode()).hexdigest()[:8]  # another card: another build
    out_dir = Path(out_dir) / f"{torch.__version__}-{node}-{card_hash}"
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime, driver = out_dir / "libfakecudart.so", out_dir / "libcuda.so.1"
    sources = [HERE / "fakecudart.c", HERE / "libcuda.c"]
    newest = max(p.stat().st_mtime for p in sources)
    if runtime.exists() and driver.exists() and min(runtime.stat().st_mtime, driver.stat().st_mtime) > newest:
        return out_dir
    version_script = out_dir / "fakecudart.map"
    version_script.write_text(f"{node} {{ global: cuda*; local: *; }};\n")
    include = [f"-I{d}" for d in header_dirs()[:1]]
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", *include, *card, "-o", str(runtime), str(sources[0]),
                    f"-Wl,--version-script={version_script}"], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(driver), str(sources[1])], check=True)
    return out_dir


def run_under_fake_cuda(module: str, argv: list[str], lib_dir: Path, cwd: Path | None = None) -> int:
    """Runs `python -m module *argv` with the fake runtime preloaded and the fake driver on the library path."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(lib_dir / "libfakecudart.so"), env.get("LD_PRELOAD")]))
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH")]))
    env[MARK] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)  # "" would hide the one fake device
    return subprocess.run([sys.executable, "-m", module, *argv], env=env, cwd=cwd).returncode


def active() -> bool:
    return os.environ.get(MARK) == "1" and "libfakecudart" in os.environ.get("LD_PRELOAD", "")


def device_properties() -> types.SimpleNamespace:
    """What torch.cuda.get_device_properties returns for `CARD`, as far as Inductor reads it."""
    return types.SimpleNamespace(**CARD, gcnArchName="", is_integrated=False, is_multi_gpu_board=False,
                                 uuid="fakecuda", clock_rate=1980000, memory_clock_rate=2619000, pci_bus_id=0,
                                 pci_device_id=0, pci_domain_id=0)


def install() -> None:
    """The Python half: call only in a process started by `run_under_fake_cuda`."""
    if not active():
        raise RuntimeError("install() needs the fake runtime preloaded: start the process with run_under_fake_cuda")
    props = device_properties()
    cuda = torch.cuda
    cuda._lazy_init = lambda: None
    cuda.is_available = lambda: True
    cuda.is_initialized = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.get_device_properties = lambda device=None: props
    cuda.get_device_capability = lambda device=None: (props.major, props.minor)
    cuda.get_device_name = lambda device=None: props.name
    cuda.is_bf16_supported = lambda *a, **k: True
    cuda._exchange_device = lambda idx: 0
    cuda._maybe_exchange_device = lambda idx: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    state = torch.zeros(16, dtype=torch.uint8)  # dynamo saves and restores the RNG state around a compile
    cuda.get_rng_state = lambda device="cuda": state
    cuda.set_rng_state = lambda new_state, device="cuda": None
    cuda.get_rng_state_all = lambda: [state]
    cuda.set_rng_state_all = lambda states: None

    from torch._dynamo import device_interface

    iface = device_interface.CudaInterface
    iface.get_device_properties = staticmethod(lambda device=None: props)
    iface.get_compute_capability = staticmethod(lambda device=None: props.major * 10 + props.minor)
    iface.is_available = staticmethod(lambda: True)
    iface.device_count = staticmethod(lambda: 1)
    iface.current_device = staticmethod(lambda: 0)
    iface.is_bf16_supported = staticmethod(lambda including_emulation=False: True)

    import torch._subclasses.fake_tensor as fake_tensor

    if hasattr(fake_tensor, "init_gpu_context"):
        fake_tensor.init_gpu_context = lambda device: None  # it makes a real 1-element cuda tensor

    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class TargetOnly:
        """Triton's driver as far as code generation asks: the target, never a launch."""

        def get_current_target(self):
            return GPUTarget("cuda", props.major * 10 + props.minor, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

        def get_benchmarker(self):
            raise RuntimeError("fake CUDA: nothing can be timed")

    driver.set_active(TargetOnly())
    driver._default = driver._active
