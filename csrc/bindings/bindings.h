// What the binding sources share: argument conversion (each names the argument and the value it
// refused) and the staging layout's module part.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "minivllm/staging.h"

namespace minivllm::bindings {

namespace py = pybind11;

// A value's numpy dtype, or its Python type's name.
std::string describe(const py::handle& obj);

// `obj` as an int64: TypeError unless operator.index accepts it, ValueError naming `name` and
// the value when it does not fit.
int64_t int64_arg(const py::handle& obj, const std::string& name);

// `obj` as a double, as float() takes a number: TypeError for anything else (strings too),
// ValueError naming `name` for an int too large for a double.
double float_arg(const py::handle& obj, const std::string& name);

// A 1-D integer array or an iterable of ints, as int64 values; `item` names one element.
std::vector<int64_t> to_int_vector(const py::handle& obj, const char* name, const char* item);

// The one validation of a staging buffer: `host` as the int32 array the layout can write.
py::array_t<int32_t> checked_host(const StagingLayout& layout, const py::object& host);

// STAGING_FIELDS and the StagingLayout class.
void define_staging_layout(py::module_& m);

}  // namespace minivllm::bindings
