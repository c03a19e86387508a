"""Chat messages with images (and, for ERNIE-4.5-VL, videos) -> what the engine feeds a VL model.

`MultimodalProcessor(messages)` renders the checkpoint's chat template (one
`<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>` per image, images before the message's text), expands each
placeholder to t*h*w/merge^2 copies, tokenizes, preprocesses the images and computes the 3D rotary positions,
returning a `MultimodalPrompt`. Images come as OpenAI `image_url` parts (data: URLs; local files and http(s)
under the `MediaFetcher` policy it is given), or as PIL images in `{"type": "image", "image": ...}` parts.

`ErnieVLProcessor` does the same for ERNIE-4.5-VL: its own markers and image processing, videos
(`video.py`), media fetched under the server's policy (`media.py`) and `--limit-mm-per-prompt`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jinja2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    check_continuation,
    compile_template,
    continue_final,
    mark_final,
    normalize_messages,
)
from .image_processor import ErnieVLImageProcessor, ImageProcessor, ProcessedImages, check_pixels
from .media import MediaFetcher
from .video import VideoFrames, VideoProcessor

IMAGE_PLACEHOLDER = "<|IMAGE_PLACEHOLDER|>"
IMAGE_START = "<|IMAGE_START|>"
IMAGE_END = "<|IMAGE_END|>"
_OCR_MARKER = re.compile(re.escape(IMAGE_PLACEHOLDER))

# PaddleOCR-VL's chat template (chat_template.jinja of the checkpoint), used when a checkpoint ships none.
PADDLEOCR_VL_TEMPLATE = """\
{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}
{%- if not cls_token is defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}
{%- if not eos_token is defined -%}{%- set eos_token = "</s>" -%}{%- endif -%}
{%- if not image_token is defined -%}
{%- set image_token = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" -%}
{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
{%- if message["role"] == "user" -%}
{{- "User: " -}}
{%- for content in message["content"] -%}
{%- if content["type"] == "image" -%}{{ image_token }}{%- endif -%}
{%- endfor -%}
{%- for content in message["content"] -%}
{%- if content["type"] == "text" -%}{{ content["text"] }}{%- endif -%}
{%- endfor -%}
{{ "\\n" -}}
{%- elif message["role"] == "assistant" -%}
{{- "Assistant:\\n" -}}
{%- for content in message["content"] -%}
{%- if content["type"] == "text" -%}{{ content["text"] }}{%- endif -%}
{%- endfor -%}
{{ eos_token -}}
{%- elif message["role"] == "system" -%}
{%- for content in message["content"] -%}
{%- if content["type"] == "text" -%}{{ content["text"] + "\\n" }}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "Assistant:\\n" -}}{%- endif -%}
"""

IMAGE_FORMATS = "PNG, JPEG, WebP, GIF, BMP, TIFF, ..."
# Why a rendered prompt can hold fewer media than the messages: the template leaves some roles' media out.
DROPPED_MEDIA = " (the chat template leaves out media in some roles, e.g. assistant: put media in user turns)"


# A media item, or a zero-argument loader of it: processors decode each item only when its turn comes and drop
# the full-size original once it is resized, so a request's memory holds one decoded original at a time (ten
# 40-megapixel PNGs of 100 KB each decode to 1.2 GB) rather than all of them.
Media = Image.Image | VideoFrames | Callable[[], Image.Image | VideoFrames]


def loaded(item: Media) -> Image.Image | VideoFrames:
    return item() if callable(item) else item


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def token_to_id(self, token: str) -> int: ...


def mrope_positions(
    input_ids: list[int] | np.ndarray,
    grid_thw: np.ndarray,
    image_token_id: int,
    merge_size: int,
    video_token_id: int | None = None,
    temporal_merge: int = 1,
) -> tuple[np.ndarray, int]:
    """3D rotary positions `[3, L]` (t, h, w) of a prompt, and the delta decode positions add to their index.

    Text advances all three axes together. An image's tokens (a run of `image_token_id`, one grid each, in
    order) sit at (s + t, s + row, s + col) over its merged grid, s being the next text position; text after
    it resumes at s + max(merged rows, merged cols). As transformers' `get_rope_index` for PaddleOCR-VL.
    ERNIE-4.5-VL adds videos (runs of `video_token_id`, grids in the same prompt-order list): their frames
    are merged `temporal_merge` at a time, so t counts frame pairs.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    is_media = np.isin(ids, [image_token_id] if video_token_id is None else [image_token_id, video_token_id])
    grids = iter(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist())
    columns, i, next_pos = [], 0, 0
    while i < len(ids):
        if not is_media[i]:
            end = i
            while end < len(ids) and not is_media[end]:
                end += 1
            columns.append(np.broadcast_to(np.arange(next_pos, next_pos + end - i), (3, end - i)))
            next_pos += end - i
            i = end
            continue
        try:
            t, h, w = next(grids)
        except StopIteration:
            raise ValueError("more image placeholder runs than images") from None
        t = t // temporal_merge if t > 1 else t  # a still image is one frame whatever the merge
        h, w = h // merge_size, w // merge_size
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        columns.append(np.stack([tt, hh, ww]).reshape(3, -1) + next_pos)
        if not np.all(is_media[i : i + t * h * w]):
            raise ValueError(f"image at token {i} needs {t * h * w} placeholder tokens")
        next_pos += max(h, w)
        i += t * h * w
    if next(grids, None) is not None:
        raise ValueError("more images than image placeholder runs")
    positions = np.concatenate(columns, axis=1) if columns else np.zeros((3, 0), dtype=np.int64)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions.astype(np.int64), delta


@dataclass
class MultimodalPrompt:
    """One request's model inputs. Prefill slices `positions`; later tokens use index + `mrope_delta`.

    For ERNIE-4.5-VL, `images` holds the image and video items together in prompt order (a video is an item
    with t > 1), and `vision_token_ids` are the tokens its MoE sends to the vision experts.
    """

    prompt: str
    prompt_token_ids: list[int]
    images: ProcessedImages | None
    positions: np.ndarray  # [3, len(prompt_token_ids)] int64
    mrope_delta: int
    image_token_id: int
    video_token_id: int | None = None
    vision_token_ids: tuple[int, ...] = ()

    def positions_for(self, start: int, end: int) -> np.ndarray:
        """Positions [3, end - start] of tokens start..end-1 (prompt or generated)."""
        prompt_len = len(self.prompt_token_ids)
        inside = self.positions[:, start:min(end, prompt_len)]
        beyond = np.arange(max(start, prompt_len), end) + self.mrope_delta
        return np.concatenate([inside, np.broadcast_to(beyond, (3, len(beyond)))], axis=1)

    def image_rows_for(self, start: int, end: int) -> slice:
        """Rows of the request's image (and video) embeddings the placeholders among tokens start..end-1
        take."""
        placeholders = [self.image_token_id, self.video_token_id or self.image_token_id]
        is_media = np.isin(np.asarray(self.prompt_token_ids), placeholders)
        before = int(np.sum(is_media[:start]))
        return slice(before, before + int(np.sum(is_media[start:end])))

    def vision_mask_for(self, start: int, end: int) -> np.ndarray:
        """[end - start] bool: which of tokens start..end-1 the MoE treats as vision (generated: none)."""
        mask = np.isin(np.asarray(self.prompt_token_ids[start:end], dtype=np.int64), self.vision_token_ids)
        return np.concatenate([mask, np.zeros(max(0, end - max(start, len(self.prompt_token_ids))), bool)])

    def media_hashes(self) -> list[str]:
        """One digest per image / video of the processed pixels and grid: a prefix-cache key component."""
        if self.images is None:
            return []
        digests, offset = [], 0
        for grid, count in zip(self.images.grid_thw, self.images.num_patches, strict=True):
            pixels = np.ascontiguousarray(self.images.pixel_values[offset : offset + count])
            digests.append(hashlib.sha256(grid.tobytes() + pixels.tobytes()).hexdigest())
            offset += count
        return digests


def check_media_limits(counts: dict[str, int], limits: dict[str, int]) -> None:
    """`--limit-mm-per-prompt` ({"image": 10, "video": 3}): a ValueError naming the first exceeded limit."""
    for kind, count in counts.items():
        limit = limits.get(kind)
        if limit is not None and count > limit:
            raise ValueError(f"at most {limit} {kind}{'s' if limit != 1 else ''} per prompt, got {count}")


def load_image(part: dict[str, Any], fetcher: MediaFetcher | None = None) -> Image.Image:
    """The PIL image of an image part: its PIL `image`, or the URL in `image_url` (or `image`) fetched under
    `fetcher`'s policy (default: data: URLs only)."""
    if isinstance(part.get("image"), Image.Image):
        return part["image"]
    url = _media_url({**part, "type": "image_url" if part.get("image_url") is not None else "image"})
    if fetcher is None and not url.startswith("data:"):
        raise ValueError(f"only data: image URLs are accepted here (no media policy), got {url[:40]!r}")
    return decode_image(lambda: (fetcher or MediaFetcher()).fetch(url))


def decode_image(read: Callable[[], bytes], what: str = "image") -> Image.Image:
    """Open and fully decode the bytes `read()` returns; a ValueError (a 400) when it fails, as an
    unreadable source (OSError), bytes that are no image, or too many pixels (`check_pixels`)."""
    try:
        image = Image.open(io.BytesIO(read()))
        check_pixels(image.width, image.height, what)  # from the header: before decoding a few KB into GBs
        image.load()
    except UnidentifiedImageError:  # its message names a BytesIO object, nothing the client sent
        raise ValueError(f"cannot decode {what}: not a format Pillow reads ({IMAGE_FORMATS})") from None
    except (OSError, Image.DecompressionBombError) as err:  # the latter: Image.open's own, higher limit
        raise ValueError(f"cannot decode {what}: {err}") from None
    except (SyntaxError, EOFError, IndexError, TypeError, struct.error) as err:
        # Damaged data Pillow's decoders trip on while loading (the errors Image.open itself reports as
        # "cannot identify"), e.g. SyntaxError("broken PNG file").
        raise ValueError(f"cannot decode {what}: {err}") from None
    return image


def _checked(messages: Any, parts: Callable[[Any], Any]) -> list[dict[str, Any]]:
    """Messages checked and normalised as text prompts' are (objects with a role, tool-call arguments as
    objects, as vLLM hands them to templates), their content through `parts` instead of flattened to text."""
    normalized = normalize_messages(messages)
    return [{**message, "content": parts(raw.get("content"))}
            for message, raw in zip(normalized, messages, strict=True)]


def check_text(text: str, markers: re.Pattern[str]) -> str:
    """Message text holding a media marker would be taken for media the request sent (or, when some media are
    left out by the chat template, get one of them): refused."""
    if found := markers.search(text):
        raise ValueError(f"message text holds the media marker {found[0]!r}: send media as image_url parts")
    return text


def _parts(content: Any) -> list[dict[str, Any]]:
    """Message content as a list of parts, image parts typed `image` (what the checkpoint template reads)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": check_text(content, _OCR_MARKER)}]
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": check_text(str(part.get("text", "")), _OCR_MARKER)})
        elif kind in ("image_url", "image"):
            parts.append({**part, "type": "image"})
        else:
            raise ValueError(f"unsupported content part type {kind!r} (expected text or image_url)")
    return parts


class MultimodalProcessor:
    """Messages -> `MultimodalPrompt`: chat template, placeholder expansion, tokens, pixels, 3D positions."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        image_processor: ImageProcessor,
        template: ChatTemplate | None = None,
        max_images: int | None = None,
        fetcher: MediaFetcher | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template or ChatTemplate(PADDLEOCR_VL_TEMPLATE)
        self.image_token_id = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
        self.max_images = max_images  # None: unlimited; 0: none (--limit-mm-per-prompt '{"image": N}')
        # None: data: URLs only; a MediaFetcher adds local files / downloads under the server's policy.
        self.fetcher = fetcher

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, tokenizer: TokenizerLike, **image_kwargs: Any
    ) -> MultimodalProcessor:
        template = ChatTemplate.from_dir(model_dir)
        if template.source == BUILTIN_TEMPLATES["ernie-4.5"]:  # the checkpoint ships none
            template = ChatTemplate(PADDLEOCR_VL_TEMPLATE, template.special_tokens)
        return cls(tokenizer, ImageProcessor.from_dir(model_dir, **image_kwargs), template)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> tuple[str, list[Media]]:
        """The prompt text (one placeholder per image) and the images in prompt order (loaders: fetched and
        decoded by `from_prompt`, one at a time)."""
        check_continuation(add_generation_prompt, continue_final_message)
        normalized = _checked(mark_final(messages) if continue_final_message else messages, _parts)
        # The template puts a message's images before its text, so that is their prompt order.
        image_parts = [p for message in normalized for p in message["content"] if p["type"] == "image"]
        if self.max_images is not None:  # before anything is fetched or decoded
            check_media_limits({"image": len(image_parts)}, {"image": self.max_images})
        images = [partial(load_image, p, self.fetcher) for p in image_parts]
        context = {**self.template.special_tokens}
        text = compile_template(self.template.source).render(
            messages=normalized, add_generation_prompt=add_generation_prompt, **context
        )
        return (continue_final(text, messages) if continue_final_message else text), images

    def __call__(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> MultimodalPrompt:
        text, images = self.render(messages, add_generation_prompt, continue_final_message)
        return self.from_prompt(text, images)

    def from_prompt(self, text: str, images: Sequence[Media]) -> MultimodalPrompt:
        """A rendered prompt with one IMAGE_PLACEHOLDER per image, and the images (or their loaders) in that
        order."""
        segments = text.split(IMAGE_PLACEHOLDER)
        if len(segments) - 1 != len(images):
            raise ValueError(f"prompt has {len(segments) - 1} image placeholders for {len(images)} images"
                             f"{DROPPED_MEDIA}")
        processed = self.image_processor(loaded(image) for image in images) if images else None
        ids = self.tokenizer.encode(segments[0])
        for i, segment in enumerate(segments[1:]):
            # Placeholder runs are inserted as ids: the same as tokenizing the expanded text, whose special
            # tokens split it anyway, without building a string of thousands of placeholders.
            ids += [self.image_token_id] * self.image_processor.num_image_tokens(processed.grid_thw[i])
            ids += self.tokenizer.encode(segment)
        grid = processed.grid_thw if processed is not None else np.zeros((0, 3), dtype=np.int64)
        positions, delta = mrope_positions(ids, grid, self.image_token_id, self.image_processor.merge_size)
        return MultimodalPrompt(text, ids, processed, positions, delta, self.image_token_id)


# ---- ERNIE-4.5-VL ----------------------------------------------------------------------------------------

# What chat templates emit for one image / video: the legacy markers (ERNIE's own templates and our built-in
# ones, between <|IMAGE_START|> / <|IMAGE_END|> and the video pair) and transformers' native tokens.
ERNIE_MARKERS = {
    "<|image@placeholder|>": "image",
    "<|IMAGE_PLACEHOLDER|>": "image",
    "<|video@placeholder|>": "video",
    "<|VIDEO_PLACEHOLDER|>": "video",
}
_ERNIE_MARKER = re.compile("|".join(re.escape(marker) for marker in ERNIE_MARKERS))
_MEDIA_KINDS = {"image_url": "image", "image": "image", "video_url": "video", "video": "video"}
# FastDeploy's --mm-processor-kwargs keys -> (processor, field).
MM_PROCESSOR_KWARGS = {
    "image_min_pixels": ("image", "min_pixels"),
    "image_max_pixels": ("image", "max_pixels"),
    "video_min_pixels": ("video", "min_pixels"),
    "video_max_pixels": ("video", "max_pixels"),
    "video_fps": ("video", "fps"),
    "video_min_frames": ("video", "min_frames"),
    "video_max_frames": ("video", "max_frames"),
    "video_num_frames": ("video", "num_frames"),
}


def split_mm_processor_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """FastDeploy-style `mm_processor_kwargs` -> (image processor overrides, video processor overrides)."""
    unknown = sorted(set(kwargs) - set(MM_PROCESSOR_KWARGS))
    if unknown:
        raise ValueError(f"unknown mm_processor_kwargs {unknown}; known: {', '.join(MM_PROCESSOR_KWARGS)}")
    image: dict[str, Any] = {}
    video: dict[str, Any] = {}
    for key, value in kwargs.items():
        target, name = MM_PROCESSOR_KWARGS[key]
        (image if target == "image" else video)[name] = value
    return image, video


def _media_url(part: dict[str, Any]) -> str:
    value = part.get(part["type"])
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ValueError(f"a {part['type']} part needs {part['type']}.url")
    return url


def _ernie_parts(content: Any) -> Any:
    """Validated message content: a string stays one; parts keep their type (templates test it)."""
    if content is None or isinstance(content, str):
        return check_text(content or "", _ERNIE_MARKER)
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            check_text(str(part.get("text", "")), _ERNIE_MARKER)
        elif kind not in _MEDIA_KINDS:
            raise ValueError(f"unsupported content part type {kind!r} (expected text, image_url, video_url)")
    return content


class ErnieVLProcessor:
    """Messages with images and videos -> `MultimodalPrompt` for ERNIE-4.5-VL.

    The chat template emits one marker per image / video (`ERNIE_MARKERS`, inside the start/end tokens); each
    becomes t*h*w/4 image tokens or t*h*w/8 video tokens. Media come from `image_url` / `video_url` parts
    (fetched by the `MediaFetcher` policy: data: URLs, local files under the media root, allowed hosts), or
    as PIL images / `VideoFrames` in `image` / `video` parts. Limits are checked before anything is fetched.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        token_ids: dict[str, int],
        image_processor: ErnieVLImageProcessor,
        video_processor: VideoProcessor,
        template: ChatTemplate | None = None,
        fetcher: MediaFetcher | None = None,
        limits: dict[str, int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.token_ids = dict(token_ids)
        self.image_processor = image_processor
        self.video_processor = video_processor
        self.template = template or ChatTemplate(BUILTIN_TEMPLATES["ernie-4.5-thinking"])
        self.fetcher = fetcher or MediaFetcher()
        self.limits = {kind: int(n) for kind, n in (limits or {}).items()}

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        tokenizer: TokenizerLike,
        mm_processor_kwargs: dict[str, Any] | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        fetcher: MediaFetcher | None = None,
    ) -> ErnieVLProcessor:
        """Processors from the checkpoint's configs (+ FastDeploy-style overrides), its chat template."""
        from ..config import ModelConfig
        from ..models.ernie4_5_vl import token_ids

        model_dir = Path(model_dir)
        image_kwargs, video_kwargs = split_mm_processor_kwargs(mm_processor_kwargs or {})
        nested = model_dir / "processor_config.json"
        raw = json.loads(nested.read_text()).get("image_processor") if nested.is_file() else None
        image_processor = (
            ErnieVLImageProcessor.from_dict({**raw, **image_kwargs})
            if raw
            else ErnieVLImageProcessor.from_dir(model_dir, **image_kwargs)
        )
        video_processor = VideoProcessor.from_dir(model_dir, **video_kwargs)
        template = ChatTemplate.from_dir(model_dir, fallback="ernie-4.5-thinking")
        ids = token_ids(ModelConfig.from_dir(model_dir))
        return cls(tokenizer, ids, image_processor, video_processor, template, fetcher, limit_mm_per_prompt)

    def __call__(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> MultimodalPrompt:
        messages = _checked(messages, _ernie_parts)
        contents = [m["content"] for m in messages if isinstance(m["content"], list)]
        parts = [p for content in contents for p in content if p["type"] != "text"]
        kinds = [_MEDIA_KINDS[p["type"]] for p in parts]
        check_media_limits({k: kinds.count(k) for k in ("image", "video")}, self.limits)
        text = self.render(messages, tools, add_generation_prompt, **template_kwargs)
        pairs = list(zip(parts, kinds, strict=True))
        images = [partial(load_image, p, self.fetcher) for p, kind in pairs if kind == "image"]
        videos = [partial(self._video, p) for p, kind in pairs if kind == "video"]
        return self.from_prompt(text, images, videos)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text, one marker per image / video. The checkpoint's template gets the content parts as
        sent (as transformers' apply_chat_template does); our built-in ones get them as marker text."""
        if self.template.source in BUILTIN_TEMPLATES.values():
            return self.template.render(messages, tools, add_generation_prompt, continue_final_message,
                                        **template_kwargs)
        check_continuation(add_generation_prompt, continue_final_message)
        context = {**self.template.special_tokens, **template_kwargs}
        try:
            text = compile_template(self.template.source).render(
                messages=mark_final(messages) if continue_final_message else messages, tools=tools or None,
                add_generation_prompt=add_generation_prompt, **context,
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template error: {err}") from None
        except TypeError as err:  # e.g. a template concatenating a non-string field
            raise ValueError(f"chat template could not render these messages: {err}") from None
        return continue_final(text, messages) if continue_final_message else text

    def from_prompt(
        self, text: str, images: Sequence[Media], videos: Sequence[Media]
    ) -> MultimodalPrompt:
        """A rendered prompt and its media (or their loaders) in marker order -> ids (markers expanded),
        pixels, positions."""
        markers = [ERNIE_MARKERS[m] for m in _ERNIE_MARKER.findall(text)]
        if markers.count("image") != len(images) or markers.count("video") != len(videos):
            raise ValueError(
                f"prompt has {markers.count('image')} image and {markers.count('video')} video markers for "
                f"{len(images)} images and {len(videos)} videos{DROPPED_MEDIA}"
            )
        segments = _ERNIE_MARKER.split(text)
        pending = {"image": iter(images), "video": iter(videos)}
        ids, items = self.tokenizer.encode(segments[0]), []
        for kind, segment in zip(markers, segments[1:], strict=True):
            # Placeholder runs go in as ids: special tokens surround every marker, so this equals tokenizing
            # the expanded text, without building a string of thousands of placeholders.
            item = self._process(kind, loaded(next(pending[kind])))
            ids += [self.token_ids[f"{kind}_token_id"]] * self._num_tokens(kind, item.grid_thw[0])
            ids += self.tokenizer.encode(segment)
            items.append(item)
        media = (
            ProcessedImages(
                np.concatenate([i.pixel_values for i in items]), np.concatenate([i.grid_thw for i in items])
            )
            if items
            else None
        )
        grid = media.grid_thw if media is not None else np.zeros((0, 3), dtype=np.int64)
        image_id, video_id = self.token_ids["image_token_id"], self.token_ids["video_token_id"]
        merge, temporal = self.image_processor.merge_size, self.video_processor.temporal_patch_size
        positions, delta = mrope_positions(ids, grid, image_id, merge, video_id, temporal)
        vision_ids = tuple(sorted(set(self.token_ids.values())))
        return MultimodalPrompt(text, ids, media, positions, delta, image_id, video_id, vision_ids)

    def _process(self, kind: str, media: Image.Image | VideoFrames) -> ProcessedImages:
        return self.image_processor([media]) if kind == "image" else self.video_processor([media])

    def _num_tokens(self, kind: str, grid_thw: np.ndarray) -> int:
        if kind == "image":
            return self.image_processor.num_image_tokens(grid_thw)
        return self.video_processor.num_video_tokens(grid_thw)

    def _video(self, part: dict[str, Any]) -> VideoFrames:
        if isinstance(part.get("video"), VideoFrames):
            return part["video"]
        return self.video_processor.decode(self.fetcher.fetch(_media_url(part)))
