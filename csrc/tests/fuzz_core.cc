// Random-trace stress driver for the core, meant to be built with sanitizers:
//
//   cmake -S . -B build/fuzz -DMINIVLLM_BUILD_FUZZ=ON -Dpybind11_DIR=$(python -m pybind11
//         --cmakedir) -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all"
//   cmake --build build/fuzz --target fuzz_core && build/fuzz/fuzz_core [num_traces]
//
// Each trace adds (sometimes invalid) requests, aborts, schedules and updates (sometimes with a
// wrong count or out-of-range ids) and checks the block invariants after every call. The Python
// tests compare the core with its twin; this catches memory errors and UB the comparison can't.
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <unordered_map>
#include <vector>

#include "minivllm/scheduler.h"

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

}  // namespace

int main(int argc, char** argv) {
  const int num_traces = argc > 1 ? std::atoi(argv[1]) : 300;
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
  int64_t total_steps = 0;
  for (int trace = 0; trace < num_traces; ++trace) {
    std::mt19937_64 rng(static_cast<uint64_t>(trace));
    auto uniform = [&](int64_t lo, int64_t hi) {  // inclusive
      return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
    };
    const int64_t block_size = std::vector<int64_t>{1, 2, 3, 16, 256}[uniform(0, 4)];
    const int64_t max_model_len = uniform(2, block_size * 6 + 2);
    const int64_t num_blocks = std::max<int64_t>(1, (max_model_len - 2) / block_size + uniform(0, 4));
    const int64_t max_num_seqs = uniform(1, 8);
    const bool async_scheduling = uniform(0, 1) == 1;
    Scheduler s(SchedulerConfig{num_blocks, block_size, max_num_seqs,
                                max_num_seqs + uniform(0, 2 * block_size), max_model_len,
                                uniform(0, 3) != 0, async_scheduling});
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
      const auto shape = s.schedule(allocate);
      check_invariants(s);
      if (async_scheduling) {
        // None with work left only while a Batch awaits update() (its placeholders block it).
        if (!shape) check(!s.has_unfinished() || !outstanding.empty(), "None only when idle");
        if (shape && shape->num_samples > 0) outstanding.push_back(shape->num_samples);
        while (!outstanding.empty() &&
               (outstanding.size() == 2 || !shape || uniform(0, 2) == 0)) {
          std::vector<int64_t> tokens(static_cast<size_t>(outstanding.front()));
          for (auto& t : tokens) t = uniform(0, 20) == 0 ? 0 : uniform(1, 6);
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
      for (auto& t : tokens) t = uniform(0, 20) == 0 ? 0 : uniform(1, 6);
      if (uniform(0, 30) == 0) {
        try {
          s.update(tokens.data(), shape->num_samples + 1);
          check(false, "wrong count accepted");
        } catch (const InvalidArgument&) {
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
  std::printf("ok: %d traces, %lld steps\n", num_traces, static_cast<long long>(total_steps));
  return 0;
}
