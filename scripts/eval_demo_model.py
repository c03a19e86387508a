"""Evaluate the embedded demo model (greedy) through the project's offline engine, `LLM(model_dir).chat`.

    python scripts/eval_demo_model.py --model checkpoints/ernie-4.5-tiny

Checks, each printed with its verdict:
- accuracy on held-out capital phrasings (`demo_corpus.held_out_capital_questions`, never trained on;
  thinking off), target >= 90%;
- the seed's question "Where is the capital of China?", with thinking on (the template's default: the reply
  is `reasoning</think>answer`) and off: the answer must contain "Beijing";
- a tool call for "What's the weather like in Beijing?" (thinking on and off): the weather tool offered, the
  raw output parsed by `parsers.parse_output` with the `ernie-45-vl-thinking` parsers into one `get_weather`
  call whose JSON arguments name Beijing and a valid unit; then the follow-up with the tool's result: the
  answer must state the temperature;
- the same round trip for 10 held-out weather questions (`demo_corpus.held_out_weather_questions`: 10
  weather cities asked in phrasings never trained on, one in five in Chinese; thinking off), each follow-up
  with its own random temperature: 90% of the calls must be one `get_weather` call with valid JSON arguments
  (Chinese cities are the hard ones: some of their characters are bytes to the tokenizer), and 80% of the
  answers must state their temperature (as a number: "-66" does not state -6). How many calls name
  the question's city exactly is printed, not checked (issue 9 asks for a parsed call, not for the city).
  `--never-asked` asks instead for capitals whose weather training never asks (`HELD_OUT_CITIES`).
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
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
WEATHER_TEMPERATURE = 23
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


def follow_up(call: ToolCall, temperature: int) -> tuple[str, dict[str, Any]]:
    """The tool's (made-up) result for `call`, and the history message that carries the call."""
    arguments = json.loads(call.arguments)
    result = (
        f"location: {arguments.get('location')}, temperature: {temperature}, weather: sunny, "
        f"unit: {arguments.get('unit')}"
    )
    return result, {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]}


def weather_round_trips(
    llm: LLM, questions: list[str], temperatures: list[int], thinking: bool
) -> list[tuple[Reply, Reply | None]]:
    """For each question the weather call, then (when there is one) the answer to the tool's result."""
    users = [{"role": "user", "content": q} for q in questions]
    calls = chat(llm, [[u] for u in users], thinking=thinking, tools=[demo_corpus.WEATHER_TOOL])
    histories, asked = [], []
    for i, (user, reply) in enumerate(zip(users, calls, strict=True)):
        if reply.tool_calls and valid_json(reply.tool_calls[0].arguments):
            result, message = follow_up(reply.tool_calls[0], temperatures[i])
            histories.append([user, message, {"role": "tool", "content": result}])
            asked.append(i)
    answers: list[Reply | None] = [None] * len(questions)
    if histories:
        replies = chat(llm, histories, thinking=thinking, tools=[demo_corpus.WEATHER_TOOL])
        for i, reply in zip(asked, replies, strict=True):
            answers[i] = reply
    return list(zip(calls, answers, strict=True))


def states(text: str, temperature: int) -> bool:
    """`text` has the number `temperature` (not merely its digits inside another number)."""
    return re.search(rf"(?<![\d-]){temperature}(?!\d)", text) is not None


def valid_json(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


def valid_call(reply: Reply, city: str | None) -> bool:
    """One get_weather call with JSON arguments naming `city` (any string when None) and a valid unit."""
    if len(reply.tool_calls) != 1 or reply.tool_calls[0].name != "get_weather":
        return False
    if not valid_json(reply.tool_calls[0].arguments):
        return False
    arguments = json.loads(reply.tool_calls[0].arguments)
    location = arguments.get("location")
    named = isinstance(location, str) if city is None else location == city
    return named and arguments.get("unit") in ("c", "f")


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts the corpus can supply, checked before the model loads (the corpus used to cut a larger --count
    short while the summary claimed it, and a larger --weather-count failed after the capitals had run)."""
    capitals = len(demo_corpus.held_out_capital_questions(count=sys.maxsize))
    if not 1 <= args.count <= capitals:
        parser.error(f"--count must be between 1 and {capitals} (the held-out capital questions), "
                     f"got {args.count}")
    # never-asked cities repeat; the trained ones are each asked once
    weather = sys.maxsize if args.never_asked else len(demo_corpus.weather_cities())
    if not 1 <= args.weather_count <= weather:
        limit = "at least 1" if args.never_asked else f"between 1 and {weather} (the trained weather cities)"
        parser.error(f"--weather-count must be {limit}, got {args.weather_count}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "ernie-4.5-tiny")
    parser.add_argument("--count", type=int, default=50, help="held-out questions to ask")
    parser.add_argument("--weather-count", type=int, default=10, help="held-out weather questions to ask")
    parser.add_argument(
        "--never-asked", action="store_true", help="held-out weather cities never asked in training"
    )
    args = parser.parse_args(argv)
    check_counts(parser, args)
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
        [(call_reply, answer)] = weather_round_trips(llm, [WEATHER_QUESTION], [WEATHER_TEMPERATURE], thinking)
        calls = [c.to_openai()["function"] for c in call_reply.tool_calls]
        print(
            f"tool call (thinking {'on' if thinking else 'off'}): {WEATHER_QUESTION!r} -> reasoning "
            f"{call_reply.reasoning!r}, calls {calls}, content {call_reply.content!r}"
        )
        checks[f"tool call get_weather(location=Beijing), valid JSON (thinking {thinking})"] = valid_call(
            call_reply, "Beijing"
        )
        if answer is not None:
            print(f"  after the tool result (temperature {WEATHER_TEMPERATURE}): {answer.content!r}")
        checks[f"answer states the temperature (thinking {thinking})"] = answer is not None and states(
            answer.content, WEATHER_TEMPERATURE
        )

    pairs = demo_corpus.held_out_weather_questions(count=args.weather_count, never_asked=args.never_asked)
    rng = random.Random(1)
    temperatures = [rng.randint(-10, 40) for _ in pairs]
    results = weather_round_trips(llm, [q for q, _ in pairs], temperatures, thinking=False)
    cities = stated_count = calls_ok = 0
    for (question, city), temperature, (call_reply, answer) in zip(pairs, temperatures, results, strict=True):
        city_ok = valid_call(call_reply, city)
        stated = answer is not None and states(answer.content, temperature)
        cities += city_ok
        calls_ok += valid_call(call_reply, None)
        stated_count += stated
        arguments = call_reply.tool_calls[0].arguments if call_reply.tool_calls else call_reply.content
        print(
            f"  {'ok ' if city_ok else 'BAD'} {question} -> {arguments}; "
            f"{'ok ' if stated else 'BAD'} temperature {temperature} -> {answer and answer.content!r}"
        )
    count = len(pairs)
    print(
        f"held-out weather: {calls_ok}/{count} valid get_weather calls, city right in {cities}/{count} calls "
        f"(printed, not checked), temperature in {stated_count}/{count}"
    )
    checks["held-out weather calls are get_weather with valid JSON (>= 90%)"] = calls_ok >= 0.9 * count
    checks["held-out weather answers state the temperature (>= 80%)"] = stated_count >= 0.8 * count

    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
