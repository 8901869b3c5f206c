"""Tensor parallelism on the CPU: tensor_parallel_size=2 over gloo, one spawned worker per engine.

The tiny Qwen3 (4 heads, 2 KV heads, tied embeddings) split over two ranks gives transformers'
greedy tokens and tensor_parallel_size=1's, through chunked prefill and mixed batches, with both
schedulers and with async scheduling; two TP engines live side by side; closing an engine ends its workers; a dead worker
makes the next step raise instead of hanging; a bad tensor_parallel_size is a ValueError before
anything is spawned; a worker that fails sends its traceback to rank 0.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import (
    SCHEDULERS,
    assert_all_blocks_free,
    hf_greedy,
    make_hf_checkpoint,
    make_llm,
    mixed_prompts,
)
from minivllm import LLM, SamplingParams
from minivllm.distributed import WorkerError
from minivllm.engine.staging import CMD_STEP

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def tp_llm(path, **kwargs) -> LLM:
    # 64 batched tokens: prompts up to 60 tokens share steps and are split across them.
    kwargs.setdefault("max_num_batched_tokens", 64)
    return make_llm(path, tensor_parallel_size=2, **kwargs)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _with_async(schedulers):
    """Each scheduler synchronous, then each with async scheduling (its marks kept)."""
    out = []
    for async_scheduling in (False, True):
        for s in schedulers:
            values, marks = (s.values, s.marks) if hasattr(s, "values") else ((s,), ())
            mode = "async" if async_scheduling else "sync"
            out.append(
                pytest.param(*values, async_scheduling, marks=marks, id=f"{values[0]}-{mode}")
            )
    return out


@pytest.mark.parametrize(("scheduler", "async_scheduling"), _with_async(SCHEDULERS))
def test_tp2_greedy_matches_transformers_and_tp1(tiny_qwen3, tiny_llm, scheduler, async_scheduling):
    """With async scheduling every rank samples (the same ids from the same gathered logits and
    uniforms) and resolves its next step's placeholders from them."""
    prompts = mixed_prompts(8, seed=3)
    with tp_llm(tiny_qwen3, scheduler=scheduler, async_scheduling=async_scheduling) as llm:
        assert llm.model_runner.tp.size == 2
        assert llm.config.async_scheduling is async_scheduling
        got = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
        assert got == [hf_greedy(tiny_qwen3, p, GREEDY.max_tokens) for p in prompts]
        assert got == token_ids(tiny_llm.generate(prompts, GREEDY, use_tqdm=False))
        assert_all_blocks_free(llm)
        # Seeded sampling: rank 0 samples from the gathered logits with the same uniforms.
        sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True, seed=7)
        got = token_ids(llm.generate(prompts[:4], sampled, use_tqdm=False))
        assert got == token_ids(tiny_llm.generate(prompts[:4], sampled, use_tqdm=False))
        assert_all_blocks_free(llm)


@pytest.fixture(scope="module")
def qwen2_odd_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (qkv bias), untied LM head, vocab 509: rank 1's vocabulary shard has a padding row."""
    return make_hf_checkpoint(
        tmp_path_factory.mktemp("qwen2_odd_vocab"),
        architecture="qwen2",
        vocab_size=509,
        tie_word_embeddings=False,
        tokenizer=False,
    )


@pytest.mark.parametrize("checkpoint", ["tiny_qwen3_sharded", "qwen2_odd_vocab"])
def test_tp2_loads_every_shard_kind(request, checkpoint):
    """Sharded files with an untied LM head; qkv bias and a padded vocabulary shard."""
    path = request.getfixturevalue(checkpoint)
    prompts = [[t % 509 for t in p] for p in mixed_prompts(4, seed=9)]
    with tp_llm(path) as llm:
        got = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_greedy(path, p, GREEDY.max_tokens) for p in prompts]


class LogitsRecorder:
    """Wraps rank 0's sampler to keep every step's (gathered) logits."""

    def __init__(self, sampler):
        self.sampler, self.logits = sampler, []

    def __call__(self, logits, sampling):
        self.logits.append(logits.clone())
        return self.sampler(logits, sampling)


def test_tp2_dummy_weights_equal_tp1(tiny_qwen3):
    """load_format='dummy' draws each parameter's full shape and loads its shard, so both ranks
    together hold tensor_parallel_size=1's model: the gathered logits match step by step."""
    prompts = mixed_prompts(3, seed=11)
    engines = {}
    for size in (1, 2):
        llm = make_llm(tiny_qwen3, load_format="dummy", seed=3, tensor_parallel_size=size)
        with llm:
            recorder = LogitsRecorder(llm.model_runner.sampler)
            llm.model_runner.sampler = recorder
            engines[size] = (token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)), recorder)
    (tokens1, rec1), (tokens2, rec2) = engines[1], engines[2]
    assert tokens2 == tokens1
    assert len(rec2.logits) == len(rec1.logits)
    for a, b in zip(rec1.logits, rec2.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert rec1.logits[0].std() > 0  # not a constant model


def test_two_tp_engines_at_once(tiny_qwen3):
    prompts = mixed_prompts(4, seed=5)
    expected = [hf_greedy(tiny_qwen3, p, GREEDY.max_tokens) for p in prompts]
    with tp_llm(tiny_qwen3) as a, tp_llm(tiny_qwen3, block_size=4) as b:
        assert a.model_runner.tp.store.port != b.model_runner.tp.store.port
        for _ in range(2):  # interleaved: each engine's steps only reach its own worker
            assert token_ids(a.generate(prompts, GREEDY, use_tqdm=False)) == expected
            assert token_ids(b.generate(prompts, GREEDY, use_tqdm=False)) == expected
        assert_all_blocks_free(a)
        assert_all_blocks_free(b)


def test_close_ends_workers(tiny_qwen3):
    llm = tp_llm(tiny_qwen3)
    procs = list(llm.model_runner.workers.procs)
    assert len(procs) == 1 and procs[0].is_alive()
    llm.close()
    assert [p.exitcode for p in procs] == [0]  # left its loop on the shutdown command
    llm.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_dead_worker_raises(tiny_qwen3, async_scheduling):
    with tp_llm(tiny_qwen3, async_scheduling=async_scheduling) as llm:
        proc = llm.model_runner.workers.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        with pytest.raises(WorkerError, match=r"worker rank 1 .* exited with code -9"):
            llm.generate(mixed_prompts(2), GREEDY, use_tqdm=False)
        assert_all_blocks_free(llm)  # the failed call's requests were aborted


def _generate_fails_then_close(llm: LLM, match: str, num_prompts: int, within_s: float) -> None:
    """generate raises WorkerError matching `match` within `within_s`, every block comes back;
    then close()."""
    try:
        start = time.monotonic()
        with pytest.raises(WorkerError, match=match):
            llm.generate(mixed_prompts(num_prompts), GREEDY, use_tqdm=False)
        assert time.monotonic() - start < within_s
        assert_all_blocks_free(llm)
    finally:
        llm.close()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_worker_killed_mid_run_raises(tiny_qwen3, async_scheduling):
    """SIGKILL right after the third step was sent (with async scheduling a second step may be
    in flight): WorkerError within seconds, every block back, close() reaps everything."""
    llm = tp_llm(tiny_qwen3, async_scheduling=async_scheduling)
    workers = llm.model_runner.workers
    proc, send = workers.procs[0], workers.send

    def send_then_kill(message):
        send(message)
        if workers.num_steps == 3:
            os.kill(proc.pid, signal.SIGKILL)

    workers.send = send_then_kill
    _generate_fails_then_close(llm, r"worker rank 1 .* exited with code -9", 4, within_s=30)
    assert proc.exitcode == -9


def test_failing_worker_reports_its_traceback(tiny_qwen3):
    with tp_llm(tiny_qwen3) as llm:
        # A step header whose payload is missing: the worker fails while unpacking it.
        header = np.array([CMD_STEP, 5, 0, 1, 1, 1, 5, 0, 0, 1, 0, 0], dtype=np.int32)
        llm.model_runner.workers.send(header)
        with pytest.raises(WorkerError, match=r"(?s)exited with code 1.*in unpack.*ValueError"):
            llm.generate(mixed_prompts(2), GREEDY, use_tqdm=False)
        with pytest.raises(WorkerError):  # and it stays failed
            llm.generate(mixed_prompts(2), GREEDY, use_tqdm=False)
        assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    ("size", "match"),
    [
        (3, "tensor_parallel_size=3 must divide the checkpoint's num_attention_heads=4"),
        (4, "tensor_parallel_size=4 must divide the checkpoint's num_key_value_heads=2"),
        (0, "tensor_parallel_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_tensor_parallel_size(tiny_qwen3, size, match):
    before = set(mp.active_children())
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_qwen3), device="cpu", tensor_parallel_size=size)
    assert set(mp.active_children()) == before  # nothing was spawned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to count GPUs")
def test_more_ranks_than_gpus(tiny_qwen3):
    n = torch.cuda.device_count() + 1
    with pytest.raises(ValueError, match=f"tensor_parallel_size={n} needs {n} GPUs"):
        LLM(str(tiny_qwen3), device="cuda", tensor_parallel_size=n)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_hung_worker_raises_naming_it(tiny_qwen3, async_scheduling):
    """A stopped worker (SIGSTOP: a stuck collective looks the same to rank 0) makes the step
    raise WorkerError naming it within the step timeout, not the collectives' 10 minutes; close()
    then leaves no process behind."""
    llm = tp_llm(tiny_qwen3, tp_step_timeout_s=2.0, async_scheduling=async_scheduling)
    proc = llm.model_runner.workers.procs[0]
    llm.generate(mixed_prompts(2), GREEDY, use_tqdm=False)  # a healthy start
    os.kill(proc.pid, signal.SIGSTOP)
    _generate_fails_then_close(llm, rf"rank 1 \(pid {proc.pid}, stopped\)", 2, within_s=20)
    assert proc.exitcode is not None  # killed: a stopped process ignores SIGTERM


def test_read_back_checks_the_workers_while_it_waits():
    """On NCCL a dead peer leaves rank 0's kernels waiting without an error: the read-back's
    wait runs the workers' check every WATCH_EVERY_S, so a dead worker raises at once rather than
    after the step timeout; a step that never finishes still raises at the timeout."""
    from minivllm.engine.model_runner import StepResult

    class NeverDone:  # a CUDA event whose kernels wait forever
        def query(self) -> bool:
            return False

    checks = []

    def check_alive() -> None:
        checks.append(time.monotonic())
        if len(checks) == 3:
            raise WorkerError("tensor-parallel worker rank 1 (pid 1) exited with code -9")

    result = StepResult(np.zeros(1, dtype=np.int64), NeverDone())
    result.deadline = (60.0, lambda cause: WorkerError(f"step failed ({cause})"))
    result.watch = check_alive
    start = time.monotonic()
    with pytest.raises(WorkerError, match="exited with code -9"):
        result.result()
    assert len(checks) == 3 and time.monotonic() - start < 10

    result = StepResult(np.zeros(1, dtype=np.int64), NeverDone())
    result.deadline = (0.3, lambda cause: WorkerError(f"step failed ({cause})"))
    result.watch = lambda: None
    with pytest.raises(WorkerError, match=r"step failed \(no result after 0.3 s\)"):
        result.result()
