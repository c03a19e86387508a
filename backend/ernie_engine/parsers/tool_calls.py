"""Tool-call parsers: find tool calls in the content stream (after the reasoning parser).

Design choice: a call is emitted when its block closes. Streaming argument fragments earlier would commit to
a call before its JSON is known to be valid; holding the block keeps "malformed JSON degrades to the raw text
as content" true and makes streamed and whole-text results identical for any split of the text. A validated
call then goes out in OpenAI's streaming shape: a first delta with index, id, type, name and empty arguments,
then the arguments as deltas (one per top-level member) whose concatenation is the call's `arguments`.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    pieces: list[str]  # the arguments' JSON text cut after each top-level member: the streamed fragments
    id: str = field(default_factory=make_tool_call_id)

    @property
    def arguments(self) -> str:
        """JSON text, json.dumps(arguments, ensure_ascii=False)."""
        return "".join(self.pieces)

    def to_openai(self) -> dict[str, Any]:
        """Non-streaming shape (`message.tool_calls[i]`)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def to_deltas(self, index: int) -> list[dict[str, Any]]:
        """Streaming shape (`delta.tool_calls[i]`): the header (id, type, name), then argument pieces."""
        header = {
            "index": index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": ""},
        }
        return [header] + [{"index": index, "function": {"arguments": piece}} for piece in self.pieces]


def argument_pieces(arguments: dict[str, Any]) -> list[str]:
    """`json.dumps(arguments, ensure_ascii=False)` cut after each top-level member: the streamed fragments.

    Strict JSON: NaN / Infinity (also from a number like 1e400) raise ValueError.
    """
    members = [json.dumps({k: v}, ensure_ascii=False, allow_nan=False)[1:-1] for k, v in arguments.items()]
    if not members:
        return ["{}"]
    pieces = ["{" + members[0]] + [", " + member for member in members[1:]]
    pieces[-1] += "}"
    return pieces


def merge_tool_call_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold streaming deltas into one delta per call (index, id, type, name, whole arguments), by index."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"index": delta["index"]})
        call.update({k: delta[k] for k in ("id", "type") if k in delta})
        merged = call.setdefault("function", {"name": "", "arguments": ""})
        function = delta.get("function", {})
        merged["name"] = function.get("name") or merged["name"]
        merged["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


@dataclass
class ToolDelta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI streaming deltas


class ToolParser(ABC):
    """Per-request extractor of tool calls from content text deltas."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    @abstractmethod
    def feed(self, text: str) -> ToolDelta:
        """Consume a content delta; return content decided so far and completed calls."""

    @abstractmethod
    def finish(self) -> ToolDelta:
        """End of generation: flush held-back text (an unclosed block is a call if its JSON is complete)."""


def parse_tool_json(body: str) -> ToolCall | None:
    """`{"name": ..., "arguments": {...}}` (arguments may also be a JSON string of an object) or None.

    None too for JSON that parses but cannot go out as strict JSON in UTF-8 (NaN, lone surrogate escapes) or
    that Python refuses (integers over 4300 digits, nesting deeper than the recursion limit): raising here
    would fail every request in the engine step, not just this one.
    """
    try:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
            return None
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            return None
        call = ToolCall(data["name"], argument_pieces(arguments))
        (call.name + call.arguments).encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        return call
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeEncodeError are ValueErrors
        return None


@dataclass
class JsonStringScanner:
    """Whether growing JSON text is inside a string literal at a position (`{"code": "x = '</tool_call>`).

    Each character is looked at once, so a block full of string-quoted end tags stays linear.
    """

    pos: int = 0
    inside: bool = False
    escaped: bool = False

    def inside_at(self, text: str, end: int) -> bool:
        for char in text[self.pos : end]:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = self.inside
            elif char == '"':
                self.inside = not self.inside
        self.pos = end
        return self.inside


class ErnieToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, one per (parallel) call.

    Blocks count only when nothing but whitespace precedes the first one in the content (i.e. right after
    `</think>`, or from the start without reasoning); whitespace between and after blocks is dropped. Once
    other text appears, the rest is plain content. A block that is not a valid call becomes content verbatim.
    A `</tool_call>` inside a JSON string is argument text (vLLM too ends a block only at a `}` before it),
    unless the block turns out not to be a call: then the first such tag ended it.
    """

    name = "ernie-45-vl-thinking"

    def __init__(self) -> None:
        super().__init__()
        self._state = "lead"  # lead -> block <-> between; lead/between -> text
        self._held = ""
        self._gap = ""  # whitespace before the current block: dropped for a call, kept for malformed text
        self._scanned = 0  # in a block: how far `_held` was already searched for the end tag
        self._strings = JsonStringScanner()  # in a block: where `_held` is inside a JSON string
        self._quoted_end = -1  # in a block: the first end tag found inside a JSON string

    def feed(self, text: str) -> ToolDelta:
        if self._state == "text":
            return ToolDelta(content=text)
        self._held += text
        delta = ToolDelta()
        while self._step(delta):
            pass
        return delta

    def _step(self, delta: ToolDelta) -> bool:
        """Advance the state machine once over the held text; True when it should run again."""
        if self._state == "block":
            return self._step_block(delta)
        stripped = self._held.lstrip()
        if stripped.startswith(TOOL_CALL_START):
            self._gap = self._held[: len(self._held) - len(stripped)]
            self._state, self._held, self._scanned = "block", stripped[len(TOOL_CALL_START) :], 0
            self._strings, self._quoted_end = JsonStringScanner(), -1
            return True
        if not stripped or TOOL_CALL_START.startswith(stripped):
            return False  # undecided: whitespace or a partial start tag
        self._state, held, self._held = "text", self._held, ""
        delta.content += held
        return False

    def _step_block(self, delta: ToolDelta) -> bool:
        end = self._held.find(TOOL_CALL_END, max(0, self._scanned - len(TOOL_CALL_END) + 1))
        while end >= 0 and self._strings.inside_at(self._held, end):  # an argument's text, not the end tag
            self._quoted_end = end if self._quoted_end < 0 else self._quoted_end
            end = self._held.find(TOOL_CALL_END, end + len(TOOL_CALL_END))
        if end < 0:
            self._scanned = len(self._held)
            return False
        self._close_block(end, delta)
        return True

    def _close_block(self, end: int, delta: ToolDelta) -> None:
        """End the block at the end tag at `end` (len(_held): unclosed, at the end of the text)."""
        call = parse_tool_json(self._held[:end])
        if call is None and self._quoted_end >= 0:  # not a call anyway: the first quoted end tag ended it
            end = self._quoted_end
        body, tag = self._held[:end], self._held[end : end + len(TOOL_CALL_END)]
        self._state, self._held = "between", self._held[end + len(TOOL_CALL_END) :]
        if call is None:
            delta.content += self._gap + TOOL_CALL_START + body + tag
            return
        delta.tool_calls.extend(call.to_deltas(len(self.calls)))
        self.calls.append(call)

    def finish(self) -> ToolDelta:
        delta = ToolDelta()
        while self._state == "block":  # unclosed; a malformed block may leave text to parse after it
            self._close_block(len(self._held), delta)
            while self._step(delta):
                pass
        held, self._held = self._held, ""
        if self._state == "lead" or held.strip():
            delta.content += held  # leading whitespace or a partial tag is text; trailing whitespace is not
        self._state = "text"
        return delta


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "ernie-45-vl-thinking": ErnieToolParser,
}
