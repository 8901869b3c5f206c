// Python bindings of the core: argument conversion and numpy buffers only, no scheduling logic.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "minivllm/hash.h"
#include "minivllm/scheduler.h"
#include "minivllm/staging.h"

namespace py = pybind11;
using minivllm::bindings::checked_host;
using minivllm::bindings::describe;
using minivllm::bindings::float_arg;
using minivllm::bindings::int64_arg;
using minivllm::bindings::to_int_vector;
using minivllm::BatchBuffers;
using minivllm::BatchShape;
using minivllm::Scheduler;
using minivllm::StagingLayout;
using minivllm::UnstagedBuffers;

namespace minivllm {
const char* version();
}

namespace {

// The Python-visible Batch: numpy arrays written by Scheduler::schedule().
struct PyBatch {
  py::array_t<int64_t> seq_ids;
  int64_t num_decodes = 0;
  py::array_t<int32_t> input_ids, positions, slot_mapping, query_start_loc, seq_lens;
  py::array_t<int32_t> block_tables;
  py::array_t<int32_t> logits_indices;
  py::array_t<int64_t> sample_seq_ids;
  py::array_t<float> temperature, top_p;
  py::array_t<int32_t> top_k;
  py::array_t<float> min_p;
  py::array_t<float> uniforms;
  bool all_greedy = true, any_top_k_or_p = false, any_min_p = false;
};

// What schedule_into() returns: the Batch's arrays went into the caller's staging buffer; these
// are the rest (the shape, the flags, and the small arrays the step loop reads).
struct StagedBatch {
  int64_t num_seqs = 0, num_tokens = 0, num_samples = 0, max_blocks = 0, num_decodes = 0;
  bool all_greedy = true, any_top_k_or_p = false, any_min_p = false;
  py::array_t<int64_t> seq_ids, sample_seq_ids;
  py::array_t<int32_t> query_start_loc;
};

// Allocates the numpy arrays of a Batch of shape `s` and points the core at them.
BatchBuffers new_batch_buffers(PyBatch& batch, const BatchShape& s) {
  batch.seq_ids = py::array_t<int64_t>(s.num_seqs);
  batch.num_decodes = s.num_decodes;
  batch.input_ids = py::array_t<int32_t>(s.num_tokens);
  batch.positions = py::array_t<int32_t>(s.num_tokens);
  batch.slot_mapping = py::array_t<int32_t>(s.num_tokens);
  batch.query_start_loc = py::array_t<int32_t>(s.num_seqs + 1);
  batch.seq_lens = py::array_t<int32_t>(s.num_seqs);
  batch.block_tables = py::array_t<int32_t>({s.num_seqs, s.max_blocks});
  batch.logits_indices = py::array_t<int32_t>(s.num_samples);
  batch.sample_seq_ids = py::array_t<int64_t>(s.num_samples);
  batch.temperature = py::array_t<float>(s.num_samples);
  batch.top_p = py::array_t<float>(s.num_samples);
  batch.top_k = py::array_t<int32_t>(s.num_samples);
  batch.min_p = py::array_t<float>(s.num_samples);
  batch.uniforms = py::array_t<float>(s.num_samples);
  batch.all_greedy = s.all_greedy;
  batch.any_top_k_or_p = s.any_top_k_or_p;
  batch.any_min_p = s.any_min_p;
  return BatchBuffers{batch.seq_ids.mutable_data(),        batch.input_ids.mutable_data(),
                     batch.positions.mutable_data(),      batch.slot_mapping.mutable_data(),
                     batch.query_start_loc.mutable_data(), batch.seq_lens.mutable_data(),
                     batch.block_tables.mutable_data(),   batch.logits_indices.mutable_data(),
                     batch.sample_seq_ids.mutable_data(), batch.temperature.mutable_data(),
                     batch.top_p.mutable_data(),          batch.top_k.mutable_data(),
                     batch.min_p.mutable_data(),          batch.uniforms.mutable_data()};
}

py::object schedule(Scheduler& sched) {
  PyBatch batch;
  const auto shape =
      sched.schedule([&batch](const BatchShape& s) { return new_batch_buffers(batch, s); });
  if (!shape) return py::none();
  return py::cast(std::move(batch));
}

// schedule() with the big arrays written straight into `host` at `layout`. Everything is
// checked before the scheduler runs: a bad buffer or layout raises ValueError, nothing changes.
py::object schedule_into(Scheduler& sched, const py::object& host_obj,
                         const StagingLayout& layout) {
  auto host = checked_host(layout, host_obj);
  StagedBatch staged;
  const auto shape = sched.schedule_into(
      host.mutable_data(), host.shape(0), layout, [&staged](const BatchShape& s) {
        staged.seq_ids = py::array_t<int64_t>(s.num_seqs);
        staged.sample_seq_ids = py::array_t<int64_t>(s.num_samples);
        staged.query_start_loc = py::array_t<int32_t>(s.num_seqs + 1);
        return UnstagedBuffers{staged.seq_ids.mutable_data(),
                               staged.query_start_loc.mutable_data(),
                               staged.sample_seq_ids.mutable_data()};
      });
  if (!shape) return py::none();
  staged.num_seqs = shape->num_seqs;
  staged.num_tokens = shape->num_tokens;
  staged.num_samples = shape->num_samples;
  staged.max_blocks = shape->max_blocks;
  staged.num_decodes = shape->num_decodes;
  staged.all_greedy = shape->all_greedy;
  staged.any_top_k_or_p = shape->any_top_k_or_p;
  staged.any_min_p = shape->any_min_p;
  return py::cast(std::move(staged));
}

// ---- the Scheduler ---------------------------------------------------------------------------

std::unique_ptr<Scheduler> make_scheduler(const py::object& num_blocks, const py::object& block_size,
                                          const py::object& max_num_seqs,
                                          const py::object& max_num_batched_tokens,
                                          const py::object& max_model_len,
                                          bool enable_prefix_caching, bool async_scheduling) {
  minivllm::SchedulerConfig c;
  c.num_blocks = int64_arg(num_blocks, "num_blocks");
  c.block_size = int64_arg(block_size, "block_size");
  c.max_num_seqs = int64_arg(max_num_seqs, "max_num_seqs");
  c.max_num_batched_tokens = int64_arg(max_num_batched_tokens, "max_num_batched_tokens");
  c.max_model_len = int64_arg(max_model_len, "max_model_len");
  c.enable_prefix_caching = enable_prefix_caching;
  c.async_scheduling = async_scheduling;
  return std::make_unique<Scheduler>(c);
}

py::list update(Scheduler& sched, const py::object& sampled_token_ids) {
  if (!py::isinstance<py::array_t<int64_t>>(sampled_token_ids)) {
    throw py::value_error("sampled_token_ids must be a numpy int64 array, got " +
                          describe(sampled_token_ids));
  }
  const auto tokens =
      py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(sampled_token_ids);
  if (tokens.ndim() != 1) {
    throw py::value_error("sampled_token_ids must be 1-D, got shape " +
                          std::string(py::str(sampled_token_ids.attr("shape"))));
  }
  py::list out;
  for (auto& f : sched.update(tokens.data(), tokens.shape(0))) {
    out.append(py::make_tuple(f.seq_id, minivllm::finish_reason_name(f.reason),
                              py::cast(f.output_token_ids)));
  }
  return out;
}

// Argument conversion in the twin's order (so both raise the same error first); the core
// validates the values.
void add_request(Scheduler& sched, const py::object& seq_id, const py::object& prompt_token_ids,
                 const py::object& max_tokens, bool ignore_eos, const py::object& eos_token_ids,
                 const py::object& stop_token_ids, const py::object& temperature,
                 const py::object& top_p, const py::object& top_k, const py::object& min_p,
                 const py::object& vocab_size, const py::object& seed, bool skip_prefix_cache) {
  minivllm::Request r;
  r.seq_id = int64_arg(seq_id, "seq_id");
  PyObject* index = PyNumber_Index(seed.ptr());  // what operator.index accepts, as the twin
  if (index == nullptr) {
    PyErr_Clear();
    throw py::type_error("seed must be an int, got " + std::string(py::repr(seed)));
  }
  const auto seed_int = py::reinterpret_steal<py::int_>(index);
  if (seed_int < py::int_(0) || seed_int >= py::int_(1).attr("__lshift__")(64)) {
    throw py::value_error("seed must be in [0, 2**64), got " + std::string(py::str(seed_int)));
  }
  r.seed = seed_int.cast<uint64_t>();
  r.max_tokens = int64_arg(max_tokens, "max_tokens");
  r.top_k = int64_arg(top_k, "top_k");
  r.temperature = float_arg(temperature, "temperature");
  r.top_p = float_arg(top_p, "top_p");
  r.min_p = float_arg(min_p, "min_p");
  r.eos_token_ids = to_int_vector(eos_token_ids, "eos_token_ids", "eos token id");
  r.stop_token_ids = to_int_vector(stop_token_ids, "stop_token_ids", "stop token id");
  if (!vocab_size.is_none()) r.vocab_size = int64_arg(vocab_size, "vocab_size");
  r.prompt_token_ids = to_int_vector(prompt_token_ids, "prompt_token_ids", "prompt token id");
  r.ignore_eos = ignore_eos;
  r.skip_prefix_cache = skip_prefix_cache;
  sched.add_request(r);
}

py::dict stats(const Scheduler& sched) {
  const auto& s = sched.stats();
  py::dict d;
  d["num_preemptions"] = s.num_preemptions;
  d["prefix_cache_queries"] = s.prefix_cache_queries;
  d["prefix_cache_hits"] = s.prefix_cache_hits;
  return d;
}

py::dict debug_state(const Scheduler& sched) {
  const auto st = sched.debug_state();
  py::dict d;
  d["ref_counts"] = st.ref_counts;
  d["block_hashes"] = st.block_hashes;
  d["free_block_ids"] = st.free_block_ids;
  d["cached_block_ids"] = st.cached_block_ids;
  d["hash_to_block"] = st.hash_to_block;
  d["waiting"] = st.waiting;
  d["running"] = st.running;
  d["block_tables"] = st.block_tables;
  d["num_computed_tokens"] = st.num_computed_tokens;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "minivllm host core: scheduler, KV block manager, prefix cache (see _core.pyi)";
  m.def("version", &minivllm::version);

  m.def(
      "xxh64",
      [](const py::bytes& data, uint64_t seed) {
        const std::string_view view = data;
        return minivllm::xxh64(view.data(), view.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0);
  m.def(
      "hash_block_tokens",
      [](uint64_t parent_hash, const py::object& token_ids) {
        const auto ids = to_int_vector(token_ids, "token_ids", "token id");
        for (const int64_t id : ids) {
          if (id < INT32_MIN || id > INT32_MAX) {
            throw py::value_error("token id " + std::to_string(id) + " does not fit int32");
          }
        }
        std::vector<int32_t> ids32(ids.begin(), ids.end());
        return minivllm::hash_block_tokens(parent_hash, ids32.data(), ids32.size());
      },
      py::arg("parent_hash"), py::arg("token_ids"));

  py::class_<PyBatch>(m, "Batch")
      .def_readonly("seq_ids", &PyBatch::seq_ids)
      .def_readonly("num_decodes", &PyBatch::num_decodes)
      .def_readonly("input_ids", &PyBatch::input_ids)
      .def_readonly("positions", &PyBatch::positions)
      .def_readonly("slot_mapping", &PyBatch::slot_mapping)
      .def_readonly("query_start_loc", &PyBatch::query_start_loc)
      .def_readonly("seq_lens", &PyBatch::seq_lens)
      .def_readonly("block_tables", &PyBatch::block_tables)
      .def_readonly("logits_indices", &PyBatch::logits_indices)
      .def_readonly("sample_seq_ids", &PyBatch::sample_seq_ids)
      .def_readonly("temperature", &PyBatch::temperature)
      .def_readonly("top_p", &PyBatch::top_p)
      .def_readonly("top_k", &PyBatch::top_k)
      .def_readonly("min_p", &PyBatch::min_p)
      .def_readonly("uniforms", &PyBatch::uniforms)
      .def_readonly("all_greedy", &PyBatch::all_greedy)
      .def_readonly("any_top_k_or_p", &PyBatch::any_top_k_or_p)
      .def_readonly("any_min_p", &PyBatch::any_min_p)
      .def_property_readonly("num_seqs", [](const PyBatch& b) { return b.seq_ids.size(); })
      .def_property_readonly("num_tokens", [](const PyBatch& b) { return b.input_ids.size(); })
      .def_property_readonly("num_samples",
                             [](const PyBatch& b) { return b.logits_indices.size(); })
      .def_property_readonly("max_blocks", [](const PyBatch& b) { return b.block_tables.shape(1); })
      .def("__repr__", [](const PyBatch& b) {
        return "Batch(num_seqs=" + std::to_string(b.seq_ids.size()) +
               ", num_decodes=" + std::to_string(b.num_decodes) +
               ", num_tokens=" + std::to_string(b.input_ids.size()) + ")";
      });

  py::class_<StagedBatch>(m, "StagedBatch")
      .def_readonly("num_seqs", &StagedBatch::num_seqs)
      .def_readonly("num_tokens", &StagedBatch::num_tokens)
      .def_readonly("num_samples", &StagedBatch::num_samples)
      .def_readonly("max_blocks", &StagedBatch::max_blocks)
      .def_readonly("num_decodes", &StagedBatch::num_decodes)
      .def_readonly("all_greedy", &StagedBatch::all_greedy)
      .def_readonly("any_top_k_or_p", &StagedBatch::any_top_k_or_p)
      .def_readonly("any_min_p", &StagedBatch::any_min_p)
      .def_readonly("seq_ids", &StagedBatch::seq_ids)
      .def_readonly("sample_seq_ids", &StagedBatch::sample_seq_ids)
      .def_readonly("query_start_loc", &StagedBatch::query_start_loc)
      .def("__repr__", [](const StagedBatch& b) {
        return "StagedBatch(num_seqs=" + std::to_string(b.num_seqs) +
               ", num_decodes=" + std::to_string(b.num_decodes) +
               ", num_tokens=" + std::to_string(b.num_tokens) + ")";
      });

  minivllm::bindings::define_staging_layout(m);

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init(&make_scheduler), py::arg("num_blocks"), py::arg("block_size"), py::arg("max_num_seqs"),
           py::arg("max_num_batched_tokens"), py::arg("max_model_len"),
           py::arg("enable_prefix_caching") = true, py::arg("async_scheduling") = false)
      .def("add_request", &add_request, py::arg("seq_id"), py::arg("prompt_token_ids"),
           py::arg("max_tokens"), py::arg("ignore_eos") = false,
           py::arg("eos_token_ids") = py::tuple(), py::arg("stop_token_ids") = py::tuple(),
           py::arg("temperature") = 1.0, py::arg("top_p") = 1.0, py::arg("top_k") = 0,
           py::arg("min_p") = 0.0, py::arg("vocab_size") = py::none(), py::arg("seed") = 0,
           py::arg("skip_prefix_cache") = false)
      .def("schedule", &schedule)
      .def("schedule_into", &schedule_into, py::arg("host"), py::arg("layout"))
      .def("update", &update, py::arg("sampled_token_ids"))
      .def(
          "abort", [](Scheduler& s, const py::object& seq_id) { s.abort(int64_arg(seq_id, "seq_id")); },
          py::arg("seq_id"))
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("reset_prefix_cache", &Scheduler::reset_prefix_cache)
      .def_property_readonly("num_free_blocks", &Scheduler::num_free_blocks)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("stats", &stats)
      .def("debug_state", &debug_state);
}
