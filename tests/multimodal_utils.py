"""Helpers shared by the multimodal serving tests (PaddleOCR-VL, ERNIE-4.5-VL): images drawn with Pillow,
the direct-model greedy reference, an engine runner that records the schedule, and a committed row served
by tritonserver on a random checkpoint."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from ernie_engine.layers.attention import AttentionMetadata
from ernie_engine.llm_engine import LLMEngine
from ernie_engine.loader import load_model
from ernie_engine.multimodal import MultimodalPrompt
from ernie_engine.sampling_params import SamplingParams
from ernie_engine.tokenizer import Tokenizer
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.fixtures.triton import TritonServer, running_server, write_row

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(script: str, out: Path) -> Path:
    """A random checkpoint written by scripts/`script` (the same arguments give byte-identical files)."""
    command = [sys.executable, str(ROOT / "scripts" / script), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return out


def placeholder_span(mm: MultimodalPrompt) -> tuple[int, int]:
    """[start, end) of the prompt's image placeholders (one image)."""
    where = np.flatnonzero(np.asarray(mm.prompt_token_ids) == mm.image_token_id)
    return int(where[0]), int(where[-1]) + 1


class GreedyReference:
    """Greedy decoding by calling the model directly: whole sequence every step, no cache."""

    def __init__(self, model_dir: Path, make_processor: Callable[[Path, Tokenizer], Any]) -> None:
        self.model, _ = load_model(model_dir, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.processor = make_processor(model_dir, self.tokenizer)

    @paddle.no_grad()
    def greedy(
        self, mm: MultimodalPrompt | None, ids: list[int], num_tokens: int, stop: bool = False
    ) -> list[int]:
        """`num_tokens` argmax tokens after `ids` (the engine never samples ids past the tokenizer's)."""
        embeds = (
            None if mm is None else self.model.embed_multimodal(mm.images.pixel_values, mm.images.grid_thw)
        )
        tokens, out = list(ids), []
        for _ in range(num_tokens):
            input_ids, meta = paddle.to_tensor(tokens), AttentionMetadata.build([len(tokens)])
            if mm is None:
                hidden = self.model(input_ids, paddle.arange(len(tokens)), meta, None)
            else:
                positions = paddle.to_tensor(mm.positions_for(0, len(tokens)))
                inputs = self._mm_inputs(mm, input_ids, embeds)
                hidden = self.model(input_ids, positions, meta, None, **inputs)
            logits = self.model.compute_logits(hidden[-1:]).numpy()[0, : self.tokenizer.vocab_size]
            token = int(np.argmax(logits))
            out.append(token)
            tokens.append(token)
            if stop and token in self.tokenizer.eos_token_ids:
                break
        return out

    def _mm_inputs(self, mm: MultimodalPrompt, input_ids: paddle.Tensor, embeds: paddle.Tensor) -> dict:
        inputs = {"inputs_embeds": self.model.get_input_embeddings(input_ids, embeds)}
        if mm.vision_token_ids:  # ERNIE-4.5-VL: as the engine, only prompt tokens go to the vision experts
            inputs["vision_mask"] = paddle.to_tensor(mm.vision_mask_for(0, input_ids.shape[0]))
        return inputs

    def answer(self, mm: MultimodalPrompt, num_tokens: int) -> tuple[int, str]:
        """(prompt length, decoded greedy answer stopping at EOS): what a server must return."""
        tokens = self.greedy(mm, mm.prompt_token_ids, num_tokens, stop=True)
        return len(mm.prompt_token_ids), self.tokenizer.decode(tokens)


def run_engine(
    engine: LLMEngine, requests: dict[str, dict], params: SamplingParams
) -> tuple[dict[str, list[int]], list[dict]]:
    """Serve requests together; their output tokens and each step's scheduled (request, start, count)."""
    for request_id, kwargs in requests.items():
        engine.add_request(request_id, sampling_params=params, **kwargs)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    steps = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        steps.append(
            {seq.request.request_id: (seq.num_computed_tokens, n) for seq, n in out.scheduled.items()}
        )
        return out

    engine.scheduler.schedule = recording_schedule
    try:
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
                tokens[out.request_id] += out.outputs[0].token_ids
    finally:
        del engine.scheduler.schedule
    return tokens, steps


def row_params(row: str) -> dict[str, str]:
    path = ROOT / "model_repository" / row / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {key: p.string_value for key, p in config.parameters.items()}


@contextmanager
def serve_row(base: Path, row: str, checkpoint: Path, overrides: dict[str, str]) -> Iterator[TritonServer]:
    """The committed row, its hub model id resolved under ERNIE_MODEL_ROOT to `checkpoint`, with `overrides`
    (e.g. a small KV cache for the test machine)."""
    params = row_params(row)
    link = base / "model_root" / params["model"]
    link.parent.mkdir(parents=True)
    link.symlink_to(checkpoint)
    write_row(base / "models", row, {**params, **overrides})
    with running_server(base, base / "models", row) as server:
        yield server
