"""The chat messages of a POST /v1/chat/completions body (OpenAI's roles, text content only), and
the strict base model every request body shares (protocol.py has the requests themselves)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator


class StrictModel(BaseModel):
    """Requests: an unknown field is an error (OpenAI answers 400 "Unrecognized request
    argument"), as is a value of the wrong JSON type."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _content_text(content: str | list[dict[str, Any]] | None, role: str) -> str | None:
    """A message's content as one string: text parts joined by newlines (as vLLM does)."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type")
        if kind not in ("text", "input_text"):
            raise ValueError(
                f"{role} message: content part type {kind!r} is not supported (text only)"
            )
        text = part.get("text")
        if isinstance(text, str):
            texts.append(text)
        else:
            why = f"{role} message: a text content part needs a string 'text'"
            raise ValueError(why)  # noqa: TRY004 - pydantic reports ValueErrors only
    return "\n".join(texts)


Content = StrictStr | list[dict[str, Any]]


class _Message(StrictModel):
    name: str | None = None

    @property
    def text(self) -> str | None:
        return _content_text(getattr(self, "content", None), getattr(self, "role", ""))

    @model_validator(mode="after")
    def _check_parts(self) -> _Message:
        _ = self.text  # a non-text part is refused while validating, with the others
        return self


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_assistant(self) -> AssistantMessage:
        if self.tool_calls or self.function_call:
            raise ValueError("tool calls are not supported by minivllm")
        if self.content is None:
            raise ValueError("an assistant message needs content")
        return self


class ToolMessage(_Message):
    role: Literal["tool", "function"]
    content: Content | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _refuse(self) -> ToolMessage:
        raise ValueError(f"{self.role} messages are not supported by minivllm (no tool calling)")


ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]
