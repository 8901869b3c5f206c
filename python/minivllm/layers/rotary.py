"""Rotary position embedding (rotate-half / neox layout, as in Qwen).

On CUDA one Triton kernel (`kernels/qk_norm_rope.py`) applies the optional per-head q/k RMSNorm and
the rotation to q and k together, and, handed the attention layer's `KVCacheWrite`, also writes
rope(k) and v into the KV cache (and then may take the qkv projection as split-K partial sums);
the torch code below is the CPU path and the kernel's oracle.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from minivllm import layers
from minivllm.layers import env_switch, fused_kernels

if TYPE_CHECKING:
    from minivllm.layers.attention import KVCacheWrite
    from minivllm.layers.linear import SplitKPartials
    from minivllm.layers.rmsnorm import RMSNorm

# The fused kernel reads each token's position, slot and cos / sin rows before its PDL wait
# (`early_loads`): the engine uploads positions and slots before a step's first kernel.
# MINIVLLM_ROPE_EARLY_LOADS=0 times the engine without it (read when the layer is built).
ROPE_EARLY_LOADS = env_switch("MINIVLLM_ROPE_EARLY_LOADS", True)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given each token's position; cos/sin are precomputed once.

    The tables are computed in float32 and stored in the dtype the model is built in, which is
    what transformers does per call (float32 math, then a cast to the activation dtype).
    """

    def __init__(self, head_dim: int, max_position: int, base: float, fused: bool | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.kernels = fused_kernels("qk_norm_rope", fused)
        self.early_loads = ROPE_EARLY_LOADS
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        dtype = torch.get_default_dtype()
        self.register_buffer("cos_cache", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cache", emb.sin().to(dtype), persistent=False)

    def fuses(self, dtype: torch.dtype, q_norm: RMSNorm | None, k_norm: RMSNorm | None) -> bool:
        """Whether `forward` takes the fused kernel for q and k of activation dtype `dtype`."""
        return (
            self.kernels is not None
            and dtype == self.cos_cache.dtype
            and (q_norm is None or q_norm.weight.dtype == k_norm.weight.dtype == dtype)
        )

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        kv_write: KVCacheWrite | None = None,
        partials: SplitKPartials | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rope(q), rope(k); with q_norm / k_norm (Qwen3), rope(q_norm(q)), rope(k_norm(k)).

        With `kv_write` (from `Attention.kv_write`) and the fused kernel in use, that kernel
        writes rope(k) and kv_write.value into the layer's KV cache and k comes back as None:
        nothing is left for the attention layer to store. Off the fused path (CPU,
        MINIVLLM_FUSED_KERNELS=0, a dtype the kernel does not take) kv_write is ignored and k is
        returned for the attention layer's own store.

        `partials`: the qkv projection's split-K partial sums, of which q, k and kv_write.value
        are views into the first (`partials.parts[0]`); only for the fused kernel with the KV
        store (`fuses`, and a kv_write of the cache in `partials.dtype`).
        """
        assert (q_norm is None) == (k_norm is None)
        dtype = q.dtype if partials is None else partials.dtype
        fused = self.fuses(dtype, q_norm, k_norm)
        stores_kv = fused and kv_write is not None and kv_write.k_cache.dtype == dtype
        assert partials is None or stores_kv, "split-K partial sums need the fused KV store"
        if not fused:
            if q_norm is not None:
                q = q_norm(q)
                k = k_norm(k)
            cos = self.cos_cache[positions].unsqueeze(1)  # [T, 1, head_dim]
            sin = self.sin_cache[positions].unsqueeze(1)
            return _apply(q, cos, sin), _apply(k, cos, sin)
        norm_args = {
            "q_weight": q_norm.weight if q_norm is not None else None,
            "k_weight": k_norm.weight if k_norm is not None else None,
            "q_eps": q_norm.eps if q_norm is not None else 0.0,
            "k_eps": k_norm.eps if k_norm is not None else 0.0,
            "early_loads": self.early_loads,
        }
        if not stores_kv:
            return self.kernels.qk_norm_rope(
                q, k, positions, self.cos_cache, self.sin_cache, **norm_args
            )
        if partials is not None:
            norm_args["num_parts"] = partials.parts.shape[0]
            norm_args["split_stride"] = partials.parts.stride(0)
        q = self.kernels.qk_norm_rope_store_kv(
            q,
            k,
            kv_write.value,
            positions,
            self.cos_cache,
            self.sin_cache,
            kv_write.k_cache,
            kv_write.v_cache,
            kv_write.slot_mapping,
            **norm_args,
        )
        return q, None


def get_rotary_embedding(
    head_dim: int, max_position: int, base: float, dtype: torch.dtype, device: torch.device
) -> RotaryEmbedding:
    """One shared table per shape: every layer of a model uses the same instance (one per
    fused-kernel choice too: a model built with the fused layers never gets an unfused one)."""
    return _shared_rotary(
        head_dim, max_position, base, dtype, device, layers.fused_kernels_on(device)
    )


@functools.lru_cache(maxsize=8)
def _shared_rotary(
    head_dim: int,
    max_position: int,
    base: float,
    dtype: torch.dtype,
    device: torch.device,
    fused: bool,
) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, base, fused)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
