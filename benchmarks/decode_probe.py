"""Timings of a live engine beside bench_throughput.py's timed run: its loop with N sequences
decoding, step by step under the profiler (wall, GPU busy, NCCL and host time per step), and one
request alone's time per output token."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch
from minivllm import LLM, SamplingParams
from steps import StepLoop


def sync(llm: LLM) -> None:
    if llm.config.torch_device.type == "cuda":
        torch.cuda.synchronize()


def one_request_ms_per_token(llm: LLM, prompt: list[int], new_tokens: int = 128) -> float:
    """One request alone: (wall of generate at 1 + new_tokens tokens - wall at 1) / new_tokens,
    the median of three, each on a prompt of its own (no prefix-cache hit)."""
    prompt, vocab = (prompt * 2)[:512], min(llm.config.model_config.vocab_size, 10000)
    times = []
    for k in range(1, 4):
        walls = []
        for n in (1, 1 + new_tokens):
            ids = [(t + 1000 * k + n) % vocab for t in prompt]
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n)
            sync(llm)
            t0 = time.perf_counter()
            llm.generate([ids], params, use_tqdm=False)
            sync(llm)
            walls.append(time.perf_counter() - t0)
        times.append((walls[1] - walls[0]) / new_tokens)
    return float(np.median(times)) * 1e3


def probe_decode_steps(
    llm: LLM, prompts: list[list[int]], num_running: int, num_steps: int = 24
) -> dict[str, float | None]:
    """The engine's loop with `num_running` sequences of 256-token prompts decoding: per step the
    wall time, the GPU kernel time (profiler, union of kernel intervals; CUDA only), the GPU busy
    fraction, the NCCL kernels' time (the all-reduces of tensor parallelism, rank 0's GPU), and
    the host time in schedule + update."""
    from torch.profiler import ProfilerActivity, profile

    loop, cuda = StepLoop(llm), llm.config.torch_device.type == "cuda"
    base = 10**9 + num_running * 1000
    for i in range(num_running):
        loop.scheduler.add_request(
            base + i, prompts[i % len(prompts)][:256], 10**3, ignore_eos=True, temperature=0.6,
            seed=i,
        )  # fmt: skip
    loop.step_until_decoding()
    for _ in range(5):  # settle
        loop.step()
    host = []
    profiler = profile(activities=[ProfilerActivity.CUDA]) if cuda else contextlib.nullcontext()
    with profiler as prof:
        sync(llm)
        w0 = time.perf_counter()
        for _ in range(num_steps):
            host.append(loop.step()[1])
        sync(llm)
        window = time.perf_counter() - w0
    loop.drain()
    for i in range(num_running):
        loop.scheduler.abort(base + i)
    wall_step = window / num_steps
    gpu_step = busy_seconds(prof) / num_steps if cuda else None
    nccl_step = nccl_seconds(prof) / num_steps if cuda else None
    return {
        "running": num_running,
        "wall_us_per_step": wall_step * 1e6,
        "gpu_us_per_step": None if gpu_step is None else gpu_step * 1e6,
        "gpu_busy": None if gpu_step is None else gpu_step / wall_step,
        "idle_us_per_step": None if gpu_step is None else (wall_step - gpu_step) * 1e6,
        "nccl_us_per_step": None if nccl_step is None else nccl_step * 1e6,
        "schedule_update_us_median": float(np.median(host)) * 1e6,
    }


def nccl_seconds(prof: Any) -> float:
    """The summed time of the profiled NCCL kernels (all-reduces, all-gathers)."""
    return 1e-6 * sum(
        e.time_range.end - e.time_range.start
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "nccl" in e.name.lower()
    )


def busy_seconds(prof: Any) -> float:
    """The union of the profiled GPU kernels' intervals."""
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy_us, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy_us += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy_us += cur_e - cur_s
    return busy_us * 1e-6
