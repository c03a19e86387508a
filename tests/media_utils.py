"""Light helpers for multimodal tests (Pillow, PyAV, numpy only): drawn images, data: URLs, a small mp4 and a
character-level stand-in tokenizer."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
from PIL import Image, ImageDraw


def draw(text: str, size: tuple[int, int] = (160, 40)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((4, 12), text, fill=(20, 20, 20))
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_mp4(num_frames: int = 5, size: tuple[int, int] = (84, 56), fps: int = 4) -> bytes:
    """A short mp4 whose frames differ (a moving bar over a colour ramp)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            frame = np.zeros((size[1], size[0], 3), np.uint8)
            frame[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
            frame[:, 10 * i : 10 * i + 12, 1] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


class CharTokens:
    """Stands in for the tokenizer: each character is one id below 256, the `specials` are single ids."""

    def __init__(self, specials: dict[str, int]) -> None:
        self.specials = specials

    def token_to_id(self, token: str) -> int:
        return self.specials[token]

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            ids.append(self.specials[special] if special else 3 + ord(text[i]) % 250)
            i += len(special) if special else 1
        return ids
