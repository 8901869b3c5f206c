"""Sampling on the model's device: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Randomness without torch.Generator: each sampled row gets one uniform number u derived on the host
from (request seed, sequence length) by a counter-based hash (the scheduler writes it into the
Batch; `engine.reference.sampling_uniforms` is the formula), and the token
is drawn by inverting the row's filtered CDF at u. A request's draws therefore depend only on its
seed and its own tokens, never on what else is in the batch, and cost one number per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivllm.layers import fused_kernels


@dataclass
class SamplingTensors:
    """Per sampled row, on the device; the flags are host-side so no step syncs to decide."""

    temperature: torch.Tensor  # [S] float32, 0 = greedy
    top_k: torch.Tensor  # [S] int32, 0 = off
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    uniforms: torch.Tensor  # [S] float32 in [0, 1)
    all_greedy: bool
    any_top_k_or_p: bool
    any_min_p: bool


class Sampler(nn.Module):
    def __init__(self, fused: bool | None = None):
        super().__init__()
        self.kernels = fused_kernels("sampling", fused)

    def forward(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        """logits [S, V] -> sampled token ids [S] (int64)."""
        if self.kernels is not None and not (st.any_top_k_or_p or st.any_min_p):
            return self._sample_fused(logits, st)
        return sample_torch(logits, st)

    def _sample_fused(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        """No row filters: argmax, or the fused Triton sampler (softmax + inverse CDF, split
        over vocabulary chunks)."""
        if st.all_greedy:
            return logits.argmax(dim=-1)  # exact in the logits' dtype: no float copy needed
        # top_k == 1 rows are greedy; any other top_k reaching here keeps the whole vocabulary.
        return self.kernels.sample_from_logits(
            logits, st.temperature, st.uniforms, st.top_k.to(torch.int32)
        )


def sample_torch(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """The plain-torch sampler: every filter, any device (the CPU path and the kernel's oracle)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if st.all_greedy:
        return greedy
    is_greedy = (st.temperature == 0) | (st.top_k == 1)
    temperature = torch.where(is_greedy, torch.ones_like(st.temperature), st.temperature)
    logits = logits / temperature.unsqueeze(1)
    u = st.uniforms.unsqueeze(1)  # [S, 1]
    if st.any_top_k_or_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = _filtered_probs(sorted_logits, st, is_sorted=True)
        picked = _invert_cdf(probs, u)
        sampled = order.gather(1, picked.unsqueeze(1)).squeeze(1)
    else:
        probs = _filtered_probs(logits, st, is_sorted=False)
        sampled = _invert_cdf(probs, u)
    return torch.where(is_greedy, greedy, sampled)


def _filtered_probs(logits: torch.Tensor, st: SamplingTensors, is_sorted: bool) -> torch.Tensor:
    """Softmax after top-k, top-p (only when `logits` is sorted descending) and min-p."""
    if is_sorted:
        vocab = logits.shape[1]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
        k = torch.where(st.top_k > 0, st.top_k, vocab).unsqueeze(1)
        logits = logits.masked_fill(ranks >= k, float("-inf"))
        probs = logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= st.top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if st.any_min_p:
        max_prob = probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < st.min_p.unsqueeze(1) * max_prob, 0.0)
    return probs


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index i with cdf[i] > u * total: a token drawn with probability probs[i] / total.

    The target is kept strictly below the total, so some cdf entry exceeds it, and the entry found
    has cdf[i] > cdf[i-1], i.e. a positive probability: filtered tokens are never chosen.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)
