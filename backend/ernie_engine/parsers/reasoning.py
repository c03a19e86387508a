"""Reasoning parsers: split generated text into reasoning and content, streamed or whole.

A parser is a stateful per-request object fed text deltas; tags may arrive split across deltas at any
character, so text that could be the start of a tag is held back until it is decided.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

THINK_START = "<think>"
THINK_END = "</think>"


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@dataclass
class ReasoningDelta:
    reasoning_text: str = ""
    content: str = ""


class ReasoningParser(ABC):
    """Per-request splitter of generated text into reasoning and content."""

    name: ClassVar[str]

    def __init__(self, thinking_enabled: bool = True) -> None:
        self.thinking_enabled = thinking_enabled

    @abstractmethod
    def feed(self, text: str) -> ReasoningDelta:
        """Consume a text delta; return what is decided so far."""

    @abstractmethod
    def finish(self) -> ReasoningDelta:
        """End of generation: flush held-back text."""

    @property
    @abstractmethod
    def reasoning_ended(self) -> bool:
        """True once content has started (the engine's reasoning_max_tokens budget stops counting)."""


class ThinkEndReasoningParser(ReasoningParser):
    """ERNIE-4.5-VL format `reasoning</think>content`: the prompt opened the thinking, the model closes it.

    Serves `ernie-45-vl` and `ernie-45-vl-thinking` (whose output goes on with `\\n\\n\\n<tool_call>` blocks:
    the tool-call parser takes the content from there). With thinking disabled everything is content; with it
    enabled and no `</think>` ever produced (e.g. cut by max_tokens) everything is reasoning, the same
    whether streamed or parsed whole. A stray leading `<think>` is dropped.
    """

    name = "ernie-45-vl"

    def __init__(self, thinking_enabled: bool = True) -> None:
        super().__init__(thinking_enabled)
        self._state = "start" if thinking_enabled else "content"
        self._held = ""

    @property
    def reasoning_ended(self) -> bool:
        return self._state == "content"

    def feed(self, text: str) -> ReasoningDelta:
        if self._state == "content":
            return ReasoningDelta(content=text)
        held = self._held + text
        if self._state == "start":
            if held.startswith(THINK_START):
                held = held[len(THINK_START) :]
            elif THINK_START.startswith(held):
                self._held = held
                return ReasoningDelta()
            self._state = "reasoning"
        end = held.find(THINK_END)
        if end >= 0:
            self._state, self._held = "content", ""
            return ReasoningDelta(held[:end], held[end + len(THINK_END) :])
        keep = partial_tag_len(held, THINK_END)
        self._held = held[len(held) - keep :] if keep else ""
        return ReasoningDelta(reasoning_text=held[: len(held) - keep])

    def finish(self) -> ReasoningDelta:
        held, self._held = self._held, ""
        return (
            ReasoningDelta(content=held) if self._state == "content" else ReasoningDelta(reasoning_text=held)
        )


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "ernie-45-vl": ThinkEndReasoningParser,
    "ernie-45-vl-thinking": ThinkEndReasoningParser,
}
