"""PaddleOCR-VL served through the engine, tritonserver and the OpenAI frontend (a tiny random checkpoint in
the shipped layout, from scripts/make_random_ocr_model.py).

The expected answers come from the reference path: the model called directly, as in
test_paddleocr_vl_reference.py (processor -> embed_multimodal -> get_input_embeddings -> forward over the
whole sequence with 3D positions, no KV cache, argmax), so the engine's chunking, batching, paged cache,
prefix cache and the servers' plumbing must all leave the tokens unchanged.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from ernie_engine.config import EngineConfig, ModelConfig
from ernie_engine.llm_engine import LLMEngine
from ernie_engine.multimodal import MultimodalProcessor, MultimodalPrompt
from ernie_engine.multimodal.engine_inputs import build_processor
from ernie_engine.sampling_params import SamplingParams
from PIL import Image

from tests.fixtures.frontend import start_frontend
from tests.fixtures.triton import TritonServer
from tests.media_utils import data_url, draw
from tests.multimodal_utils import (
    GreedyReference,
    make_checkpoint,
    placeholder_span,
    row_params,
    run_engine,
    serve_row,
)

OCR_ROW = "paddleocr-vl-0.9b-bf16-tp1-16k"
BUDGET = 48  # max_num_batched_tokens of the engine tests: the first chunk's end falls inside the image
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def ocr_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("make_random_ocr_model.py", tmp_path_factory.mktemp("ocr") / "paddleocr-vl-random")


def ocr_messages(*images: Image.Image) -> list[dict]:
    """The seed's OCR request: image_url parts (data: URLs here) and the prompt "OCR:"."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "OCR:"}]}]


class Reference(GreedyReference):
    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir, MultimodalProcessor.from_dir)

    def ocr(self, *images: Image.Image, stop: bool = False) -> tuple[MultimodalPrompt, list[int]]:
        mm = self.processor(ocr_messages(*images))
        return mm, self.greedy(mm, mm.prompt_token_ids, NUM_TOKENS, stop)


@pytest.fixture(scope="module")
def reference(ocr_checkpoint: Path) -> Reference:
    return Reference(ocr_checkpoint)


@pytest.fixture(scope="module")
def engine(ocr_checkpoint: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(ocr_checkpoint),
            max_model_len=1024,
            max_num_batched_tokens=BUDGET,
            block_size=16,
            num_gpu_blocks_override=256,
            dtype="float32",
            limit_mm_per_prompt={"image": 1},
        )
    )


GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)


def run(engine: LLMEngine, requests: dict[str, dict]) -> tuple[dict[str, list[int]], list[dict]]:
    return run_engine(engine, requests, GREEDY)


def test_chunked_prefill_batched_with_text_equals_reference(engine: LLMEngine, reference: Reference) -> None:
    image = draw("PaddleOCR 0.9B")
    mm, expected = reference.ocr(image)
    start, end = placeholder_span(mm)
    assert start < BUDGET < end  # a plain chunk of BUDGET tokens would split the image
    text_ids = reference.tokenizer.encode("The weather today is sunny")
    tokens, steps = run(
        engine, {"ocr": {"messages": ocr_messages(image)}, "text": {"prompt_token_ids": text_ids}}
    )
    assert tokens["ocr"] == expected
    assert tokens["text"] == reference.greedy(None, text_ids, NUM_TOKENS)
    chunks = [step["ocr"] for step in steps if "ocr" in step and step["ocr"][0] < len(mm.prompt_token_ids)]
    ends = [s + n for s, n in chunks]
    assert not any(start < e < end for e in ends), chunks  # never inside the image
    assert start in ends and end in ends, chunks  # rounded down to it, then the whole image in one chunk
    assert any("text" in step and "ocr" in step for step in steps)  # batched together


def test_prefix_cache_keys_include_the_image(engine: LLMEngine, reference: Reference) -> None:
    """Two images of one size give equal token ids: only the image content tells their KV blocks apart."""
    first, second = draw("first line"), draw("2nd LINE!")
    mm_first, expected_first = reference.ocr(first)
    mm_second, expected_second = reference.ocr(second)
    assert mm_first.prompt_token_ids == mm_second.prompt_token_ids
    hits = engine.block_manager.prefix_hit_tokens
    assert run(engine, {"first": {"messages": ocr_messages(first)}})[0]["first"] == expected_first
    assert run(engine, {"second": {"messages": ocr_messages(second)}})[0]["second"] == expected_second
    assert engine.block_manager.prefix_hit_tokens == hits  # the image sits in the first block
    assert run(engine, {"again": {"messages": ocr_messages(first)}})[0]["again"] == expected_first
    assert engine.block_manager.prefix_hit_tokens > hits  # the same image is served from the cache


def test_tokenize_expands_the_image_as_generation_does(engine: LLMEngine, reference: Reference) -> None:
    image = draw("tokens")
    expected = reference.processor(ocr_messages(image)).prompt_token_ids
    assert reference.processor.image_token_id in expected
    assert engine.tokenize(messages=ocr_messages(image)) == expected


def test_truncation_never_cuts_an_image_prompt(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="cannot cut a multimodal chat prompt"):
        engine.make_request("cut", messages=ocr_messages(draw("a")),
                            sampling_params=SamplingParams(truncate_prompt_tokens=5))


def test_limit_mm_per_prompt_and_bare_placeholders(engine: LLMEngine, reference: Reference) -> None:
    with pytest.raises(ValueError, match="at most 1 image per prompt, got 2"):
        engine.make_request("two", messages=ocr_messages(draw("a"), draw("b")))
    placeholder = reference.processor.image_token_id
    with pytest.raises(ValueError, match="placeholder tokens need their media"):
        engine.make_request("bare", prompt_token_ids=[5, placeholder, 6])


def test_media_policy_for_image_urls(ocr_checkpoint: Path, reference: Reference, tmp_path: Path) -> None:
    """Local files only under media_root, downloads only to allowed hosts (the engine's MediaFetcher)."""
    image = draw("local file")
    (tmp_path / "line.png").write_bytes(base64.b64decode(data_url(image).split(",", 1)[1]))
    config = EngineConfig(model=str(ocr_checkpoint), media_root=str(tmp_path))
    processor = build_processor(
        ModelConfig.from_dir(ocr_checkpoint), ocr_checkpoint, reference.tokenizer, config
    )

    def from_url(url: str) -> MultimodalPrompt:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "OCR:"}]
        return processor([{"role": "user", "content": content}], None, {})

    expected = reference.processor(ocr_messages(image))
    for url in ("line.png", str(tmp_path / "line.png"), f"file://{tmp_path}/line.png"):
        np.testing.assert_array_equal(from_url(url).images.pixel_values, expected.images.pixel_values)
    with pytest.raises(ValueError, match="outside the media root"):
        from_url("../line.png")
    with pytest.raises(ValueError, match="downloads are disabled"):
        from_url("https://paddle-model-ecology.bj.bcebos.com/PPOCRVL/x.jpg")


def test_bad_mm_processor_kwargs_name_the_key(ocr_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="video_max_frames"):
        LLMEngine(
            EngineConfig(
                model=str(ocr_checkpoint),
                max_model_len=256,
                num_gpu_blocks_override=16,
                mm_processor_kwargs={"video_max_frames": 30},
            )
        )


# End to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ocr_server(tmp_path_factory: pytest.TempPathFactory, ocr_checkpoint: Path) -> Iterator[TritonServer]:
    """The OCR row as committed (its model PaddlePaddle/PaddleOCR-VL resolved under ERNIE_MODEL_ROOT to the
    random checkpoint), plus a small KV cache for the test machine and fp32 weights and cache: the greedy
    reference's numerics, so that its text is the server's exactly."""
    params = row_params(OCR_ROW)
    assert params["model"] == "PaddlePaddle/PaddleOCR-VL" and params["enable_max_prefill"] == "true"
    base = tmp_path_factory.mktemp("ocr-triton")
    overrides = {"num_gpu_blocks_override": "64", "dtype": "float32"}
    with serve_row(base, OCR_ROW, ocr_checkpoint, overrides) as server:
        yield server


@pytest.fixture(scope="module")
def ocr_client(ocr_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log_path = tmp_path_factory.mktemp("ocr-frontend") / "frontend.log"
    with start_frontend(ocr_server.http_url, OCR_ROW, log_path) as frontend:
        yield openai.OpenAI(base_url=frontend.base_url, api_key="EMPTY_API_KEY", max_retries=0, timeout=60)


def expected_text(reference: Reference, image: Image.Image) -> tuple[int, str]:
    return reference.answer(reference.processor(ocr_messages(image)), NUM_TOKENS)


def test_openai_client_seed_ocr_request(ocr_client: openai.OpenAI, reference: Reference) -> None:
    image = draw("Hello, OCR 2025")
    prompt_len, text = expected_text(reference, image)
    request = {
        "model": "default",
        "messages": ocr_messages(image),
        "temperature": 0.0001,
        "top_p": 0,
        "max_tokens": NUM_TOKENS,
        "metadata": {"enable_thinking": False},
    }
    whole = ocr_client.chat.completions.create(**request)
    assert whole.choices[0].message.content == text
    assert whole.usage.prompt_tokens == prompt_len  # 196 image placeholders: the OCR model served it
    chunks = list(ocr_client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert len(deltas) > 2
    assert "".join(d.content or "" for d in deltas) == text


def test_triton_generate_with_image_messages(ocr_server: TritonServer, reference: Reference) -> None:
    image = draw("generate 77")
    prompt_len, text = expected_text(reference, image)
    payload = {
        "messages": json.dumps(ocr_messages(image)),
        "sampling_parameters": json.dumps({"temperature": 0, "max_tokens": NUM_TOKENS}),
        "return_num_input_tokens": True,
    }
    url = f"{ocr_server.http_url}/v2/models/{OCR_ROW}"
    whole = httpx.post(f"{url}/generate", json=payload, timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.json()["text_output"] == text and whole.json()["num_input_tokens"] == prompt_len
    streamed = httpx.post(f"{url}/generate_stream", json={**payload, "stream": True}, timeout=60)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events and all("error" not in e for e in events), events
    assert "".join(e["text_output"] for e in events) == text
