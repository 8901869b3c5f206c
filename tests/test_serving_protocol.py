"""The OpenAI request and response models (entrypoints/protocol.py): what validates, what is
refused with which message, the SamplingParams a request becomes, the responses and logprobs
built from engine outputs; and the server's metrics (entrypoints/metrics.py)."""

from __future__ import annotations

import json
import math

import pytest
from minivllm.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_inputs,
    check_context_length,
    completion_inputs,
    generation_config_defaults,
)
from minivllm.entrypoints.responses import (
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    error_body,
    validation_message,
)
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput
from pydantic import ValidationError

pytestmark = pytest.mark.timeout(30)

USER = [{"role": "user", "content": "hi"}]


def refusal(cls, body: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    return validation_message(info.value)


def test_completion_defaults_are_openai_s():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hello"})
    prompts, sp = completion_inputs(req, 100)
    assert prompts == ["Hello"]
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.n) == (
        16, 1.0, 1.0, 0, 0.0, 1
    )  # fmt: skip
    assert sp.logprobs is None and sp.seed is None and sp.stop is None
    assert not req.stream and not req.include_usage
    # max_tokens: null (vLLM's meaning): up to the end of the context.
    null = CompletionRequest.model_validate({"model": "m", "prompt": "Hello", "max_tokens": None})
    assert completion_inputs(null, 100)[1].max_tokens == 100 and null.max_output_tokens is None


def test_completion_fields_reach_sampling_params():
    req = CompletionRequest.model_validate(
        {
            "model": "m", "prompt": [[1, 2], [3]], "max_tokens": 7, "temperature": 0,
            "top_p": 0.5, "n": 3, "stop": "\n", "seed": 11, "logprobs": 2, "top_k": -1,
            "min_p": 0.1, "ignore_eos": True, "stop_token_ids": [5, 6], "stream": True,
            "stream_options": {"include_usage": True}, "best_of": 3, "user": "me",
            "include_stop_str_in_output": True,
        }
    )  # fmt: skip
    prompts, sp = completion_inputs(req, 100)
    assert prompts == [[1, 2], [3]]
    assert sp.max_tokens == 7 and sp.temperature == 0.0 and sp.top_p == 0.5 and sp.n == 3
    assert sp.stop == "\n" and sp.seed == 11 and sp.logprobs == 2 and sp.top_k == 0
    assert sp.min_p == 0.1 and sp.ignore_eos and sp.stop_token_ids == [5, 6]
    assert sp.include_stop_str_in_output and req.include_usage


@pytest.mark.parametrize(
    "prompt, expected",
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompt_shapes(prompt, expected):
    req = CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert req.prompts == expected


def test_generation_config_defaults_fill_unset_fields(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": 2})
    )
    defaults = generation_config_defaults(tmp_path)
    assert defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    req = CompletionRequest.model_validate({"model": "m", "prompt": "a", "top_p": 0.5})
    _, sp = completion_inputs(req, 100, defaults)
    assert (sp.temperature, sp.top_p, sp.top_k) == (0.6, 0.5, 20)
    assert generation_config_defaults(tmp_path / "missing") == {}


def test_chat_inputs():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "c", "name": "bob"},
            ],
            "logprobs": True, "top_logprobs": 4, "max_tokens": 9, "seed": -1,
        }
    )  # fmt: skip
    conv, sp = chat_inputs(req, max_model_len=100)
    assert conv == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "c", "name": "bob"},
    ]
    assert sp.logprobs == 4 and sp.max_tokens == 9 and sp.seed == 2**64 - 1
    # max_completion_tokens wins over the deprecated max_tokens; neither: the rest of the context.
    both = {"model": "m", "messages": USER, "max_tokens": 9, "max_completion_tokens": 3}
    assert chat_inputs(ChatCompletionRequest.model_validate(both), 100)[1].max_tokens == 3
    bare = ChatCompletionRequest.model_validate({"model": "m", "messages": USER})
    _, sp = chat_inputs(bare, 100)
    assert sp.max_tokens == 100 and sp.logprobs is None
    lp = {"model": "m", "messages": USER, "logprobs": True}
    assert chat_inputs(ChatCompletionRequest.model_validate(lp), 100)[1].logprobs == 0


def test_check_context_length():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "a", "max_tokens": 10})
    check_context_length(req, 90, 100)
    with pytest.raises(ValueError, match=r"maximum context length is 100 .* 101 were requested"):
        check_context_length(req, 91, 100)
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": USER})
    check_context_length(chat, 99, 100)  # no budget asked: the completion takes what is left


# (endpoint, body, fragment of the message, param)
# fmt: off
BAD_BODIES = [
    ("cmpl", {"prompt": "a"}, "model: Field required", "model"),
    ("cmpl", {"model": "m"}, "prompt: Field required", "prompt"),
    ("cmpl", {"model": "m", "prompt": 5}, "prompt: must be a string", "prompt"),
    ("cmpl", {"model": "m", "prompt": [1, "a"]}, "prompt: must be a string", "prompt"),
    ("cmpl", {"model": "m", "prompt": [-1]}, "prompt: must be", "prompt"),
    ("cmpl", {"model": "m", "prompt": []}, "prompt is empty", None),
    ("cmpl", {"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens: Input should be greater", "max_tokens"),
    ("cmpl", {"model": "m", "prompt": "a", "max_tokens": "5"}, "max_tokens: Input should be a valid integer", "max_tokens"),
    ("cmpl", {"model": "m", "prompt": "a", "temperature": 2.5}, "temperature: Input should be less", "temperature"),
    ("cmpl", {"model": "m", "prompt": "a", "temperature": True}, "temperature: Input should be a valid number", "temperature"),
    ("cmpl", {"model": "m", "prompt": "a", "top_p": 0}, "top_p: Input should be greater than 0", "top_p"),
    ("cmpl", {"model": "m", "prompt": "a", "n": 0}, "n: Input should be greater", "n"),
    ("cmpl", {"model": "m", "prompt": "a", "logprobs": 6}, "logprobs: Input should be less than or equal to 5", "logprobs"),
    ("cmpl", {"model": "m", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop", "stop"),
    ("cmpl", {"model": "m", "prompt": "a", "stop": [""]}, "non-empty", "stop"),
    ("cmpl", {"model": "m", "prompt": "a", "echo": True}, "echo is not supported", None),
    ("cmpl", {"model": "m", "prompt": "a", "best_of": 2}, "best_of is not supported", None),
    ("cmpl", {"model": "m", "prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty is not supported", None),
    ("cmpl", {"model": "m", "prompt": "a", "logit_bias": {"5": 1}}, "logit_bias is not supported", None),
    ("cmpl", {"model": "m", "prompt": "a", "max_token": 5}, "max_token: unknown field", "max_token"),
    ("cmpl", {"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}, "only allowed when stream is true", None),
    ("cmpl", {"model": "m", "prompt": "a", "stop_token_ids": [-3]}, "stop_token_ids.0", "stop_token_ids.0"),
    ("cmpl", {"model": "m", "prompt": "a", "top_k": -2}, "top_k: Input should be greater", "top_k"),
    ("chat", {"model": "m"}, "messages: Field required", "messages"),
    ("chat", {"model": "m", "messages": []}, "at least 1 item", "messages"),
    ("chat", {"model": "m", "messages": [{"role": "user"}]}, "content: Field required", None),
    ("chat", {"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "does not match any of the expected tags", None),
    ("chat", {"model": "m", "messages": [{"content": "x"}]}, "Unable to extract tag using discriminator 'role'", None),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "'image_url' is not supported", None),
    ("chat", {"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "tool messages are not supported", None),
    ("chat", {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "must not be the assistant's", None),
    ("chat", {"model": "m", "messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True}, "cannot both be true", None),
    ("chat", {"model": "m", "messages": USER, "continue_final_message": True, "add_generation_prompt": False}, "needs the last message to be the assistant's", None),
    ("chat", {"model": "m", "messages": USER, "chat_template_kwargs": {"tokenize": True, "x": 1}}, "may not set tokenize", None),
    ("chat", {"model": "m", "messages": USER, "chat_template_kwargs": []}, "chat_template_kwargs: Input should be a valid dictionary", "chat_template_kwargs"),
    ("chat", {"model": "m", "messages": USER, "top_logprobs": 2}, "top_logprobs needs logprobs", None),
    ("chat", {"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 21}, "less than or equal to 20", "top_logprobs"),
    ("chat", {"model": "m", "messages": USER, "tools": [{"type": "function"}]}, "tools is not supported", None),
    ("chat", {"model": "m", "messages": USER, "response_format": {"type": "json_object"}}, "response_format", None),
    ("chat", {"model": "m", "messages": USER, "max_completion_tokens": -1}, "max_completion_tokens: Input should be greater", "max_completion_tokens"),
    ("chat", {"model": "m", "messages": "hi"}, "messages: Input should be a valid list", "messages"),
]
# fmt: on


@pytest.mark.parametrize("endpoint, body, fragment, param", BAD_BODIES)
def test_bad_bodies_are_refused_with_a_message(endpoint, body, fragment, param):
    cls = CompletionRequest if endpoint == "cmpl" else ChatCompletionRequest
    message, got_param = refusal(cls, body)
    assert fragment in message
    if param is not None:
        assert got_param == param


def test_invalid_json_is_a_validation_error():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json(b'{"model": "m", ')
    message, _ = validation_message(info.value)
    assert message.startswith("the body is not valid JSON")


def test_error_body_shape():
    assert error_body("bad", param="n") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }


# ---- responses ---------------------------------------------------------------------------------

TEXTS = {5: "He", 6: "llo", 7: " world", 8: "!"}


def decode(token_id: int) -> str:
    return TEXTS[token_id]


def lp(value: float, rank: int, token_id: int | None = None) -> Logprob:
    return Logprob(value, rank, TEXTS[token_id] if token_id is not None else None)


def fake_output(n: int = 1, prompt_len: int = 3, with_logprobs: bool = True) -> RequestOutput:
    outputs = []
    for i in range(n):
        logprobs = None
        if with_logprobs:
            logprobs = [
                {5: lp(-0.1, 1, 5), 7: lp(-2.5, 2, 7)},
                {6: lp(-1.0, 2), 8: lp(-0.5, 1, 8), 7: lp(-3.0, 3, 7)},  # sampled is rank 2
                {8: lp(-math.inf, 512, 8), 5: lp(-0.01, 1, 5)},  # a ruled-out token
            ]
        outputs.append(
            CompletionOutput(
                index=i, text="Hello!", token_ids=[5, 6, 8], finish_reason="length",
                logprobs=logprobs,
            )
        )  # fmt: skip
    return RequestOutput("r", None, list(range(prompt_len)), outputs)


def test_completion_response_with_logprobs():
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": [[1], [2]], "n": 2, "logprobs": 1}
    )
    resp = completion_response("cmpl-1", "m", req, [fake_output(2, 3), fake_output(2, 4)], decode)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.usage.model_dump() == {
        "prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19
    }  # fmt: skip
    lps = resp.choices[0].logprobs
    assert lps.tokens == ["He", "llo", "!"]  # decoded_token, or the tokenizer when it is None
    assert lps.token_logprobs == [-0.1, -1.0, -9999.0]
    assert lps.text_offset == [0, 2, 5]
    # The sampled token and the top-1 by text.
    assert lps.top_logprobs == [{"He": -0.1}, {"llo": -1.0, "!": -0.5}, {"!": -9999.0, "He": -0.01}]
    body = json.loads(resp.model_dump_json())
    assert body["object"] == "text_completion" and body["choices"][3]["finish_reason"] == "length"


def test_chat_response_with_logprobs():
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 2}
    )
    resp = chat_response("chatcmpl-1", "m", req, fake_output(1, 5), decode)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello!"
    content = choice.logprobs.content
    assert [t.token for t in content] == ["He", "llo", "!"]
    assert [t.logprob for t in content] == [-0.1, -1.0, -9999.0]
    assert content[0].bytes == list(b"He")
    assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [("!", -0.5), ("llo", -1.0)]
    assert [t.token for t in content[2].top_logprobs] == ["He"]  # rank 512 is not in the top 2
    assert resp.usage.completion_tokens == 3 and resp.usage.prompt_tokens == 5
    # No logprobs asked: none reported, whatever the engine sent.
    plain = ChatCompletionRequest.model_validate({"model": "m", "messages": USER})
    assert chat_response("c", "m", plain, fake_output(), decode).choices[0].logprobs is None


def test_streamed_logprob_offsets_continue():
    entries = [{7: lp(-0.2, 1, 7)}, {8: lp(-0.3, 1, 8)}]
    got = completion_logprobs([7, 8], entries, 0, decode, text_offset=10)
    assert got.text_offset == [10, 16] and got.top_logprobs == [{" world": -0.2}, {"!": -0.3}]
    chat = chat_logprobs([7], entries[:1], 0, decode)
    assert chat.content[0].top_logprobs == []


def test_metrics_histograms_and_counters():
    from minivllm.entrypoints.metrics import ServerMetrics
    from minivllm.outputs import RequestMetrics

    stats = {"num_running": 1, "num_waiting": 2, "num_free_blocks": 6, "num_kv_blocks": 8,
             "prefix_cache_queries": 40, "prefix_cache_hits": 10}  # fmt: skip
    m = ServerMetrics(lambda: stats, 8)
    for gap in (0.001, 0.0011, 7.0):  # on a bound (le: counted there), just above, past all
        m.itl.observe(gap)
    out = fake_output(n=2)
    out.metrics = RequestMetrics(arrival_time=1.0, first_token_time=1.5, finished_time=2.5)
    m.observe_finished(out, [3, 5])
    lines = dict(line.rsplit(" ", 1) for line in m.render().decode().splitlines() if line[0] != "#")
    assert float(lines['minivllm:inter_token_latency_seconds_bucket{le="0.001"}']) == 1
    assert float(lines['minivllm:inter_token_latency_seconds_bucket{le="0.0025"}']) == 2
    assert float(lines['minivllm:inter_token_latency_seconds_bucket{le="5.0"}']) == 2
    assert float(lines['minivllm:inter_token_latency_seconds_bucket{le="+Inf"}']) == 3
    assert float(lines["minivllm:inter_token_latency_seconds_sum"]) == pytest.approx(7.0021)
    assert float(lines["minivllm:time_to_first_token_seconds_sum"]) == 0.5
    assert float(lines["minivllm:time_per_output_token_seconds_sum"]) == 0.25  # 1 s / 4 gaps
    assert float(lines["minivllm:generation_tokens_total"]) == 8
    assert float(lines['minivllm:request_success_total{finished_reason="length"}']) == 2
    assert float(lines["minivllm:kv_cache_usage_perc"]) == 0.25
    assert float(lines["minivllm:prefix_cache_hit_rate"]) == 0.25
    assert float(lines["minivllm:num_requests_waiting"]) == 2
