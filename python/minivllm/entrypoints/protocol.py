"""The OpenAI API's request bodies for POST /v1/completions and /v1/chat/completions, and their
conversion to the engine's terms.

Request models mirror OpenAI's schema field for field, with OpenAI's limits where vLLM is looser
(`top_logprobs` at most 20, a completion's `logprobs` at most 5, at most 4 stop strings, a user
message needs `content`), plus vLLM's extra body fields `top_k`, `min_p`, `ignore_eos`,
`stop_token_ids`, `include_stop_str_in_output` and, for chat, the chat template's options. The
messages of a chat body are in chat_messages.py. A field OpenAI has and minivllm cannot honour (penalties, logit_bias, tools,
echo, ...) is accepted only at its neutral value; anything else, an unknown field too, is refused
with the message a client sees in a 400. `completion_inputs` / `chat_inputs` turn a request into
prompts (or messages) and a `SamplingParams`; responses.py has the other direction. The HTTP
server and run-batch share both, so they know neither FastAPI nor the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    StrictStr,
    field_validator,
    model_validator,
)

from minivllm.entrypoints.chat_messages import ChatMessage, StrictModel
from minivllm.sampling_params import SamplingParams

# OpenAI's limits.
MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
MAX_N = 128
_INT64 = 2**63

# The sampling fields the model's generation_config.json may set as defaults (as vLLM does).
GENERATION_CONFIG_DEFAULTS = ("temperature", "top_p", "top_k", "min_p")


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's; minivllm's chunks carry no padding


# OpenAI fields minivllm accepts only at their neutral value: name -> the values that are neutral.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}


class _SamplingRequest(StrictModel):
    """The fields both endpoints share."""

    model: StrictStr
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=2 * _INT64)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra body fields.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False

    @field_validator("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                     mode="before")  # fmt: skip
    @classmethod
    def _int_is_a_number(cls, v: Any) -> Any:
        # JSON has one number type: 1 is as good a temperature as 1.0 (but true is not).
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _check_shared(self) -> _SamplingRequest:
        for name, neutral in _NEUTRAL.items():
            if getattr(self, name) not in neutral:
                raise ValueError(f"{name} is not supported by minivllm (leave it unset)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(
        self, max_tokens: int, logprobs: int | None, defaults: Mapping[str, Any]
    ) -> SamplingParams:
        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        seed = self.seed % (2 * _INT64) if self.seed is not None else None
        return SamplingParams(
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            seed=seed,
            n=self.n if self.n is not None else 1,
            logprobs=logprobs,
        )


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or a list of
    token-id lists (one choice group per prompt)."""

    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        # One message instead of pydantic's four (one per member of the union).
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x
            )

        if isinstance(v, str) or (isinstance(v, list) and not v):
            return v
        if isinstance(v, list) and (
            all(isinstance(x, str) for x in v) or is_ids(v) or all(is_ids(x) for x in v)
        ):
            return v
        raise ValueError(
            "must be a string, a list of strings, a list of token ids (integers >= 0) or a "
            "list of token-id lists"
        )

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by minivllm")
        if self.suffix:
            raise ValueError("suffix is not supported by minivllm")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of is not supported by minivllm (leave it unset or equal to n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is empty")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @property
    def max_output_tokens(self) -> int | None:
        """The completion budget the prompt must leave room for (16 when unset, OpenAI's
        default); None (`max_tokens: null`, as in vLLM): up to the end of the context."""
        return self.max_tokens


# apply_chat_template's own arguments: not variables a request's chat_template_kwargs may set.
_TEMPLATE_ARGUMENTS = frozenset(
    ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "tokenize", "padding", "truncation", "max_length",
     "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")
)  # fmt: skip

# Chat fields OpenAI has that minivllm accepts only unset (or at their neutral value).
_CHAT_UNSUPPORTED = ("tools", "functions", "audio", "prediction", "web_search_options")


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # vLLM's extra chat fields: how the chat template renders the conversation
    # (chat_template_kwargs={"enable_thinking": False} for Qwen3's template, say).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        for name in _CHAT_UNSUPPORTED:
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by minivllm")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice is not supported by minivllm (no tool calling)")
        if self.function_call not in (None, "none"):
            raise ValueError("function_call is not supported by minivllm (no tool calling)")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format other than {'type': 'text'} is not supported")
        if self.modalities not in (None, ["text"]):
            raise ValueError("modalities other than ['text'] are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        reserved = sorted(_TEMPLATE_ARGUMENTS & set(self.chat_template_kwargs or {}))
        if reserved:
            raise ValueError(
                f"chat_template_kwargs may not set {', '.join(reserved)} (the template's "
                "variables only)"
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be true (set "
                "add_generation_prompt to false to continue the last message)"
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if self.messages[-1].role == "assistant" and self.add_generation_prompt:
            raise ValueError(
                "the last message must not be the assistant's (nothing to answer); to continue "
                "it, set continue_final_message to true and add_generation_prompt to false"
            )
        return self

    def template_options(self) -> dict[str, Any]:
        """The chat template's arguments beyond the messages (InputProcessor.chat_prompt's)."""
        return {
            **(self.chat_template_kwargs or {}),
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
        }

    @property
    def max_output_tokens(self) -> int | None:
        """The completion budget asked for (max_completion_tokens wins); None: up to the end of
        the context."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (developer is OpenAI's new name for
        system)."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            msg = {"role": role, "content": m.text or ""}
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        return out


def completion_inputs(
    req: CompletionRequest, max_model_len: int, defaults: Mapping[str, Any] | None = None
) -> tuple[list[str | list[int]], SamplingParams]:
    """The prompts of a completion request and the SamplingParams every one of them gets.
    `defaults`: sampling values for fields the request leaves unset (the model's
    generation_config; OpenAI's defaults otherwise). With `max_tokens: null` the completion may
    run to the end of the context."""
    max_tokens = req.max_output_tokens
    params = req._sampling_params(
        max_tokens if max_tokens is not None else max_model_len, req.logprobs, defaults or {}
    )
    return req.prompts, params


def chat_inputs(
    req: ChatCompletionRequest, max_model_len: int, defaults: Mapping[str, Any] | None = None
) -> tuple[list[dict[str, str]], SamplingParams]:
    """The conversation (for the chat template) and the SamplingParams of a chat request. With
    no max_completion_tokens the completion may run to the end of the context."""
    max_tokens = req.max_output_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = req._sampling_params(
        max_tokens if max_tokens is not None else max_model_len, logprobs, defaults or {}
    )
    return req.conversation(), params


def check_context_length(
    req: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int, max_model_len: int
) -> None:
    """ValueError when the prompt and the completion asked for do not fit the context."""
    asked = req.max_output_tokens
    if asked is not None and num_prompt_tokens + asked > max_model_len:
        what = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        raise ValueError(
            f"this model's maximum context length is {max_model_len} tokens, but "
            f"{num_prompt_tokens + asked} were requested ({num_prompt_tokens} in the {what}, "
            f"{asked} for the completion); shorten the {what} or the completion"
        )


def generation_config_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The sampling defaults a checkpoint's generation_config.json sets (temperature, top_p,
    top_k, min_p), for requests that leave them unset; {} when it sets none."""
    path = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(raw, dict) or raw.get("do_sample") is False:
        return {}
    out = {}
    for name in GENERATION_CONFIG_DEFAULTS:
        value = raw.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out
