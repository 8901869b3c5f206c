"""bench_serving.py's client: streamed completions over httpx on asyncio, sent with Poisson
arrivals or at most C in flight from one or more client processes, timed as `vllm bench serve`
times them (TTFT, the gap between reads that brought tokens, latency), and a run's summary
(request and token throughput; TTFT, TPOT, ITL and end-to-end latency, mean, p50, p90, p99)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

TEMPERATURE = 0.6


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


async def send(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], prompt_len: int
) -> Result:
    """One streamed completion: the time of each read that brought tokens, the usage."""
    start = time.perf_counter()
    res = Result(ok=False, prompt_len=prompt_len)
    last = start
    usage = None
    num_events = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            pending = b""
            async for raw in r.aiter_raw():
                now = time.perf_counter()
                *events, pending = (pending + raw).split(b"\n\n")
                tokens = False
                for ev in events:
                    data = ev.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        continue
                    if b'"usage":{' in data:
                        usage = json.loads(data)["usage"]
                        continue
                    if b'"error"' in data[:16]:
                        res.error = data.decode(errors="replace")[:200]
                        return res
                    num_events += 1
                    tokens = True
                if not tokens:
                    continue
                if num_events and res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
    except (httpx.HTTPError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.output_len = usage["completion_tokens"] if usage else num_events
    res.ok = res.ttft > 0.0
    return res


def request_body(model: str, prompt: list[int], max_tokens: int, seed: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "ignore_eos": True,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _send_all(
    url: str,
    model: str,
    jobs: list[tuple[int, list[int], int, float]],  # (request index, prompt, max_tokens, arrival)
    start: float,
    concurrency: int | None,
) -> list[tuple[int, Result]]:
    """One client's requests, each sent at start + its arrival (at most `concurrency` at once)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:

        async def one(i: int, prompt: list[int], max_tokens: int, arrival: float) -> Result:
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = request_body(model, prompt, max_tokens, seed=i)
            if gate is None:
                return await send(client, url, body, len(prompt))
            async with gate:
                return await send(client, url, body, len(prompt))

        results = await asyncio.gather(*(one(*job) for job in jobs))
    return [(job[0], r) for job, r in zip(jobs, results)]


def _client_main(
    url: str, model: str, jobs: list[Any], start: float, concurrency: int | None
) -> tuple[list[tuple[int, Result]], float, float]:
    """A client process: its results, when it finished, the CPU seconds it used."""
    cpu = time.process_time()
    results = asyncio.run(_send_all(url, model, jobs, start, concurrency))
    return results, time.perf_counter(), time.process_time() - cpu


def run_load(
    url: str,
    model: str,
    prompts: list[list[int]],
    max_tokens: list[int],
    rate: float = math.inf,
    concurrency: int | None = None,
    clients: int = 1,
) -> tuple[list[Result], float, float]:
    """Every request, Poisson arrivals at `rate` (seeded) or at most `concurrency` at once,
    sent by `clients` processes (request i by process i % clients: one Python client parsing
    hundreds of streams can be slower than the server it measures). Returns the results, the
    duration and the clients' CPU seconds."""
    gaps = (
        np.random.default_rng(0).exponential(1.0 / rate, len(prompts))
        if rate < math.inf
        else (np.zeros(len(prompts)))
    )
    arrivals = np.cumsum(gaps) - gaps[0]
    jobs = [(i, prompts[i], max_tokens[i], float(arrivals[i])) for i in range(len(prompts))]
    clients = max(1, min(clients, len(jobs)))
    per_client = None if concurrency is None else -(-concurrency // clients)
    if clients == 1:
        start = time.perf_counter()
        results, end, cpu = _client_main(url, model, jobs, start, per_client)
        return [r for _, r in sorted(results, key=lambda x: x[0])], end - start, cpu
    # perf_counter is the system-wide monotonic clock on Linux: one start time for all.
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(clients, mp_context=ctx) as pool:
        start = time.perf_counter() + 0.5  # time for the processes to start
        futures = [
            pool.submit(_client_main, url, model, jobs[k::clients], start, per_client)
            for k in range(clients)
        ]
        parts = [f.result() for f in futures]
    results = sorted((x for part, _, _ in parts for x in part), key=lambda x: x[0])
    end = max(end for _, end, _ in parts)
    return [r for _, r in results], end - start, sum(cpu for _, _, cpu in parts)


def stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    a = np.asarray(values) * 1000.0
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    num_out = sum(r.output_len for r in ok)
    num_in = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tok_s": num_out / duration,
        "total_tok_s": (num_in + num_out) / duration,
        "output_tokens": num_out,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms([x for r in ok for x in r.itls]),
        "e2el_ms": stats_ms([r.latency for r in ok]),
    }
