"""The twin of csrc/sequence.cc: one request as the scheduler sees it."""

from __future__ import annotations

import numpy as np

from minivllm.engine.reference.hash import hash_block_tokens


class Sequence:
    """Token ids (prompt, then outputs; trailing placeholders are None), stop conditions,
    sampling parameters, and the sequence's place in the KV cache."""

    __slots__ = (
        "block_hashes",
        "block_table",
        "eos_token_ids",
        "ignore_eos",
        "is_greedy",
        "last_sample_row",
        "max_tokens",
        "min_p",
        "num_computed_tokens",
        "num_prefill_tokens",
        "num_prompt_tokens",
        "num_registered_blocks",
        "num_unknown",
        "seed",
        "seq_id",
        "skip_prefix_cache",
        "stop_token_ids",
        "temperature",
        "token_ids",
        "top_k",
        "top_p",
        "uses_min_p",
        "uses_top_k_or_p",
        "vocab_size",
    )

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        max_tokens: int,
        ignore_eos: bool,
        eos_token_ids: tuple[int, ...],
        stop_token_ids: tuple[int, ...],
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        seed: int,
        vocab_size: int | None,
        skip_prefix_cache: bool,
    ) -> None:
        self.seq_id = seq_id
        self.token_ids = prompt_token_ids  # prompt + outputs (the caller gives up the list)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.eos_token_ids = eos_token_ids
        self.stop_token_ids = stop_token_ids
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p
        self.seed = seed
        self.vocab_size = vocab_size  # when known, sampled ids must be below it
        self.skip_prefix_cache = skip_prefix_cache  # admission takes no prefix-cache hits
        # The Batch flags, from the float32 values the Batch carries (add_request checked that
        # they are in float32 range).
        t32, p32, m32 = np.float32(temperature), np.float32(top_p), np.float32(min_p)
        self.is_greedy = bool(t32 == 0 or top_k == 1)
        cuts_vocab = top_k > 0 and (vocab_size is None or top_k < vocab_size)
        self.uses_top_k_or_p = not self.is_greedy and (cuts_vocab or bool(p32 < 1))
        self.uses_min_p = not self.is_greedy and bool(m32 > 0)
        self.num_computed_tokens = 0  # tokens whose K/V are (being) written this admission
        self.num_prefill_tokens = 0  # tokens to compute before the first sample this admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # memo: hash of each full block of token_ids
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.num_unknown = 0  # trailing placeholders (None) in token_ids: sampled, not delivered
        self.last_sample_row = -1  # the sampled row of its newest placeholder in its Batch

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_unknown

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens

    def block_hash(self, j: int, block_size: int) -> int:
        """The hash of full block j (memoized; a full block's token ids never change)."""
        while len(self.block_hashes) <= j:
            k = len(self.block_hashes)
            parent = self.block_hashes[-1] if k else 0
            tokens = self.token_ids[k * block_size : (k + 1) * block_size]
            self.block_hashes.append(hash_block_tokens(parent, tokens))
        return self.block_hashes[j]
