"""Fetching image / video bytes named by a request, under the server's media policy.

Sources, in the order they are recognised:
- `data:` URLs (base64 or percent-free plain data): always allowed, within the size limit;
- local files (`file://` URLs or plain paths): only when a media root is configured, and only files that
  resolve (symlinks followed) inside it, so `..` and links cannot escape;
- `http(s)://` URLs: only when an allow-list of hosts is configured, only to those hosts (redirects are
  followed by hand and each hop is checked), with a byte limit and a time limit for the whole download.

Everything refused or broken raises ValueError with a message fit for the client (the frontend answers 400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import re
import urllib.parse
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 20.0
MAX_REDIRECTS = 3
_DATA_URL = re.compile(r"^data:[\w/+.-]*(?:;[\w=.+-]+)*?(?P<b64>;base64)?,(?P<data>.*)$", re.S)


@dataclass(frozen=True)
class MediaFetcher:
    media_root: str = ""  # local files only under this folder; "" disables local files
    allowed_hosts: tuple[str, ...] = ()  # http(s) downloads only to these hosts; () disables downloads
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_settings(cls, media_root: str = "", allowed_hosts: str = "", **limits: float) -> MediaFetcher:
        """From EngineConfig's `media_root` and comma-separated `allowed_media_hosts`."""
        hosts = tuple(h.strip().lower() for h in allowed_hosts.split(",") if h.strip())
        return cls(media_root, hosts, **limits)

    def fetch(self, url: str) -> bytes:
        """The bytes behind `url` (a data: URL, a local path or file:// URL, or an http(s) URL)."""
        if not isinstance(url, str) or not url:
            raise ValueError("a media URL must be a non-empty string")
        if url.startswith("data:"):
            return self._data_url(url)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._download(url)
        if scheme == "file":
            return self._local(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        if scheme:
            raise ValueError(f"unsupported media URL scheme {scheme!r} (use data:, http(s)://, a local path)")
        return self._local(url)

    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_bytes:
            raise ValueError(f"{what} is {size} bytes, over the media size limit of {self.max_bytes} bytes")

    def _data_url(self, url: str) -> bytes:
        match = _DATA_URL.match(url)
        if not match:
            raise ValueError(f"malformed data: URL {url[:40]!r}")
        payload = match["data"]
        # Base64 is 4/3 of the bytes it encodes: refuse oversized payloads before decoding them.
        self._check_size(len(payload) * 3 // 4 if match["b64"] else len(payload), "data: URL content")
        if not match["b64"]:
            return urllib.parse.unquote_to_bytes(payload)
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            raise ValueError(f"data: URL is not valid base64: {err}") from None

    def _local(self, given: str) -> bytes:
        if not self.media_root:
            raise ValueError(f"local media files are not allowed (no media_root configured): {given!r}")
        root = Path(self.media_root).resolve()
        path = Path(given)
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"local media path {given!r} is outside the media root")
        if not path.is_file():
            raise ValueError(f"local media file {given!r} does not exist under the media root")
        self._check_size(path.stat().st_size, f"local media file {given!r}")
        return path.read_bytes()

    def _check_host(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(f"media URL {url!r}: only http(s) downloads are allowed")
        host = (parts.hostname or "").lower()
        if not self.allowed_hosts:
            raise ValueError(f"media downloads are disabled (no allowed_media_hosts configured): {url!r}")
        if host not in self.allowed_hosts:
            raise ValueError(f"media host {host!r} is not allowed (allowed: {', '.join(self.allowed_hosts)})")

    def _download(self, url: str) -> bytes:
        self._check_host(url)
        try:
            # One deadline for connecting, headers and body: read timeouts alone let a host that trickles
            # bytes hold the fetch (and the request's thread) indefinitely. Cancelling a coroutine is what
            # interrupts a blocked read.
            return _run(asyncio.wait_for(self._get(url), self.timeout_s))
        except (TimeoutError, httpx.TimeoutException):
            raise ValueError(f"fetching media {url!r} took longer than {self.timeout_s:g} s") from None
        except httpx.HTTPError as err:
            raise ValueError(f"fetching media {url!r} failed: {err}") from None

    async def _get(self, url: str) -> bytes:
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                async with client.stream("GET", url) as response:
                    if not response.is_redirect:
                        return await self._read_body(url, response)
                    url = str(response.url.join(response.headers.get("location", "")))
                self._check_host(url)  # a redirect must not leave the allow-list
        raise ValueError(f"fetching media {url!r}: more than {MAX_REDIRECTS} redirects")

    async def _read_body(self, url: str, response: httpx.Response) -> bytes:
        if response.status_code >= 400:
            raise ValueError(f"fetching media {url!r} failed: HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit():
            self._check_size(int(declared), f"media at {url!r}")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            self._check_size(size, f"media at {url!r}")
            chunks.append(chunk)
        logger.debug("fetched %d bytes of media from %s", size, url)
        return b"".join(chunks)


def _run(coro: Coroutine[Any, Any, bytes]) -> bytes:
    """Run `coro` to completion from synchronous code: on this thread, or on a helper thread when this one
    already runs an event loop (e.g. the offline LLM in a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
