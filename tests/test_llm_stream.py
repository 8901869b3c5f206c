"""LLM.stream and RequestStream: requests fed as others finish, outputs as each finishes."""

from __future__ import annotations

import pytest
from engine_fixtures import assert_all_blocks_free, mixed_prompts
from minivllm import SamplingParams

pytestmark = pytest.mark.timeout(120)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_stream_equals_generate(tiny_llm):
    prompts = mixed_prompts(16, seed=5)
    params = [
        SamplingParams(temperature=0.0, max_tokens=2 + i % 5, ignore_eos=True, n=1 + i % 2)
        for i in range(len(prompts))
    ]
    expected = tiny_llm.generate(prompts, params, use_tqdm=False)
    got = dict(
        tiny_llm.stream(
            ((i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))), max_in_flight=5
        )
    )
    assert sorted(got) == list(range(len(prompts)))
    for i, exp in enumerate(expected):
        assert [c.token_ids for c in got[i].outputs] == [c.token_ids for c in exp.outputs]
        assert [c.text for c in got[i].outputs] == [c.text for c in exp.outputs]
        assert got[i].finished
    assert_all_blocks_free(tiny_llm)


def test_stream_reads_lazily(tiny_llm):
    """Never more than max_in_flight requests drawn and unfinished."""
    drawn = 0
    done = 0

    def items():
        nonlocal drawn
        for i, p in enumerate(mixed_prompts(12, seed=2, max_len=12)):
            assert drawn - done < 3
            drawn += 1
            yield i, p, GREEDY

    for _ in tiny_llm.stream(items(), max_in_flight=3):
        done += 1
    assert drawn == done == 12


def test_stream_yields_bad_prompts_and_goes_on(tiny_llm):
    items = [
        ("empty", [], GREEDY),
        ("ok", [5, 6, 7], GREEDY),
        ("vocab", [10**6], GREEDY),
        ("params", [5], "not params"),
        ("too long", [7] * 512, GREEDY),
    ]
    got = dict(tiny_llm.stream(items))
    assert len(got["ok"].outputs[0].token_ids) == GREEDY.max_tokens
    assert "prompt 'empty' is empty" in str(got["empty"])
    assert "outside the vocabulary" in str(got["vocab"])
    assert "not SamplingParams" in str(got["params"])
    assert "max_model_len" in str(got["too long"])
    assert all(isinstance(got[k], ValueError) for k in ("empty", "vocab", "params", "too long"))
    assert_all_blocks_free(tiny_llm)


def test_leaving_a_stream_early_aborts_its_requests(tiny_llm):
    long = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=1)
    prompts = mixed_prompts(10, seed=4)
    gen = tiny_llm.stream((i, p, long if i else short) for i, p in enumerate(prompts))
    assert next(gen)[0] == 0
    gen.close()
    assert_all_blocks_free(tiny_llm)
    assert tiny_llm.generate([[5, 6]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_one_stream_at_a_time(tiny_llm):
    with tiny_llm.open_stream() as rs:
        rs.add("a", rs.request([5, 6, 7], GREEDY))
        with pytest.raises(RuntimeError, match="busy"):
            tiny_llm.open_stream()
        with pytest.raises(RuntimeError, match="RequestStream is open"):
            tiny_llm.generate([[5]], GREEDY, use_tqdm=False)
        finished = []
        while rs.num_unfinished:
            finished += rs.step().finished
        assert [k for k, _ in finished] == ["a"]
    assert_all_blocks_free(tiny_llm)
    with pytest.raises(RuntimeError, match="closed"):
        rs.add("b", rs.request([5], GREEDY))
    assert tiny_llm.generate([[5]], GREEDY, use_tqdm=False)


def test_a_failed_step_closes_the_stream_and_keeps_the_engine(tiny_llm, monkeypatch):
    from engine_fixtures import interrupt_launch

    with monkeypatch.context() as m:
        interrupt_launch(tiny_llm, m, at_call=2)
        with pytest.raises(KeyboardInterrupt):
            list(tiny_llm.stream((i, p, GREEDY) for i, p in enumerate(mixed_prompts(4))))
    assert_all_blocks_free(tiny_llm)
    out = dict(tiny_llm.stream([("x", [5, 6, 7], GREEDY)]))
    assert len(out["x"].outputs[0].token_ids) == GREEDY.max_tokens
