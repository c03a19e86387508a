"""Media fetching policy: data: URLs, local files only under the media root, http(s) only to allowed hosts,
with size and time limits. Downloads are exercised against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ernie_engine.chat_template import ChatTemplate
from ernie_engine.multimodal import (
    ErnieVLImageProcessor,
    ErnieVLProcessor,
    ImageProcessor,
    MediaFetcher,
    MultimodalProcessor,
    VideoProcessor,
    load_image,
)
from ernie_engine.multimodal.processor import IMAGE_PLACEHOLDER
from PIL import Image

from tests.media_utils import CharTokens

PNG = io.BytesIO()
Image.new("RGB", (30, 20), (200, 10, 10)).save(PNG, format="PNG")
PNG_BYTES = PNG.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/image.png":
            self._send(PNG_BYTES)
        elif self.path == "/big":
            self._send(b"x" * 5000)
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(20):
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should
        elif self.path == "/slow-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")  # then one header line every 0.1 s, never the body
            try:
                for i in range(30):
                    self.wfile.write(b"X-Pad-%d: y\r\n" % i)
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/to-elsewhere":
            self.send_response(302)
            self.send_header("Location", "http://example.com/image.png")
            self.end_headers()
        elif self.path == "/to-image":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "image.png").write_bytes(PNG_BYTES)
    (tmp_path / "secret.png").write_bytes(PNG_BYTES)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    return root


def test_data_urls() -> None:
    fetcher = MediaFetcher()
    assert fetcher.fetch("data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()) == PNG_BYTES
    assert fetcher.fetch("data:text/plain,hello%20there") == b"hello there"
    with pytest.raises(ValueError, match="not valid base64"):
        fetcher.fetch("data:image/png;base64,@@@")
    with pytest.raises(ValueError, match="over the media size limit of 100 bytes"):
        MediaFetcher(max_bytes=100).fetch("data:image/png;base64," + base64.b64encode(PNG_BYTES * 2).decode())


def test_local_files_only_under_the_media_root(media_root: Path) -> None:
    fetcher = MediaFetcher(media_root=str(media_root))
    assert fetcher.fetch("sub/image.png") == PNG_BYTES
    assert fetcher.fetch(str(media_root / "sub" / "image.png")) == PNG_BYTES
    assert fetcher.fetch(f"file://{media_root}/sub/image.png") == PNG_BYTES
    for escape in (
        "../secret.png",
        "sub/../../secret.png",
        str(media_root.parent / "secret.png"),
        "/etc/passwd",
    ):
        with pytest.raises(ValueError, match="is outside the media root"):
            fetcher.fetch(escape)
    with pytest.raises(ValueError, match="outside the media root"):
        fetcher.fetch("link.png")  # a symlink out of the root is followed, then refused
    with pytest.raises(ValueError, match="does not exist under the media root"):
        fetcher.fetch("sub/missing.png")
    with pytest.raises(ValueError, match="over the media size limit"):
        MediaFetcher(media_root=str(media_root), max_bytes=10).fetch("sub/image.png")
    with pytest.raises(ValueError, match="local media files are not allowed"):
        MediaFetcher().fetch(str(media_root / "sub" / "image.png"))


def test_downloads_only_to_allowed_hosts(server: str) -> None:
    with pytest.raises(ValueError, match="downloads are disabled"):
        MediaFetcher().fetch(f"{server}/image.png")
    with pytest.raises(ValueError, match="media host '127.0.0.1' is not allowed"):
        MediaFetcher(allowed_hosts=("images.example.com",)).fetch(f"{server}/image.png")
    fetcher = MediaFetcher.from_settings(allowed_hosts="images.example.com, 127.0.0.1")
    assert fetcher.fetch(f"{server}/image.png") == PNG_BYTES
    assert fetcher.fetch(f"{server}/to-image") == PNG_BYTES  # a redirect within the allow-list
    with pytest.raises(ValueError, match="media host 'example.com' is not allowed"):
        fetcher.fetch(f"{server}/to-elsewhere")
    with pytest.raises(ValueError, match="HTTP 404"):
        fetcher.fetch(f"{server}/missing")
    with pytest.raises(ValueError, match="unsupported media URL scheme 'ftp'"):
        fetcher.fetch("ftp://127.0.0.1/image.png")


def test_download_size_and_time_limits(server: str) -> None:
    with pytest.raises(ValueError, match="5000 bytes, over the media size limit of 1000 bytes"):
        MediaFetcher(allowed_hosts=("127.0.0.1",), max_bytes=1000).fetch(f"{server}/big")
    with pytest.raises(ValueError, match="over the media size limit of 50 bytes"):
        MediaFetcher(allowed_hosts=("127.0.0.1",), max_bytes=50).fetch(f"{server}/slow")  # no Content-Length
    started = time.monotonic()
    with pytest.raises(ValueError, match="took longer than 0.5 s"):
        MediaFetcher(allowed_hosts=("127.0.0.1",), timeout_s=0.5).fetch(f"{server}/slow")
    assert time.monotonic() - started < 1.5


def test_download_time_limit_covers_the_headers(server: str) -> None:
    """A host trickling header lines, each within the read timeout, held the fetch (and a request thread)
    for as long as it kept trickling: the time limit is for the whole download."""
    started = time.monotonic()
    with pytest.raises(ValueError, match="took longer than 0.5 s"):
        MediaFetcher(allowed_hosts=("127.0.0.1",), timeout_s=0.5).fetch(f"{server}/slow-headers")
    assert time.monotonic() - started < 1.5


class Tokens:
    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) % 250 for c in text]


def test_processor_fetches_under_the_policy(media_root: Path) -> None:
    token_ids = dict.fromkeys(
        ("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id"), 1
    )
    token_ids |= {"image_token_id": 300, "video_token_id": 303}
    fetcher = MediaFetcher(media_root=str(media_root))
    processor = ErnieVLProcessor(
        Tokens(), token_ids, ErnieVLImageProcessor(), VideoProcessor(font=None), fetcher=fetcher
    )

    def message(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    prompt = processor(message("sub/image.png"))
    assert prompt.images.grid_thw.tolist() == [[1, 4, 6]]  # 30x20 px scaled up to the 56*56 px minimum
    with pytest.raises(ValueError, match="outside the media root"):
        processor(message("../secret.png"))
    with pytest.raises(ValueError, match="media downloads are disabled"):
        processor(message("https://example.com/a.png"))


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(part: dict) -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": "OCR:"}]}]


def test_oversized_and_unreadable_images_are_clear_value_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decompression bombs (tiny PNGs of huge canvases) are refused from the header, before decoding: over
    Pillow's threshold as ours, over twice it as Pillow's own error, never an internal error."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="image is 40x40 pixels, over the limit of 1000 pixels"):
        load_image({"type": "image_url", "image_url": {"url": png_url(Image.new("1", (40, 40)))}})
    with pytest.raises(ValueError, match="cannot decode image: Image size \\(10000 pixels\\) exceeds limit"):
        load_image({"type": "image_url", "image_url": {"url": png_url(Image.new("1", (100, 100)))}})
    with pytest.raises(ValueError, match="not a format Pillow reads") as refused:
        load_image({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}})
    assert "BytesIO" not in str(refused.value)


def test_broken_image_data_is_a_value_error() -> None:
    """A PNG whose second data chunk is damaged opens, then fails to decode with Pillow's SyntaxError ("broken
    PNG file"): it was a 500 "internal error", not a 400 naming the problem."""
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    png = bytearray(base64.b64decode(png_url(Image.fromarray(noise)).split(",")[1]))
    second_idat = png.index(b"IDAT", png.index(b"IDAT") + 4)
    png[second_idat : second_idat + 4] = b"\xedh\xea1"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    with pytest.raises(ValueError, match="cannot decode image: broken PNG file"):
        load_image({"type": "image_url", "image_url": {"url": url}})


def test_both_processors_take_image_parts_holding_urls() -> None:
    """`{"type": "image", "image": <url>}` as ERNIE-4.5-VL takes it: PaddleOCR-VL's processor too."""
    url = png_url(Image.new("RGB", (56, 56), (10, 200, 30)))
    processor = MultimodalProcessor(CharTokens({IMAGE_PLACEHOLDER: 300}), ImageProcessor(min_pixels=56 * 56))
    by_part = processor(image_message({"type": "image", "image": url}))
    by_url = processor(image_message({"type": "image_url", "image_url": {"url": url}}))
    np.testing.assert_array_equal(by_part.images.pixel_values, by_url.images.pixel_values)


def test_media_markers_in_message_text_are_refused() -> None:
    """A marker typed as text was taken for media: the image of an assistant message (which the template
    leaves out) then moved into the user's text. Such text is refused, and a left-out image says so."""
    url = png_url(Image.new("RGB", (56, 56)))
    ocr = MultimodalProcessor(CharTokens({IMAGE_PLACEHOLDER: 300}), ImageProcessor(min_pixels=56 * 56))
    with pytest.raises(ValueError, match="message text holds the media marker '<\\|IMAGE_PLACEHOLDER\\|>'"):
        ocr([{"role": "user", "content": f"read {IMAGE_PLACEHOLDER} this"}])
    assistant_image = {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(ValueError, match="0 image placeholders for 1 images \\(the chat template leaves out"):
        ocr([assistant_image, *image_message({"type": "text", "text": "hi"})])
    ids = dict.fromkeys(("image_start_token_id", "image_end_token_id", "video_start_token_id",
                         "video_end_token_id"), 1) | {"image_token_id": 300, "video_token_id": 303}
    ernie = ErnieVLProcessor(Tokens(), ids, ErnieVLImageProcessor(), VideoProcessor(font=None))
    with pytest.raises(ValueError, match="message text holds the media marker '<\\|image@placeholder\\|>'"):
        ernie([assistant_image, *image_message({"type": "text", "text": "x <|image@placeholder|> y"})])


# A checkpoint template rendering tool calls as tool-calling templates do: the arguments object as JSON.
TOOL_CALL_TEMPLATE = (
    "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% elif m.content %}"
    "{% for p in m.content %}{{ p.text if p.type == 'text' else '<|IMAGE_START|><|image@placeholder|>"
    "<|IMAGE_END|>' }}{% endfor %}{% endif %}{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endfor %}"
)


def test_messages_reach_the_checkpoint_template_as_for_text_models() -> None:
    """ERNIE-4.5-VL with its own template got messages unchecked (a message that is no object was a 500) and
    tool-call arguments as the JSON string the client sent, which a template's `tojson` quoted once more;
    text prompts (and vLLM) hand templates the arguments object."""
    ids = dict.fromkeys(("image_start_token_id", "image_end_token_id", "video_start_token_id",
                         "video_end_token_id"), 1) | {"image_token_id": 300, "video_token_id": 303}
    ernie = ErnieVLProcessor(Tokens(), ids, ErnieVLImageProcessor(), VideoProcessor(font=None),
                             template=ChatTemplate(TOOL_CALL_TEMPLATE))
    call = {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": '{"x": 1}'}}
    image = {"type": "image_url", "image_url": {"url": png_url(Image.new("RGB", (56, 56)))}}
    messages = [*image_message(image), {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert '<tool_call>{"x": 1}</tool_call>' in ernie(messages).prompt
    ocr = MultimodalProcessor(CharTokens({IMAGE_PLACEHOLDER: 300}), ImageProcessor(min_pixels=56 * 56))
    for processor in (ernie, ocr):
        with pytest.raises(ValueError, match="messages\\[1\\] must be an object with a string 'role'"):
            processor([messages[0], "hi"])


# Run in a fresh process, whose peak RSS only the images move; the PNG's data URL on stdin. (VmHWM: ru_maxrss
# starts from the parent's RSS at fork.)
PEAK_MEMORY_SCRIPT = """
import re, sys
from ernie_engine.multimodal import (ErnieVLImageProcessor, ErnieVLProcessor, ImageProcessor,
                                     MultimodalProcessor, VideoProcessor)
from ernie_engine.multimodal.processor import IMAGE_PLACEHOLDER
from tests.media_utils import CharTokens

part = {"type": "image_url", "image_url": {"url": sys.stdin.read()}}
ids = dict.fromkeys(("image_start_token_id", "image_end_token_id", "video_start_token_id",
                     "video_end_token_id"), 1)
small = {"min_pixels": 56 * 56, "max_pixels": 56 * 56 * 4}
ernie = ErnieVLProcessor(CharTokens({}), ids | {"image_token_id": 300, "video_token_id": 303},
                         ErnieVLImageProcessor(**small), VideoProcessor(font=None))
ocr = MultimodalProcessor(CharTokens({IMAGE_PLACEHOLDER: 300}), ImageProcessor(**small))

def high_water_kb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1])

def peak_mb(processor, count):
    processor([{"role": "user", "content": [part] * count + [{"type": "text", "text": "?"}]}])
    return (high_water_kb() - base) / 1024

base = high_water_kb()
print(peak_mb(ernie, 1), peak_mb(ernie, 6), peak_mb(ocr, 6))
"""


def test_a_requests_images_are_decoded_one_at_a_time() -> None:
    """Every image of a request was decoded before any was resized: ten 40-megapixel PNGs of 100 KB each held
    1.2 GB (more with no image limit). Each full-size original now lives only until its own resize."""
    url = png_url(Image.new("RGB", (4000, 3000), (10, 200, 30)))  # 36 MB decoded, 50 KB sent
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root / 'backend'}:{root}"}
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT], input=url, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    one, six_ernie, six_ocr = (float(v) for v in out.stdout.split())
    assert one > 30  # the measure sees one decoded image
    assert six_ernie < 2 * one and six_ocr < 2 * one, (one, six_ernie, six_ocr)
