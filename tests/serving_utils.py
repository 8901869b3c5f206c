"""Helpers of the serving tests: `minivllm serve` in a subprocess (vLLM's RemoteOpenAIServer
pattern), engine arguments matching `make_llm`'s, and finders of the text cases the streaming
tests need (a stop string across a token boundary, a multi-byte character split across tokens)
in a greedy output, so no case is hard-coded to one checkpoint's weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from engine_fixtures import have_cpp_scheduler

SCHEDULER = "cpp" if have_cpp_scheduler() else "python"
# make_llm's engine: the offline oracle (tiny_llm) and the servers run the same configuration.
ENGINE_ARGS: dict[str, Any] = {
    "device": "cpu", "scheduler": SCHEDULER, "max_model_len": 512, "max_num_seqs": 16,
    "max_num_batched_tokens": 512,
}  # fmt: skip
MODEL_NAME = "tiny"


def engine_cli_args(**overrides: Any) -> list[str]:
    args = []
    for name, value in {**ENGINE_ARGS, **overrides}.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minivllm_command(*args: str) -> list[str]:
    # -P: the repository root's kernels/ folder must not shadow the package transformers imports.
    return [sys.executable, "-P", "-m", "minivllm.cli", *args]


class RemoteServer:
    """`minivllm serve MODEL` on 127.0.0.1 and a free port, up once /health answers 200."""

    def __init__(self, model: str | Path, *args: str, startup_timeout_s: float = 120.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile("w+", prefix="minivllm-serve-", suffix=".log")  # noqa: SIM115
        cmd = minivllm_command(
            "serve", str(model), "--port", str(self.port), "--served-model-name", MODEL_NAME,
            *args,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not come up in {timeout_s} s:\n{self.log()}")

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def openai_kwargs(self, api_key: str = "EMPTY") -> dict[str, Any]:
        return {
            "base_url": f"{self.base_url}/v1", "api_key": api_key, "max_retries": 0,
            "timeout": 60.0,
        }  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics by name."""
        out = {}
        for line in httpx.get(self.url("/metrics"), timeout=10.0).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_metric(self, name: str, value: float, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (got := self.metrics()[name]) != value:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} is {got}, not {value}, after {timeout_s} s")
            time.sleep(0.02)

    def wait_all_blocks_free(self, timeout_s: float = 30.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and every KV block is free."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            idle = m["minivllm:num_requests_running"] == 0 and (
                m["minivllm:num_requests_waiting"] == 0
            )
            if idle and m["minivllm:num_free_kv_blocks"] == m["minivllm:num_kv_blocks"]:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"KV blocks still in use after {timeout_s} s: {m}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ---- text cases in greedy outputs --------------------------------------------------------------


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (the demo tokenizer's): character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_level_table()


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece in tokenizer.all_special_tokens:
        return b""
    return bytes(_BYTES[ch] for ch in piece)


def split_multibyte_char(tokenizer: Any, token_ids: list[int]) -> str | None:
    """A multi-byte UTF-8 character whose bytes come from two or more tokens, if any."""
    pieces = [token_bytes(tokenizer, t) for t in token_ids]
    boundaries, pos = set(), 0
    for p in pieces:
        pos += len(p)
        boundaries.add(pos)
    data = b"".join(pieces)
    i = 0
    while i < len(data):
        lead = data[i]
        size = (
            2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if lead >= 0xF0 else 1
        )
        if size > 1 and lead <= 0xF4:
            try:
                char = data[i : i + size].decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                if any(i < b < i + size for b in boundaries):
                    return char
                i += size
                continue
        i += 1
    return None


def boundary_stop(tokenizer: Any, token_ids: list[int], text: str) -> str | None:
    """A 4-character stop string of printable ASCII whose first half ends one token's text and
    whose second half starts the next token's, occurring first there; None if there is none."""
    for k in range(2, len(token_ids) - 1):
        head = tokenizer.decode(token_ids[:k])
        pos = len(head)
        if not text.startswith(head) or pos < 2 or pos + 2 > len(text):
            continue
        stop = text[pos - 2 : pos + 2]
        if (
            all(c.isascii() and c.isprintable() for c in stop)
            and text.find(stop) == pos - 2
            and tokenizer.decode(token_ids[: k + 1]).startswith(text[: pos + 2])
        ):
            return stop
    return None
