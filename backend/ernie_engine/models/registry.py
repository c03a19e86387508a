"""Maps a checkpoint's `architectures[0]` to the model class that serves it."""

from __future__ import annotations

from paddle import nn

from .ernie4_5 import Ernie4_5ForCausalLM
from .ernie4_5_moe import Ernie4_5_MoeForCausalLM
from .ernie4_5_vl import Ernie4_5_VLMoeForConditionalGeneration
from .paddleocr_vl import PaddleOCRVLForConditionalGeneration

# -PT/transformers checkpoints say "Ernie4_5ForCausalLM", -Paddle ones "Ernie4_5_ForCausalLM".
MODEL_REGISTRY: dict[str, type[nn.Layer]] = {
    "Ernie4_5ForCausalLM": Ernie4_5ForCausalLM,
    "Ernie4_5_ForCausalLM": Ernie4_5ForCausalLM,
    # Both layouts of the MoE models (21B-A3B, 300B-A47B) use one name.
    "Ernie4_5_MoeForCausalLM": Ernie4_5_MoeForCausalLM,
    "PaddleOCRVLForConditionalGeneration": PaddleOCRVLForConditionalGeneration,
    # ERNIE-4.5-VL (-PT / transformers and -Paddle checkpoints use one name).
    "Ernie4_5_VLMoeForConditionalGeneration": Ernie4_5_VLMoeForConditionalGeneration,
}


def get_model_class(architecture: str) -> type[nn.Layer]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
