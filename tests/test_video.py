"""ERNIE-4.5-VL videos against transformers' documented rules (its video processor itself needs torchvision).

The rules (transformers' `Ernie4_5_VLMoeVideoProcessor`): frames sampled as
`torch.arange(0, total, total / n)` with n = total / video_fps * fps clamped to [min_frames, max_frames] and
the frame count; a timestamp "time: HH:MM:SS.ss" drawn top-left (font size int(0.1 * min side), white outline
int(0.1 * font size)) with the checkpoint's font; odd frame counts padded with the last frame;
t * h * w / 8 tokens per video.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from ernie_engine.multimodal import (
    ErnieVLImageProcessor,
    ErnieVLProcessor,
    VideoProcessor,
    sample_frame_indices,
    video,
)
from ernie_engine.multimodal.processor import split_mm_processor_kwargs
from ernie_engine.multimodal.video import draw_timestamp, timestamp_text
from PIL import Image, ImageDraw, ImageFont

from tests.media_utils import CharTokens, write_mp4

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
VIDEO, VIDEO_START, VIDEO_END = 303, 304, 305
TOKEN_IDS = {
    "image_token_id": 300,
    "image_start_token_id": 301,
    "image_end_token_id": 302,
    "video_token_id": VIDEO,
    "video_start_token_id": VIDEO_START,
    "video_end_token_id": VIDEO_END,
}


def reference_indices(total: int, video_fps: float, fps=None, num_frames=None, min_frames=16, max_frames=180):
    """transformers' `sample_frames`, written out with torch as it does."""
    if num_frames is None:
        num_frames = total / video_fps * fps if fps is not None else total
        num_frames = min(max(num_frames, min_frames), max_frames, total)
    return torch.arange(0, total, total / num_frames).int().tolist()


def write_video(num_frames: int, fps: int = 10, size: tuple[int, int] = (96, 64),
                container_format: str = "mp4", codec: str = "mpeg4") -> bytes:
    """Frame i is a flat grey of level 6 * i, so decoded frames can be told apart."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            frame = np.full((size[1], size[0], 3), 6 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("total", "video_fps", "fps", "num_frames", "min_frames", "max_frames"),
    [
        (40, 10.0, 2.0, None, 4, 6),  # fps asks for 8, capped at max_frames
        (40, 10.0, 2.0, None, 16, 180),  # fps asks for 8, raised to min_frames
        (300, 30.0, 2.0, None, 16, 180),  # 20 by fps
        (1000, 29.97, 2.0, None, 16, 30),  # a real frame rate, capped (the seed rows' video_max_frames)
        (10, 24.0, 2.0, None, 16, 180),  # fewer frames than min_frames: all of them
        (7, 24.0, None, None, 2, 180),  # no fps: every frame
        (100, 25.0, None, 16, 16, 180),  # a fixed count
        (37, 12.5, 3.0, None, 5, 9),
    ],
)
def test_frame_sampling_follows_transformers(
    total, video_fps, fps, num_frames, min_frames, max_frames
) -> None:
    expected = reference_indices(total, video_fps, fps, num_frames, min_frames, max_frames)
    ours = sample_frame_indices(total, video_fps, fps, num_frames, min_frames, max_frames)
    assert ours.tolist() == expected


def test_frame_sampling_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        sample_frame_indices(10, 10.0, fps=2.0, num_frames=4, min_frames=1)
    with pytest.raises(ValueError, match="num_frames must be in"):
        sample_frame_indices(100, 10.0, num_frames=4)  # below min_frames 16


def test_timestamp_text() -> None:
    assert timestamp_text(0.0) == "time: 00:00:00.00"
    assert timestamp_text(3725.5) == "time: 01:02:05.50"
    assert timestamp_text(59.996) == "time: 00:00:60.00"  # as transformers' f"{s:05.02f}" rounds


def test_decoding_samples_the_right_frames() -> None:
    video = VideoProcessor(fps=2.0, min_frames=4, max_frames=6).decode(write_video(40))
    assert video.indices == [0, 6, 13, 20, 26, 33]  # 40 frames at 10 fps -> 8 wanted -> 6 (max), evenly
    assert video.video_fps == pytest.approx(10.0)
    assert video.timestamps == pytest.approx([0.0, 0.6, 1.3, 2.0, 2.6, 3.3])
    levels = [float(np.asarray(frame).mean()) for frame in video.frames]
    assert levels == pytest.approx([6 * i for i in video.indices], abs=3)  # lossy codec, right frames


def test_timestamps_are_drawn_with_the_checkpoints_font(tmp_path: Path) -> None:
    shutil.copy(FONT, tmp_path / FONT.name)
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"font": FONT.name, "draw_on_frames": True})
    )
    processor = VideoProcessor.from_dir(
        tmp_path, fps=None, min_frames=1, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8
    )
    assert processor.font == str(tmp_path / FONT.name)
    video = processor.decode(write_video(3, fps=2, size=(200, 120)))

    # The documented drawing, done here independently of the processor.
    expected_frames = []
    for frame, seconds in zip(video.frames, [0.0, 0.5, 1.0], strict=True):
        frame = frame.copy()
        size = int(min(frame.size) * 0.1)
        ImageDraw.Draw(frame).text(
            (0, 0),
            f"time: 00:00:{seconds:05.02f}",
            font=ImageFont.truetype(str(FONT), size),
            fill=(0, 0, 0),
            stroke_width=int(size * 0.1),
            stroke_fill=(255, 255, 255),
        )
        expected_frames.append(frame)
    drawn = processor.prepare_frames(video)
    assert len(drawn) == 4  # 3 frames padded with a copy of the last
    for ours, expected in zip(drawn, expected_frames + expected_frames[-1:], strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    assert not np.array_equal(np.asarray(drawn[0]), np.asarray(video.frames[0]))  # something was drawn

    frames_processor = ErnieVLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8)
    patches = processor([video])
    expected_patches = np.concatenate([frames_processor.frame_patches(f)[0] for f in drawn])
    np.testing.assert_array_equal(patches.pixel_values, expected_patches)


def test_without_a_font_drawing_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        processor = VideoProcessor.from_dir(tmp_path, fps=None, min_frames=1)
    assert processor.font is None
    assert "ships no timestamp font" in caplog.text
    frame = Image.new("RGB", (200, 120), (90, 120, 30))
    drawn = draw_timestamp(frame, "time: 00:00:00.00", str(FONT))
    assert not np.array_equal(np.asarray(drawn), np.asarray(frame))  # the helper draws when given a font
    video = processor.decode(write_video(2, size=(200, 120)))
    np.testing.assert_array_equal(np.asarray(processor.prepare_frames(video)[0]), np.asarray(video.frames[0]))


TOKENS = CharTokens({"<|VIDEO_START|>": VIDEO_START, "<|VIDEO_END|>": VIDEO_END})


def video_prompt(mm_processor_kwargs: dict, num_frames: int, limits: dict | None = None, count: int = 1):
    """A user message with `count` copies of an mp4 (data: URLs), processed with FastDeploy-style kwargs."""
    url = "data:video/mp4;base64," + base64.b64encode(write_video(num_frames, size=(112, 84))).decode()
    kwargs = {"video_min_pixels": 28 * 28 * 4, "video_max_pixels": 28 * 28 * 12, **mm_processor_kwargs}
    _, video_kwargs = split_mm_processor_kwargs(kwargs)
    video_processor = VideoProcessor(**{"font": None, **video_kwargs})
    processor = ErnieVLProcessor(TOKENS, TOKEN_IDS, ErnieVLImageProcessor(), video_processor, limits=limits)
    parts = [{"type": "video_url", "video_url": {"url": url}}] * count + [{"type": "text", "text": "What?"}]
    return processor([{"role": "user", "content": parts}])


def test_video_token_count_and_max_frames() -> None:
    prompt = video_prompt({"video_max_frames": 4, "video_min_frames": 2}, num_frames=30)
    t, h, w = prompt.images.grid_thw[0].tolist()
    assert (t, h, w) == (4, 6, 8)  # 30 frames at 10 fps, 2 fps asks for 6, capped at 4; 84x112 px -> 6x8
    ids = prompt.prompt_token_ids
    start, end = ids.index(VIDEO_START), ids.index(VIDEO_END)
    assert ids[start + 1 : end] == [VIDEO] * (t * h * w // 8)
    assert "<|VIDEO_START|><|video@placeholder|><|VIDEO_END|>" in prompt.prompt


def test_odd_frame_counts_are_padded() -> None:
    prompt = video_prompt({"video_min_frames": 1, "video_fps": 10}, num_frames=5)
    t, h, w = prompt.images.grid_thw[0].tolist()
    assert t == 6  # 5 frames + a copy of the last
    frame = h * w
    np.testing.assert_array_equal(
        prompt.images.pixel_values[-frame:], prompt.images.pixel_values[-2 * frame : -frame]
    )
    assert prompt.prompt_token_ids.count(VIDEO) == 6 * frame // 8


def test_video_limits_and_unknown_kwargs() -> None:
    with pytest.raises(ValueError, match="at most 1 video per prompt, got 2"):
        video_prompt({}, num_frames=4, limits={"video": 1}, count=2)
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs"):
        video_prompt({"video_maxframes": 3}, num_frames=4)


def write_ts(size: tuple[int, int], num_frames: int) -> bytes:
    """An MPEG-TS clip; TS clips concatenate into one stream, so joining two of different sizes makes a
    video whose resolution changes midway."""
    return write_video(num_frames, fps=4, size=size, container_format="mpegts", codec="mpeg2video")


def test_videos_changing_size_or_too_large_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolution change would give patches that match no (t, h, w) grid, which used to fail the engine
    step of every request batched with it; frames over the pixel limit are refused before decoding."""
    processor = VideoProcessor(fps=None, min_frames=1, font=None)
    with pytest.raises(ValueError, match="video frames change size midway \\(64x48 to 48x96\\)"):
        processor.decode(write_ts((64, 48), 2) + write_ts((48, 96), 2))
    monkeypatch.setattr(video, "MAX_DECODED_VIDEO_BYTES", 4 * 64 * 48 * 3 - 1)  # 4 sampled frames: 1 too many
    with pytest.raises(ValueError, match="video of 4 sampled frames at 64x48 needs"):
        processor.decode(write_ts((64, 48), 4))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="a video frame is 64x48 pixels, over the limit of 1000 pixels"):
        processor.decode(write_ts((64, 48), 4))


def test_a_video_stream_of_an_unknown_codec_is_a_value_error() -> None:
    """A damaged mp4 whose video track names no codec FFmpeg knows: reading its size raised AttributeError
    (a 500 "internal error"), not a 400 naming the problem."""
    mp4 = bytearray(write_mp4(num_frames=4))
    vmhd = mp4.index(b"vmhd")
    mp4[vmhd - 4] = 207  # the video header box now spans the rest of the track: its codec goes unread
    with av.open(io.BytesIO(mp4)) as container:
        assert container.streams.video[0].codec_context is None
    with pytest.raises(ValueError, match="cannot decode video: its codec is unknown"):
        VideoProcessor(font=None).decode(bytes(mp4))
