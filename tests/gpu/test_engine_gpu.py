"""The engine on the GPU: Triton backend, CUDA graphs, GPU sampling. Run on the device.

Greedy outputs must not depend on how a step was run: CUDA graphs vs eager, Triton vs torch
attention, prefix caching on vs off, C++ vs Python scheduler; a tiny Qwen3 matches transformers on
the GPU as it does on the CPU; preemption under a small pool leaves every block free.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_fixtures import hf_greedy, mixed_prompts
from minivllm import LLM, SamplingParams
from minivllm.engine.staging import schedule_into

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def gpu_llm(path: Path, **kwargs) -> LLM:
    kwargs.setdefault("device", "cuda")
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("max_model_len", 512)
    kwargs.setdefault("max_num_seqs", 32)
    kwargs.setdefault("max_num_batched_tokens", 1024)
    kwargs.setdefault("num_kv_blocks", 256)
    return LLM(str(path), **kwargs)


def greedy_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.num_free_blocks == llm.runtime.num_kv_blocks
    return [o.outputs[0].token_ids for o in outs]


def one_step_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """The logits of the sampled rows of one eager step with every prompt (float32); the
    requests are aborted after it."""
    runner = llm.model_runner
    for i, p in enumerate(prompts):
        llm.scheduler.add_request(i, p, 1, ignore_eos=True, temperature=0.0)
    batch = schedule_into(llm.scheduler, runner.staging)
    inputs = runner.staging.step_inputs(runner._stage(batch, eager=True))
    with torch.inference_mode():
        hidden = runner.run_model(inputs)
        logits = runner.model.compute_logits(hidden[inputs.logits_indices]).float()
    for i in range(len(prompts)):
        llm.scheduler.abort(i)
    return logits


def test_matches_transformers_on_gpu(gpu_qwen3):
    prompts = mixed_prompts(8, seed=11, min_len=1, max_len=100)
    got = greedy_ids(gpu_llm(gpu_qwen3), prompts)
    for prompt, ids in zip(prompts, got):
        assert ids == hf_greedy(gpu_qwen3, prompt, GREEDY.max_tokens, device="cuda")


def test_cuda_graphs_match_eager(gpu_qwen3):
    # 21 prompts: decode batches of 21, 20, ... pad up to the 32 and 16..1 buckets.
    prompts = mixed_prompts(21, seed=12, min_len=5, max_len=120)
    graphs = greedy_ids(gpu_llm(gpu_qwen3, enforce_eager=False), prompts)
    eager = greedy_ids(gpu_llm(gpu_qwen3, enforce_eager=True), prompts)
    assert graphs == eager


def test_mixed_step_graph_matches_eager(gpu_qwen3):
    """Steps with prefill replay the mixed CUDA graph (decodes and chunked prefills as rows of
    one tile table, padded to 128 tokens); greedy outputs equal eager ones,
    with prefix-cache hits (shared prefixes) and long prompts split into chunks."""
    shared = mixed_prompts(1, seed=30, min_len=40, max_len=40)[0]
    prompts = [shared + p for p in mixed_prompts(6, seed=31, min_len=1, max_len=200)]
    prompts += mixed_prompts(10, seed=32, min_len=3, max_len=90)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = gpu_llm(gpu_qwen3, max_num_batched_tokens=128)
    runner = llm.model_runner.graph_runner
    assert runner is not None and runner.mixed_tokens == 128
    replays = []
    real = runner.replay_mixed
    runner.replay_mixed = lambda n: (replays.append(n), real(n))[1]
    graphs = greedy_ids(llm, prompts, params)
    del runner.replay_mixed
    assert len(replays) >= 3 and min(replays) >= 1, replays
    eager = greedy_ids(
        gpu_llm(gpu_qwen3, max_num_batched_tokens=128, enforce_eager=True), prompts, params
    )
    assert graphs == eager


def test_triton_matches_torch_backend(gpu_qwen3):
    prompts = mixed_prompts(6, seed=13, min_len=3, max_len=150)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tri = greedy_ids(gpu_llm(gpu_qwen3, attention_backend="triton"), prompts, params)
    ref = greedy_ids(
        gpu_llm(gpu_qwen3, attention_backend="torch", enforce_eager=True), prompts, params
    )
    assert tri == ref


def test_triton_logits_close_to_torch_in_bf16(gpu_qwen3):
    """One prefill step through each backend in bf16: the sampled rows' logits agree closely."""
    prompts = mixed_prompts(4, seed=14, min_len=20, max_len=200)
    logits = {}
    for backend in ("triton", "torch"):
        llm = gpu_llm(gpu_qwen3, dtype="bfloat16", attention_backend=backend, enforce_eager=True)
        logits[backend] = one_step_logits(llm, prompts)
    a, b = logits["triton"], logits["torch"]
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 2e-2, rel


# Switches of layers.attention / layers.linear: the route named, on and off.
ROUTES = {
    # The default (early weight columns in the GEMMs, early decode loads) against neither.
    "early_loads": (
        {"DECODE_EARLY_LOADS": True, "GEMM_EARLY_COLUMNS": 256},
        {"DECODE_EARLY_LOADS": False, "GEMM_EARLY_COLUMNS": 0},
    ),
    # The qkv GEMM as split-K partial sums added up by the rotary kernel, against the default.
    "qkv_partials": ({"QKV_SPLITS": 4}, {"QKV_SPLITS": 0}),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_decode_route_close_to_the_other_in_bf16(gpu_qwen3, monkeypatch, route: str):
    """A route of the decode-size kernels (ROUTES) against its alternative, inside the engine,
    bf16: one step's logits within 1%; greedy generation with CUDA graphs (split decodes) gives
    the same tokens up to where a sequence's top two logprobs tie within bf16 rounding, where
    the two routes may part."""
    from minivllm.layers import attention
    from minivllm.layers import linear as linear_layers

    # One step of <= 56 tokens: within layers.linear.QKV_PARTIALS_MAX_TOKENS.
    prompts = mixed_prompts(8, seed=17, min_len=3, max_len=7)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    logits, outputs = {}, {}
    for on, switches in zip((True, False), ROUTES[route]):
        for name, value in switches.items():
            module = linear_layers if hasattr(linear_layers, name) else attention
            monkeypatch.setattr(module, name, value)
        llm = gpu_llm(gpu_qwen3, dtype="bfloat16", enforce_eager=True)
        logits[on] = one_step_logits(llm, prompts)
        llm.close()
        llm = gpu_llm(gpu_qwen3, dtype="bfloat16")
        outputs[on] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.num_free_blocks == llm.runtime.num_kv_blocks
        llm.close()
    a, b = logits[True], logits[False]
    assert ((a - b).norm() / b.norm()).item() < 1e-2
    for got, expect in zip(outputs[True], outputs[False]):
        for i, (x, y) in enumerate(zip(got.token_ids, expect.token_ids)):
            if x != y:  # parted at a near tie of the alternative's top two
                top = sorted((lp.logprob for lp in expect.logprobs[i].values()), reverse=True)
                assert top[0] - top[1] < 0.05, (i, top)
                break


def test_prefix_caching_on_off_identical(gpu_qwen3):
    prefix = mixed_prompts(1, seed=15, min_len=100, max_len=100)[0]
    prompts = [prefix + s for s in mixed_prompts(6, seed=16, min_len=1, max_len=20)]
    on = gpu_llm(gpu_qwen3, enable_prefix_caching=True, block_size=16)
    greedy_ids(on, prompts[:1])
    with_cache = greedy_ids(on, prompts)
    assert on.stats["prefix_cache_hits"] > 0
    without = greedy_ids(gpu_llm(gpu_qwen3, enable_prefix_caching=False, block_size=16), prompts)
    assert with_cache == without


def test_cpp_and_python_schedulers_identical(gpu_qwen3):
    prompts = mixed_prompts(10, seed=17, min_len=1, max_len=200)
    cpp = greedy_ids(gpu_llm(gpu_qwen3, scheduler="cpp", max_num_batched_tokens=64), prompts)
    py = greedy_ids(gpu_llm(gpu_qwen3, scheduler="python", max_num_batched_tokens=64), prompts)
    assert cpp == py


def test_preemption_with_256_requests_frees_every_block(gpu_qwen3):
    prompts = mixed_prompts(256, seed=18, min_len=10, max_len=60)
    llm = gpu_llm(
        gpu_qwen3,
        max_num_seqs=256,
        num_kv_blocks=64,
        block_size=16,
        max_num_batched_tokens=512,
        max_model_len=256,
    )
    params = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True, seed=3)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert llm.stats["num_preemptions"] > 0
    assert llm.num_free_blocks == llm.runtime.num_kv_blocks == 64


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_scheduling_equals_sync(gpu_qwen3, enforce_eager):
    """Async scheduling (the CUDA default) resolves its placeholder inputs on the device, in
    graphs and eagerly: greedy outputs equal the synchronous engine's, with a pool small enough
    to preempt and a budget small enough to chunk. (Sampled rows are not compared: a different
    batch composition changes the GEMMs' rounding, which can move an inverse-CDF draw to the
    neighbouring token.)"""
    prompts = mixed_prompts(24, seed=61, min_len=1, max_len=200)
    params = [
        SamplingParams(temperature=0.0, max_tokens=4 + (7 * i) % 40, ignore_eos=True)
        for i in range(len(prompts))
    ]
    out = {}
    for mode in (False, True):
        llm = gpu_llm(
            gpu_qwen3,
            async_scheduling=mode,
            enforce_eager=enforce_eager,
            num_kv_blocks=48,
            max_num_batched_tokens=256,
        )
        assert llm.config.async_scheduling is mode
        res = llm.generate(prompts, params, use_tqdm=False)
        assert llm.num_free_blocks == llm.runtime.num_kv_blocks
        out[mode] = [o.outputs[0].token_ids for o in res]
        assert [len(t) for t in out[mode]] == [p.max_tokens for p in params]
        assert llm.stats["num_preemptions"] > 0
    assert out[True] == out[False]


def test_async_is_the_cuda_default(gpu_qwen3):
    assert gpu_llm(gpu_qwen3).config.async_scheduling


def test_closed_engine_frees_its_pool_for_the_next(gpu_qwen3):
    """An engine sized from memory takes most of the card; closing it gives that back at once,
    so a second engine in the same process gets a pool of about the same size."""
    kwargs = {"num_kv_blocks": None, "gpu_memory_utilization": 0.5}
    with gpu_llm(gpu_qwen3, **kwargs) as first:
        blocks = first.runtime.num_kv_blocks
        pool_bytes = first.model_runner.kv_cache.numel() * 4
    assert torch.cuda.memory_reserved() < pool_bytes / 2
    with gpu_llm(gpu_qwen3, **kwargs) as second:
        assert second.runtime.num_kv_blocks > 0.9 * blocks
