"""Triton: per-head RMSNorm of q and k (Qwen3) fused with rotary embedding (rotate-half layout),
optionally also writing the token's K and V into the paged KV cache.

Same op order as `layers/rmsnorm.py` followed by `layers/rotary.py`, with the activation-dtype
roundings in between: norm in float32 -> dtype, times the weight -> dtype, then
`x * cos + rotate_half(x) * sin` with each product and the sum rounded to the dtype. Without the
norm (Qwen2) only the rotary part runs. q, k and v may be strided views into the packed qkv output.

`qk_norm_rope_store_kv` writes rope(k_norm(k)) and v straight into their cache slots, exactly what
`qk_norm_rope` followed by `kv_store.store_kvcache` writes, one kernel launch instead of two per
layer (the attention kernels read K/V from the cache only, so k itself is not returned).

`qk_norm_rope_store_kv` also takes q, k and v as float32 split-K partial sums of the qkv
projection (`num_parts` > 0, `kernels/linear.py` `partials`): views into the first of `num_parts`
sums `split_stride` elements apart, added up in split order and rounded to the activation dtype
(the cache's) as they are read, which is what the GEMM's own output would have held.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_enabled, pdl_launch_dependents, pdl_start, pdl_wait


@triton.jit
def _norm_rope(x1, x2, weight_ptr, cos1, cos2, sin1, sin2, eps, HAS_NORM: tl.constexpr, HEAD_DIM):
    """rope(norm(x)) of head rows split in halves x1, x2 ([R, BLOCK_HALF], x's dtype; pairs past
    HALF are zeros); cos / sin halves float32, [BLOCK_HALF] rows broadcast against x. Returns the
    two halves, rounded to x's dtype."""
    dtype = x1.dtype
    if HAS_NORM:
        half = HEAD_DIM // 2
        offs_d = tl.arange(0, x1.shape[1])[None, :]
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        ss = tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)  # [R]
        rstd = tl.math.rsqrt(ss / HEAD_DIM + eps)[:, None]
        w1 = tl.load(weight_ptr + offs_d, mask=offs_d < half, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + half + offs_d, mask=offs_d < half, other=0.0).to(tl.float32)
        x1 = (w1 * (f1 * rstd).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (f2 * rstd).to(dtype).to(tl.float32)).to(dtype)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    # x * cos + cat(-x2, x1) * sin, each product rounded to the dtype as the torch ops do.
    o1 = (f1 * cos1).to(dtype).to(tl.float32) + (-f2 * sin1).to(dtype).to(tl.float32)
    o2 = (f2 * cos2).to(dtype).to(tl.float32) + (f1 * sin2).to(dtype).to(tl.float32)
    return o1.to(dtype), o2.to(dtype)


@triton.jit
def _load_heads(src, mask, split_stride, NUM_PARTS: tl.constexpr, dtype: tl.constexpr):
    """The tile at `src`: as stored, or (NUM_PARTS > 0) the float32 sum of the NUM_PARTS partial
    sums `split_stride` elements apart, in split order, rounded to `dtype`."""
    x = tl.load(src, mask=mask, other=0.0)
    if NUM_PARTS > 0:
        for s in tl.static_range(1, NUM_PARTS):
            x += tl.load(src + s * split_stride, mask=mask, other=0.0)
        x = x.to(dtype)
    return x


@triton.jit
def _norm_rope_heads(
    x_ptr,  # [T, H, D] strided; or the first of NUM_PARTS float32 partial sums
    weight_ptr,  # [D]
    out_ptr,  # rows of H * D contiguous elements: [T, H, D] or a KV cache [.., H, D]
    out_row,  # int64 element offset of this token's row in out_ptr; < 0 (slot -1): no write
    cos1,  # [HALF] float32: the token's cos row, first half
    cos2,  # [HALF] float32: second half
    sin1,
    sin2,
    tok,
    stride_t,
    stride_h,
    num_heads,
    eps,
    split_stride,
    HAS_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NUM_PARTS: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    # A negative row (cache slot -1) has no head in range: nothing is loaded or written. (Folded
    # into the head bound: the interpreter cannot AND a scalar condition into a tensor mask.)
    mask = (offs_h < tl.where(out_row >= 0, num_heads, 0)) & (offs_d < HALF)
    src = x_ptr + tok * stride_t + offs_h * stride_h + offs_d
    dtype = out_ptr.dtype.element_ty
    x1 = _load_heads(src, mask, split_stride, NUM_PARTS, dtype)
    x2 = _load_heads(src + HALF, mask, split_stride, NUM_PARTS, dtype)
    o1, o2 = _norm_rope(
        x1,
        x2,
        weight_ptr,
        cos1[None, :],
        cos2[None, :],
        sin1[None, :],
        sin2[None, :],
        eps,
        HAS_NORM,
        HEAD_DIM,
    )
    dst = out_ptr + out_row + offs_h * HEAD_DIM + offs_d  # out_ptr is in the same dtype
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,  # [T, num_q_heads, head_dim], head_dim contiguous (NUM_PARTS: the first sum's)
    k_ptr,  # [T, num_kv_heads, head_dim], head_dim contiguous
    v_ptr,  # [T, num_kv_heads, head_dim], head_dim contiguous; read only when STORE_KV
    q_weight_ptr,  # [head_dim], read only when HAS_NORM
    k_weight_ptr,  # [head_dim], read only when HAS_NORM
    cos_ptr,  # [max_position, head_dim], contiguous
    sin_ptr,  # [max_position, head_dim], contiguous
    positions_ptr,  # [T] int32/int64
    slot_mapping_ptr,  # [T] int32/int64, slots < 0 skipped; read only when STORE_KV
    q_out_ptr,  # [T, num_q_heads, head_dim], contiguous
    k_out_ptr,  # [T, num_kv_heads, head_dim], contiguous; written only without STORE_KV
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous; STORE_KV only
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous; STORE_KV only
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    num_q_heads,
    num_kv_heads,
    q_eps,
    k_eps,
    split_stride,  # elements from one partial sum of q, k and v to the next (NUM_PARTS only)
    HAS_NORM: tl.constexpr,
    STORE_KV: tl.constexpr,  # rope(k) and v go to their cache slots instead of k_out
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # HEAD_DIM // 2
    BLOCK_HQ: tl.constexpr,  # next power of two >= num_q_heads
    BLOCK_HK: tl.constexpr,  # next power of two >= num_kv_heads
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
    EARLY_LOADS: tl.constexpr,  # the token's position, slot and cos / sin rows read before the wait
    NUM_PARTS: tl.constexpr,  # 0: q, k, v as stored; else float32 partial sums to add up
):
    if EARLY_LOADS:
        pdl_launch_dependents(PDL)
    else:
        pdl_start(PDL)
    # Program (token, part): part 0 normalises and rotates the token's q heads, part 1 its k
    # heads, part 2 (STORE_KV only) copies its v into the cache. Three short dependency chains
    # side by side instead of one long one: a decode step has only a few hundred tokens.
    tok = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    kv_row_size = num_kv_heads * HEAD_DIM  # a token's row in k_out and a cache slot's stride
    if STORE_KV:
        # int64: slot * kv_row_size can pass 2^31 in a large pool. Slot -1 (a padding row of a
        # replayed CUDA graph) writes nowhere.
        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
        k_dst_ptr = k_cache_ptr
        k_row = slot * kv_row_size
    else:
        k_dst_ptr = k_out_ptr
        k_row = tok * kv_row_size
    # The position and its cos / sin rows (v's part does not use them). With EARLY_LOADS these,
    # and the slot above, are read while the kernel before this one still runs: the engine
    # uploads positions and slots before a step's first kernel, and the tables are constants.
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    row = pos * HEAD_DIM + offs_d
    cos1 = tl.load(cos_ptr + row, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + row + HALF, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + row, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + row + HALF, mask=dmask, other=0.0).to(tl.float32)
    if EARLY_LOADS:
        pdl_wait(PDL)
    if part == 0:
        _norm_rope_heads(q_ptr, q_weight_ptr, q_out_ptr, tok * (num_q_heads * HEAD_DIM), cos1, cos2,
                         sin1, sin2, tok, stride_q_t, stride_q_h, num_q_heads, q_eps, split_stride,
                         HAS_NORM, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF, NUM_PARTS)  # fmt: skip
    elif part == 1:
        _norm_rope_heads(k_ptr, k_weight_ptr, k_dst_ptr, k_row, cos1, cos2, sin1, sin2, tok,
                         stride_k_t, stride_k_h, num_kv_heads, k_eps, split_stride, HAS_NORM,
                         HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF, NUM_PARTS)  # fmt: skip
    else:
        offs_h = tl.arange(0, BLOCK_HK)[:, None]
        offs_vd = tl.arange(0, BLOCK_D)[None, :]
        mask = (offs_h < tl.where(k_row >= 0, num_kv_heads, 0)) & (offs_vd < HEAD_DIM)
        v_src = v_ptr + tok * stride_v_t + offs_h * stride_v_h + offs_vd
        v = _load_heads(v_src, mask, split_stride, NUM_PARTS, v_cache_ptr.dtype.element_ty)
        tl.store(v_cache_ptr + k_row + offs_h * HEAD_DIM + offs_vd, v, mask=mask)


def _check_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    q_out: torch.Tensor,
    partials: bool = False,  # q and k are float32 partial sums of q_out's dtype
) -> None:
    num_tokens, _, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, (q.shape, k.shape)
    assert q.dtype == k.dtype, (q.dtype, k.dtype)
    assert q.stride(2) == 1 and k.stride(2) == 1, "head_dim must be contiguous"
    assert not partials or q.dtype == torch.float32, q.dtype
    dtype = q_out.dtype if partials else q.dtype  # the activation dtype
    assert dtype in (torch.float32, torch.float16, torch.bfloat16), dtype
    assert head_dim % 2 == 0, head_dim
    assert cos_cache.shape == sin_cache.shape and cos_cache.shape[1] == head_dim, cos_cache.shape
    assert cos_cache.is_contiguous() and sin_cache.is_contiguous()
    # Same dtypes everywhere, so no torch type promotion to mirror.
    assert cos_cache.dtype == sin_cache.dtype == dtype, (cos_cache.dtype, dtype)
    assert positions.shape == (num_tokens,), (positions.shape, num_tokens)
    assert positions.dtype in (torch.int32, torch.int64), positions.dtype
    assert (k_weight is not None) == (q_weight is not None), "q and k are normalised together"
    if q_weight is not None:
        assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
        assert q_weight.is_contiguous() and k_weight.is_contiguous()
        assert q_weight.dtype == k_weight.dtype == dtype, (q_weight.dtype, dtype)
    assert q_out.shape == q.shape and q_out.dtype == dtype and q_out.is_contiguous()


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    norm: tuple,  # (q_weight, k_weight, q_eps, k_eps); weights None without the norm
    q_out: torch.Tensor,
    k_out: torch.Tensor | None,
    store: tuple | None = None,  # (v, k_cache, v_cache, slot_mapping) for STORE_KV
    early_loads: bool = False,
    parts: tuple[int, int] = (0, 0),  # (num_parts, split_stride): q, k, v as partial sums
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    q_weight, k_weight, q_eps, k_eps = norm
    v, k_cache, v_cache, slot_mapping = store if store is not None else (None,) * 4
    has_norm = q_weight is not None
    store_kv = k_cache is not None
    half = head_dim // 2
    pdl = pdl_enabled(q)
    _qk_norm_rope_kernel[(num_tokens, 3 if store_kv else 2)](
        q_ptr=q,
        k_ptr=k,
        v_ptr=v if store_kv else k,
        q_weight_ptr=q_weight if has_norm else q,
        k_weight_ptr=k_weight if has_norm else k,
        cos_ptr=cos_cache,
        sin_ptr=sin_cache,
        positions_ptr=positions,
        slot_mapping_ptr=slot_mapping if store_kv else positions,
        q_out_ptr=q_out,
        k_out_ptr=k_cache if store_kv else k_out,
        k_cache_ptr=k_cache if store_kv else k_out,
        v_cache_ptr=v_cache if store_kv else k_out,
        stride_q_t=q.stride(0),
        stride_q_h=q.stride(1),
        stride_k_t=k.stride(0),
        stride_k_h=k.stride(1),
        stride_v_t=v.stride(0) if store_kv else 0,
        stride_v_h=v.stride(1) if store_kv else 0,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        q_eps=q_eps,
        k_eps=k_eps,
        split_stride=parts[1],
        HAS_NORM=has_norm,
        STORE_KV=store_kv,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(head_dim),
        PDL=pdl,
        EARLY_LOADS=early_loads,
        NUM_PARTS=parts[0],
        # 16 q heads x 64 pairs = 1024 elements per half: 4 warps keep 8 per thread per load.
        num_warps=4,
        launch_pdl=pdl,
    )


def qk_norm_rope(
    q: torch.Tensor,  # [T, num_q_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] int32/int64
    cos_cache: torch.Tensor,  # [max_position, head_dim]
    sin_cache: torch.Tensor,  # [max_position, head_dim]
    q_weight: torch.Tensor | None = None,  # [head_dim]
    k_weight: torch.Tensor | None = None,  # [head_dim]
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    *,
    q_out: torch.Tensor | None = None,  # [T, num_q_heads, head_dim], contiguous
    k_out: torch.Tensor | None = None,  # [T, num_kv_heads, head_dim], contiguous
    early_loads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # contiguous [T, num_q_heads, head_dim], [T, kv, hd]
    """rope(q_norm(q)), rope(k_norm(k)); with no weights, rope(q), rope(k).

    q and k may be views into the packed qkv projection (any token and head stride, head_dim
    contiguous). Outputs are contiguous tensors in q's dtype, fresh unless q_out / k_out are given;
    a program reads all the q (or all the k) heads of its token before writing them, so the
    outputs may alias q and k when those are contiguous.

    `early_loads`: launched as a programmatic dependent, each program reads its token's position
    (and slot) and cos / sin rows before it waits for the kernel before it; only for positions and
    slots that no kernel of the chain writes (the engine uploads them before the step).
    """
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _check_qk(q, k, positions, cos_cache, sin_cache, q_weight, k_weight, q_out)
    assert k_out.shape == k.shape and k_out.dtype == k.dtype and k_out.is_contiguous()
    norm = (q_weight, k_weight, q_eps, k_eps)
    _launch(q, k, positions, cos_cache, sin_cache, norm, q_out, k_out, early_loads=early_loads)
    return q_out, k_out


def qk_norm_rope_store_kv(
    q: torch.Tensor,  # [T, num_q_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] int32/int64
    cos_cache: torch.Tensor,  # [max_position, head_dim]
    sin_cache: torch.Tensor,  # [max_position, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int32/int64, slots < 0 skipped
    q_weight: torch.Tensor | None = None,  # [head_dim]
    k_weight: torch.Tensor | None = None,  # [head_dim]
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    *,
    q_out: torch.Tensor | None = None,  # [T, num_q_heads, head_dim], contiguous
    early_loads: bool = False,
    num_parts: int = 0,
    split_stride: int = 0,
) -> torch.Tensor:  # contiguous [T, num_q_heads, head_dim]
    """`qk_norm_rope`, with rope(k_norm(k)) and v written into cache slot `slot_mapping[t]`
    (block_id * block_size + offset) instead of returned: what `qk_norm_rope` followed by
    `kv_store.store_kvcache` writes, in one launch. Returns rope(q_norm(q)).

    q, k and v may be views into the packed qkv projection; q_out may alias q when q is contiguous.
    `early_loads` as in `qk_norm_rope`.

    `num_parts` > 0: q, k and v are float32 views into the first of that many split-K partial
    sums of the qkv projection, `split_stride` elements apart (`parts[0]` of a [S, T, N] tensor:
    T * N); each is their sum in split order rounded to the caches' dtype, which q_out also has.
    """
    act_dtype = k_cache.dtype if num_parts else q.dtype
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=act_dtype, device=q.device)
    _check_qk(q, k, positions, cos_cache, sin_cache, q_weight, k_weight, q_out, num_parts > 0)
    assert v.shape == k.shape and v.dtype == k.dtype and v.stride(2) == 1, (v.shape, k.shape)
    num_kv_heads, head_dim = k.shape[1:]
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    # Stored as computed: a cache in another dtype would need a cast the kernel does not do.
    assert k_cache.dtype == v_cache.dtype == act_dtype, (k_cache.dtype, act_dtype)
    if num_parts:
        # Every partial sum of every element within int32 offsets of q's first one.
        assert num_parts > 0 and split_stride > 0 and num_parts * split_stride < 2**31
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slot_mapping.shape == (q.shape[0],), (slot_mapping.shape, q.shape)
    assert slot_mapping.dtype in (torch.int32, torch.int64), slot_mapping.dtype
    norm = (q_weight, k_weight, q_eps, k_eps)
    store = (v, k_cache, v_cache, slot_mapping)
    parts = (num_parts, split_stride)
    _launch(q, k, positions, cos_cache, sin_cache, norm, q_out, None, store, early_loads, parts)
    return q_out
