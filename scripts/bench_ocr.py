"""OCR requests per second through the engine on a PaddleOCR-VL-0.9B-shaped random checkpoint.

The checkpoint (real 0.9B config shapes, shipped layout) is built once into a cache folder by
scripts/make_random_ocr_model.py. The engine runs the OCR row's settings (max_num_seqs 256,
max_num_batched_tokens 16384, enable_max_prefill). Each request is the seed's OCR shape: one Pillow-drawn
text-line crop as a data: URL plus "OCR:", greedy, a fixed number of output tokens (eos ignored: the weights
are random). Closed loop: `concurrency` requests stay in flight until `--rounds * concurrency` have finished.

Image size drives the cost on CPU: the checkpoint's preprocessor upscales every crop to >= 147384 pixels
(~750 patches through the 27-layer vision tower); `--min-pixels` (FastDeploy's `image_min_pixels`) keeps
small crops small. Printed per concurrency: requests/s, output tokens/s, latency p50/p99.

    python scripts/bench_ocr.py                        # concurrency 1 and 32
    python scripts/bench_ocr.py --min-pixels 147384    # the checkpoint's own pixel floor
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # MKL's fast path on AMD CPUs (see NOTES.md)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend"))

import numpy as np  # noqa: E402
from ernie_engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

DEFAULT_CACHE = ROOT / "checkpoints" / "random-paddleocr-vl-0.9b"
WORDS = ["invoice", "total", "北京", "2025-06-01", "qty", "¥128.50", "PaddleOCR", "line", "收据", "No."]


def ensure_checkpoint(path: Path) -> Path:
    if not (path / "model.safetensors").is_file():
        print(f"building the 0.9b random PaddleOCR-VL checkpoint in {path} ...", flush=True)
        script = ROOT / "scripts" / "make_random_ocr_model.py"
        subprocess.run([sys.executable, str(script), "--out", str(path), "--preset", "0.9b"], check=True)
    return path


def crop(index: int, size: tuple[int, int]) -> str:
    """A text-line crop (distinct text per request, so no two share image blocks) as a data: URL."""
    rng = np.random.default_rng(index)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    text = " ".join(rng.choice(WORDS, 4)) + f" #{index}"
    ImageDraw.Draw(image).text((4, size[1] // 2 - 6), text, fill=(10, 10, 10))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ocr_messages(index: int, size: tuple[int, int]) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": crop(index, size)}},
                {"type": "text", "text": "OCR:"},
            ],
        }
    ]


def run(
    engine: LLMEngine,
    concurrency: int,
    total: int,
    params: SamplingParams,
    size: tuple[int, int],
    first_index: int,
) -> dict[str, float]:
    """Closed loop: keep `concurrency` requests in flight until `total` have finished."""
    indices = iter(range(first_index, first_index + total))
    arrival: dict[str, float] = {}
    latencies, tokens = [], 0

    def submit() -> None:
        index = next(indices, None)
        if index is not None:
            request_id = f"ocr-{index}"
            arrival[request_id] = time.perf_counter()
            engine.add_request(request_id, messages=ocr_messages(index, size), sampling_params=params)

    start = time.perf_counter()
    for _ in range(concurrency):
        submit()
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.outputs[0].token_ids)
            if out.finished:
                latencies.append(time.perf_counter() - arrival[out.request_id])
                submit()
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": total,
        "elapsed": elapsed,
        "req_s": total / elapsed,
        "tok_s": tokens / elapsed,
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests per concurrency = rounds * concurrency"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--min-pixels", type=int, default=28 * 28 * 4, help="image_min_pixels")
    parser.add_argument("--kv-cache-mib", type=int, default=576, help="576: max_model_len 16384 in fp32")
    args = parser.parse_args(argv)
    if min(*args.concurrency, args.rounds, args.max_tokens, args.width, args.height, args.kv_cache_mib) < 1:
        parser.error("--concurrency, --rounds, --max-tokens, --width, --height, --kv-cache-mib: each >= 1")
    logging.basicConfig(level=logging.WARNING)
    checkpoint = ensure_checkpoint(args.checkpoint)
    started = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=str(checkpoint),
            max_model_len=16384,
            max_num_seqs=256,
            max_num_batched_tokens=16384,
            enable_max_prefill=True,
            kv_cache_memory_bytes=args.kv_cache_mib << 20,
            mm_processor_kwargs={"image_min_pixels": args.min_pixels},
        )
    )
    size = (args.width, args.height)
    probe = engine.make_request("probe", messages=ocr_messages(0, size))
    grid = probe.mm.prompt.images.grid_thw[0].tolist()
    print(
        f"engine ready in {time.perf_counter() - started:.1f} s; a {size[0]}x{size[1]} crop -> grid {grid} "
        f"({probe.mm.num_placeholders} image tokens), prompt {len(probe.prompt_token_ids)} tokens, "
        f"{args.max_tokens} output tokens",
        flush=True,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    run(engine, 1, 1, params, size, first_index=10**6)  # warm-up: first-call costs of every op
    first_index = 0
    for concurrency in args.concurrency:
        result = run(engine, concurrency, args.rounds * concurrency, params, size, first_index)
        first_index += result["requests"]
        print(
            f"concurrency {concurrency:3d}: {result['requests']:3d} requests in {result['elapsed']:6.1f} s = "
            f"{result['req_s']:6.2f} req/s, {result['tok_s']:7.1f} output tok/s, latency p50 "
            f"{result['p50']:.2f} s p99 {result['p99']:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
