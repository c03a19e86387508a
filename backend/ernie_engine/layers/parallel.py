"""Tensor-parallel layer pieces (Megatron): vocab-parallel embedding and logits, row-parallel reductions.

- Column-parallel projections (q/k/v, gate/up, the LM head) are plain `Linear`s holding this rank's output
  columns: their outputs stay sharded (this rank's heads / intermediate slice / vocab slice), no collective.
- Row-parallel projections (o_proj, down_proj, and a MoE block's experts) hold this rank's input rows, so
  their outputs are partial sums. `reduce_output` all-reduces the output of the layer that produces them
  (a decoder layer's attention and its MLP or MoE block): one all-reduce each, after the MoE block has
  combined its routed and shared experts. Keeping these as hooks leaves parameter names, quantization and
  the CPU kernels exactly as in the single-device model. A row-parallel bias counts once: only rank 0
  keeps it (see distributed/sharding.py).
- The embedding table is split by vocabulary rows: each rank looks up the ids it holds, zeros for the rest,
  and the all-reduce assembles full embeddings. Logits are computed per vocab slice and gathered.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

from ..distributed import parallel_state
from .linear import ZEROS


def _reduce_hook(layer: nn.Layer, inputs: tuple, output: paddle.Tensor) -> paddle.Tensor:
    return parallel_state.all_reduce(output)


def reduce_output(layer: nn.Layer) -> None:
    """Sum `layer`'s output over the ranks after every forward (its output is a partial sum)."""
    layer.register_forward_post_hook(_reduce_hook)


class VocabParallelEmbedding(nn.Layer):
    """Rows [vocab_start, vocab_end) of the embedding table; the lookup is all-reduced over the ranks."""

    def __init__(self, vocab_start: int, vocab_end: int, hidden_size: int, dtype: str | paddle.dtype) -> None:
        super().__init__()
        self.vocab_start = vocab_start
        self.vocab_end = vocab_end
        self.weight = self.create_parameter(
            [vocab_end - vocab_start, hidden_size], dtype=dtype, default_initializer=ZEROS
        )

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        held = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = paddle.where(held, input_ids - self.vocab_start, paddle.zeros_like(input_ids))
        out = F.embedding(local_ids, self.weight) * held.unsqueeze(-1).astype(self.weight.dtype)
        return parallel_state.all_reduce(out)

    def extra_repr(self) -> str:
        return f"vocab=[{self.vocab_start}, {self.vocab_end}), hidden={self.weight.shape[1]}"


def gather_vocab_logits(local_logits: paddle.Tensor, shard_size: int, vocab_size: int) -> paddle.Tensor:
    """Per-rank logits [N, own vocab slice] -> full logits [N, vocab_size] on every rank.

    Slices are `shard_size` wide except possibly the last rank's; it is padded so all gathered parts match.
    """
    pad = shard_size - local_logits.shape[-1]
    if pad:
        filler = paddle.full([local_logits.shape[0], pad], float("-inf"), dtype=local_logits.dtype)
        local_logits = paddle.concat([local_logits, filler], axis=-1)
    return parallel_state.all_gather_last_axis(local_logits)[:, :vocab_size]
