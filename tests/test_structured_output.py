"""Structured output with llguidance: the token table, constrained sampling on a real tiny model, errors.

The sampled tests run the offline engine on the random checkpoint at temperature 1 over several seeds:
a random model picks almost any allowed token, so every path through the grammar gets exercised. Schemas
bound their strings and numbers (maxLength, enum, minimum/maximum) so a random walk finishes in a few
dozen tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from ernie_engine import SamplingParams
from ernie_engine.llm import LLM
from ernie_engine.structured_output import StructuredOutput
from ernie_engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "checkpoints" / "ernie-4.5-tiny"
SEEDS = range(8)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Beijing", "Shanghai", "北京"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
TEXTS = ["Hello, world! 1 + 2 = 3", "北京是中国的首都。", "emoji 😀 and tabs\t\n", ' {"a": [1, 2.5e-3]}']


def tokenizer_dirs() -> list[str]:
    return ["random", *(["demo"] if (DEMO_MODEL / "tokenizer.model").is_file() else [])]


@pytest.fixture(params=tokenizer_dirs())
def tokenizer(request: pytest.FixtureRequest, random_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(random_model_dir if request.param == "random" else DEMO_MODEL)


@pytest.fixture(scope="module")
def llm(random_model_dir: Path) -> LLM:
    return LLM(random_model_dir, max_model_len=256, max_num_seqs=16, num_gpu_blocks_override=128,
               block_size=16)


def generate(llm: LLM, count: int = len(SEEDS), max_tokens: int = 64, **guided) -> list[tuple[str, str]]:
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, **guided) for s in range(count)]
    outs = llm.generate(["Answer in JSON:"] * count, params)
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


# ---- token table ---------------------------------------------------------------------------------


def test_token_table_round_trips(tokenizer: Tokenizer) -> None:
    padded = tokenizer.vocab_size + 37  # a model vocab larger than the tokenizer's
    so = StructuredOutput(tokenizer, padded, tokenizer.vocab_size, frozenset(tokenizer.eos_token_ids))
    ll = so.ll_tokenizer
    assert ll.vocab_size == padded
    added = set(tokenizer.added_tokens.values())
    byte_tokens = 0
    for token_id in range(padded):
        if token_id >= tokenizer.vocab_size:
            assert ll.is_special_token(token_id), token_id
            continue
        data = tokenizer.token_bytes(token_id)
        if tokenizer.is_special(token_id) or token_id in added or data == b"\xff":
            assert ll.is_special_token(token_id), tokenizer.id_to_piece[token_id]
            assert ll.decode_bytes([token_id]) == tokenizer.id_to_piece[token_id].encode()
        else:
            assert not ll.is_special_token(token_id), tokenizer.id_to_piece[token_id]
            assert ll.decode_bytes([token_id]) == data, tokenizer.id_to_piece[token_id]
        if tokenizer.is_byte_token(token_id):
            byte_tokens += 1
            assert len(ll.decode_bytes([token_id])) == 1 or data == b"\xff"
    assert byte_tokens == 256
    assert so.eos_token_id == tokenizer.eos_token_id
    for text in TEXTS:  # llguidance's tokenization through our encoder decodes back to the text
        assert ll.decode_str(ll.tokenize_str(text)) == text


def test_special_tokens_can_be_named_in_lark(tokenizer: Tokenizer) -> None:
    so = StructuredOutput(tokenizer, tokenizer.vocab_size, tokenizer.vocab_size,
                          frozenset(tokenizer.eos_token_ids))
    matcher = so.matcher_for(SamplingParams(guided_grammar='start: "a" <|end_of_sentence|>'))
    a_id = tokenizer.encode("a")
    assert matcher.matcher.consume_tokens(a_id)
    assert matcher.matcher.consume_token(tokenizer.token_to_id("<|end_of_sentence|>"))
    assert matcher.is_complete


def test_json_object_matcher_accepts_objects_only(tokenizer: Tokenizer) -> None:
    so = StructuredOutput(tokenizer, tokenizer.vocab_size, tokenizer.vocab_size,
                          frozenset(tokenizer.eos_token_ids))
    ok = so.matcher_for(SamplingParams(guided_json_object=True))
    for token_id in tokenizer.encode('{"a": [1, "北"], "b": {"c": null}}'):
        ok.accept(token_id)
    assert ok.is_complete
    bad = so.matcher_for(SamplingParams(guided_json_object=True))
    with pytest.raises(RuntimeError, match="grammar rejected"):
        for token_id in tokenizer.encode("[1]"):
            bad.accept(token_id)


# ---- sampling on a real model ----------------------------------------------------------------------


def test_json_schema_sampled_output_validates(llm: LLM) -> None:
    for text, finish in generate(llm, guided_json=SCHEMA):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_schema_as_string_and_n_sequences(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=64, guided_json=json.dumps(SCHEMA))
    out = llm.generate("JSON:", params)[0]
    assert len(out.outputs) == 3
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_choice_and_regex_are_honoured(llm: LLM) -> None:
    choices = ["yes", "no", "也许", "maybe not"]
    for text, finish in generate(llm, guided_choice=choices):
        assert text in choices and finish == "stop"
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for text, finish in generate(llm, guided_regex=pattern):
        assert re.fullmatch(pattern, text) and finish == "stop", text


def test_max_tokens_cut_finishes_length(llm: LLM) -> None:
    for text, finish in generate(llm, max_tokens=4, guided_json=SCHEMA):
        assert finish == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_free_rows_are_untouched_by_constrained_neighbours(llm: LLM) -> None:
    free = SamplingParams(temperature=1.0, seed=11, max_tokens=12)
    alone = llm.generate("Hello", free)[0].outputs[0].token_ids
    mixed = llm.generate(["Hello", "JSON:"], [free, SamplingParams(temperature=1.0, seed=1, max_tokens=40,
                                                                   guided_json=SCHEMA)])
    assert mixed[0].outputs[0].token_ids == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMA)


def test_grammar_may_name_an_eos_alias(llm: LLM) -> None:
    # <|end_of_sentence|> is one of the model's eos ids (not llguidance's one eos): named, it is itself.
    end = llm.engine.tokenizer.token_to_id("<|end_of_sentence|>")
    assert end in llm.engine.eos_token_ids and end != llm.engine.structured_output.eos_token_id
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=8,
                                guided_grammar='start: "a" <|end_of_sentence|>')
        out = llm.generate("x", params)[0]
        assert out.error is None and out.outputs[0].text == "a", out.error
        assert out.outputs[0].token_ids[-1] == end and out.outputs[0].finish_reason == "stop"


def test_grammar_is_compiled_once_per_constraint(llm: LLM) -> None:
    cache = llm.engine.structured_output._cache
    generate(llm, count=2, max_tokens=8, guided_regex="[a-c]{5}")
    size = len(cache)
    generate(llm, count=3, max_tokens=8, guided_regex="[a-c]{5}")
    assert len(cache) == size and ("regex", "[a-c]{5}") in cache


def test_a_grammar_failing_midway_fails_its_request_with_a_short_reason(llm: LLM) -> None:
    # llguidance builds the lexer lazily: this regex compiles, then fails at the first token.
    out = llm.generate("x", SamplingParams(guided_regex="a{1000000000}", max_tokens=4))[0]
    assert "too many expressions" in out.error and len(out.error) < 200, out.error


def test_a_grammar_dead_end_midway_fails_the_request(llm: LLM) -> None:
    """Past `"b": ` nothing satisfies the schema: llguidance then allows only eos, which must not pass for a
    finished ("stop") answer."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"$ref": "#/$defs/loop"}},
              "required": ["a", "b"], "additionalProperties": False,
              "$defs": {"loop": {"$ref": "#/$defs/loop"}}}
    for seed in range(2):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=16, guided_json=schema)
        out = llm.generate("x", params)[0]
        assert out.outputs[0].finish_reason == "abort" and out.outputs[0].text.endswith('"b": ')
        assert "grammar failed: no output can satisfy it" in out.error, out.error


@pytest.mark.parametrize(("raw", "valid"), [
    ({"structured_outputs": json.dumps({"choice": ["yes", "no"]})}, lambda text: text in ("yes", "no")),
    ({"guided_decoding": {"regex": "[0-9]{3}", "backend": "xgrammar"}},
     lambda text: re.fullmatch("[0-9]{3}", text)),
    ({"structured_outputs": {"json": SCHEMA, "json_object": False}},
     lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
])
def test_vllm_structured_outputs_objects_constrain(llm: LLM, raw: dict, valid) -> None:
    """As Triton's vLLM backend reads sampling_parameters: structured_outputs as an object or its JSON text
    (vLLM >= 0.11), guided_decoding (older; its backend hint is ignored)."""
    for seed in range(2):
        params = SamplingParams.from_dict({"temperature": 1.0, "seed": seed, "max_tokens": 64, **raw})
        completion = llm.generate("x", params)[0].outputs[0]
        assert completion.finish_reason == "stop" and valid(completion.text), completion.text


@pytest.mark.parametrize(("raw", "message"), [
    ({"structured_outputs": {"structural_tag": "{}"}}, "not supported: structural_tag"),
    ({"structured_outputs": "{nope"}, "structured_outputs is not valid JSON"),
    ({"guided_decoding": ["regex"]}, "guided_decoding must be an object"),
    ({"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "regex and guided_regex"),
    ({"structured_outputs": {"regex": "a"}, "guided_json": {}}, "at most one of"),
])
def test_vllm_structured_outputs_errors_name_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(raw)


@pytest.mark.parametrize(("guided", "message"), [
    ({"guided_json": {"type": "strin"}}, "invalid JSON schema: Invalid type: strin"),
    ({"guided_json": {"$ref": "#/defs/missing"}}, "invalid JSON schema"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ({"guided_regex": "(ab"}, "(?s)invalid regex.*unclosed group"),
    ({"guided_grammar": "start: undefined_rule"}, "(?s)invalid grammar.*unknown name"),
    ({"guided_choice": []}, "guided_choice must be a non-empty list"),
    # These compile, but no output satisfies them: llguidance finds out at the first mask.
    ({"guided_json": {"$ref": "#"}}, "invalid JSON schema: no output can satisfy it"),
    ({"guided_grammar": "start: start"}, "invalid grammar: no output can satisfy it"),
])
def test_invalid_constraints_raise_at_add_request(llm: LLM, guided: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", prompt="x", sampling_params=SamplingParams(**guided))
    assert not llm.engine.has_unfinished()
