"""What a layer may hand the next one instead of a finished tensor, on one GPU at decode sizes:
a row-parallel projection's split-K partial sums (`SplitKPartials`) or its product not launched
yet (`PendingProduct`, opt-in), and an RMSNorm left for the GEMM after it to apply (`NormedRows`,
opt-in). The RMSNorm (layers/rmsnorm.py) and the linear layers (layers/linear.py) take them;
each can also be made a plain tensor where its consumer cannot take it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from minivllm.kernels.linear import RowNorm
    from minivllm.layers.linear import RowParallelLinear


class SplitKPartials(NamedTuple):
    """A row-parallel projection's output left as float32 partial sums over slices of K,
    [S, T, N]: y = parts.sum(0) rounded to `dtype`. The fused add + RMSNorm that follows adds
    them up as it reads them (kernels/fused_norm.py), so the split costs no reduce launch."""

    parts: torch.Tensor  # [S, T, N] float32
    dtype: torch.dtype  # the activation dtype y stands in

    def materialize(self) -> torch.Tensor:  # [T, N]
        return self.parts.sum(0).to(self.dtype)


class PendingProduct(NamedTuple):
    """x @ W^T of a row-parallel projection, not launched yet, for the RMSNorm with a residual
    that follows (layers.linear.NORM_IN_GEMM_MAX_TOKENS): launched as split-K partial sums for the fused
    add + RMSNorm (`partials`), or with the residual add in its epilogue for a norm that the
    next GEMM applies (`add_residual`, then `NormedRows`). x may also be a split decode's
    unmerged result (paged_decode.DecodePartials, layers.attention.MERGE_SPLITS_IN_O_PROJ),
    which the product merges on the way in (kernels/merge_linear.py)."""

    x: torch.Tensor | Any  # [T, K], or DecodePartials
    layer: RowParallelLinear

    @property
    def num_tokens(self) -> int:
        x = self.x
        return len(x) if isinstance(x, torch.Tensor) else x.part_out.shape[0]

    @property
    def can_add_residual(self) -> bool:
        return self.layer.adds_residual(self.num_tokens)

    def partials(self) -> SplitKPartials:
        layer, x = self.layer, self.x
        prefetch = layer.prefetch(self.num_tokens)
        if isinstance(x, torch.Tensor):
            parts = layer.gemm.linear(x, layer.weight, partials=True, prefetch=prefetch)
        else:
            parts = merge_linear_kernels().merge_linear(x, layer.weight, prefetch=prefetch)
        return SplitKPartials(parts, x.dtype)

    def add_residual(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h = residual + x @ W^T [T, N], h's squares summed per column tile [C, T])."""
        layer, x = self.layer, self.x
        add = layer.gemm.linear_add_residual
        if not isinstance(x, torch.Tensor):
            add = merge_linear_kernels().merge_linear_add_residual
        prefetch = layer.prefetch(self.num_tokens)
        return add(x, layer.weight, residual, layer.tile_counters, prefetch=prefetch)


def merge_linear_kernels() -> ModuleType:
    """kernels/merge_linear.py, imported where a split decode needs it."""
    return importlib.import_module("minivllm.kernels.merge_linear")


class NormedRows(NamedTuple):
    """rmsnorm(h) * weight, left for the GEMM that reads it to compute as it loads h
    (kernels/linear.py `linear(norm=)`); `materialize` where that GEMM is cuBLAS."""

    h: torch.Tensor  # [T, K]
    sumsq: torch.Tensor  # [C, T] float32: h's squares summed over C column tiles
    weight: torch.Tensor  # [K]
    eps: float

    def row_norm(self) -> RowNorm:
        from minivllm.kernels.linear import RowNorm

        return RowNorm(self.sumsq, self.weight, self.eps)

    def materialize(self) -> torch.Tensor:  # [T, K]
        from minivllm.kernels.fused_norm import rmsnorm

        return rmsnorm(self.h, self.weight, self.eps)
