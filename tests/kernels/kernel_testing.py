"""Shared builders for the kernel tests: paged caches with shuffled block tables."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_paged_batch(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    extra_blocks: int = 3,
    seed: int = 0,
    device: str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and block tables (int32, -1 padded) whose blocks are shuffled."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_seq + [1])
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    return k_cache.to(device), v_cache.to(device), block_tables.to(device)


def naive_attention(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: list[int],
    seq_len: int,
    scale: float,
) -> torch.Tensor:  # [q_len, num_heads, head_dim], float32
    """Token-by-token oracle: gather keys one slot at a time, repeat KV heads, mask explicitly."""
    block_size = k_cache.shape[1]
    ks = [k_cache[block_table[p // block_size], p % block_size] for p in range(seq_len)]
    vs = [v_cache[block_table[p // block_size], p % block_size] for p in range(seq_len)]
    k = torch.stack(ks).float()  # [seq_len, kvh, d]
    v = torch.stack(vs).float()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q_len = q.shape[0]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(q_len):
        pos = seq_len - q_len + i
        s = torch.einsum("hd,khd->hk", q[i].float(), k[: pos + 1]) * scale
        p = torch.softmax(s, dim=-1)
        out[i] = torch.einsum("hk,khd->hd", p, v[: pos + 1])
    return out


def tolerances(dtype: torch.dtype, device: str = DEVICE) -> dict[str, float]:
    """Kernel vs float32 reference: fp16 rounds P before the P @ V dot; a float32 dot on a GPU runs
    in tf32; the CPU interpreter's float32 is exact up to summation order."""
    if dtype == torch.float16:
        return dict(atol=3e-3, rtol=3e-3)
    if dtype == torch.bfloat16:
        return dict(atol=2e-2, rtol=2e-2)
    if device == "cuda":
        return dict(atol=3e-3, rtol=3e-3)
    return dict(atol=2e-5, rtol=2e-5)


def poison_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so a row the kernel forgets to write fails the comparison."""
    return torch.full_like(x, float("nan"))
