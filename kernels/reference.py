"""Plain-torch attention over the paged KV cache: the test oracle and the CPU attention backend.

Same signatures as the Triton kernels (docs/interfaces.md). Scores and softmax run in float32 and
the result is cast back to the query dtype. Vectorized over tokens; prefill loops over sequences (and
over query chunks of long sequences, to bound the [heads, q, k] score tensor).

KV cache per layer: `k_cache`, `v_cache`: [num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

import torch

# Largest score tensor (elements) that prefill builds at once: bounds memory for long prompts.
_MAX_SCORE_ELEMENTS = 1 << 26


def store_kvcache(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int32/int64, slots < 0 skipped
) -> None:
    """Write each token's K/V into its cache slot (block_id * block_size + offset)."""
    assert key.shape == value.shape and key.dim() == 3
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == key.shape[1:]
    assert slot_mapping.shape == (key.shape[0],)
    num_kv_heads, head_dim = key.shape[1:]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    flat_k[slots] = key[valid].to(k_cache.dtype)
    flat_v[slots] = value[valid].to(v_cache.dtype)


def _gather_context(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:seq_len]


def prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32, whole context (cached prefix + new tokens)
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_seqlen_q: int,
    out: torch.Tensor | None = None,  # [T, num_heads, head_dim]
    *,
    tiles: torch.Tensor | None = None,  # the Triton launch's tile table: not needed here
) -> torch.Tensor:
    """Causal attention of new tokens over their sequence's whole paged context.

    Query i of sequence b sits at position seq_lens[b] - q_len_b + i and sees keys 0..position.
    Rows without new tokens are skipped (`tiles`, a Triton grid detail, changes nothing).
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        assert q_len <= seq_len, f"sequence {b}: {q_len} new tokens but seq_len {seq_len}"
        # [num_kv_heads, 1, seq_len, head_dim]
        k = _gather_context(k_cache, block_tables[b], seq_len).float().permute(1, 0, 2)[:, None]
        v = _gather_context(v_cache, block_tables[b], seq_len).float().permute(1, 0, 2)[:, None]
        key_pos = torch.arange(seq_len, device=q.device)
        chunk = max(1, _MAX_SCORE_ELEMENTS // (num_heads * seq_len))
        for c_start in range(q_start, q_end, chunk):
            c_end = min(c_start + chunk, q_end)
            # [num_kv_heads, group, c_len, head_dim]
            qc = q[c_start:c_end].float().view(c_end - c_start, num_kv_heads, group, head_dim)
            qc = qc.permute(1, 2, 0, 3)
            scores = torch.matmul(qc, k.transpose(-1, -2)) * scale  # [kvh, group, c_len, seq_len]
            query_pos = torch.arange(c_start - q_start, c_end - q_start, device=q.device)
            query_pos = query_pos + (seq_len - q_len)
            future = key_pos[None, :] > query_pos[:, None]  # [c_len, seq_len]
            scores.masked_fill_(future, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            oc = torch.matmul(probs, v)  # [kvh, group, c_len, head_dim]
            oc = oc.permute(2, 0, 1, 3).reshape(-1, num_heads, head_dim)
            out[c_start:c_end] = oc.to(out.dtype)
    return out


def decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [B] int32; 0 marks a padding row
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with -1
    scale: float,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim]
    *,
    row_order: torch.Tensor | None = None,  # [B]: the Triton kernel's schedule; no effect here
) -> torch.Tensor:
    """One query per sequence at position seq_lens[b] - 1 over its paged context.

    Vectorized gather of every block-table entry, no host sync (so it is graph capturable); rows
    with seq_lens[b] == 0 produce zeros. `row_order` only orders the Triton kernel's work.
    """
    del row_order
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    max_blocks = block_tables.shape[1]
    blocks = block_tables.long().clamp(min=0)  # padding entries read block 0, masked below
    # [B, num_kv_heads, max_blocks * block_size, head_dim]
    k = k_cache[blocks].flatten(1, 2).transpose(1, 2).float()
    v = v_cache[blocks].flatten(1, 2).transpose(1, 2).float()
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, kvh, group, ctx]
    key_pos = torch.arange(max_blocks * block_size, device=q.device)
    past_end = key_pos[None, :] >= seq_lens.long()[:, None]  # [B, ctx]
    scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # empty rows: softmax of all -inf
    o = torch.matmul(probs, v)  # [B, kvh, group, head_dim]
    out.copy_(o.reshape(batch, num_heads, head_dim).to(out.dtype))
    return out


def resolve_placeholders(ids: torch.Tensor, prev_sampled: torch.Tensor) -> torch.Tensor:
    """ids [T] int32 (in place): every -(j + 1) becomes prev_sampled[j] (async scheduling's
    placeholder inputs; the CPU path and the oracle of kernels/input_ids.py)."""
    idx = (-1 - ids).clamp(min=0, max=prev_sampled.shape[0] - 1).long()
    return ids.copy_(torch.where(ids < 0, prev_sampled[idx].to(ids.dtype), ids))
