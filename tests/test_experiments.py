"""The opt-in switch for unmeasured kernel paths (minivllm.experiments)."""

from __future__ import annotations

import pytest
from minivllm.experiments import EXPERIMENTS, enabled_experiments, experiment_on


def test_names_and_all() -> None:
    assert enabled_experiments("") == frozenset()
    assert enabled_experiments(" gated_mlp ,") == {"gated_mlp"}
    assert enabled_experiments("all") == frozenset(EXPERIMENTS)


def test_an_unknown_name_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'gated_mpl'"):
        enabled_experiments("gated_mpl")


def test_read_when_a_layer_is_built(monkeypatch) -> None:
    from minivllm.layers.attention import Attention, get_attention_backend
    from minivllm.layers.embedding import ParallelLMHead
    from minivllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    def attention() -> Attention:
        return Attention(4, 2, 16, 0.25, get_attention_backend("torch"))

    monkeypatch.delenv("MINIVLLM_EXPERIMENTS", raising=False)
    assert not experiment_on("gated_mlp")
    assert not MergedColumnParallelLinear(64, [32, 32]).gated
    assert ParallelLMHead(128, 64, fused=True).gemm is None
    assert not attention().decode_fused_reduce
    assert RowParallelLinear(64, 32, fused=True).norm_gemm is None
    monkeypatch.setenv(
        "MINIVLLM_EXPERIMENTS", "gated_mlp,lm_head_gemm,decode_fused_reduce,splitk_norm"
    )
    assert MergedColumnParallelLinear(64, [32, 32]).gated
    assert not MergedColumnParallelLinear(64, [32, 16]).gated  # not a gate/up pair
    assert ParallelLMHead(128, 64, fused=True).gemm is not None
    assert attention().decode_fused_reduce
    assert RowParallelLinear(64, 32, fused=True).norm_gemm is not None
    assert RowParallelLinear(64, 32, fused=False).norm_gemm is None  # the torch path: cuBLAS
    assert RowParallelLinear(64, 32, bias=True, fused=True).norm_gemm is None


def test_prefill_tma_is_read_when_the_attention_layer_is_built(monkeypatch) -> None:
    from minivllm.layers.attention import Attention, get_attention_backend

    triton_backend, torch_backend = get_attention_backend("triton"), get_attention_backend("torch")
    monkeypatch.delenv("MINIVLLM_EXPERIMENTS", raising=False)
    layer = Attention(4, 2, 32, 0.1, triton_backend)
    assert layer.prefill_attention is triton_backend.prefill_attention
    monkeypatch.setenv("MINIVLLM_EXPERIMENTS", "prefill_tma")
    layer = Attention(4, 2, 32, 0.1, triton_backend)
    assert layer.prefill_attention is triton_backend.prefill_attention_tma
    assert layer.prefill_attention.keywords == {"variant": "tma"}
    # the torch backend (the reference) has no variant
    assert (
        Attention(4, 2, 32, 0.1, torch_backend).prefill_attention is torch_backend.prefill_attention
    )
