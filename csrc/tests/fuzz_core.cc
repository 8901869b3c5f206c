// Random-trace stress driver for the core, meant to be built with sanitizers:
//
//   cmake -S . -B build/fuzz -DMINIVLLM_BUILD_FUZZ=ON -DMINIVLLM_SANITIZE=ON
//         -Dpybind11_DIR=$(python -m pybind11 --cmakedir)
//   cmake --build build/fuzz --target fuzz_core && build/fuzz/fuzz_core [num_traces] [seconds]
//
// It runs num_traces traces (default 300; 0 = no limit) or until `seconds` have passed, whichever
// comes first. Each trace adds (sometimes invalid) requests, aborts, schedules (into plain
// buffers or a staging buffer with a random layout) and updates (sometimes with a wrong count,
// out-of-range or out-of-vocabulary ids) and checks the block invariants after every call; it
// also builds hostile staging layouts, which must be refused or be sound. The Python tests
// compare the core with its twin; this catches memory errors and UB the comparison can't.
// tests/test_core_sanitizers.py runs it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <limits>
#include <random>
#include <unordered_map>
#include <vector>

#include "minivllm/scheduler.h"
#include "minivllm/staging.h"

using namespace minivllm;

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

void check_invariants(const Scheduler& s) {
  const DebugState st = s.debug_state();
  const size_t n = st.ref_counts.size();
  std::vector<int> occurrences(n, 0), in_free(n, 0), in_cached(n, 0);
  for (const auto& [id, table] : st.block_tables) {
    for (const int32_t b : table) {
      check(b >= 0 && static_cast<size_t>(b) < n, "block id in range");
      ++occurrences[static_cast<size_t>(b)];
    }
  }
  for (const int32_t b : st.free_block_ids) ++in_free[static_cast<size_t>(b)];
  for (const int32_t b : st.cached_block_ids) ++in_cached[static_cast<size_t>(b)];
  for (size_t b = 0; b < n; ++b) {
    check(st.ref_counts[b] == occurrences[b], "refcount == block-table occurrences");
    check((st.ref_counts[b] > 0) + in_free[b] + in_cached[b] == 1, "one state per block");
    check(!in_free[b] || !st.block_hashes[b], "free blocks hold no hash");
    check(!in_cached[b] || st.block_hashes[b], "cached blocks hold a hash");
  }
  check(s.num_free_blocks() ==
            static_cast<int64_t>(st.free_block_ids.size() + st.cached_block_ids.size()),
        "free count");
  if (!s.has_unfinished()) check(s.num_free_blocks() == static_cast<int64_t>(n), "all free");
}

using Rng = std::mt19937_64;

int64_t uniform_in(Rng& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// A layout with the fields in a random order and random gaps; capacities from `caps`.
StagingLayout random_layout(Rng& rng, int64_t tokens, int64_t seqs, int64_t blocks) {
  const StagingLayout packed(tokens, seqs, blocks, uniform_in(rng, 1, 3));
  std::vector<int> order(kNumStagingFields);
  for (int f = 0; f < kNumStagingFields; ++f) order[static_cast<size_t>(f)] = f;
  std::shuffle(order.begin(), order.end(), rng);
  StagingLayout::Offsets offsets{};
  int64_t pos = 0;
  for (const int f : order) {
    pos += uniform_in(rng, 0, 3);
    offsets[f] = pos;
    pos += packed.size(static_cast<StagingField>(f));
  }
  return StagingLayout(tokens, seqs, blocks, packed.max_tiles(), offsets);
}

// Hostile layouts: values near the ends of int64. Each must be refused, or be sound: every field
// inside [0, total), none overlapping.
void fuzz_layouts(Rng& rng, int count) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  const int64_t edges[] = {kMin, kMin + 1, -1, 0, 1, 2, 1 << 20, int64_t{1} << 31,
                           int64_t{1} << 32, int64_t{1} << 62, kMax / 2, kMax - 8, kMax - 1, kMax};
  const auto any = [&] {
    if (uniform_in(rng, 0, 2) == 0) return uniform_in(rng, -4, 64);
    const int64_t edge = edges[uniform_in(rng, 0, std::size(edges) - 1)];
    int64_t near = 0;
    return __builtin_sub_overflow(edge, uniform_in(rng, 0, 2), &near) ? edge : near;
  };
  for (int i = 0; i < count; ++i) {
    StagingLayout::Offsets offsets{};
    for (auto& o : offsets) o = any();
    try {
      const StagingLayout l = uniform_in(rng, 0, 1) ? StagingLayout(any(), any(), any(), any())
                                                    : StagingLayout(any(), any(), any(), any(),
                                                                    offsets);
      for (int f = 0; f < kNumStagingFields; ++f) {
        const auto field = static_cast<StagingField>(f);
        check(l.offset(field) >= 0 && l.size(field) >= 1, "field inside the layout");
        check(l.size(field) <= l.total() && l.offset(field) <= l.total() - l.size(field),
              "field ends before total");
      }
    } catch (const InvalidArgument&) {
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int num_traces = argc > 1 ? std::atoi(argv[1]) : 300;
  const double max_seconds = argc > 2 ? std::atof(argv[2]) : 0.0;
  const auto start = std::chrono::steady_clock::now();
  const auto out_of_time = [&] {
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    return max_seconds > 0 && elapsed.count() >= max_seconds;
  };
  std::vector<int64_t> i64(1 << 16);
  std::vector<int32_t> i32[8];
  std::vector<float> f32[4];
  for (auto& v : i32) v.resize(1 << 16);
  for (auto& v : f32) v.resize(1 << 16);
  const BatchAllocator allocate = [&](const BatchShape& shape) {
    check(shape.num_seqs * shape.max_blocks < (1 << 16) && shape.num_tokens < (1 << 16),
          "fuzz buffers large enough");
    return BatchBuffers{i64.data(),       i32[0].data(), i32[1].data(), i32[2].data(),
                        i32[3].data(),    i32[4].data(), i32[5].data(), i32[6].data(),
                        i64.data() + 512, f32[0].data(), f32[1].data(), i32[7].data(),
                        f32[2].data(),    f32[3].data()};
  };
  std::vector<int64_t> side64(1 << 10);
  std::vector<int32_t> side32(1 << 10);
  const UnstagedAllocator unstaged = [&](const BatchShape& shape) {
    check(shape.num_seqs < 512, "fuzz side buffers large enough");
    return UnstagedBuffers{side64.data(), side32.data(), side64.data() + 512};
  };
  int64_t total_steps = 0;
  int trace = 0;
  for (; (num_traces == 0 || trace < num_traces) && !out_of_time(); ++trace) {
    Rng rng(static_cast<uint64_t>(trace));
    auto uniform = [&](int64_t lo, int64_t hi) { return uniform_in(rng, lo, hi); };
    fuzz_layouts(rng, 50);
    const int64_t block_size = std::vector<int64_t>{1, 2, 3, 16, 256}[uniform(0, 4)];
    const int64_t max_model_len = uniform(2, block_size * 6 + 2);
    const int64_t num_blocks = std::max<int64_t>(1, (max_model_len - 2) / block_size + uniform(0, 4));
    const int64_t max_num_seqs = uniform(1, 8);
    const bool async_scheduling = uniform(0, 1) == 1;
    const int64_t max_num_batched_tokens = max_num_seqs + uniform(0, 2 * block_size);
    Scheduler s(SchedulerConfig{num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                                max_model_len, uniform(0, 3) != 0, async_scheduling});
    const StagingLayout layout =
        random_layout(rng, max_num_batched_tokens + uniform(0, 2), max_num_seqs + uniform(0, 2),
                      (max_model_len + block_size - 1) / block_size + uniform(0, 2));
    std::vector<int32_t> host(static_cast<size_t>(layout.total()));
    const auto schedule = [&] {
      if (uniform(0, 1)) return s.schedule(allocate);
      if (uniform(0, 30) == 0) {  // a buffer one element short: refused, nothing scheduled
        try {
          s.schedule_into(host.data(), layout.total() - 1, layout, unstaged);
          check(false, "short staging buffer accepted");
        } catch (const InvalidArgument&) {
        }
      }
      return s.schedule_into(host.data(), layout.total(), layout, unstaged);
    };
    const int64_t vocab = uniform(0, 2) == 0 ? 5 : 7;  // sampled ids are 0..4, or 6 on purpose
    int64_t next_id = 0;
    std::vector<int64_t> ids;
    std::deque<int64_t> outstanding;  // async: sampled-row counts of Batches awaiting update()
    for (int step = 0; step < 400 || s.has_unfinished() || !outstanding.empty(); ++step) {
      check(step < 200000, "trace terminates");
      if (step < 400 && uniform(0, 2) == 0) {
        Request r;
        r.seq_id = uniform(0, 9) == 0 ? next_id - 1 : next_id;
        ++next_id;
        const int64_t len = uniform(0, max_model_len);
        for (int64_t i = 0; i < len; ++i) r.prompt_token_ids.push_back(uniform(-1, 5) + (i % 3));
        r.max_tokens = uniform(0, 3 * max_model_len);
        r.eos_token_ids = {0};
        r.ignore_eos = uniform(0, 1);
        r.top_p = uniform(0, 20) == 0 ? 0.0 : 1.0;
        if (uniform(0, 30) == 0) r.top_p = 1e-50;  // 0 as float32: refused
        if (uniform(0, 30) == 0) r.temperature = 0x1.ffffffp+127;  // inf as float32: refused
        if (uniform(0, 30) == 0) r.max_tokens = std::numeric_limits<int64_t>::max();
        if (uniform(0, 3) == 0) r.vocab_size = vocab;
        r.skip_prefix_cache = uniform(0, 4) == 0;
        try {
          s.add_request(r);
          ids.push_back(r.seq_id);
        } catch (const InvalidArgument&) {
        }
      }
      if (step < 400 && uniform(0, 19) == 0 && !ids.empty()) {
        try {
          s.abort(ids[static_cast<size_t>(uniform(0, static_cast<int64_t>(ids.size()) - 1))]);
        } catch (const InvalidArgument&) {
        }
      }
      check_invariants(s);
      const auto shape = schedule();
      check_invariants(s);
      if (async_scheduling) {
        // None with work left only while a Batch awaits update() (its placeholders block it).
        if (!shape) check(!s.has_unfinished() || !outstanding.empty(), "None only when idle");
        if (shape && shape->num_samples > 0) outstanding.push_back(shape->num_samples);
        while (!outstanding.empty() &&
               (outstanding.size() == 2 || !shape || uniform(0, 2) == 0)) {
          std::vector<int64_t> tokens(static_cast<size_t>(outstanding.front()));
          for (auto& t : tokens) t = uniform(0, 20) == 0 ? 0 : uniform(1, 4);
          if (step < 400 && uniform(0, 30) == 0 && !ids.empty()) {
            try {  // abort while Batches are outstanding
              s.abort(ids[static_cast<size_t>(uniform(0, static_cast<int64_t>(ids.size()) - 1))]);
            } catch (const InvalidArgument&) {
            }
          }
          s.update(tokens.data(), outstanding.front());
          outstanding.pop_front();
          check_invariants(s);
        }
        total_steps += shape.has_value();
        continue;
      }
      if (!shape) {
        check(!s.has_unfinished(), "None only when idle");
        continue;
      }
      ++total_steps;
      std::vector<int64_t> tokens(static_cast<size_t>(shape->num_samples) + 1);
      for (auto& t : tokens) t = uniform(0, 20) == 0 ? 0 : uniform(1, 4);
      if (uniform(0, 30) == 0) {
        try {
          s.update(tokens.data(), shape->num_samples + 1);
          check(false, "wrong count accepted");
        } catch (const InvalidArgument&) {
        }
        if (shape->num_samples > 0) {
          tokens[0] = 6;  // outside the vocabulary of requests added with vocab_size 5
          try {
            s.update(tokens.data(), shape->num_samples);
            continue;  // accepted: that row's request had no vocab_size, or 7
          } catch (const InvalidArgument&) {
          }
        }
        tokens[0] = -5;
        try {
          if (shape->num_samples > 0) {
            s.update(tokens.data(), shape->num_samples);
            check(false, "negative id accepted");
          }
        } catch (const InvalidArgument&) {
        }
        tokens[0] = 1;
      }
      if (step < 400 && uniform(0, 30) == 0 && !ids.empty()) {
        try {  // abort between schedule() and update()
          s.abort(ids[static_cast<size_t>(uniform(0, static_cast<int64_t>(ids.size()) - 1))]);
        } catch (const InvalidArgument&) {
        }
      }
      s.update(tokens.data(), shape->num_samples);
      check_invariants(s);
    }
  }
  std::printf("ok: %d traces, %lld steps\n", trace, static_cast<long long>(total_steps));
  return 0;
}
