"""The one place that picks the compute device and the default dtype.

Kunlunxin XPU when this Paddle build has XPU support and sees a device (Paddle itself honours
`XPU_VISIBLE_DEVICES`); CPU otherwise. CPU computes in float32 because Paddle has no bf16 CPU kernels for
matmul/softmax/silu (bf16 is storage only there); XPU computes in bfloat16. On CPU, bfloat16 is a storage
choice for Linear weights that the custom kernels (layers/cpu_kernels.py) multiply directly: see
`cpu_weight_dtype`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import paddle

logger = logging.getLogger(__name__)

_DTYPES = {"float32", "bfloat16", "float16"}
_CPU_DTYPES = {"float32"}
# Paddle's MKL and OpenMP read these when they first run (the first matmul, not `import paddle`), so
# `set_device` sets them early enough; values already in the environment win.
_CPU_MATH_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",  # idle OpenMP threads sleep instead of spinning: cores are shared
}
_AMD_CPU_MATH_ENV = {
    "MKL_DEBUG_CPU_TYPE": "5",  # MKL's AVX2 kernels on AMD CPUs (its default path there is ~2.5x slower)
}


def xpu_available() -> bool:
    """True when Paddle was built with XPU support and at least one XPU is visible."""
    if not paddle.is_compiled_with_xpu():
        return False
    if os.environ.get("XPU_VISIBLE_DEVICES", None) == "":
        return False  # explicitly hidden
    return paddle.device.xpu.device_count() > 0


def default_device() -> str:
    return "xpu" if xpu_available() else "cpu"


def device_type(device: str) -> str:
    """The device kind: "xpu:1" -> "xpu"."""
    return device.split(":", 1)[0]


def default_dtype(device: str) -> str:
    return "bfloat16" if device_type(device) == "xpu" else "float32"


def resolve_dtype(dtype: str | None, device: str) -> str:
    """`None`/"auto" -> the device's default; otherwise check the dtype can compute on the device."""
    if dtype in (None, "", "auto"):
        return default_dtype(device)
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)} or 'auto'")
    if device_type(device) == "cpu" and dtype == "bfloat16":
        return "float32"  # bf16 weights, fp32 compute: cpu_weight_dtype decides whether weights stay bf16
    if device_type(device) == "cpu" and dtype not in _CPU_DTYPES:
        raise ValueError(f"dtype {dtype!r} cannot compute on CPU (Paddle lacks CPU kernels); use float32")
    return dtype


def cpu_weight_dtype(dtype: str | None, checkpoint_dtype: str) -> str:
    """Storage dtype of float Linear weights on CPU (compute stays float32): "bfloat16" or "float32".

    bf16 halves what every decode step streams, but only the custom kernels can multiply by it.
    "bfloat16" asks for it (float32 with a warning when the kernels are unavailable); "auto" picks it when
    the kernels run and the checkpoint is bf16, so that keeping bf16 loses nothing; "float32" never does.
    """
    from .layers import cpu_kernels

    if dtype not in (None, "", "auto", "bfloat16"):
        return "float32"
    if not cpu_kernels.available():
        if dtype == "bfloat16":
            logger.warning("dtype bfloat16 on CPU needs the custom CPU kernels; keeping float32 weights")
        return "float32"
    if dtype == "bfloat16" or str(checkpoint_dtype).removeprefix("paddle.") == "bfloat16":
        return "bfloat16"
    return "float32"


def kv_cache_dtype(requested: str, dtype: str | None, device: str, checkpoint_dtype: str) -> str:
    """The float KV cache's dtype: `requested` when it names one ("float32", "bfloat16"), else the model's,
    as vLLM and FastDeploy keep it. On CPU that is the Linear weights' storage dtype (`cpu_weight_dtype`):
    bf16 caches halve what attention reads, and the kernels widen them to fp32 as they gather."""
    if device_type(device) != "cpu":
        return requested if requested in ("float32", "bfloat16") else resolve_dtype(dtype, device)
    from .layers import cpu_kernels

    if requested == "bfloat16" and not cpu_kernels.available():
        logger.warning("kv_cache_dtype bfloat16 on CPU needs the custom CPU kernels; keeping a float32 cache")
        return "float32"
    return requested if requested in ("float32", "bfloat16") else cpu_weight_dtype(dtype, checkpoint_dtype)


def _amd_cpu() -> bool:
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def set_cpu_math_env() -> None:
    """Environment for Paddle's CPU math libraries (MKL's CPU type must not be forced on Intel CPUs)."""
    settings = _CPU_MATH_ENV | (_AMD_CPU_MATH_ENV if _amd_cpu() else {})
    for key, value in settings.items():
        os.environ.setdefault(key, value)


# glibc hands large freed blocks back to the kernel (mmap'd ones at once, the heap's top past a trim
# threshold), so every prefill step touches its activations' pages afresh: 160-520k page faults and
# 0.5-1.3 s of system time for a 2048-token step (~15-25 % of its wall time). Serving from memory already
# touched, as vLLM-CPU does by preloading tcmalloc, leaves almost none. Set once the weights and the KV cache
# are in place, so that loading's temporaries still go back to the kernel.
_MALLOC_OPTIONS = {
    -1: 1 << 30,  # M_TRIM_THRESHOLD: keep up to 1 GiB free at the top of a heap
    -4: 0,  # M_MMAP_MAX: no block gets its own mapping (a thread's block past 64 MiB still does)
}


def keep_freed_memory() -> None:
    """Make glibc's malloc reuse freed memory (see _MALLOC_OPTIONS); a no-op on other C libraries."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for option, value in _MALLOC_OPTIONS.items():
        if not mallopt(option, value):
            logger.warning("mallopt(%d, %d) was refused: prefill steps will page-fault more", option, value)


def device_tensor(array: np.typing.ArrayLike) -> paddle.Tensor:
    """`paddle.to_tensor(array)` on the current device, without its leak: Paddle 3.3.1 keeps a Python list for
    every tensor it builds from host data (~1 KB per engine step, for as long as the server runs)."""
    array = np.asarray(array)
    tensor = paddle.empty(array.shape, dtype=array.dtype)
    tensor.set_value(array)
    return tensor


def set_device(device: str | None = None) -> str:
    """Make `device` (default: `default_device()`) Paddle's current device and return its name."""
    device = device or default_device()
    if device_type(device) not in ("cpu", "xpu"):
        raise ValueError(f"unsupported device {device!r}; expected 'cpu' or 'xpu[:N]'")
    if device_type(device) == "xpu" and not xpu_available():
        raise ValueError(f"device {device!r} requested but no XPU is visible to this Paddle build")
    if device_type(device) == "cpu":
        set_cpu_math_env()
    paddle.set_device(device)
    logger.info("paddle device: %s", device)
    return device
