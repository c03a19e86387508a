"""End to end: the official `openai` client -> python -m openai_frontend -> tritonserver -> the ernie backend.

The model is a small random checkpoint (max_model_len 256), so tests check structure, accounting and
sampling behaviour, never the wording of answers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.frontend import GUARD_API_KEY, GUARD_MAX_BODY_BYTES, Frontend, start_frontend
from tests.fixtures.triton import TritonServer, engine_metric, free_ports, longer_context_row
from tests.process_utils import wait_for

pytestmark = pytest.mark.server

QUESTION = "Where is the capital of China?"
MESSAGES = [{"role": "user", "content": QUESTION}]
TIMEOUT = 120


@pytest.fixture
def client(openai_frontend: Frontend) -> openai.OpenAI:
    return openai.OpenAI(base_url=openai_frontend.base_url, api_key="EMPTY", max_retries=0, timeout=TIMEOUT)


def finish_reasons(stream) -> list[str]:
    return [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# ---- models, health, metrics -------------------------------------------------------------------


def test_models_lists_triton_ready_models(client: openai.OpenAI, triton_server: TritonServer):
    # The repository also holds a row that is not loaded: only READY models are listed.
    assert [m.id for m in client.models.list().data] == [triton_server.model]


def test_model_retrieve(client: openai.OpenAI, triton_server: TritonServer):
    card = client.models.retrieve(triton_server.model)
    assert card.id == triton_server.model and card.model_dump()["max_model_len"] == 256  # as vLLM lists it
    assert client.models.list().data[0].model_dump()["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_follows_triton(openai_frontend: Frontend):
    assert httpx.get(f"{openai_frontend.url}/health", timeout=10).status_code == 200
    assert httpx.head(f"{openai_frontend.url}/health", timeout=10).status_code == 200


def test_version_as_vllm_reports_it(openai_frontend: Frontend):
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    (version,) = re.findall(r'^version = "(.+)"$', pyproject, re.M)
    response = httpx.get(f"{openai_frontend.url}/version", timeout=10)
    assert response.status_code == 200 and response.json() == {"version": version}


def test_health_and_requests_fail_with_503_when_triton_is_unreachable(tmp_path: Path):
    (dead_port,) = free_ports(1)
    with start_frontend(f"http://127.0.0.1:{dead_port}", "none", tmp_path / "dead.log") as dead:
        assert httpx.get(f"{dead.url}/health", timeout=10).status_code == 503
        response = httpx.post(f"{dead.base_url}/chat/completions", json={"messages": MESSAGES}, timeout=10)
        assert response.status_code == 503
        assert "unavailable" in error_of(response)["message"]


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_non_streaming(client: openai.OpenAI, triton_server: TritonServer):
    resp = client.chat.completions.create(model=triton_server.model, messages=MESSAGES, temperature=0,
                                          max_tokens=8)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == triton_server.model
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streams_a_chunk_per_token_even_with_text_held_back(client: openai.OpenAI):
    request = {"model": "default", "messages": MESSAGES, "temperature": 0, "max_tokens": 6,
               "extra_body": {"ignore_eos": True}}
    text = client.chat.completions.create(**request).choices[0].message.content
    # The whole answer is a prefix of this stop string, so its text is held back to the end.
    chunks = list(client.chat.completions.create(**request, stop=[text + "\x07"], stream=True,
                                                 stream_options={"include_usage": True}))
    token_chunks = [c for c in chunks[1:] if c.choices]  # after the role chunk
    assert len(token_chunks) == chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].delta.content for c in token_chunks] == [""] * 5 + [text]
    assert token_chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats(client: openai.OpenAI, endpoint: str):
    """vLLM's stream option: every token chunk carries the usage so far, then the usage chunk the total."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    request = {"model": "default", "temperature": 0, "max_tokens": 5, "stream": True,
               "stream_options": options, "extra_body": {"ignore_eos": True}}
    if endpoint == "chat":  # after the role chunk
        chunks = list(client.chat.completions.create(messages=MESSAGES, **request))[1:]
    else:
        chunks = list(client.completions.create(prompt=QUESTION, **request))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == [1, 2, 3, 4, 5, 5] and not chunks[-1].choices
    assert len({c.usage.prompt_tokens for c in chunks}) == 1 and chunks[-1].usage.total_tokens > 5


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI):
    request = {"model": "default", "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {whole.model}
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert content_chunks[-1].choices[0].finish_reason is not None


def test_max_tokens_ends_with_length(client: openai.OpenAI):
    # min_tokens (a FastDeploy extra) rules out an early EOS from the random model.
    resp = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=3,
                                          extra_body={"min_tokens": 3})
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3
    stream = client.completions.create(model="default", prompt=QUESTION, max_tokens=3, stream=True,
                                       extra_body={"min_tokens": 3})
    assert finish_reasons(stream) == ["length"]


def test_n_completions(client: openai.OpenAI):
    resp = client.chat.completions.create(model="default", messages=MESSAGES, n=3, max_tokens=4,
                                          seed=7, extra_body={"min_tokens": 4})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="default", messages=MESSAGES, n=2, max_tokens=4,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 4})
    finished, usage = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert finished == {0: "length", 1: "length"} and usage.completion_tokens == 8


def test_seed_makes_sampling_reproducible(client: openai.OpenAI):
    def sample(seed: int) -> str:
        resp = client.completions.create(model="default", prompt=QUESTION, temperature=1.0, max_tokens=12,
                                         seed=seed, extra_body={"min_tokens": 12})
        return resp.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first  # the seed does steer sampling


def test_stop_string_ends_the_completion(client: openai.OpenAI):
    request = {"model": "default", "prompt": QUESTION, "temperature": 0, "max_tokens": 24,
               "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**request).choices[0].text
    candidates = [text[i:i + 3] for i in range(4, len(text) - 3)
                  if text[i:i + 3].strip() and text.find(text[i:i + 3]) == i]
    assert candidates, f"greedy text too short to pick a stop string from: {text!r}"
    stop = candidates[0]
    resp = client.completions.create(**request, stop=[stop])
    assert resp.choices[0].text == text[:text.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_logit_bias_steers_the_choice(client: openai.OpenAI):
    request = {"model": "default", "prompt": QUESTION, "temperature": 0, "max_tokens": 4,
               "extra_body": {"return_token_ids": True, "ignore_eos": True}}
    plain = client.completions.create(**request).choices[0].model_dump()["completion_token_ids"]
    forced = client.completions.create(**request, logit_bias={"42": 100}).choices[0]
    assert forced.model_dump()["completion_token_ids"] == [42] * 4 != plain
    only = client.completions.create(**{**request, "extra_body": {**request["extra_body"],
                                                                   "allowed_token_ids": [43]}}).choices[0]
    assert only.model_dump()["completion_token_ids"] == [43] * 4  # vLLM's allowed_token_ids

    def chat_ids(**bias) -> list[int]:
        resp = client.chat.completions.create(model="default", messages=MESSAGES, temperature=0, max_tokens=4,
                                              extra_body={"return_token_ids": True}, **bias)
        return resp.choices[0].message.model_dump()["completion_token_ids"]

    first = chat_ids()[0]
    assert first not in chat_ids(logit_bias={str(first): -100})
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**request, logit_bias={"42": 500})
    assert "logit_bias" in err.value.message


def test_chat_logprobs(client: openai.OpenAI):
    resp = client.chat.completions.create(model="default", messages=MESSAGES, temperature=0, max_tokens=4,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)


def test_completion_logprobs(client: openai.OpenAI):
    resp = client.completions.create(model="default", prompt=QUESTION, temperature=0, max_tokens=4,
                                     logprobs=2)
    logprobs = resp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == resp.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1, greedy."""
    first = client.completions.create(model="default", prompt=QUESTION, max_tokens=1,
                                      extra_body={"return_token_ids": True}).choices[0]
    ids = first.model_dump()["prompt_token_ids"]
    request = {"model": "default", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    by_ids = client.completions.create(prompt=ids, **request).choices[0]
    assert QUESTION in by_ids.text  # the backend echoes token ids decoded
    lp = by_ids.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True)
    for token, token_logprob, top in scored:
        # The likeliest token and the prompt's own, as OpenAI and vLLM give them.
        assert token in top and len(top) <= 2
        assert token_logprob <= max(top.values()) + 1e-4 and token_logprob <= 0
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-4)  # greedy
    by_text = client.completions.create(prompt=QUESTION, **request).choices[0]
    assert by_text.text.startswith(QUESTION) and by_text.logprobs.tokens == lp.tokens
    assert by_text.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    streamed = [c.choices[0] for c in client.completions.create(prompt=ids, stream=True, **request)
                if c.choices]
    assert "".join(c.text for c in streamed) == by_ids.text
    assert [t for c in streamed if c.logprobs for t in c.logprobs.tokens] == lp.tokens
    # As vLLM, each chunk's logprobs are its text's: the echoed prompt's come with it, in the first chunk.
    chunks = client.completions.create(prompt=QUESTION, stream=True, **request)
    with_logprobs = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
    assert ["".join(c.logprobs.tokens) for c in with_logprobs] == [c.text for c in with_logprobs]
    assert with_logprobs[0].text.startswith(QUESTION)


def test_logprobs_are_the_models_and_name_the_chosen_token(client: openai.OpenAI):
    """Raw logprobs (the default logprobs_mode, as vLLM V1): min_p 1 leaves one token to draw, yet the others
    keep the model's logprobs (they were -inf and went out as null). Legacy top_logprobs hold the chosen
    token even with logprobs=0, as OpenAI's."""
    request = {"model": "default", "max_tokens": 2, "temperature": 1.0, "extra_body": {"min_p": 1.0}}
    chat = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=3, **request)
    (first, *_) = chat.choices[0].logprobs.content
    top = [t.logprob for t in first.top_logprobs]
    assert top[0] == first.logprob and all(-9999.0 < lp < 0 for lp in top[1:]), top
    text = client.completions.create(prompt=QUESTION, logprobs=3, **request).choices[0].logprobs
    assert all(-9999.0 < lp <= 0 for lp in text.top_logprobs[0].values())
    chosen = client.completions.create(prompt=QUESTION, logprobs=0, **request).choices[0].logprobs
    pairs = zip(chosen.tokens, chosen.token_logprobs, strict=True)
    assert chosen.top_logprobs == [{token: logprob} for token, logprob in pairs]


def test_tokenizer_endpoints(openai_frontend: Frontend, client: openai.OpenAI):
    """vLLM's /tokenize, /detokenize and /tokenizer_info: what lm-evaluation-harness's remote tokenizer
    probes and uses (its check: tokenizer_info names eos_token, tokenize of "test" gives a token list)."""
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{openai_frontend.url}{path}", json=body, timeout=TIMEOUT)

    info = httpx.get(f"{openai_frontend.url}/tokenizer_info", timeout=TIMEOUT).json()
    assert info["eos_token"] and info["chat_template"] and info["model_max_length"] == 256
    body = post("/tokenize", {"prompt": QUESTION, "add_special_tokens": False}).json()
    used = client.completions.create(model="default", prompt=QUESTION, max_tokens=1).usage.prompt_tokens
    assert body["count"] == len(body["tokens"]) == used and body["max_model_len"] == 256
    assert post("/tokenize", {"prompt": QUESTION, "add_special_tokens": True}).json()["count"] == used + 1
    assert post("/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": QUESTION}
    chat = post("/tokenize", {"model": "default", "messages": MESSAGES}).json()
    reply = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens  # the chat template applied, as for generation
    for path, bad, param in [("/tokenize", {"prompt": "a", "messages": MESSAGES}, None),
                             ("/tokenize", {}, None), ("/detokenize", {"tokens": []}, "tokens"),
                             ("/detokenize", {"tokens": [10**9]}, None)]:
        response = post(path, bad)
        assert response.status_code == 400, (path, bad, response.text)
        assert error_of(response)["param"] == param or param is None


def test_continue_final_message(openai_frontend: Frontend, client: openai.OpenAI):
    """vLLM's continue_final_message: the model continues an assistant answer the client began."""
    started = [*MESSAGES, {"role": "assistant", "content": "The capital of China is"}]
    ends = {"add_generation_prompt": False, "continue_final_message": True}
    tokens = httpx.post(f"{openai_frontend.url}/tokenize", json={"messages": started, **ends},
                        timeout=TIMEOUT).json()["tokens"]
    prompt = httpx.post(f"{openai_frontend.url}/detokenize", json={"tokens": tokens}, timeout=TIMEOUT).json()
    assert prompt["prompt"].endswith("The capital of China is")
    reply = client.chat.completions.create(model="default", messages=started, max_tokens=2, extra_body=ends)
    assert reply.usage.prompt_tokens == len(tokens)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=started, max_tokens=2,
                                       extra_body={"continue_final_message": True})
    assert "add_generation_prompt" in err.value.message


def test_echo_with_max_tokens_0_answers_the_prompt_alone(client: openai.OpenAI):
    """OpenAI's and vLLM's way to score a prompt: echo, logprobs and max_tokens 0 (it was a 400)."""
    scored = client.completions.create(model="default", prompt=QUESTION, echo=True, logprobs=1, max_tokens=1,
                                       temperature=0, extra_body={"return_token_ids": True}).choices[0]
    ids, prompt_logprobs = scored.model_dump()["prompt_token_ids"], scored.logprobs.token_logprobs[:-1]
    for prompt in (QUESTION, ids):
        request = {"model": "default", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}
        whole = client.completions.create(**request)
        (choice,) = whole.choices
        assert choice.text == QUESTION and choice.logprobs.token_logprobs == pytest.approx(prompt_logprobs)
        assert choice.finish_reason == "length" and whole.usage.prompt_tokens == len(ids)
        streamed = [c.choices[0] for c in client.completions.create(**request, stream=True) if c.choices]
        assert "".join(c.text for c in streamed) == QUESTION
        assert [t for c in streamed if c.logprobs for t in c.logprobs.tokens] == choice.logprobs.tokens


def test_vllm_prompt_logprobs(client: openai.OpenAI):
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}
    with the token itself; the same numbers as the legacy echo shape."""
    request = {"model": "default", "prompt": QUESTION, "max_tokens": 1, "temperature": 0,
               "extra_body": {"prompt_logprobs": 2, "return_token_ids": True}}
    choice = client.completions.create(**request).choices[0].model_dump()
    scored, ids = choice["prompt_logprobs"], choice["prompt_token_ids"]
    assert len(scored) == len(ids) and scored[0] is None
    for token_id, row in zip(ids[1:], scored[1:], strict=True):
        itself = row[str(token_id)]
        assert itself["rank"] >= 1 and itself["logprob"] <= 0 and 2 <= len(row) <= 3
        assert {1, 2} <= {r["rank"] for r in row.values()}  # the two likeliest
    echoed = client.completions.create(model="default", prompt=QUESTION, max_tokens=1, temperature=0,
                                       echo=True, logprobs=2).choices[0].logprobs
    own = [row[str(t)]["logprob"] for t, row in zip(ids[1:], scored[1:], strict=True)]
    assert own == pytest.approx(echoed.token_logprobs[1:-1], abs=1e-5)
    chat = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert len(chat.model_dump()["prompt_logprobs"]) == chat.usage.prompt_tokens
    assert "prompt_logprobs" not in client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=1).model_dump(exclude_unset=True)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**request, stream=True)
    assert "prompt_logprobs" in err.value.message


def test_return_token_ids_match_usage(client: openai.OpenAI):
    resp = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=5,
                                          extra_body={"return_token_ids": True})
    message = resp.choices[0].message.model_dump()
    assert len(message["prompt_token_ids"]) == resp.usage.prompt_tokens
    assert len(message["completion_token_ids"]) == resp.usage.completion_tokens


# ---- completions --------------------------------------------------------------------------------


def test_completions_streaming_matches_non_streaming(client: openai.OpenAI):
    request = {"model": "default", "prompt": QUESTION, "temperature": 0, "max_tokens": 10}
    whole = client.completions.create(**request)
    assert whole.object == "text_completion" and whole.usage.completion_tokens > 0
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage


def test_completions_stream_a_chunk_per_token_even_with_text_held_back(client: openai.OpenAI):
    request = {"model": "default", "prompt": QUESTION, "temperature": 0, "max_tokens": 6,
               "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**request).choices[0].text
    # The whole completion is a prefix of this stop string, so its text is held back to the end.
    chunks = list(client.completions.create(**request, stop=[text + "\x07"], stream=True,
                                            stream_options={"include_usage": True}))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].text for c in token_chunks] == [""] * 5 + [text]
    assert token_chunks[-1].choices[0].finish_reason == "length"


def test_completions_several_prompts_and_token_ids(client: openai.OpenAI):
    resp = client.completions.create(model="default", prompt=[QUESTION, "Hello"], max_tokens=3, n=2,
                                     extra_body={"min_tokens": 3})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert resp.usage.completion_tokens == 12
    ids = client.completions.create(model="default", prompt=[5, 6, 7, 8], max_tokens=2)
    assert ids.usage.prompt_tokens == 4


# ---- the seed document's requests --------------------------------------------------------------


def test_seed_curl_request(openai_frontend: Frontend):
    # The seed's body exactly: no model, no max_tokens.
    response = httpx.post(f"{openai_frontend.url}/v1/chat/completions", timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"},
                          content=json.dumps({"messages": [{"role": "user", "content": QUESTION}]}))
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] > 0


def test_seed_python_example(openai_frontend: Frontend):
    host, port = openai_frontend.url.removeprefix("http://").split(":")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        client = openai.Client(base_url=f"http://{host}:{port}/v1", api_key="null")
        response = client.completions.create(model="null", prompt=QUESTION, stream=True)
        for chunk in response:
            print(chunk.choices[0].text, end="")
        print("\n")
        response = client.chat.completions.create(
            model="null", messages=[{"role": "user", "content": QUESTION}], stream=True)
        for chunk in response:
            if chunk.choices[0].delta:
                print(chunk.choices[0].delta.content, end="")
        print("\n")
    assert "None" not in printed.getvalue()  # every delta carries a content string


SEED_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Determine weather in my location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["c", "f"]}},
        "additionalProperties": False, "required": ["location", "unit"]},
    "strict": True}}
SEED_TOOL_REQUESTS = [
    {"tools": [SEED_TOOL], "stream": False, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Get the current weather in Beijing"}]}]},
    # A tool call in the history with object arguments, and the tool's answer as content parts.
    {"tools": [SEED_TOOL], "stream": False, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Get the current weather in Beijing"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"location": "Beijing", "unit": "c"}}}]},
        {"role": "tool", "content": [{"type": "text", "text": "location: Beijing, temperature: 23"}]}]},
]


def test_seed_tool_requests(openai_frontend: Frontend, triton_server: TritonServer,
                            ernie_random_checkpoint: Path):
    # Room for the seed's tool prompts (~360 tokens; not much more, as the seed's bodies set no max_tokens).
    with longer_context_row(triton_server, ernie_random_checkpoint, 448) as model:
        for body in SEED_TOOL_REQUESTS:  # the seed's bodies name no model: this one is asked for by name
            url = f"{openai_frontend.base_url}/chat/completions"
            response = httpx.post(url, json={**body, "model": model}, timeout=TIMEOUT)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length", "tool_calls")
            for call in choice["message"].get("tool_calls") or []:
                assert call["function"]["name"] and isinstance(call["function"]["arguments"], str)


def test_seed_vl_python_example(openai_frontend: Frontend):
    # The seed's VL example, verbatim but for the image part (no network here) and a max_tokens the 256-token
    # test model can hold: it reads delta.reasoning_content on every chunk.
    host, port = openai_frontend.url.removeprefix("http://").split(":")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        client = openai.Client(base_url=f"http://{host}:{port}/v1", api_key="EMPTY_API_KEY")
        response = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": [{"type": "text", "text": "Please describe the content"}]}],
            temperature=0.0001,
            max_tokens=32,
            stream=True,
            top_p=0,
            metadata={"enable_thinking": False},
        )

        def get_str(content_raw):
            content_str = str(content_raw) if content_raw is not None else ''
            return content_str

        for chunk in response:
            if chunk.choices[0].delta is not None and chunk.choices[0].delta.role != 'assistant':
                reasoning_content = get_str(chunk.choices[0].delta.reasoning_content)
                content = get_str(chunk.choices[0].delta.content)
                print(reasoning_content + content, end='', flush=True)
        print('\n')
    assert printed.getvalue().strip()


# ---- cancellation -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_triton_request(openai_frontend: Frontend, triton_server: TritonServer,
                                                      ernie_random_checkpoint: Path, stream: bool):
    """Streamed or not (a client timing out a long answer, as vLLM): the engine stops working on it."""
    # A row of its own: its counters start at zero, and its budget (seconds of decoding for the tiny model)
    # cannot run out before the disconnect reaches the engine, however loaded the machine is.
    max_tokens = 4000
    with longer_context_row(triton_server, ernie_random_checkpoint, max_tokens + 96) as model:
        body = {"model": model, "messages": MESSAGES, "stream": stream, "max_tokens": max_tokens,
                "ignore_eos": True}
        url = f"{openai_frontend.base_url}/chat/completions"
        if stream:
            with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: {")
                    if seen == 4:
                        break
            assert seen == 4
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=body, timeout=httpx.Timeout(TIMEOUT, read=3.0))

        def metric(name: str) -> float:
            return engine_metric(triton_server, name, model)

        assert wait_for(lambda: metric("request_abort_total") == 1, timeout=30)
        assert wait_for(lambda: metric("num_requests_running") == 0 and metric("num_kv_blocks_used") == 0,
                        timeout=30)
        assert 4 <= metric("generation_tokens_total") < max_tokens
        assert metric("request_success_total") == 0
    assert "client went away, cancelling its Triton request" in openai_frontend.log_tail()


def _stub_pid(model: str) -> int:
    """The pid of the Python backend stub process serving `model`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if args[0].endswith(b"triton_python_backend_stub") and f"/{model}/1/".encode() in args[1]:
                return int(cmdline.parent.name)
    raise AssertionError(f"no stub process for {model}")


def test_a_dead_backend_stub_ends_streams_with_503_not_a_hang(openai_frontend: Frontend,
                                                                triton_server: TritonServer,
                                                                ernie_random_checkpoint: Path):
    """Triton keeps a dead stub's model READY, leaves its running requests open forever (the stream hung) and
    answers new ones 400 (an invalid_request_error): both must say the server failed (503), and so must
    /health (it said 200), as vLLM's does for a dead engine."""
    with longer_context_row(triton_server, ernie_random_checkpoint, 320) as model:
        url = f"{openai_frontend.base_url}/chat/completions"
        body = {"model": model, "messages": MESSAGES, "max_tokens": 300, "ignore_eos": True}
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as response:
            lines = (line for line in response.iter_lines() if line)
            next(line for line in lines if line.startswith("data: {"))
            os.kill(_stub_pid(model), signal.SIGKILL)
            *_, error, done = lines
        assert done == "data: [DONE]"
        assert json.loads(error.removeprefix("data: "))["error"]["type"] == "service_unavailable"
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == 503 and "not healthy" in error_of(refused)["message"]
        assert httpx.get(f"{openai_frontend.url}/health", timeout=30).status_code == 503
    assert httpx.get(f"{openai_frontend.url}/health", timeout=30).status_code == 200  # the dead row unloaded


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
    ({"messages": MESSAGES, "n": 0}, "n"),
    # The template got "None" for this text.
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages.0.content.0"),
])
def test_invalid_requests_get_400(openai_frontend: Frontend, body: dict, param: str):
    response = httpx.post(f"{openai_frontend.base_url}/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_values_triton_cannot_take_get_400_not_500(openai_frontend: Frontend, client: openai.OpenAI):
    """A lone surrogate (valid JSON escape, no UTF-8) and token ids beyond INT64 reached Triton and came
    back as 500s."""
    def post(path: str, body: dict) -> httpx.Response:  # json.dumps escapes the surrogate as "\\ud800"
        return httpx.post(f"{openai_frontend.url}{path}", content=json.dumps(body), timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})

    response = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]})
    assert response.status_code == 400 and "Unicode" in error_of(response)["message"]
    for path, body in [("/v1/completions", {"prompt": "hi", "stop": ["\ud800"], "max_tokens": 2}),
                       ("/v1/completions", {"prompt": [2**63], "max_tokens": 2}),
                       ("/detokenize", {"tokens": [2**64]}),
                       # Made a state per completion before Triton refused n: the frontend was OOM-killed.
                       ("/v1/completions", {"prompt": "hi", "n": 10**20, "max_tokens": 2})]:
        response = post(path, body)
        assert response.status_code == 400, (path, body, response.text)
    assert client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2).choices


def test_null_options_and_developer_messages(openai_frontend: Frontend):
    """What other SDKs send: null for every option left alone, and OpenAI's "developer" role."""
    messages = [{"role": "developer", "content": "Answer briefly."}, *MESSAGES]
    body = {"model": "default", "messages": messages, "max_tokens": 2, "n": None, "stream": None,
            "temperature": None, "stream_options": None, "tool_choice": None, "logprobs": None}
    response = httpx.post(f"{openai_frontend.base_url}/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_malformed_json_gets_400(openai_frontend: Frontend):
    response = httpx.post(f"{openai_frontend.base_url}/completions", content=b'{"prompt": ',
                          headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]


def test_unknown_model_gets_404(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"


def test_max_tokens_beyond_context_gets_400_with_tritons_message(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=1000)
    assert "max_model_len" in err.value.message and "max_tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # streams are refused before they start, too
        client.completions.create(model="default", prompt=QUESTION, max_tokens=1000, stream=True)
    assert "max_model_len" in err.value.message


def test_truncate_prompt_tokens(client: openai.OpenAI):
    """vLLM's truncate_prompt_tokens: -1 keeps the last tokens that fit next to max_tokens (256 here)."""
    long = list(range(100, 400))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=long, max_tokens=4)
    fits = client.completions.create(model="default", prompt=long, max_tokens=4,
                                     extra_body={"truncate_prompt_tokens": -1})
    assert fits.usage.prompt_tokens == 252
    last = client.completions.create(model="default", prompt=long, max_tokens=4,
                                     extra_body={"truncate_prompt_tokens": 10, "return_token_ids": True})
    assert last.choices[0].model_dump()["prompt_token_ids"] == long[-10:]


def test_values_the_engine_rejects_get_400(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=MESSAGES, extra_body={"top_k": -5})
    assert "top_k" in err.value.message


def test_api_key_is_required_when_set(guarded_frontend: Frontend):
    bad = openai.OpenAI(base_url=guarded_frontend.base_url, api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    assert err.value.status_code == 401
    response = httpx.post(f"{guarded_frontend.base_url}/completions", json={"prompt": "x"}, timeout=TIMEOUT)
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded_frontend.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{guarded_frontend.url}/tokenizer_info", timeout=10).status_code == 401
    good = openai.OpenAI(base_url=guarded_frontend.base_url, api_key=GUARD_API_KEY, max_retries=0,
                         timeout=TIMEOUT)
    assert good.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2).choices


def test_too_large_body_gets_413(guarded_frontend: Frontend):
    headers = {"Authorization": f"Bearer {GUARD_API_KEY}", "Content-Type": "application/json"}
    big = json.dumps({"messages": [{"role": "user", "content": "x" * GUARD_MAX_BODY_BYTES}]}).encode()
    url = f"{guarded_frontend.base_url}/chat/completions"
    response = httpx.post(url, content=big, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    chunked = httpx.post(url, content=iter([big[:40000], big[40000:]]), headers=headers, timeout=TIMEOUT)
    assert chunked.status_code == 413  # no Content-Length: counted while read


def test_over_concurrency_gets_429(guarded_frontend: Frontend):
    headers = {"Authorization": f"Bearer {GUARD_API_KEY}"}
    client = openai.OpenAI(base_url=guarded_frontend.base_url, api_key=GUARD_API_KEY, max_retries=0,
                           timeout=TIMEOUT)
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 200, "ignore_eos": True}
    with httpx.stream("POST", f"{guarded_frontend.base_url}/chat/completions", json=body, headers=headers,
                      timeout=TIMEOUT) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: a collected line iterator would close the connection
        next(line for line in lines if line.startswith("data: {"))
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="default", messages=MESSAGES, stream=True, max_tokens=2)
        assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
        assert err.value.response.headers["retry-after"] == "1"
    # Once the first stream is gone its slot frees up.
    assert wait_for(lambda: _serves(client), timeout=30)


def _serves(client: openai.OpenAI) -> bool:
    try:
        return bool(client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2).choices)
    except openai.RateLimitError:
        return False


def test_concurrent_streams_within_the_limit_all_complete(client: openai.OpenAI):
    results: list[str | None] = [None] * 4

    def run(i: int) -> None:
        stream = client.completions.create(model="default", prompt=f"{QUESTION} {i}", max_tokens=6,
                                           stream=True, extra_body={"min_tokens": 6})
        (results[i],) = finish_reasons(stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == ["length"] * 4


def test_service_keeps_serving_and_counts_requests(client: openai.OpenAI, openai_frontend: Frontend):
    assert client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2).choices
    assert httpx.get(f"{openai_frontend.url}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{openai_frontend.url}/metrics", timeout=10).text
    assert re.search(r'openai_frontend_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]',
                     metrics)
    assert re.search(r'openai_frontend_requests_total\{endpoint="/v1/chat/completions",status="400"\} [1-9]',
                     metrics)
    assert re.search(r'openai_frontend_time_to_first_token_seconds_count\{endpoint="/v1/chat/completions"\} '
                     r'[1-9]', metrics)
    assert re.search(r'openai_frontend_completion_tokens_total\{endpoint="/v1/completions"\} [1-9]', metrics)


# ---- middleware under misbehaving clients (ASGI level, no servers) ------------------------------------


def _run_asgi(app, scope_extra: dict, receive) -> list[dict]:  # noqa: ANN001 (ASGI callables)
    """Run `app` on one HTTP request; the messages it sent."""
    import asyncio

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], **scope_extra}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


def test_a_trickled_body_gets_408_within_the_body_timeout():
    """Slowloris: a client sending part of its body, then nothing, must not hold the connection forever."""
    import asyncio

    from openai_frontend.middleware import BodyLimitMiddleware

    parts = [{"type": "http.request", "body": b'{"messages": ', "more_body": True}]

    async def receive() -> dict:
        if parts:
            return parts.pop()
        await asyncio.sleep(3600)  # the rest never comes
        raise AssertionError("unreachable")

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        raise AssertionError("the app must not run without a whole body")

    sent = _run_asgi(BodyLimitMiddleware(app, max_bytes=1000, timeout_s=0.2), {}, receive)
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"


def test_a_body_in_time_is_replayed_and_a_trickled_one_past_the_limit_gets_413():
    from openai_frontend.middleware import BodyLimitMiddleware

    def receiver(chunks: list[bytes]):  # noqa: ANN202
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]

        async def receive() -> dict:
            return messages.pop(0)
        return receive

    seen: list[bytes] = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = BodyLimitMiddleware(app, max_bytes=10, timeout_s=5)
    assert _run_asgi(guard, {}, receiver([b"abc", b"def"]))[0]["status"] == 200 and seen == [b"abcdef"]
    assert _run_asgi(guard, {}, receiver([b"abcdef", b"ghijkl", b"mn"]))[0]["status"] == 413


def test_a_stream_the_client_left_counts_as_499_not_200():
    """Starlette stops a streamed body on disconnect without an error: the metrics must still tell it from a
    completed response (non-streaming requests the client left are already 499)."""
    from openai_frontend.metrics import FrontendMetrics
    from openai_frontend.middleware import MetricsMiddleware

    async def left_midway(scope, receive, send) -> None:  # noqa: ANN001
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    async def completed(scope, receive, send) -> None:  # noqa: ANN001
        await left_midway(scope, receive, send)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    metrics = FrontendMetrics()
    for app in (left_midway, completed, completed):
        _run_asgi(MetricsMiddleware(app, metrics), {}, receive)

    def count(name: str, status: str) -> float | None:
        labels = {"endpoint": "/v1/chat/completions", "status" if name.endswith("requests_total") else "kind":
                  status}
        return metrics.registry.get_sample_value(name, labels)

    assert count("openai_frontend_requests_total", "499") == 1
    assert count("openai_frontend_requests_total", "200") == 2
    assert count("openai_frontend_errors_total", "499") == 1


def test_body_timeout_option():
    from openai_frontend.__main__ import parse_args

    assert parse_args([]).body_timeout == 60
    assert parse_args(["--body-timeout", "2.5"]).body_timeout == 2.5
    with pytest.raises(SystemExit):
        parse_args(["--body-timeout", "0"])
