"""ERNIE-4.5-VL against transformers: image processor, 3D positions, logits on images and video, decoding.

A tiny random `Ernie4_5_VLMoeForConditionalGeneration` (dense first layer, then modality-isolated MoE with
different text / vision expert widths and a shared expert) is saved by transformers (the -PT layout) and
converted to the -Paddle layout (`ernie.*`, Linear [in, out], fused qkv / up_gate, flat config with -Paddle
keys); our model loads each and must reproduce transformers' logits. Images are drawn with Pillow; the video
is a small mp4 written with PyAV, and both models get the same video patches (transformers' video processor
needs torchvision, see tests/test_video.py for the video rules).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from ernie_engine.chat_template import ChatTemplate
from ernie_engine.layers import vision
from ernie_engine.layers.attention import AttentionMetadata
from ernie_engine.loader import load_model
from ernie_engine.multimodal import ErnieVLImageProcessor, ErnieVLProcessor, VideoProcessor
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import Ernie4_5_VLMoeConfig
from transformers import Ernie4_5_VLMoeForConditionalGeneration as ReferenceModel
from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
    Ernie4_5_VLMoeImageProcessorPil,
)

from tests.media_utils import CharTokens, write_mp4
from tests.reference_utils import TINY_VL_TEXT, multimodal_paged_greedy, save_multimodal_reference

IMAGE, IMAGE_START, IMAGE_END, VIDEO, VIDEO_START, VIDEO_END = range(300, 306)
TOKEN_IDS = {
    "image_token_id": IMAGE,
    "image_start_token_id": IMAGE_START,
    "image_end_token_id": IMAGE_END,
    "video_token_id": VIDEO,
    "video_start_token_id": VIDEO_START,
    "video_end_token_id": VIDEO_END,
}
VOCAB = 320
PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 12}
BLOCK_SIZE = 16


def reference_config() -> Ernie4_5_VLMoeConfig:
    return Ernie4_5_VLMoeConfig(
        text_config={
            **TINY_VL_TEXT,
            "vocab_size": VOCAB,
            "num_hidden_layers": 3,
            "moe_intermediate_size": [32, 24],
            "moe_num_experts": 4,
            "moe_k": 2,
            "moe_num_shared_experts": 1,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]},
        },
        vision_config={"depth": 2, "hidden_size": 48, "intermediate_size": 192, "num_heads": 4},
        tie_word_embeddings=False,
        **TOKEN_IDS,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReferenceModel, Path, Path]:
    def randomize(name: str, param: torch.Tensor) -> None:
        param.add_(torch.randn_like(param) * 0.05)  # norms, biases off 1 and 0: a wrong mapping shows
        if param.ndim >= 2:
            param.normal_(0.0, 0.2)  # large enough that greedy decoding does not settle on one token
        if "e_score_correction_bias" in name:
            param.normal_(0.0, 0.05)  # shifts which experts win, not their weights

    saved = tmp_path_factory.mktemp("ernie_vl_hf")
    model = save_multimodal_reference(ReferenceModel, reference_config(), saved, randomize)
    return model, saved, paddle_layout(saved, tmp_path_factory.mktemp("ernie_vl_paddle"))


def paddle_layout(saved: Path, out: Path) -> Path:
    """The same weights as a -Paddle checkpoint: `ernie.` text model, Linear [in, out], fused projections."""
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    order = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
    order |= {"gate_proj": ("up_gate_proj", 0), "up_proj": ("up_gate_proj", 1)}
    tensors = {}
    for name, value in load_file(saved / "model.safetensors").items():
        is_router = name.endswith((".mlp.gate.weight", ".mlp.gate.weight_1"))  # already [hidden, experts]
        if value.ndim == 2 and name.endswith(".weight") and not is_router and "embed_tokens" not in name:
            value = value.t()
        for old, new in (
            ("model.vision_model.", "vision_model."),
            ("model.resampler_model.", "resampler_model."),
        ):
            name = name.replace(old, new)
        name = "ernie." + name.removeprefix("model.") if name.startswith("model.") else name
        head, _, suffix = name.rpartition(".")
        prefix, _, module = head.rpartition(".")
        if module in order and prefix.startswith("ernie."):
            target, index = order[module]
            fused.setdefault(f"{prefix}.{target}.{suffix}", []).append((index, value))
        else:
            tensors[name] = value.contiguous()
    for name, parts in fused.items():
        tensors[name] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])], dim=-1).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((saved / "config.json").read_text())
    text = config.pop("text_config")
    vision = config.pop("vision_config")
    flat = {**{k: v for k, v in text.items() if k not in ("rope_parameters", "mlp_layer_types")}, **config}
    flat.update(
        rope_theta=text["rope_parameters"]["rope_theta"],
        freq_allocation=text["rope_parameters"]["mrope_section"][2],
        moe_num_experts=[text["moe_num_experts"]] * 2,
        moe_layer_start_index=1,
        moe_layer_end_index=2,
        spatial_conv_size=vision["spatial_merge_size"],
        temporal_conv_size=vision["temporal_merge_size"],
        vision_config={
            "depth": vision["depth"],
            "embed_dim": vision["hidden_size"],
            "mlp_ratio": vision["intermediate_size"] // vision["hidden_size"],
            "num_heads": vision["num_heads"],
            "patch_size": vision["patch_size"],
            "hidden_act": vision["hidden_act"],
        },
    )
    (out / "config.json").write_text(json.dumps(flat))
    return out


# Every character is one id below 256, the multimodal tokens are specials.
TOKENS = CharTokens(
    {
        "<|IMAGE_START|>": IMAGE_START,
        "<|IMAGE_END|>": IMAGE_END,
        "<|VIDEO_START|>": VIDEO_START,
        "<|VIDEO_END|>": VIDEO_END,
    }
)


def draw_images() -> list[Image.Image]:
    wide = Image.new("RGB", (150, 48), "white")
    ImageDraw.Draw(wide).text((6, 16), "ERNIE 4.5 VL", fill=(10, 10, 10))
    tall = Image.new("RGB", (50, 90), (240, 235, 220))
    draw = ImageDraw.Draw(tall)
    draw.text((4, 10), "VL:", fill=(200, 0, 0))
    draw.ellipse((10, 40, 40, 80), fill=(0, 0, 160))
    return [wide, tall]


def processor(**kwargs) -> ErnieVLProcessor:
    video = VideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 6, font=None)
    return ErnieVLProcessor(TOKENS, TOKEN_IDS, ErnieVLImageProcessor.from_dict(PIXELS), video, **kwargs)


def image_messages() -> list[dict]:
    wide, tall = draw_images()
    return [
        {"role": "system", "content": "Describe."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": wide},
                {"type": "text", "text": "and"},
                {"type": "image", "image": tall},
                {"type": "text", "text": "?"},
            ],
        },
    ]


@pytest.fixture(scope="module")
def image_prompt():
    return processor()(image_messages())


@pytest.fixture(scope="module")
def video_prompt():
    """An image, then a video decoded from an mp4 (5 frames, padded to 6)."""
    video = VideoProcessor(fps=None).decode(write_mp4())
    content = [
        {"type": "image", "image": draw_images()[1]},
        {"type": "video", "video": video},
        {"type": "text", "text": "What moves?"},
    ]
    return processor()([{"role": "user", "content": content}])


def test_image_processor_matches_transformers() -> None:
    images = draw_images() + [Image.new("RGBA", (33, 400), (0, 90, 0, 128)), Image.new("L", (20, 90), 77)]
    for kwargs in (PIXELS, {}, {"min_pixels": 147384, "max_pixels": 2822400, "image_std": [0.5] * 3}):
        size = (
            {"shortest_edge": kwargs["min_pixels"], "longest_edge": kwargs["max_pixels"]} if kwargs else None
        )
        extra = {k: v for k, v in kwargs.items() if "pixels" not in k}
        expected = Ernie4_5_VLMoeImageProcessorPil(**({"size": size} if size else {}), **extra)(images)
        ours = ErnieVLImageProcessor.from_dict(kwargs)(images)
        np.testing.assert_array_equal(ours.grid_thw, expected["image_grid_thw"])
        np.testing.assert_array_equal(ours.pixel_values, expected["pixel_values"])


def test_prompt_format(image_prompt) -> None:
    assert image_prompt.images.grid_thw.tolist() == [[1, 4, 10], [1, 6, 4]]
    assert image_prompt.prompt.startswith(
        "<|begin_of_sentence|>Describe.\nUser: <|IMAGE_START|><|image@placeholder|>"
    )
    ids = image_prompt.prompt_token_ids
    runs = [len(run) for run in "".join("x" if i == IMAGE else " " for i in ids).split()]
    assert runs == [4 * 10 // 4, 6 * 4 // 4]  # h * w / merge^2 per image, in prompt order
    starts = [i for i, t in enumerate(ids) if t == IMAGE_START]
    assert [ids[s + 1 + n] for s, n in zip(starts, runs, strict=True)] == [IMAGE_END, IMAGE_END]


# A checkpoint template of its own: each message's text or parts in order, images as ERNIE-VL's markers.
OWN_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{{ p.text if p.type == 'text' else "
    "'<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>' }}{% endfor %}{% endif %}</{{ m.role }}>{% endfor %}"
)


@pytest.mark.parametrize("template", [None, OWN_TEMPLATE])
def test_continue_final_message(template) -> None:
    """The built-in template and a checkpoint's own: the prompt ends inside the begun assistant message."""
    messages = [*image_messages(), {"role": "assistant", "content": "The picture shows"}]
    ours = processor(template=None if template is None else ChatTemplate(template))
    prompt = ours(messages, add_generation_prompt=False, continue_final_message=True)
    assert prompt.prompt.endswith("The picture shows") and IMAGE in prompt.prompt_token_ids
    with pytest.raises(ValueError, match="add_generation_prompt"):
        ours(messages, continue_final_message=True)
    if template is not None:  # the cut is right after the text, not where its letters recur ("</assistant>")
        messages[-1]["content"] = "ant "
        assert ours(messages, add_generation_prompt=False, continue_final_message=True).prompt.endswith(
            "<assistant>ant ")


def test_limit_mm_per_prompt() -> None:
    eleven = [{"type": "image", "image": Image.new("RGB", (28, 28))} for _ in range(11)]
    with pytest.raises(ValueError, match="at most 10 images per prompt, got 11"):
        processor(limits={"image": 10, "video": 3})([{"role": "user", "content": eleven}])
    processor(limits={"image": 11})([{"role": "user", "content": eleven}])


def test_positions_match_get_rope_index(reference, video_prompt) -> None:
    model, _, _ = reference
    ids = torch.tensor([video_prompt.prompt_token_ids])
    grids = video_prompt.images.grid_thw
    assert [int(t) for t in grids[:, 0]] == [1, 6]  # the image, then the video padded to an even frame count
    expected, delta = model.model.get_rope_index(
        ids,
        mm_token_type_ids=mm_token_types(ids),
        image_grid_thw=torch.tensor(grids[grids[:, 0] == 1]),
        video_grid_thw=torch.tensor(grids[grids[:, 0] > 1]),
    )
    np.testing.assert_array_equal(video_prompt.positions, expected[:, 0].numpy())
    assert video_prompt.mrope_delta == int(delta)


def mm_token_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMAGE).int() + 2 * (ids == VIDEO).int()


def moe_token_types(ids: torch.Tensor) -> torch.Tensor:
    image = (ids == IMAGE) | (ids == IMAGE_START) | (ids == IMAGE_END)
    video = (ids == VIDEO) | (ids == VIDEO_START) | (ids == VIDEO_END)
    return image.int() + 2 * video.int()


def reference_inputs(prompt) -> dict[str, torch.Tensor]:
    ids = torch.tensor([prompt.prompt_token_ids])
    pixels, grids = torch.tensor(prompt.images.pixel_values), torch.tensor(prompt.images.grid_thw)
    is_video = torch.repeat_interleave(grids[:, 0] > 1, grids.prod(-1))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": mm_token_types(ids),
        "moe_mm_token_type_ids": moe_token_types(ids),
    }
    if (grids[:, 0] == 1).any():
        inputs |= {"pixel_values": pixels[~is_video], "image_grid_thw": grids[grids[:, 0] == 1]}
    if (grids[:, 0] > 1).any():
        inputs |= {"pixel_values_videos": pixels[is_video], "video_grid_thw": grids[grids[:, 0] > 1]}
    return inputs


def our_logits(model, prompt) -> np.ndarray:
    ids = paddle.to_tensor(prompt.prompt_token_ids)
    embeds = model.get_input_embeddings(
        ids, model.embed_multimodal(prompt.images.pixel_values, prompt.images.grid_thw)
    )
    meta = AttentionMetadata.build([len(prompt.prompt_token_ids)])
    hidden = model(ids, paddle.to_tensor(prompt.positions), meta, None, inputs_embeds=embeds)
    return model.compute_logits(hidden).numpy()


@pytest.mark.parametrize("layout", ["transformers", "paddle"])
def test_image_logits_match_transformers(reference, image_prompt, layout: str) -> None:
    model, saved, paddle_dir = reference
    ours, _ = load_model(saved if layout == "transformers" else paddle_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        expected = model(**reference_inputs(image_prompt)).logits[0].numpy()
    assert np.abs(our_logits(ours, image_prompt) - expected).max() < 1e-4


def test_video_logits_match_transformers(reference, video_prompt) -> None:
    """The same image + video patches through both models (embeddings interleaved in prompt order)."""
    model, saved, _ = reference
    ours, _ = load_model(saved, dtype="float32", device="cpu")
    ids = video_prompt.prompt_token_ids
    assert ids.count(VIDEO) == 6 * 4 * 6 // 8  # t * h * w / (merge^2 * temporal merge)
    with torch.no_grad():
        expected = model(**reference_inputs(video_prompt)).logits[0].numpy()
    assert np.abs(our_logits(ours, video_prompt) - expected).max() < 1e-4


def test_greedy_decoding_through_paged_cache(reference, image_prompt) -> None:
    """Prefill in two chunks (embedding rows, positions and MoE modality sliced per chunk), then decode."""
    model, saved, _ = reference
    ours, config = load_model(saved, dtype="float32", device="cpu")
    prompt = image_prompt
    with torch.no_grad():
        generated = model.generate(
            **reference_inputs(prompt), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = generated[0, len(prompt.prompt_token_ids) :].tolist()

    split = prompt.prompt_token_ids.index(IMAGE) + 3  # inside the first image's placeholder run
    tokens = multimodal_paged_greedy(ours, config, prompt, split)
    assert len(set(expected)) > 8  # a decoding that varies, so the comparison means something
    assert tokens == expected


def test_video_logits_match_transformers_when_encoded_in_frame_groups(reference, video_prompt,
                                                                      monkeypatch) -> None:
    """The vision pass run over a few frames at a time (as for a long video) gives the same logits."""
    monkeypatch.setattr(vision, "MAX_VISION_PATCHES", 50)  # the image, then the video's 24-patch frame pairs
    model, saved, _ = reference
    ours, _ = load_model(saved, dtype="float32", device="cpu")
    with torch.no_grad():
        expected = model(**reference_inputs(video_prompt)).logits[0].numpy()
    assert np.abs(our_logits(ours, video_prompt) - expected).max() < 1e-4


# A fresh process (its VmHWM, the peak RSS, moves with this vision pass only): a video of 16 frames of 1024
# patches, at most 2048 patches per pass.
VISION_MEMORY_SCRIPT = """
import json, re, sys
import numpy as np
import paddle
from ernie_engine.config import ModelConfig
from ernie_engine.layers import vision
from ernie_engine.models.ernie4_5_vl import Ernie4_5_VLMoeForConditionalGeneration

def high_water_mb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1]) / 1024

vision.MAX_VISION_PATCHES = 2048
model = Ernie4_5_VLMoeForConditionalGeneration(ModelConfig.from_dict(json.loads(sys.stdin.read())))
pixels = paddle.zeros([16 * 32 * 32, 3 * 14 * 14])
base = high_water_mb()
with paddle.no_grad():
    model.embed_multimodal(pixels, np.array([[16, 32, 32]]))
print(high_water_mb() - base)
"""


def test_vision_pass_memory_is_bounded(reference) -> None:
    """The vision encoder and resampler ran every frame of a request's media in one pass: their activations
    grew with the video (~300 MB here; ~14 GB for a 30-frame video at the seed's pixel limits, which ends the
    server on CPU)."""
    _, _, paddle_dir = reference
    config = json.loads((paddle_dir / "config.json").read_text())
    config["vision_config"] |= {"depth": 1, "embed_dim": 256, "mlp_ratio": 4, "num_heads": 4}
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root / 'backend'}:{root}"}
    out = subprocess.run([sys.executable, "-c", VISION_MEMORY_SCRIPT], input=json.dumps(config), env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert float(out.stdout.split()[-1]) < 200
