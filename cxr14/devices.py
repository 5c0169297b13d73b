"""Where a job runs and what it may use there: CUDA, Apple MPS or the CPU.

Chosen and checked once at start, so that a wrong setup says so in one line instead of failing at the first
kernel or training on the CPU in silence: a GPU that this PyTorch build has no kernels for, an NVIDIA GPU beside a
CPU-only PyTorch, torch.compile without Triton. Also the autocast dtype (bf16 from Ampere on, fp16 with loss scaling
before it, bf16 on CPUs that multiply it natively), channels_last, the CPUs and DataLoader workers a process may use,
the device's random-number state (saved in checkpoints, so dropout replays after a resume) and waiting for it.
"""

import importlib.util
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from cxr14.errors import DeviceError
from cxr14.processes import usable_cpus

PYTORCH_INDEX = "https://download.pytorch.org/whl"  # PyTorch's own wheels, one index per CUDA version
LEGACY_CUDA = "cu126"  # the PyTorch 2.14 build that still carries Maxwell, Pascal and Volta kernels (sm_50 to sm_90)
BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; before it bf16 is emulated (slow), so fp16 with loss scaling


def select_device(name="auto", log=print):
    """'auto': CUDA, else Apple MPS, else the CPU (saying so when an NVIDIA GPU sits unused); any other name is
    passed to torch.device. A CUDA device is checked against this PyTorch build's kernels."""
    if name == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
            unused = unused_gpu_message()
            if unused:
                log(f"warning: {unused}")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise DeviceError(f"DEVICE {name!r}: use auto, cpu, cuda, cuda:N or mps ({error})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"DEVICE {name!r}, but PyTorch sees no CUDA GPU. {unused_gpu_message() or ''}".strip())
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"DEVICE {name!r}, but this machine or PyTorch build has no Apple MPS device.")
    if device.type == "cuda":
        check_cuda_build(device)
    return device


def unused_gpu_message():
    """Why an NVIDIA GPU that seems to be here is not used (nvidia-smi on the PATH, or CUDA_VISIBLE_DEVICES set),
    with the fix; None when there is no sign of one, or PyTorch sees it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    signs = shutil.which("nvidia-smi") or (visible and visible not in ("-1", "none", "NoDevFiles"))
    if not signs or torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (
            f"an NVIDIA GPU seems to be here (nvidia-smi or CUDA_VISIBLE_DEVICES), but this PyTorch "
            f"({torch.__version__}) is a CPU-only build (pip's default on Windows), so training would run on the CPU. "
            f"Install a CUDA build in this venv: pip install torch=={torch.__version__.split('+')[0]} "
            f"torchvision --index-url {PYTORCH_INDEX}/cu130 (older GPUs: {LEGACY_CUDA}); "
            "see docs/training.md, 'GPU setup'."
        )
    return (
        f"an NVIDIA GPU seems to be here, but this PyTorch (built for CUDA {torch.version.cuda}) cannot use it: the "
        f"driver may be older than CUDA {torch.version.cuda} needs (nvidia-smi shows the highest CUDA it supports; "
        f"update the driver), or CUDA_VISIBLE_DEVICES={visible!r} hides it. Training would run on the CPU."
    )


def cuda_build_covers(capability, arch_list):
    """Whether a wheel built for arch_list (torch.cuda.get_arch_list(): 'sm_XY' machine code, 'compute_XY' PTX) runs
    on a GPU of this capability: machine code of the same major version and a minor no higher, or PTX of a
    version no higher (compiled on the fly)."""
    major, minor = capability
    for arch in arch_list:
        kind, _, version = arch.partition("_")
        if not version.isdigit():
            continue
        arch_major, arch_minor = int(version[:-1]), int(version[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def check_cuda_build(device):
    """Stop, naming the GPU and what to install, when this PyTorch build has no kernels for it (every kernel would
    fail with 'no kernel image is available')."""
    arch_list = torch.cuda.get_arch_list()
    capability = torch.cuda.get_device_capability(device)
    if not arch_list or cuda_build_covers(capability, arch_list):
        return
    name = torch.cuda.get_device_name(device)
    raise DeviceError(
        f"{name} (compute capability {capability[0]}.{capability[1]}, sm_{capability[0]}{capability[1]}) is not among "
        f"the GPUs this PyTorch build ({torch.__version__}) has kernels for: {', '.join(arch_list)}. Install the "
        f"build that still carries them: pip install torch=={torch.__version__.split('+')[0]} torchvision "
        f"--index-url {PYTORCH_INDEX}/{LEGACY_CUDA} (docs/training.md, 'GPU setup'), or train on a newer GPU "
        "(compute capability 7.5 or more: T4, RTX 20xx and later)."
    )


def device_name(device):
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    if device.type == "mps":
        return f"Apple {platform.machine()} GPU (MPS)"
    native = [name for name in ("avx512_bf16", "amx_bf16") if _cpu_capabilities().get(name)]
    features = ", ".join(native) or "no native bf16"
    model = cpu_model()
    model += "" if "cpu" in model.lower() else " CPU"
    return f"{model} ({platform.machine()}, {features}), {usable_cpus()} cores, {torch.get_num_threads()} torch threads"


def cpu_model():
    """The CPU's model name, as /proc/cpuinfo gives it on Linux (machines differ: every figure names its own), else
    as the platform module does."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace", encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------- precision and layout


def cpu_has_native_bf16():
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast trains about twice as
    fast as fp32; elsewhere it is emulated and slower."""
    capabilities = _cpu_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _cpu_capabilities():
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def autocast_dtype(device, enabled=True):
    """The AMP setting on a device: bf16 on GPUs from Ampere on (no loss scaling needed); fp16 (with GradScaler) on
    older GPUs, where torch.cuda.is_bf16_supported() counts bf16 that runs emulated and slowly; bf16 on CPUs with
    native bf16; None (full precision) elsewhere (MPS included), and when disabled."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= BF16_CAPABILITY else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def dtype_name(dtype):
    """'bf16', 'fp16' or 'fp32': how a checkpoint records what trained it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def use_channels_last(device, enabled=True):
    """NHWC where it is faster: CUDA (tensor cores) and the CPU (oneDNN: 1.2x in fp32, more under bf16)."""
    return enabled and device.type in ("cuda", "cpu")


def compile_support(device):
    """(True, "") where torch.compile can compile for this device, else (False, why): on a GPU it needs Triton,
    which exists for Linux only; on a Windows CPU it needs the MSVC compiler (cl.exe) on the PATH."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        where = "Windows" if platform.system() == "Windows" else "this installation"
        return False, f"torch.compile needs Triton for CUDA, which is not installed (none is published for {where})"
    if device.type == "cpu" and platform.system() == "Windows" and shutil.which("cl") is None:
        return False, "torch.compile on a Windows CPU needs the MSVC compiler (cl.exe) on the PATH"
    if device.type == "mps":
        return False, "torch.compile does not yet train reliably on Apple MPS"
    return True, ""


# ----------------------------------------------------------------------------- CPUs and workers


# ----------------------------------------------------------------------------- random state and waiting


def rng_state(device):
    """The random-number state of the CPU and of the device (CUDA and MPS draw dropout masks from their own
    generators), as CPU tensors a weights-only checkpoint can hold."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    """Restore rng_state(device)'s states; a device state saved on another kind of device is left alone."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"].cpu())


def synchronize(device):
    """Wait until the device has finished its queued work (timings are honest only after it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(function, device):
    """Seconds of function(), from an idle device to an idle device."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started
