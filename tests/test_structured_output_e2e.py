"""Structured output through the whole stack: openai client -> openai_frontend -> tritonserver -> engine.

Runs on the session's random checkpoint (tests/fixtures/triton.py) at temperature 1: a random model takes
almost any token the grammar allows, so every response that parses and validates is the grammar's doing.
Schemas bound strings and numbers so each answer completes well inside max_tokens.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.frontend import Frontend
from tests.fixtures.triton import TritonServer, longer_context_row

TIMEOUT = 120
NAMED_TOOL = {"type": "function", "function": {"name": "weather"}}
CONCURRENCY = 8  # the test row's max_num_seqs
NUM_SCHEMA_REQUESTS = 56
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {"enum": ["Beijing", "Shanghai", "深圳"]},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                       "minItems": 1, "maxItems": 3},
        },
        "required": ["city", "scores"],
        "additionalProperties": False,
    },
]
# Small: the tool is rendered into the prompt, and the test row's max_model_len is 256.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Beijing", "Paris"]}, "days": {"enum": [1, 2, 3]}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(openai_frontend: Frontend) -> openai.OpenAI:
    return openai.OpenAI(base_url=openai_frontend.base_url, api_key="EMPTY", max_retries=0, timeout=TIMEOUT)


def chat(client: openai.OpenAI, model: str, seed: int, **kwargs) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], temperature=1.0,
        seed=seed, max_tokens=kwargs.pop("max_tokens", 48), **kwargs,
    )


def test_json_schema_responses_always_validate(client: openai.OpenAI, openai_frontend: Frontend) -> None:
    def one(seed: int) -> tuple[dict, str, str]:
        schema = SCHEMAS[seed % len(SCHEMAS)]
        fmt = {"type": "json_schema",
               "json_schema": {"name": f"s{seed % 2}", "schema": schema, "strict": True}}
        choice = chat(client, openai_frontend.model, seed, response_format=fmt).choices[0]
        return schema, choice.message.content, choice.finish_reason

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, range(NUM_SCHEMA_REQUESTS)))
    for schema, content, finish in results:
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), schema)


def test_guided_choice_answers_are_choices(client: openai.OpenAI, openai_frontend: Frontend) -> None:
    choices = ["positive", "negative", "中性"]

    def one(seed: int) -> str:
        # vLLM >= 0.11 clients send the object form
        body = {"guided_choice": choices} if seed % 2 else {"structured_outputs": {"choice": choices}}
        return chat(client, openai_frontend.model, seed, extra_body=body).choices[0]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for choice in pool.map(one, range(16)):
            assert choice.message.content in choices and choice.finish_reason == "stop"


def test_guided_regex_answers_match(client: openai.OpenAI, openai_frontend: Frontend) -> None:
    pattern = r"[A-Z]{2}-[0-9]{2,4}"

    def one(seed: int) -> str:
        out = client.completions.create(model=openai_frontend.model, prompt=f"Code {seed}:", temperature=1.0,
                                        seed=seed, max_tokens=16, extra_body={"guided_regex": pattern})
        return out.choices[0]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for choice in pool.map(one, range(16)):
            assert re.fullmatch(pattern, choice.text) and choice.finish_reason == "stop", choice.text


def test_json_object_streamed(client: openai.OpenAI, openai_frontend: Frontend) -> None:
    """json_object on a random model rarely closes its keys in time: checked for a valid JSON prefix shape
    and an honest finish reason ("stop" only with a complete object)."""
    stream = chat(client, openai_frontend.model, 5, max_tokens=24, stream=True,
                  response_format={"type": "json_object"})
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length"


def test_max_tokens_cut_is_length_not_stop(client: openai.OpenAI, openai_frontend: Frontend) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}}
    choice = chat(client, openai_frontend.model, 1, max_tokens=3, response_format=fmt).choices[0]
    assert choice.finish_reason == "length"


def test_named_tool_choice_constrains_arguments(client: openai.OpenAI, openai_frontend: Frontend) -> None:
    schema = WEATHER_TOOL["function"]["parameters"]
    for seed in range(4):
        # The forced call's schema replaces a response format (as vLLM), here the structured_outputs form.
        extra = {"extra_body": {"structured_outputs": {"regex": "x"}}} if seed == 3 else {}
        message = chat(client, openai_frontend.model, seed, max_tokens=24, tools=[WEATHER_TOOL],
                       tool_choice=NAMED_TOOL, **extra).choices[0].message
        (call,) = message.tool_calls
        assert call.function.name == "weather" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), schema)
    stream = chat(client, openai_frontend.model, 9, max_tokens=24, stream=True, tools=[WEATHER_TOOL],
                  tool_choice=NAMED_TOOL)
    deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "weather"
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), schema)


CLOCK_TOOL = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CST"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_required_tool_choice_always_calls_a_tool(client: openai.OpenAI, triton_server: TritonServer,
                                                   ernie_random_checkpoint: Path) -> None:
    """tool_choice "required" (as vLLM): calls of the given tools, finish_reason tool_calls. One call
    (parallel_tool_calls false): a random model may list calls until max_tokens."""
    tools = [WEATHER_TOOL, CLOCK_TOOL]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}

    def check(calls) -> None:
        assert calls
        for call in calls:
            assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    # Two tools in the prompt take more than the test row's 256 tokens.
    with longer_context_row(triton_server, ernie_random_checkpoint, 640) as model:
        one = {"tools": tools, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 120}
        for seed in range(3):
            choice = chat(client, model, seed, **one).choices[0]
            assert choice.finish_reason == "tool_calls" and not choice.message.content
            assert len(choice.message.tool_calls) == 1
            check(choice.message.tool_calls)
        chunks = [c.choices[0] for c in chat(client, model, 5, stream=True, **one) if c.choices]
    assert chunks[-1].finish_reason == "tool_calls" and not "".join(c.delta.content or "" for c in chunks)
    check([openai.types.chat.ChatCompletionMessageToolCall(**d.model_dump(exclude={"index"}))
           for c in chunks for d in c.delta.tool_calls or []])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tool_choice": "required"}, "needs tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "invalid JSON schema"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "invalid regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
     "invalid JSON schema: no output can satisfy it"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not in tools"),
])
def test_invalid_constraint_is_a_400(client: openai.OpenAI, openai_frontend: Frontend, kwargs: dict,
                                     message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        chat(client, openai_frontend.model, 0, **kwargs)


def test_triton_sampling_parameters_take_vllm_structured_outputs(triton_server: TritonServer) -> None:
    """Triton's vLLM backend's keys: structured_outputs (JSON text) and guided_decoding (an object)."""
    url = f"{triton_server.http_url}/v2/models/{triton_server.model}/generate"
    choice = {"choice": ["yes", "no"]}
    constraints = [{"structured_outputs": json.dumps(choice)},
                   {"guided_decoding": {**choice, "backend": "auto"}}]
    for seed, constraint in enumerate(constraints):
        sampling = {"max_tokens": 8, "temperature": 1.0, "seed": seed, **constraint}
        reply = httpx.post(url, json={"text_input": "x", "sampling_parameters": json.dumps(sampling)},
                           timeout=TIMEOUT)
        assert reply.status_code == 200 and reply.json()["text_output"] in ("yes", "no"), reply.text
    bad = {"max_tokens": 8, "guided_decoding": {"whitespace_pattern": " "}}
    reply = httpx.post(url, json={"text_input": "x", "sampling_parameters": json.dumps(bad)}, timeout=TIMEOUT)
    assert reply.status_code == 400 and "not supported: whitespace_pattern" in reply.json()["error"]
