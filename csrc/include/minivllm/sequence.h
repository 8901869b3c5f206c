// minivllm/sequence.h — one request as the scheduler sees it.
//
// A Sequence holds its token ids (prompt, then outputs), its stop conditions and sampling
// parameters, and its place in the KV cache: the block table, how many of its tokens have been
// scheduled for computation since it was last admitted (num_computed_tokens), and how many it must
// compute before it samples again (num_prefill_tokens: the prompt, or prompt + outputs after a
// preemption). Sequences are owned by the Scheduler; nothing here allocates per step.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace minivllm {

// Per-request sampling parameters, copied into every Batch row that samples, plus what the
// Batch's summary flags and uniforms need (derived once, at add_request).
struct SamplingParams {
  float temperature = 1.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;  // 0 = off
  float min_p = 0.0f;
  uint64_t seed_hash = 0;      // splitmix64(seed): a row's uniform is u(seed_hash, seq_len)
  bool is_greedy = true;       // temperature 0 or top_k 1
  bool uses_top_k_or_p = false;  // samples, and top_k cuts the vocabulary or top_p < 1
  bool uses_min_p = false;     // samples, and min_p > 0
};

struct alignas(64) Sequence {
  // Fields read every step come first, so a decode touches as few cache lines as possible.
  int64_t seq_id = 0;
  int64_t num_computed_tokens = 0;  // scheduled for computation since the last admission
  int64_t num_prefill_tokens = 0;   // to compute before sampling again; 0 while waiting
  std::vector<int32_t> token_ids;   // prompt + outputs; the last num_unknown are placeholders
  int32_t num_unknown = 0;          // outputs scheduled to be sampled, not yet delivered (<= 2)
  int32_t last_sample_row = -1;     // the sampled row of its newest placeholder in its Batch
  std::vector<int32_t> block_table;
  SamplingParams sampling;
  int64_t num_prompt_tokens = 0;
  int64_t max_tokens = 0;
  int64_t num_registered_blocks = 0;  // leading blocks already offered to the prefix cache
  bool ignore_eos = false;
  bool is_finished = false;
  bool skip_prefix_cache = false;  // admission takes no prefix-cache hits
  std::optional<int64_t> vocab_size;  // when known, sampled ids must be below it
  std::vector<int64_t> eos_token_ids;
  std::vector<int64_t> stop_token_ids;

  // Memo: the prefix-cache hash of each full block of token_ids (kept across preemptions; the
  // token ids of a full block never change).
  std::vector<uint64_t> block_hashes;

  int64_t num_tokens() const { return static_cast<int64_t>(token_ids.size()); }
  int64_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  int64_t num_known_tokens() const { return num_tokens() - num_unknown; }
  bool is_prefilling() const { return num_computed_tokens < num_prefill_tokens; }

  // The hash of full block `j` (requires (j + 1) * block_size <= num_tokens()).
  uint64_t block_hash(int64_t j, int64_t block_size);
};

}  // namespace minivllm
