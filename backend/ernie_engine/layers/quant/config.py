"""Choosing the quantization method(s) from the engine flags and the checkpoint's `quantization_config`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...config import EngineConfig, ModelConfig

logger = logging.getLogger(__name__)

VALID_METHODS = ("wint8", "wint4", "w4a8")
VALID_KV_CACHE_DTYPES = ("", "auto", "float32", "bfloat16", "int8")
DEFAULT_GROUP_SIZE = 128  # wint4: group-wise scales keep accuracy at ~0.13x of fp32 bytes
# A Linear is quantized when its parameter path ends with one of these; everything else keeps its dtype.
QUANTIZED_SUFFIXES = (
    "qkv_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "up_gate_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_SKIPPED_SCOPES = ("vision", "resampler", "mlp_AR", "lm_head", "embed")


def normalize_method(name: str | None) -> str:
    """Canonical method name ("" for none); an unknown name fails listing the valid ones."""
    key = (name or "").strip().lower()
    if key in ("", "none"):
        return ""
    if key == "w4a8c8":
        return "w4a8"
    if key not in VALID_METHODS:
        valid = ", ".join(repr(m) for m in ("",) + VALID_METHODS)
        raise ValueError(f"unknown quantization {name!r}; valid: {valid} (case-insensitive, also 'W4A8C8')")
    return key


@dataclass(frozen=True)
class QuantConfig:
    """Which parts of the model are quantized, and how."""

    dense_method: str = ""  # attention projections, dense MLPs, shared experts
    moe_method: str = ""  # routed experts' stacked weights
    kv_cache_int8: bool = False
    prequantized: bool = False  # the checkpoint already holds int weights + scales
    group_size: int = DEFAULT_GROUP_SIZE  # wint4 only; wint8 and w4a8 are per channel
    # The LM head too, with the dense method (tied: a quantized copy of the embedding table). Off as in
    # FastDeploy; llama.cpp's q8_0 quantizes it. For a small model it is a large share of each step's bytes.
    lm_head: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.dense_method or self.moe_method)

    @classmethod
    def of_engine(cls, engine: EngineConfig, model: ModelConfig) -> QuantConfig:
        """The engine's flags for this checkpoint (its config.json's `quantization_config`)."""
        return cls.build(engine.quantization, engine.kv_cache_dtype, model.extra.get("quantization_config"),
                         lm_head=engine.quantize_lm_head)

    @classmethod
    def build(
        cls,
        quantization: str = "",
        kv_cache_dtype: str = "",
        checkpoint: dict[str, Any] | None = None,
        lm_head: bool = False,
    ) -> QuantConfig:
        """From the engine flags and the checkpoint's `quantization_config` (which wins if it names types)."""
        method = normalize_method(quantization)
        kv_dtype = (kv_cache_dtype or "").strip().lower()
        if kv_dtype not in VALID_KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; valid: {VALID_KV_CACHE_DTYPES}")
        kv_int8 = kv_dtype == "int8" or (quantization or "").strip().lower() == "w4a8c8"
        ckpt = checkpoint or {}
        dense, moe = method, method
        if ckpt:
            base = normalize_method(
                ckpt.get("quantization") if ckpt.get("quantization") != "mix_quant" else ""
            )
            dense = normalize_method(ckpt.get("dense_quant_type", base)) or dense
            moe = normalize_method(ckpt.get("moe_quant_type", base)) or moe
            kv_int8 = kv_int8 or str(ckpt.get("kv_cache_quant_type", "")).lower() == "int8"
            if method and method not in (dense, moe):
                logger.warning(
                    "quantization=%r differs from the checkpoint's (%s/%s); using the checkpoint's",
                    method,
                    dense,
                    moe,
                )
        if lm_head and not dense:
            raise ValueError("quantize_lm_head needs a weight quantization method (wint8, wint4 or w4a8)")
        config = cls(dense, moe, kv_int8, bool(ckpt.get("is_quantized", False)), lm_head=lm_head)
        if config.enabled or kv_int8:
            logger.info(
                "quantization: dense=%s moe=%s kv_cache=%s prequantized=%s lm_head=%s",
                dense or "none",
                moe or "none",
                "int8" if kv_int8 else "model dtype",
                config.prequantized,
                dense if lm_head else "model dtype",
            )
        return config

    def method_for(self, param_path: str, is_expert: bool = False) -> str:
        """Method for the Linear at `param_path` ("" keeps it in the model dtype)."""
        if is_expert:
            return self.moe_method
        name = param_path.removesuffix(".weight")
        if name == "lm_head" and self.lm_head:
            return self.dense_method
        if any(scope in name for scope in _SKIPPED_SCOPES) or not name.endswith(QUANTIZED_SUFFIXES):
            return ""
        return self.dense_method
