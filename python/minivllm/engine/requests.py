"""Requests as users make them: prompts tokenized and validated before anything is scheduled.

`InputProcessor` turns a prompt (text, token ids, or a dict with either) and its SamplingParams
into a `Request`; `LLM.generate`, `LLM.chat`, `AsyncLLM` and the server all go through it, so a
prompt is refused the same way everywhere: a ValueError naming the prompt and the problem.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minivllm.config import EngineConfig
from minivllm.sampling_params import SamplingParams

PromptType = str | Sequence[int] | dict
_RANDOM_SEED_LIMIT = 2**63  # where requests without a seed draw theirs


@dataclass
class Request:
    """One validated request: its prompt, its parameters, its `n` completions' seeds."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # after the per-request max_model_length cap
    seed: int  # completion i draws with seed + i
    arrival_time: float = field(default_factory=time.perf_counter)


class InputProcessor:
    """Tokenizer, engine limits and the seed source for requests without a seed."""

    def __init__(self, config: EngineConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        self._seed_rng = np.random.default_rng(config.seed)

    def request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        name: str = "prompt",
        arrival_time: float | None = None,
    ) -> Request:
        """Tokenize and check one prompt; ValueError names it (`name`, e.g. "prompt 3")."""
        text: str | None
        if isinstance(prompt, dict):
            text = prompt.get("prompt")
            ids = prompt.get("prompt_token_ids")
            if ids is None:
                if not isinstance(text, str):
                    raise ValueError(f"{name}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
                ids = self.encode(text, name)
        elif isinstance(prompt, str):
            text, ids = prompt, self.encode(prompt, name)
        elif isinstance(prompt, (bytes, bytearray, memoryview)):
            raise ValueError(f"{name} is bytes; pass a str or a list of token ids")
        else:
            text, ids = None, prompt
        try:
            arr = np.asarray(ids)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: token ids must be a flat list of ints") from None
        if arr.size == 0:
            raise ValueError(f"{name} is empty")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name}: token ids must be a flat list of ints")
        vocab = self.config.model_config.vocab_size
        bad = (arr < 0) | (arr >= vocab)
        if bad.any():
            raise ValueError(
                f"{name}: token id {int(arr[bad][0])} is outside the vocabulary [0, {vocab})"
            )
        num = int(arr.size)
        limit = self.config.max_model_len
        if num >= limit:
            raise ValueError(
                f"{name} has {num} tokens; max_model_len={limit} leaves no room to generate (the "
                "prompt must be shorter than max_model_len)"
            )
        max_tokens = params.max_tokens
        if params.max_model_length is not None:
            if num >= params.max_model_length:
                raise ValueError(
                    f"{name} has {num} tokens, not less than its SamplingParams "
                    f"max_model_length={params.max_model_length}"
                )
            max_tokens = min(max_tokens, params.max_model_length - num)
        if params.seed is not None:
            seed = params.seed
        else:
            seed = int(self._seed_rng.integers(0, _RANDOM_SEED_LIMIT))
        return Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=arr.astype(np.int64).tolist(),
            params=params,
            max_tokens=max_tokens,
            seed=seed,  # SamplingParams keeps it in [0, 2**64), the core's range
            arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
        )

    def encode(self, text: str, name: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                f"{name} is text, but this model folder has no tokenizer; pass token ids"
            )
        if not text:
            raise ValueError(f"{name} is empty")
        return self.tokenizer.encode(text)

    def chat_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **chat_template_kwargs: Any,
    ) -> dict[str, Any]:
        """One conversation through the tokenizer's chat template: {"prompt", "prompt_token_ids"}.
        A template that fails (syntax, an undefined name, its own raise_exception) is a
        ValueError, as the messages' own problems are."""
        from jinja2 import TemplateError

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this model folder has none")
        if not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("each conversation must be a non-empty list of message dicts")
        checked = [_check_message(i, m) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                checked,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **chat_template_kwargs,
            )
        except (TypeError, KeyError, TemplateError) as e:
            raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from None
        # The template already wrote any special tokens: do not add them twice.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return {"prompt": text, "prompt_token_ids": ids}


def _check_message(index: int, message: dict[str, Any]) -> dict[str, Any]:
    """A chat message the template can render: a str role and a str content (a list of text
    parts, OpenAI's other form, is joined)."""
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise ValueError(f"message {index} needs a 'role' string, got {role!r}")
    if isinstance(content, list):
        texts = [p.get("text") if isinstance(p, dict) else None for p in content]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"message {index}: content parts must be {{'type': 'text', 'text'}}")
        content = "".join(texts)
    if not isinstance(content, str):
        raise ValueError(
            f"message {index} ({role}) needs a 'content' string, got {type(content).__name__}"
        )
    return {**message, "content": content}


def as_prompt_list(prompts: Any) -> list[PromptType]:
    """A single prompt (string, token ids, dict) or a list of them -> a list of prompts."""
    if isinstance(prompts, (bytes, bytearray, memoryview)):
        raise ValueError("prompts is bytes; pass a str or a list of token ids")
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        return [prompts] if prompts.ndim == 1 else list(prompts)
    if not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a string, token ids, or a list of them; got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if prompts and all(
        isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in prompts
    ):
        return [prompts]  # one prompt given as token ids
    return prompts


def as_params_list(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int, vocab_size: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt, each validated against the model's vocabulary (ValueError
    names the bad one)."""
    if sampling_params is None:
        params = [SamplingParams()] * n
    elif isinstance(sampling_params, dict):
        raise ValueError(
            "sampling_params is a dict; pass SamplingParams(**params) (or a list of them)"
        )
    elif isinstance(sampling_params, SamplingParams):
        params = [sampling_params] * n
    else:
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(
                f"got {len(params)} SamplingParams for {n} prompts; pass one or one per prompt"
            )
    for i, sp in enumerate(params):
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"sampling_params[{i}] is {type(sp).__name__}, not SamplingParams")
        try:
            sp.verify(vocab_size)
        except ValueError as e:
            raise ValueError(f"sampling_params[{i}]: {e}") from None
    return params
