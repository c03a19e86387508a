"""Sentencepiece tokenizer with the checkpoint's special / added tokens, and a streaming detokenizer.

Decoding is the plain concatenation of each token's bytes (`token_bytes`): sentencepiece's "▁" is a space,
byte-fallback pieces `<0xNN>` are raw bytes, added tokens are their literal text. Encoding never inserts a
dummy-prefix space (a model trained with one has it switched off, like transformers' non-legacy mode), so
decode(encode(text)) == text and a streamed decode only has to hold back incomplete UTF-8 sequences.

Special tokens (bos/eos/pad/unk/cls/sep, `<|...|>` control tokens) are skipped by `skip_special_tokens`;
added tokens marked `"special": false` in tokenizer_config.json (`<think>`, `</think>`, `<tool_call>`, ...)
are kept, since the reasoning and tool-call parsers read them from the text.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
# A serialized ModelProto field `normalizer_spec { add_dummy_prefix: false }`. Appended to a model, protobuf
# merges it into the model's own normalizer spec: the dummy prefix is off, with no protobuf package needed.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class Tokenizer:
    """ERNIE tokenizer. Build with `Tokenizer.from_dir(model_dir)`."""

    sp: spm.SentencePieceProcessor
    added_tokens: dict[str, int]  # text -> id of every token split out of the text before sentencepiece
    special_ids: frozenset[int]  # ids skipped by decode(skip_special_tokens=True)
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...
    extra_eos_ids: tuple[int, ...] = ()  # generation_config.json's eos ids beyond eos_token
    id_to_piece: list[str] = field(init=False)
    _token_bytes: list[bytes] = field(init=False, repr=False)
    _split_re: re.Pattern[str] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        size = max([self.sp.get_piece_size() - 1, *self.added_tokens.values()]) + 1
        pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        pieces += [""] * (size - len(pieces))
        for text, token_id in self.added_tokens.items():
            pieces[token_id] = text
        self.id_to_piece = pieces
        self._token_bytes = [self._piece_bytes(i, p) for i, p in enumerate(pieces)]
        names = sorted(self.added_tokens, key=len, reverse=True)  # longest first: `</think>` before `<`...
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def _piece_bytes(self, token_id: int, piece: str) -> bytes:
        if token_id < self.sp.get_piece_size():
            if self.sp.is_byte(token_id):
                return bytes([int(_BYTE_PIECE.match(piece).group(1), 16)])
            if (
                self.sp.is_control(token_id) or self.sp.is_unknown(token_id)
            ) and piece not in self.added_tokens:
                return b""
        return piece.replace("\u2581", " ").encode("utf-8")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        model_path = model_dir / "tokenizer.model"
        if not model_path.is_file():
            raise FileNotFoundError(f"no tokenizer.model in {model_dir}")
        sp = spm.SentencePieceProcessor(model_proto=model_path.read_bytes() + _NO_DUMMY_PREFIX)
        config = _read_json(model_dir / "tokenizer_config.json")
        specials_map = {**_read_json(model_dir / "special_tokens_map.json"), **config}
        special_tokens = {k: c for k in _SPECIAL_KEYS if (c := _content(specials_map.get(k)))}
        added: dict[str, int] = {}
        special_ids: set[int] = set()
        for id_text, entry in (config.get("added_tokens_decoder") or {}).items():
            added[entry["content"]] = int(id_text)
            if entry.get("special", True):
                special_ids.add(int(id_text))
        extra = [_content(t) for t in specials_map.get("additional_special_tokens") or []]
        for text in [*special_tokens.values(), *extra]:
            token_id = added.get(text, sp.piece_to_id(text))
            if text and (token_id != sp.unk_id() or text == sp.id_to_piece(sp.unk_id())):
                added[text] = token_id
                special_ids.add(token_id)
        special_ids |= {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
        generation = _read_json(model_dir / "generation_config.json").get("eos_token_id")
        extra_eos = (
            generation if isinstance(generation, list) else [generation] if generation is not None else []
        )
        return cls(sp, added, frozenset(special_ids), special_tokens, tuple(int(i) for i in extra_eos))

    # ---- vocabulary -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.id_to_piece)

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.special_tokens.get("bos_token", "<s>"))

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.special_tokens.get("eos_token", "</s>"))

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.special_tokens.get("pad_token", "<unk>"))

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token plus generation_config.json's eos ids (ERNIE ends turns with <|end_of_sentence|>)."""
        return list(dict.fromkeys([self.eos_token_id, *self.extra_eos_ids]))

    def token_to_id(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self.sp.piece_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to decoded text (b"" for control pieces the config does not name).

        Ids past the tokenizer (a model whose vocab_size exceeds it, e.g. the 0.3b random preset) give b"".
        """
        return self._token_bytes[token_id] if token_id < len(self._token_bytes) else b""

    @property
    def all_token_bytes(self) -> list[bytes]:
        """token_bytes for every id, indexable by id (for grammar engines building a token table)."""
        return self._token_bytes

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def is_byte_token(self, token_id: int) -> bool:
        return token_id < self.sp.get_piece_size() and self.sp.is_byte(token_id)

    # ---- encode / decode --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; added/special tokens become single ids; `add_special_tokens` prepends bos."""
        ids = [self.bos_token_id] if add_special_tokens else []
        chunks = self._split_re.split(text) if self._split_re else [text]
        for i, chunk in enumerate(chunks):
            if i % 2:  # odd chunks are the captured added tokens
                ids.append(self.added_tokens[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(
            self.token_bytes(i) for i in ids if not (skip_special_tokens and i in self.special_ids)
        )
        return data.decode("utf-8", errors="replace")

    def decode_token(self, token_id: int) -> str:
        """Readable text of one token (logprobs): a lone byte-fallback piece shows as its `<0xNN>` name."""
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return self.id_to_piece[token_id]


class IncrementalDetokenizer:
    """Streaming decode: feed new token ids, get the new text. O(new tokens) per step.

    Because decode is a byte concatenation, no window of earlier tokens is needed (unlike vLLM's
    prefix/read offsets for context-dependent decoders): only an incomplete UTF-8 tail is held back, so a
    delta never contains half a character and the concatenated deltas equal `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, new_ids: list[int]) -> str:
        data = b"".join(self._token_bytes(i) for i in new_ids if i not in self._skip)
        return self._decoder.decode(data) if data else ""

    def finish(self) -> str:
        """Flush: a truncated multi-byte sequence at the very end becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)
