"""Videos for ERNIE-4.5-VL: decode (PyAV), sample frames, draw timestamps, patchify.

The rules are transformers' `Ernie4_5_VLMoeVideoProcessor` (whose own code needs torchvision):
- sampling: n = total / video_fps * fps when `fps` is set (else all frames), clamped to
  [min_frames, max_frames] and to the frame count, or a fixed `num_frames`; the frames taken are
  int(i * total / n) for i = 0, 1, ... while below total (float32 arithmetic, as `torch.arange(...).int()`);
- each sampled frame gets its timestamp ("time: HH:MM:SS.ss", frame index / video fps) drawn in its top-left
  corner, black with a white outline, font size int(0.1 * min(width, height)), outline int(0.1 * font size),
  with the font file the checkpoint ships (`Roboto-Regular.ttf`); without one, drawing is skipped (logged);
- an odd number of frames is padded with a copy of the last frame (frames are merged in pairs);
- frames are resized within [min_pixels, max_pixels] (smart_resize, factor 28), normalised and cut into
  patches like images (`ErnieVLImageProcessor`), one frame after another: grid (t, h, w), and the language
  model sees t * h * w / (merge^2 * 2) tokens.
Frames are resized with PIL's bicubic filter; transformers resizes video frames with torchvision, so pixel
values can differ slightly from its video processor (never the grid or the token count).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .image_processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ErnieVLImageProcessor,
    ProcessedImages,
    check_pixels,
)

logger = logging.getLogger(__name__)

DEFAULT_FONT = "Roboto-Regular.ttf"
DEFAULT_VIDEO_FPS = 24.0  # transformers' fallback when a container does not tell its frame rate
MAX_DECODED_VIDEO_BYTES = 2 << 30  # one video's sampled frames, decoded (180 frames of 1080p: 1.1 GB)


@dataclass
class VideoFrames:
    """Sampled frames of one video (RGB) and what drawing timestamps needs."""

    frames: list[Image.Image]
    indices: list[int]  # frame numbers in the video
    video_fps: float

    @property
    def timestamps(self) -> list[float]:
        return [index / self.video_fps for index in self.indices]


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int = 16,
    max_frames: int = 180,
) -> np.ndarray:
    """Frame numbers to keep (see the module docstring)."""
    if total_frames <= 0:
        raise ValueError("the video has no frames")
    if fps is not None and num_frames is not None:
        raise ValueError("video num_frames and fps are mutually exclusive")
    if num_frames is not None:
        if not min_frames <= num_frames <= max_frames:
            raise ValueError(f"video num_frames must be in [{min_frames}, {max_frames}], got {num_frames}")
        wanted: float = num_frames
    else:
        wanted = total_frames / video_fps * fps if fps is not None else total_frames
        wanted = min(max(wanted, min_frames), max_frames, total_frames)
    if wanted > total_frames:
        raise ValueError(f"cannot sample {wanted} frames from a video of {total_frames}")
    step = total_frames / wanted
    count = math.ceil(total_frames / step)
    return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def timestamp_text(seconds: float) -> str:
    """`time: HH:MM:SS.ss`, as drawn on frames."""
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"time: {int(hours):02d}:{int(minutes):02d}:{seconds:05.02f}"


def draw_timestamp(frame: Image.Image, text: str, font_path: str) -> Image.Image:
    """A copy of `frame` with `text` in the top-left corner, black on a white outline."""
    frame = frame.copy()
    font_size = int(min(frame.size) * 0.1)
    font = ImageFont.truetype(font_path, font_size)
    outline = int(font_size * 0.1)
    ImageDraw.Draw(frame).text(
        (0, 0), text, font=font, fill=(0, 0, 0), stroke_width=outline, stroke_fill=(255, 255, 255)
    )
    return frame


def _open(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode video: {err}") from None


def decode_video(data: bytes, sampler: VideoProcessor) -> VideoFrames:
    """Decode the frames `sampler` picks from an encoded video (any container / codec FFmpeg reads)."""
    with _open(data) as container:
        if not container.streams.video:
            raise ValueError("the media has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # a damaged or exotic track: nothing to decode it with
            raise ValueError("cannot decode video: its codec is unknown")
        width, height = stream.width, stream.height
        check_pixels(width, height, "a video frame")
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else DEFAULT_VIDEO_FPS
        total = stream.frames
    if total <= 0:  # the container does not say: count by decoding
        total = sum(1 for _ in _decoded(data))
    wanted = set(sampler.frame_indices(total, video_fps).tolist())
    check_decoded_size(len(wanted), width, height)
    frames, indices = [], []
    for index, frame in enumerate(_decoded(data)):
        if index in wanted:
            frames.append(_frame_image(frame, frames[0].size if frames else None))
            indices.append(index)
    if not frames:
        raise ValueError("no frames could be decoded from the video")
    logger.debug("video: %d of %d frames at %.2f fps", len(frames), total, video_fps)
    return VideoFrames(frames, indices, video_fps)


def check_decoded_size(num_frames: int, width: int, height: int) -> None:
    """The sampled frames are held decoded (RGB) until they are resized: bound that, so that one request
    cannot take the server's memory (180 frames of 4K video are 4.5 GB)."""
    size = num_frames * width * height * 3
    if size > MAX_DECODED_VIDEO_BYTES:
        limit = MAX_DECODED_VIDEO_BYTES / 2**30
        raise ValueError(f"video of {num_frames} sampled frames at {width}x{height} needs {size / 2**30:.1f} "
                         f"GiB decoded, over {limit:.0f} GiB: send a smaller video or lower the row's "
                         "video_max_frames (mm_processor_kwargs)")


def _decoded(data: bytes) -> Iterator[av.VideoFrame]:
    """The video's frames in order; a ValueError when the stream turns out to be broken midway."""
    with _open(data) as container:
        try:
            yield from container.decode(video=0)
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot decode video: {err}") from None


def _frame_image(frame: av.VideoFrame, size: tuple[int, int] | None) -> Image.Image:
    """A sampled frame as RGB. Frames must keep the first one's size: a video's grid is one (h, w) for all
    its frames, so a resolution change midway would give patches that match no grid."""
    check_pixels(frame.width, frame.height, "a video frame")  # the stream's header may not tell
    if size is not None and (frame.width, frame.height) != size:
        raise ValueError(f"video frames change size midway ({size[0]}x{size[1]} to {frame.width}x"
                         f"{frame.height}): not supported")
    return frame.to_image().convert("RGB")


@dataclass
class VideoProcessor:
    """Sampling, timestamps and patches of ERNIE-4.5-VL videos. Defaults are transformers', except `fps`:
    FastDeploy's 2 frames per second (transformers takes every frame unless told)."""

    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 16
    max_frames: int = 180
    min_pixels: int = 299 * 28 * 28
    max_pixels: int = 1196 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    font: str | None = None  # path of the timestamp font; None: timestamps are not drawn

    def __post_init__(self) -> None:
        if self.temporal_patch_size != 2:
            raise ValueError(f"ERNIE-4.5-VL merges frames in pairs, not {self.temporal_patch_size}")
        self.frame_processor = ErnieVLImageProcessor(
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            image_mean=tuple(self.image_mean),
            image_std=tuple(self.image_std),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path, **overrides: Any) -> VideoProcessor:
        """The checkpoint's video processor settings (processor_config.json's `video_processor`, or
        video_preprocessor_config.json) and its timestamp font; `overrides` win."""
        model_dir = Path(model_dir)
        raw: dict[str, Any] = {}
        nested, single = model_dir / "processor_config.json", model_dir / "video_preprocessor_config.json"
        if nested.is_file():
            raw = dict(json.loads(nested.read_text()).get("video_processor") or {})
        if not raw and single.is_file():
            raw = json.loads(single.read_text())
        kwargs = _kwargs_from_dict(raw)
        kwargs.update(overrides)
        if "font" not in overrides:
            kwargs["font"] = _find_font(model_dir, raw)
        return cls(**kwargs)

    def frame_indices(self, total_frames: int, video_fps: float) -> np.ndarray:
        fps = None if self.num_frames is not None else self.fps
        return sample_frame_indices(
            total_frames, video_fps, fps, self.num_frames, self.min_frames, self.max_frames
        )

    def decode(self, data: bytes) -> VideoFrames:
        return decode_video(data, self)

    def num_video_tokens(self, grid_thw: tuple[int, int, int] | np.ndarray) -> int:
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (self.merge_size**2 * self.temporal_patch_size)

    def __call__(self, videos: list[VideoFrames]) -> ProcessedImages:
        patches, grids = [], []
        for video in videos:
            frames = self.prepare_frames(video)
            for frame in frames:
                frame_patches, grid_h, grid_w = self.frame_processor.frame_patches(frame)
                patches.append(frame_patches)
            grids.append((len(frames), grid_h, grid_w))
        return ProcessedImages(np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64))

    def prepare_frames(self, video: VideoFrames) -> list[Image.Image]:
        """Timestamped (when there is a font) and padded to an even count."""
        frames = list(video.frames)
        if self.font:
            frames = [
                draw_timestamp(frame, timestamp_text(ts), self.font)
                for frame, ts in zip(frames, video.timestamps, strict=True)
            ]
        if len(frames) % 2:
            frames.append(frames[-1])
        return frames


def _kwargs_from_dict(raw: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    size = raw.get("size") or {}
    for key, alias in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        value = raw.get(key, size.get(alias))
        if value is not None:
            kwargs[key] = int(value)
    for key in ("num_frames", "min_frames", "max_frames", "patch_size", "merge_size", "temporal_patch_size"):
        if raw.get(key) is not None:
            kwargs[key] = int(raw[key])
    if raw.get("fps") is not None:
        kwargs["fps"] = float(raw["fps"])
    for key in ("image_mean", "image_std"):
        if raw.get(key) is not None:
            kwargs[key] = tuple(float(v) for v in raw[key])
    return kwargs


def _find_font(model_dir: Path, raw: dict[str, Any]) -> str | None:
    if raw.get("draw_on_frames") is False:
        return None
    name = Path(str(raw.get("font") or DEFAULT_FONT)).name
    path = model_dir / name
    if path.is_file():
        return str(path)
    logger.warning(
        "checkpoint %s ships no timestamp font (%s): video frames are processed without drawn timestamps",
        model_dir,
        name,
    )
    return None
