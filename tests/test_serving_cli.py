"""`minivllm chat` through a pseudo-terminal (two turns, the conversation kept, Ctrl-D exits 0)
and `minivllm complete -q`: what they print equals LLM.chat / LLM.generate's greedy text."""

from __future__ import annotations

import os
import select
import subprocess
import termios
import time

import pytest
from minivllm import SamplingParams
from serving_utils import engine_cli_args, minivllm_command

# Bounded in time, the module's server (or engine) start-up included: a hang fails.
pytestmark = pytest.mark.timeout(240)

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
SAMPLING_ARGS = ["--temperature", "0", "--max-tokens", str(MAX_TOKENS)]


def read_until(fd: int, suffix: bytes, timeout_s: float = 60.0) -> bytes:
    """Read the terminal until what was read ends with `suffix`."""
    buf = b""
    deadline = time.monotonic() + timeout_s
    while not buf.endswith(suffix):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"waited {timeout_s} s for {suffix!r}; read {buf!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the other side closed
            chunk = b""
        if not chunk:
            raise AssertionError(f"the terminal closed before {suffix!r}; read {buf!r}")
        buf += chunk
    return buf


def test_chat_in_a_terminal_and_complete(tiny_qwen3, tiny_llm):
    model = str(tiny_qwen3)
    # `complete -q` runs beside the chat session (each starts an engine of its own).
    complete = subprocess.Popen(
        minivllm_command("complete", model, "-q", "The quick brown", *SAMPLING_ARGS,
                         *engine_cli_args()),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    master, slave = os.openpty()
    # The program's output as written (no CR added before LF), and our input not echoed back;
    # canonical mode stays, so Ctrl-D at the start of a line is end of input.
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    chat = subprocess.Popen(
        minivllm_command("chat", model, "--system-prompt", "Be brief.", *SAMPLING_ARGS,
                         *engine_cli_args()),
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    try:
        conversation = [{"role": "system", "content": "Be brief."}]
        read_until(master, b"> ", timeout_s=120)  # the banner, then the first prompt
        for question in ("Hello there", "Tell me more"):
            conversation.append({"role": "user", "content": question})
            want = tiny_llm.chat(conversation, GREEDY, use_tqdm=False)[0].outputs[0].text
            os.write(master, question.encode() + b"\n")
            answer = read_until(master, f"{want}\n> ".encode())
            assert answer == f"{want}\n> ".encode()
            conversation.append({"role": "assistant", "content": want})
        os.write(master, b"\x04")  # Ctrl-D
        assert chat.wait(60) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait(10)
        os.close(master)
    out, err = complete.communicate(timeout=120)
    assert complete.returncode == 0, err.decode()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    want = tiny_llm.generate("The quick brown", params, use_tqdm=False)[0].outputs[0].text
    assert out.decode() == want + "\n"
