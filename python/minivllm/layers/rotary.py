"""Rotary position embedding (rotate-half / neox layout, as in Qwen)."""

from __future__ import annotations

import functools

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given each token's position; cos/sin are precomputed once.

    The tables are computed in float32 and stored in the dtype the model is built in, which is
    what transformers does per call (float32 math, then a cast to the activation dtype).
    """

    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        dtype = torch.get_default_dtype()
        self.register_buffer("cos_cache", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cache", emb.sin().to(dtype), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cache[positions].unsqueeze(1)  # [T, 1, head_dim]
        sin = self.sin_cache[positions].unsqueeze(1)
        return _apply(q, cos, sin), _apply(k, cos, sin)


@functools.lru_cache(maxsize=8)
def get_rotary_embedding(
    head_dim: int, max_position: int, base: float, dtype: torch.dtype, device: torch.device
) -> RotaryEmbedding:
    """One shared table per shape: every layer of a model uses the same instance."""
    return RotaryEmbedding(head_dim, max_position, base)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
