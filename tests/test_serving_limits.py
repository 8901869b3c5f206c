"""`minivllm serve` at its limits, on a server with an API key, room for two running requests
and none waiting, and a context long enough for requests that outlast their clients: the Bearer
check, 503 when the queue is full (before any stream opens), and clients killed mid-request
(SIGKILL) whose requests are aborted, every KV block back in the pool."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import openai
import pytest
from serving_utils import MODEL_NAME, RemoteServer, engine_cli_args

# Bounded in time, the module's server (or engine) start-up included: a hang fails.
pytestmark = pytest.mark.timeout(240)

API_KEY = "sk-test-123"
LONG_TOKENS = 2000  # far more steps than a client needs to be killed


@pytest.fixture(scope="module")
def server(tiny_qwen3):
    args = engine_cli_args(max_model_len=2048, max_num_seqs=2, max_num_batched_tokens=2048)
    s = RemoteServer(tiny_qwen3, *args, "--api-key", API_KEY, "--max-waiting-requests", "0")
    yield s
    s.stop()


def long_body(stream: bool) -> dict:
    return {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": LONG_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": stream}  # fmt: skip


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_api_key(server):
    with httpx.Client(timeout=30.0) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = http.get(server.url("/v1/models"), headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            r = http.post(server.url("/v1/completions"), headers=headers, json={})
            assert r.status_code == 401
        # Health and metrics stay open, as in vLLM.
        assert http.get(server.url("/health")).status_code == 200
        assert http.get(server.url("/metrics")).status_code == 200
    with (
        openai.OpenAI(**server.openai_kwargs("wrong")) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()
    with openai.OpenAI(**server.openai_kwargs(API_KEY)) as good:
        assert [m.id for m in good.models.list().data] == [MODEL_NAME]
        resp = good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3)
        assert resp.usage.completion_tokens <= 3


def test_a_full_queue_is_refused_with_503(server):
    """Two running requests fill the engine (max_num_seqs=2, no waiting room): a third is
    refused at once, streamed or not; once they end, the next one is served."""
    with httpx.Client(timeout=60.0, headers=AUTH) as http:
        url = server.url("/v1/completions")
        with (
            http.stream("POST", url, json=long_body(True)) as a,
            http.stream("POST", url, json=long_body(True)) as b,
        ):
            # Keep the line iterators: dropping one closes its connection (an abort).
            lines = [r.iter_lines() for r in (a, b)]
            for r, it in zip((a, b), lines):
                assert r.status_code == 200
                assert next(it).startswith("data: ")
            for stream in (False, True):
                r = http.post(url, json={**long_body(stream), "max_tokens": 4})
                assert r.status_code == 503, r.text
                assert r.headers["content-type"].startswith("application/json")
                error = r.json()["error"]
                assert error["code"] == "engine_overloaded" and "try again" in error["message"]
        # Leaving the two streams aborted their requests.
        server.wait_all_blocks_free()
        r = http.post(url, json={**long_body(False), "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# A client that imports first and sends on "go", so the kill follows the request closely.
CLIENT = """
import sys, time, httpx
url, body, stream, key = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
print("ready", flush=True)
sys.stdin.readline()
if stream:
    with httpx.stream("POST", url, content=body, headers=headers, timeout=120) as r:
        lines = r.iter_lines()  # kept: dropping it would close the connection
        for line in lines:
            if line.startswith("data:"):
                print("streaming", flush=True)
                break
        time.sleep(120)
else:
    httpx.post(url, content=body, headers=headers, timeout=120)
"""


def test_killed_clients_free_their_blocks(server):
    """A client killed mid-stream, and one killed while it waits for a non-streamed answer:
    both requests are aborted (not run to their end) and every KV block returns."""
    server.wait_all_blocks_free()
    before = server.metrics()
    log_before = server.log().count("aborted (")
    procs = []
    try:
        for stream in (True, False):
            p = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(CLIENT), server.url("/v1/completions"),
                 json.dumps(long_body(stream)), "1" if stream else "0", API_KEY],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(p)
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        streaming, waiting = procs
        streaming.stdin.write("go\n")
        streaming.stdin.flush()
        assert streaming.stdout.readline().strip() == "streaming"
        waiting.stdin.write("go\n")
        waiting.stdin.flush()
        server.wait_metric("minivllm:num_requests_running", 2)  # both in the engine
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            p.stdin.close()
            p.stdout.close()
    after = server.wait_all_blocks_free()
    # Neither ran to its end: no finished request was counted, both were logged as aborted.
    assert after["minivllm:generation_tokens_total"] == before["minivllm:generation_tokens_total"]
    assert server.log().count("aborted (") - log_before == 2


def test_a_request_with_more_prompts_than_the_engine_takes(server):
    """Room for two requests (max_num_seqs=2, none waiting): a call with two prompts runs both,
    one with three is a 400 at once, streamed or not (never a stream that fails after its 200;
    it could never fit, so not a 503 to retry); nothing is left behind."""
    server.wait_all_blocks_free()
    with httpx.Client(timeout=60.0, headers=AUTH) as http:
        url = server.url("/v1/completions")
        body = {"model": MODEL_NAME, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        r = http.post(url, json={**body, "prompt": ["a", "b"]})
        assert r.status_code == 200, r.text
        assert sorted(c["index"] for c in r.json()["choices"]) == [0, 1]
        for stream in (False, True):
            r = http.post(url, json={**body, "prompt": ["a", "b", "c"], "stream": stream})
            assert r.status_code == 400, r.text
            assert r.headers["content-type"].startswith("application/json")
            error = r.json()["error"]
            assert "3 prompts in one request" in error["message"], error
            assert error["param"] == "prompt"
    server.wait_all_blocks_free()


# Values the request schema lets through but SamplingParams refuses (beyond int32 / int64, a
# top_p that is 0 as a float32), and a bad prompt among several: a 400 naming the field.
# fmt: off
REFUSED = [
    ("/v1/completions", {"prompt": "a", "top_k": 2**31}, "top_k must be in", "top_k"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2**70}, "max_tokens must be", "max_tokens"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [2**31]}, "stop_token_ids must be",
     "stop_token_ids"),
    ("/v1/completions", {"prompt": "a", "top_p": 1e-50, "stream": True}, "nonzero as a float32",
     "top_p"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [600]}, "outside the vocabulary",
     "stop_token_ids"),
    ("/v1/completions", {"prompt": ["ok", ""]}, "prompt 1 is empty", "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
     "max_completion_tokens": 2**70}, "max_tokens must be", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": 2**31,
     "stream": True}, "top_k must be in", "top_k"),
]
# fmt: on


@pytest.mark.parametrize("path, body, fragment, param", REFUSED)
def test_values_sampling_params_refuses_are_400_naming_the_field(
    server, path, body, fragment, param
):
    with httpx.Client(timeout=30.0, headers=AUTH) as http:
        r = http.post(server.url(path), json={"model": MODEL_NAME, **body})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param, error


def test_a_huge_prompt_does_not_stall_the_server(server):
    """A 4.8 MB prompt takes seconds to tokenize (then a 400: far past max_model_len); that runs
    off the event loop, so /health keeps answering within a second meanwhile (it waited for the
    whole tokenization, ~3 s, when the server tokenized on the loop)."""
    body = {"model": MODEL_NAME, "prompt": "hello world " * 400_000, "max_tokens": 1}
    result = {}

    def send() -> None:
        r = httpx.post(server.url("/v1/completions"), json=body, headers=AUTH, timeout=120.0)
        result["status"], result["error"] = r.status_code, r.json()["error"]["message"]

    sender = threading.Thread(target=send)
    sender.start()
    worst = 0.0
    with httpx.Client(timeout=60.0) as http:
        while sender.is_alive():
            t0 = time.perf_counter()
            assert http.get(server.url("/health")).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.05)
    sender.join()
    assert result["status"] == 400 and "max_model_len" in result["error"], result
    assert worst < 1.0, worst
