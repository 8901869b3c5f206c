// Bindings of the staging-buffer layout (minivllm/staging.h): the StagingLayout class, its field
// table, and the check of a host buffer against it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <string>

#include "bindings.h"
#include "minivllm/staging.h"

namespace minivllm::bindings {
namespace {

StagingField field_arg(const std::string& name) {
  const auto field = minivllm::find_staging_field(name);
  if (!field) throw py::value_error("unknown staging field '" + name + "'");
  return *field;
}

StagingLayout make_layout(const py::object& max_tokens, const py::object& max_seqs,
                          const py::object& max_blocks, const py::object& max_tiles,
                          const py::object& offsets) {
  const int64_t tokens = int64_arg(max_tokens, "max_tokens");
  const int64_t seqs = int64_arg(max_seqs, "max_seqs");
  const int64_t blocks = int64_arg(max_blocks, "max_blocks");
  const int64_t tiles = int64_arg(max_tiles, "max_tiles");
  if (offsets.is_none()) return StagingLayout(tokens, seqs, blocks, tiles);
  if (!py::isinstance<py::dict>(offsets)) {
    throw py::type_error("offsets must be a dict of field name -> int, got " + describe(offsets));
  }
  StagingLayout::Offsets at{};
  std::array<bool, minivllm::kNumStagingFields> given{};
  for (const auto& [key, value] : py::reinterpret_borrow<py::dict>(offsets)) {
    if (!py::isinstance<py::str>(key)) {
      throw py::type_error("offsets keys must be field names, got " + std::string(py::repr(key)));
    }
    const auto name = key.cast<std::string>();
    const StagingField field = field_arg(name);
    at[field] = int64_arg(value, "offset of " + name);
    given[field] = true;
  }
  std::string missing;
  for (int f = 0; f < minivllm::kNumStagingFields; ++f) {
    if (!given[f]) missing += std::string(missing.empty() ? "" : ", ") + kStagingFields[f].name;
  }
  if (!missing.empty()) throw py::value_error("offsets is missing field(s) " + missing);
  return StagingLayout(tokens, seqs, blocks, tiles, at);
}

}  // namespace

py::array_t<int32_t> checked_host(const StagingLayout& layout, const py::object& host) {
  const std::string expected =
      "host must be a numpy int32 array (1-D, C-contiguous, writeable, aligned), got ";
  if (!py::isinstance<py::array_t<int32_t>>(host)) {
    throw py::value_error(expected + describe(host));
  }
  auto arr = py::reinterpret_borrow<py::array_t<int32_t>>(host);
  if (arr.ndim() != 1) {
    throw py::value_error(expected + "shape " + std::string(py::str(host.attr("shape"))));
  }
  if (!(arr.flags() & py::array::c_style)) throw py::value_error(expected + "a non-contiguous array");
  if (!arr.writeable()) throw py::value_error(expected + "a read-only array");
  if (!(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw py::value_error(expected + "a misaligned array");
  }
  layout.check_size(arr.shape(0));
  return arr;
}

void define_staging_layout(py::module_& m) {
  py::tuple fields(static_cast<size_t>(minivllm::kNumStagingFields));
  for (int f = 0; f < minivllm::kNumStagingFields; ++f) {
    const auto& info = kStagingFields[f];
    fields[f] = py::make_tuple(info.name, minivllm::staging_dtype_name(info.dtype),
                               minivllm::staging_extent_name(info.extent));
  }
  m.attr("STAGING_FIELDS") = fields;

  py::class_<StagingLayout>(m, "StagingLayout")
      .def(py::init(&make_layout), py::arg("max_tokens"), py::arg("max_seqs"),
           py::arg("max_blocks"), py::arg("max_tiles") = 1, py::arg("offsets") = py::none())
      .def_property_readonly("fields",
                             [](const StagingLayout&) {
                               py::tuple names(static_cast<size_t>(minivllm::kNumStagingFields));
                               for (int f = 0; f < minivllm::kNumStagingFields; ++f) {
                                 names[f] = kStagingFields[f].name;
                               }
                               return names;
                             })
      .def(
          "dtype",
          [](const StagingLayout&, const std::string& name) {
            return minivllm::staging_dtype_name(kStagingFields[field_arg(name)].dtype);
          },
          py::arg("name"))
      .def(
          "extent",
          [](const StagingLayout&, const std::string& name) {
            return minivllm::staging_extent_name(kStagingFields[field_arg(name)].extent);
          },
          py::arg("name"))
      .def(
          "offset",
          [](const StagingLayout& l, const std::string& name) { return l.offset(field_arg(name)); },
          py::arg("name"))
      .def(
          "size",
          [](const StagingLayout& l, const std::string& name) { return l.size(field_arg(name)); },
          py::arg("name"))
      .def_property_readonly("total", &StagingLayout::total)
      .def_property_readonly("max_tokens", &StagingLayout::max_tokens)
      .def_property_readonly("max_seqs", &StagingLayout::max_seqs)
      .def_property_readonly("max_blocks", &StagingLayout::max_blocks)
      .def_property_readonly("max_tiles", &StagingLayout::max_tiles)
      .def(
          "check", [](const StagingLayout& l, const py::object& host) { checked_host(l, host); },
          py::arg("host"))
      .def("__repr__", [](const StagingLayout& l) {
        std::string out = "StagingLayout(max_tokens=" + std::to_string(l.max_tokens()) +
                          ", max_seqs=" + std::to_string(l.max_seqs()) +
                          ", max_blocks=" + std::to_string(l.max_blocks()) +
                          ", max_tiles=" + std::to_string(l.max_tiles()) + ", offsets={";
        for (int f = 0; f < minivllm::kNumStagingFields; ++f) {
          out += std::string(f ? ", '" : "'") + kStagingFields[f].name +
                 "': " + std::to_string(l.offset(static_cast<StagingField>(f)));
        }
        return out + "})";
      });
}

}  // namespace minivllm::bindings
