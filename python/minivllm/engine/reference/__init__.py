"""Pure-Python twin of the C++ host core (`minivllm._core.Scheduler`).

Same constructor, methods and outputs as the C++ core, written for clarity. It is the oracle in the
differential tests (tests/test_core_differential.py) and the baseline in
benchmarks/bench_host.py; `LLM(..., scheduler="python")` runs the engine on it. Any change
here must be mirrored in csrc/ (and the other way round): the tests compare every Batch array,
every update result and the whole block-manager state after every step.

The modules mirror the core's files: hash.py (csrc/hash.cc), block_manager.py
(csrc/block_manager.cc), sequence.py (csrc/sequence.cc), scheduler.py (csrc/scheduler.cc), with
the Batch and its writers in batch.py and argument conversion and validation (what the bindings
and the head of add_request do) in validation.py.

Rules (docs/interfaces.md pins the API, dtypes and shapes):

Blocks. Every block is exactly one of: free (no hash, on a LIFO stack), cached-free (holds a
prefix hash, refcount 0, on an LRU list, oldest first) or referenced (refcount > 0, the number of
block-table occurrences). Allocation pops the free stack first (lowest id first at start) and only
then evicts the least recently freed cached block, dropping its hash. A finished or preempted
sequence frees its blocks in reverse table order, so its tail blocks are evicted before its head.

Prefix cache. Block j of a sequence, once all its tokens are scheduled, gets the hash
XXH64(int32 little-endian token ids of the block, seed=hash of block j-1), seed 0 for block 0.
It is registered (hash -> block) unless another block already holds that hash. At admission a
sequence walks its chain and takes a hit on block j only if hash, parent hash and every token id
match. Hits are taken only on full blocks that do not contain the sequence's last token, so at
least one token is always computed and no shared block is ever written: on a full-prompt hit
whose length is a multiple of block_size the final block is recomputed into a fresh block.

Admission (FCFS, head of the waiting queue only). A waiting sequence is admitted when token
budget remains, fewer than max_num_seqs are running, no preemption happened this step, and the
pool can give blocks for all its tokens (prompt, plus outputs after a preemption) beyond its
cache hits. Its prefill is then scheduled in chunks under the step's token budget. A request
added with skip_prefix_cache=True takes no hits (and counts no queries): its tokens are all
computed, while its own blocks still join the cache for others.

Step. Decodes first (running order); a decode that needs a block and finds none preempts the
newest running sequence (possibly itself) until one is free. Preempted sequences drop their
blocks, go to the front of the waiting queue (oldest first) and later re-prefill prompt +
outputs, hitting their own cached blocks. Then partially prefilled running sequences continue
(running order), then waiting sequences are admitted. A prefill row samples only when it
reaches the end of the sequence's tokens.

Protocol. schedule() registers the hashes of blocks it fills, so the forward pass for a Batch must
run before the next schedule(). After a Batch with sampled rows, update() must be called before the
next schedule(); after a Batch with none it may be called with an empty array or skipped.
abort() between schedule() and update() is allowed: that sequence's sampled row is ignored. A
sampled id >= the vocab_size its request was added with is refused (ValueError, nothing changes).

Sampling. Every sampled row carries its request's temperature, top_p, top_k, min_p and one
uniform u = sampling_uniforms(seed, seq_len of the row) (SplitMix64 of SplitMix64(seed) ^ seq_len,
top 53 bits as a float64 in [0, 1), rounded to float32 and kept <= 1 - 2**-24), so a request's
draws depend only on its seed and its own length. The Batch also says whether every sampled row
is greedy (temperature 0 or top_k 1) and whether any sampling row uses top-k (0 < top_k <
vocab_size, any top_k > 0 when vocab_size is unknown) or top-p < 1, or min-p > 0; the comparisons
use the float32 values the Batch carries. add_request refuses a temperature that float32 rounds
to infinity and a top_p that it rounds to 0; a temperature that it rounds to 0 is greedy.

schedule_into(host, layout) is schedule() with the large arrays written into a caller's int32
staging buffer at the offsets of `layout` (a minivllm._core.StagingLayout: the layout is defined
once, in the core); it returns the same Batch.

Async scheduling (async_scheduling=True). schedule() may plan step N while Batch N-1 (with
sampled rows) awaits update(); update() always serves the oldest such Batch. Every sampled row
appends a placeholder token (None) at schedule time, which update() fills in order. A decode whose
input token is a placeholder gets input id -(j + 1): "sampled row j of the previous Batch", which
the model runner resolves on the device. A sequence whose placeholders will end it by length
gets no row; one that stops on a sampled token may have a wasted row in the next Batch, whose
token update() ignores. Blocks join the prefix cache only once every token in them is known; a
preempted sequence is readmitted only once its placeholders are filled. Batches without sampled
rows are not queued (update() with an empty array is accepted right after one, even while an
older Batch awaits its tokens). With async_scheduling off, the placeholders are filled before any
schedule(), so nothing changes.

Stop checks in update(), in order: eos (unless ignore_eos), stop_token_ids -> "stop" (the token is
kept); max_tokens outputs, prompt + outputs >= max_model_len -> "length".
"""

from __future__ import annotations

from minivllm.engine.reference.batch import Batch, build_batch, write_staging
from minivllm.engine.reference.block_manager import BlockManager
from minivllm.engine.reference.hash import (
    hash_block_tokens,
    sampling_uniforms,
    sampling_uniforms_float32,
    xxh64,
)
from minivllm.engine.reference.scheduler import Scheduler
from minivllm.engine.reference.sequence import Sequence

__all__ = [
    "Batch",
    "BlockManager",
    "Scheduler",
    "Sequence",
    "build_batch",
    "hash_block_tokens",
    "sampling_uniforms",
    "sampling_uniforms_float32",
    "write_staging",
    "xxh64",
]
