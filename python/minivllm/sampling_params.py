"""SamplingParams: how one request samples and when it stops (vLLM's names)."""

from __future__ import annotations

import math
import numbers
import operator
import struct
from dataclasses import dataclass
from typing import Any

from minivllm.limits import INT32_MAX, INT64_MAX, SEED_LIMIT

# Temperatures below this sample greedily (vLLM's threshold). The sampler divides float32 logits
# by the temperature; a divisor near float32's smallest normal number overflows them to inf and
# the softmax to NaN, and well before that the distribution is a one-hot in all but name.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Per-request sampling settings; invalid values raise ValueError when constructed.

    temperature: 0 means greedy; so does any temperature below 1e-5 (`GREEDY_TEMPERATURE`, as in
    vLLM), which is stored as 0.0. Temperatures, top_p and min_p must keep their meaning as the
    float32 numbers the sampler uses: a temperature that overflows float32 or a top_p that
    rounds to 0 is refused. top_k: 0 (or -1, vLLM's spelling, stored as 0) means off. seed: the
    draws depend only on the seed and the request's own tokens, not on the rest of the batch (on
    a GPU the logits' rounding still depends on the batch size, so a draw on a token boundary can
    move). stop: strings that end the completion; neither they nor the text of a stop token id
    or EOS that ended it are in the completion's text (its token ids keep the token), unless
    include_stop_str_in_output (vLLM's rule). max_model_length:
    MinivLLM's per-request cap on prompt + completion tokens. n: completions of the prompt
    (completion i draws with seed + i). logprobs: the sampled token's log-probability and the
    `logprobs` most likely tokens' per generated token; prompt_logprobs: the same for each prompt
    token (both log_softmax of the model's raw logits, as vLLM reports by default).

    Integer fields are bounded by the core's fields (top_k, stop token ids, max_model_length, n
    and the logprobs counts int32, max_tokens int64, seed uint64). `verify(vocab_size)` adds the
    checks that need the model (stop token ids inside the vocabulary, logprobs counts at most
    its size).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    max_model_length: int | None = None
    skip_special_tokens: bool = True
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, and store every field in the form the
        engine uses (numbers as Python int / float, top_k -1 as 0, a temperature below
        GREEDY_TEMPERATURE as 0.0). Idempotent; LLM.generate calls it again, so a SamplingParams
        changed after construction is checked too."""
        t = _real("temperature", self.temperature)
        if not t >= 0.0 or not math.isfinite(_as_float32(t)):
            raise ValueError(
                f"temperature must be >= 0 and finite as a float32 (at most "
                f"{_FLOAT32_MAX:.8g}), got {self.temperature!r}"
            )
        p = _real("top_p", self.top_p)
        if not 0.0 < p <= 1.0 or _as_float32(p) == 0.0:
            raise ValueError(
                f"top_p must be in (0, 1] and nonzero as a float32, got {self.top_p!r}"
            )
        min_p = _real("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        top_k = _integer("top_k", self.top_k)
        if top_k == -1:
            top_k = 0
        if not 0 <= top_k <= INT32_MAX:
            raise ValueError(
                f"top_k must be in [0, 2**31 - 1] (0 or -1 disables it), got {self.top_k!r}"
            )
        max_tokens = _integer("max_tokens", self.max_tokens)
        if not 1 <= max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens must be in [1, 2**63 - 1], got {self.max_tokens!r}")
        max_model_length = self.max_model_length
        if max_model_length is not None:
            max_model_length = _integer("max_model_length", max_model_length)
            if not 2 <= max_model_length <= INT32_MAX:
                raise ValueError(
                    f"max_model_length must be in [2, 2**31 - 1], got {self.max_model_length!r}"
                )
        seed = self.seed
        if seed is not None:
            seed = _integer("seed", seed)
            if not 0 <= seed < SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**64), got {self.seed!r}")
        n = _integer("n", self.n)
        if not 1 <= n <= INT32_MAX:
            raise ValueError(f"n must be in [1, 2**31 - 1], got {self.n!r}")
        counts = {}
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                value = _integer(name, value)
                if not 0 <= value <= INT32_MAX:
                    raise ValueError(
                        f"{name} must be None or in [0, 2**31 - 1], got {getattr(self, name)!r}"
                    )
            counts[name] = value
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        stops = [self.stop] if isinstance(self.stop, str) else _as_list("stop", self.stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        stop_token_ids = None
        if self.stop_token_ids is not None:
            stop_token_ids = []
            for tid in _as_list("stop_token_ids", self.stop_token_ids):
                value = _integer("stop_token_ids", tid)
                if not 0 <= value <= INT32_MAX:
                    raise ValueError(f"stop_token_ids must be in [0, 2**31 - 1], got {tid!r}")
                stop_token_ids.append(value)

        self.temperature = 0.0 if t < GREEDY_TEMPERATURE else t
        self.top_p = p
        self.min_p = min_p
        self.top_k = top_k
        self.max_tokens = max_tokens
        self.max_model_length = max_model_length
        self.seed = seed
        self.stop_token_ids = stop_token_ids
        self.n = n
        self.logprobs = counts["logprobs"]
        self.prompt_logprobs = counts["prompt_logprobs"]

    def verify(self, vocab_size: int) -> None:
        """`validate()` plus the checks that need the model: every stop token id must be in
        the vocabulary [0, vocab_size), and no more top logprobs asked for than it has."""
        self.validate()
        for tid in self.stop_token_ids or ():
            if tid >= vocab_size:
                raise ValueError(
                    f"stop_token_ids: {tid} is outside the vocabulary [0, {vocab_size})"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise ValueError(
                    f"{name}={value} is more than the vocabulary's {vocab_size} tokens"
                )

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


_FLOAT32_MAX = struct.unpack("f", b"\xff\xff\x7f\x7f")[0]


def _as_float32(value: float) -> float:
    """`value` rounded to float32 (what the sampler sees), +-inf where it overflows."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _real(name: str, value: Any) -> float:
    """A real number (int, float, numpy scalar, Fraction) as a Python float; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int or Fraction beyond float64
        return math.inf if value > 0 else -math.inf


def _integer(name: str, value: Any) -> int:
    """What operator.index accepts (int, numpy integers) as an int; bools and floats are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_list(name: str, value: Any) -> list[Any]:
    """None, a list or a tuple, as a list; anything else (bytes, a set, a number) is refused."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {type(value).__name__} {value!r}")
    return list(value)
