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


def test_decode_fused_rope_only_for_small_decode_only_steps(monkeypatch) -> None:
    """Read when the attention layer is built (triton backend only); its cache write asks the
    rotary layer to leave q and k to the decode kernel only in decode-only steps of <= 16 rows."""
    import torch
    from minivllm.layers.attention import (
        DECODE_FUSED_ROPE_MAX_ROWS,
        Attention,
        AttentionMetadata,
        get_attention_backend,
    )

    def meta(num_decodes: int, num_tokens: int) -> AttentionMetadata:
        ints = torch.zeros(num_tokens, dtype=torch.int32)
        return AttentionMetadata(
            num_decodes=num_decodes,
            slot_mapping=ints,
            decode_seq_lens=ints[:num_decodes],
            decode_block_tables=torch.zeros(num_decodes, 4, dtype=torch.int32),
            prefill_cu_seqlens_q=torch.tensor([0, num_tokens - num_decodes], dtype=torch.int32),
            prefill_seq_lens=ints[:1] if num_tokens > num_decodes else ints[:0],
            prefill_block_tables=torch.zeros(0, 4, dtype=torch.int32),
            max_prefill_query_len=num_tokens - num_decodes,
        )

    def rope_in_decode(layer: Attention, num_decodes: int, num_tokens: int) -> bool:
        v = torch.zeros(num_tokens, 2, 16)
        return layer.kv_write(v, meta(num_decodes, num_tokens)).rope_in_decode

    triton_backend = get_attention_backend("triton")
    monkeypatch.delenv("MINIVLLM_EXPERIMENTS", raising=False)
    assert not rope_in_decode(Attention(4, 2, 16, 0.25, triton_backend), 4, 4)
    monkeypatch.setenv("MINIVLLM_EXPERIMENTS", "decode_fused_rope")
    layer = Attention(4, 2, 16, 0.25, triton_backend)
    assert layer.decode_fused_rope
    assert rope_in_decode(layer, 1, 1)
    assert rope_in_decode(layer, DECODE_FUSED_ROPE_MAX_ROWS, DECODE_FUSED_ROPE_MAX_ROWS)
    assert not rope_in_decode(layer, DECODE_FUSED_ROPE_MAX_ROWS + 1, DECODE_FUSED_ROPE_MAX_ROWS + 1)
    assert not rope_in_decode(layer, 2, 5)  # a prefill chunk in the step
    assert not Attention(4, 2, 16, 0.25, get_attention_backend("torch")).decode_fused_rope
    assert not Attention(4, 2, 24, 0.25, triton_backend).decode_fused_rope  # not a power of two
