"""Configuration: the checkpoint's architecture (`ModelConfig`) and the serving settings (`EngineConfig`).

`EngineConfig` field names are the seed's FastDeploy flags with dashes as underscores, so that a Triton
`config.pbtxt` parameter, a keyword argument of the offline `LLM` and a flag all mean the same thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# transformers' rope scaling types (modeling_rope_utils.ROPE_INIT_FUNCTIONS); RotaryEmbedding implements none.
SCALED_ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3", "proportional")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters read from a checkpoint's config.json (both key styles)."""

    architecture: str = "Ernie4_5ForCausalLM"
    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    use_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0
    # Mixture of experts (Ernie4_5_MoeForCausalLM); moe_num_experts == 0 means dense.
    moe_num_experts: int | list[int] = 0  # ERNIE-4.5-VL -Paddle: [text, vision]
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    moe_use_aux_free: bool = False
    # Everything else in config.json (vision_config, mrope settings, ...) for the architectures needing it.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        raw = dict(raw)
        # Multimodal configs saved by transformers nest the language model's keys under text_config
        # (checkpoints as shipped keep them flat); outer keys (architectures, tie_word_embeddings) win.
        if isinstance(raw.get("text_config"), dict):
            raw = {**raw.pop("text_config"), **raw}
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or rope.get("type")
        if rope_type in SCALED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} (rope scaling) is not supported: ERNIE-4.5 uses plain rotary "
                "positions up to max_position_embeddings, and ignoring the scaling would serve wrong logits"
            )
        if "rope_theta" not in raw and "rope_theta" in rope:
            raw["rope_theta"] = rope["rope_theta"]
        archs = raw.get("architectures") or [cls.architecture]
        raw["architecture"] = archs[0]
        if raw.get("head_dim") is None:
            raw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        if raw.get("num_key_value_heads") is None:
            raw["num_key_value_heads"] = raw["num_attention_heads"]
        # transformers' Ernie4_5_MoeConfig saves the -Paddle keys (moe_num_experts, moe_k, ...) but exposes
        # num_experts / num_experts_per_tok as aliases; accept those spellings too.
        aliases = {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"}
        for src, dst in aliases.items():
            if src in raw and dst not in raw:
                raw[dst] = raw[src]
        if isinstance(raw.get("moe_intermediate_size"), list):  # VL: [text, vision]
            raw.setdefault("extra", {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names and v is not None}
        extra = {k: v for k, v in raw.items() if k not in names}
        config = cls(**known, extra=extra)
        if config.hidden_act != "silu":  # the MLPs (layers/activation.py) compute SiLU, as every ERNIE-4.5
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (ERNIE-4.5 uses silu)")
        if config.moe_layer_end_index == -1:
            config.moe_layer_end_index = config.num_hidden_layers - 1
        return config

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint folder {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))

    @property
    def is_moe(self) -> bool:
        # ERNIE-4.5-VL -Paddle configs give [text, vision] expert counts.
        experts = self.moe_num_experts
        return max(experts) > 0 if isinstance(experts, list) else experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        # As ERNIE's own code and transformers place them: the interval counts from layer 0, not from the
        # start index (start 1, interval 2 -> layers 1, 3, 5, ...; start 2, interval 2 -> 3, 5, ...).
        return (
            self.is_moe
            and self.moe_layer_start_index <= layer_idx <= self.moe_layer_end_index
            and (layer_idx + 1) % self.moe_layer_interval == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, list) else [eos]


def _parse_value(text: str, kind: type) -> Any:
    """Parse one config.pbtxt string parameter into the field's type."""
    text = text.strip()
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean (true / false), got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise ValueError(f"expected {expected}, got {text!r}") from None
    if kind is dict:
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"expected a JSON object, got {text!r} ({err})") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {text!r}")
        return value
    return text


def _typed(value: Any, kind: type) -> Any:
    """`value` as the field's type: strings parsed as in config.pbtxt (so `LLM(..., enable_prefix_caching=
    "false")` means false, not a truthy string); other types must already match (an int is a float)."""
    if isinstance(value, str) and kind is not str:
        return _parse_value(value, kind)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind in (str, bool, dict) and isinstance(value, kind):
        return value
    raise ValueError(f"expected {kind.__name__}, got {value!r} ({type(value).__name__})")


_KINDS = {"int": int, "float": float, "bool": bool, "dict": dict, "str": str}
LOAD_CHOICES = ("default", "default_v1")  # FastDeploy's loaders; both read checkpoints the same way here
MM_MODALITIES = ("image", "video")
MM_SETTINGS = ("enable_mm", "mm_processor_kwargs", "limit_mm_per_prompt")  # multimodal checkpoints only
# Settings that must be >= 1, and >= 0 (0: derived, see the field comments).
_POSITIVE = ("tensor_parallel_size", "max_num_seqs", "block_size", "kv_cache_max_host_bytes")
_NON_NEGATIVE = (
    "max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes", "num_gpu_blocks_override",
)
_FRACTIONS = ("gpu_memory_utilization", "kv_cache_host_fraction")  # in (0, 1]


def _check_mm_settings(config: EngineConfig) -> None:
    for modality, limit in config.limit_mm_per_prompt.items():
        if modality not in MM_MODALITIES:
            known = ", ".join(MM_MODALITIES)
            raise ValueError(f"limit_mm_per_prompt: unknown modality {modality!r}; known: {known}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit_mm_per_prompt: {modality!r} must be a count >= 0, got {limit!r}")
    for key, value in config.mm_processor_kwargs.items():  # names are checked by the processor
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"mm_processor_kwargs: {key!r} must be a positive number, got {value!r}")


def device_ids(devices: str) -> list[str]:
    """The ids of a `devices` list ("0,1,2,3"); ValueError for anything but distinct non-negative ints."""
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not all(d.isdigit() for d in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"devices {devices!r} must list distinct device numbers, e.g. '0,1,2,3'")
    return ids


def check_checkpoint_folder(model_dir: Path) -> None:
    """The files every checkpoint needs, all missing ones named at once (weights: the loader checks them)."""
    missing = [name for name in ("config.json", "tokenizer.model") if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {model_dir.resolve()} lacks {' and '.join(missing)}")


@dataclass
class EngineConfig:
    """Serving settings; names follow the seed's FastDeploy flags (dashes as underscores)."""

    model: str = ""
    tensor_parallel_size: int = 1
    max_model_len: int = 0  # 0: the checkpoint's max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 0  # 0: max(2048, max_model_len) when chunked prefill is off, else 2048
    block_size: int = 64
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int = 0  # CPU budget for the KV cache; 0: a fraction of free host memory
    num_gpu_blocks_override: int = 0  # tests: an exact number of KV blocks
    # CPU KV sizing without kv_cache_memory_bytes: gpu_memory_utilization of this share of MemAvailable
    # (read after the weights are loaded), capped at kv_cache_max_host_bytes but never below one sequence
    # of max_model_len.
    kv_cache_host_fraction: float = 0.5
    kv_cache_max_host_bytes: int = 1 << 30
    quantization: str = ""  # "", "wint8", "wint4", "w4a8"
    kv_cache_dtype: str = ""  # "" (the model's: bf16 for bf16 weights), "float32", "bfloat16", "int8" (C8)
    quantize_lm_head: bool = False  # the LM head too, with `quantization`'s method (layers/quant/config.py)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enable_max_prefill: bool = False  # FastDeploy's FD_ENABLE_MAX_PREFILL
    devices: str = ""  # XPU_VISIBLE_DEVICES of the row, e.g. "0,1,2,3"
    load_choices: str = "default"
    reasoning_parser: str = ""
    tool_call_parser: str = ""
    enable_mm: bool = False
    mm_processor_kwargs: dict = field(default_factory=dict)
    limit_mm_per_prompt: dict = field(default_factory=dict)
    media_root: str = ""  # local image/video files are read only under this folder
    allowed_media_hosts: str = ""  # comma-separated hosts for http(s) media downloads; empty: downloads off
    seed: int = 0
    dtype: str = "auto"  # "auto": fp32 on CPU, bf16 on XPU
    logprobs_mode: str = "raw_logprobs"  # what logprobs report: sampler.LOGPROBS_MODES

    def __post_init__(self) -> None:
        """Types and ranges, each error naming the parameter and its value (checked before any loading)."""
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, _typed(getattr(self, f.name), _KINDS[str(f.type)]))
            except ValueError as err:
                raise ValueError(f"model parameter {f.name!r}: {err}") from None
        self._check_ranges()
        if self.load_choices not in LOAD_CHOICES:
            raise ValueError(f"load_choices {self.load_choices!r} is not one of {', '.join(LOAD_CHOICES)}")
        ids = device_ids(self.devices)
        if ids and len(ids) < self.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs as many devices; "
                             f"devices {self.devices!r} lists {len(ids)}")
        if self.media_root and not Path(self.media_root).is_dir():
            raise ValueError(f"media_root {self.media_root!r} is not a folder")
        _check_mm_settings(self)

    def _check_ranges(self) -> None:
        for name in _POSITIVE + _NON_NEGATIVE:
            low = 1 if name in _POSITIVE else 0
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in _FRACTIONS:
            if not 0 < getattr(self, name) <= 1:  # also refuses nan
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    @classmethod
    def from_parameters(cls, params: dict[str, str], **overrides: Any) -> EngineConfig:
        """Build from config.pbtxt `parameters` (string values); unknown keys are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, text in params.items():
            name = key.replace("-", "_")
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown model parameter {key!r}; {hint}known: {', '.join(sorted(names))}")
            if name in kwargs:
                raise ValueError(f"model parameter {name!r} is given twice (dashes and underscores)")
            kwargs[name] = text
        return cls(**{**kwargs, **overrides})

    def resolve_model_path(self) -> Path:
        """`model` is a path, or a hub id looked up in the ERNIE_MODEL_ROOT folders (`:`-separated, as PATH:
        a root for the big checkpoints and the repository's own checkpoints, say)."""
        if not self.model.strip():  # Path("") is the working directory
            raise ValueError("model parameter 'model' is required: a checkpoint folder or a hub id")
        candidate = Path(os.path.expandvars(os.path.expanduser(self.model)))
        roots = [] if candidate.is_absolute() else os.environ.get("ERNIE_MODEL_ROOT", "").split(os.pathsep)
        looked = [candidate] + [Path(root) / self.model for root in roots if root]
        found = next((path for path in looked if path.is_dir()), None)
        if found is None:
            raise FileNotFoundError(
                f"checkpoint {self.model!r} not found (looked in: {', '.join(map(str, looked))}; set "
                "ERNIE_MODEL_ROOT to the folders holding hub ids). It must hold config.json, "
                "model*.safetensors and tokenizer.model."
            )
        return found
