"""The server's Prometheus metrics (GET /metrics), in a registry of its own.

The engine's state is read when scraped, from the counters the engine sends after each step
(`AsyncLLM.stats`): running and waiting requests, KV blocks in use, prefix-cache queries and hits
(in tokens), preemptions. Latencies and token counts are observed by the server as requests
finish: time to first token, time per output token and end-to-end latency from each request's
own timestamps (arrival when validated, first token and end as the engine reported them), and
the inter-token latency as the gaps between the outputs of streamed requests. Names follow
vLLM's with a `minivllm:` prefix.

Observations come from the event loop's one thread, one per streamed output at the highest
rate: they are plain counts kept here (a bisect and two additions), turned into Prometheus
families only when scraped, instead of prometheus_client's locked Histogram.observe.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from minivllm.outputs import RequestOutput

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_TOKEN_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip


class Histogram:
    """Bucket counts and a sum, observed from one thread."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float]):
        self.name, self.doc = name, doc
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += n
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)


class ServerMetrics:
    """One server's metrics; `observe_*` are called by the routes, `render` by GET /metrics."""

    def __init__(self, stats: Callable[[], Mapping[str, int]], num_kv_blocks: int):
        self._stats = stats
        self._num_kv_blocks = num_kv_blocks
        self.ttft = Histogram(
            "minivllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            "minivllm:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            _TOKEN_GAP_BUCKETS,
        )
        self.itl = Histogram(
            "minivllm:inter_token_latency_seconds",
            "Time between consecutive outputs of a streamed request.",
            _TOKEN_GAP_BUCKETS,
        )
        self.e2e = Histogram(
            "minivllm:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            _LATENCY_BUCKETS,
        )
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.finish_reasons: dict[str, int] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def observe_finished(self, out: RequestOutput, output_lengths: Sequence[int]) -> None:
        """A request ended: its last output (a stream's last delta will do) and the number of
        tokens of each of its completions."""
        self.num_prompt_tokens += len(out.prompt_token_ids)
        self.num_generation_tokens += sum(output_lengths)
        for c in out.outputs:
            reason = c.finish_reason or "abort"
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        m = out.metrics
        if m is None or m.latency is None or m.time_to_first_token is None:
            return
        ttft = m.time_to_first_token
        self.e2e.observe(m.latency)
        self.ttft.observe(ttft)
        longest = max(output_lengths, default=0)
        if longest > 1:
            self.tpot.observe((m.latency - ttft) / (longest - 1))

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: every family, as of now."""
        s = self._stats()
        total = int(s.get("num_kv_blocks", self._num_kv_blocks))
        free = int(s.get("num_free_blocks", total))
        queries, hits = int(s.get("prefix_cache_queries", 0)), int(s.get("prefix_cache_hits", 0))
        for name, doc, value in (
            ("num_requests_running", "Requests in the engine's running batch.",
             s.get("num_running", 0)),
            ("num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0)),
            ("num_kv_blocks", "KV-cache blocks in the pool.", total),
            ("num_free_kv_blocks", "KV-cache blocks free (or cached and reusable).", free),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
             1.0 - free / total if total else 0.0),
            ("prefix_cache_hit_rate", "Prefix-cache hits / queries (in tokens), since start.",
             hits / queries if queries else 0.0),
        ):  # fmt: skip
            yield GaugeMetricFamily(f"minivllm:{name}", doc, value=float(value))
        for name, doc, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits),
            ("num_preemptions", "Sequences preempted (recomputed later).",
             s.get("num_preemptions", 0)),
            ("prompt_tokens", "Prompt tokens of finished requests.", self.num_prompt_tokens),
            ("generation_tokens", "Tokens generated for finished requests.",
             self.num_generation_tokens),
        ):  # fmt: skip
            yield CounterMetricFamily(f"minivllm:{name}", doc, value=float(value))
        success = CounterMetricFamily(
            "minivllm:request_success", "Finished completions by finish reason.",
            labels=["finished_reason"],
        )  # fmt: skip
        for reason, n in sorted(self.finish_reasons.items()):
            success.add_metric([reason], float(n))
        yield success
        for h in (self.ttft, self.tpot, self.itl, self.e2e):
            yield h.family()

    def render(self) -> bytes:
        return generate_latest(self.registry)
