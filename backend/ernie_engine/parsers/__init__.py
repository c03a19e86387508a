"""Reasoning and tool-call parsers, chosen by name (the seed's `--reasoning-parser` / `--tool-call-parser`).

The engine's output processor makes one `OutputParser` per completion, feeds it each detokenized text delta
and calls `finish()` once generation ends; `parse_output` does the same for a whole text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .reasoning import REASONING_PARSERS, ReasoningDelta, ReasoningParser
from .tool_calls import TOOL_PARSERS, ToolCall, ToolDelta, ToolParser, merge_tool_call_deltas

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "OutputParser",
    "ParsedDelta",
    "ReasoningParser",
    "ToolCall",
    "ToolParser",
    "get_reasoning_parser_class",
    "get_tool_parser_class",
    "make_output_parser",
    "merge_tool_call_deltas",
    "parse_output",
]


def _lookup(kind: str, name: str, registry: dict[str, Any]) -> Any:
    key = name.strip().lower().replace("_", "-")
    if key not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[key]


def get_reasoning_parser_class(name: str) -> type[ReasoningParser]:
    """By name, dashes or underscores (`ernie-45-vl`, `ernie_45_vl_thinking`); ValueError lists valid ones."""
    return _lookup("reasoning parser", name, REASONING_PARSERS)


def get_tool_parser_class(name: str) -> type[ToolParser]:
    return _lookup("tool call parser", name, TOOL_PARSERS)


@dataclass
class ParsedDelta:
    """What one step adds; field names match `outputs.CompletionOutput`."""

    text: str = ""
    reasoning_text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning_text or self.tool_calls)


class OutputParser:
    """Per-completion pipeline: reasoning parser, then the tool parser over the content it yields."""

    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str) -> ParsedDelta:
        step = self.reasoning.feed(text) if self.reasoning else ReasoningDelta(content=text)
        return self._combine(step, self.tools.feed(step.content) if self.tools else ToolDelta(step.content))

    def finish(self) -> ParsedDelta:
        step = self.reasoning.finish() if self.reasoning else ReasoningDelta()
        if not self.tools:
            return self._combine(step, ToolDelta(step.content))
        first, last = self.tools.feed(step.content), self.tools.finish()
        return self._combine(
            step, ToolDelta(first.content + last.content, first.tool_calls + last.tool_calls)
        )

    @staticmethod
    def _combine(step: ReasoningDelta, tools: ToolDelta) -> ParsedDelta:
        return ParsedDelta(tools.content, step.reasoning_text, tools.tool_calls)

    @property
    def reasoning_ended(self) -> bool:
        return self.reasoning is None or self.reasoning.reasoning_ended

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools else []

    @property
    def has_tool_calls(self) -> bool:
        """True once a call was produced: the finish reason is then "tool_calls"."""
        return bool(self.tool_calls)


def make_output_parser(
    reasoning_parser: str = "",
    tool_call_parser: str = "",
    *,
    thinking_enabled: bool = True,
    tools_enabled: bool = True,
) -> OutputParser:
    """Parsers by the engine's configured names ("" = none).

    `thinking_enabled`: whether the prompt left the model thinking (`ChatTemplate.thinking_enabled`);
    `tools_enabled`: whether the request offered tools (without tools, `<tool_call>` text stays content).
    """
    reasoning = get_reasoning_parser_class(reasoning_parser)(thinking_enabled) if reasoning_parser else None
    tools = get_tool_parser_class(tool_call_parser)() if tool_call_parser and tools_enabled else None
    return OutputParser(reasoning, tools)


def parse_output(
    text: str, reasoning_parser: str = "", tool_call_parser: str = "", *, thinking_enabled: bool = True
) -> tuple[str, str, list[ToolCall]]:
    """Whole-text parse: (reasoning, content, tool calls); identical to streaming the same text."""
    parser = make_output_parser(reasoning_parser, tool_call_parser, thinking_enabled=thinking_enabled)
    head, tail = parser.feed(text), parser.finish()
    return head.reasoning_text + tail.reasoning_text, head.text + tail.text, parser.tool_calls
