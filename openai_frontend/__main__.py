"""`python -m openai_frontend --triton-url http://127.0.0.1:8000 --port 8188`"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from openai_frontend.app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, FrontendConfig, create_app

SHUTDOWN_GRACE_S = 5.0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def _positive_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:  # also refuses nan
        raise argparse.ArgumentTypeError("must be > 0")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m openai_frontend", description=__doc__)
    parser.add_argument("--triton-url", default="http://127.0.0.1:8000", help="tritonserver's HTTP endpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1/*")
    parser.add_argument("--max-concurrency", type=_positive, default=None,
                        help="generation requests in flight before answering 429 (default: unlimited)")
    parser.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413")
    parser.add_argument("--body-timeout", type=_positive_seconds, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds to receive a request body before answering 408")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Triton call is noise
    config = FrontendConfig(triton_url=args.triton_url, api_key=args.api_key,
                            max_concurrency=args.max_concurrency, max_body_bytes=args.max_body_bytes,
                            body_timeout_s=args.body_timeout)
    # On shutdown, streams still open after a grace period are cancelled (and so are their Triton requests).
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


if __name__ == "__main__":
    main()
