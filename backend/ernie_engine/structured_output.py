"""Grammar-constrained decoding (structured output) with llguidance.

One `StructuredOutput` per engine holds the llguidance tokenizer built from the model's own vocabulary and
an LRU cache of compiled grammars keyed by the constraint. A request's constraint (`guided_json`,
`guided_json_object`, `guided_regex`, `guided_choice`, `guided_grammar`) is compiled (or found in the
cache) when the request is made, so a bad schema or regex (or one no output satisfies, which llguidance
finds only at the first mask) is a ValueError before it reaches the engine; each sequence then gets its
own `GrammarMatcher` (a copy of the compiled template).

Per step, `apply_grammar_masks` fills one bitmask for the constrained rows only (one llguidance call over
all of them), unpacks it with numpy and sets the disallowed logits to -inf; unconstrained rows in the same
batch are untouched. After sampling, each matcher consumes its sequence's token; a matcher that can take
nothing but end-of-sequence is complete (the request finishes "stop"). A matcher whose mask failed midway
(a dead end, a lexer limit) lets llguidance allow only eos: its request fails, naming the reason, rather
than finishing "stop" on a broken output.

Token table (llguidance needs the exact bytes of every id): sentencepiece pieces with "▁" as a space,
byte-fallback `<0xNN>` pieces as the single byte, special and added tokens as b"\\xff" + name (llguidance's
special-token marker: text grammars can never spell them, Lark grammars may name them, e.g. `<think>`),
and ids the tokenizer lacks (a model vocab larger than the tokenizer's) padded as named specials. Pitfalls
this avoids: with a `TokenizerWrapper`, llguidance ignores `n_vocab` and `eos_token` (the vocab is
len(tokens), the eos is the wrapper's one id) and its mask buffer must be exactly ceil(len/32) words; the
`<0xFF>` byte piece *is* the marker byte, so it is registered as a named special (0xFF never occurs in UTF-8).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llguidance
import llguidance.numpy as llnp
import numpy as np

from .sampling_params import SamplingParams, json_object
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .sequence import Sequence

logger = logging.getLogger(__name__)

SPECIAL_MARKER = b"\xff"
# JSON without free whitespace: a model cannot stall in endless spaces/newlines, and ", " / ": " are the
# separators models write anyway (json.dumps style). A schema's "x-guidance" object overrides these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'


def token_table(tokenizer: Tokenizer, vocab_size: int, sample_width: int) -> list[bytes]:
    """llguidance's bytes for every id below max(vocab_size, tokenizer.vocab_size)."""
    added = set(tokenizer.added_tokens.values())
    table = []
    for token_id in range(max(vocab_size, tokenizer.vocab_size)):
        if token_id >= min(sample_width, tokenizer.vocab_size):  # never sampled: padding / past the logits
            table.append(SPECIAL_MARKER + f"<|ernie_pad_{token_id}|>".encode())
            continue
        data = tokenizer.token_bytes(token_id)
        if tokenizer.is_special(token_id) or token_id in added or not data or data.startswith(SPECIAL_MARKER):
            data = SPECIAL_MARKER + tokenizer.id_to_piece[token_id].encode()
        table.append(data)
    return table


class _Vocab:
    """What llguidance.TokenizerWrapper reads: the token table, one eos id, an encode function."""

    def __init__(self, tokens: list[bytes], eos_token_id: int, bos_token_id: int, tokenizer: Tokenizer):
        self.tokens = tokens
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


def constraint_key(params: SamplingParams) -> tuple[str, str] | None:
    """(kind, canonical text) of the request's constraint, or None; ValueError names a malformed one."""
    if params.guided_json is not None:
        schema = json_object("guided_json", params.guided_json, "a JSON schema object")
        return "json", json.dumps(schema, ensure_ascii=False)  # key order kept: it is the output order
    if params.guided_json_object:
        return "json", ANY_JSON_OBJECT
    if params.guided_regex is not None:
        if not isinstance(params.guided_regex, str) or not params.guided_regex:
            raise ValueError("guided_regex must be a non-empty string")
        return "regex", params.guided_regex
    if params.guided_choice is not None:
        choices = params.guided_choice
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        return "choice", json.dumps(choices, ensure_ascii=False)
    if params.guided_grammar is not None:
        if not isinstance(params.guided_grammar, str) or not params.guided_grammar.strip():
            raise ValueError("guided_grammar must be a non-empty Lark or EBNF grammar")
        return "grammar", params.guided_grammar
    return None


def _grammar_text(kind: str, text: str) -> str:
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":  # a Lark alternative of JSON-quoted literals (valid Lark string syntax)
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in json.loads(text))
        )
    return llguidance.grammar_from("grammar", text)  # Lark, or GBNF/EBNF converted to Lark


_KIND_NAMES = {"json": "JSON schema", "regex": "regex", "choice": "guided_choice", "grammar": "grammar"}


class StructuredOutput:
    """The engine's grammar compiler and cache; makes a `GrammarMatcher` per constrained sequence."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, sample_width: int,
                 eos_token_ids: frozenset[int], think_end_id: int | None = None, cache_size: int = 128):
        self.sample_width = sample_width
        self.think_end_id = think_end_id
        eos = sorted(eos_token_ids)
        # llguidance knows one eos id; the others are aliases allowed exactly when it is.
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id in eos_token_ids else eos[0]
        self.eos_token_ids = frozenset(eos)
        self.extra_eos = np.array([t for t in eos if t != self.eos_token_id], dtype=np.int64)
        tokens = token_table(tokenizer, vocab_size, sample_width)
        vocab = _Vocab(tokens, self.eos_token_id, tokenizer.bos_token_id, tokenizer)
        self.ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab))
        self.num_words = (self.ll_tokenizer.vocab_size + 31) // 32
        self.executor = llguidance.LLExecutor()
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # requests are made on callers' threads
        logger.info("structured output: llguidance %s, %d-token table", llguidance.__version__,
                    self.ll_tokenizer.vocab_size)

    def matcher_for(self, params: SamplingParams, thinking: bool = False) -> GrammarMatcher | None:
        """A fresh matcher for the request's constraint (None if unconstrained); ValueError if invalid.

        A thinking request is constrained only after `</think>`, so its reasoning stays free text.
        """
        key = constraint_key(params)
        if key is None:
            return None
        active = not (thinking and self.think_end_id is not None)
        return GrammarMatcher(self, self._template(key).deep_copy(), active)

    def _template(self, key: tuple[str, str]) -> llguidance.LLMatcher:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        template = self._compile(*key)  # outside the lock: a large grammar takes a while
        with self._lock:
            self._cache[key] = template
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def _compile(self, kind: str, text: str) -> llguidance.LLMatcher:
        try:
            grammar = _grammar_text(kind, text)
        except ValueError as err:
            raise ValueError(f"invalid {_KIND_NAMES[kind]}: {err}") from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        probe = matcher.deep_copy()
        probe.compute_bitmask()  # some grammars fail only here (no output satisfies `{"$ref": "#"}`)
        if probe.is_error():
            raise ValueError(f"invalid {_KIND_NAMES[kind]}: {_reason(probe)}")
        logger.debug("compiled %s constraint (%d chars)", kind, len(text))
        return matcher

    def apply(self, logits: np.ndarray, rows: list[int], matchers: list[GrammarMatcher]) -> None:
        """Set the logits the grammars forbid to -inf, for `rows` only (one bitmask call for all)."""
        bitmask = np.zeros((len(rows), self.num_words), dtype=np.int32)
        llnp.fill_next_token_bitmask_par(self.executor, [(m.matcher, i) for i, m in enumerate(matchers)],
                                         bitmask)
        width = logits.shape[1]
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width].view(bool)
        if self.extra_eos.size:  # an alias is allowed as eos, or as itself where a grammar names it
            allowed[:, self.extra_eos] |= allowed[:, self.eos_token_id, None]
        constrained = logits[rows]
        constrained[~allowed] = -np.inf
        logits[rows] = constrained


@dataclass(eq=False)
class GrammarMatcher:
    """One sequence's position in its grammar."""

    owner: StructuredOutput = field(repr=False)
    matcher: llguidance.LLMatcher = field(repr=False)
    active: bool = True  # False while a thinking model is still reasoning

    def accept(self, token_id: int) -> None:
        """Advance with the sampled token; RuntimeError if the grammar rejects it (never silently)."""
        if not self.active:
            self.active = token_id == self.owner.think_end_id
            return
        if self.matcher.is_error():  # its mask failed (a dead end, a lexer limit), so llguidance allowed eos
            raise RuntimeError(f"grammar failed: {_reason(self.matcher)}")
        if token_id in self.owner.eos_token_ids and not self.matcher.validate_tokens([token_id]):
            token_id = self.owner.eos_token_id  # an eos alias the grammar does not name: it means eos
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {_reason(self.matcher)}")

    def copy(self) -> GrammarMatcher:
        return GrammarMatcher(self.owner, self.matcher.deep_copy(), self.active)

    @property
    def is_complete(self) -> bool:
        """The grammar is satisfied and admits nothing more (only end-of-sequence)."""
        return self.active and self.matcher.is_stopped()


def _reason(matcher: llguidance.LLMatcher) -> str:
    """The error without the parser state and grammar dump (of any size) llguidance may append."""
    reason = matcher.get_error().split("<state>")[0].strip()
    return _REASONS.get(reason, reason)


# llguidance's names for a grammar that admits no further output.
_REASONS = dict.fromkeys(("NoExtension", "NoExtensionBias"), "no output can satisfy it")


def apply_grammar_masks(logits: np.ndarray, seqs: list[Sequence]) -> None:
    """The sampler's hook: mask the rows of constrained sequences; free rows are left alone."""
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None and seq.grammar.active]
    if rows:
        matchers = [seqs[i].grammar for i in rows]
        matchers[0].owner.apply(logits, rows, matchers)

