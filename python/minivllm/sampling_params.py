"""SamplingParams: how one request samples and when it stops (vLLM's names)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SamplingParams:
    """Per-request sampling settings; invalid values raise ValueError when constructed.

    temperature: 0 means greedy. top_k: 0 (or -1, vLLM's spelling) means off. seed: the draws
    depend only on the seed and the request's own tokens, not on the rest of the batch (on a GPU
    the logits' rounding still depends on the batch size, so a draw on a token boundary can move).
    stop: strings that end the completion (not included in the text). max_model_length:
    MinivLLM's per-request cap on prompt + completion tokens. n: completions of the prompt
    (completion i draws with seed + i). logprobs: the sampled token's log-probability and the
    `logprobs` most likely tokens' per generated token; prompt_logprobs: the same for each prompt
    token (both log_softmax of the model's raw logits, as vLLM reports by default).
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

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (called again by LLM.generate)."""
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise ValueError(f"temperature must be >= 0, got {t!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_model_length is not None and (
            not isinstance(self.max_model_length, int) or self.max_model_length < 2
        ):
            raise ValueError(
                f"max_model_length must be an integer >= 2, got {self.max_model_length!r}"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        for tid in self.stop_token_ids or []:
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {tid!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
