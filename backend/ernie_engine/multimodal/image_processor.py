"""Image preprocessing for NaViT-style encoders (PaddleOCR-VL): variable resolution, no padding.

Each image is resized so that both sides are multiples of `patch_size * merge_size` and its area lies
within [min_pixels, max_pixels] (`smart_resize`), rescaled to [0, 1], normalised, and cut into `patch_size`
squares in raster order. The result for a batch is one flat array of patches `[sum(h * w), C * temporal,
p, p]` plus one `(t, h, w)` grid per image (in patches), which the vision encoder needs to split the pack
back into images.

The arithmetic follows transformers' `PaddleOCRVLImageProcessorPil` step by step (PIL resize on uint8, float64
rescale then float32, float32 normalisation), so the pixels are identical, not merely close.

`ErnieVLImageProcessor` is the same pipeline as transformers' `Ernie4_5_VLMoeImageProcessorPil` does it: no
stretching of thin images, a wider default pixel range, and patches flattened to `[N, C * p * p]` in
merge-block order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 384 * 384,
    max_pixels: int = 1536 * 1536,
    stretch_thin: bool = True,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    # PaddleOCR-VL first stretches thin images to one factor, keeping the aspect ratio (ERNIE-VL does not).
    if stretch_thin and height < factor:
        width = round((width * factor) / height)
        height = factor
    if stretch_thin and width < factor:
        height = round((height * factor) / width)
        width = factor
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_pixels(width: int, height: int, what: str) -> None:
    """Refuse an image or video frame over Pillow's decompression-bomb threshold `Image.MAX_IMAGE_PIXELS`
    (~89M; Pillow itself only warns below twice that): a few KB of PNG or video can hold that many pixels,
    which take many seconds and gigabytes to decode before any resize."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ValueError(f"{what} is {width}x{height} pixels, over the limit of {limit} pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ProcessedImages:
    pixel_values: np.ndarray  # [sum(t * h * w), C * temporal_patch_size, patch, patch] float32
    grid_thw: np.ndarray  # [num_images, 3] int64, in patches

    @property
    def num_patches(self) -> list[int]:
        return [int(t * h * w) for t, h, w in self.grid_thw]


@dataclass
class ImageProcessor:
    """Resize (smart_resize), rescale, normalise and patchify; defaults are transformers' for PaddleOCR-VL."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 384 * 384
    max_pixels: int = 1536 * 1536
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    stretch_thin_images: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageProcessor:
        """From a checkpoint's preprocessor_config.json (`min_pixels` or `size.shortest_edge` style)."""
        kwargs: dict[str, Any] = {}
        size = raw.get("size") or {}
        for key, alias in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = raw.get(key, size.get(alias, size.get(key)))
            if value is not None:
                kwargs[key] = int(value)
        for key in ("patch_size", "merge_size", "temporal_patch_size", "resample"):
            if raw.get(key) is not None:
                kwargs[key] = int(raw[key])
        for key in ("rescale_factor",):
            if raw.get(key) is not None:
                kwargs[key] = float(raw[key])
        for key in ("image_mean", "image_std"):
            if raw.get(key) is not None:
                kwargs[key] = tuple(float(v) for v in raw[key])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if raw.get(key) is not None:
                kwargs[key] = bool(raw[key])
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | Path, **overrides: Any) -> ImageProcessor:
        """The checkpoint's preprocessor_config.json if present, else the defaults; `overrides` win
        (e.g. FastDeploy's `--mm-processor-kwargs '{"image_max_pixels": ...}'` mapped to max_pixels)."""
        path = Path(model_dir) / "preprocessor_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        raw.update(overrides)
        return cls.from_dict(raw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid_for_size(self, height: int, width: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid an image of this size gets, without processing it."""
        if self.do_resize:
            height, width = smart_resize(
                height, width, self.factor, self.min_pixels, self.max_pixels, self.stretch_thin_images
            )
        return 1, height // self.patch_size, width // self.patch_size

    def num_image_tokens(self, grid_thw: tuple[int, int, int] | np.ndarray) -> int:
        """Language-model tokens for one image: the merge folds merge_size^2 patches into one token."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (self.merge_size * self.merge_size)

    def __call__(self, images: Iterable[Image.Image]) -> ProcessedImages:
        """Each image in turn (a generator may decode them one at a time)."""
        patches, grids = [], []
        for image in images:
            pixels = self._pixels(image)
            image_patches, grid_h, grid_w = self._patchify(pixels)
            patches.append(image_patches)
            grids.append((1, grid_h, grid_w))
        return ProcessedImages(
            pixel_values=np.concatenate(patches, axis=0), grid_thw=np.asarray(grids, dtype=np.int64)
        )

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """[C, H, W] float32 after resize, rescale and normalisation."""
        image = to_rgb(image)
        if self.do_resize:
            height, width = smart_resize(
                image.height,
                image.width,
                self.factor,
                self.min_pixels,
                self.max_pixels,
                self.stretch_thin_images,
            )
            image = image.resize((width, height), resample=self.resample)
        pixels = np.moveaxis(np.asarray(image), -1, 0)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels.astype(np.float32, copy=False)

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, int, int]:
        """[C, H, W] -> [h * w, C * temporal, p, p] in raster order of the patch grid."""
        channels, height, width = pixels.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        grid_h, grid_w = height // p, width // p
        patches = pixels.reshape(channels, grid_h, p, grid_w, p).transpose(1, 3, 0, 2, 4)
        # A still image repeats itself over the temporal patch (1 for PaddleOCR-VL).
        patches = np.broadcast_to(
            patches[:, :, :, None], (grid_h, grid_w, channels, self.temporal_patch_size, p, p)
        )
        return patches.reshape(grid_h * grid_w, channels * self.temporal_patch_size, p, p), grid_h, grid_w


@dataclass
class ErnieVLImageProcessor(ImageProcessor):
    """ERNIE-4.5-VL's images, as transformers' `Ernie4_5_VLMoeImageProcessorPil` (the defaults are its own).

    Patches come out flattened, `[h * w, C * p * p]`, and grouped by merge block: the merge_size x merge_size
    patches the resampler folds into one token are consecutive, blocks in raster order. Video frames go
    through the same steps (`frame_patches`), one frame after another.
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 6177
    stretch_thin_images: bool = False

    def frame_patches(self, image: Image.Image) -> tuple[np.ndarray, int, int]:
        """One image or video frame -> (patches [h * w, C * p * p], grid h, grid w)."""
        return self._patchify(self._pixels(image))

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, int, int]:
        channels, height, width = pixels.shape
        p, m = self.patch_size, self.merge_size
        if height % (p * m) or width % (p * m):
            raise ValueError(f"image size {height}x{width} is not a multiple of patch * merge = {p * m}")
        grid_h, grid_w = height // p, width // p
        patches = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (blocks h, blocks w, m, m, C, p, p)
        return np.ascontiguousarray(patches).reshape(grid_h * grid_w, channels * p * p), grid_h, grid_w
