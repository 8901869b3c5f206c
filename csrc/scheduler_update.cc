// The scheduler's update() (sampled ids into their sequences, stops, finished sequences' blocks
// freed), block release, preemption and the debug view.
#include "minivllm/scheduler.h"

#include "internal.h"

#include <algorithm>
#include <string>

namespace minivllm {

using namespace internal;  // cat, ceil_div, contains, the constants

// --------------------------------------------------------------------------------------------
// update()
// --------------------------------------------------------------------------------------------
std::vector<FinishedSequence> Scheduler::update(const int64_t* sampled_token_ids,
                                                int64_t num_sampled) {
  if (num_sampled == 0 && empty_batch_outstanding_) {
    // Right after a Batch without sampled rows: that Batch's (optional) update. With async
    // scheduling an older Batch may await its tokens, but never zero of them.
    empty_batch_outstanding_ = false;
    return {};
  }
  if (pending_.empty()) {
    if (!empty_batch_outstanding_) throw ProtocolError("update() called without a scheduled Batch");
    throw InvalidArgument(cat("sampled_token_ids has shape (", num_sampled,
                              ",), expected (0,), one per Batch.sample_seq_ids row"));
  }
  const std::vector<Sequence*>& batch = pending_.front();
  if (num_sampled != static_cast<int64_t>(batch.size())) {
    throw InvalidArgument(cat("sampled_token_ids has shape (", num_sampled, ",), expected (",
                              batch.size(), ",), one per Batch.sample_seq_ids row"));
  }
  for (int64_t i = 0; i < num_sampled; ++i) {
    const int64_t token = sampled_token_ids[i];
    if (token < 0 || token > kInt32Max) {
      throw InvalidArgument(cat("sampled token id ", token, " is out of range [0, 2**31 - 1]"));
    }
    const Sequence* seq = batch[static_cast<size_t>(i)];
    if (seq != nullptr && seq->vocab_size && token >= *seq->vocab_size) {
      throw InvalidArgument(cat("sampled token id ", token, " of seq_id ", seq->seq_id,
                                " is out of range [0, vocab_size ", *seq->vocab_size, ")"));
    }
  }
  const std::vector<Sequence*> seqs = std::move(pending_.front());
  pending_.pop_front();
  if (pending_.empty()) empty_batch_outstanding_ = false;

  std::vector<FinishedSequence> finished;
  for (int64_t i = 0; i < num_sampled; ++i) {
    Sequence* seq = seqs[static_cast<size_t>(i)];
    if (seq == nullptr) continue;  // aborted or finished after schedule()
    const int64_t token = sampled_token_ids[i];
    // The oldest placeholder gets the token; the stop checks see the sequence up to it.
    const int64_t pos = seq->num_known_tokens();
    seq->token_ids[static_cast<size_t>(pos)] = static_cast<int32_t>(token);
    seq->num_unknown -= 1;
    if (const auto reason = stop_reason(*seq, token)) {
      finished.push_back(FinishedSequence{
          seq->seq_id, *reason,
          std::vector<int32_t>(seq->token_ids.begin() + seq->num_prompt_tokens,
                               seq->token_ids.begin() + pos + 1)});
      free_blocks(seq);
      seq->is_finished = true;
      forget_pending(seq);  // a row in a later Batch is now wasted: its token is ignored
    } else if (config_.enable_prefix_caching && !seq->block_table.empty()) {
      register_full_blocks(seq);  // blocks whose last token just became known
    }
  }
  if (!finished.empty()) {
    const auto done = [](const Sequence* seq) { return seq->is_finished; };
    running_.erase(std::remove_if(running_.begin(), running_.end(), done), running_.end());
    waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), done), waiting_.end());
    for (const FinishedSequence& f : finished) seqs_.erase(f.seq_id);
  }
  return finished;
}

bool Scheduler::sure_to_stop(const Sequence& seq) const {
  // Placeholders count as outputs: once they land, length alone ends the sequence.
  return seq.num_unknown > 0 &&
         (seq.num_output_tokens() >= seq.max_tokens || seq.num_tokens() >= config_.max_model_len);
}

void Scheduler::forget_pending(Sequence* seq) {
  for (auto& batch : pending_) {
    std::replace(batch.begin(), batch.end(), seq, static_cast<Sequence*>(nullptr));
  }
}

std::optional<FinishReason> Scheduler::stop_reason(const Sequence& seq, int64_t token) const {
  // Counted up to the token just delivered (later placeholders are not outputs yet).
  const int64_t num_tokens = seq.num_known_tokens();
  if (!seq.ignore_eos && contains(seq.eos_token_ids, token)) return FinishReason::kStop;
  if (contains(seq.stop_token_ids, token)) return FinishReason::kStop;
  if (num_tokens - seq.num_prompt_tokens >= seq.max_tokens) return FinishReason::kLength;
  if (num_tokens >= config_.max_model_len) return FinishReason::kLength;
  return std::nullopt;
}

// --------------------------------------------------------------------------------------------
// Blocks
// --------------------------------------------------------------------------------------------
void Scheduler::free_blocks(Sequence* seq) {
  blocks_.release(seq->block_table);
  seq->block_table.clear();
  seq->num_computed_tokens = 0;
  seq->num_prefill_tokens = 0;
  seq->num_registered_blocks = 0;
}

void Scheduler::preempt(Sequence* seq) {
  free_blocks(seq);
  waiting_.push_front(seq);
  stats_.num_preemptions += 1;
}

DebugState Scheduler::debug_state() const {
  DebugState st;
  const int32_t n = blocks_.num_blocks();
  st.ref_counts.reserve(static_cast<size_t>(n));
  st.block_hashes.reserve(static_cast<size_t>(n));
  for (int32_t b = 0; b < n; ++b) {
    st.ref_counts.push_back(blocks_.ref_count(b));
    st.block_hashes.push_back(blocks_.block_hash(b));
  }
  st.free_block_ids = blocks_.free_block_ids();
  st.cached_block_ids = blocks_.cached_block_ids();
  st.hash_to_block = blocks_.hash_to_block();
  for (const Sequence* seq : waiting_) st.waiting.push_back(seq->seq_id);
  for (const Sequence* seq : running_) st.running.push_back(seq->seq_id);
  for (const auto& [seq_id, seq] : seqs_) {
    st.block_tables[seq_id] = seq->block_table;
    st.num_computed_tokens[seq_id] = seq->num_computed_tokens;
  }
  return st;
}

}  // namespace minivllm
