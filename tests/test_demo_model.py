"""Semantic tests of the committed demo weights (checkpoints/ernie-4.5-tiny, scripts/train_demo_model.py).

Greedy answers through the offline engine: the seed's question, held-out capital phrasings (never trained
on), and the weather tool round trip parsed by the ernie-45-vl-thinking parsers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ernie_engine.chat_template import ChatTemplate
from ernie_engine.llm import LLM
from ernie_engine.parsers import parse_output
from ernie_engine.sampling_params import SamplingParams

from scripts.demo_corpus import WEATHER_TOOL, held_out_capital_questions

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


def test_weather_tool_round_trip(llm: LLM) -> None:
    user = {"role": "user", "content": "What's the weather like in Beijing?"}
    [(_, content, calls)] = ask(llm, [[user]], thinking=False, tools=[WEATHER_TOOL])
    assert len(calls) == 1 and calls[0].name == "get_weather", content
    arguments = json.loads(calls[0].arguments)
    # The demo model does not yet copy the city into the call nor the tool's result into its answer (issue 9
    # is open for that; scripts/eval_demo_model.py checks the values): here the tool-call pipeline itself.
    assert isinstance(arguments["location"], str) and arguments["unit"] in ("c", "f"), arguments

    result = f"location: Beijing, temperature: 23, weather: sunny, unit: {arguments['unit']}"
    history = [
        user,
        {"role": "assistant", "content": "", "tool_calls": [calls[0].to_openai()]},
        {"role": "tool", "content": result},
    ]
    [(_, answer, more_calls)] = ask(llm, [history], thinking=False, tools=[WEATHER_TOOL])
    assert answer.strip().startswith("The weather in ") and "temperature" in answer and not more_calls, answer
