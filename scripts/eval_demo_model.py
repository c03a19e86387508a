"""Evaluate the embedded demo model (greedy) through the project's offline engine, `LLM(model_dir).chat`.

    python scripts/eval_demo_model.py --model checkpoints/ernie-4.5-tiny

Checks, each printed with its verdict:
- accuracy on held-out capital phrasings (`demo_corpus.held_out_capital_questions`, never trained on;
  thinking off), target >= 90%;
- the seed's question "Where is the capital of China?", with thinking on (the template's default: the reply
  is `reasoning</think>answer`) and off: the answer must contain "Beijing";
- a tool call: the weather tool offered, the raw output parsed by `parsers.parse_output` with the
  `ernie-45-vl-thinking` parsers into a `get_weather` call with valid JSON arguments;
- the follow-up with the tool's result: the answer must state the temperature.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT / "scripts"))
import demo_corpus  # noqa: E402
from ernie_engine.llm import LLM  # noqa: E402
from ernie_engine.parsers import ToolCall, parse_output  # noqa: E402
from ernie_engine.sampling_params import SamplingParams  # noqa: E402

logger = logging.getLogger("eval_demo_model")

PARSER = (
    "ernie-45-vl-thinking"  # reasoning and tool-call parser names, as the model repository configures them
)
SEED_QUESTION = "Where is the capital of China?"
WEATHER_QUESTION = "What's the weather like in Beijing?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=96)


@dataclass
class Reply:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]


def chat(
    llm: LLM,
    conversations: list[list[dict[str, Any]]],
    *,
    thinking: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[Reply]:
    """Greedy replies (raw text parsed here), one per conversation."""
    outputs = llm.chat(conversations, GREEDY, tools=tools, chat_template_kwargs={"enable_thinking": thinking})
    replies = []
    for out in outputs:
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        reasoning, content, calls = parse_output(
            out.outputs[0].text, PARSER, PARSER if tools else "", thinking_enabled=thinking
        )
        replies.append(Reply(reasoning, content.strip(), calls))
    return replies


def held_out_accuracy(llm: LLM, count: int) -> float:
    pairs = demo_corpus.held_out_capital_questions(count=count)
    replies = chat(llm, [[{"role": "user", "content": q}] for q, _ in pairs], thinking=False)
    correct = 0
    for (question, capital), reply in zip(pairs, replies, strict=True):
        ok = capital in reply.content
        correct += ok
        print(f"  {'ok ' if ok else 'BAD'} {question} -> {reply.content}")
    return correct / len(pairs)


def seed_question(llm: LLM, thinking: bool) -> Reply:
    return chat(llm, [[{"role": "user", "content": SEED_QUESTION}]], thinking=thinking)[0]


def tool_round_trip(llm: LLM, thinking: bool) -> tuple[Reply, Reply | None, int]:
    """The call for the weather question, then the answer to the tool's (made-up) result."""
    user = {"role": "user", "content": WEATHER_QUESTION}
    call_reply = chat(llm, [[user]], thinking=thinking, tools=[demo_corpus.WEATHER_TOOL])[0]
    temperature = 23
    if not call_reply.tool_calls:
        return call_reply, None, temperature
    call = call_reply.tool_calls[0]
    arguments = json.loads(call.arguments)
    result = (
        f"location: {arguments.get('location')}, temperature: {temperature}, weather: sunny, "
        f"unit: {arguments.get('unit')}"
    )
    history = [
        user,
        {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]},
        {"role": "tool", "content": result},
    ]
    answer = chat(llm, [history], thinking=thinking, tools=[demo_corpus.WEATHER_TOOL])[0]
    return call_reply, answer, temperature


def valid_call(reply: Reply) -> bool:
    if len(reply.tool_calls) != 1 or reply.tool_calls[0].name != "get_weather":
        return False
    arguments = json.loads(reply.tool_calls[0].arguments)
    return isinstance(arguments.get("location"), str) and arguments.get("unit") in ("c", "f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "ernie-4.5-tiny")
    parser.add_argument("--count", type=int, default=50, help="held-out questions to ask")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    llm = LLM(args.model, max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    checks: dict[str, bool] = {}

    accuracy = held_out_accuracy(llm, args.count)
    print(f"held-out capital accuracy: {accuracy:.0%} ({args.count} questions)")
    checks["held-out accuracy >= 90%"] = accuracy >= 0.9

    for thinking in (True, False):
        reply = seed_question(llm, thinking)
        print(
            f"seed question (thinking {'on' if thinking else 'off'}): {SEED_QUESTION!r} -> "
            f"reasoning {reply.reasoning!r}, answer {reply.content!r}"
        )
        checks[f"seed answer has Beijing (thinking {thinking})"] = "Beijing" in reply.content

    for thinking in (False, True):
        call_reply, answer, temperature = tool_round_trip(llm, thinking)
        calls = [c.to_openai()["function"] for c in call_reply.tool_calls]
        print(
            f"tool call (thinking {'on' if thinking else 'off'}): reasoning {call_reply.reasoning!r}, "
            f"calls {calls}, content {call_reply.content!r}"
        )
        checks[f"tool call parsed with valid JSON arguments (thinking {thinking})"] = valid_call(call_reply)
        if answer is not None:
            print(f"  after the tool result (temperature {temperature}): {answer.content!r}")
        checks[f"answer states the temperature (thinking {thinking})"] = (
            answer is not None and str(temperature) in answer.content
        )

    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
