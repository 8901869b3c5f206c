"""An exception anywhere in a generate (a Ctrl-C while the requests are handed in or the host
waits for the GPU, a failed launch, a detokenizer or output-building error) leaves the engine
usable: every block comes back, and the next generate gives transformers' tokens, also for a
prompt whose blocks the failed step had registered in the prefix cache without ever computing
them. A request the engine refuses at intake comes back as its ValueError."""

from __future__ import annotations

import minivllm.llm as llm_module
import pytest
from engine_fixtures import SCHEDULERS, assert_all_blocks_free, hf_greedy, make_llm, mixed_prompts
from minivllm import SamplingParams
from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.engine.model_runner import ModelRunner, StepResult
from minivllm.engine.output_processor import OutputProcessor


def _raise_on_call(monkeypatch, owner, name, at_call, exc=KeyboardInterrupt):
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


PHASES = {
    "queueing": (OutputProcessor, "add", 2),  # the first request handed in, not the others
    "progress_bar": (llm_module, "Progress", 1),  # every request handed in, no step yet
    "first_launch": (ModelRunner, "launch", 1),  # the prompts' blocks are never computed
    "launch": (ModelRunner, "launch", 2),
    "read_back": (StepResult, "result", 3),
    "detokenize": (IncrementalDetokenizer, "push", 5),
    "output": (OutputProcessor, "process", 4),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("phase", list(PHASES))
def test_exception_in_a_step_leaves_the_engine_usable(
    tiny_qwen3, monkeypatch, scheduler, async_scheduling, phase
):
    llm = make_llm(tiny_qwen3, scheduler=scheduler, async_scheduling=async_scheduling, block_size=4)
    prompts = mixed_prompts(4, seed=91, min_len=9, max_len=40)
    # A stop string no greedy output holds: every request is detokenized as it grows.
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=["\x00never"])
    owner, name, at_call = PHASES[phase]
    _raise_on_call(monkeypatch, owner, name, at_call)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, sp, use_tqdm=False)
    monkeypatch.undo()
    assert_all_blocks_free(llm)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(tiny_qwen3, p, sp.max_tokens)
    assert_all_blocks_free(llm)
    # And with errors that are not interrupts.
    _raise_on_call(monkeypatch, owner, name, at_call, exc=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate(prompts, sp, use_tqdm=False)
    monkeypatch.undo()
    assert_all_blocks_free(llm)
    again = llm.generate(prompts[:2], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[:2]]


def test_a_request_refused_at_intake_is_its_value_error(tiny_qwen3, monkeypatch):
    """The scheduler refusing a request when the loop hands it in (here: the second one) ends
    that request alone: LLM.stream yields its ValueError, the others their outputs."""
    from minivllm.engine.reference.scheduler import Scheduler

    llm = make_llm(tiny_qwen3, scheduler="python")
    prompts = mixed_prompts(3, seed=93, min_len=3, max_len=9)
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    real = Scheduler.add_request

    def refuse_seq_1(self, seq_id, *args, **kwargs):
        if seq_id == 1:
            raise ValueError("refused for the test")
        return real(self, seq_id, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "add_request", refuse_seq_1)
    results = dict(llm.stream([(i, p, sp) for i, p in enumerate(prompts)]))
    monkeypatch.undo()
    assert isinstance(results[1], ValueError) and "refused for the test" in str(results[1])
    for i in (0, 2):
        assert results[i].outputs[0].token_ids == hf_greedy(tiny_qwen3, prompts[i], 4)
    assert_all_blocks_free(llm)
