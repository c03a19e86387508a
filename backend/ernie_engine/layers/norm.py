"""RMSNorm: a CPU custom op for fp32 activations (layers/cpu_kernels), else plain Paddle ops (`F.rms_norm` has
no CPU kernel in Paddle 3.3).

Given a `residual`, the norm first adds it (vLLM's fused_add_rms_norm): the decoder layers pass their residual
stream along instead of adding it themselves, so on CPU each add rides in the norm's op.
"""

from __future__ import annotations

import paddle
from paddle import nn

from . import cpu_kernels


class RMSNorm(nn.Layer):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(
        self, x: paddle.Tensor, residual: paddle.Tensor | None = None
    ) -> paddle.Tensor | tuple[paddle.Tensor, paddle.Tensor]:
        """RMSNorm(x); with `residual`: (RMSNorm(x + residual), x + residual)."""
        if residual is None:
            if cpu_kernels.fp32_supported(x, self.weight):
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            return self._paddle_norm(x)
        if cpu_kernels.fp32_supported(x, residual, self.weight):
            return cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)
        total = x + residual
        return self._paddle_norm(total), total

    def _paddle_norm(self, x: paddle.Tensor) -> paddle.Tensor:
        # Statistics in float32 whatever the compute dtype (as the reference does for bf16).
        x32 = x.astype("float32")
        normed = x32 * paddle.rsqrt(x32.pow(2).mean(axis=-1, keepdim=True) + self.eps)
        return self.weight * normed.astype(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
