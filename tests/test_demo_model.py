"""Semantic tests of the committed demo weights (checkpoints/ernie-4.5-tiny, scripts/train_demo_model.py).

Greedy answers through the offline engine: the seed's question, held-out capital phrasings (never trained
on), the weather tool round trip parsed by the ernie-45-vl-thinking parsers (the call names the question's
city, the answer states the tool's temperature), and well-formed weather calls for held-out phrasings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ernie_engine.chat_template import ChatTemplate
from ernie_engine.llm import LLM
from ernie_engine.parsers import parse_output
from ernie_engine.sampling_params import SamplingParams

from scripts.demo_corpus import WEATHER_TOOL, held_out_capital_questions, held_out_weather_questions

MODEL_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "ernie-4.5-tiny"
PARSER = "ernie-45-vl-thinking"
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@pytest.fixture(scope="module")
def llm() -> LLM:
    # scripts/setup.sh puts a random stand-in (no thinking template) there when the trained model is absent.
    if not ChatTemplate.from_dir(MODEL_DIR).supports_thinking:
        pytest.skip(f"{MODEL_DIR} is not the trained demo model (scripts/train_demo_model.py makes it)")
    return LLM(MODEL_DIR, max_model_len=512, kv_cache_memory_bytes=32 << 20)


def ask(llm: LLM, conversations: list[list[dict]], thinking: bool, tools: list[dict] | None = None):
    """(reasoning, content, tool calls) of each greedy reply, parsed from the raw generated text."""
    outputs = llm.chat(conversations, GREEDY, tools=tools, chat_template_kwargs={"enable_thinking": thinking})
    return [
        parse_output(out.outputs[0].text, PARSER, PARSER if tools else "", thinking_enabled=thinking)
        for out in outputs
    ]


@pytest.mark.parametrize("thinking", [False, True])
def test_seed_question_answers_beijing(llm: LLM, thinking: bool) -> None:
    [(reasoning, content, calls)] = ask(
        llm, [[{"role": "user", "content": "Where is the capital of China?"}]], thinking
    )
    assert content.strip() == "The capital of China is Beijing."
    assert bool(reasoning) == thinking and not calls


def test_held_out_capital_phrasings(llm: LLM) -> None:
    pairs = held_out_capital_questions()[:8]
    replies = ask(llm, [[{"role": "user", "content": q}] for q, _ in pairs], thinking=False)
    answers = [(q, capital, content) for (q, capital), (_, content, _) in zip(pairs, replies, strict=True)]
    wrong = [(q, content) for q, capital, content in answers if capital not in content]
    assert len(wrong) <= 1, wrong


# The committed weights emit a well-formed call but do not yet copy the question's city into it nor the tool's
# temperature into the answer (issue 9; scripts/eval_demo_model.py measures both): these checks are expected
# to fail until a checkpoint that passes the whole evaluation replaces them. They also miss a well-formed call
# for some held-out weather phrasings.
WEATHER_SEMANTICS = pytest.mark.xfail(reason="issue 9: the demo weights do not copy city / temperature yet")


def weather_round_trip(llm: LLM, thinking: bool):
    """(call's reasoning, the call, its JSON arguments, the answer to the tool's result, further calls)."""
    user = {"role": "user", "content": "What's the weather like in Beijing?"}
    [(reasoning, content, calls)] = ask(llm, [[user]], thinking, tools=[WEATHER_TOOL])
    assert len(calls) == 1 and calls[0].name == "get_weather", content
    arguments = json.loads(calls[0].arguments)
    result = f"location: Beijing, temperature: 23, weather: sunny, unit: {arguments.get('unit')}"
    history = [
        user,
        {"role": "assistant", "content": "", "tool_calls": [calls[0].to_openai()]},
        {"role": "tool", "content": result},
    ]
    [(_, answer, more_calls)] = ask(llm, [history], thinking, tools=[WEATHER_TOOL])
    return reasoning, calls[0], arguments, answer, more_calls


def test_weather_tool_round_trip(llm: LLM) -> None:
    reasoning, _, arguments, answer, more_calls = weather_round_trip(llm, thinking=False)
    assert not reasoning, reasoning
    assert isinstance(arguments["location"], str) and arguments["unit"] in ("c", "f"), arguments
    assert answer.strip().startswith("The weather in ") and "temperature" in answer and not more_calls, answer


@WEATHER_SEMANTICS
@pytest.mark.parametrize("thinking", [False, True])
def test_weather_round_trip_copies_city_and_temperature(llm: LLM, thinking: bool) -> None:
    _, _, arguments, answer, _ = weather_round_trip(llm, thinking)
    assert arguments["location"] == "Beijing", arguments
    states_23 = re.search(r"(?<![\d-])23(?!\d)", answer)
    assert answer.strip().startswith("The weather in Beijing ") and states_23, answer


@WEATHER_SEMANTICS
def test_weather_held_out_questions(llm: LLM) -> None:
    """Weather phrasings never trained on: each gets one get_weather call with valid JSON arguments (whether
    the call names the question's city is a figure printed by scripts/eval_demo_model.py, not a check)."""
    pairs = held_out_weather_questions()
    replies = ask(llm, [[{"role": "user", "content": q}] for q, _ in pairs], False, tools=[WEATHER_TOOL])
    valid = [
        len(calls) == 1
        and calls[0].name == "get_weather"
        and isinstance(json.loads(calls[0].arguments).get("location"), str)
        for _, _, calls in replies
    ]
    assert all(valid), list(zip(pairs, replies, strict=True))
