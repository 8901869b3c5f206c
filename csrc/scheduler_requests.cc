// The scheduler's requests: add_request (every field checked before anything changes), abort.
#include "minivllm/scheduler.h"

#include "minivllm/hash.h"
#include "internal.h"

#include <algorithm>
#include <memory>
#include <string>
#include <utility>

namespace minivllm {

using namespace internal;  // cat, ceil_div, contains, the constants

// --------------------------------------------------------------------------------------------
// Requests
// --------------------------------------------------------------------------------------------
void Scheduler::add_request(const Request& r) {
  if (seqs_.count(r.seq_id)) {
    throw InvalidArgument(cat("seq_id ", r.seq_id, " is already in use by an unfinished request"));
  }
  if (r.max_tokens < 1) throw InvalidArgument(cat("max_tokens must be >= 1, got ", r.max_tokens));
  // The Batch carries float32: a temperature that rounds to infinity or a top_p that rounds to
  // 0 is refused, and the casts below stay in range.
  if (!(r.temperature >= 0.0 && r.temperature < kFloat32Overflow)) {
    throw InvalidArgument(
        cat("temperature must be finite and >= 0 (as float32), got ", r.temperature));
  }
  if (!(r.top_p > 0.0 && r.top_p <= 1.0 && static_cast<float>(r.top_p) > 0.0f)) {
    throw InvalidArgument(cat("top_p must be in (0, 1] (and > 0 as float32), got ", r.top_p));
  }
  if (!(r.top_k >= 0 && r.top_k <= kInt32Max)) {
    throw InvalidArgument(cat("top_k must be in [0, 2**31 - 1] (0 = off), got ", r.top_k));
  }
  if (!(r.min_p >= 0.0 && r.min_p <= 1.0)) {
    throw InvalidArgument(cat("min_p must be in [0, 1], got ", r.min_p));
  }
  if (r.vocab_size && *r.vocab_size < 1) {
    throw InvalidArgument(cat("vocab_size must be >= 1, got ", *r.vocab_size));
  }
  const auto& prompt = r.prompt_token_ids;
  if (prompt.empty()) throw InvalidArgument("prompt_token_ids is empty");
  const int64_t limit = r.vocab_size ? *r.vocab_size - 1 : kInt32Max;
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] > limit) {
      throw InvalidArgument(cat("prompt token id ", prompt[i], " at index ", i,
                                " is out of range [0, ",
                                r.vocab_size ? cat("vocab_size ", *r.vocab_size) : "2**31 - 1",
                                ")"));
    }
  }
  const auto num_prompt = static_cast<int64_t>(prompt.size());
  if (num_prompt >= config_.max_model_len) {
    throw InvalidArgument(
        cat("prompt length ", num_prompt, " >= max_model_len ", config_.max_model_len));
  }
  const int64_t max_total = r.max_tokens >= config_.max_model_len - num_prompt
                                ? config_.max_model_len
                                : num_prompt + r.max_tokens;
  // The last token is never fed back, so max_total - 1 tokens ever need a KV slot.
  const int64_t max_blocks = ceil_div(max_total - 1, config_.block_size);
  if (max_blocks > config_.num_blocks) {
    throw InvalidArgument(cat("request ", r.seq_id, " can grow to ", max_total, " tokens = ",
                              max_blocks, " KV blocks, more than the pool's num_blocks ",
                              config_.num_blocks));
  }

  auto seq = std::make_unique<Sequence>();
  seq->seq_id = r.seq_id;
  seq->token_ids.reserve(static_cast<size_t>(max_total));
  seq->token_ids.assign(prompt.begin(), prompt.end());
  seq->num_prompt_tokens = num_prompt;
  seq->max_tokens = r.max_tokens;
  seq->ignore_eos = r.ignore_eos;
  seq->skip_prefix_cache = r.skip_prefix_cache;
  seq->vocab_size = r.vocab_size;
  seq->eos_token_ids = r.eos_token_ids;
  seq->stop_token_ids = r.stop_token_ids;
  SamplingParams& sp = seq->sampling;
  sp.temperature = static_cast<float>(r.temperature);
  sp.top_p = static_cast<float>(r.top_p);
  sp.top_k = static_cast<int32_t>(r.top_k);
  sp.min_p = static_cast<float>(r.min_p);
  sp.seed_hash = splitmix64(r.seed);
  sp.is_greedy = sp.temperature == 0.0f || sp.top_k == 1;
  const bool cuts_vocab = sp.top_k > 0 && (!r.vocab_size || sp.top_k < *r.vocab_size);
  sp.uses_top_k_or_p = !sp.is_greedy && (cuts_vocab || sp.top_p < 1.0f);
  sp.uses_min_p = !sp.is_greedy && sp.min_p > 0.0f;
  seq->block_table.reserve(static_cast<size_t>(max_blocks));
  waiting_.push_back(seq.get());
  seqs_.emplace(r.seq_id, std::move(seq));
}

void Scheduler::abort(int64_t seq_id) {
  const auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw InvalidArgument(cat("abort: unknown seq_id ", seq_id));
  Sequence* seq = it->second.get();
  const auto r = std::find(running_.begin(), running_.end(), seq);
  if (r != running_.end()) {
    running_.erase(r);
    free_blocks(seq);
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), seq));
  }
  forget_pending(seq);
  seqs_.erase(it);
}

}  // namespace minivllm
