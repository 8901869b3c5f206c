// Python bindings of the core: argument conversion and numpy buffers only, no scheduling logic.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "minivllm/hash.h"
#include "minivllm/scheduler.h"

namespace py = pybind11;
using minivllm::BatchBuffers;
using minivllm::BatchShape;
using minivllm::Scheduler;

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

// The order of schedule_into()'s `layout`: int32-element offsets into the staging buffer, the
// block-table row stride, then the capacities (tokens, rows) the fields were sized for.
enum Layout : int {
  kInputIds, kPositions, kSlotMapping, kSeqLens, kBlockTables, kBlockTablesStride,
  kLogitsIndices, kTemperature, kTopP, kTopK, kMinP, kUniforms, kMaxTokens, kMaxSeqs,
  kLayoutSize
};

std::string describe(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) return py::str(obj.attr("dtype"));
  return py::str(py::type::handle_of(obj).attr("__name__"));
}

std::vector<int64_t> to_int_vector(const py::handle& obj, const char* name) {
  if (py::isinstance<py::array>(obj)) {
    const auto arr = py::reinterpret_borrow<py::array>(obj);
    const char kind = arr.dtype().kind();
    if ((kind != 'i' && kind != 'u') || arr.ndim() != 1) {
      throw py::value_error(std::string(name) + " must be a 1-D integer array, got " +
                            std::string(py::str(arr.dtype())) + " of shape " +
                            std::string(py::str(obj.attr("shape"))));
    }
    const auto ints = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
    return std::vector<int64_t>(ints.data(), ints.data() + ints.size());
  }
  std::vector<int64_t> out;
  for (const py::handle item : py::iter(obj)) {
    try {
      out.push_back(item.cast<int64_t>());
    } catch (const py::cast_error&) {
      throw py::type_error(std::string(name) + " must hold ints, got " +
                           std::string(py::repr(item)));
    }
  }
  return out;
}

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

// schedule() with the big arrays written straight into `host` (an int32 staging buffer; float
// fields are float32 bit patterns) at the offsets of `layout`. Everything is checked before the
// scheduler runs: a bad layout raises ValueError and changes nothing.
py::object schedule_into(Scheduler& sched, const py::object& host_obj, const py::object& layout_obj) {
  if (!py::isinstance<py::array_t<int32_t>>(host_obj)) {
    throw py::value_error("host must be a numpy int32 array, got " + describe(host_obj));
  }
  if (!py::isinstance<py::array_t<int64_t>>(layout_obj)) {
    throw py::value_error("layout must be a numpy int64 array, got " + describe(layout_obj));
  }
  auto host = py::reinterpret_borrow<py::array_t<int32_t>>(host_obj);
  const auto layout = py::reinterpret_borrow<py::array_t<int64_t>>(layout_obj);
  if (host.ndim() != 1 || !(host.flags() & py::array::c_style) || !host.writeable()) {
    throw py::value_error("host must be a writeable, contiguous 1-D int32 array");
  }
  if (layout.ndim() != 1 || layout.shape(0) != kLayoutSize) {
    throw py::value_error("layout must have " + std::to_string(kLayoutSize) + " entries");
  }
  const auto L = [&layout](int i) { return layout.at(i); };
  const auto& cfg = sched.config();
  const int64_t width = (cfg.max_model_len + cfg.block_size - 1) / cfg.block_size;
  const int64_t stride = L(kBlockTablesStride), max_tokens = L(kMaxTokens), max_seqs = L(kMaxSeqs);
  if (max_tokens < cfg.max_num_batched_tokens || max_seqs < cfg.max_num_seqs || stride < width) {
    throw py::value_error(
        "layout capacities (tokens " + std::to_string(max_tokens) + ", rows " +
        std::to_string(max_seqs) + ", block-table stride " + std::to_string(stride) +
        ") are below the scheduler's (" + std::to_string(cfg.max_num_batched_tokens) + ", " +
        std::to_string(cfg.max_num_seqs) + ", " + std::to_string(width) + ")");
  }
  const int64_t size = host.shape(0);
  const auto fits = [size](int64_t offset, int64_t n) { return offset >= 0 && offset + n <= size; };
  bool ok = fits(L(kBlockTables), max_seqs * stride);
  for (const int f : {kInputIds, kPositions, kSlotMapping}) ok = ok && fits(L(f), max_tokens);
  for (const int f : {kSeqLens, kLogitsIndices, kTemperature, kTopP, kTopK, kMinP, kUniforms}) {
    ok = ok && fits(L(f), max_seqs);
  }
  if (!ok) throw py::value_error("layout places a field outside the host buffer");

  int32_t* base = host.mutable_data();
  const auto as_float = [base, &L](int f) { return reinterpret_cast<float*>(base + L(f)); };
  StagedBatch staged;
  const auto shape = sched.schedule([&](const BatchShape& s) {
    staged.seq_ids = py::array_t<int64_t>(s.num_seqs);
    staged.sample_seq_ids = py::array_t<int64_t>(s.num_samples);
    staged.query_start_loc = py::array_t<int32_t>(s.num_seqs + 1);
    BatchBuffers out{staged.seq_ids.mutable_data(), base + L(kInputIds), base + L(kPositions),
                     base + L(kSlotMapping), staged.query_start_loc.mutable_data(),
                     base + L(kSeqLens), base + L(kBlockTables), base + L(kLogitsIndices),
                     staged.sample_seq_ids.mutable_data(), as_float(kTemperature),
                     as_float(kTopP), base + L(kTopK), as_float(kMinP), as_float(kUniforms)};
    out.block_tables_stride = stride;
    return out;
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

void add_request(Scheduler& sched, int64_t seq_id, const py::object& prompt_token_ids,
                 int64_t max_tokens, bool ignore_eos, const py::object& eos_token_ids,
                 const py::object& stop_token_ids, double temperature, double top_p,
                 int64_t top_k, double min_p, std::optional<int64_t> vocab_size,
                 const py::object& seed) {
  minivllm::Request r;
  r.seq_id = seq_id;
  r.eos_token_ids = to_int_vector(eos_token_ids, "eos_token_ids");
  r.stop_token_ids = to_int_vector(stop_token_ids, "stop_token_ids");
  r.prompt_token_ids = to_int_vector(prompt_token_ids, "prompt_token_ids");
  r.max_tokens = max_tokens;
  r.ignore_eos = ignore_eos;
  r.temperature = temperature;
  r.top_p = top_p;
  r.top_k = top_k;
  r.min_p = min_p;
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
  r.vocab_size = vocab_size;
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
        const auto ids = to_int_vector(token_ids, "token_ids");
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

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init([](int64_t num_blocks, int64_t block_size, int64_t max_num_seqs,
                       int64_t max_num_batched_tokens, int64_t max_model_len,
                       bool enable_prefix_caching, bool async_scheduling) {
             return std::make_unique<Scheduler>(minivllm::SchedulerConfig{
                 num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
                 enable_prefix_caching, async_scheduling});
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("max_num_seqs"),
           py::arg("max_num_batched_tokens"), py::arg("max_model_len"),
           py::arg("enable_prefix_caching") = true, py::arg("async_scheduling") = false)
      .def("add_request", &add_request, py::arg("seq_id"), py::arg("prompt_token_ids"),
           py::arg("max_tokens"), py::arg("ignore_eos") = false,
           py::arg("eos_token_ids") = py::tuple(), py::arg("stop_token_ids") = py::tuple(),
           py::arg("temperature") = 1.0, py::arg("top_p") = 1.0, py::arg("top_k") = 0,
           py::arg("min_p") = 0.0, py::arg("vocab_size") = py::none(), py::arg("seed") = 0)
      .def("schedule", &schedule)
      .def("schedule_into", &schedule_into, py::arg("host"), py::arg("layout"))
      .def("update", &update, py::arg("sampled_token_ids"))
      .def("abort", &Scheduler::abort, py::arg("seq_id"))
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def_property_readonly("num_free_blocks", &Scheduler::num_free_blocks)
      .def_property_readonly("stats", &stats)
      .def("debug_state", &debug_state);
}
