"""AsyncLLM (the engine loop in its own process, outputs streamed per request): deltas join to
what LLM.generate returns, stop strings hold back text, abort frees the request's blocks,
requests join a running batch, and the engine serves one event loop after another."""

from __future__ import annotations

import asyncio
import time

import pytest
from engine_fixtures import mixed_prompts
from minivllm import SamplingParams
from minivllm.entrypoints.async_llm import AsyncLLM
from serving_utils import ENGINE_ARGS, boundary_stop

# Bounded in time, the module's server (or engine) start-up included: a hang fails.
pytestmark = pytest.mark.timeout(240)

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    engine = AsyncLLM(str(tiny_qwen3), **ENGINE_ARGS)
    yield engine
    engine.shutdown()


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def collect(engine, prompt, params, request_id=None, stream=True):
    return [out async for out in engine.generate(prompt, params, request_id, stream=stream)]


async def wait_idle(engine, timeout_s: float = 20.0) -> None:
    """Until the engine's stats show nothing running or waiting and every block free."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = engine.stats
        if (
            s.get("num_running") == 0
            and s.get("num_waiting") == 0
            and s.get("num_free_blocks") == engine.runtime.num_kv_blocks
        ):
            return
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        await asyncio.sleep(0.05)


def joined(deltas, index: int = 0) -> tuple[list[int], str]:
    ids, text = [], ""
    for d in deltas:
        for c in d.outputs:
            if c.index == index:
                ids += c.token_ids
                text += c.text
    return ids, text


def test_deltas_join_to_the_offline_output(engine, tiny_llm):
    prompts = mixed_prompts(6, seed=3)
    expected = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)

    async def main():
        streams = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
        finals = await asyncio.gather(*(collect(engine, p, GREEDY, stream=False) for p in prompts))
        return streams, finals

    streams, finals = run(main())
    for deltas, final, exp in zip(streams, finals, expected):
        want = exp.outputs[0]
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert joined(deltas) == (want.token_ids, want.text)
        assert deltas[-1].outputs[0].finish_reason == "length"
        assert len(final) == 1 and final[0].finished
        assert final[0].outputs[0].token_ids == want.token_ids
        assert final[0].outputs[0].text == want.text
        assert final[0].prompt_token_ids == exp.prompt_token_ids
    # The final output came with the stats of the step that freed its blocks.
    assert engine.stats["num_free_blocks"] == engine.runtime.num_kv_blocks


def test_a_streamed_stop_token_adds_no_text(engine, tiny_llm):
    """A stop token id ends a stream as it ends LLM.generate: its id in the last delta, its
    text nowhere (and, asked for, in the text)."""
    prompt = mixed_prompts(1, seed=5)[0]
    full = tiny_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[3]
    for keep in (False, True):
        sp = SamplingParams(
            temperature=0.0, max_tokens=GREEDY.max_tokens, ignore_eos=GREEDY.ignore_eos,
            stop_token_ids=[stop_id],
            include_stop_str_in_output=keep,
        )  # fmt: skip
        want = tiny_llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        deltas = run(collect(engine, prompt, sp))
        assert joined(deltas) == (want.token_ids, want.text)
        assert want.token_ids[-1] == stop_id and deltas[-1].outputs[0].stop_reason == stop_id
        decoded = tiny_llm.tokenizer.decode(want.token_ids if keep else want.token_ids[:-1])
        assert want.text == decoded


def test_stop_string_text_is_held_back(engine, tiny_llm):
    """A stop string that spans two tokens: no delta shows its first half before the second
    decides, and the final text equals LLM.generate's."""
    tok = engine.tokenizer
    cases = []
    for prompt, out in zip(
        prompts := mixed_prompts(12, seed=5), tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    ):
        stop = boundary_stop(tok, out.outputs[0].token_ids, out.outputs[0].text)
        if stop is not None:
            cases.append((prompt, stop, out.outputs[0].text))
    assert cases, "no greedy output has a stop string across a token boundary"

    for prompt, stop, text in cases[:3]:
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop])
        want = tiny_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert want.text == text[: text.index(stop)] and want.finish_reason == "stop"
        deltas = run(collect(engine, prompt, params))
        emitted = ""
        for d in deltas[:-1]:
            emitted += d.outputs[0].text
            # Never a tail that could still grow into the stop string.
            assert not any(emitted.endswith(stop[:i]) for i in range(1, len(stop))), emitted
            assert len(emitted) <= len(want.text)
        final = deltas[-1].outputs[0]
        assert emitted + final.text == want.text
        assert (final.finish_reason, final.stop_reason) == ("stop", stop)


def test_abort_and_a_consumer_that_stops_free_the_blocks(engine):
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def aborted():
        seen = 0
        with pytest.raises(asyncio.CancelledError):
            async for out in engine.generate([7, 8, 9, 10], long, "abort-me"):
                seen += len(out.outputs[0].token_ids)
                if seen >= 3:
                    await engine.abort("abort-me")
        assert engine.num_unfinished_requests == 0
        await wait_idle(engine)

        async for out in engine.generate([11, 12, 13], long, "walk-away"):
            if len(out.outputs[0].token_ids):
                break  # the generator, finalized on the loop soon after, aborts the request
        await wait_idle(engine)
        assert engine.num_unfinished_requests == 0
        # The request ids are free again, and the engine serves.
        again = await collect(engine, [7, 8, 9, 10], GREEDY, "abort-me")
        return again

    again = run(aborted())
    assert sum(len(d.outputs[0].token_ids) for d in again) == GREEDY.max_tokens


def test_requests_join_a_running_batch(engine, tiny_llm):
    """A request added while another is mid-generation: both equal LLM.generate's outputs."""
    first, second = mixed_prompts(2, seed=9, min_len=10)
    long = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    want = tiny_llm.generate([first, second], [long, GREEDY], use_tqdm=False)

    async def main():
        started = asyncio.Event()
        first_deltas: list = []

        async def run_first():
            async for out in engine.generate(first, long):
                first_deltas.append(out)
                if sum(len(d.outputs[0].token_ids) for d in first_deltas) >= 5:
                    started.set()

        task = asyncio.ensure_future(run_first())
        await started.wait()
        second_deltas, stats = [], []
        async for out in engine.generate(second, GREEDY):
            second_deltas.append(out)
            stats.append(dict(engine.stats))  # as of the step that produced this output
        first_done_before_second = task.done()
        await task
        return first_deltas, second_deltas, first_done_before_second, stats

    first_deltas, second_deltas, first_done, stats = run(main())
    assert not first_done  # the second really ran beside the first
    assert stats[0]["num_running"] == 2 and stats[0]["num_waiting"] == 0
    assert joined(first_deltas) == (want[0].outputs[0].token_ids, want[0].outputs[0].text)
    assert joined(second_deltas) == (want[1].outputs[0].token_ids, want[1].outputs[0].text)


def test_one_event_loop_after_another(engine, tiny_llm):
    """asyncio.run twice on one engine: messages that arrived after the first loop ended must
    not leave the second waiting forever."""
    prompt = [21, 22, 23]
    want = tiny_llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    for _ in range(3):
        deltas = run(collect(engine, prompt, GREEDY), timeout_s=30)
        assert joined(deltas) == (want.token_ids, want.text)
        time.sleep(0.2)  # late messages (counters) land while no loop runs


def test_bad_requests_raise_before_anything_starts(engine):
    with pytest.raises(ValueError, match="max_model_len=512"):
        engine.make_request([5] * 512, GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.make_request([600], GREEDY)
    engine.make_request([5], GREEDY, "taken")  # validation only: nothing is registered
    with pytest.raises(ValueError, match="seed"):
        engine.make_request([5], _bad_seed())
    assert engine.num_unfinished_requests == 0


def _bad_seed() -> SamplingParams:
    sp = SamplingParams()
    sp.seed = -1  # SamplingParams validates when built; make_request validates again
    return sp
