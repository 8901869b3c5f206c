// minivllm/scheduler.h — continuous batching over a paged KV cache.
//
// The host side of one engine step, with the contract of docs/interfaces.md and the same rules,
// decision for decision, as the pure-Python twin minivllm/engine/reference/scheduler.py (the
// package docstring is the prose specification; tests/test_core_differential.py holds the two to
// identical output):
//
//  * add_request() validates everything and rejects a request that can never fit (prompt >=
//    max_model_len, more KV blocks than the pool) instead of leaving it waiting forever.
//  * schedule() builds one Batch under a token budget: decodes first (running order; a decode
//    that cannot get a block preempts the newest running sequence, possibly itself, by
//    recompute), then the chunks of partially prefilled sequences, then newly admitted waiting
//    sequences (FCFS; none in a step that preempted). Admission takes prefix-cache hits on full
//    blocks that do not hold the last token, and allocates blocks for all remaining tokens.
//  * update() delivers the sampled tokens and applies the stop checks: eos (unless ignore_eos)
//    and stop_token_ids -> kStop (token kept); max_tokens and max_model_len -> kLength. A token
//    outside the sequence's vocabulary (when add_request got vocab_size) is refused.
//  * Async scheduling (config.async_scheduling): schedule() may plan step N while Batch N-1
//    awaits update(). A sampled row appends a placeholder token at schedule time; a decode whose
//    input is a placeholder gets input id -(j + 1), "sampled row j of the previous Batch", for
//    the model runner to resolve on the device. Sequences sure to stop by length once their
//    placeholders land get no row; one that stops on a token gets a wasted row, ignored at its
//    update(). Blocks join the prefix cache only once all their tokens are known.
//
// The Batch arrays are written straight into caller-owned buffers: schedule() computes the
// shape, asks the allocator callback for buffers of that shape, and fills them; schedule_into()
// writes the big ones into a staging buffer laid out by a StagingLayout (staging.h). Nothing
// here allocates per step once its scratch vectors have grown.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "minivllm/block_manager.h"
#include "minivllm/errors.h"
#include "minivllm/sequence.h"
#include "minivllm/staging.h"

namespace minivllm {

struct SchedulerConfig {
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t max_num_seqs = 0;
  int64_t max_num_batched_tokens = 0;  // must be >= max_num_seqs
  int64_t max_model_len = 0;           // prompt + outputs never exceed it
  bool enable_prefix_caching = true;
  // Allow schedule() while one Batch with sampled rows awaits update() (see schedule()).
  bool async_scheduling = false;
};

struct Request {
  int64_t seq_id = 0;
  std::vector<int64_t> prompt_token_ids;
  int64_t max_tokens = 0;
  bool ignore_eos = false;
  std::vector<int64_t> eos_token_ids;
  std::vector<int64_t> stop_token_ids;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;
  double min_p = 0.0;
  uint64_t seed = 0;                  // the sampling seed (see sampling_uniform in hash.h)
  std::optional<int64_t> vocab_size;  // when set, prompt and sampled ids must be < vocab_size
  // Take no prefix-cache hits at admission (the prompt is computed in full, e.g. for prompt
  // logprobs); the request's own blocks still join the cache.
  bool skip_prefix_cache = false;
};

// Sizes of the Batch arrays: B = num_seqs rows, T = num_tokens new tokens, S = num_samples rows
// that sample; block_tables is [B, max_blocks].
struct BatchShape {
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;
  int64_t num_samples = 0;
  int64_t max_blocks = 0;
  int64_t num_decodes = 0;
  // Over the sampled rows: whether none samples (all greedy), and whether any uses top-k /
  // top-p, or min-p (the sampler picks its path from these without reading the arrays).
  bool all_greedy = true;
  bool any_top_k_or_p = false;
  bool any_min_p = false;
};

// Where schedule() writes the Batch; every pointer must hold the size its comment gives.
struct BatchBuffers {
  int64_t* seq_ids;          // [B]
  int32_t* input_ids;        // [T]
  int32_t* positions;        // [T]
  int32_t* slot_mapping;     // [T]
  int32_t* query_start_loc;  // [B + 1]
  int32_t* seq_lens;         // [B]
  int32_t* block_tables;     // [B * max_blocks], row-major, padded with -1
  int32_t* logits_indices;   // [S]
  int64_t* sample_seq_ids;   // [S]
  float* temperature;        // [S]
  float* top_p;              // [S]
  int32_t* top_k;            // [S]
  float* min_p;              // [S]
  float* uniforms;           // [S] sampling_uniform(seed, seq_len of the row)
  int64_t block_tables_stride = 0;  // row stride of block_tables; 0 means max_blocks
};

using BatchAllocator = std::function<BatchBuffers(const BatchShape&)>;

// The Batch arrays schedule_into() does not stage; every pointer must hold the size its comment
// gives.
struct UnstagedBuffers {
  int64_t* seq_ids;          // [B]
  int32_t* query_start_loc;  // [B + 1]
  int64_t* sample_seq_ids;   // [S]
};

using UnstagedAllocator = std::function<UnstagedBuffers(const BatchShape&)>;

enum class FinishReason { kStop, kLength };
const char* finish_reason_name(FinishReason reason);  // "stop" / "length"

struct FinishedSequence {
  int64_t seq_id;
  FinishReason reason;
  std::vector<int32_t> output_token_ids;
};

struct SchedulerStats {
  int64_t num_preemptions = 0;
  int64_t prefix_cache_queries = 0;  // tokens looked up at admission (prefix caching on)
  int64_t prefix_cache_hits = 0;     // of those, tokens found in the cache
};

// A copy of the internal state, for tests (see Scheduler::debug_state()).
struct DebugState {
  std::vector<int32_t> ref_counts;
  std::vector<std::optional<uint64_t>> block_hashes;
  std::vector<int32_t> free_block_ids;    // stack, bottom first
  std::vector<int32_t> cached_block_ids;  // LRU order, oldest first
  std::unordered_map<uint64_t, int32_t> hash_to_block;
  std::vector<int64_t> waiting;  // front first
  std::vector<int64_t> running;  // admission order
  std::unordered_map<int64_t, std::vector<int32_t>> block_tables;
  std::unordered_map<int64_t, int64_t> num_computed_tokens;
};

class Scheduler {
 public:
  // Throws InvalidArgument on a config that cannot work.
  explicit Scheduler(const SchedulerConfig& config);

  // Queues a request at the back of the waiting queue; throws InvalidArgument (state unchanged).
  void add_request(const Request& request);

  // Plans the next step and writes its Batch into the buffers `allocate` returns. Returns the
  // shape, or nullopt (without calling `allocate`) when nothing can run. Throws ProtocolError
  // when a Batch with sampled rows awaits update() (two, with async_scheduling). The forward
  // pass of a Batch must be issued before the next schedule()'s: the blocks it fills join the
  // prefix cache.
  std::optional<BatchShape> schedule(const BatchAllocator& allocate);

  // schedule(), with the fields the scheduler stages (staging.h) written into `host`, a buffer
  // of `host_size` int32 elements, at `layout`'s offsets (block-table row stride
  // layout.max_blocks()); `allocate` gives the buffers of the arrays that are not staged.
  // Throws InvalidArgument, with nothing scheduled, unless host_size >= layout.total() and the
  // layout's capacities cover this scheduler's: max_tokens >= max_num_batched_tokens, max_seqs
  // >= max_num_seqs, max_blocks >= ceil(max_model_len / block_size).
  std::optional<BatchShape> schedule_into(int32_t* host, int64_t host_size,
                                          const StagingLayout& layout,
                                          const UnstagedAllocator& allocate);

  // Delivers one sampled token per sampled row of the oldest Batch awaiting update(), in row
  // order. Returns the sequences that finished, in row order. Throws ProtocolError with no Batch
  // outstanding and InvalidArgument on a wrong count, an id outside [0, 2^31) or an id >= the
  // row's vocab_size; either way nothing changes. A Batch without sampled rows needs no
  // update(); an empty one right after it is accepted (also while an older Batch with sampled
  // rows awaits its update(), with async scheduling).
  std::vector<FinishedSequence> update(const int64_t* sampled_token_ids, int64_t num_sampled);

  // Drops a waiting or running sequence and frees its blocks; if it has a row in the Batch
  // awaiting update(), that row's token is ignored. Throws InvalidArgument for an unknown id.
  void abort(int64_t seq_id);

  bool has_unfinished() const { return !seqs_.empty(); }
  // Forgets the prefix cache (BlockManager::reset_prefix_cache): after a step that was scheduled
  // but never ran, the blocks it registered hold no valid K/V. Returns the hashes dropped.
  int64_t reset_prefix_cache() { return blocks_.reset_prefix_cache(); }
  int64_t num_free_blocks() const { return blocks_.num_free_blocks(); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  const SchedulerStats& stats() const { return stats_; }
  const SchedulerConfig& config() const { return config_; }
  DebugState debug_state() const;

 private:
  struct Row {
    Sequence* seq;
    int64_t start;  // position of the first new token
    int64_t num_new_tokens;
    int64_t num_blocks;  // ceil((start + num_new_tokens) / block_size)
    bool is_sampled;
  };

  bool admit(Sequence* seq);
  void register_full_blocks(Sequence* seq);
  void free_blocks(Sequence* seq);
  void preempt(Sequence* seq);
  bool sure_to_stop(const Sequence& seq) const;
  void forget_pending(Sequence* seq);
  std::optional<FinishReason> stop_reason(const Sequence& seq, int64_t token) const;
  void add_decode_row(Sequence* seq, BatchShape& shape);
  void add_prefill_row(Sequence* seq, int64_t num_new_tokens, BatchShape& shape);
  void write_batch(const BatchShape& shape, const BatchBuffers& out) const;

  SchedulerConfig config_;
  BlockManager blocks_;
  std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs_;  // unfinished, by id
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;
  // Sequences sampled by each Batch awaiting update(), oldest first, in row order (nullptr once
  // aborted or finished). Batches without sampled rows are not queued.
  std::deque<std::vector<Sequence*>> pending_;
  bool empty_batch_outstanding_ = false;  // the last Batch had no sampled rows, not yet updated
  SchedulerStats stats_;
  // Scratch, reused every step.
  std::vector<Row> rows_;
  std::vector<int32_t> hits_;
};

}  // namespace minivllm
