"""What the engine keeps per multimodal request, and the processor it builds for a multimodal checkpoint.

`build_processor` picks the checkpoint's processor (PaddleOCR-VL or ERNIE-4.5-VL) with the row's
`mm_processor_kwargs`, `limit_mm_per_prompt` and media policy (`media_root`, `allowed_media_hosts`), behind
one call: `processor(messages, tools, template_kwargs) -> MultimodalPrompt`.

`MultimodalInputs` rides on the engine's `Request`: the processed prompt (pixels, grids, 3D positions), the
token spans of its images / videos, and their embeddings while the prefill needs them. It answers the three
questions the engine asks: where a prefill chunk may end (never inside an image), which media a KV block's
prefix-cache key must include, and which embedding rows a chunk's placeholders take.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..chat_template import ChatTemplate
from ..config import EngineConfig, ModelConfig
from .media import MediaFetcher
from .processor import (
    MM_PROCESSOR_KWARGS,
    ErnieVLProcessor,
    MultimodalProcessor,
    MultimodalPrompt,
    split_mm_processor_kwargs,
)

if TYPE_CHECKING:
    from ..sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class EngineProcessor:
    """A checkpoint's multimodal processor as the engine calls it."""

    process: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]], MultimodalPrompt]
    template: ChatTemplate  # what decides whether a prompt leaves the model thinking
    placeholder_ids: frozenset[int]  # image / video tokens only the processor may put into a prompt

    def __call__(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any],
    ) -> MultimodalPrompt:
        return self.process(messages, tools, template_kwargs)


def _paddleocr_vl(
    model_dir: Path, tokenizer: Any, config: EngineConfig, fetcher: MediaFetcher
) -> EngineProcessor:
    image_kwargs, _ = split_mm_processor_kwargs(config.mm_processor_kwargs)
    video_keys = sorted(k for k in config.mm_processor_kwargs if MM_PROCESSOR_KWARGS[k][0] == "video")
    if video_keys:
        raise ValueError(f"mm_processor_kwargs {video_keys}: PaddleOCR-VL takes no video")
    unknown = sorted(set(config.limit_mm_per_prompt) - {"image"})
    if unknown:
        raise ValueError(f"limit_mm_per_prompt {unknown}: PaddleOCR-VL takes images only")
    loaded = MultimodalProcessor.from_dir(model_dir, tokenizer, **image_kwargs)
    processor = MultimodalProcessor(tokenizer, loaded.image_processor, loaded.template,
                                    config.limit_mm_per_prompt.get("image"), fetcher)
    return EngineProcessor(
        # Its template takes no options beyond where the prompt ends.
        lambda messages, tools, kwargs: processor(messages, kwargs.get("add_generation_prompt", True),
                                                  kwargs.get("continue_final_message", False)),
        processor.template,
        frozenset({processor.image_token_id}),
    )


def _ernie_vl(
    model_dir: Path, tokenizer: Any, config: EngineConfig, fetcher: MediaFetcher
) -> EngineProcessor:
    processor = ErnieVLProcessor.from_dir(
        model_dir, tokenizer, config.mm_processor_kwargs, config.limit_mm_per_prompt, fetcher
    )
    ids = processor.token_ids
    return EngineProcessor(
        lambda messages, tools, kwargs: processor(messages, tools, **kwargs),
        processor.template,
        frozenset({ids["image_token_id"], ids["video_token_id"]}),
    )


PROCESSORS: dict[str, Callable[[Path, Any, EngineConfig, MediaFetcher], EngineProcessor]] = {
    "PaddleOCRVLForConditionalGeneration": _paddleocr_vl,
    "Ernie4_5_VLMoeForConditionalGeneration": _ernie_vl,
}


def build_processor(
    model_config: ModelConfig, model_dir: Path, tokenizer: Any, config: EngineConfig
) -> EngineProcessor:
    """The processor of a multimodal architecture, with the row's settings; ValueError for bad settings."""
    builder = PROCESSORS.get(model_config.architecture)
    if builder is None:
        raise ValueError(f"no multimodal processor for architecture {model_config.architecture!r}")
    fetcher = MediaFetcher.from_settings(config.media_root, config.allowed_media_hosts)
    logger.info(
        "multimodal inputs for %s: limits %s, media root %r, media hosts %s",
        model_config.architecture,
        config.limit_mm_per_prompt or "none",
        fetcher.media_root,
        list(fetcher.allowed_hosts) or "none",
    )
    return builder(model_dir, tokenizer, config, fetcher)


def placeholder_runs(token_ids: list[int], placeholder_ids: frozenset[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of placeholder tokens: one per image / video (start/end tokens part them)."""
    is_media = np.isin(np.asarray(token_ids, dtype=np.int64), list(placeholder_ids))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_media.astype(np.int8), [0]])))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


@dataclass(eq=False)
class MultimodalInputs:
    prompt: MultimodalPrompt
    spans: list[tuple[int, int]]  # token [start, end) of each image / video, in prompt order
    digests: list[bytes]  # one content hash per image / video
    # [placeholders, hidden] once computed; dropped when the request's prefill is done (recomputed if a
    # preempted sequence needs them again).
    embeds: Any = field(default=None, repr=False)

    @classmethod
    def from_prompt(cls, prompt: MultimodalPrompt, placeholder_ids: frozenset[int]) -> MultimodalInputs:
        spans = placeholder_runs(prompt.prompt_token_ids, placeholder_ids)
        digests = [bytes.fromhex(d) for d in prompt.media_hashes()]
        if len(spans) != len(digests):
            raise ValueError(f"prompt has {len(spans)} placeholder runs for {len(digests)} images / videos")
        # The vision pass batches every request's media of a step: patches that match no grid would fail
        # the whole step, so such media are refused here, for their request alone.
        images = prompt.images
        if images.pixel_values.shape[0] != sum(images.num_patches):
            raise ValueError(f"media preprocessing gave {images.pixel_values.shape[0]} patches for grids "
                             f"{images.grid_thw.tolist()}")
        return cls(prompt, spans, digests)

    @property
    def num_placeholders(self) -> int:
        return sum(e - s for s, e in self.spans)

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk [start, end) may end: before an image it would cut, or after all of it when
        the chunk starts at (or inside) that image, which can exceed the step's token budget by one image."""
        for s, e in self.spans:
            if s < end < e:
                return s if s > start else e
        return end

    def has_media(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self.spans)

    def cache_key(self, start: int, end: int) -> bytes:
        """The media content of the images overlapping tokens [start, end): part of that KV block's hash,
        so equal placeholder ids with different pixels never share cached blocks (hashes chain onwards)."""
        spans = zip(self.spans, self.digests, strict=True)
        return b"".join(digest for (s, e), digest in spans if s < end and start < e)

    def embed_rows(self, start: int, end: int) -> Any:
        """The embedding rows of the placeholders among tokens [start, end)."""
        return self.embeds[self.prompt.image_rows_for(start, end)]

    def media_item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Patches and grid [3] of the `index`-th image / video (what a vision pass over it alone takes)."""
        images = self.prompt.images
        offsets = np.cumsum([0, *images.num_patches])
        return images.pixel_values[offsets[index] : offsets[index + 1]], images.grid_thw[index]


def step_positions(seqs: list[Sequence], starts: list[int], ends: list[int]) -> np.ndarray:
    """A step's positions: [T] indices; [3, T] (t, h, w) while a multimodal prompt is in the batch (text:
    equal on all axes); after a multimodal prompt, index + its mrope delta."""
    mms = [seq.request.mm for seq in seqs]
    ranges = [np.arange(s, e, dtype=np.int64) for s, e in zip(starts, ends, strict=True)]
    if all(mm is None for mm in mms):
        return np.concatenate(ranges)
    prefilling = any(
        mm is not None and s < seq.num_prompt_tokens for seq, s, mm in zip(seqs, starts, mms, strict=True)
    )
    if not prefilling:
        deltas = [mm.prompt.mrope_delta if mm else 0 for mm in mms]
        return np.concatenate([r + d for r, d in zip(ranges, deltas, strict=True)])
    columns = [
        mm.prompt.positions_for(s, e) if mm is not None else np.broadcast_to(r, (3, len(r)))
        for s, e, r, mm in zip(starts, ends, ranges, mms, strict=True)
    ]
    return np.concatenate(columns, axis=1)


def step_vision_mask(
    seqs: list[Sequence], starts: list[int], ends: list[int], vision_token_ids: list[int]
) -> np.ndarray:
    """[T] bool: the prompt tokens ERNIE-4.5-VL's MoE sends to its vision experts (generated ones never)."""
    return np.concatenate([
        np.isin(seq.token_ids[s:e], vision_token_ids) & (np.arange(s, e) < seq.num_prompt_tokens)
        for seq, s, e in zip(seqs, starts, ends, strict=True)
    ])
