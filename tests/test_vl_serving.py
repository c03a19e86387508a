"""ERNIE-4.5-VL served through the engine, tritonserver and the OpenAI frontend (a tiny random checkpoint in
the -Paddle layout, from scripts/make_random_vl_model.py).

Engine: an image request's greedy tokens equal the model called directly (see tests/multimodal_utils.py)
while its prefill is chunked around the image and batched with a text request. The thinking row (no
`enable_mm`) is multimodal by its architecture and has its parsers. End to end: the VL row's settings
(`enable_mm`, `mm_processor_kwargs`, `limit_mm_per_prompt`, `ernie-45-vl`) with the seed's requests through
the `openai` client: an image as a data: URL and a video (an mp4 the test writes, read from the media root)
stream the reference answer; an 11th image, a path outside the media root and a host off the allow-list
are 400s naming the cause.
"""

from __future__ import annotations

import base64
import concurrent.futures
import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from ernie_engine.config import EngineConfig
from ernie_engine.llm_engine import LLMEngine
from ernie_engine.multimodal import ErnieVLProcessor, MultimodalPrompt, VideoFrames
from ernie_engine.outputs import merge_outputs
from ernie_engine.parsers import parse_output
from ernie_engine.sampling_params import SamplingParams
from ernie_engine.tokenizer import Tokenizer
from PIL import Image

from tests.fixtures.frontend import start_frontend
from tests.fixtures.triton import TritonServer
from tests.media_utils import data_url, draw, write_mp4
from tests.multimodal_utils import (
    GreedyReference,
    make_checkpoint,
    placeholder_span,
    row_params,
    run_engine,
    serve_row,
)

VL_ROW = "ernie-4.5-vl-28b-a3b-wint8-tp1-32k"
THINKING_ROW = "ernie-4.5-vl-28b-a3b-thinking-wint8-tp1-128k"
MM_KWARGS = {"video_max_frames": 30}
LIMITS = {"image": 10, "video": 3}
BUDGET = 24  # max_num_batched_tokens of the engine test: the first chunk's end falls inside the image
NUM_TOKENS = 12
ALLOWED_HOST = "media.example.com,127.0.0.1"
NO_THINKING = {"enable_thinking": False}
THINKING_PARSER = "ernie-45-vl-thinking"


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("make_random_vl_model.py", tmp_path_factory.mktemp("vl") / "ernie-vl-random")


def vl_processor(model_dir: Path, tokenizer: Tokenizer) -> ErnieVLProcessor:
    return ErnieVLProcessor.from_dir(model_dir, tokenizer, MM_KWARGS, LIMITS)


@pytest.fixture(scope="module")
def reference(vl_checkpoint: Path) -> GreedyReference:
    return GreedyReference(vl_checkpoint, vl_processor)


def user(*parts: dict, text: str = "Please describe the content of the image") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def test_engine_image_request_equals_reference(vl_checkpoint: Path, reference: GreedyReference) -> None:
    engine = LLMEngine(
        EngineConfig(
            model=str(vl_checkpoint),
            max_model_len=512,
            max_num_batched_tokens=BUDGET,
            block_size=16,
            num_gpu_blocks_override=64,
            dtype="float32",
            enable_mm=True,
            mm_processor_kwargs=MM_KWARGS,
            limit_mm_per_prompt=LIMITS,
        )
    )
    image = draw("ERNIE 4.5 VL", size=(224, 112))
    messages = user(image_part(data_url(image)))
    mm = reference.processor(messages, **NO_THINKING)
    expected = reference.greedy(mm, mm.prompt_token_ids, NUM_TOKENS)
    other = reference.processor(user(image_part(data_url(draw("other", size=(224, 112))))), **NO_THINKING)
    assert other.prompt_token_ids == mm.prompt_token_ids
    assert reference.greedy(other, other.prompt_token_ids, NUM_TOKENS) != expected  # it sees the image
    start, end = placeholder_span(mm)
    assert start < BUDGET < end  # a plain chunk of BUDGET tokens would split the image
    text_ids = reference.tokenizer.encode("The weather today is sunny")
    greedy = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    requests = {
        "vl": {"messages": messages, "chat_template_kwargs": NO_THINKING},
        "text": {"prompt_token_ids": text_ids},
    }
    tokens, steps = run_engine(engine, requests, greedy)
    assert tokens["vl"] == expected
    assert tokens["text"] == reference.greedy(None, text_ids, NUM_TOKENS)
    ends = [s + n for step in steps if "vl" in step for s, n in [step["vl"]] if s < len(mm.prompt_token_ids)]
    assert not any(start < e < end for e in ends), ends  # never inside the image
    assert start in ends and end in ends, ends  # rounded down to it, then the whole image in one chunk


def test_thinking_row_is_multimodal_with_its_parsers(vl_checkpoint: Path, reference: GreedyReference) -> None:
    """The row as committed (wint8, no enable_mm): the architecture makes it multimodal."""
    params = row_params(THINKING_ROW)
    assert "enable_mm" not in params
    config = EngineConfig.from_parameters(params, model=str(vl_checkpoint), num_gpu_blocks_override=16)
    engine = LLMEngine(config)
    assert engine.mm_processor is not None
    tool = {"type": "function", "function": {"name": "image_zoom_in_tool", "parameters": {"type": "object"}}}
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS)
    image = image_part(data_url(draw("zoom", size=(224, 112))))
    engine.add_request("think", messages=user(image, text="Which era?"), tools=[tool], sampling_params=params)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    out = merge_outputs(outputs)
    assert out.error is None and out.num_prompt_tokens > 100  # the image's placeholders are in the prompt
    completion = out.outputs[0]
    text = engine.tokenizer.decode(completion.token_ids)
    # The prompt ends in `<think>`: the ernie-45-vl-thinking parsers split what the model wrote.
    reasoning, content, _ = parse_output(text, THINKING_PARSER, THINKING_PARSER, thinking_enabled=True)
    assert (completion.reasoning_text, completion.text) == (reasoning, content)
    assert completion.reasoning_text  # thinking on: the answer starts as reasoning



def test_media_whose_patches_match_no_grid_are_refused_alone(vl_checkpoint: Path) -> None:
    """Video frames of two sizes give patches that match no (t, h, w) grid. The vision pass of a step covers
    every request's media, so admitting such a request used to fail the step for its whole batch."""
    config = EngineConfig(model=str(vl_checkpoint), max_model_len=2048, num_gpu_blocks_override=64)
    engine = LLMEngine(config)
    frames = VideoFrames([Image.new("RGB", (112, 84)), Image.new("RGB", (84, 168))], [0, 1], 2.0)
    with pytest.raises(ValueError, match="media preprocessing gave \\d+ patches for grids"):
        engine.make_request("mixed-sizes", messages=user({"type": "video", "video": frames}))


# End to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "clip.mp4").write_bytes(write_mp4(num_frames=6))
    return root


@pytest.fixture(scope="module")
def vl_server(
    tmp_path_factory: pytest.TempPathFactory, vl_checkpoint: Path, media_root: Path
) -> Iterator[TritonServer]:
    """The VL row with its multimodal settings, plus: fp32 weights and compute (no wint8, no bf16 kernels: the
    answers are checked against the fp32 reference), a small context and KV cache for the test machine, a
    media root and one allowed host."""
    params = row_params(VL_ROW)
    assert params["enable_mm"] == "true" and params["reasoning_parser"] == "ernie-45-vl"
    overrides = {
        "quantization": "",
        "dtype": "float32",
        "max_model_len": "2048",
        "num_gpu_blocks_override": "40",
        "media_root": str(media_root),
        "allowed_media_hosts": ALLOWED_HOST,
    }
    with serve_row(tmp_path_factory.mktemp("vl-triton"), VL_ROW, vl_checkpoint, overrides) as server:
        yield server


@pytest.fixture(scope="module")
def client(vl_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log_path = tmp_path_factory.mktemp("vl-frontend") / "frontend.log"
    with start_frontend(vl_server.http_url, VL_ROW, log_path) as frontend:
        yield openai.OpenAI(base_url=frontend.base_url, api_key="EMPTY_API_KEY", max_retries=0, timeout=60)


def seed_stream(client: openai.OpenAI, messages: list[dict], **extra) -> tuple[str, str]:
    """The seed's Python example: stream, reading reasoning_content and content of every delta."""
    response = client.chat.completions.create(
        model="default",
        messages=messages,
        temperature=0.0001,
        max_tokens=NUM_TOKENS,
        stream=True,
        top_p=0,
        **extra,
    )

    def get_str(content_raw: object) -> str:
        return str(content_raw) if content_raw is not None else ""

    reasoning, content = "", ""
    for chunk in response:
        if chunk.choices[0].delta is not None and chunk.choices[0].delta.role != "assistant":
            reasoning += get_str(chunk.choices[0].delta.reasoning_content)
            content += get_str(chunk.choices[0].delta.content)
    return reasoning, content


def expected_answer(reference: GreedyReference, mm: MultimodalPrompt, thinking: bool) -> tuple[str, str]:
    _, text = reference.answer(mm, NUM_TOKENS)
    reasoning, content, _ = parse_output(text, "ernie-45-vl", thinking_enabled=thinking)
    return reasoning, content


def test_seed_image_request_streams_the_answer(client: openai.OpenAI, reference: GreedyReference) -> None:
    messages = user(image_part(data_url(draw("Hello, ERNIE-VL", size=(224, 112)))))
    expected = expected_answer(reference, reference.processor(messages, **NO_THINKING), thinking=False)
    assert expected[0] == "" and expected[1]
    assert seed_stream(client, messages, metadata=NO_THINKING) == expected


def test_video_from_the_media_root_streams_the_answer(
    client: openai.OpenAI, reference: GreedyReference, media_root: Path
) -> None:
    """The seed's thinking-style video request (thinking left on: the reasoning parser splits the answer)."""
    text = "How many apples are there in the picture"
    as_data = "data:video/mp4;base64," + base64.b64encode((media_root / "clip.mp4").read_bytes()).decode()
    mm = reference.processor(user(video_part(as_data), text=text))
    assert mm.images.grid_thw[0][0] == 6  # the video's frames reached the model
    expected = expected_answer(reference, mm, thinking=True)
    assert seed_stream(client, user(video_part("clip.mp4"), text=text)) == expected


ELEVEN_IMAGES = [image_part(data_url(draw(str(i), size=(28, 28)))) for i in range(11)]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (ELEVEN_IMAGES, "at most 10 images per prompt, got 11"),
        ([video_part("../outside.mp4")], "local media path '../outside.mp4' is outside the media root"),
        ([image_part("https://paddlenlp.bj.bcebos.com/a.jpg")], "media host '\\S+' is not allowed"),
    ],
    ids=["11-images", "outside-media-root", "host-not-allowed"],
)
def test_refused_media_are_400s(client: openai.OpenAI, parts: list[dict], message: str) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(
                model="default", messages=user(*parts), max_tokens=4, stream=stream
            )


def test_a_silent_media_host_holds_up_only_its_own_request(client: openai.OpenAI) -> None:
    """Media were fetched on the backend's request loop: a host that never answered held up every other
    request of the model until the fetch timed out (20 s)."""
    with socket.create_server(("127.0.0.1", 0)) as silent, concurrent.futures.ThreadPoolExecutor(1) as pool:
        silent.settimeout(30)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/slow.png"
        slow = pool.submit(client.chat.completions.create, model="default", messages=user(image_part(url)),
                           max_tokens=2)
        connection, _ = silent.accept()  # the backend is fetching
        with connection:
            answer = client.chat.completions.create(model="default", messages=user(text="Hi"), max_tokens=2)
            assert answer.choices[0].finish_reason and not slow.done()
        # The host hangs up: that request fails alone, with the reason.
        with pytest.raises(openai.BadRequestError, match="fetching media"):
            slow.result(timeout=60)
