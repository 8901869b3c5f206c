"""Triton: resolve a step's placeholder input ids (async scheduling) on the device.

With async scheduling the core plans step N before step N-1's tokens reach the host; a decode
whose input is one of them gets input id -(j + 1), "sampled row j of the previous step". This
kernel replaces those ids, in place, with the previous step's sampled ids, which the model runner
keeps in a persistent device buffer. One launch, no host sync: it is captured in the decode
graphs. The plain-torch version is `reference.resolve_placeholders`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _resolve_placeholders_kernel(
    ids_ptr,  # [n] int32, in place: -(j + 1) -> prev[j]
    prev_ptr,  # [max_seqs] the previous step's sampled ids (int64)
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    placeholder = mask & (ids < 0)
    prev = tl.load(prev_ptr + (-1 - ids), mask=placeholder, other=0)
    tl.store(ids_ptr + offs, prev.to(tl.int32), mask=placeholder)


def resolve_placeholders(ids: torch.Tensor, prev_sampled: torch.Tensor) -> torch.Tensor:
    """ids [T] int32 (in place): every -(j + 1) becomes prev_sampled[j]; returns ids."""
    assert ids.dim() == 1 and ids.dtype == torch.int32 and ids.is_contiguous()
    assert prev_sampled.dim() == 1 and prev_sampled.is_contiguous()
    n = ids.shape[0]
    if n:
        block = 1024  # a decode step has at most max_num_seqs ids: one program in practice
        _resolve_placeholders_kernel[(triton.cdiv(n, block),)](
            ids_ptr=ids, prev_ptr=prev_sampled, n=n, BLOCK=block
        )
    return ids
