"""One engine running OpenAI batch lines (batch_file.py), as the HTTP server would answer them.

Each line's body is validated by the server's request models (protocol.py), its model name
checked, its prompts tokenized (chat through the checkpoint's chat template) and checked
against the context, all before anything starts: a bad line becomes its error line and the
rest go on. The requests run on one `RequestStream`; a line's response is built when its last
prompt finishes (a completion body may hold several prompts, each with `n` choices).

`BatchRunner.run(take, put)` is the loop every way of running a file shares (one engine in the
run-batch process, one per data-parallel process, one per Ray actor): it takes lines while
fewer than `max_lines_in_flight` are unfinished (default: twice max_num_seqs, so the engine's
running set stays full as lines finish), steps the engine, and puts each line's result as soon
as it exists. Lines are taken a slice at a time (an eighth of max_num_seqs, at least 16), one
slice per engine step: with async scheduling, parsing and tokenizing the next slice overlaps the
GPU's work on the step in flight instead of holding back the first step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from minivllm.entrypoints.batch_file import (
    COMPLETIONS_URL,
    URLS,
    InputLine,
    Result,
    error_result,
    new_id,
    parse_line,
    success_line,
)
from minivllm.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_inputs,
    check_context_length,
    completion_inputs,
    generation_config_defaults,
)
from minivllm.entrypoints.responses import (
    chat_response,
    completion_response,
    token_decoder,
    validation_message,
)
from minivllm.llm import LLM
from minivllm.outputs import RequestOutput
from minivllm.request_stream import RequestStream

# take(room, block): up to `room` input lines; with `block`, wait for at least one (the engine
# is idle). None: the input has ended.
Take = Callable[[int, bool], list[InputLine] | None]
Put = Callable[[list[Result]], object]
OnStep = Callable[[int, int], object]  # (prefill tokens, output tokens) of each engine step

INVALID_REQUEST = "invalid_request"
MODEL_NOT_FOUND = "model_not_found"
INVALID_METHOD = "invalid_method"
INVALID_URL = "invalid_url"


@dataclass(eq=False)
class _Line:
    """A line whose requests are running."""

    number: int
    custom_id: str
    request: CompletionRequest | ChatCompletionRequest
    outputs: list[RequestOutput | None]
    num_left: int
    error: str | None = None  # the engine refused one of its prompts


class BatchRunner:
    """An `LLM` answering batch lines. `served_model_names`: the names a body's `model` may
    use (default: the model folder as the engine was given it)."""

    def __init__(
        self,
        llm: LLM,
        served_model_names: Sequence[str] | None = None,
        max_lines_in_flight: int | None = None,
    ):
        self.llm = llm
        self.model_names = list(served_model_names or [llm.config.model])
        limit = max_lines_in_flight or 2 * llm.config.max_num_seqs
        if limit < 1:
            raise ValueError(f"max_lines_in_flight must be >= 1, got {limit}")
        self.max_lines_in_flight = limit
        self.lines_per_take = max(16, llm.config.max_num_seqs // 8)
        self.max_model_len = int(llm.config.max_model_len)
        self.sampling_defaults = generation_config_defaults(llm.config.model)
        self.decode_token = token_decoder(llm.tokenizer)

    def run(self, take: Take, put: Put, on_step: OnStep | None = None) -> None:
        """Run lines from `take` until it returns None and every line has finished; each
        result goes to `put` as soon as it exists."""
        running: dict[int, _Line] = {}
        is_ended = False
        with self.llm.open_stream() as rs:
            while True:
                results: list[Result] = []
                room = min(self.max_lines_in_flight - len(running), self.lines_per_take)
                if not is_ended and room > 0:
                    lines = take(room, not rs.num_unfinished)
                    if lines is None:
                        is_ended = True
                    for line in lines or ():
                        started = self._start(rs, line)
                        if isinstance(started, Result):
                            results.append(started)
                        else:
                            running[line.number] = started
                if results:
                    put(results)
                if not rs.num_unfinished:
                    if is_ended:
                        return
                    continue
                step = rs.step()
                results = []
                for (number, i), out in step.finished:
                    line = running[number]
                    if isinstance(out, ValueError):
                        line.error = line.error or str(out)
                    else:
                        line.outputs[i] = out
                    line.num_left -= 1
                    if not line.num_left:
                        del running[number]
                        results.append(self._finish(line))
                if results:
                    put(results)
                if on_step is not None:
                    on_step(step.num_prefill_tokens, step.num_output_tokens)

    # ---- one line -------------------------------------------------------------------------

    def _start(self, rs: RequestStream, line: InputLine) -> _Line | Result:
        """Validate a line and start its requests; or its error result."""
        obj = parse_line(line)
        if isinstance(obj, Result):
            return obj
        n, custom_id = line.number, obj["custom_id"]

        def fail(code: str, message: str, status: int | None = 400, param: str | None = None):
            return error_result(custom_id, n, code, message, status, param)

        method, url = obj.get("method"), obj.get("url")
        if method != "POST":
            return fail(INVALID_METHOD, f"method must be 'POST', got {method!r}", None)
        if url not in URLS:
            return fail(INVALID_URL, f"url must be one of {', '.join(URLS)}; got {url!r}", None)
        model = CompletionRequest if url == COMPLETIONS_URL else ChatCompletionRequest
        try:
            req = model.model_validate_json(json.dumps(obj.get("body")))
        except ValidationError as e:
            message, param = validation_message(e)
            return fail(INVALID_REQUEST, message, param=param)
        if req.stream:
            return fail(INVALID_REQUEST, "stream is not supported in a batch file", param="stream")
        if req.model not in self.model_names:
            names = ", ".join(map(repr, self.model_names))
            why = f"the model {req.model!r} does not exist; this run serves {names}"
            return fail(MODEL_NOT_FOUND, why, 404, "model")
        param = "prompt" if isinstance(req, CompletionRequest) else "messages"
        try:
            requests = self._requests(rs, req)
        except ValueError as e:
            return fail(INVALID_REQUEST, str(e), param=param)
        for i, r in enumerate(requests):
            rs.add((n, i), r)
        return _Line(n, custom_id, req, [None] * len(requests), len(requests))

    def _requests(
        self, rs: RequestStream, req: CompletionRequest | ChatCompletionRequest
    ) -> list[Any]:
        """The line's engine requests, validated and tokenized (ValueError, as the server's
        400); nothing starts yet."""
        if isinstance(req, CompletionRequest):
            prompts, params = completion_inputs(req, self.max_model_len, self.sampling_defaults)
            names = (
                ["prompt"] if len(prompts) == 1 else [f"prompt {i}" for i in range(len(prompts))]
            )
        else:
            conversation, params = chat_inputs(req, self.max_model_len, self.sampling_defaults)
            prompts, names = [self._chat_prompt(conversation, req.template_options())], ["messages"]
        requests = []
        for prompt, name in zip(prompts, names):
            r = rs.request(prompt, params, name=name)
            check_context_length(req, len(r.prompt_token_ids), self.max_model_len)
            requests.append(r)
        return requests

    def _chat_prompt(
        self, conversation: list[dict[str, str]], options: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            return self.llm.inputs.chat_prompt(conversation, **options)
        except ValueError as e:  # the template's own errors too
            raise ValueError(f"the chat template failed: {e}") from None

    def _finish(self, line: _Line) -> Result:
        if line.error is not None:
            return error_result(line.custom_id, line.number, INVALID_REQUEST, line.error, 400)
        req, outputs = line.request, line.outputs
        created = int(time.time())
        if isinstance(req, CompletionRequest):
            resp: Any = completion_response(
                new_id("cmpl-"), req.model, req, outputs, self.decode_token, created
            )
        else:
            resp = chat_response(
                new_id("chatcmpl-"), req.model, req, outputs[0], self.decode_token, created
            )
        usage = resp.usage
        text = success_line(line.custom_id, resp.model_dump(mode="json"))
        return Result(
            line.number, line.custom_id, text, True, usage.prompt_tokens, usage.completion_tokens
        )
