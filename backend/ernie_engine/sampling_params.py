"""Per-request sampling settings: the keys of Triton's `sampling_parameters` JSON and of OpenAI requests."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# What an unset model-defaultable field means when the checkpoint has no generation_config.json value.
NEUTRAL_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}

_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "truncate_prompt_tokens", "logprobs",
               "prompt_logprobs", "reasoning_max_tokens")


@dataclass
class SamplingParams:
    n: int = 1
    # None: the checkpoint's generation_config.json value, else the neutral value in NEUTRAL_DEFAULTS.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: off
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    bad_words: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    allowed_token_ids: list[int] | None = None  # vLLM's: only these may be sampled
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the last k prompt tokens (-1: as many as fit)
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob plus the top k
    skip_special_tokens: bool = True
    reasoning_max_tokens: int | None = None
    # Structured output (one at most): a JSON schema, "json_object", a regex, a choice list or a grammar.
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_json_object: bool = False
    # vLLM's object form of the above (StructuredOutputsParams; `guided_decoding` before vLLM 0.11), as
    # Triton's vLLM backend takes it in sampling_parameters: an object or its JSON text, folded into guided_*.
    structured_outputs: dict | str | None = None
    guided_decoding: dict | str | None = None

    def __post_init__(self) -> None:
        self._fold_structured_outputs()
        self.stop = _str_list("stop", self.stop)
        self.bad_words = _str_list("bad_words", self.bad_words)
        if self.stop_token_ids is None:  # vLLM's Optional[list[int]]
            self.stop_token_ids = []
        if self.seed == -1:  # vLLM's (and many clients' default): no seed, a fresh draw each time
            self.seed = None
        self.logit_bias = _logit_bias(self.logit_bias)
        self._check_types()
        self._validate()

    def _check_types(self) -> None:
        """Numbers of the wrong kind (a float n, an infinite temperature) are ValueErrors naming the field,
        not TypeErrors or NaNs later in the step loop."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name not in ("n", "min_tokens"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in NEUTRAL_DEFAULTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("stop_token_ids", "allowed_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, list | tuple):
                raise ValueError(f"{name} must be a list of token ids, got {value!r}")

    def _validate(self) -> None:
        def unset_or(value: Any, ok: Callable[[Any], bool]) -> bool:
            return value is None or ok(value)

        checks = [
            ("n", self.n >= 1, ">= 1"),
            ("temperature", unset_or(self.temperature, lambda v: v >= 0), ">= 0"),
            ("top_p", unset_or(self.top_p, lambda v: 0 < v <= 1), "in (0, 1]"),
            ("top_k", unset_or(self.top_k, lambda v: v >= -1), "-1, 0 (off) or positive"),
            ("min_p", unset_or(self.min_p, lambda v: 0 <= v <= 1), "in [0, 1]"),
            ("repetition_penalty", unset_or(self.repetition_penalty, lambda v: v > 0), "> 0"),
            ("presence_penalty", unset_or(self.presence_penalty, lambda v: -2 <= v <= 2), "in [-2, 2]"),
            ("frequency_penalty", unset_or(self.frequency_penalty, lambda v: -2 <= v <= 2), "in [-2, 2]"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "ids >= 0"),
            (
                "allowed_token_ids",
                self.allowed_token_ids is None
                or (bool(self.allowed_token_ids) and all(isinstance(t, int) and t >= 0
                                                         for t in self.allowed_token_ids)),
                "a non-empty list of token ids >= 0",
            ),
            ("stop", all(self.stop), "non-empty strings"),
            ("bad_words", all(self.bad_words), "non-empty strings"),
            ("max_tokens", unset_or(self.max_tokens, lambda v: v >= 1), ">= 1"),
            (
                "truncate_prompt_tokens",
                unset_or(self.truncate_prompt_tokens, lambda v: v == -1 or v >= 1),
                "-1 (as many as fit) or >= 1",
            ),
            ("min_tokens", self.min_tokens >= 0, ">= 0"),
            (
                "min_tokens",
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"at most max_tokens ({self.max_tokens})",
            ),
            ("logprobs", unset_or(self.logprobs, lambda v: 0 <= v <= 20), "in [0, 20]"),
            ("prompt_logprobs", unset_or(self.prompt_logprobs, lambda v: 0 <= v <= 20), "in [0, 20]"),
            ("reasoning_max_tokens", unset_or(self.reasoning_max_tokens, lambda v: v >= 1), ">= 1"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)!r}")
        constraints = (self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar)
        if sum(x is not None for x in constraints) + self.guided_json_object > 1:
            raise ValueError("at most one of guided_json, guided_regex, guided_choice, guided_grammar, "
                             "json_object")

    def _fold_structured_outputs(self) -> None:
        for name in ("structured_outputs", "guided_decoding"):
            raw = getattr(self, name)
            if raw is None:
                continue
            for key, value in _structured_outputs(name, raw).items():
                target = STRUCTURED_OUTPUT_KEYS[key]
                if getattr(self, target) not in (None, False):
                    raise ValueError(f"{name}.{key} and {target} are the same constraint: give one")
                setattr(self, target, value)
            setattr(self, name, None)  # folded: a copy (with_defaults) must not fold it again

    @property
    def greedy(self) -> bool:
        temperature = NEUTRAL_DEFAULTS["temperature"] if self.temperature is None else self.temperature
        return temperature < 1e-5 or self.top_k == 1

    def with_defaults(self, defaults: dict[str, Any]) -> SamplingParams:
        """A copy with every unset model-defaultable field filled from `defaults`, then NEUTRAL_DEFAULTS."""
        filled = {
            name: (defaults.get(name, neutral) if getattr(self, name) is None else getattr(self, name))
            for name, neutral in NEUTRAL_DEFAULTS.items()
        }
        return dataclasses.replace(self, **filled)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SamplingParams:
        """From Triton's `sampling_parameters` JSON; an unknown key is an error naming it."""
        if not isinstance(raw, dict):
            raise ValueError("sampling_parameters must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        # JSON null is "not given": the field keeps its default (skip_special_tokens stays true).
        given = {key: value for key, value in raw.items() if value is not None}
        return cls(**{key: _coerce(key, value, str(types[key])) for key, value in given.items()})


# vLLM's StructuredOutputsParams keys -> ours. Hints with nothing to do here are accepted and ignored: the
# grammar engine is always llguidance, and JSON never has free whitespace (see structured_output.py).
STRUCTURED_OUTPUT_KEYS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
                          "grammar": "guided_grammar", "json_object": "guided_json_object"}
_IGNORED_STRUCTURED_OUTPUT_KEYS = {"backend", "disable_fallback", "disable_any_whitespace"}


def json_object(name: str, raw: Any, what: str = "an object") -> dict[str, Any]:
    """A parameter given as an object or as its JSON text (Triton parameters are strings): the object."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be {what}, got {raw!r}")
    return raw


def _structured_outputs(name: str, raw: Any) -> dict[str, Any]:
    """The set keys of a structured_outputs object (or its JSON text); ValueError names a wrong one."""
    raw = json_object(name, raw)
    unknown = sorted(set(raw) - STRUCTURED_OUTPUT_KEYS.keys() - _IGNORED_STRUCTURED_OUTPUT_KEYS)
    if unknown:
        raise ValueError(f"{name} key(s) not supported: {', '.join(unknown)} (supported: "
                         f"{', '.join(STRUCTURED_OUTPUT_KEYS)})")
    return {k: v for k, v in raw.items() if k in STRUCTURED_OUTPUT_KEYS and v not in (None, False)}


def _str_list(name: str, raw: Any) -> list[str]:
    """None, one string or a list of strings (vLLM's Optional[str | list[str]]) -> a list of strings."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list | tuple) or not all(isinstance(s, str) for s in raw):
        raise ValueError(f"{name} must be a string or a list of strings, got {raw!r}")
    return list(raw)


def _logit_bias(raw: Any) -> dict[int, float]:
    """Token ids (JSON object keys arrive as strings) -> biases in OpenAI's range [-100, 100]."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"logit_bias must map token ids to biases, got {raw!r}")
    bias = {}
    for key, value in raw.items():
        try:
            if isinstance(value, bool) or isinstance(key, bool):
                raise ValueError
            token, amount = int(key), float(value)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias entry {key!r}: {value!r} is not a token id and a number") from None
        if token < 0 or not -100 <= amount <= 100:
            raise ValueError(f"logit_bias entry {key!r}: {value!r} needs a token id >= 0 and a bias in "
                             "[-100, 100]")
        bias[token] = amount
    return bias


def _coerce(key: str, value: Any, kind: str) -> Any:
    """Accept JSON numbers/bools and their string forms (Triton parameters arrive as strings)."""
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            if not isinstance(value, bool | int):
                raise ValueError
            return bool(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"sampling parameter {key!r} has an invalid value {value!r} (expected {kind})"
        ) from None
    return value
