"""Linear layers with tensor parallelism inside them (Megatron style).

Column-parallel layers split the output features across ranks, row-parallel layers split the input
features and all-reduce the result. On one GPU at decode batch sizes a row-parallel layer may
instead hand its consumer float32 split-K partial sums (`SplitKPartials`, see
`RowParallelLinear.forward`). Every parameter carries a `weight_loader(param, loaded[, shard])`
that copies this rank's slice of a checkpoint tensor into it, so the model code stays plain.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.distributed import get_tp_group, get_tp_size
from minivllm.layers import env_count, fused_kernels

# gate/up's GEMM ends in SiLU-and-multiply up to this many tokens: measured faster at 1-16 tokens
# and slower from 64 on (benchmarks/README.md, bench_layer_chain.py).
GATED_MAX_TOKENS = 16

# In steps of up to GEMM_EARLY_MAX_TOKENS tokens each program of the Triton GEMM reads up to
# GEMM_EARLY_COLUMNS of its first weight columns before its PDL wait (kernels/linear.py
# `early`): the weights stream in while the kernel before it finishes. Faster at 1-8 running,
# slower by 0.5-1.7% at 16-64 (H100, two sessions' engine runs, benchmarks/README.md);
# MINIVLLM_GEMM_EARLY_COLUMNS=0 turns it off.
GEMM_EARLY_COLUMNS = env_count("MINIVLLM_GEMM_EARLY_COLUMNS", "weight columns", default=256)
GEMM_EARLY_MAX_TOKENS = 8


# The qkv GEMM as MINIVLLM_QKV_SPLITS float32 split-K partial sums in steps of up to
# QKV_PARTIALS_MAX_TOKENS tokens, which the q/k-norm + rotary + KV-store kernel adds up as it
# reads them (`QKVParallelLinear.forward`): at decode sizes qkv has 64 (Qwen3-0.6B) or 96 (8B)
# output tiles of 64 weight rows, too few to keep every SM reading. Off (0) by default: not yet
# timed in the engine (bench_gemm.py, H200: 4 splits 4.80 us against 5.71 at 16 tokens).
QKV_SPLITS = env_count("MINIVLLM_QKV_SPLITS", "K slices", default=0)
QKV_PARTIALS_MAX_TOKENS = 64


def _early(x: torch.Tensor) -> int:
    """The early weight columns of a Triton GEMM of x (0: none)."""
    return GEMM_EARLY_COLUMNS if x.shape[0] <= GEMM_EARLY_MAX_TOKENS else 0


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}"
        )
    return numerator // denominator


def _check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape {tuple(loaded.shape)}, expected {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Whole-tensor copy (replicated parameters: norms, unsharded weights)."""
    _check_shape(loaded, param.shape)
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        tp_dim: int | None,
        fused: bool | None = None,
    ):
        super().__init__()
        # The Triton GEMM of kernels/linear.py at decode sizes (no bias); cuBLAS otherwise.
        self.gemm = None if bias else fused_kernels("linear", fused)
        self.tp_group = get_tp_group()  # the group of the model being built
        self.tp_rank = self.tp_group.rank
        self.tp_size = self.tp_group.size
        self.tp_dim = tp_dim  # which weight dim is sharded: 0 = output, 1 = input, None = neither
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        # The unsharded shape, which weight_loader accepts (dummy weights draw it).
        full = [output_size, input_size]
        if tp_dim is not None:
            full[tp_dim] *= self.tp_size
        self.weight.full_shape = tuple(full)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
            self.bias.full_shape = (full[0],)
        else:
            self.register_parameter("bias", None)

    def _shard(self, param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor along the sharded dim."""
        if self.tp_dim is None or (self.tp_dim == 1 and loaded.dim() == 1):
            return loaded  # the row-parallel bias is added once, after the all-reduce
        size = param.shape[self.tp_dim]
        return loaded.narrow(self.tp_dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        # The whole checkpoint tensor is checked before it is sliced, so a transposed or
        # truncated tensor is named rather than failing inside narrow().
        _check_shape(loaded, param.full_shape)
        param.data.copy_(self._shard(param, loaded))

    def _triton_linear(self, x: torch.Tensor, partials: bool = False) -> bool:
        """Whether x @ W^T goes to the Triton GEMM: decode batch sizes, fp16/bf16 (its
        `supports`). Larger GEMMs stay on cuBLAS."""
        return self.gemm is not None and self.gemm.supports(x, self.weight, partials)

    def _partial_sums(self, x: torch.Tensor, splits: int = 0) -> SplitKPartials:
        """x @ W^T as the Triton GEMM's split-K partial sums (`splits`: 0, its table's count)."""
        parts = self.gemm.linear(x, self.weight, partials=True, splits=splits, early=_early(x))
        return SplitKPartials(parts, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._triton_linear(x):
            return self.gemm.linear(x, self.weight, early=_early(x))
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's output features split across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_size()
        super().__init__(input_size, _divide(output_size, tp_size, "output_size"), bias, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up_proj).

    The checkpoint stores them separately; `weight_loader(param, loaded, shard_id)` places shard
    `shard_id` (0, 1, ...) at its offset.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)
        self.gated = len(set(self.output_sizes)) == 1 and len(output_sizes) == 2

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of the two projections in the Triton GEMM's epilogue (up to
        GATED_MAX_TOKENS rows: one kernel, the [T, 2 * d] product never written), or None where
        that does not apply: the caller then runs this layer and the activation."""
        if (
            self.gated
            and self.gemm is not None
            and x.shape[0] <= GATED_MAX_TOKENS
            and self.gemm.supports(x, self.weight, gated=True)
        ):
            return self.gemm.linear(x, self.weight, gated=True, early=_early(x))
        return None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None
    ) -> None:
        if shard_id is None:  # packed: load each projection at its own offset
            _check_shape(loaded, param.full_shape)
            pieces = loaded.split(self.output_sizes, dim=0)
            for i, piece in enumerate(pieces):
                self.weight_loader(param, piece, i)
            return
        sizes = [s // self.tp_size for s in self.output_sizes]
        offset, size = sum(sizes[:shard_id]), sizes[shard_id]
        _check_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split across ranks (KV heads too).

    `weight_loader(param, loaded, shard_id)` with shard_id "q", "k" or "v".
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
    ):
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_key_value_heads")
        output_size = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id is None:  # packed: load each projection at its own offset
            _check_shape(loaded, param.full_shape)
            full = self.tp_size * self.head_dim
            sizes = [self.num_heads * full, self.num_kv_heads * full, self.num_kv_heads * full]
            for shard, piece in zip("qkv", loaded.split(sizes, dim=0)):
                self.weight_loader(param, piece, shard)
            return
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[
            shard_id
        ]
        _check_shape(loaded, (size * self.tp_size, *param.shape[1:]))
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor, partials: bool = False) -> torch.Tensor | SplitKPartials:
        """[T, q + k + v] of this rank's heads. With `partials=True` (the caller's rotary kernel
        adds partial sums up, see `Qwen3Attention`), MINIVLLM_QKV_SPLITS set and up to
        QKV_PARTIALS_MAX_TOKENS tokens on the Triton GEMM, the product comes back as split-K
        partial sums instead."""
        if (
            partials
            and QKV_SPLITS
            and x.shape[0] <= QKV_PARTIALS_MAX_TOKENS
            and self._triton_linear(x, partials=True)
        ):
            return self._partial_sums(x, QKV_SPLITS)
        return super().forward(x)


class SplitKPartials(NamedTuple):
    """A projection's output left as float32 partial sums over slices of K, [S, T, N]: y =
    parts.sum(0) rounded to `dtype`. Its consumer adds them up as it reads them, so the split
    costs no reduce launch: the fused add + RMSNorm after a row-parallel projection
    (kernels/fused_norm.py), the rotary kernel after qkv (kernels/qk_norm_rope.py)."""

    parts: torch.Tensor  # [S, T, N] float32
    dtype: torch.dtype  # the activation dtype y stands in

    def materialize(self) -> torch.Tensor:  # [T, N]
        return self.parts.sum(0).to(self.dtype)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's input features split across ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_size()
        super().__init__(_divide(input_size, tp_size, "input_size"), output_size, bias, tp_dim=1)

    def forward(self, x: torch.Tensor, partials: bool = False) -> torch.Tensor | SplitKPartials:
        """y = x W^T (+ bias). With `partials=True` (the caller feeds y to an RMSNorm with a
        residual, which accepts SplitKPartials), one GPU and few tokens, y comes back as split-K
        partial sums: at decode batch sizes this projection has too few output tiles to fill
        the GPU (kernels/linear.py)."""
        partials = partials and self.tp_size == 1
        if self._triton_linear(x, partials):
            if partials:
                return self._partial_sums(x)
            return self.tp_group.all_reduce(self.gemm.linear(x, self.weight, early=_early(x)))
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return self.tp_group.all_reduce(y)
