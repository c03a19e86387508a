"""ERNIE-4.5 mixture of experts: a top-k router with an aux-free correction bias, routed SwiGLU experts,
and shared experts that every token passes through.

Routing (per token, in fp32): p = softmax(x @ W_gate); the experts are the top-k of p + b, where the
correction bias b only balances the selection; the chosen un-biased p are renormalised by their sum
(clamped at `norm_min`) and weight the experts' outputs.

The experts of a layer are stored stacked ([E, h, 2I] gate half first, [E, I, h]) so that a step runs
grouped: token slots are sorted by expert, each active expert does one matmul over its rows, and the
weighted rows are added back to their tokens. Idle experts cost nothing. On CPU, `cpu_kernels.prepare_model`
repacks the stacked weights for the custom kernels (bf16 for bf16 checkpoints, int8 / int4 when quantized) and
each expert's matmuls run on them; fp32 weights, XPU and CPUs without the kernels keep Paddle's matmul.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

from ..device import device_type
from . import cpu_kernels
from .activation import swiglu
from .linear import ZEROS
from .quant.weights import quantized_expert_matmul


def _on_xpu() -> bool:
    return device_type(paddle.get_device()) == "xpu"


class TopKRouter(nn.Layer):
    """Chooses `top_k` of `num_experts` experts per token and their mixing weights."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_min = norm_min
        # Kept in fp32 whatever the model dtype: routing decisions are sensitive to rounding.
        self.weight = self.create_parameter(
            [hidden_size, num_experts], dtype="float32", default_initializer=ZEROS
        )  # [in, out]

    def forward(
        self, x: paddle.Tensor, correction_bias: paddle.Tensor
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """x [T, h], correction_bias [1, E] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
        probs = F.softmax(paddle.matmul(x.astype("float32"), self.weight), axis=-1)
        # The bias steers which experts are chosen, never how much they count.
        _, expert_ids = paddle.topk(probs + correction_bias, self.top_k, axis=-1)
        weights = paddle.take_along_axis(probs, expert_ids, axis=-1)
        weights = weights / paddle.clip(weights.sum(axis=-1, keepdim=True), min=self.norm_min)
        return weights, expert_ids


class MoeStatics(nn.Layer):
    """Holds the aux-free load-balancing bias (named as the checkpoints name it: `moe_statics`)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = self.create_parameter(
            [1, num_experts], dtype="float32", default_initializer=ZEROS
        )


class GroupedExperts(nn.Layer):
    """`num_experts` SwiGLU experts with stacked weights, run grouped by expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.up_gate_proj = self.create_parameter(
            [num_experts, hidden_size, 2 * intermediate_size], default_initializer=ZEROS
        )
        self.down_proj = self.create_parameter(
            [num_experts, intermediate_size, hidden_size], default_initializer=ZEROS
        )
        self.quant_method = ""  # set by layers/quant/apply.py: the stacked weights are then int8 buffers
        self.input_sharded = False  # set by distributed/sharding.py: down_proj's input is a slice per rank
        # Set by cpu_kernels.prepare_model on CPU: the stacked weights are then in the custom ops' format per
        # expert (packed bf16 or the quant method's [E, out, in] int layout; `kernel_dims`: each weight's
        # (out, in)) and each expert's matmuls run on them.
        self.cpu_kernel = ""
        self.kernel_dims: dict[str, tuple[int, int]] = {}

    def forward(self, x: paddle.Tensor, weights: paddle.Tensor, expert_ids: paddle.Tensor) -> paddle.Tensor:
        """x [T, h], weights / expert_ids [T, k] -> sum over k of weight * expert(x), [T, h]."""
        num_tokens, top_k = expert_ids.shape
        if num_tokens == 0:
            return paddle.zeros_like(x)
        flat_ids = expert_ids.reshape([-1])
        # Slot s = token * k + j; sorting slots by expert makes each expert's rows contiguous.
        order = paddle.argsort(flat_ids, stable=True)
        # One host sync per layer: the segment sizes decide the matmul shapes.
        counts = paddle.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // top_k  # the token behind each sorted slot
        rows = paddle.gather(x, token_of)
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            outputs.append(self.expert_forward(expert, rows[start : start + count]))
            start += count
        expert_out = paddle.concat(outputs)  # [T * k, h] in expert order
        if _on_xpu():
            return _xpu_combine(expert_out, weights, order, num_tokens, top_k)
        slot_weights = paddle.gather(weights.reshape([-1]), order).unsqueeze(-1).astype(x.dtype)
        return paddle.index_add(paddle.zeros_like(x), token_of, 0, expert_out * slot_weights)

    def expert_forward(self, expert: int, x: paddle.Tensor) -> paddle.Tensor:
        up_gate = self.expert_matmul("up_gate_proj", expert, x)
        return self.expert_matmul("down_proj", expert, swiglu(up_gate))

    def expert_matmul(self, name: str, expert: int, x: paddle.Tensor) -> paddle.Tensor:
        """x [rows, in] @ this expert's `name` weight -> [rows, out], on the path its storage calls for."""
        if self.cpu_kernel:
            scale = getattr(self, f"{name}_scale")[expert] if self.quant_method else None
            sharded = name == "down_proj" and self.input_sharded
            weight, n = getattr(self, name)[expert], self.kernel_dims[name][0]
            return cpu_kernels.matmul(x, self.cpu_kernel, weight, n, scale, None, sharded)
        if self.quant_method:
            return quantized_expert_matmul(self, name, expert, x)
        return paddle.matmul(x, getattr(self, name)[expert])


def _xpu_combine(
    expert_out: paddle.Tensor, weights: paddle.Tensor, order: paddle.Tensor, num_tokens: int, top_k: int
) -> paddle.Tensor:
    """paddlepaddle-xpu's fused combine: y[t] = sum_j weights[t, j] * expert_out[index[t, j]]."""
    from paddle.incubate.nn.functional import moe_combine

    # index[t, j] = where slot t * k + j landed after sorting (the inverse permutation).
    index = paddle.argsort(order).astype("int32").reshape([num_tokens, top_k])
    return moe_combine(expert_out, weights.astype(expert_out.dtype), index)


class SparseMoeBlock(nn.Layer):
    """Router + routed experts + optional shared experts; the MLP of an ERNIE-4.5 MoE decoder layer."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        norm_min: float,
        shared_experts: nn.Layer | None,
    ) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, norm_min)
        self.moe_statics = MoeStatics(num_experts)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_experts = shared_experts

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """x [T, h] -> [T, h]."""
        weights, expert_ids = self.gate(x, self.moe_statics.e_score_correction_bias)
        out = self.experts(x, weights, expert_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
