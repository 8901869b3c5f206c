"""`minivllm serve -tp 2 --async-scheduling` (gloo) on a tiny random checkpoint: the engine process
starts its tensor-parallel worker, its greedy completions equal LLM.generate's, and stopping the
server leaves no process behind."""

from __future__ import annotations

import os
import time

import openai
import pytest
from engine_fixtures import mixed_prompts
from minivllm import SamplingParams
from serving_utils import MODEL_NAME, RemoteServer, engine_cli_args

# Bounded in time, the server's start-up included: a hang fails.
pytestmark = pytest.mark.timeout(240)

GREEDY = {"temperature": 0.0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


def _descendants(pid: int) -> set[int]:
    """The processes below pid, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_tensor_parallel_server_with_async_scheduling(tiny_qwen3, tiny_llm):
    """`serve -tp 2 --async-scheduling` (gloo): the engine process starts its worker, streams
    equal LLM.generate, and stopping the server leaves no process behind."""
    s = RemoteServer(tiny_qwen3, *engine_cli_args(), "-tp", "2", "--async-scheduling")
    try:
        below = _descendants(s.proc.pid)
        assert len(below) >= 2  # the engine process and its tensor-parallel worker
        prompts = mixed_prompts(6, seed=13, min_len=1, max_len=30)
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        want = [o.outputs[0].text for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
        with openai.OpenAI(**s.openai_kwargs()) as c:
            got = [
                c.completions.create(model=MODEL_NAME, prompt=p, **GREEDY).choices[0].text
                for p in prompts
            ]
        assert got == want
        s.wait_all_blocks_free()
    finally:
        s.stop()
    deadline = time.monotonic() + 30
    while [p for p in below if _running(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in below if _running(p)]


def _running(pid: int) -> bool:
    """Whether pid is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
