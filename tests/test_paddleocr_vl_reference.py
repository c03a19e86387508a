"""PaddleOCR-VL against transformers: image processor, 3D positions, logits, greedy decoding (paged cache).

A tiny random `PaddleOCRVLForConditionalGeneration` is saved with transformers' names and in the shipped
layout (`visual.vision_model.*`, `mlp_AR.*`, `model.*`, flat config.json); our model loads each and must
reproduce transformers' logits for a prompt holding two images drawn with Pillow.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from ernie_engine.layers import vision
from ernie_engine.layers.attention import AttentionMetadata
from ernie_engine.loader import load_model
from ernie_engine.multimodal import ImageProcessor, MultimodalProcessor, mrope_positions
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import PaddleOCRVLConfig
from transformers import PaddleOCRVLForConditionalGeneration as ReferenceModel
from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import PaddleOCRVLImageProcessorPil

from tests.media_utils import CharTokens
from tests.reference_utils import TINY_VL_TEXT, multimodal_paged_greedy, save_multimodal_reference

IMAGE_TOKEN, START, END = 300, 301, 302
VOCAB = 304
PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 12}
BLOCK_SIZE = 16


def reference_config() -> PaddleOCRVLConfig:
    return PaddleOCRVLConfig(
        text_config={
            **TINY_VL_TEXT,
            "vocab_size": VOCAB,
            "num_hidden_layers": 2,
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default"},
            "rope_theta": 500000.0,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 56,  # a 4x4 position table, resampled to every grid
            "patch_size": 14,
            "spatial_merge_size": 2,
        },
        image_token_id=IMAGE_TOKEN,
        vision_start_token_id=START,
        vision_end_token_id=END,
        tie_word_embeddings=False,
    )


def draw_images() -> list[Image.Image]:
    wide = Image.new("RGB", (150, 48), "white")
    ImageDraw.Draw(wide).text((6, 16), "PaddleOCR 0.9B", fill=(10, 10, 10))
    tall = Image.new("RGB", (50, 90), (240, 235, 220))
    draw = ImageDraw.Draw(tall)
    draw.text((4, 10), "OCR:", fill=(200, 0, 0))
    draw.text((4, 50), "42", fill=(0, 0, 160))
    return [wide, tall]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReferenceModel, Path, Path]:
    def randomize(name: str, param: torch.Tensor) -> None:
        param.add_(torch.randn_like(param) * 0.05)  # norms, biases off 1 and 0: a wrong mapping shows
        if param.ndim == 2:
            param.normal_(0.0, 0.2)  # large enough that greedy decoding does not settle on one token

    saved = tmp_path_factory.mktemp("paddleocr_vl_hf")
    model = save_multimodal_reference(ReferenceModel, reference_config(), saved, randomize)
    return model, saved, ship_layout(saved, tmp_path_factory.mktemp("paddleocr_vl_shipped"))


def ship_layout(saved: Path, out: Path) -> Path:
    """The same weights as the checkpoint ships them: old prefixes, unused extras, a flat config."""
    renames = (
        ("model.language_model.", "model."),
        ("model.visual.", "visual."),
        ("model.projector.", "mlp_AR."),
    )
    tensors = {}
    for name, value in load_file(saved / "model.safetensors").items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        tensors[name] = value
    tensors["visual.vision_model.head.probe.weight"] = torch.zeros(4, 4)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((saved / "config.json").read_text())
    flat = {**config.pop("text_config"), **config}
    flat["architectures"] = ["PaddleOCRVLForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(flat))
    return out


# Every character is one id below 256 and the image tokens are specials.
TOKENS = CharTokens({"<|IMAGE_PLACEHOLDER|>": IMAGE_TOKEN, "<|IMAGE_START|>": START, "<|IMAGE_END|>": END})


def messages() -> list[dict]:
    wide, tall = draw_images()
    return [
        {"role": "system", "content": "Read it."},
        {"role": "user", "content": [
            {"type": "image", "image": wide},
            {"type": "text", "text": "OCR:"},
            {"type": "image", "image": tall},
        ]},
    ]


@pytest.fixture(scope="module")
def prompt():
    return MultimodalProcessor(TOKENS, ImageProcessor.from_dict(PIXELS))(messages())


def test_image_processor_matches_transformers() -> None:
    images = draw_images() + [Image.new("RGBA", (33, 400), (0, 90, 0, 128))]
    for kwargs in (PIXELS, {}, {"min_pixels": 147384, "max_pixels": 2822400, "image_mean": [0.5] * 3,
                                "image_std": [0.5] * 3}):
        expected = PaddleOCRVLImageProcessorPil(**kwargs)(images)
        ours = ImageProcessor.from_dict(kwargs)(images)
        np.testing.assert_array_equal(ours.grid_thw, expected["image_grid_thw"])
        np.testing.assert_array_equal(ours.pixel_values, expected["pixel_values"])


def test_prompt_format(prompt) -> None:
    grids = prompt.images.grid_thw.tolist()
    assert grids == [[1, 4, 10], [1, 6, 4]]  # smart_resize within the pixel limits
    assert prompt.prompt == (
        "<|begin_of_sentence|>Read it.\nUser: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
        "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant:\n"
    )
    ids = prompt.prompt_token_ids
    runs = [len(run) for run in "".join("x" if i == IMAGE_TOKEN else " " for i in ids).split()]
    assert runs == [4 * 10 // 4, 6 * 4 // 4]  # h * w / merge^2 per image
    assert ids.count(START) == ids.count(END) == 2


def test_data_url_images_give_the_same_prompt(prompt) -> None:
    def data_url(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def as_url(part: dict) -> dict:
        if part["type"] != "image":
            return part
        return {"type": "image_url", "image_url": {"url": data_url(part["image"])}}

    as_urls = [
        {**m, "content": [as_url(p) for p in m["content"]]} if isinstance(m["content"], list) else m
        for m in messages()
    ]
    from_urls = MultimodalProcessor(TOKENS, ImageProcessor.from_dict(PIXELS))(as_urls)
    assert from_urls.prompt_token_ids == prompt.prompt_token_ids
    np.testing.assert_array_equal(from_urls.images.pixel_values, prompt.images.pixel_values)
    with pytest.raises(ValueError, match="data: image URLs"):
        MultimodalProcessor(TOKENS, ImageProcessor())(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
        )


def test_positions_match_get_rope_index(reference, prompt) -> None:
    model, _, _ = reference
    ids = torch.tensor([prompt.prompt_token_ids])
    expected, delta = model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == IMAGE_TOKEN).int(), image_grid_thw=torch.tensor(prompt.images.grid_thw)
    )
    np.testing.assert_array_equal(prompt.positions, expected[:, 0].numpy())
    assert prompt.mrope_delta == int(delta) < 0
    ours, _ = mrope_positions(prompt.prompt_token_ids, prompt.images.grid_thw, IMAGE_TOKEN, 2)
    np.testing.assert_array_equal(ours, prompt.positions)


def reference_inputs(prompt) -> dict[str, torch.Tensor]:
    ids = torch.tensor([prompt.prompt_token_ids])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.tensor(prompt.images.pixel_values),
        "image_grid_thw": torch.tensor(prompt.images.grid_thw),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
    }


@pytest.mark.parametrize("layout", ["transformers", "shipped"])
def test_logits_match_transformers(reference, prompt, layout: str) -> None:
    model, saved, shipped = reference
    ours, _ = load_model(saved if layout == "transformers" else shipped, dtype="float32", device="cpu")
    with torch.no_grad():
        expected = model(**reference_inputs(prompt)).logits[0].numpy()
    ids = paddle.to_tensor(prompt.prompt_token_ids)
    image_embeds = ours.embed_multimodal(prompt.images.pixel_values, prompt.images.grid_thw)
    embeds = ours.get_input_embeddings(ids, image_embeds)
    meta = AttentionMetadata.build([len(prompt.prompt_token_ids)])
    hidden = ours(ids, paddle.to_tensor(prompt.positions), meta, None, inputs_embeds=embeds)
    logits = ours.compute_logits(hidden).numpy()
    assert np.abs(logits - expected).max() < 1e-4


def test_greedy_decoding_through_paged_cache(reference, prompt) -> None:
    """Prefill in two chunks (image rows and positions sliced per chunk), then one-token decode steps."""
    model, saved, _ = reference
    ours, config = load_model(saved, dtype="float32", device="cpu")
    with torch.no_grad():
        generated = model.generate(**reference_inputs(prompt), max_new_tokens=16, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    expected = generated[0, len(prompt.prompt_token_ids):].tolist()

    split = 12  # inside the first image's placeholder run
    tokens = multimodal_paged_greedy(ours, config, prompt, split)
    assert len(set(expected)) > 8  # a decoding that varies, so the comparison means something
    assert tokens == expected


def test_an_image_limit_of_zero_means_no_images() -> None:
    """As vLLM and ERNIE-VL's processor: limit_mm_per_prompt {"image": 0} refuses images; unset, no limit."""
    with pytest.raises(ValueError, match=r"at most 0 images per prompt, got \d"):
        MultimodalProcessor(TOKENS, ImageProcessor.from_dict(PIXELS), max_images=0)(messages())
    assert MultimodalProcessor(TOKENS, ImageProcessor.from_dict(PIXELS))(messages()).prompt_token_ids


def test_logits_match_with_the_vision_encoder_in_pieces(reference, prompt, monkeypatch) -> None:
    """The vision encoder run one image at a time, its attention a few queries at a time (as for many or
    large images), gives the same logits."""
    monkeypatch.setattr(vision, "MAX_SCORE_ELEMENTS", 7 * 16 * 4)  # 4 heads: a few queries per call
    monkeypatch.setattr(vision, "MAX_VISION_PATCHES", 1)  # each image (frame) alone
    model, saved, _ = reference
    ours, _ = load_model(saved, dtype="float32", device="cpu")
    with torch.no_grad():
        expected = model(**reference_inputs(prompt)).logits[0].numpy()
    ids = paddle.to_tensor(prompt.prompt_token_ids)
    embeds = ours.get_input_embeddings(ids, ours.embed_multimodal(prompt.images.pixel_values,
                                                                  prompt.images.grid_thw))
    meta = AttentionMetadata.build([len(prompt.prompt_token_ids)])
    hidden = ours(ids, paddle.to_tensor(prompt.positions), meta, None, inputs_embeds=embeds)
    assert np.abs(ours.compute_logits(hidden).numpy() - expected).max() < 1e-4


# A fresh process (its VmHWM, the peak RSS, moves with this attention call only): one image of 2000 patches.
ATTENTION_MEMORY_SCRIPT = """
import re
import paddle
from ernie_engine.layers.vision import packed_attention

def high_water_mb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1]) / 1024

q, k, v = (paddle.randn([2000, 16, 8]) for _ in range(3))
base = high_water_mb()
packed_attention(q, k, v, [2000], 8**-0.5)
print(high_water_mb() - base)
"""


def test_vision_attention_memory_is_bounded() -> None:
    """One image's attention held its whole score matrix, twice: 2000 patches x 16 heads took 500 MB, the
    12k patches of a 1536 x 1536 image (PaddleOCR-VL's largest) ~18 GB, which ends the server on CPU."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root / 'backend'}:{root}"}
    out = subprocess.run([sys.executable, "-c", ATTENTION_MEMORY_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert float(out.stdout.split()[-1]) < 250  # scores 2000 x 2000 x 16 in fp32 are 244 MB
