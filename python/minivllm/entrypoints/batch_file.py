"""OpenAI batch files: the input lines, the output lines, and resuming a run from its output.

Input: one JSON object per line, `{"custom_id", "method": "POST", "url", "body"}`, with `url`
`/v1/completions` or `/v1/chat/completions` and `body` that endpoint's request. Blank lines
are skipped. Output: one line per input line, in the order requests finish (match them by
`custom_id`, as with OpenAI's batch API):

    {"id": "batch_req_...", "custom_id": "...",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A line that fails gets an `error` object `{"code", "message", "line"}` (`line`: its 1-based
line number in the input); when its body reached request validation, `response` also holds the
status code and the error body the HTTP server would have answered.

Resuming: the output file is appended to, one whole line per finished request, flushed as it is
written. Opening it again reads which requests are done and cuts a torn last line (a crash
mid-write), so a rerun skips what is done and never writes a line twice. A line's key is its
`custom_id`; lines that own no custom_id (not JSON, no usable custom_id, a custom_id seen
earlier in the file) are keyed by their line number instead. Memory grows with the number of
lines only through these keys (the custom_ids of the input and of the output), never with their
size.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from minivllm.entrypoints.responses import error_body

logger = logging.getLogger(__name__)

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
URLS = (COMPLETIONS_URL, CHAT_URL)

# Error codes of lines that own no custom_id: their key is their line number.
INVALID_JSON = "invalid_json"
INVALID_CUSTOM_ID = "invalid_custom_id"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
_KEYLESS = (INVALID_JSON, INVALID_CUSTOM_ID, DUPLICATE_CUSTOM_ID)

Key = str | int  # a custom_id, or the line number of a line that owns none


class InputLine(NamedTuple):
    number: int  # 1-based, counting every line of the file
    text: str
    obj: dict[str, Any] | None = None  # the parsed line, when the reader parsed it already


class Result(NamedTuple):
    """One output line, the input line it answers, and what it cost."""

    number: int  # the input line
    key: Key
    text: str  # the JSON line, without its newline
    is_ok: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def success_line(custom_id: str, body: dict[str, Any]) -> str:
    return json.dumps(
        {
            "id": new_id("batch_req_"),
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": new_id("req_"), "body": body},
            "error": None,
        }
    )


def error_line(
    custom_id: str | None,
    line: int,
    code: str,
    message: str,
    status: int | None = None,
    param: str | None = None,
) -> str:
    """A failed line. `status`: the HTTP status the server would answer (the response then holds
    its OpenAI error body); None for a line that never became a request."""
    response = None
    if status is not None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = error_body(message, kind, param, code if status != 400 else None)
        response = {"status_code": status, "request_id": new_id("req_"), "body": body}
    return json.dumps(
        {
            "id": new_id("batch_req_"),
            "custom_id": custom_id,
            "response": response,
            "error": {"code": code, "message": message, "line": line},
        }
    )


def error_result(
    custom_id: str,
    line: int,
    code: str,
    message: str,
    status: int | None = None,
    param: str | None = None,
) -> Result:
    return Result(line, custom_id, error_line(custom_id, line, code, message, status, param))


def read_lines(path: str | Path) -> Iterator[InputLine]:
    """The non-blank lines of a file, lazily; a line that is not UTF-8 comes as its repr (which
    is not JSON, so it fails as a bad line instead of stopping the file)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = repr(raw)
            if text.strip():
                yield InputLine(number, text)


def count_lines(path: str | Path) -> int | None:
    """Non-blank lines of a regular file (for the progress bar's total); None otherwise."""
    if not Path(path).is_file():
        return None
    n = 0
    with open(path, "rb") as f:
        for raw in f:
            n += bool(raw.strip())
    return n


def key_of(line: dict[str, Any]) -> Key:
    """The resume key of an output line (ValueError if it is not one of ours)."""
    if not isinstance(line, dict) or "custom_id" not in line or "error" not in line:
        raise ValueError("not a batch output line (needs custom_id and error)")
    error = line["error"]
    if isinstance(error, dict) and error.get("code") in _KEYLESS:
        number = error.get("line")
        if not isinstance(number, int):
            raise ValueError("a keyless error line without its line number")
        return number
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str):
        raise ValueError(f"custom_id {custom_id!r} is not a string")  # noqa: TRY004 - bad file
    return custom_id


class BatchOutput:
    """The output file, opened for appending: the keys already in it, whole lines appended and
    flushed as results come. A key already written is never written again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: set[Key] = set()
        self.num_resumed = 0
        if self.path.exists():
            self._scan()
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def _scan(self) -> None:
        with open(self.path, "rb+") as f:
            end = 0  # the end of the last whole line
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    # A crash mid-write: that request runs again.
                    logger.warning("%s: cutting a torn last line (line %d)", self.path, number)
                    break
                end += len(raw)
                if not raw.strip():
                    continue
                try:
                    key = key_of(json.loads(raw))
                except ValueError as e:  # json.JSONDecodeError is a ValueError
                    raise ValueError(
                        f"{self.path} line {number}: {e}; is this a run-batch output file? "
                        "(refusing to append to it)"
                    ) from None
                self.done.add(key)
            f.truncate(end)
        self.num_resumed = len(self.done)

    def write(self, results: Iterable[Result]) -> list[Result]:
        """Append each result not written yet, then flush; returns those written."""
        written = []
        for r in results:
            if r.key in self.done:
                logger.warning("a second result for %r was dropped", r.key)
                continue
            self._file.write(r.text + "\n")
            self.done.add(r.key)
            written.append(r)
        self._file.flush()
        return written

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BatchOutput:  # noqa: PYI034 - py310 has no typing.Self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def parse_line(line: InputLine) -> dict[str, Any] | Result:
    """The line's JSON object (with a non-empty string custom_id), or the error of a line that
    owns no custom_id."""
    if line.obj is not None:
        return line.obj
    n = line.number
    try:
        obj = json.loads(line.text)
    except ValueError as e:
        return Result(n, n, error_line(None, n, INVALID_JSON, f"not valid JSON: {e}"))
    if not isinstance(obj, dict):
        why = f"not a JSON object (got {type(obj).__name__})"
        return Result(n, n, error_line(None, n, INVALID_JSON, why))
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        why = f"custom_id must be a non-empty string, got {custom_id!r}"
        return Result(n, n, error_line(None, n, INVALID_CUSTOM_ID, why))
    return obj


def pending_lines(
    lines: Iterable[InputLine], done: set[Key], write: Callable[[list[Result]], object]
) -> Iterator[InputLine]:
    """The input lines still to run. Lines that own no custom_id (a duplicate included) are
    answered here, through `write` at once; lines whose key is in `done` are skipped."""
    seen: set[str] = set()
    for line in lines:
        parsed = parse_line(line)
        if isinstance(parsed, dict) and parsed["custom_id"] in seen:
            custom_id = parsed["custom_id"]
            why = f"custom_id {custom_id!r} appears earlier in the file"
            text = error_line(custom_id, line.number, DUPLICATE_CUSTOM_ID, why)
            parsed = Result(line.number, line.number, text)
        if isinstance(parsed, Result):
            if parsed.key not in done:
                write([parsed])
            continue
        seen.add(parsed["custom_id"])
        if parsed["custom_id"] not in done:
            yield InputLine(line.number, line.text, parsed)
