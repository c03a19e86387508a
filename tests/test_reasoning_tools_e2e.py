"""Reasoning and tool calling end to end: openai client -> openai_frontend -> tritonserver -> engine.

Two rows, each behind its own tritonserver and frontend:
* THINKING_ROW: a random checkpoint rendered with the `ernie-4.5-thinking` template and both seed parsers on
  (`ernie-45-vl-thinking`), max_model_len 1024 so the seed's tool prompts (~570 tokens) fit. The seed's tool
  requests succeed, streamed or not; thinking switches off through either request key; reasoning_max_tokens
  bounds the reasoning; a forced (named tool_choice) call streams in OpenAI's shape. A random model's text
  is noise, so these check structure, and check that what the response splits into reasoning / content /
  tool calls is the parsers' reading of the generated token ids.
* model_repository/ernie-4.5-tiny-thinking over the trained demo model (checkpoints/ernie-4.5-tiny): the
  weather round trip's meaning, through Triton's `reasoning_output` / `tool_calls` and the frontend's
  `reasoning_content` / `tool_calls` / finish reason "tool_calls". Skipped when that checkpoint is not the
  trained one (scripts/train_demo_model.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ernie_engine.chat_template import ChatTemplate
from ernie_engine.parsers import parse_output
from ernie_engine.parsers.reasoning import THINK_END
from ernie_engine.tokenizer import Tokenizer

from scripts.demo_corpus import WEATHER_TOOL
from tests.fixtures.frontend import Frontend, start_frontend
from tests.fixtures.triton import TritonServer, make_random_checkpoint, running_server, write_row

ROOT = Path(__file__).resolve().parent.parent
PARSER = "ernie-45-vl-thinking"
THINKING_ROW = "ernie-test-thinking"
THINKING_ROW_PARAMS = {
    "max_model_len": "1024",
    "max_num_seqs": "4",
    "block_size": "16",
    "num_gpu_blocks_override": "160",
    "reasoning_parser": PARSER,
    "tool_call_parser": PARSER,
}
DEMO_ROW = "ernie-4.5-tiny-thinking"
DEMO_CHECKPOINT = ROOT / "checkpoints" / "ernie-4.5-tiny"
TIMEOUT = 300
pytestmark = pytest.mark.server

SEED = Path(os.environ.get("ERNIE_SEED_DOC", ROOT.parent / "shared" / "seed" / "kunlunxin_xpu_deployment.md"))


def seed_tool_requests() -> dict[str, dict[str, Any]]:
    """The seed's two curl bodies with tools (`-d $'{...}'`), read from the document itself."""
    bodies = [json.loads(b) for b in re.findall(r"-d \$'(\{.*?\})'\n```", SEED.read_text(), re.S)]
    assert [b["tools"][0]["function"]["name"] for b in bodies] == ["image_zoom_in_tool", "get_weather"]
    return {"tool_call": bodies[0], "tool_result_follow_up": bodies[1]}


SEED_REQUESTS = seed_tool_requests()
CAPITAL = [{"role": "user", "content": "Where is the capital of China?"}]


# Servers -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint whose chat template is the built-in `ernie-4.5-thinking`."""
    out = tmp_path_factory.mktemp("thinking-checkpoint") / "ernie-random-thinking"
    return make_random_checkpoint(out, "--template", "ernie-4.5-thinking")


@pytest.fixture(scope="module")
def thinking_triton(
    tmp_path_factory: pytest.TempPathFactory, thinking_checkpoint: Path
) -> Iterator[TritonServer]:
    base = tmp_path_factory.mktemp("thinking-triton")
    write_row(base / "models", THINKING_ROW, {"model": str(thinking_checkpoint), **THINKING_ROW_PARAMS})
    with running_server(base, base / "models", THINKING_ROW) as server:
        yield server


@pytest.fixture(scope="module")
def thinking_frontend(
    thinking_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Frontend]:
    log_path = tmp_path_factory.mktemp("thinking-frontend") / "frontend.log"
    with start_frontend(thinking_triton.http_url, THINKING_ROW, log_path) as frontend:
        yield frontend


@pytest.fixture(scope="module")
def thinking_client(thinking_frontend: Frontend) -> openai.OpenAI:
    return openai.OpenAI(base_url=thinking_frontend.base_url, api_key="EMPTY", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def tokenizer(thinking_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(thinking_checkpoint)


# What a response should say, read back from its token ids ----------------------------------------------


@dataclass
class Reply:
    """One choice of a response, streamed or not, as a client accumulates it."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, arguments)
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    completion_token_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0


def reply_of(response: Any) -> Reply:
    """A non-streaming ChatCompletion; checks the message shape on the way."""
    (choice,) = response.choices
    message = choice.message
    assert message.role == "assistant" and response.object == "chat.completion"
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert all(c.type == "function" for c in message.tool_calls or [])
    extra = message.model_extra or {}
    return Reply(
        message.reasoning_content or "",
        message.content or "",
        calls,
        choice.finish_reason,
        extra.get("prompt_token_ids") or [],
        extra.get("completion_token_ids") or [],
        response.usage.completion_tokens,
    )


def reply_of_stream(chunks: Any) -> Reply:
    """Accumulates a stream the way OpenAI clients do, asserting OpenAI's chunk shape: one id for every chunk,
    the role first, each tool-call delta in its own chunk with its index, id / type / name only on a call's
    first delta (arguments "" there), then arguments fragments."""
    reply, ids, calls = Reply(), set(), {}
    for n, chunk in enumerate(chunks):
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:  # the usage chunk
            reply.completion_tokens = chunk.usage.completion_tokens
            continue
        (choice,) = chunk.choices
        delta, extra = choice.delta, choice.delta.model_extra or {}
        assert (delta.role == "assistant") == (n == 0), chunk
        assert reply.finish_reason is None, "nothing follows the finish reason but usage"
        reply.reasoning += delta.reasoning_content or ""
        reply.content += delta.content or ""
        reply.completion_token_ids += extra.get("completion_token_ids") or []
        reply.finish_reason = choice.finish_reason
        assert len(delta.tool_calls or []) <= 1, "one tool-call delta per chunk"
        for call in delta.tool_calls or []:
            first = call.index not in calls
            assert (call.id is not None, call.type is not None, call.function.name is not None) == (
                first,
            ) * 3
            if first:
                assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
                assert call.function.arguments == "" and call.index == len(calls)
                calls[call.index] = [call.id, call.function.name, ""]
            calls[call.index][2] += call.function.arguments
    assert len(ids) == 1
    reply.tool_calls = [tuple(calls[i]) for i in sorted(calls)]
    return reply


def assert_parsed_from_tokens(reply: Reply, tokenizer: Tokenizer, thinking: bool, tools: bool) -> None:
    """The reply is the parsers' reading of its own completion token ids (and well-formed)."""
    ids = reply.completion_token_ids
    assert ids and len(ids) == reply.completion_tokens
    reasoning, content, calls = parse_output(
        tokenizer.decode(ids), PARSER, PARSER if tools else "", thinking_enabled=thinking
    )
    assert (reply.reasoning, reply.content) == (reasoning, content)
    assert [(name, json.loads(args)) for _, name, args in reply.tool_calls] == [
        (c.name, json.loads(c.arguments)) for c in calls
    ]
    assert reply.finish_reason in {"length", "tool_calls" if calls else "stop"}


def think_end_id(tokenizer: Tokenizer) -> int:
    return tokenizer.added_tokens[THINK_END]


# The seed's tool requests on a random model --------------------------------------------------------------


@pytest.mark.parametrize("name", SEED_REQUESTS)
def test_seed_tool_request(thinking_client: openai.OpenAI, name: str) -> None:
    # Verbatim but for `model`, which the seed's curl leaves out and its Python example sets to "null".
    body = SEED_REQUESTS[name]
    reply = reply_of(thinking_client.chat.completions.create(model="null", **body))
    assert reply.finish_reason in ("stop", "length", "tool_calls")
    assert reply.completion_tokens > 0 and (reply.reasoning or reply.content or reply.tool_calls)
    for call_id, call_name, arguments in reply.tool_calls:
        assert call_id.startswith("chatcmpl-tool-") and call_name
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize("name", SEED_REQUESTS)
def test_seed_tool_request_streamed(thinking_client: openai.OpenAI, tokenizer: Tokenizer, name: str) -> None:
    body = {**SEED_REQUESTS[name], "stream": True, "stream_options": {"include_usage": True}}
    stream = thinking_client.chat.completions.create(
        model="null", extra_body={"return_token_ids": True}, **body
    )
    reply = reply_of_stream(stream)
    assert_parsed_from_tokens(reply, tokenizer, thinking=True, tools=True)


CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "city_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Beijing", "Paris"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def test_named_tool_choice_streams_in_the_same_shape(thinking_client: openai.OpenAI) -> None:
    """A forced call (schema-constrained arguments) streams like a parsed one: name first, then arguments."""

    def ask(stream: bool) -> Reply:
        response = thinking_client.chat.completions.create(
            model="null", messages=CAPITAL, tools=[CITY_TOOL], temperature=0, max_tokens=32, stream=stream,
            tool_choice={"type": "function", "function": {"name": "city_weather"}},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        return reply_of_stream(response) if stream else reply_of(response)

    whole, streamed = ask(False), ask(True)
    ((_, name, arguments),) = whole.tool_calls
    assert name == "city_weather" and set(json.loads(arguments)) == {"city", "unit"}
    assert [c[1:] for c in streamed.tool_calls] == [c[1:] for c in whole.tool_calls]
    assert whole.content == streamed.content == ""


# Thinking on / off and the reasoning budget --------------------------------------------------------------

THINKING_SWITCHES = {
    "default": ({}, True),
    "metadata": ({"metadata": {"enable_thinking": False}}, False),
    "chat_template_kwargs": ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, False),
}


@pytest.mark.parametrize("switch", THINKING_SWITCHES)
def test_enable_thinking_switch(
    thinking_client: openai.OpenAI, thinking_checkpoint: Path, tokenizer: Tokenizer, switch: str
) -> None:
    kwargs, thinking = THINKING_SWITCHES[switch]
    kwargs = {**kwargs, "extra_body": {**kwargs.get("extra_body", {}), "return_token_ids": True}}
    response = thinking_client.chat.completions.create(
        model="null", messages=CAPITAL, max_tokens=8, temperature=0, **kwargs
    )
    reply = reply_of(response)
    # The prompt the backend rendered: thinking left open, or closed right away.
    prompt = tokenizer.decode(reply.prompt_token_ids, skip_special_tokens=False)
    assert prompt.endswith("Assistant: <think>" if thinking else "Assistant: <think>\n</think>\n"), prompt
    template = ChatTemplate.from_dir(thinking_checkpoint)
    rendered = template.render(CAPITAL, enable_thinking=thinking)
    assert reply.prompt_token_ids == tokenizer.encode(rendered)
    assert response.usage.prompt_tokens == len(reply.prompt_token_ids)
    # The parser follows the prompt: with thinking off nothing is reasoning.
    assert_parsed_from_tokens(reply, tokenizer, thinking=thinking, tools=False)
    if not thinking:
        assert reply.reasoning == "" and reply.content == tokenizer.decode(reply.completion_token_ids)


@pytest.mark.parametrize("place", ["top_level", "metadata"])
@pytest.mark.parametrize("budget", [1, 5])
def test_reasoning_max_tokens_bounds_the_reasoning(
    thinking_client: openai.OpenAI, tokenizer: Tokenizer, place: str, budget: int
) -> None:
    extra_body = {"return_token_ids": True, "ignore_eos": True}
    if place == "top_level":
        extra_body["reasoning_max_tokens"] = budget
    where = {"metadata": {"reasoning_max_tokens": budget}} if place == "metadata" else {}
    response = thinking_client.chat.completions.create(
        model="null", messages=CAPITAL, max_tokens=budget + 6, temperature=1.0, seed=budget,
        extra_body=extra_body, **where,
    )
    reply = reply_of(response)
    ids = reply.completion_token_ids
    assert len(ids) == budget + 6 and reply.finish_reason == "length"
    assert think_end_id(tokenizer) in ids, "the budget forces </think>"
    assert ids.index(think_end_id(tokenizer)) <= budget  # the reasoning's token count
    assert_parsed_from_tokens(reply, tokenizer, thinking=True, tools=False)


def test_parser_markup_streams_no_empty_chunk(thinking_client: openai.OpenAI) -> None:
    """vLLM's rule: the step whose token the reasoning parser takes in (the </think> the budget forces) sends
    no chunk; the usage still counts it. With return_token_ids it would send one, to carry the id."""
    stream = thinking_client.chat.completions.create(
        model="null", messages=CAPITAL, max_tokens=10, temperature=1.0, seed=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"reasoning_max_tokens": 2, "ignore_eos": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0] for c in chunks[1:] if c.choices]  # after the role chunk
    assert all(d.delta.content or d.delta.reasoning_content or d.finish_reason for d in deltas), deltas
    assert len(deltas) < chunks[-1].usage.completion_tokens == 10


def test_triton_outputs_reasoning_and_honour_the_switches(
    thinking_triton: TritonServer, tokenizer: Tokenizer
) -> None:
    """Through Triton's generate API: reasoning_output, chat_template_kwargs, reasoning_max_tokens."""

    def generate(**extra: Any) -> dict:
        payload = {
            "messages": json.dumps(CAPITAL),
            "return_token_ids": True,
            "return_num_input_tokens": True,
            "return_finish_reason": True,
            **extra,
        }
        url = f"{thinking_triton.http_url}/v2/models/{THINKING_ROW}/generate"
        response = httpx.post(url, json=payload, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    sampling = {"max_tokens": 10, "reasoning_max_tokens": 4, "ignore_eos": True, "temperature": 0}
    on = generate(sampling_parameters=json.dumps(sampling))
    ids = on["output_token_ids"]
    assert ids.index(think_end_id(tokenizer)) <= 4  # the budget forced `</think>`
    reasoning, content, _ = parse_output(tokenizer.decode(ids), PARSER, "")
    assert (on["reasoning_output"], on["text_output"]) == (reasoning, content) and reasoning
    off = generate(
        sampling_parameters=json.dumps(sampling), chat_template_kwargs=json.dumps({"enable_thinking": False})
    )
    assert "reasoning_output" not in off or off["reasoning_output"] == ""
    assert off["text_output"] == tokenizer.decode(off["output_token_ids"])
    # Thinking off closes the think block in the prompt: the same prompt plus "\n</think>\n".
    assert off["prompt_token_ids"][: len(on["prompt_token_ids"])] == on["prompt_token_ids"]
    tail = off["prompt_token_ids"][len(on["prompt_token_ids"]) :]
    assert tokenizer.decode(tail, skip_special_tokens=False) == "\n</think>\n"
    assert off["num_input_tokens"] == on["num_input_tokens"] + len(tail)


# The trained demo model: the weather round trip's meaning --------------------------------------------------


def demo_checkpoint_problem() -> str | None:
    """Why checkpoints/ernie-4.5-tiny is not the trained thinking demo model, or None when it is."""
    if not (DEMO_CHECKPOINT / "config.json").is_file():
        return f"{DEMO_CHECKPOINT} is absent (scripts/train_demo_model.py makes it)"
    if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
        return f"{DEMO_CHECKPOINT} has no weights yet (scripts/train_demo_model.py writes them last)"
    if not ChatTemplate.from_dir(DEMO_CHECKPOINT).supports_thinking:
        return (
            f"{DEMO_CHECKPOINT} is not the trained demo model (its chat template has no thinking; "
            "scripts/setup.sh's random stand-in?)"
        )
    return None


BEIJING = {"role": "user", "content": "What's the weather like in Beijing?"}
BEIJING_RESULT = "location: Beijing, temperature: 23, weather: sunny, unit: {unit}"
GREEDY = {"temperature": 0, "max_tokens": 96}


@pytest.fixture(scope="module")
def demo_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """model_repository/ernie-4.5-tiny-thinking as shipped, its `model` found under ERNIE_MODEL_ROOT."""
    problem = demo_checkpoint_problem()
    if problem:
        pytest.skip(problem)
    base = tmp_path_factory.mktemp("demo-triton")
    shutil.copytree(ROOT / "model_repository" / DEMO_ROW, base / "models" / DEMO_ROW)
    (base / "model_root").mkdir()
    (base / "model_root" / "ernie-4.5-tiny").symlink_to(DEMO_CHECKPOINT)
    with running_server(base, base / "models", DEMO_ROW) as server:
        yield server


@pytest.fixture(scope="module")
def demo_client(
    demo_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    log_path = tmp_path_factory.mktemp("demo-frontend") / "frontend.log"
    with start_frontend(demo_triton.http_url, DEMO_ROW, log_path) as frontend:
        yield openai.OpenAI(base_url=frontend.base_url, api_key="EMPTY", max_retries=0, timeout=TIMEOUT)


def assert_beijing_call(name: str, arguments: str) -> str:
    """A get_weather call whose JSON arguments name Beijing, the question's city; returns its unit."""
    parsed = json.loads(arguments)
    assert name == "get_weather" and parsed["location"] == "Beijing", arguments
    assert parsed["unit"] in ("c", "f"), arguments
    return parsed["unit"]


def test_demo_triton_outputs_reasoning_and_tool_calls(demo_triton: TritonServer) -> None:
    payload = {
        "messages": json.dumps([BEIJING]),
        "tools": json.dumps([WEATHER_TOOL]),
        "sampling_parameters": json.dumps(GREEDY),
        "return_finish_reason": True,
    }
    url = f"{demo_triton.http_url}/v2/models/{DEMO_ROW}"
    whole = httpx.post(f"{url}/generate", json=payload, timeout=TIMEOUT).json()
    assert whole["reasoning_output"] and whole["text_output"] == "" and whole["finish_reason"] == "tool_calls"
    (call,) = json.loads(whole["tool_calls"])  # non-streaming: one whole call per index
    assert call["index"] == 0 and call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert_beijing_call(call["function"]["name"], call["function"]["arguments"])

    streamed = httpx.post(f"{url}/generate_stream", json={**payload, "stream": True}, timeout=TIMEOUT)
    events = [
        json.loads(line[len("data: ") :]) for line in streamed.text.splitlines() if line.startswith("data: ")
    ]
    deltas = [d for e in events if e.get("tool_calls") for d in json.loads(e["tool_calls"])]
    assert "".join(e.get("reasoning_output", "") for e in events) == whole["reasoning_output"]
    header, *pieces = deltas  # the name first, then the arguments as deltas
    assert header["function"] == {"name": "get_weather", "arguments": ""} and pieces
    assert all(set(p) == {"index", "function"} for p in pieces)
    assert "".join(p["function"]["arguments"] for p in pieces) == call["function"]["arguments"]
    assert events[-1]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_demo_weather_round_trip(demo_client: openai.OpenAI, stream: bool, thinking: bool) -> None:
    def ask(messages: list[dict]) -> Reply:
        response = demo_client.chat.completions.create(
            model=DEMO_ROW, messages=messages, tools=[WEATHER_TOOL], stream=stream,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}, **GREEDY,
        )
        return reply_of_stream(response) if stream else reply_of(response)

    first = ask([BEIJING])
    assert first.finish_reason == "tool_calls" and first.content == "", first
    assert bool(first.reasoning) == thinking
    ((call_id, name, arguments),) = first.tool_calls
    unit = assert_beijing_call(name, arguments)
    history = [
        BEIJING,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": BEIJING_RESULT.format(unit=unit)},
    ]
    answer = ask(history)
    assert answer.finish_reason == "stop" and not answer.tool_calls and bool(answer.reasoning) == thinking
    assert answer.content.strip().startswith("The weather in Beijing "), answer
    assert "temperature: 23 " in answer.content, answer
