#include "minivllm/scheduler.h"

#include "minivllm/hash.h"
#include "internal.h"

#include <algorithm>
#include <string>

namespace minivllm {

using namespace internal;  // cat, ceil_div, contains, the constants

namespace {

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

}  // namespace minivllm
