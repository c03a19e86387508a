"""SwiGLU, the ERNIE MLPs' activation: a CPU custom op for fp32 activations (layers/cpu_kernels), else
Paddle's fused op (XPU, or no kernels)."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from . import cpu_kernels


def swiglu(x: paddle.Tensor) -> paddle.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I] (gate half first, as the fused projections store it)."""
    if cpu_kernels.fp32_supported(x):
        return cpu_kernels.swiglu(x)
    return F.swiglu(x)
