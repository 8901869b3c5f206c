"""The twin of csrc/scheduler.cc: continuous batching with chunked prefill, prefix caching and
preemption by recompute (the rules are in this package's docstring)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from minivllm.engine.reference.batch import Batch, build_batch, write_staging
from minivllm.engine.reference.block_manager import BlockManager
from minivllm.engine.reference.sequence import Sequence
from minivllm.engine.reference.validation import (
    INT32_MAX,
    check_config,
    describe,
    int64_arg,
    new_sequence,
)

if TYPE_CHECKING:
    from minivllm._core import StagingLayout

__all__ = ["Batch", "Scheduler", "write_staging"]


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        async_scheduling: bool = False,
    ) -> None:
        num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len = check_config(
            num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len
        )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.async_scheduling = bool(async_scheduling)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}  # unfinished sequences by id
        # Sequences sampled by each Batch awaiting update(), oldest first (Batches without
        # sampled rows are not queued); an aborted or finished sequence's entry becomes None.
        self._pending: deque[list[Sequence | None]] = deque()
        self._empty_batch_outstanding = False  # the last Batch had no sampled rows
        self._stats = {"num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}

    # -- public API -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def reset_prefix_cache(self) -> int:
        """Forgets the prefix cache (after a step that was scheduled but never ran, the blocks
        it registered hold no valid K/V). Returns the hashes dropped."""
        return self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def add_request(
        self,
        seq_id: int,
        prompt_token_ids: Any,
        max_tokens: int,
        ignore_eos: bool = False,
        eos_token_ids: Iterable[int] = (),
        stop_token_ids: Iterable[int] = (),
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        vocab_size: int | None = None,
        seed: int = 0,
        skip_prefix_cache: bool = False,
    ) -> None:
        seq = new_sequence(
            seq_id,
            prompt_token_ids,
            max_tokens,
            ignore_eos,
            eos_token_ids,
            stop_token_ids,
            temperature,
            top_p,
            top_k,
            min_p,
            vocab_size,
            seed,
            skip_prefix_cache,
            in_use=self.seqs,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
        )
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> None:
        seq_id = int64_arg(seq_id, "seq_id")
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"abort: unknown seq_id {seq_id}")
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        else:
            self.waiting.remove(seq)
        self._forget_pending(seq)

    def schedule(self) -> Batch | None:
        if len(self._pending) > (1 if self.async_scheduling else 0):
            raise RuntimeError(
                "schedule() called with two Batches awaiting update()"
                if self.async_scheduling
                else "schedule() called before update() for the previous Batch"
            )
        self._empty_batch_outstanding = False
        budget = self.max_num_batched_tokens
        rows: list[tuple[Sequence, int, int]] = []  # (seq, first new position, num new tokens)
        preempted = False

        # 1. Decodes, in running order. max_num_batched_tokens >= max_num_seqs: they all fit.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.is_prefilling or self._sure_to_stop(seq):
                i += 1
                continue
            if seq.num_computed_tokens // self.block_size == len(seq.block_table):
                victim = None
                while self.block_manager.num_free_blocks == 0:
                    victim = self.running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if victim is seq:  # it was the newest: nothing is left to schedule after it
                    break
                seq.block_table.append(self.block_manager.allocate())
            rows.append((seq, seq.num_computed_tokens, 1))
            i += 1
        num_decodes = len(rows)
        budget -= num_decodes

        # 2. Running sequences that are still prefilling, in running order.
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefilling:
                n = min(seq.num_prefill_tokens - seq.num_computed_tokens, budget)
                rows.append((seq, seq.num_computed_tokens, n))
                budget -= n

        # 3. Admit waiting sequences (FCFS), unless this step had to preempt.
        while (
            self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted
        ):
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_prefill_tokens - seq.num_computed_tokens, budget)
            rows.append((seq, seq.num_computed_tokens, n))
            budget -= n

        if not rows:
            return None
        batch = build_batch(rows, num_decodes, self.block_size)
        sampled: list[Sequence | None] = []
        for seq, start, n in rows:
            seq.num_computed_tokens = start + n
            if self.enable_prefix_caching:
                self._register_full_blocks(seq)
            if start + n == seq.num_tokens:  # samples: a placeholder until update()
                seq.last_sample_row = len(sampled)
                seq.token_ids.append(None)
                seq.num_unknown += 1
                sampled.append(seq)
        if sampled:
            self._pending.append(sampled)
        else:
            self._empty_batch_outstanding = True
        return batch

    def schedule_into(self, host: np.ndarray, layout: StagingLayout) -> Batch | None:
        """schedule(), then its arrays copied into `host` at `layout`'s offsets."""
        from minivllm._core import StagingLayout

        if not isinstance(layout, StagingLayout):
            raise TypeError(
                f"layout must be a minivllm._core.StagingLayout, got {describe(layout)}"
            )
        layout.check(host)
        width = -(-self.max_model_len // self.block_size)
        if (
            layout.max_tokens < self.max_num_batched_tokens
            or layout.max_seqs < self.max_num_seqs
            or layout.max_blocks < width
        ):
            raise ValueError(
                f"layout capacities (tokens {layout.max_tokens}, rows {layout.max_seqs}, blocks "
                f"{layout.max_blocks}) are below the scheduler's ({self.max_num_batched_tokens}, "
                f"{self.max_num_seqs}, {width})"
            )
        batch = self.schedule()
        if batch is not None:
            write_staging(batch, host, layout)
        return batch

    def update(self, sampled_token_ids: np.ndarray) -> list[tuple[int, str, list[int]]]:
        if not isinstance(sampled_token_ids, np.ndarray) or sampled_token_ids.dtype != np.int64:
            raise ValueError(
                f"sampled_token_ids must be a numpy int64 array, got {describe(sampled_token_ids)}"
            )
        if sampled_token_ids.ndim != 1:
            raise ValueError(f"sampled_token_ids must be 1-D, got shape {sampled_token_ids.shape}")
        if len(sampled_token_ids) == 0 and self._empty_batch_outstanding:
            # Right after a Batch without sampled rows: that Batch's (optional) update. With
            # async scheduling an older Batch may await its tokens, but never zero of them.
            self._empty_batch_outstanding = False
            return []
        if not self._pending:
            if not self._empty_batch_outstanding:
                raise RuntimeError("update() called without a scheduled Batch")
            raise ValueError(
                f"sampled_token_ids has shape ({len(sampled_token_ids)},), expected (0,), "
                "one per Batch.sample_seq_ids row"
            )
        if len(sampled_token_ids) != len(self._pending[0]):
            raise ValueError(
                f"sampled_token_ids has shape ({len(sampled_token_ids)},), expected "
                f"({len(self._pending[0])},), one per Batch.sample_seq_ids row"
            )
        tokens = sampled_token_ids.tolist()
        for seq, t in zip(self._pending[0], tokens):
            if t < 0 or t > INT32_MAX:
                raise ValueError(f"sampled token id {t} is out of range [0, 2**31 - 1]")
            if seq is not None and seq.vocab_size is not None and t >= seq.vocab_size:
                raise ValueError(
                    f"sampled token id {t} of seq_id {seq.seq_id} is out of range "
                    f"[0, vocab_size {seq.vocab_size})"
                )
        pending = self._pending.popleft()
        if not self._pending:
            self._empty_batch_outstanding = False

        finished: list[tuple[int, str, list[int]]] = []
        for seq, token in zip(pending, tokens):
            if seq is None:  # aborted or finished after schedule()
                continue
            pos = seq.num_known_tokens  # the oldest placeholder gets the token
            seq.token_ids[pos] = token
            seq.num_unknown -= 1
            reason = self._stop_reason(seq, token)
            if reason is not None:
                finished.append(
                    (seq.seq_id, reason, seq.token_ids[seq.num_prompt_tokens : pos + 1])
                )
                self._free(seq)
                del self.seqs[seq.seq_id]
                self._forget_pending(seq)  # a row in a later Batch is wasted: token ignored
            elif self.enable_prefix_caching and seq.block_table:
                self._register_full_blocks(seq)  # blocks whose last token just became known
        if finished:
            self.running = [seq for seq in self.running if seq.seq_id in self.seqs]
            self.waiting = deque(seq for seq in self.waiting if seq.seq_id in self.seqs)
        return finished

    def debug_state(self) -> dict[str, Any]:
        """A snapshot of the internal state, for the invariant and differential tests."""
        bm = self.block_manager
        return {
            "ref_counts": list(bm.ref_counts),
            "block_hashes": list(bm.block_hash),
            "free_block_ids": list(bm.free_block_ids),
            "cached_block_ids": list(bm.cached_block_ids),
            "hash_to_block": dict(bm.hash_to_block),
            "waiting": [s.seq_id for s in self.waiting],
            "running": [s.seq_id for s in self.running],
            "block_tables": {s.seq_id: list(s.block_table) for s in self.seqs.values()},
            "num_computed_tokens": {s.seq_id: s.num_computed_tokens for s in self.seqs.values()},
        }

    # -- internals ------------------------------------------------------------------------------
    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        """Counted up to the token just delivered (later placeholders are not outputs yet)."""
        num_tokens = seq.num_known_tokens
        if not seq.ignore_eos and token in seq.eos_token_ids:
            return "stop"
        if token in seq.stop_token_ids:
            return "stop"
        if num_tokens - seq.num_prompt_tokens >= seq.max_tokens:
            return "length"
        if num_tokens >= self.max_model_len:
            return "length"
        return None

    def _sure_to_stop(self, seq: Sequence) -> bool:
        """Once its placeholders land, length alone ends it: it gets no decode row."""
        return seq.num_unknown > 0 and (
            seq.num_tokens - seq.num_prompt_tokens >= seq.max_tokens
            or seq.num_tokens >= self.max_model_len
        )

    def _forget_pending(self, seq: Sequence) -> None:
        for batch in self._pending:
            for i, s in enumerate(batch):
                if s is seq:
                    batch[i] = None

    def _admit(self, seq: Sequence) -> bool:
        """Take the prefix-cache hits and allocate blocks for all of seq's tokens, if they fit.
        A preempted sequence waits until its placeholders are filled."""
        if seq.num_unknown:
            return False
        bm = self.block_manager
        bs = self.block_size
        hits: list[int] = []
        reads_cache = self.enable_prefix_caching and not seq.skip_prefix_cache
        if reads_cache:
            parent = 0
            for j in range((seq.num_tokens - 1) // bs):  # never the block of the last token
                h = seq.block_hash(j, bs)
                block_id = bm.lookup(h, parent, seq.token_ids[j * bs : (j + 1) * bs])
                if block_id is None:
                    break
                hits.append(block_id)
                parent = h
        num_new = -(-seq.num_tokens // bs) - len(hits)
        num_hits_free = sum(1 for b in hits if bm.ref_counts[b] == 0)
        if bm.num_free_blocks - num_hits_free < num_new:
            return False
        for block_id in hits:
            bm.take(block_id)
        seq.block_table = hits + [bm.allocate() for _ in range(num_new)]
        seq.num_computed_tokens = len(hits) * bs
        seq.num_prefill_tokens = seq.num_tokens
        seq.num_registered_blocks = len(hits)
        if reads_cache:
            self._stats["prefix_cache_queries"] += seq.num_tokens
            self._stats["prefix_cache_hits"] += len(hits) * bs
        return True

    def _register_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // bs
        for j in range(seq.num_registered_blocks, num_full):
            parent = seq.block_hash(j - 1, bs) if j else 0
            self.block_manager.register(
                seq.block_table[j],
                seq.block_hash(j, bs),
                parent,
                seq.token_ids[j * bs : (j + 1) * bs],
            )
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _free(self, seq: Sequence) -> None:
        self.block_manager.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_prefill_tokens = 0
        seq.num_registered_blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        self.waiting.appendleft(seq)
        self._stats["num_preemptions"] += 1
