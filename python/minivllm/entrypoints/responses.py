"""The OpenAI API's response bodies (completions, chat, stream chunks, models, errors), and
the engine's outputs turned into them.

`completion_response` / `chat_response` turn the engine's final `RequestOutput`s into a response
body; the logprob helpers build each endpoint's own logprobs format (used per chunk when
streaming); `error_body` and `validation_message` give OpenAI's error shape. Shared by the HTTP
server and run-batch, like protocol.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from minivllm.entrypoints.protocol import ChatCompletionRequest, CompletionRequest
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput

# JSON has no -inf: a token the model rules out is reported at this log-probability (as vLLM does).
MIN_LOGPROB = -9999.0

Decode = Callable[[int], str]  # one token id -> its text (the tokenizer's view)


def token_decoder(tokenizer: Any) -> Decode:
    """The `Decode` of the logprob helpers: a token id's text, or "" for an id past the
    tokenizer's vocabulary (random-weight models sample ids the tokenizer lacks) or without
    a tokenizer."""
    vocab = len(tokenizer) if tokenizer is not None else 0

    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id]) if token_id < vocab else ""

    return decode


# ---- errors ----------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one line for the client, and the field it names (OpenAI's `param`)."""
    parts, param = [], None
    for e in error.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"] if not _is_union_tag(x))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not in OpenAI's API, nor one of minivllm's extra fields)"
        elif e["type"] == "json_invalid":
            msg = f"the body is not valid JSON: {e.get('ctx', {}).get('error', msg)}"
        parts.append(f"{loc}: {msg}" if loc else msg)
        if param is None and loc:
            param = loc
    return "; ".join(parts), param


def _is_union_tag(x: Any) -> bool:
    # pydantic names the union member it tried ("str", "list[int]", "function-after[...]").
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "list"))


# ---- responses -------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minivllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- engine outputs -> responses --------------------------------------------------------------


def _token_text(token_id: int, lp: Logprob, decode: Decode) -> str:
    return lp.decoded_token if lp.decoded_token is not None else decode(token_id)


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Logprob]],
    num_top: int,
    decode: Decode,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """The completions endpoint's logprobs of generated tokens: each token's text and
    logprob, the sampled token and the `num_top` most likely ones by text, and where each token
    starts in the completion text (counting from `text_offset`, for streamed chunks)."""
    out = CompletionLogprobs()
    offset = text_offset
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries.get(token_id)
        text = _token_text(token_id, sampled, decode) if sampled else decode(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_clamp(sampled.logprob) if sampled else None)
        out.text_offset.append(offset)
        offset += len(text)
        top: dict[str, float] = {}
        for t, lp in sorted(entries.items(), key=lambda item: item[1].rank):
            if t == token_id or lp.rank <= num_top:
                # Two tokens with the same text: the more likely one keeps the key.
                top.setdefault(_token_text(t, lp, decode), _clamp(lp.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Logprob]],
    num_top: int,
    decode: Decode,
) -> ChoiceLogprobs:
    """The chat endpoint's logprobs: per generated token its text, bytes and logprob, and the
    `num_top` most likely tokens in rank order."""
    content = []
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries.get(token_id)
        text = _token_text(token_id, sampled, decode) if sampled else decode(token_id)
        ranked = sorted((lp.rank, t, lp) for t, lp in entries.items() if lp.rank <= num_top)
        top = []
        for _, t, lp in ranked[:num_top]:
            tt = _token_text(t, lp, decode)
            top.append(TopLogprob(token=tt, logprob=_clamp(lp.logprob), bytes=_utf8(tt)))
        content.append(
            ChatCompletionTokenLogprob(
                token=text,
                logprob=_clamp(sampled.logprob) if sampled else MIN_LOGPROB,
                bytes=_utf8(text),
                top_logprobs=top,
            )
        )
    return ChoiceLogprobs(content=content)


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def usage_of(outputs: Sequence[RequestOutput]) -> UsageInfo:
    """Prompt tokens counted once per prompt; completion tokens over every choice."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _choices(outputs: Sequence[RequestOutput], n: int) -> list[tuple[int, CompletionOutput]]:
    """(choice index, completion) over every prompt: prompt i's completion j is i * n + j."""
    return [(i * n + c.index, c) for i, o in enumerate(outputs) for c in o.outputs]


def completion_response(
    request_id: str,
    model: str,
    req: CompletionRequest,
    outputs: Sequence[RequestOutput],
    decode: Decode,
    created: int | None = None,
) -> CompletionResponse:
    """The response to a completion request from each prompt's final output, in prompt order."""
    choices = []
    for index, c in _choices(outputs, req.n or 1):
        lp = None
        if req.logprobs is not None and c.logprobs is not None:
            lp = completion_logprobs(c.token_ids, c.logprobs, req.logprobs, decode)
        choices.append(
            CompletionChoice(index=index, text=c.text, logprobs=lp, finish_reason=c.finish_reason)
        )
    return CompletionResponse(
        id=request_id,
        created=created if created is not None else int(time.time()),
        model=model,
        choices=choices,
        usage=usage_of(outputs),
    )


def chat_response(
    request_id: str,
    model: str,
    req: ChatCompletionRequest,
    output: RequestOutput,
    decode: Decode,
    created: int | None = None,
) -> ChatCompletionResponse:
    """The response to a chat request from its final output."""
    choices = []
    for c in output.outputs:
        lp = None
        if req.logprobs and c.logprobs is not None:
            lp = chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0, decode)
        choices.append(
            ChatCompletionChoice(
                index=c.index,
                message=ChatCompletionMessage(content=c.text),
                logprobs=lp,
                finish_reason=c.finish_reason,
            )
        )
    return ChatCompletionResponse(
        id=request_id,
        created=created if created is not None else int(time.time()),
        model=model,
        choices=choices,
        usage=usage_of([output]),
    )
