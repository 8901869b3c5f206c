"""Triton: asking L2 for weights a later kernel of the decode step will read (Hopper's bulk L2
prefetch), so that kernel reads them from L2 instead of waiting on HBM. Opt-in, not measured yet
(layers.linear.L2_PREFETCH_MAX_TOKENS).

At one to a few tokens a decode step's GEMMs read their weights at a fraction of the card's
bandwidth: each is too short for its loads to reach full speed before it ends, and the next one
starts cold. A GEMM that prefetches the next GEMM's weights while it and the kernels between run
(attention, norms) spreads the step's HBM reads over the whole step, which is what a persistent
"megakernel" buys, with the kernels kept as they are. The prefetch is a hint: no result depends
on it, and it is never issued on the CPU (the interpreter has no inline assembly).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .pdl import sm90_or_newer


@triton.jit
def l2_prefetch(ptr, nbytes, LANES: tl.constexpr):
    """This program's share of [ptr, ptr + nbytes) prefetched into L2, split evenly over the
    grid's programs and over LANES lanes (32 x the launch's warps, one chunk each). Issued only
    by the hardware's bulk prefetch (no registers, no wait): call it first in the kernel, before
    any PDL wait, since weights are nobody's output. nbytes and ptr: multiples of 16."""
    num_programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(
        0
    ) + tl.program_id(0)
    # Chunks of a multiple of 16 bytes (the instruction's unit), at most 2^31 - 16.
    chunk = tl.cdiv(tl.cdiv(nbytes, num_programs * LANES), 16) * 16
    start = (pid * LANES + tl.arange(0, LANES)).to(tl.int64) * chunk
    size = tl.minimum(tl.maximum(nbytes - start, 0), chunk).to(tl.int32)
    tl.inline_asm_elementwise(
        asm="{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        constraints="=r,l,r",
        args=[ptr.to(tl.pointer_type(tl.int8)) + start, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def can_prefetch(x: torch.Tensor, prefetch: torch.Tensor | None) -> bool:
    """Whether a kernel on x's device issues the L2 prefetch of `prefetch`: CUDA, Hopper or
    newer, a contiguous tensor on 16-byte boundaries."""
    return (
        prefetch is not None
        and sm90_or_newer(x)
        and prefetch.is_contiguous()
        and prefetch.data_ptr() % 16 == 0
        and (prefetch.numel() * prefetch.element_size()) % 16 == 0
    )


def prefetch_args(
    x: torch.Tensor, prefetch: torch.Tensor | None, placeholder: torch.Tensor, num_warps: int
) -> dict[str, Any]:
    """The launch arguments of a kernel that calls `l2_prefetch` (prefetch_ptr, prefetch_bytes,
    PREFETCH, PREFETCH_LANES): `prefetch` where `can_prefetch`, else off (`placeholder` stands
    in for the pointer)."""
    on = can_prefetch(x, prefetch)
    return {
        "prefetch_ptr": prefetch if on else placeholder,
        "prefetch_bytes": prefetch.numel() * prefetch.element_size() if on else 0,
        "PREFETCH": on,
        "PREFETCH_LANES": 32 * num_warps,
    }
