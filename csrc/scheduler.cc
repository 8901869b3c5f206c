#include "minivllm/scheduler.h"

#include "minivllm/hash.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

namespace minivllm {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
// The smallest double that rounds to float32 infinity: halfway between FLT_MAX and 2^128.
constexpr double kFloat32Overflow = 0x1.ffffffp+127;
constexpr int32_t kPlaceholder = -1;  // a token scheduled to be sampled, not delivered yet

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

// For a >= 0 and b >= 1; never overflows.
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

bool contains(const std::vector<int64_t>& ids, int64_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

const SchedulerConfig& validated(const SchedulerConfig& c) {
  if (c.num_blocks < 1) throw InvalidArgument(cat("num_blocks must be >= 1, got ", c.num_blocks));
  if (c.block_size < 1) throw InvalidArgument(cat("block_size must be >= 1, got ", c.block_size));
  if (c.num_blocks > kInt32Max / c.block_size) {
    throw InvalidArgument(cat("num_blocks * block_size = ", c.num_blocks, " * ", c.block_size,
                              " does not fit int32 slots"));
  }
  if (c.max_num_seqs < 1) {
    throw InvalidArgument(cat("max_num_seqs must be >= 1, got ", c.max_num_seqs));
  }
  if (c.max_num_batched_tokens < c.max_num_seqs) {
    throw InvalidArgument(cat("max_num_batched_tokens (", c.max_num_batched_tokens,
                              ") must be >= max_num_seqs (", c.max_num_seqs, ")"));
  }
  if (c.max_model_len < 2 || c.max_model_len > kInt32Max) {
    throw InvalidArgument(cat("max_model_len must be in [2, 2**31 - 1], got ", c.max_model_len));
  }
  return c;
}

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  return reason == FinishReason::kStop ? "stop" : "length";
}

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(validated(config)),
      blocks_(static_cast<int32_t>(config.num_blocks), static_cast<int32_t>(config.block_size)) {
  // A running sequence holds at least one block, so no more than num_blocks ever run.
  const auto max_running =
      static_cast<size_t>(std::min(config_.max_num_seqs, config_.num_blocks));
  running_.reserve(max_running);
  rows_.reserve(max_running);
}

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

// --------------------------------------------------------------------------------------------
// schedule()
// --------------------------------------------------------------------------------------------
// The decode path avoids integer division (it dominated the per-sequence cost): a decode row's
// block table always covers exactly ceil((position + 1) / block_size) blocks.
void Scheduler::add_decode_row(Sequence* seq, BatchShape& shape) {
  const auto num_blocks = static_cast<int64_t>(seq->block_table.size());
  Row& row = rows_.emplace_back();
  row.seq = seq;
  row.start = seq->num_computed_tokens;
  row.num_new_tokens = 1;
  row.num_blocks = num_blocks;
  row.is_sampled = true;
  shape.num_seqs += 1;
  shape.num_tokens += 1;
  shape.num_samples += 1;
  shape.max_blocks = std::max(shape.max_blocks, num_blocks);
}

void Scheduler::add_prefill_row(Sequence* seq, int64_t num_new_tokens, BatchShape& shape) {
  const int64_t end = seq->num_computed_tokens + num_new_tokens;
  const int64_t num_blocks = ceil_div(end, config_.block_size);
  const bool is_sampled = end == seq->num_tokens();
  Row& row = rows_.emplace_back();
  row.seq = seq;
  row.start = seq->num_computed_tokens;
  row.num_new_tokens = num_new_tokens;
  row.num_blocks = num_blocks;
  row.is_sampled = is_sampled;
  shape.num_seqs += 1;
  shape.num_tokens += num_new_tokens;
  shape.num_samples += is_sampled;
  shape.max_blocks = std::max(shape.max_blocks, num_blocks);
}

std::optional<BatchShape> Scheduler::schedule(const BatchAllocator& allocate) {
  if (pending_.size() > (config_.async_scheduling ? 1u : 0u)) {
    throw ProtocolError(config_.async_scheduling
                            ? "schedule() called with two Batches awaiting update()"
                            : "schedule() called before update() for the previous Batch");
  }
  empty_batch_outstanding_ = false;
  rows_.clear();
  BatchShape shape;
  const int64_t bs = config_.block_size;
  int64_t budget = config_.max_num_batched_tokens;
  bool preempted = false;

  // 1. Decodes, in running order. max_num_batched_tokens >= max_num_seqs: they all fit.
  for (size_t i = 0; i < running_.size();) {
    Sequence* seq = running_[i];
    if (seq->is_prefilling() || sure_to_stop(*seq)) {
      ++i;
      continue;
    }
    if (seq->num_computed_tokens >= static_cast<int64_t>(seq->block_table.size()) * bs) {
      Sequence* victim = nullptr;
      while (blocks_.num_free_blocks() == 0) {
        victim = running_.back();
        running_.pop_back();
        preempt(victim);
        preempted = true;
        if (victim == seq) break;
      }
      if (victim == seq) break;  // it was the newest: nothing is left to schedule after it
      seq->block_table.push_back(blocks_.allocate());
    }
    add_decode_row(seq, shape);
    ++i;
  }
  shape.num_decodes = shape.num_seqs;
  budget -= shape.num_decodes;

  // 2. Running sequences that are still prefilling, in running order.
  for (Sequence* seq : running_) {
    if (budget == 0) break;
    if (seq->is_prefilling()) {
      const int64_t n = std::min(seq->num_prefill_tokens - seq->num_computed_tokens, budget);
      add_prefill_row(seq, n, shape);
      budget -= n;
    }
  }

  // 3. Admit waiting sequences (FCFS), unless this step had to preempt.
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int64_t>(running_.size()) < config_.max_num_seqs && !preempted) {
    Sequence* seq = waiting_.front();
    if (!admit(seq)) break;
    waiting_.pop_front();
    running_.push_back(seq);
    const int64_t n = std::min(seq->num_prefill_tokens - seq->num_computed_tokens, budget);
    add_prefill_row(seq, n, shape);
    budget -= n;
  }

  if (rows_.empty()) return std::nullopt;
  for (const Row& row : rows_) {
    if (!row.is_sampled) continue;
    const SamplingParams& sp = row.seq->sampling;
    shape.all_greedy = shape.all_greedy && sp.is_greedy;
    shape.any_top_k_or_p = shape.any_top_k_or_p || sp.uses_top_k_or_p;
    shape.any_min_p = shape.any_min_p || sp.uses_min_p;
  }
  write_batch(shape, allocate(shape));
  std::vector<Sequence*> sampled;
  sampled.reserve(static_cast<size_t>(shape.num_samples));
  for (const Row& row : rows_) {
    Sequence* seq = row.seq;
    seq->num_computed_tokens = row.start + row.num_new_tokens;
    // A block joins the prefix cache once all its tokens are scheduled and known.
    if (config_.enable_prefix_caching &&
        std::min(seq->num_computed_tokens, seq->num_known_tokens()) >=
            (seq->num_registered_blocks + 1) * bs) {
      register_full_blocks(seq);
    }
    if (row.is_sampled) {
      seq->last_sample_row = static_cast<int32_t>(sampled.size());
      seq->token_ids.push_back(kPlaceholder);
      seq->num_unknown += 1;
      sampled.push_back(seq);
    }
  }
  if (sampled.empty()) {
    empty_batch_outstanding_ = true;
  } else {
    pending_.push_back(std::move(sampled));
  }
  return shape;
}

std::optional<BatchShape> Scheduler::schedule_into(int32_t* host, int64_t host_size,
                                                   const StagingLayout& layout,
                                                   const UnstagedAllocator& allocate) {
  layout.check_size(host_size);
  const int64_t width = ceil_div(config_.max_model_len, config_.block_size);
  if (layout.max_tokens() < config_.max_num_batched_tokens ||
      layout.max_seqs() < config_.max_num_seqs || layout.max_blocks() < width) {
    throw InvalidArgument(cat("layout capacities (tokens ", layout.max_tokens(), ", rows ",
                              layout.max_seqs(), ", blocks ", layout.max_blocks(),
                              ") are below the scheduler's (", config_.max_num_batched_tokens,
                              ", ", config_.max_num_seqs, ", ", width, ")"));
  }
  const auto at = [host, &layout](StagingField field) { return host + layout.offset(field); };
  const auto at_float = [&at](StagingField field) { return reinterpret_cast<float*>(at(field)); };
  return schedule([&](const BatchShape& s) {
    // The capacity check above and the scheduler's limits guarantee this.
    if (s.num_tokens > layout.max_tokens() || s.num_seqs > layout.max_seqs() ||
        s.max_blocks > layout.max_blocks()) {
      throw std::logic_error("schedule_into: a Batch larger than the scheduler's limits");
    }
    const UnstagedBuffers u = allocate(s);
    BatchBuffers out{u.seq_ids,          at(kInputIds),          at(kPositions),
                     at(kSlotMapping),   u.query_start_loc,      at(kSeqLens),
                     at(kBlockTables),   at(kLogitsIndices),     u.sample_seq_ids,
                     at_float(kTemperature), at_float(kTopP),    at(kTopK),
                     at_float(kMinP),    at_float(kUniforms)};
    out.block_tables_stride = layout.max_blocks();
    return out;
  });
}

bool Scheduler::admit(Sequence* seq) {
  // A preempted sequence waits for its outstanding tokens before it is recomputed.
  if (seq->num_unknown > 0) return false;
  const int64_t bs = config_.block_size;
  const int64_t num_tokens = seq->num_tokens();
  hits_.clear();
  const bool reads_cache = config_.enable_prefix_caching && !seq->skip_prefix_cache;
  if (reads_cache) {
    uint64_t parent = 0;
    const int64_t max_hits = (num_tokens - 1) / bs;  // never the block of the last token
    for (int64_t j = 0; j < max_hits; ++j) {
      const uint64_t h = seq->block_hash(j, bs);
      const auto block_id = blocks_.lookup(h, parent, seq->token_ids.data() + j * bs);
      if (!block_id) break;
      hits_.push_back(*block_id);
      parent = h;
    }
  }
  const auto num_hits = static_cast<int64_t>(hits_.size());
  const int64_t num_new = ceil_div(num_tokens, bs) - num_hits;
  int64_t num_hits_free = 0;
  for (const int32_t b : hits_) num_hits_free += blocks_.ref_count(b) == 0;
  if (blocks_.num_free_blocks() - num_hits_free < num_new) return false;

  seq->block_table.clear();
  for (const int32_t b : hits_) {
    blocks_.take(b);
    seq->block_table.push_back(b);
  }
  for (int64_t k = 0; k < num_new; ++k) seq->block_table.push_back(blocks_.allocate());
  seq->num_computed_tokens = num_hits * bs;
  seq->num_prefill_tokens = num_tokens;
  seq->num_registered_blocks = num_hits;
  if (reads_cache) {
    stats_.prefix_cache_queries += num_tokens;
    stats_.prefix_cache_hits += num_hits * bs;
  }
  return true;
}

void Scheduler::register_full_blocks(Sequence* seq) {
  const int64_t bs = config_.block_size;
  const int64_t num_full = std::min(seq->num_computed_tokens, seq->num_known_tokens()) / bs;
  for (int64_t j = seq->num_registered_blocks; j < num_full; ++j) {
    const uint64_t parent = j == 0 ? 0 : seq->block_hash(j - 1, bs);
    blocks_.register_block(seq->block_table[static_cast<size_t>(j)], seq->block_hash(j, bs),
                           parent, seq->token_ids.data() + j * bs);
  }
  seq->num_registered_blocks = std::max(seq->num_registered_blocks, num_full);
}

void Scheduler::write_batch(const BatchShape& shape, const BatchBuffers& out) const {
  const int64_t bs = config_.block_size;
  const int64_t bt_stride = out.block_tables_stride > 0 ? out.block_tables_stride : shape.max_blocks;
  int64_t t = 0;  // token row
  int64_t s = 0;  // sampled row
  out.query_start_loc[0] = 0;
  for (size_t b = 0; b < rows_.size(); ++b) {
    const Row& row = rows_[b];
    const Sequence& seq = *row.seq;
    const int64_t end = row.start + row.num_new_tokens;
    const int32_t* table = seq.block_table.data();
    out.seq_ids[b] = seq.seq_id;
    if (row.num_new_tokens == 1 && row.num_blocks * bs >= end) {
      // One token in the row's last block (always the case for a decode). A placeholder input
      // (async scheduling) names the previous Batch's sampled row that will produce it.
      const int64_t last = row.num_blocks - 1;
      const int32_t token = seq.token_ids[static_cast<size_t>(row.start)];
      out.input_ids[t] = token == kPlaceholder ? -(seq.last_sample_row + 1) : token;
      out.positions[t] = static_cast<int32_t>(row.start);
      out.slot_mapping[t] = static_cast<int32_t>(table[last] * bs + (row.start - last * bs));
      ++t;
    } else {
      std::copy_n(seq.token_ids.data() + row.start, row.num_new_tokens, out.input_ids + t);
      for (int64_t p = row.start; p < end;) {
        // One block at a time: the slots inside a block are consecutive.
        const int64_t block = p / bs;
        const int64_t block_end = std::min(end, (block + 1) * bs);
        auto slot = static_cast<int32_t>(table[block] * bs + (p - block * bs));
        for (; p < block_end; ++p, ++t) {
          out.positions[t] = static_cast<int32_t>(p);
          out.slot_mapping[t] = slot++;
        }
      }
    }
    out.query_start_loc[b + 1] = static_cast<int32_t>(t);
    out.seq_lens[b] = static_cast<int32_t>(end);
    int32_t* table_row = out.block_tables + static_cast<int64_t>(b) * bt_stride;
    std::copy_n(table, row.num_blocks, table_row);
    std::fill(table_row + row.num_blocks, table_row + shape.max_blocks, -1);
    if (row.is_sampled) {
      out.logits_indices[s] = static_cast<int32_t>(t - 1);
      out.sample_seq_ids[s] = seq.seq_id;
      out.temperature[s] = seq.sampling.temperature;
      out.top_p[s] = seq.sampling.top_p;
      out.top_k[s] = seq.sampling.top_k;
      out.min_p[s] = seq.sampling.min_p;
      out.uniforms[s] = sampling_uniform(seq.sampling.seed_hash, static_cast<uint64_t>(end));
      ++s;
    }
  }
}

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
