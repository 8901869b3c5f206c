"""`minivllm serve` end to end: a real server subprocess on a tiny random checkpoint, driven with
the official `openai` client (sync and async). What the server returns must equal what
LLM.generate returns for the same prompts (greedy), streamed or not, alone or 32 at once; stop
strings and multi-byte characters that straddle chunks come out whole; bad requests get a 4xx
and leave the server serving. (Killed clients, the API key and a full queue:
test_serving_limits.py; a tensor-parallel server: test_serving_tp.py.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from engine_fixtures import hf_model, mixed_prompts
from minivllm import SamplingParams
from serving_utils import (
    MODEL_NAME,
    RemoteServer,
    boundary_stop,
    engine_cli_args,
    split_multibyte_char,
)

# Bounded in time, the module's server (or engine) start-up included: a hang fails.
pytestmark = pytest.mark.timeout(240)

GREEDY = {"temperature": 0.0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_qwen3):
    s = RemoteServer(tiny_qwen3, *engine_cli_args())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(**server.openai_kwargs()) as c:
        yield c


def offline(llm, prompts, max_tokens=16, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def stream_text(chunks) -> tuple[dict[int, str], dict[int, list[str]], object]:
    """Per choice index: the joined text and every finish_reason seen; and the usage."""
    texts: dict[int, str] = {}
    reasons: dict[int, list[str]] = {}
    usage = None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons.setdefault(c.index, []).append(c.finish_reason)
    return texts, reasons, usage


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server.url("/health")).status_code == 200
    m = server.metrics()
    assert m["minivllm:num_kv_blocks"] > 0 and "minivllm:kv_cache_usage_perc" in m


def test_completion_streamed_and_not(server, client, tiny_llm):
    prompt = "The quick brown fox"
    (want,) = offline(tiny_llm, [prompt])
    num_prompt = len(tiny_llm.tokenizer.encode(prompt))
    before = server.metrics()

    resp = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
    assert resp.object == "text_completion" and resp.model == MODEL_NAME
    assert resp.choices[0].text == want.text and resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (num_prompt, 16)
    assert resp.usage.total_tokens == num_prompt + 16

    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=prompt, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    texts, reasons, usage = stream_text(chunks)
    assert texts == {0: want.text} and reasons == {0: ["length"]}
    assert chunks[-1].choices == [] and chunks[-1].usage == resp.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.completion_tokens == 16

    after = server.metrics()
    for name, grew in (
        ("generation_tokens_total", 32),
        ("prompt_tokens_total", 2 * num_prompt),
        ("time_to_first_token_seconds_count", 2),
        ("e2e_request_latency_seconds_count", 2),
    ):
        assert after[f"minivllm:{name}"] - before[f"minivllm:{name}"] == grew, name
    # One gap per output of the stream after its first: up to 15 (outputs that queued up
    # behind a busy event loop arrive merged).
    gaps = after["minivllm:inter_token_latency_seconds_count"]
    assert 1 <= gaps - before["minivllm:inter_token_latency_seconds_count"] <= 15


def test_chat_streamed_and_not_async(server, tiny_llm):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = tiny_llm.chat(messages, params, use_tqdm=False)[0]

    async def main():
        async with openai.AsyncOpenAI(**server.openai_kwargs()) as ac:
            kw = {"model": MODEL_NAME, "messages": messages, "temperature": 0,
                  "max_completion_tokens": 12, "extra_body": {"ignore_eos": True}}  # fmt: skip
            resp = await ac.chat.completions.create(**kw)
            stream = await ac.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw
            )
            return resp, [c async for c in stream]

    resp, chunks = asyncio.run(main())
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == want.outputs[0].text and choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == 12
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    texts, reasons, usage = stream_text(chunks)
    assert texts == {0: want.outputs[0].text} and reasons == {0: ["length"]}
    assert usage == resp.usage


def test_chat_template_options_as_llm_chat(server, client, tiny_llm):
    """vLLM's chat template fields: the prompt LLM.chat renders with the same arguments."""
    user = [{"role": "user", "content": "Hi"}]
    started = [*user, {"role": "assistant", "content": "Hello the"}]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    no_prompt = {"add_generation_prompt": False}
    cont = {**no_prompt, "continue_final_message": True}
    thinking = {"enable_thinking": False}
    # (messages, the request's fields, LLM.chat's arguments)
    cases = [(user, no_prompt, no_prompt), (started, cont, cont),
             (user, {"chat_template_kwargs": thinking}, thinking)]  # fmt: skip
    default = tiny_llm.chat(user, params, use_tqdm=False)[0].prompt_token_ids
    for i, (messages, fields, kwargs) in enumerate(cases):
        want = tiny_llm.chat(messages, params, use_tqdm=False, **kwargs)[0]
        assert (want.prompt_token_ids != default) == (i < 2)  # the options changed the prompt
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=messages, temperature=0, max_completion_tokens=4,
            extra_body={"ignore_eos": True, **fields},
        )  # fmt: skip
        assert resp.usage.prompt_tokens == len(want.prompt_token_ids), fields
        assert resp.choices[0].message.content == want.outputs[0].text


def test_32_concurrent_greedy_streams_equal_offline(server, tiny_llm):
    prompts = mixed_prompts(32, seed=11, min_len=1, max_len=40)
    lengths = [4 + (7 * i) % 21 for i in range(32)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    want = [o.outputs[0].text for o in tiny_llm.generate(prompts, params, use_tqdm=False)]

    async def one(ac, prompt, n):
        stream = await ac.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        texts, reasons, _ = stream_text([c async for c in stream])
        return texts[0], reasons[0]

    async def main():
        async with openai.AsyncOpenAI(**server.openai_kwargs()) as ac:
            return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lengths)))

    got = asyncio.run(main())
    assert [text for text, _ in got] == want
    assert all(reasons == ["length"] for _, reasons in got)
    server.wait_all_blocks_free()


def test_stop_strings_across_chunk_boundaries(server, client, tiny_llm):
    tok = tiny_llm.tokenizer
    prompts = mixed_prompts(12, seed=5)
    cases = []
    for prompt, out in zip(prompts, offline(tiny_llm, prompts, max_tokens=20)):
        stop = boundary_stop(tok, out.token_ids, out.text)
        if stop is not None:
            cases.append((prompt, stop))
    assert len(cases) >= 2, "too few greedy outputs with a stop string across a token boundary"
    for prompt, stop in cases[:3]:
        (want,) = offline(tiny_llm, [prompt], max_tokens=20, stop=[stop, "never seen"])
        assert want.finish_reason == "stop"
        kw = {"model": MODEL_NAME, "prompt": prompt, "temperature": 0, "max_tokens": 20,
              "stop": [stop, "never seen"], "extra_body": {"ignore_eos": True}}  # fmt: skip
        resp = client.completions.create(**kw)
        assert resp.choices[0].text == want.text and resp.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(stream=True, **kw))
        texts, reasons, _ = stream_text(chunks)
        assert texts == {0: want.text} and reasons == {0: ["stop"]}
        assert all(stop not in c.choices[0].text for c in chunks if c.choices)


def test_multibyte_character_split_across_tokens(server, client, tiny_llm):
    """A greedy continuation with a UTF-8 character whose bytes come from two tokens: streamed,
    it arrives whole (never as U+FFFD halves), and the text equals LLM.generate's."""
    tok = tiny_llm.tokenizer
    prompts = mixed_prompts(24, seed=7, min_len=4, max_len=24)
    outs = offline(tiny_llm, prompts, max_tokens=24)
    cases = [
        (p, o.text, ch)
        for p, o in zip(prompts, outs)
        if (ch := split_multibyte_char(tok, o.token_ids)) is not None
    ]
    assert cases, "no greedy output splits a multi-byte character across tokens"
    for prompt, text, char in cases[:2]:
        assert char in text
        chunks = list(
            client.completions.create(
                model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=24, stream=True,
                extra_body={"ignore_eos": True},
            )
        )  # fmt: skip
        texts, _, _ = stream_text(chunks)
        assert texts[0] == text
        assert any(char in c.choices[0].text for c in chunks if c.choices)


def test_n_completions_with_a_seed(server, client):
    kw = {"model": MODEL_NAME, "prompt": "Once upon a time", "n": 3, "seed": 1234,
          "temperature": 1.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}  # fmt: skip
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3  # seed + i per completion: three different draws
    assert [c.text for c in again.choices] == texts  # and the same three again
    assert first.usage.completion_tokens == 36
    streamed, reasons, _ = stream_text(client.completions.create(stream=True, **kw))
    assert streamed == dict(enumerate(texts))
    assert reasons == {i: ["length"] for i in range(3)}
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != texts


def test_token_id_prompts_and_several_prompts(server, client, tiny_llm):
    prompts = mixed_prompts(2, seed=13)
    want = [o.text for o in offline(tiny_llm, prompts, max_tokens=8)]
    resp = client.completions.create(
        model=MODEL_NAME, prompt=prompts, n=2, temperature=0, max_tokens=8,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    # Prompt i's completion j is choice i * n + j.
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [want[0], want[0], want[1], want[1]]
    assert resp.usage.prompt_tokens == sum(map(len, prompts))
    chunks = client.completions.create(
        model=MODEL_NAME, prompt=prompts, n=2, temperature=0, max_tokens=8, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts, reasons, _ = stream_text(chunks)
    assert texts == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}
    assert all(r == ["length"] for r in reasons.values()) and len(reasons) == 4


def hf_logprobs(path, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits at each completion position."""
    ids = torch.tensor([prompt + completion])
    with torch.inference_mode():
        logits = hf_model(str(path))(ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def test_logprobs_equal_transformers(server, client, tiny_qwen3, tiny_llm):
    prompt = mixed_prompts(1, seed=17, min_len=6)[0]
    (want,) = offline(tiny_llm, [prompt], max_tokens=6)
    ref = hf_logprobs(tiny_qwen3, prompt, want.token_ids)
    top_values = ref.topk(3, dim=-1).values

    resp = client.completions.create(
        model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=6, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = resp.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == 6
    sampled = ref[torch.arange(6), torch.tensor(want.token_ids)]
    assert torch.allclose(torch.tensor(lp.token_logprobs), sampled, atol=1e-4)
    for pos, top in enumerate(lp.top_logprobs):
        # The sampled token (greedy: the top one) and the top 3 (fewer keys if texts collide).
        values = sorted(top.values(), reverse=True)
        assert torch.allclose(torch.tensor(values), top_values[pos][: len(values)], atol=1e-4)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == resp.choices[0].text

    # Chat: each token's logprob and the top 3 in rank order.
    messages = [{"role": "user", "content": "Hello there"}]
    chat_want = tiny_llm.chat(
        messages, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )[0]
    ref = hf_logprobs(tiny_qwen3, chat_want.prompt_token_ids, chat_want.outputs[0].token_ids)
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_completion_tokens=5,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    ids = torch.tensor(chat_want.outputs[0].token_ids)
    assert torch.allclose(
        torch.tensor([t.logprob for t in content]), ref[torch.arange(5), ids], atol=1e-4
    )
    for pos, t in enumerate(content):
        got = torch.tensor([x.logprob for x in t.top_logprobs])
        assert torch.allclose(got, ref[pos].topk(3).values, atol=1e-4)
    # Streamed: the same values, chunk by chunk.
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_completion_tokens=5,
        logprobs=True, top_logprobs=3, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    streamed = [t.logprob for c in stream for ch in c.choices if ch.logprobs
                for t in ch.logprobs.content]  # fmt: skip
    # The second request hits the prefix cache the first filled: the same values to rounding.
    assert streamed == pytest.approx([t.logprob for t in content], abs=1e-5)


LONG = [5] * 600  # longer than max_model_len=512
USER = [{"role": "user", "content": "hi"}]
# (path, raw body or JSON value, expected status, fragment of the message)
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"", 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "object"),
    ("/v1/completions", {"prompt": "a"}, 400, "model: Field required"),
    ("/v1/completions", {"model": MODEL_NAME}, 400, "prompt: Field required"),
    ("/v1/completions", {"model": "gpt-5", "prompt": "a"}, 404, "does not exist"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": LONG}, 400, "max_model_len=512"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [600]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [[1], []]}, 400, "empty"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 600}, 400,
     "maximum context length is 512"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": -1}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "n": 0}, 400, "n: "),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "stop": ["a"] * 5}, 400,
     "at most 4"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "bogus": 1}, 400, "unknown field"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": LONG, "stream": True}, 400,
     "max_model_len"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "stream": True, "top_p": 7}, 400,
     "top_p"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400, "at least 1"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user"}]}, 400,
     "content: Field required"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "x", "content": "y"}]},
     400, "does not match"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "logprobs": True,
     "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "top_logprobs": 2}, 400,
     "needs logprobs"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "tools": [{}]}, 400,
     "tools"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "stream": True,
     "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "max_model_len"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "max_tokens": 510}, 400,
     "maximum context length"),
    ("/v1/nothing", {}, 404, "Not Found"),
]  # fmt: skip


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, tiny_llm):
    with httpx.Client(timeout=30.0) as http:
        for path, body, status, fragment in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(server.url(path), content=content,
                          headers={"Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == status, (path, body, r.text)
            # JSON even for stream=true: refused before any stream opens.
            assert r.headers["content-type"].startswith("application/json"), r.headers
            error = r.json()["error"]
            assert fragment in error["message"], (body, error)
            assert set(error) == {"message", "type", "param", "code"}
        assert http.get(server.url("/v1/completions")).status_code == 405
    # The openai client sees them as its usual exceptions.
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model=MODEL_NAME, prompt=LONG)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")
    (want,) = offline(tiny_llm, ["Still there?"])
    resp = client.completions.create(model=MODEL_NAME, prompt="Still there?", **GREEDY)
    assert resp.choices[0].text == want.text
    server.wait_all_blocks_free()
