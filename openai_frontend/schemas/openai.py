"""OpenAI chat/completions request and response bodies, plus the FastDeploy extras ERNIE users send.

Requests ignore unknown fields, as OpenAI-compatible servers do. Messages keep every key they arrive with
(content parts, tool_calls with object or string arguments, tool_call_id, ...): the backend renders them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

# FastDeploy's older `metadata` object may carry any of these request keys; explicit fields win over it.
METADATA_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "bad_words", "skip_special_tokens", "reasoning_max_tokens", "return_token_ids", "n",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
    "chat_template_kwargs",
)

# Token ids travel in Triton's INT64 tensors, which cannot parse a JSON integer beyond this range.
INT64 = range(-(2**63), 2**63)
Int64 = Annotated[int, Field(ge=INT64.start, le=INT64.stop - 1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """Many clients send null for every option they leave alone (`"n": null, "stream": null`): as vLLM,
        that means the default."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _Passthrough(BaseModel):
    """Objects forwarded to the backend as sent: unknown keys kept."""

    model_config = ConfigDict(extra="allow")


class ContentPart(_Passthrough):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_has_text(self) -> ContentPart:
        # As OpenAI: else the template would render a missing or null text as "" or "None".
        if self.type == "text" and self.text is None:
            raise ValueError("a text content part needs a string `text`")
        return self


class ChatMessage(_Passthrough):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class FunctionDefinition(_Passthrough):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Passthrough):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(_Passthrough):
    name: str


class NamedToolChoice(_Passthrough):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatTemplateInputs(_Request):
    """What the chat template takes besides the messages: chat completions and /tokenize alike."""

    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: where the prompt ends (a new assistant turn, or inside the last message to continue it).
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class GenerationRequest(_Request):
    """Fields shared by chat and completions: OpenAI's sampling knobs and FastDeploy's extras."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = None
    bad_words: list[str] | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    return_token_ids: bool | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM >= 0.11's object form of the guided_* fields
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: each prompt token's logprob
    metadata: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_metadata(cls, data: Any) -> Any:
        """FastDeploy reads request keys from `metadata` too; a key set at top level takes precedence."""
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
            return data
        meta = data["metadata"]
        merged = dict(data)
        for key in METADATA_KEYS:
            if meta.get(key) is not None and merged.get(key) is None:
                merged[key] = meta[key]
        if "enable_thinking" in meta:
            kwargs = merged.get("chat_template_kwargs")
            kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
            kwargs.setdefault("enable_thinking", meta["enable_thinking"])
            merged["chat_template_kwargs"] = kwargs
        return merged

    @model_validator(mode="after")
    def _check_options(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when stream is true")
        guided = [self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar]
        if sum(g is not None for g in guided) > 1:
            raise ValueError("use at most one of guided_json, guided_regex, guided_choice, guided_grammar")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or
                                                             fmt.json_schema.json_schema is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


class ChatCompletionRequest(GenerationRequest, ChatTemplateInputs):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: tool_choice "required" makes exactly one call
    reasoning_max_tokens: int | None = Field(default=None, ge=1)
    # vLLM's per-request processor settings, refused rather than ignored: here they are the row's.
    mm_processor_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs is set per model row (its config.pbtxt), not per request")
        return self


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    # Unset: the rest of the context, as FastDeploy (OpenAI and vLLM default to 16 here); 0 with echo answers
    # the prompt alone.
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # OpenAI's, refused rather than ignored: an answer without them would be a different answer.
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.prompts_are_token_ids and not all(t in INT64 for p in self.prompt_list() for t in p):
            raise ValueError("prompt token ids must be 64-bit integers")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) other than n ({self.n}) is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo, to answer the prompt alone)")
        return self

    @property
    def echo_only(self) -> bool:
        """OpenAI's and vLLM's echo with max_tokens 0: the prompt alone (scored with logprobs). One token is
        still sampled, then dropped."""
        return self.echo and self.max_tokens == 0

    @property
    def prompts_are_token_ids(self) -> bool:
        return isinstance(self.prompt, list) and isinstance(self.prompt[0], int | list)

    def echo_prefixes(self) -> list[str]:
        """Per prompt, the echoed text this frontend puts before its choices: a text prompt when echoing.
        Token-id prompts are echoed by the backend, which decodes them (`exclude_input_in_output`), or with
        echo_only by the completions router."""
        return [p if self.echo and isinstance(p, str) else "" for p in self.prompt_list()]

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompts, one per Triton request."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(ChatTemplateInputs):
    """vLLM's POST /tokenize: a prompt, or chat messages (through the model's chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = False  # bos first; generation requests run without it

    @model_validator(mode="after")
    def _check_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int64] = Field(min_length=1)


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Response(BaseModel):
    """Drops the listed fields when None: FastDeploy's extras and stream-only fields stay out of the way."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k not in self.omit_if_none}


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(_Response):
    omit_if_none = frozenset({"tool_calls", "prompt_token_ids", "completion_token_ids"})
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class DeltaMessage(_Response):
    # content and reasoning_content are always present, as FastDeploy sends them: the seed's client code reads
    # `delta.reasoning_content` on every chunk, which the openai client only allows for keys that were sent.
    omit_if_none = frozenset({"role", "tool_calls", "prompt_token_ids", "completion_token_ids"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    omit_if_none = frozenset({"prompt_logprobs"})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's shape (`vllm_prompt_logprobs`)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Response):
    omit_if_none = frozenset({"reasoning_content", "prompt_token_ids", "completion_token_ids",
                              "prompt_logprobs"})

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    reasoning_content: str | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's shape (`vllm_prompt_logprobs`)


class CompletionResponse(_Response):
    omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triton"
    max_model_len: int | None = None  # as vLLM lists it (None when the model could not say)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
