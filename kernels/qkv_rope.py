"""Triton: the qkv projection at decode sizes ending in q/k RMSNorm + rotary and the KV-cache
store, so that `qk_norm_rope.qk_norm_rope_store_kv` is no kernel of its own. Opt-in
(layers.linear.ROPE_IN_GEMM_MAX_TOKENS); benchmarks/README.md has its bench_layer_chain figures.

The GEMM is kernels/linear.py's (`_gemm_tile`, the same configurations). Its epilogue, per
[BM tokens, BN columns] tile:
- v columns go straight into their cache slots;
- q and k columns are stored to a scratch [T, (q + k heads) * head_dim] buffer, then the last of
  the HEAD_DIM / BN programs of a head to finish (a counter per token tile and head) reads the
  whole head back and applies the per-head norm and the rotation with `qk_norm_rope`'s op order
  and roundings: q into q_out, k into its cache slots. Which program is last varies; what it
  computes does not.
The results equal the Triton qkv GEMM followed by `qk_norm_rope_store_kv` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .linear import (
    MAX_COLUMN_TOKENS,
    GemmConfig,
    _gemm_tile,
    _num_sms,
    gemm_config,
    supports,
)
from .pdl import device_index, pdl_enabled, pdl_start
from .qk_norm_rope import _norm_rope


@triton.jit
def _norm_rope_head_if_last(
    qk_ptr,
    q_out_ptr,
    k_cache_ptr,
    counters_ptr,
    q_weight_ptr,
    k_weight_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slot_mapping_ptr,
    M,
    head,
    offs_m,
    num_q_heads,
    num_kv_heads,
    q_eps,
    k_eps,
    HAS_QK_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    TILES_PER_HEAD: tl.constexpr,
):
    """Called by each program of a q or k head once its columns are in qk_ptr; the last one
    rotates the whole head for the tile's tokens and resets the head's counter."""
    num_qk_heads = num_q_heads + num_kv_heads
    counter = counters_ptr + tl.program_id(1) * num_qk_heads + head
    tl.debug_barrier()  # every thread's columns stored before the count says so
    if tl.atomic_add(counter, 1, sem="acq_rel") == TILES_PER_HEAD - 1:
        half = HEAD_DIM // 2
        rows = offs_m[:, None].to(tl.int64)
        offs_d = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (rows < M) & (offs_d < half)
        src = qk_ptr + rows * (num_qk_heads * HEAD_DIM) + head * HEAD_DIM + offs_d
        # .cg: from L2, where the other programs' columns are (never a stale L1 line)
        x1 = tl.load(src, mask=mask, other=0.0, cache_modifier=".cg")
        x2 = tl.load(src + half, mask=mask, other=0.0, cache_modifier=".cg")
        pos = tl.load(positions_ptr + rows, mask=rows < M, other=0).to(tl.int64)
        table = pos * HEAD_DIM + offs_d
        cos1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
        if head < num_q_heads:
            o1, o2 = _norm_rope(
                x1, x2, q_weight_ptr, cos1, cos2, sin1, sin2, q_eps, HAS_QK_NORM, HEAD_DIM
            )
            dst = q_out_ptr + rows * (num_q_heads * HEAD_DIM) + head * HEAD_DIM + offs_d
            tl.store(dst, o1, mask=mask)
            tl.store(dst + half, o2, mask=mask)
        else:
            o1, o2 = _norm_rope(
                x1, x2, k_weight_ptr, cos1, cos2, sin1, sin2, k_eps, HAS_QK_NORM, HEAD_DIM
            )
            # int64: slot * row size can pass 2^31 in a large pool; slot -1 writes nowhere
            slot = tl.load(slot_mapping_ptr + rows, mask=rows < M, other=-1).to(tl.int64)
            kv_head = head - num_q_heads
            dst = k_cache_ptr + slot * (num_kv_heads * HEAD_DIM) + kv_head * HEAD_DIM + offs_d
            tl.store(dst, o1, mask=mask & (slot >= 0))
            tl.store(dst + half, o2, mask=mask & (slot >= 0))
        tl.atomic_xchg(counter, 0)


@triton.jit(do_not_specialize=["M"])  # one compile for every batch size
def _qkv_rope_kernel(
    x_desc,  # [M, K] block [BM, BK]
    w_desc,  # [(num_q_heads + 2 * num_kv_heads) * HEAD_DIM, K] block [BN, BK]
    qk_ptr,  # [M, (num_q_heads + num_kv_heads) * HEAD_DIM] x's dtype: scratch
    q_out_ptr,  # [M, num_q_heads, HEAD_DIM] x's dtype
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM], contiguous
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM], contiguous
    slot_mapping_ptr,  # [M] int32/int64, slots < 0 skipped
    positions_ptr,  # [M] int32/int64
    cos_ptr,  # [max_position, HEAD_DIM], contiguous
    sin_ptr,  # [max_position, HEAD_DIM], contiguous
    q_weight_ptr,  # [HEAD_DIM], HAS_QK_NORM only
    k_weight_ptr,  # [HEAD_DIM], HAS_QK_NORM only
    counters_ptr,  # [cdiv(M, BM) * (num_q_heads + num_kv_heads)] int32, zero before and after
    M,
    k_len,  # K rounded up to BK
    num_q_heads,
    num_kv_heads,
    q_eps,
    k_eps,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SWAP: tl.constexpr,
    HAS_QK_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    off_n = tl.program_id(0) * BN
    off_m = tl.program_id(1) * BM
    n = (num_q_heads + 2 * num_kv_heads) * HEAD_DIM
    acc = _gemm_tile(
        x_desc, w_desc, n, 0, k_len, off_m, off_n, q_out_ptr.dtype.element_ty, BM, BN, BK,
        SWAP, False, NUM_STAGES,
    )  # fmt: skip
    y = acc.to(q_out_ptr.dtype.element_ty)
    offs_m = off_m + tl.arange(0, BM)
    rows = offs_m[:, None].to(tl.int64)
    qk_size = (num_q_heads + num_kv_heads) * HEAD_DIM
    head = off_n // HEAD_DIM
    if off_n >= qk_size:  # v: into its cache slots as it is
        slot = tl.load(slot_mapping_ptr + rows, mask=rows < M, other=-1).to(tl.int64)
        cols = off_n - qk_size + tl.arange(0, BN)[None, :]
        dst = v_cache_ptr + slot * (num_kv_heads * HEAD_DIM) + cols
        tl.store(dst, y, mask=(rows < M) & (slot >= 0))
    else:
        cols = off_n + tl.arange(0, BN)[None, :]
        tl.store(qk_ptr + rows * qk_size + cols, y, mask=rows < M)
        _norm_rope_head_if_last(
            qk_ptr, q_out_ptr, k_cache_ptr, counters_ptr, q_weight_ptr, k_weight_ptr, cos_ptr,
            sin_ptr, positions_ptr, slot_mapping_ptr, M, head, offs_m, num_q_heads, num_kv_heads,
            q_eps, k_eps, HAS_QK_NORM, HEAD_DIM, BLOCK_HALF, HEAD_DIM // BN,
        )  # fmt: skip


def num_rope_counters(num_q_heads: int, num_kv_heads: int) -> int:
    """How many int32 counters `qkv_rope_store_kv` needs at any token count it takes."""
    return triton.cdiv(MAX_COLUMN_TOKENS, 16) * (num_q_heads + num_kv_heads)


def _config(x: torch.Tensor, weight: torch.Tensor):
    num_sms = _num_sms(device_index(x) if x.is_cuda else None)
    return gemm_config(x.shape[0], weight.shape[0], x.shape[1], False, num_sms)


def supports_rope(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> bool:
    """Whether `qkv_rope_store_kv` takes this x and qkv weight: the Triton GEMM's `supports`,
    and no output tile holding columns of two heads (head_dim a multiple of its width)."""
    if not supports(x, weight):
        return False
    config = _config(x, weight)
    return config is not None and head_dim % config.block_n == 0


def qkv_rope_store_kv(
    x: torch.Tensor,  # [T, K], see `supports_rope`
    weight: torch.Tensor,  # [(num_q_heads + 2 * num_kv_heads) * head_dim, K]: q, k, v rows
    num_q_heads: int,
    positions: torch.Tensor,  # [T] int32/int64
    cos_cache: torch.Tensor,  # [max_position, head_dim]
    sin_cache: torch.Tensor,  # [max_position, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int32/int64, slots < 0 skipped
    counters: torch.Tensor,  # int32, >= num_rope_counters(...), zero; the caller's, left zero
    q_weight: torch.Tensor | None = None,  # [head_dim]
    k_weight: torch.Tensor | None = None,  # [head_dim]
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    *,
    config: tuple | None = None,  # a GemmConfig or its fields
) -> torch.Tensor:  # [T, num_q_heads, head_dim], contiguous
    """rope(q_norm(q)) of qkv = x @ weight^T, with rope(k_norm(k)) and v written into their
    cache slots: the Triton GEMM then `qk_norm_rope_store_kv`, in one launch. `counters` must
    not be shared by two launches that can run at once."""
    m, k = x.shape
    num_kv_heads, head_dim = k_cache.shape[2:]
    n = (num_q_heads + 2 * num_kv_heads) * head_dim
    assert weight.shape == (n, k), (weight.shape, n, k)
    config = _config(x, weight) if config is None else GemmConfig(*config)
    assert supports(x, weight) and config is not None and config.splits == 1, config
    _, bm, bn, bk, num_warps, num_stages, swap = config
    assert head_dim % bn == 0 and head_dim % 2 == 0, (head_dim, bn)
    assert counters.dtype == torch.int32, counters.dtype
    assert counters.numel() >= triton.cdiv(m, bm) * (num_q_heads + num_kv_heads), counters.shape
    assert cos_cache.shape == sin_cache.shape and cos_cache.shape[1] == head_dim
    assert cos_cache.is_contiguous() and sin_cache.is_contiguous()
    assert cos_cache.dtype == sin_cache.dtype == x.dtype, (cos_cache.dtype, x.dtype)
    assert positions.shape == slot_mapping.shape == (m,), (positions.shape, slot_mapping.shape)
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype == x.dtype
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert (q_weight is None) == (k_weight is None), "q and k are normalised together"
    if q_weight is not None:
        assert q_weight.shape == k_weight.shape == (head_dim,)
        assert q_weight.dtype == k_weight.dtype == x.dtype
    q_out = torch.empty((m, num_q_heads, head_dim), dtype=x.dtype, device=x.device)
    qk = torch.empty((m, (num_q_heads + num_kv_heads) * head_dim), dtype=x.dtype, device=x.device)
    pdl = pdl_enabled(x)
    _qkv_rope_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x_desc=TensorDescriptor.from_tensor(x, [bm, bk]),
        w_desc=TensorDescriptor.from_tensor(weight, [bn, bk]),
        qk_ptr=qk,
        q_out_ptr=q_out,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        slot_mapping_ptr=slot_mapping,
        positions_ptr=positions,
        cos_ptr=cos_cache,
        sin_ptr=sin_cache,
        q_weight_ptr=q_weight if q_weight is not None else q_out,
        k_weight_ptr=k_weight if k_weight is not None else q_out,
        counters_ptr=counters,
        M=m,
        k_len=triton.cdiv(k, bk) * bk,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        q_eps=q_eps,
        k_eps=k_eps,
        BM=bm,
        BN=bn,
        BK=bk,
        SWAP=swap,
        HAS_QK_NORM=q_weight is not None,
        HEAD_DIM=head_dim,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        NUM_STAGES=num_stages,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return q_out
