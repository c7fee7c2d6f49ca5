"""Tokenizer of a model, from its tokenizer.json bytes (package `tokenizers`)."""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """encode(text) -> ids (with the tokenizer's own special tokens, e.g. Mixtral's BOS),
    decode(ids) -> text, and an incremental decoder for streaming."""

    def __init__(self, tok: _HFTokenizer, bos_id: int | None = None, eos_ids: Iterable[int] = ()) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)

    @classmethod
    def from_bytes(cls, data: bytes | str, bos_id: int | None = None, eos_ids: Iterable[int] = ()) -> "Tokenizer":
        if not data:
            raise ValueError("the model has no tokenizer.json in the store")
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            tok = _HFTokenizer.from_str(text if isinstance(text, str) else bytes(text).decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed json
            raise ValueError(f"invalid tokenizer.json: {e}") from None
        return cls(tok, bos_id, eos_ids)

    @classmethod
    def from_file(cls, path: str, bos_id: int | None = None, eos_ids: Iterable[int] = ()) -> "Tokenizer":
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), bos_id, eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas.

    Decodes the whole generated sequence each step and emits what is new; holds back text
    ending in an incomplete UTF-8 sequence (U+FFFD) so byte-level BPE never emits half a char.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # text emitted so far

    def full_text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.full_text()
        if text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.text):
            # a tokenizer whose decode is not prefix-stable: emit nothing new rather than garbage
            return ""
        delta = text[len(self.text):]
        self.text = text
        return delta
