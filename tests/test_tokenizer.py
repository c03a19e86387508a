"""Tokenizer, incremental detokenizer and the random checkpoint generator."""

from __future__ import annotations

import codecs
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from ernie_engine.output_processor import OutputProcessor
from ernie_engine.outputs import CompletionOutput
from ernie_engine.sampler import SampledToken
from ernie_engine.sampling_params import SamplingParams
from ernie_engine.sequence import Request, Sequence
from ernie_engine.tokenizer import IncrementalDetokenizer, Tokenizer

from scripts.make_random_model import ModelShape, make_model, weight_shapes

MIXED = [
    "Hello world, 你好世界！ The weather in Beijing is sunny today. 北京今天天气晴朗。",
    "Emoji 🙂🎉👩‍👩‍👧 and accents: naïve café, Ωmega, ß, ünïcödé, 日本語テキスト, 한국어",
    '  leading spaces, tabs\tand\nnew lines\n\n  x = {"a": [1, 2.5e-3]} ; 100%',
    "<|begin_of_sentence|>User: hi\nAssistant: <think>\nhm\n</think>\n\n"
    "<tool_call>{}</tool_call><|end_of_sentence|>",
]
SPECIALS = [
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<|IMAGE_START|>",
    "<|IMAGE_END|>",
    "<|VIDEO_START|>",
    "<|VIDEO_END|>",
    "<|image@placeholder|>",
    "<|video@placeholder|>",
    "<s>",
    "</s>",
    "<unk>",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), ModelShape(), seed=0)


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def test_ids_and_sizes(tok, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.id_to_piece[i] for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert tok.vocab_size == config["vocab_size"] == len(tok.all_token_bytes)
    assert tok.eos_token_ids == [2, tok.token_to_id("<|end_of_sentence|>")]


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_common_text_is_compact(tok):
    # A trained vocabulary, not byte soup: English words and common Chinese are whole pieces.
    assert len(tok.encode(MIXED[0])) < len(MIXED[0]) // 2
    assert tok.is_byte_token(tok.encode("🙂")[0])


def test_specials_are_single_ids(tok):
    for special in SPECIALS:
        ids = tok.encode(f"a{special}b")
        assert len(ids) == 3 and tok.id_to_piece[ids[1]] == special, special
    ids = tok.encode("<|begin_of_sentence|>hi<|IMAGE_START|><think>x</think>")
    assert tok.decode(ids) == "hi<think>x</think>"  # control tokens skipped, parser markup kept
    assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_token_id


def test_byte_tables(tok):
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte_token(i)]
    assert len(byte_ids) == 256
    assert sorted(tok.token_bytes(i) for i in byte_ids) == [bytes([b]) for b in range(256)]
    assert tok.token_bytes(tok.token_to_id("<think>")) == b"<think>"


def test_ids_past_the_tokenizer_decode_to_nothing(tok):
    # A model vocab larger than the tokenizer (the 0.3b preset) may sample such ids: no crash, no text.
    beyond = tok.vocab_size + 5
    assert tok.token_bytes(beyond) == b"" and tok.decode([beyond]) == ""
    assert IncrementalDetokenizer(tok).step([tok.encode("a")[0], beyond]) == "a"


def test_dummy_prefix_model_encodes_without_one(tok, model_dir, tmp_path):
    """A sentencepiece model trained with add_dummy_prefix (Llama-style) encodes like one without: no space is
    invented, and text starting with a newline does not merge into the vocabulary's "\\n\\n" piece."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    # The same model with its NormalizerSpec's add_dummy_prefix (field 3 of field 3) set: protobuf merges it.
    proto = (model_dir / "tokenizer.model").read_bytes() + b"\x1a\x02\x18\x01"
    (tmp_path / "tokenizer.model").write_bytes(proto)
    assert spm.SentencePieceProcessor(model_proto=proto).encode("a", out_type=str) == ["\u2581a"]
    prefixed = Tokenizer.from_dir(tmp_path)
    for text in ["\nfoo", "\n", "\n\nx, world", "<think>\n\nhi</think>\n", *MIXED]:
        assert prefixed.encode(text) == tok.encode(text), text
        assert prefixed.decode(prefixed.encode(text), skip_special_tokens=False) == text


def detok_deltas(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [detok.step([i]) for i in ids] + [detok.finish()]


@pytest.mark.parametrize("text", MIXED)
def test_incremental_detokenizer(tok, text):
    ids = tok.encode(text)
    for skip in (True, False):
        deltas = detok_deltas(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in deltas)
    rng = random.Random(1)  # several tokens per step
    detok, out, i = IncrementalDetokenizer(tok), "", 0
    while i < len(ids):
        n = rng.randint(1, 4)
        out, i = out + detok.step(ids[i : i + n]), i + n
    assert out + detok.finish() == tok.decode(ids)


def test_detokenizer_holds_incomplete_utf8(tok):
    ids = tok.encode("🙂")
    assert len(ids) == 4
    assert detok_deltas(tok, ids) == ["", "", "", "🙂", ""]
    truncated = detok_deltas(tok, ids[:2])
    assert truncated[:2] == ["", ""] and truncated[-1] == "\ufffd"  # only a cut stream ends in U+FFFD


def stream(tok: Tokenizer, ids: list[int], **params) -> list[CompletionOutput]:
    """The engine's per-token outputs for a completion that samples `ids` (until it finishes)."""
    sampling = SamplingParams(max_tokens=len(ids), **params)
    eos = frozenset(tok.eos_token_ids)
    request = Request("r", [tok.bos_token_id], sampling, len(ids), eos | set(sampling.stop_token_ids), eos)
    seq = Sequence.create(request, 0)
    request.sequences = [seq]
    processor = OutputProcessor(tok, max_model_len=1024)
    processor.add(request)
    outs = []
    for token_id in ids:
        seq.token_ids.append(token_id)
        outs.append(processor.process([seq], [SampledToken(token_id)])[0].outputs[0])
        if seq.is_finished:
            break
    return outs


def test_stop_string_completed_before_min_tokens_does_not_stop(tok):
    # "\n" is held back after token 2 (it may begin "\n\n"), but it ended before min_tokens: as vLLM, no stop.
    ids = tok.encode("Hi") + tok.encode("\n") + tok.encode("there\nyou")
    min_tokens = len(tok.encode("Hi\n")) + 1
    outs = stream(tok, ids, stop=["\n", "\n\n"], min_tokens=min_tokens)
    assert "".join(o.text for o in outs) == "Hi\nthere"
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", "\n")


def expected_stream(tok: Tokenizer, ids: list[int], stops: list[str], include: bool, min_tokens: int,
                    skip: bool) -> tuple[str, int, str | None]:
    """vLLM's rule: after each token past the first min_tokens, the first stop string ending in its new
    text."""
    decoder, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    for n, token_id in enumerate(ids, 1):
        start = len(text)
        text += "" if skip and tok.is_special(token_id) else decoder.decode(tok.token_bytes(token_id))
        found = [(text.find(s, max(0, start - len(s) + 1)), s) for s in stops] if n > min_tokens else []
        hits = [(pos, s) for pos, s in found if pos >= 0]
        if hits:
            pos, stop = min(hits, key=lambda hit: hit[0])  # the earliest; on a tie, the first listed
            return text[: pos + len(stop) if include else pos], n, stop
    return text + decoder.decode(b"", final=True), len(ids), None


def test_stop_strings_on_random_token_streams(tok):
    """Random token ids (byte pieces, control tokens, text) and stop strings cut from their text (spanning
    tokens, overlapping, inside a multi-byte character): the streamed deltas match vLLM's rule."""
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte_token(i)]
    specials = [tok.token_to_id(t) for t in ("<|begin_of_sentence|>", "<|IMAGE_START|>", "<think>")]
    for _ in range(400):
        ids = tok.encode(rng.choice(MIXED[:3])[: rng.randint(5, 40)])
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(byte_ids + specials))
        text = tok.decode(ids)
        starts = [rng.randrange(len(text)) for _ in range(rng.randint(1, 3))]
        stops = [text[a : a + rng.randint(1, 4)] for a in starts]
        include, skip = rng.random() < 0.5, rng.random() < 0.7
        min_tokens = min(rng.choice([0, 0, 2, 5]), len(ids))
        outs = stream(tok, ids, stop=stops, include_stop_str_in_output=include, min_tokens=min_tokens,
                      skip_special_tokens=skip)
        want, num_tokens, stop = expected_stream(tok, ids, stops, include, min_tokens, skip)
        assert "".join(o.text for o in outs) == want, (ids, stops)
        assert len(outs) == outs[-1].num_output_tokens == num_tokens
        assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop" if stop else "length", stop)


def test_generator_is_deterministic(tmp_path):
    a = make_model(tmp_path / "a", ModelShape(hidden_size=64), seed=3)
    b = make_model(tmp_path / "b", ModelShape(hidden_size=64), seed=3)
    c = make_model(tmp_path / "c", ModelShape(hidden_size=64), seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_checkpoint_weights(model_dir):
    import safetensors.paddle
    import safetensors.torch

    config = json.loads((model_dir / "config.json").read_text())
    assert (model_dir / "model.safetensors").stat().st_size < 5_000_000
    weights = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    shape = ModelShape(**{k: config[k] for k in ModelShape.__dataclass_fields__})
    assert {k: tuple(v.shape) for k, v in weights.items()} == weight_shapes(shape)
    assert weights["ernie.layers.0.self_attn.qkv_proj.weight"].shape == (128, (4 + 2 * 2) * 32)
    assert all(str(v.dtype) == "torch.bfloat16" for v in weights.values())
    embed = weights["ernie.embed_tokens.weight"].float()
    assert 0.015 < embed.std().item() < 0.025
    assert abs(weights["ernie.norm.weight"].float().mean().item() - 1) < 0.05
    # The engine's loader reads with Paddle: same tensors, same bf16 values.
    paddle_weights = safetensors.paddle.load_file(str(model_dir / "model.safetensors"))
    norm = paddle_weights["ernie.layers.1.post_attention_layernorm.weight"]
    assert str(norm.dtype) == "paddle.bfloat16"
    assert (
        norm.astype("float32").tolist()
        == weights["ernie.layers.1.post_attention_layernorm.weight"].float().tolist()
    )
