"""Qwen3 (and Qwen2, the same layout plus qkv bias and without q/k norm) for causal LM.

Reads like a plain model: tensor parallelism lives in the layer classes, and the paged-attention
metadata comes in as an explicit argument.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from minivllm.layers.activation import SiluAndMul
from minivllm.layers.attention import Attention, AttentionBackend, AttentionMetadata
from minivllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from minivllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    SplitKPartials,
)
from minivllm.layers.rmsnorm import RMSNorm
from minivllm.layers.rotary import get_rotary_embedding
from minivllm.model_config import ModelConfig


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.has_qkv_bias,
        )
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, bias=config.has_o_bias
        )
        if config.has_qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = get_rotary_embedding(
            head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            torch.get_default_dtype(),
            torch.empty(0).device,  # the device the model is being built on
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, backend)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | SplitKPartials:
        # q/k norm (Qwen3 only) and rotary: one fused kernel on CUDA. Handed this layer's cache
        # write (triton backend), that kernel also stores k and v, and returns k = None: nothing
        # left for the attention layer to store. Then it may also take the qkv projection as
        # split-K partial sums (layers.linear.QKV_SPLITS), which it adds up as it reads them.
        dtype = hidden_states.dtype
        stores_kv = self.attn.fuses_kv_store(dtype) and self.rotary_emb.fuses(
            dtype, self.q_norm, self.k_norm
        )
        qkv = self.qkv_proj(hidden_states, partials=stores_kv)
        partials = qkv if isinstance(qkv, SplitKPartials) else None
        if partials is not None:
            qkv = partials.parts[0]  # q, k, v: views into the first partial sum
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kv_write = self.attn.kv_write(v, meta)
        q, k = self.rotary_emb(
            positions, q, k, self.q_norm, self.k_norm, kv_write=kv_write, partials=partials
        )
        o = self.attn(q, k, v, meta)
        # The post-attention RMSNorm takes split-K partial sums (decode batch sizes, one GPU).
        return self.o_proj(o.flatten(1), partials=True)


class Qwen3MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias=config.mlp_bias
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor | SplitKPartials:
        act = self.gate_up_proj.silu_and_mul(x)  # one kernel at decode sizes
        if act is None:
            act = self.act_fn(self.gate_up_proj(x))
        # The next layer's input RMSNorm (or the final norm) takes split-K partial sums.
        return self.down_proj(act, partials=True)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.self_attn = Qwen3Attention(config, backend)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor | SplitKPartials,  # the last layer's MLP output
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor | SplitKPartials, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, meta)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Qwen3DecoderLayer(config, backend) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, meta)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Qwen3ForCausalLM(nn.Module):
    # Checkpoint tensor name fragment -> (our packed parameter fragment, shard id).
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, backend)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [S, vocab]
        return self.lm_head(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


# Qwen2 is the same module tree; ModelConfig turns the q/k norm off and the qkv bias on.
Qwen2ForCausalLM = Qwen3ForCausalLM

MODEL_REGISTRY = {"Qwen3ForCausalLM": Qwen3ForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}
