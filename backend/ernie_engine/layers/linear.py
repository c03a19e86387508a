"""Linear layer with Paddle's weight orientation; quantized variants (wint8/wint4/w4a8) plug in here."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

from . import cpu_kernels
from .quant.weights import quantized_linear

# Weights are filled by the loader; zeros are cheaper to create than a random init of a 100M-parameter table.
ZEROS = nn.initializer.Constant(0.0)


class Linear(nn.Layer):
    """y = x @ weight + bias, weight stored [in_features, out_features] (the -Paddle checkpoint layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = self.create_parameter([in_features, out_features], default_initializer=ZEROS)
        self.bias = (
            self.create_parameter([out_features], is_bias=True, default_initializer=ZEROS) if bias else None
        )
        # Set by layers/quant/apply.py: `weight` is then an int8 buffer with a `weight_scale` beside it.
        self.quant_method = ""
        self.quant_device_layout = False
        # Set by cpu_kernels.prepare_model on CPU: the weight format a custom op runs ("" = Paddle path).
        self.cpu_kernel = ""
        self.kernel_dims: dict[str, tuple[int, int]] = {}  # the repacked weight's (out, in), by name
        # Set by distributed/sharding.py on row-parallel layers: each rank holds a slice of the input row, so
        # W4A8's per-token activation scale is reduced over the ranks.
        self.input_sharded = False

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.cpu_kernel:
            return cpu_kernels.linear(self, x)
        if self.quant_method:
            return quantized_linear(self, x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
