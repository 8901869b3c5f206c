"""Paged attention layer: writes new K/V into the cache, then dispatches to a kernel backend.

A step's tokens are decodes first (one token each), then prefill chunks; the layer runs
`decode_attention` on the first part and `prefill_attention` on the rest, with the metadata the
model runner built once for the step (passed explicitly, never through a global).

With the triton backend the K/V write can move into the q/k-norm + rotary kernel, saving a launch
per layer: the model hands `Attention.kv_write(v, meta)` to the rotary layer, which, when its fused
kernel runs, stores k and v itself and returns k = None; the attention layer stores only a k it is
given. Every other path (torch backend, CPU, MINIVLLM_FUSED_KERNELS=0) gets k back and stores here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from minivllm.layers import env_switch

# Triton backend, decode-only steps: the decode kernel reads its first key tile before its PDL
# wait (`early_loads`: 1-3.5% faster at 1, 16 and 32 running, even at 8; benchmarks/README.md).
# Read when a layer is built, so that MINIVLLM_DECODE_EARLY_LOADS=0 times the engine without it.
DECODE_EARLY_LOADS = env_switch("MINIVLLM_DECODE_EARLY_LOADS", True)


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer. Tensors live on the model's device."""

    num_decodes: int  # the first num_decodes tokens (and rows) are decodes
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    decode_seq_lens: torch.Tensor  # [num_decodes]
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1], starting at 0
    prefill_seq_lens: torch.Tensor  # [num_prefills]
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks]
    max_prefill_query_len: int  # 0 when there is no prefill row
    # A CUDA-graph step's fixed-grid tile table for the prefill kernel (triton backend), or None
    # (see flash_prefill.build_tile_table); with it, rows past the step's end have no tiles.
    prefill_tiles: torch.Tensor | None = None
    # A decode CUDA-graph step's rows, longest context first (the order the decode kernel's
    # programs take them in: the longest no longer form the grid's tail), or None.
    decode_row_order: torch.Tensor | None = None  # [num_decodes] int32

    @property
    def num_prefills(self) -> int:
        return self.prefill_seq_lens.shape[0]


@dataclass(frozen=True)
class KVCacheWrite:
    """One layer's K/V cache write, handed to the fused q/k-norm + rotary kernel to do instead of
    the attention layer's store (same slots and layout as `store_kvcache`)."""

    value: torch.Tensor  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [T] cache slot of each new token, < 0 for none


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    can_fuse_kv_store: bool  # the rotary kernel may write the KV cache (see KVCacheWrite)
    store_kvcache: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]


def get_attention_backend(name: str) -> AttentionBackend:
    """'torch' (plain-torch reference, CPU default) or 'triton' (CUDA default), imported lazily."""
    if name == "torch":
        ref = importlib.import_module("minivllm.kernels.reference")
        mods = SimpleNamespace(store=ref, prefill=ref, decode=ref)
    elif name == "triton":
        mods = SimpleNamespace(
            store=importlib.import_module("minivllm.kernels.kv_store"),
            prefill=importlib.import_module("minivllm.kernels.flash_prefill"),
            decode=importlib.import_module("minivllm.kernels.paged_decode"),
        )
    else:
        raise ValueError(f"unknown attention backend {name!r}; use 'torch' or 'triton'")
    return AttentionBackend(
        name=name,
        # The torch backend is the reference: it keeps its own store.
        can_fuse_kv_store=name == "triton",
        store_kvcache=mods.store.store_kvcache,
        prefill_attention=mods.prefill.prefill_attention,
        decode_attention=mods.decode.decode_attention,
    )


class Attention(nn.Module):
    """Attention over the paged KV cache. The model runner assigns `k_cache`/`v_cache` (this
    layer's slices of the pool) once, after sizing the pool."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache = torch.empty(0)
        # The decode kernel's options for decode-only steps (see DECODE_EARLY_LOADS above).
        self.decode_options: dict[str, Any] = {}
        if backend.name == "triton" and DECODE_EARLY_LOADS:
            self.decode_options["early_loads"] = True

    def fuses_kv_store(self, dtype: torch.dtype) -> bool:
        """Whether `kv_write` hands the rotary kernel a write it can do for k and v of `dtype`
        (the backend allows it and the cache has that dtype)."""
        return self.backend.can_fuse_kv_store and self.k_cache.dtype == dtype

    def kv_write(self, v: torch.Tensor, meta: AttentionMetadata) -> KVCacheWrite | None:
        """This step's cache write for the rotary kernel to fuse, or None when the backend keeps
        its own store. v: [T, num_kv_heads, head_dim]."""
        if not self.backend.can_fuse_kv_store:
            return None
        return KVCacheWrite(v, self.k_cache, self.v_cache, meta.slot_mapping)

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor | None,  # [T, num_kv_heads, head_dim]; None: k and v already stored
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store this step's k and v (unless the rotary kernel did: k is None), then attend. The
        attention kernels read K/V from the cache only."""
        backend = self.backend
        if k is not None:
            backend.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd > 0:
            decode_only = meta.max_prefill_query_len == 0
            backend.decode_attention(
                q[:nd],
                self.k_cache,
                self.v_cache,
                meta.decode_seq_lens,
                meta.decode_block_tables,
                self.scale,
                out=out[:nd],
                row_order=meta.decode_row_order,
                **(self.decode_options if decode_only else {}),
            )
        if meta.max_prefill_query_len > 0:
            backend.prefill_attention(
                q[nd:],
                self.k_cache,
                self.v_cache,
                meta.prefill_cu_seqlens_q,
                meta.prefill_seq_lens,
                meta.prefill_block_tables,
                self.scale,
                meta.max_prefill_query_len,
                out=out[nd:],
                tiles=meta.prefill_tiles,
            )
        return out
