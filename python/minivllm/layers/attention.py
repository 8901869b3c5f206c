"""Paged attention layer: writes new K/V into the cache, then dispatches to a kernel backend.

A step's tokens are decodes first (one token each), then prefill chunks; the layer runs
`decode_attention` on the first part and `prefill_attention` on the rest, with the metadata the
model runner built once for the step (passed explicitly, never through a global).

With the triton backend the K/V write can move into the q/k-norm + rotary kernel, saving a launch
per layer: the model hands `Attention.kv_write(v, meta)` to the rotary layer, which, when its fused
kernel runs, stores k and v itself and returns k = None; the attention layer stores only a k it is
given. Every other path (torch backend, CPU, MINIVLLM_FUSED_KERNELS=0) gets k back and stores here.

With the "decode_fused_rope" experiment a decode-only step of at most DECODE_FUSED_ROPE_MAX_ROWS
rows goes one step further: the rotary layer returns q unroped and, in k's place, a `DeferredRope`
that this layer hands to the decode kernel, which applies the norm and rotary and stores k and v.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from minivllm.experiments import experiment_on

# The largest decode-only step whose rotary runs inside the decode kernel (the CUDA-graph decode
# buckets up to 16): with many rows, session 5 measured the fused form slower than two kernels
# (docs/benchmark_history.md), while small steps are bound by their kernel boundaries.
DECODE_FUSED_ROPE_MAX_ROWS = 16


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
    # The step is one the decode kernel finishes the rotary of (see DeferredRope).
    rope_in_decode: bool = False


@dataclass(frozen=True)
class DeferredRope:
    """What the rotary layer returns in k's place when the decode kernel is to apply the q/k norm
    and rotary itself and store the new K/V (KVCacheWrite.rope_in_decode): q came back unroped."""

    k: torch.Tensor  # [T, num_kv_heads, head_dim] unroped
    positions: torch.Tensor  # [T]
    cos_cache: torch.Tensor  # [max_position, head_dim]
    sin_cache: torch.Tensor  # [max_position, head_dim]
    q_weight: torch.Tensor | None  # [head_dim], the q/k norms' weights (Qwen3) or None
    k_weight: torch.Tensor | None
    q_eps: float
    k_eps: float


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    can_fuse_kv_store: bool  # the rotary kernel may write the KV cache (see KVCacheWrite)
    store_kvcache: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    # The prefill kernel's variant with its tiles loaded through TMA (the "prefill_tma"
    # experiment), or None where the backend has none.
    prefill_attention_tma: Callable[..., torch.Tensor] | None = None
    # Decode attention that applies the q/k norm and rotary and stores the new K/V itself (the
    # "decode_fused_rope" experiment), or None where the backend has none.
    decode_attention_rope: Callable[..., torch.Tensor] | None = None


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
        prefill_attention_tma=(
            functools.partial(mods.prefill._prefill_attention, variant="tma")
            if name == "triton"
            else None
        ),
        decode_attention_rope=mods.decode.decode_attention_rope if name == "triton" else None,
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
        self.prefill_attention = backend.prefill_attention
        # Opt-in until measured (minivllm.experiments): the prefill tiles through TMA.
        if backend.prefill_attention_tma is not None and experiment_on("prefill_tma"):
            self.prefill_attention = backend.prefill_attention_tma
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache = torch.empty(0)
        # Opt-in until measured (minivllm.experiments): a split decode merges its splits in its
        # last split program instead of a reduce kernel (the triton backend; torch ignores it).
        self.decode_fused_reduce = experiment_on("decode_fused_reduce")
        # Opt-in until measured: small decode-only steps finish the rotary in the decode kernel
        # (which takes power-of-two head sizes only).
        self.decode_fused_rope = (
            backend.decode_attention_rope is not None
            and head_dim & (head_dim - 1) == 0
            and experiment_on("decode_fused_rope")
        )

    def kv_write(self, v: torch.Tensor, meta: AttentionMetadata) -> KVCacheWrite | None:
        """This step's cache write for the rotary kernel to fuse, or None when the backend keeps
        its own store. v: [T, num_kv_heads, head_dim]."""
        if not self.backend.can_fuse_kv_store:
            return None
        rope_in_decode = (
            self.decode_fused_rope
            and meta.max_prefill_query_len == 0
            and meta.num_decodes == v.shape[0]
            and meta.num_decodes <= DECODE_FUSED_ROPE_MAX_ROWS
        )
        return KVCacheWrite(v, self.k_cache, self.v_cache, meta.slot_mapping, rope_in_decode)

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        # [T, num_kv_heads, head_dim]; None: k and v already stored; a DeferredRope: q and k are
        # unroped, the decode kernel finishes them (a decode-only step)
        k: torch.Tensor | DeferredRope | None,
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store this step's k and v (unless the rotary kernel did: k is None), then attend. The
        attention kernels read K/V from the cache only, except the decode kernel handed a
        DeferredRope, which stores the new token's K/V and uses it from registers."""
        backend = self.backend
        if isinstance(k, DeferredRope):
            assert meta.num_decodes == q.shape[0] and meta.max_prefill_query_len == 0
            return backend.decode_attention_rope(
                q,
                k.k,
                v,
                k.positions,
                k.cos_cache,
                k.sin_cache,
                self.k_cache,
                self.v_cache,
                meta.slot_mapping,
                meta.decode_seq_lens,
                meta.decode_block_tables,
                self.scale,
                k.q_weight,
                k.k_weight,
                k.q_eps,
                k.k_eps,
                out=torch.empty(q.shape, dtype=q.dtype, device=q.device),
                row_order=meta.decode_row_order,
                fused_reduce=self.decode_fused_reduce,
            )
        if k is not None:
            backend.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd > 0:
            backend.decode_attention(
                q[:nd],
                self.k_cache,
                self.v_cache,
                meta.decode_seq_lens,
                meta.decode_block_tables,
                self.scale,
                out=out[:nd],
                row_order=meta.decode_row_order,
                fused_reduce=self.decode_fused_reduce,
            )
        if meta.max_prefill_query_len > 0:
            self.prefill_attention(
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
