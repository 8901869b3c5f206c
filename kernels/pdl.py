"""Programmatic dependent launch (PDL, Hopper and newer) for the kernels of a decode step.

A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it in the stream
is still running: its programs start, and wait (`griddepcontrol.wait`) until that kernel has
finished and its writes are visible. Each per-layer kernel calls `pdl_start` first, so none of it
runs before the wait, and its own dependents may launch at once. With every kernel of a layer in
the chain (the GEMMs are Triton too, kernels/linear.py), a kernel's launch and ramp-up overlap the
tail of the one before, which shortens every layer of a decode step (`bench_layer_chain.py`, and
`bench_throughput.py` run with MINIVLLM_PDL=0 against without).

The wait covers the previous kernel only; since every kernel in the chain waits before it ends,
the kernels before that one have finished too. A kernel after a non-PDL one (cuBLAS, NCCL, torch)
starts as usual, once it has finished. MINIVLLM_PDL=0 turns PDL off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_PDL = os.environ.get("MINIVLLM_PDL", "1") != "0"


def device_index(x: torch.Tensor) -> int:
    """The index of the CUDA device x lives on."""
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def sm90_or_newer(x: torch.Tensor) -> bool:
    """Whether x lives on a CUDA GPU of compute capability 9.0 or newer (Hopper on)."""
    return x.is_cuda and _capability_major(device_index(x)) >= 9


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether kernels on x's device launch as programmatic dependents (CUDA, sm_90 and newer)."""
    return _PDL and sm90_or_newer(x)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of a PDL kernel: let the next kernel launch, then wait for the last one."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """`pdl_start`'s first half, for a kernel that reads what no kernel of the step writes (the
    step's uploaded arrays, KV of earlier steps) before it waits: let the next kernel launch."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """`pdl_start`'s second half: wait for the kernel before this one (every program of a PDL
    kernel waits before it ends, so the kernels before that one have finished too)."""
    if PDL:
        gdc_wait()
