"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.distributed import get_tp_group


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary rows; other ids embed to zero there
    and the all-reduce fills them in."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_group = get_tp_group()  # the group of the model being built
        self.tp_rank = self.tp_group.rank
        self.tp_size = self.tp_group.size
        self.num_embeddings = num_embeddings
        self.shard_size = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.full_shape = (num_embeddings, embedding_dim)  # what weight_loader takes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        expected = (self.num_embeddings, param.shape[1])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape {tuple(loaded.shape)}, expected {expected}")
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded[self.vocab_start : self.vocab_end])
        param.data[rows:].zero_()  # padding rows of the last shard

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        y = F.embedding(local_ids, self.weight) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return self.tp_group.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary; each rank computes its vocab slice, then gather."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, vocab]
        logits = F.linear(hidden_states, self.weight)
        if self.tp_size > 1:
            logits = self.tp_group.all_gather_last_dim(logits)[:, : self.num_embeddings]
        return logits
