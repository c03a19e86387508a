"""Chat prompts: the checkpoint's own jinja2 template, rendered the way transformers does, or a built-in one.

The checkpoint's template (a `chat_template.jinja` file, else `chat_template` in tokenizer_config.json) always
wins. Two built-in ERNIE-4.5 templates serve as fallbacks and for generated checkpoints:

* `ernie-4.5`: the 0.3B format (`<|begin_of_sentence|>`, system + "\\n", "User: ...\\n",
  "Assistant: ...<|end_of_sentence|>", generation prompt "Assistant: "), extended with tools, tool calls and
  tool results in the same style.
* `ernie-4.5-thinking`: the same plus thinking: the generation prompt ends with `<think>` (thinking on, the
  default) or `<think>\\n</think>\\n` (`enable_thinking=False`), which is what the `ernie-45-vl(-thinking)`
  reasoning parsers expect.

Message content given as a list of parts is flattened to text before rendering: consecutive text parts are
joined with "\\n" (as vLLM) and image/video parts become the ERNIE-VL placeholders below, which the multimodal
processor expands later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Hook for the multimodal processor: one placeholder per image / video, expanded into patch tokens later.
IMAGE_PLACEHOLDER = "<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>"
VIDEO_PLACEHOLDER = "<|VIDEO_START|><|video@placeholder|><|VIDEO_END|>"
MEDIA_PART_PLACEHOLDERS = {
    "image_url": IMAGE_PLACEHOLDER,
    "image": IMAGE_PLACEHOLDER,
    "video_url": VIDEO_PLACEHOLDER,
    "video": VIDEO_PLACEHOLDER,
}

_SYSTEM_AND_TOOLS = """\
{%- set cls = cls_token if cls_token is defined and cls_token else "<|begin_of_sentence|>" -%}
{%- set sep = sep_token if sep_token is defined and sep_token else "<|end_of_sentence|>" -%}
{{- cls -}}
{%- set ns = namespace(start=0) -%}
{%- if messages and messages[0].role == "system" -%}
{{- messages[0].content + "\\n" -}}
{%- set ns.start = 1 -%}
{%- endif -%}
{%- if tools -%}
{{- "You may call the tools below. Each is described by a JSON schema:\\n<tools>\\n" -}}
{%- for tool in tools -%}
{{- (tool.function if tool.function is defined else tool) | tojson + "\\n" -}}
{%- endfor -%}
{{- "</tools>\\nTo call tools, answer with one block per call, each holding a JSON object:\\n" -}}
{{- "<tool_call>\\n{\\"name\\": <tool name>, \\"arguments\\": <arguments object>}\\n</tool_call>\\n" -}}
{%- endif -%}
"""

_TURNS = """\
{%- for message in messages[ns.start:] -%}
{%- if message.role == "user" -%}
{{- "User: " + message.content + "\\n" -}}
{%- elif message.role == "system" -%}
{{- message.content + "\\n" -}}
{%- elif message.role == "assistant" -%}
{{- "Assistant: " + message.content -}}
{%- for call in message.tool_calls or [] -%}
{%- set fn = call.function if call.function is defined else call -%}
{{- "<tool_call>\\n" + {"name": fn.name, "arguments": fn.arguments} | tojson + "\\n</tool_call>\\n" -}}
{%- endfor -%}
{{- sep -}}
{%- elif message.role == "tool" -%}
{%- if loop.previtem is not defined or loop.previtem.role != "tool" -%}{{- "User: " -}}{%- endif -%}
{{- "<tool_response>\\n" + message.content + "\\n</tool_response>\\n" -}}
{%- else -%}
{{- raise_exception("unsupported message role: " + message.role) -}}
{%- endif -%}
{%- endfor -%}
"""

_PROMPT_PLAIN = """\
{%- if add_generation_prompt -%}{{- "Assistant: " -}}{%- endif -%}
"""

_PROMPT_THINKING = """\
{%- if add_generation_prompt -%}
{{- "Assistant: <think>" -}}
{%- if enable_thinking is defined and not enable_thinking -%}{{- "\\n</think>\\n" -}}{%- endif -%}
{%- endif -%}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "ernie-4.5": _SYSTEM_AND_TOOLS + _TURNS + _PROMPT_PLAIN,
    "ernie-4.5-thinking": _SYSTEM_AND_TOOLS + _TURNS + _PROMPT_THINKING,
}


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` blocks (renders the body unchanged)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; transformers overrides it like this and templates rely on it.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile with the environment transformers uses (sandboxed, trim/lstrip blocks, loop controls)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def content_to_text(content: Any) -> str:
    """Flatten OpenAI message content (a string, None or a list of parts) into template text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    previous = None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):  # as OpenAI: else the template got "None" or "5"
                raise ValueError(f"a text content part needs a string 'text', got {part.get('text')!r}")
            # Consecutive text parts are lines, as vLLM joins them; media markers attach as ERNIE-VL's
            # template writes them.
            pieces.append(("\n" if previous == "text" else "") + part["text"])
        elif kind in MEDIA_PART_PLACEHOLDERS:
            pieces.append(MEDIA_PART_PLACEHOLDERS[kind])
        else:
            raise ValueError(
                f"unsupported content part type {kind!r} (expected text, image_url or video_url)"
            )
        previous = kind
    return "".join(pieces)


def media_part_types(messages: Any) -> set[str]:
    """The image / video part types in OpenAI messages (bad shapes are normalize_messages' to report)."""
    if not isinstance(messages, list):
        return set()
    return {part["type"] for message in messages if isinstance(message, dict)
            and isinstance(message.get("content"), list) for part in message["content"]
            if isinstance(part, dict) and part.get("type") in MEDIA_PART_PLACEHOLDERS}


def _normalize_arguments(arguments: Any) -> Any:
    """Arguments come as a JSON string (OpenAI) or an object (the seed): templates get the object."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def _normalize_tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be an object, got {call!r}")
    call = dict(call)
    if isinstance(call.get("function"), dict):
        function = dict(call["function"])
        function["arguments"] = _normalize_arguments(function.get("arguments"))
        call["function"] = function
    elif "arguments" in call:
        call["arguments"] = _normalize_arguments(call["arguments"])
    return call


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with text content and object tool-call arguments; ValueError on bad shapes."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        message = dict(message)
        message["content"] = content_to_text(message.get("content"))
        if message.get("tool_calls"):
            message["tool_calls"] = [_normalize_tool_call(c) for c in message["tool_calls"]]
        result.append(message)
    return result


@dataclass
class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference (bos_token, cls_token, ...)."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def builtin(cls, name: str = "ernie-4.5") -> ChatTemplate:
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(
                f"unknown built-in chat template {name!r}; known: {', '.join(BUILTIN_TEMPLATES)}"
            )
        return cls(BUILTIN_TEMPLATES[name])

    @classmethod
    def from_dir(cls, model_dir: str | Path, fallback: str = "ernie-4.5") -> ChatTemplate:
        """The checkpoint's template (chat_template.jinja, else tokenizer_config.json's), else a built-in."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        specials = {
            k: _token_content(v)
            for k, v in config.items()
            if k.endswith("_token") and isinstance(v, str | dict)
        }
        jinja = model_dir / "chat_template.jinja"
        # As transformers (and so vLLM): the file wins over a template in tokenizer_config.json.
        source = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if isinstance(source, list):  # transformers' named-template form: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not source:
            return cls(BUILTIN_TEMPLATES[fallback], specials)
        return cls(source, specials)

    @property
    def supports_thinking(self) -> bool:
        return "enable_thinking" in self.source

    def thinking_enabled(self, template_kwargs: dict[str, Any] | None = None) -> bool:
        """Whether the rendered prompt leaves the model thinking (what reasoning parsers need to know)."""
        return self.supports_thinking and bool((template_kwargs or {}).get("enable_thinking", True))

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render to a prompt string; ValueError for bad messages or a template that raises.

        `continue_final_message` (vLLM's, transformers'): the prompt ends inside the last message, right after
        its text, so that the model continues it (e.g. an assistant answer started by the client)."""
        check_continuation(add_generation_prompt, continue_final_message)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError(f"tools must be a list of objects, got {tools!r:.100}")
        context = {**self.special_tokens, **template_kwargs}
        try:
            text = compile_template(self.source).render(
                messages=normalize_messages(mark_final(messages) if continue_final_message else messages),
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template error: {err}") from None
        except TypeError as err:  # e.g. a template concatenating a non-string field
            raise ValueError(f"chat template could not render these messages: {err}") from None
        return continue_final(text, messages) if continue_final_message else text


def check_continuation(add_generation_prompt: bool, continue_final_message: bool) -> None:
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message needs add_generation_prompt set to false (they exclude each "
                         "other: one opens a new assistant turn, the other continues the last message)")


# transformers' marker: rendered right after the final message's text, it shows where the prompt must end.
_FINAL_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def mark_final(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with `_FINAL_TAG` after the last message's (last) text, to render for `continue_final`."""
    if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)):
        return messages  # normalize_messages reports the bad shape
    final = dict(messages[-1])
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + _FINAL_TAG
    elif isinstance(content, list):
        texts = [i for i, p in enumerate(content)
                 if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
        if texts:
            content = list(content)
            content[texts[-1]] = {**content[texts[-1]], "text": content[texts[-1]]["text"] + _FINAL_TAG}
            final["content"] = content
    return [*messages[:-1], final]


def continue_final(text: str, messages: list[dict[str, Any]]) -> str:
    """The prompt rendered from `mark_final(messages)`, cut at the marker as transformers does: right after
    the last message's (last) text, which keeps its trailing whitespace unless the template trimmed it; the
    markup the template puts after it (its end of turn) is dropped."""
    content = messages[-1].get("content")  # the messages rendered: a list of objects
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = texts[-1] if texts else None
    if not (isinstance(content, str) and content.strip()):
        raise ValueError("continue_final_message needs text in the last message")
    tag = text.rfind(_FINAL_TAG.strip())
    if tag < 0:
        raise ValueError("continue_final_message: the chat template does not show the last message's text")
    return text[:tag] if text.startswith(_FINAL_TAG, tag) else text[:tag].rstrip()


def _token_content(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else str(value)


def apply_chat_template(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    *,
    template: ChatTemplate | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with `template` (default: the built-in ERNIE-4.5 one)."""
    return (template or ChatTemplate.builtin()).render(
        messages, tools, add_generation_prompt, **template_kwargs
    )
