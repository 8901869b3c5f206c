"""The OpenAI-compatible HTTP server: FastAPI routes over one `AsyncLLM`.

    POST /v1/completions, POST /v1/chat/completions    (stream or not)
    GET /v1/models, GET /health, GET /metrics

A route parses and validates the body (protocol.py), checks the model name, tokenizes the
prompt and checks that it fits (engine.make_request), and checks the waiting queue, all before it
answers, so a bad request gets its 4xx (or 503) even when it asked for a stream. Then it hands
the request to the engine and converts what comes back. The app holds no engine state beyond
the AsyncLLM handle.

Streams are Server-Sent Events: `data: {chunk}` lines, one finish_reason per choice, a usage
chunk when `stream_options.include_usage`, then `data: [DONE]`. The per-token path builds its
lines as strings around a per-request prefix (pydantic only for logprobs), and a stream that
fell behind gets what piled up in one chunk (AsyncLLM merges queued deltas). A client that goes
away cancels its stream (or, not streaming, its wait), which aborts the request: its KV blocks
return to the pool.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minivllm.engine.requests import Request
from minivllm.entrypoints.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
)
from minivllm.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_inputs,
    completion_inputs,
)
from minivllm.entrypoints.responses import (
    ModelCard,
    ModelList,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    error_body,
    validation_message,
)
from minivllm.entrypoints.serving import APIError, OpenAIServer, engine_error, request_error
from minivllm.outputs import CompletionOutput

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = "data: [DONE]\n\n"


# ---- streams ---------------------------------------------------------------------------------


def _chunk_prefix(object_name: str, request_id: str, created: int, model: str) -> str:
    return (
        f'data: {{"id":"{request_id}","object":"{object_name}","created":{created},'
        f'"model":{json.dumps(model)},"choices":['
    )


def _finish_json(reason: str | None) -> str:
    return "null" if reason is None else f'"{reason}"'


def _usage_line(prefix: str, num_prompt: int, num_completion: int) -> str:
    usage = {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }
    return f'{prefix}],"usage":{json.dumps(usage)}}}\n\n'


def _error_line(e: BaseException) -> str:
    err = engine_error(e) if isinstance(e, Exception) else APIError(500, str(e), "server_error")
    return f"data: {json.dumps(err.body)}\n\n"


async def _sse(
    server: OpenAIServer,
    requests: list[Request],
    prefix: str,
    include_usage: bool,
    choice: Callable[[int, CompletionOutput], str | None],
) -> AsyncIterator[str]:
    """The stream of one response: per engine output, one line per choice that `choice` renders
    (the JSON of a choice object; None: nothing to send), an error line if the engine gave up, the
    usage chunk if asked for, [DONE]. Every choice's finish_reason comes once."""
    suffix = '],"usage":null}\n\n' if include_usage else "]}\n\n"
    finished: set[tuple[int, int]] = set()
    num_completion = 0
    try:
        async for i, out in server.outputs(requests):
            lines = []
            for c in out.outputs:
                if (i, c.index) in finished:
                    continue
                num_completion += len(c.token_ids)
                if c.finish_reason is not None:
                    finished.add((i, c.index))
                body = choice(i, c)
                if body is not None:
                    lines.append(f"{prefix}{body}{suffix}")
            if lines:
                yield "".join(lines)
    except (EngineOverloadedError, EngineDeadError, RequestFailedError) as e:
        yield _error_line(e)
        yield _DONE
        return
    if include_usage:
        num_prompt = sum(len(r.prompt_token_ids) for r in requests)
        yield _usage_line(prefix, num_prompt, num_completion)
    yield _DONE


def _stream_completion(
    server: OpenAIServer,
    req: CompletionRequest,
    requests: list[Request],
    request_id: str,
    created: int,
) -> AsyncIterator[str]:
    n, num_top = req.n or 1, req.logprobs
    text_offsets: dict[int, int] = {}

    def choice(i: int, c: CompletionOutput) -> str | None:
        index = i * n + c.index
        lp = "null"
        if num_top is not None and c.logprobs:
            offset = text_offsets.get(index, 0)
            logprobs = completion_logprobs(
                c.token_ids, c.logprobs, num_top, server.decode_token, offset
            )
            text_offsets[index] = offset + sum(map(len, logprobs.tokens))
            lp = logprobs.model_dump_json()
        # A chunk for every output with tokens, text or not (half a character has none yet), as
        # vLLM does: a client timing the stream sees each engine output.
        if c.finish_reason is None and not c.token_ids and not c.text and lp == "null":
            return None
        return (
            f'{{"index":{index},"text":{json.dumps(c.text)},"logprobs":{lp},'
            f'"finish_reason":{_finish_json(c.finish_reason)}}}'
        )

    prefix = _chunk_prefix("text_completion", request_id, created, req.model)
    return _sse(server, requests, prefix, req.include_usage, choice)


async def _stream_chat(
    server: OpenAIServer,
    req: ChatCompletionRequest,
    request: Request,
    request_id: str,
    created: int,
) -> AsyncIterator[str]:
    prefix = _chunk_prefix("chat.completion.chunk", request_id, created, req.model)
    suffix = '],"usage":null}\n\n' if req.include_usage else "]}\n\n"
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    # OpenAI's first chunk of each choice names the role.
    yield "".join(
        f'{prefix}{{"index":{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
        f'"finish_reason":null}}{suffix}'
        for i in range(req.n or 1)
    )

    def choice(_: int, c: CompletionOutput) -> str | None:
        lp = "null"
        if num_top is not None and c.logprobs:
            logprobs = chat_logprobs(c.token_ids, c.logprobs, num_top, server.decode_token)
            lp = logprobs.model_dump_json()
        if c.finish_reason is None and not c.text and lp == "null":
            return None
        delta = f'{{"content":{json.dumps(c.text)}}}' if c.text else "{}"
        return (
            f'{{"index":{c.index},"delta":{delta},"logprobs":{lp},'
            f'"finish_reason":{_finish_json(c.finish_reason)}}}'
        )

    async for line in _sse(server, [request], prefix, req.include_usage, choice):
        yield line


# ---- the app ---------------------------------------------------------------------------------


async def _parse(http: HTTPRequest, model: type[BaseModel]) -> Any:
    body = await http.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


class _BearerAuth:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <key>` (as vLLM's --api-key)."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/v1")
            and scope["method"] != "OPTIONS"
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                body = error_body(
                    "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: AsyncLLM, served_model_names: Sequence[str], api_key: str | None = None
) -> FastAPI:
    """The FastAPI app over a running AsyncLLM (the caller owns its shutdown)."""
    server = OpenAIServer(engine, served_model_names)
    app = FastAPI(title="minivllm", docs_url=None, redoc_url=None)
    app.state.server = server
    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.dead is None else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        cards = [
            ModelCard(id=name, root=engine.config.model, max_model_len=server.max_model_len)
            for name in server.model_names
        ]
        return _json(ModelList(data=cards))

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Response:
        req: CompletionRequest = await _parse(http, CompletionRequest)
        server.check_model(req.model)
        try:
            prompts, params = completion_inputs(req, server.max_model_len, server.sampling_defaults)
        except ValueError as e:  # a value the schema lets through, SamplingParams does not
            raise request_error(e, req) from None
        request_id = f"cmpl-{uuid.uuid4().hex}"
        requests = await server.make_requests(req, prompts, params, request_id, "prompt")
        created = int(time.time())
        if req.stream:
            return StreamingResponse(
                _stream_completion(server, req, requests, request_id, created),
                media_type="text/event-stream",
                headers=_SSE_HEADERS,
            )
        outputs = await server.final_outputs(http, requests)
        if outputs is None:
            return Response(status_code=499)  # nobody is listening
        resp = completion_response(
            request_id, req.model, req, outputs, server.decode_token, created
        )
        return _json(resp)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Response:
        req: ChatCompletionRequest = await _parse(http, ChatCompletionRequest)
        server.check_model(req.model)
        try:
            conversation, params = chat_inputs(req, server.max_model_len, server.sampling_defaults)
        except ValueError as e:
            raise request_error(e, req) from None
        prompt = await server.off_loop(_chat_prompt, engine, conversation, req.template_options())
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        (request,) = await server.make_requests(req, [prompt], params, request_id, "messages")
        created = int(time.time())
        if req.stream:
            return StreamingResponse(
                _stream_chat(server, req, request, request_id, created),
                media_type="text/event-stream",
                headers=_SSE_HEADERS,
            )
        outputs = await server.final_outputs(http, [request])
        if outputs is None:
            return Response(status_code=499)
        return _json(
            chat_response(request_id, req.model, req, outputs[0], server.decode_token, created)
        )

    return app


def _chat_prompt(
    engine: AsyncLLM, conversation: list[dict[str, str]], options: dict[str, Any]
) -> dict[str, Any]:
    """The conversation through the checkpoint's chat template, with the request's template
    options (a template error is the request's: 400)."""
    try:
        return engine.chat_prompt(conversation, **options)
    except ValueError as e:  # the template's own errors too
        raise APIError(400, f"the chat template failed: {e}", param="messages") from None


def run_server(
    engine: AsyncLLM,
    host: str,
    port: int,
    served_model_names: Sequence[str],
    api_key: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (SIGINT / SIGTERM); the caller shuts the engine down."""
    import uvicorn

    app = build_app(engine, served_model_names, api_key)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # each request's own log line says more
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
