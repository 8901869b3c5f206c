"""Text of a growing completion, token by token, and its stop strings.

`IncrementalDetokenizer` feeds one token id at a time to the `tokenizers` library's DecodeStream,
which emits text only once the bytes it holds form whole characters: a multi-byte character split
across tokens never shows up half. `find_stop` ends the text at the first stop string, looking
only at the text that could hold a new one; `safe_end` is how much of the text a stream may
emit now: everything but a tail that could still grow into a stop string.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """`text` is the decoding of every token pushed so far (ids the tokenizer does not know,
    which random-weight models sample, have no text)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._backend = tokenizer._tokenizer  # the fast tokenizer's `tokenizers.Tokenizer`
        self._vocab = len(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""

    def push(self, token_id: int) -> None:
        if token_id < self._vocab:
            piece = self._stream.step(self._backend, token_id)
            if piece:
                self.text += piece


def find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """(position, stop string) of the first stop string in text that ends after `start` (text
    before it was searched already), or None."""
    longest = max(len(s) for s in stops)
    window_start = max(0, start - longest + 1)
    hits = [(i, s) for s in stops if (i := text.find(s, window_start)) >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """The end of the text a stream may emit: text up to a tail that is a proper prefix of a
    stop string (it may still become one) is held back."""
    if not stops:
        return len(text)
    for k in range(min(max(len(s) for s in stops) - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return len(text) - k
    return len(text)
