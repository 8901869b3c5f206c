"""The fastest the card could run a model: its measured ceilings, and the bytes and FLOPs a step
must move.

A decode-only step must read every weight once (the LM head included) and the KV of every running
sequence: at the card's bandwidth that is its shortest possible time. A step with prefill must do
its matmul and causal-attention FLOPs: at the measured matmul rate, and never faster than the
weight read, that is its shortest. The bandwidth is the higher of two measurements, a copy
(bytes read + written) and a kernel that only reads: each is the best of several runs, and a
decode step mostly reads.

That roofline (issue 16's) charges a decode step for bytes only. Past ~F / B rows (the matmul
rate over the bandwidth: ~160 on an H200) the layers' GEMMs take longer to compute than their
weights take to read, which matters for the larger models' busiest steps. `flop_aware=True`
charges a decode step's GEMMs (decoder layers and LM head) the slower of the two, and the KV read
after them: a tighter bound, reported beside the first, never in its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from bench_common import copy_bandwidth_gbs, empty_cache, matmul_tflops, read_bandwidth_gbs


@dataclass(frozen=True)
class Ceilings:
    """What this card measured in this run."""

    copy_gbs: float  # device-to-device copy, bytes read + written per second
    read_gbs: float  # a read-only kernel
    matmul_tflops: float  # bf16 8192^3

    @classmethod
    def measure(cls) -> Ceilings:
        ceilings = cls(copy_bandwidth_gbs(), read_bandwidth_gbs(), matmul_tflops())
        empty_cache()  # the engine sizes its KV pool from the free memory
        return ceilings

    @property
    def bandwidth(self) -> float:
        """Bytes per second the roofline assumes: the higher of the two measurements."""
        return max(self.copy_gbs, self.read_gbs) * 1e9

    @property
    def flops(self) -> float:
        return self.matmul_tflops * 1e12

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "bandwidth_gbs": self.bandwidth / 1e9}


@dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of one Qwen3 forward, from its config.json."""

    weight_bytes: float  # read by every decode step: the decoder layers and the LM head
    kv_bytes_per_token: float  # K and V of one token, all layers
    layer_flops_per_token: float  # the decoder layers' matmuls
    lm_head_flops_per_row: float  # logits of one sampled row
    attn_flops_per_pair: float  # one (query, key) pair, all layers and heads: q.k and p.v

    @classmethod
    def from_config(cls, cfg: dict[str, Any], dtype_bytes: int = 2) -> ModelCost:
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        head_dim = cfg.get("head_dim", hidden // heads)
        per_layer = (
            hidden * (heads + 2 * kv_heads) * head_dim  # qkv
            + heads * head_dim * hidden  # o
            + 3 * hidden * inter  # gate, up, down
        )
        return cls(
            weight_bytes=dtype_bytes * (layers * per_layer + vocab * hidden),
            kv_bytes_per_token=dtype_bytes * layers * 2 * kv_heads * head_dim,
            layer_flops_per_token=2 * layers * per_layer,
            lm_head_flops_per_row=2 * vocab * hidden,
            attn_flops_per_pair=4 * layers * heads * head_dim,
        )

    def decode_seconds(self, context_tokens: float, ceilings: Ceilings, rows: int = 0) -> float:
        """A decode-only step over running sequences holding `context_tokens` tokens in all.
        `rows` > 0 (flop-aware): its GEMMs over that many rows take the slower of the weight
        read and their FLOPs."""
        weights = self.weight_bytes / ceilings.bandwidth
        if rows:
            flops = (self.layer_flops_per_token + self.lm_head_flops_per_row) * rows
            weights = max(weights, flops / ceilings.flops)
        return weights + self.kv_bytes_per_token * context_tokens / ceilings.bandwidth

    def step_seconds(
        self,
        num_tokens: int,
        num_decodes: int,
        num_samples: int,
        context_tokens: int,
        pairs: int,
        ceilings: Ceilings,
        flop_aware: bool = False,
    ) -> float:
        """Any step: decode-only steps are bound by memory (`flop_aware`: see decode_seconds),
        the others by FLOPs (`pairs`: the causal (query, key) pairs of its attention)."""
        if num_tokens == num_decodes:
            return self.decode_seconds(context_tokens, ceilings, num_decodes if flop_aware else 0)
        flops = (
            self.layer_flops_per_token * num_tokens
            + self.lm_head_flops_per_row * num_samples
            + self.attn_flops_per_pair * pairs
        )
        return max(flops / ceilings.flops, self.weight_bytes / ceilings.bandwidth)

    def prefill_seconds(self, prompt_len: int, ceilings: Ceilings) -> float:
        """A lone prompt's prefill in one step, its first token sampled."""
        pairs = prompt_len * (prompt_len + 1) // 2
        return self.step_seconds(prompt_len, 0, 1, prompt_len, pairs, ceilings)


def workload_seconds(
    cost: ModelCost,
    prompts: Sequence[Sequence[int]],
    max_tokens: Sequence[int],
    ceilings: Ceilings,
    flop_aware: bool = False,
) -> dict[str, float]:
    """The whole offline workload: every prompt prefilled (FLOP-bound), then decode step t >= 1
    (token 0 comes from the prefill) reads the weights once and the KV of every request still
    running, each at context prompt + t (`flop_aware`: see ModelCost.decode_seconds)."""
    p = np.array([len(x) for x in prompts], dtype=np.float64)
    m = np.array(max_tokens, dtype=np.float64)
    decode_s = 0.0
    for t in range(1, int(m.max())):
        running = m > t
        rows = int(running.sum()) if flop_aware else 0
        decode_s += cost.decode_seconds(float((p[running] + t).sum()), ceilings, rows)
    prefill_flops = (
        cost.layer_flops_per_token * p.sum()
        + cost.lm_head_flops_per_row * len(p)
        + cost.attn_flops_per_pair * float((p * (p + 1) / 2).sum())
    )
    prefill_s = prefill_flops / ceilings.flops
    return {"decode_s": decode_s, "prefill_s": prefill_s, "total_s": decode_s + prefill_s}
