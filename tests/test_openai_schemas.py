"""Unit tests of the OpenAI frontend's request translation and response assembly (no server)."""

from __future__ import annotations

import asyncio
import json

import pytest
from ernie_engine.sampling_params import SamplingParams
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from openai_frontend.errors import OpenAIError, _validation_error
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.outputs import (
    GenerateOutput,
    RequestState,
    chat_response,
    completion_logprobs,
    completion_response,
    parse_response,
    usage,
)
from openai_frontend.routers.chat import _RequiredToolCalls, delta_choices
from openai_frontend.routers.models import resolve_model
from openai_frontend.schemas.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
    DetokenizeRequest,
)
from openai_frontend.streaming import DONE, ResponseMeta, event_stream
from openai_frontend.translate import chat_payload, completion_payloads
from openai_frontend.triton_client import TritonClient, TritonError

USER = [{"role": "user", "content": "Where is the capital of China?"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def sampling(payload: dict) -> dict:
    return json.loads(payload["sampling_parameters"])


# ---- request translation ---------------------------------------------------------------------


def test_seed_curl_body_needs_no_model_and_sends_defaults_only():
    payload = chat_payload(chat())
    assert json.loads(payload["messages"]) == USER
    assert sampling(payload) == {}  # the backend's own defaults apply
    assert payload["stream"] is True  # Triton always streams (the frontend sums a non-streaming answer)
    assert payload["return_finish_reason"] and payload["return_num_input_tokens"]
    assert payload["return_num_output_tokens"]
    for absent in ("return_logprobs", "return_token_ids", "tools", "chat_template_kwargs"):
        assert absent not in payload


def test_metadata_enable_thinking_becomes_chat_template_kwargs():
    payload = chat_payload(chat(metadata={"enable_thinking": False}))
    assert json.loads(payload["chat_template_kwargs"]) == {"enable_thinking": False}


def test_explicit_chat_template_kwargs_win_over_metadata():
    req = chat(metadata={"enable_thinking": False}, chat_template_kwargs={"enable_thinking": True, "x": 1})
    assert json.loads(chat_payload(req)["chat_template_kwargs"]) == {"enable_thinking": True, "x": 1}


def test_metadata_sampling_keys_are_honoured_below_top_level_ones():
    req = chat(temperature=0.5, metadata={"temperature": 0.9, "top_k": 4, "repetition_penalty": 1.1,
                                          "max_tokens": 7, "unrelated": "kept out"})
    params = sampling(chat_payload(req))
    assert params == {"temperature": 0.5, "top_k": 4, "repetition_penalty": 1.1, "max_tokens": 7}


def test_fastdeploy_extras_reach_sampling_parameters():
    req = chat(top_k=5, min_p=0.1, min_tokens=2, repetition_penalty=1.05, bad_words=["bad"],
               stop_token_ids=[7], include_stop_str_in_output=True, seed=42, n=3, reasoning_max_tokens=9,
               stop="END",
               presence_penalty=0.5, frequency_penalty=-0.5, temperature=0.7, top_p=0.9, max_tokens=30,
               ignore_eos=True)
    params = sampling(chat_payload(req))
    assert params == {
        "top_k": 5, "min_p": 0.1, "min_tokens": 2, "repetition_penalty": 1.05, "bad_words": ["bad"],
        "stop_token_ids": [7], "include_stop_str_in_output": True, "seed": 42, "n": 3,
        "reasoning_max_tokens": 9, "stop": ["END"], "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 30, "ignore_eos": True,
    }
    SamplingParams.from_dict(params)  # every key is one the engine accepts


def test_max_completion_tokens_wins_over_max_tokens():
    assert sampling(chat_payload(chat(max_tokens=10, max_completion_tokens=4)))["max_tokens"] == 4


def test_seed_vl_example_top_p_zero_means_greedy():
    params = sampling(chat_payload(chat(temperature=0.0001, top_p=0, max_tokens=4096)))
    assert params == {"temperature": 0.0001, "top_k": 1, "max_tokens": 4096}
    assert SamplingParams.from_dict(params).greedy


def test_chat_logprobs_and_token_ids_ask_for_those_outputs():
    payload = chat_payload(chat(logprobs=True, top_logprobs=3, return_token_ids=True))
    assert sampling(payload) == {"logprobs": 3}
    assert payload["return_logprobs"] is True and payload["return_token_ids"] is True
    assert sampling(chat_payload(chat(logprobs=True)))["logprobs"] == 0


@pytest.mark.parametrize(("fmt", "expected"), [
    ({"type": "json_object"}, {"guided_json_object": True}),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     {"guided_json": {"type": "object"}}),
    ({"type": "text"}, {}),
])
def test_response_format_maps_to_guided_decoding(fmt, expected):
    params = sampling(chat_payload(chat(response_format=fmt)))
    assert params == expected
    SamplingParams.from_dict(params)


def test_guided_extras_pass_through():
    assert sampling(chat_payload(chat(guided_regex="[0-9]+")))["guided_regex"] == "[0-9]+"
    assert sampling(chat_payload(chat(guided_choice=["a", "b"])))["guided_choice"] == ["a", "b"]
    assert sampling(chat_payload(chat(guided_grammar="root ::= 'x'")))["guided_grammar"] == "root ::= 'x'"


def test_messages_tools_and_content_parts_pass_through_unchanged():
    messages = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.jpg", "detail": "high"}},
            {"type": "text", "text": "OCR:"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"location": "Beijing", "unit": "c"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"},
                                               "strict": True}}]
    payload = chat_payload(ChatCompletionRequest.model_validate({"messages": messages, "tools": tools}))
    assert json.loads(payload["messages"]) == messages
    assert json.loads(payload["tools"]) == tools


def test_required_tool_choice_constrains_to_calls_of_the_tools():
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("a", "b")]
    params = json.loads(chat_payload(chat(tools=tools, tool_choice="required"))["sampling_parameters"])
    schema = params["guided_json"]
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]] == [["a"], ["b"]]
    assert "maxItems" not in schema
    one = chat_payload(chat(tools=tools, tool_choice="required", parallel_tool_calls=False))
    assert json.loads(one["sampling_parameters"])["guided_json"]["maxItems"] == 1
    with pytest.raises(OpenAIError, match="needs tools"):
        chat_payload(chat(tool_choice="required"))


def test_required_tool_calls_are_held_until_the_array_completes():
    convert, state = _RequiredToolCalls(), RequestState(n=1)
    first = GenerateOutput(text='[{"name": "a", "param')
    convert(first, state)
    assert first.text == "" and not first.tool_calls  # held back
    last = GenerateOutput(text='eters": {"x": 1}}]', finish_reason="stop")
    convert(last, state)
    assert last.text == "" and last.finish_reason == "tool_calls"
    (call,) = last.tool_calls
    assert call["function"] == {"name": "a", "arguments": '{"x": 1}'}
    assert call["id"].startswith("chatcmpl-tool-")
    cut = GenerateOutput(text='[{"name": "a"', finish_reason="length")  # max_tokens: stays content
    convert(cut, state)
    assert cut.text == '[{"name": "a"' and not cut.tool_calls and cut.finish_reason == "length"


def test_tool_choice_none_hides_the_tools():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert "tools" not in chat_payload(chat(tools=tools, tool_choice="none"))
    assert "tools" in chat_payload(chat(tools=tools, tool_choice="auto"))


def test_null_options_mean_their_defaults():
    """Many clients send null for what they leave alone; vLLM takes that as the default, so must we."""
    nulls = dict.fromkeys(["n", "stream", "stream_options", "temperature", "add_generation_prompt",
                           "continue_final_message", "tool_choice", "logprobs", "max_completion_tokens"])
    req = chat(**nulls, metadata={"temperature": 0.3})
    assert (req.n, req.stream, req.add_generation_prompt) == (1, False, True)
    payload = chat_payload(req)
    assert sampling(payload) == {"temperature": 0.3} and "chat_template_kwargs" not in payload
    assert CompletionRequest.model_validate({"prompt": "hi", "echo": None, "n": None, "stream": None}).n == 1


def test_developer_role_reaches_the_template_as_system():
    """OpenAI's "developer" messages are its newer name for system messages; the ERNIE template knows only
    "system"."""
    req = chat(messages=[{"role": "developer", "content": "Be brief"}, *USER])
    assert json.loads(chat_payload(req)["messages"]) == [{"role": "system", "content": "Be brief"}, *USER]


def test_named_tool_choice_needs_a_function_name():
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(ValidationError):  # not silently taken as "auto"
        chat(tools=tools, tool_choice={"type": "function", "function": {}})


@pytest.mark.parametrize(("model", "fields", "param"), [
    (ChatCompletionRequest, {"messages": USER, "tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function.name"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (CompletionRequest, {"prompt": ["a", 5]}, "prompt.1"),
    (CompletionRequest, {"prompt": "a", "stop": [None]}, "stop.0"),
])
def test_validation_errors_name_the_parameter_without_union_branches(model, fields, param):
    with pytest.raises(ValidationError) as err:
        model.model_validate(fields)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in err.value.errors()]
    assert _validation_error(RequestValidationError(errors)).param == param


def test_token_ids_beyond_int64_are_rejected():
    """Triton's INT64 tensors cannot parse them: it answered 500 "Unable to parse 'data'"."""
    for prompt in ([2**63], [[1], [-(2**63) - 1]]):
        with pytest.raises(ValidationError, match="64-bit"):
            CompletionRequest(prompt=prompt)
    assert CompletionRequest(prompt=[2**63 - 1]).prompts_are_token_ids
    with pytest.raises(ValidationError):
        DetokenizeRequest(tokens=[2**64])


def test_text_that_is_no_unicode_is_a_bad_request():
    """JSON's "\\ud800" escape parses to a lone surrogate, which has no UTF-8 encoding: 400, not a 500."""
    client = TritonClient("http://127.0.0.1:9")  # refused before anything is sent
    with pytest.raises(TritonError) as err:
        asyncio.run(client.generate("m", {"text_input": "a\ud800b"}))
    assert err.value.status_code == 400 and "Unicode" in err.value.message


def test_no_model_named_while_several_are_served_says_so():
    class TwoModels:
        async def ready_models(self, max_age: float = 0.0) -> list[str]:
            return ["a", "b"]

    with pytest.raises(OpenAIError, match="No model named and 2 served: set `model` to one of: a, b"):
        asyncio.run(resolve_model(TwoModels(), None))  # it said "The model `None` does not exist"


def test_unknown_fields_are_ignored():
    req = chat(some_future_option={"a": 1}, parallel_tool_calls=True)
    assert "some_future_option" not in json.dumps(chat_payload(req))


@pytest.mark.parametrize("fields", [
    {"messages": "hello"},
    {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": USER, "temperature": "hot"},
    {"messages": USER, "n": 0},
    {"messages": USER, "max_tokens": 0},
    {"messages": USER, "top_p": 1.5},
    {"messages": USER, "top_logprobs": 2},
    {"messages": USER, "stream_options": {"include_usage": True}},
    {"messages": USER, "guided_regex": "a", "guided_choice": ["a"]},
    {"messages": USER, "response_format": {"type": "json_schema"}},
    {"messages": USER, "mm_processor_kwargs": {"image_max_pixels": 3136}},  # was silently ignored
    # A text part's text went to the template as "None" / "5" / "" (OpenAI: 400).
    {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": USER, "seed": 2**64},  # vLLM's bound: a 64-bit integer
])
def test_invalid_chat_requests_are_rejected(fields):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(fields)


def test_completion_prompt_forms():
    text = completion_payloads(CompletionRequest(prompt="hi", max_tokens=3, logprobs=2))
    assert len(text) == 1 and text[0]["text_input"] == "hi"
    assert sampling(text[0]) == {"max_tokens": 3, "logprobs": 2} and text[0]["return_logprobs"] is True
    many = completion_payloads(CompletionRequest(prompt=["a", "b"]))
    assert [p["text_input"] for p in many] == ["a", "b"]
    ids = completion_payloads(CompletionRequest(prompt=[1, 2, 3]))
    assert len(ids) == 1 and ids[0]["prompt_token_ids"] == [1, 2, 3] and "text_input" not in ids[0]
    batch = completion_payloads(CompletionRequest(prompt=[[1, 2], [3]]))
    assert [p["prompt_token_ids"] for p in batch] == [[1, 2], [3]]


def test_unset_max_tokens_is_the_rest_of_the_context():
    """As FastDeploy, whose seed example streams a completion without max_tokens (OpenAI and vLLM stop at 16);
    echo with max_tokens 0 asks for one token, dropped by the router."""
    for fields in ({}, {"max_tokens": None}):
        (payload,) = completion_payloads(CompletionRequest.model_validate({"prompt": "hi", **fields}))
        assert "max_tokens" not in sampling(payload)
    (payload,) = completion_payloads(CompletionRequest(prompt="hi", echo=True, max_tokens=0))
    assert sampling(payload)["max_tokens"] == 1
    (payload,) = completion_payloads(CompletionRequest(prompt="hi", metadata={"max_tokens": 7}))
    assert sampling(payload)["max_tokens"] == 7
    assert "max_tokens" not in sampling(chat_payload(chat()))


def test_echo_with_max_tokens_0_asks_for_one_token_and_no_backend_echo():
    """OpenAI's and vLLM's prompt-only echo: one token is sampled (and dropped); the frontend decodes token-id
    prompts itself, as the backend's echo would carry the sampled token's text too."""
    (payload,) = completion_payloads(CompletionRequest(prompt=[1, 2], echo=True, max_tokens=0, logprobs=1))
    assert sampling(payload)["max_tokens"] == 1 and sampling(payload)["prompt_logprobs"] == 1
    assert "exclude_input_in_output" not in payload
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="hi", max_tokens=0)  # without echo there is nothing to answer


@pytest.mark.parametrize("fields", [{"prompt": []}, {"prompt": 5}, {"prompt": "x", "logprobs": 21},
                                    {"prompt": "x", "suffix": "y"}, {"prompt": "x", "best_of": 2}])
def test_invalid_completion_requests_are_rejected(fields):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(fields)


# ---- response assembly ----------------------------------------------------------------------


LOGPROBS = [
    {"token_id": 5, "token": "Bei", "logprob": -0.1,
     "top_logprobs": [{"token_id": 5, "token": "Bei", "logprob": -0.1},
                      {"token_id": 6, "token": "Sh", "logprob": -2.5}]},
    {"token_id": 9, "token": "jing", "logprob": -0.2, "top_logprobs": []},
]


def triton(**outputs) -> dict:
    return {"model_name": "m", "model_version": "1", **outputs}


def one(body: dict) -> GenerateOutput:
    (out,) = parse_response(body)
    return out


def test_streaming_response_is_one_completion_with_scalars():
    # Triton's generate JSON renders one-element tensors as scalars.
    out = one(triton(text_output="hi", index=1, num_input_tokens=5, finish_reason="", output_token_ids=7,
                     prompt_token_ids=3))
    assert (out.text, out.index, out.num_input_tokens, out.finish_reason) == ("hi", 1, 5, None)
    assert (out.token_ids, out.prompt_token_ids) == ([7], [3])
    assert one(triton(text_output="a b", output_token_ids=[4, 5])).token_ids == [4, 5]


def test_non_streaming_response_splits_into_its_n_completions():
    body = triton(text_output=["ab", "c"], index=[0, 1], finish_reason=["length", "stop"],
                  num_input_tokens=[4, 4], num_output_tokens=[2, 1], output_token_ids=[10, 11, 12],
                  prompt_token_ids=[1, 2, 3, 4], logprobs=[json.dumps(LOGPROBS), "[]"])
    first, second = parse_response(body)
    assert (first.index, first.text, first.finish_reason, first.token_ids) == (0, "ab", "length", [10, 11])
    assert (second.index, second.text, second.finish_reason, second.token_ids) == (1, "c", "stop", [12])
    assert first.prompt_token_ids == second.prompt_token_ids == [1, 2, 3, 4]
    assert len(first.logprobs) == 2 and second.logprobs == []


def test_chat_response_accumulates_deltas_per_choice():
    state = RequestState(n=2)
    events = [
        triton(index=0, reasoning_output="think", num_input_tokens=4, num_output_tokens=1),
        triton(index=1, text_output="B", num_input_tokens=4, num_output_tokens=1),
        triton(index=0, text_output="Be", num_output_tokens=2),
        triton(index=0, text_output="ijing", num_output_tokens=3, finish_reason="stop"),
        triton(index=1, text_output="C", num_output_tokens=2, finish_reason="length"),
    ]
    for event in events:
        state.add(one(event))
    resp = chat_response(state, id="chatcmpl-1", created=1, model="m", return_token_ids=False)
    first, second = resp.choices
    assert (first.message.content, first.message.reasoning_content, first.finish_reason) == (
        "Beijing", "think", "stop")
    assert (second.index, second.message.content, second.finish_reason) == (1, "BC", "length")
    assert resp.usage.model_dump(exclude_none=True) == {"prompt_tokens": 4, "completion_tokens": 5,
                                                        "total_tokens": 9}
    body = resp.model_dump()
    assert "tool_calls" not in body["choices"][0]["message"]
    assert "prompt_token_ids" not in body["choices"][0]["message"]


def test_tool_call_deltas_merge_into_full_calls():
    state = RequestState(n=1)
    deltas = [
        [{"index": 0, "id": "chatcmpl-tool-1", "type": "function",
          "function": {"name": "get_weather", "arguments": ""}}],
        [{"index": 0, "function": {"arguments": '{"location": '}}],
        [{"index": 0, "function": {"arguments": '"Beijing"}'}},
         {"index": 1, "id": "chatcmpl-tool-2", "type": "function",
          "function": {"name": "f", "arguments": "{}"}}],
    ]
    for d in deltas:
        state.add(one(triton(tool_calls=json.dumps(d))))
    state.add(one(triton(finish_reason="tool_calls")))
    choice = chat_response(state, id="c", created=1, model="m", return_token_ids=False).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [c.model_dump() for c in choice.message.tool_calls]
    assert calls == [
        {"id": "chatcmpl-tool-1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location": "Beijing"}'}},
        {"id": "chatcmpl-tool-2", "type": "function", "function": {"name": "f", "arguments": "{}"}},
    ]


def test_stream_splits_tool_call_deltas_into_chunks_as_openai_does():
    header = {"index": 0, "id": "chatcmpl-tool-1", "type": "function",
              "function": {"name": "get_weather", "arguments": ""}}
    pieces = [{"index": 0, "function": {"arguments": '{"location": "Beijing"'}},
              {"index": 0, "function": {"arguments": ', "unit": "c"}'}}]
    out = one(triton(reasoning_output="r", tool_calls=json.dumps([header, *pieces]),
                     finish_reason="tool_calls", output_token_ids=[5, 6]))
    choices = [c.model_dump() for c in delta_choices(out, 0, return_token_ids=True)]
    # The name first, then one chunk per arguments fragment; the finish reason only on the last.
    assert [c["delta"]["tool_calls"] for c in choices] == [[header], [pieces[0]], [pieces[1]]]
    assert [c["finish_reason"] for c in choices] == [None, None, "tool_calls"]
    assert choices[0]["delta"]["reasoning_content"] == "r" and choices[0]["delta"]["content"] is None
    assert choices[0]["delta"]["completion_token_ids"] == [5, 6]
    assert all(c["delta"]["reasoning_content"] is None and "completion_token_ids" not in c["delta"]
               for c in choices[1:])


def test_chat_logprobs_take_openai_shape():
    state = RequestState(n=1)
    state.add(one(triton(text_output="Beijing", logprobs=json.dumps(LOGPROBS))))
    logprobs = chat_response(state, id="c", created=1, model="m", return_token_ids=False).choices[0].logprobs
    first = logprobs["content"][0]
    assert first["token"] == "Bei" and first["logprob"] == -0.1 and first["bytes"] == list(b"Bei")
    assert [t["token"] for t in first["top_logprobs"]] == ["Bei", "Sh"]


def test_completion_logprobs_take_legacy_shape_with_offsets():
    shaped = completion_logprobs(LOGPROBS, text_offset=3)
    # The chosen token is always among top_logprobs, as OpenAI's and vLLM's (logprobs=0 gives just it).
    assert shaped == {"tokens": ["Bei", "jing"], "token_logprobs": [-0.1, -0.2],
                      "top_logprobs": [{"Bei": -0.1, "Sh": -2.5}, {"jing": -0.2}], "text_offset": [3, 6]}
    assert completion_logprobs(LOGPROBS, text_offset=0, top=0)["top_logprobs"] == [{"Bei": -0.1},
                                                                                    {"jing": -0.2}]


def test_completion_response_indexes_prompts_and_echoes():
    states = [RequestState(n=2, offset=0), RequestState(n=2, offset=2)]
    for p, state in enumerate(states):
        for i in range(2):
            state.add(one(triton(index=i, text_output=f"p{p}c{i}", num_input_tokens=3,
                                                        num_output_tokens=1, finish_reason="length",
                                                        output_token_ids=[p, i], prompt_token_ids=[1, 2, 3])))
    req = CompletionRequest(prompt=["A", "B"], n=2, echo=True, return_token_ids=True)
    resp = completion_response(states, req, req.echo_prefixes(), id="cmpl-1", created=1, model="m")
    texts = [(c.index, c.text) for c in resp.choices]
    assert texts == [(0, "Ap0c0"), (1, "Ap0c1"), (2, "Bp1c0"), (3, "Bp1c1")]
    assert resp.choices[3].completion_token_ids == [1, 1] and resp.choices[3].prompt_token_ids == [1, 2, 3]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (6, 4)
    assert usage(states).total_tokens == 10


def test_stream_chunk_delta_always_carries_content_and_reasoning_content():
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[
        ChatChunkChoice(index=0, delta=DeltaMessage(content="hi"))])
    body = json.loads(chunk.model_dump_json())
    expected = {"index": 0, "delta": {"content": "hi", "reasoning_content": None}, "logprobs": None,
                "finish_reason": None}
    assert body["choices"][0] == expected
    assert "usage" not in body and body["object"] == "chat.completion.chunk"


def test_error_bodies_follow_openai_shape():
    body = OpenAIError(404, "no such model", param="model", code="model_not_found").body()
    assert body == {"error": {"message": "no such model", "type": "not_found_error", "param": "model",
                              "code": "model_not_found"}}
    assert OpenAIError.from_triton(TritonError(400, "max_tokens too large")).status_code == 400
    assert OpenAIError.from_triton(TritonError(503, "down")).status_code == 503
    assert OpenAIError.from_triton(TritonError(500, "boom")).body()["error"]["type"] == "server_error"


def test_a_stream_failing_midway_reports_an_error_event_then_done():
    async def chunks():
        yield "data: {}\n\n"
        raise TritonError(500, "engine step failed")

    async def body() -> list[str]:
        meta = ResponseMeta("/v1/chat/completions", FrontendMetrics(), "chatcmpl-1", "m")
        response = event_stream(chunks(), [], meta)
        return [part async for part in response.body_iterator]

    first, error, done = asyncio.run(body())
    assert first == "data: {}\n\n" and done == DONE
    assert error.startswith("data: ") and error.endswith("\n\n")
    expected = {"message": "engine step failed", "type": "server_error", "param": None, "code": None}
    assert json.loads(error[len("data: "):]) == {"error": expected}
