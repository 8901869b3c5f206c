// Argument conversion of the bindings: Python objects to the core's C++ values.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"

namespace minivllm::bindings {

std::string describe(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) return py::str(obj.attr("dtype"));
  return py::str(py::type::handle_of(obj).attr("__name__"));
}

int64_t int64_arg(const py::handle& obj, const std::string& name) {
  PyObject* index = PyNumber_Index(obj.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    throw py::type_error(name + " must be an int, got " + std::string(py::repr(obj)));
  }
  const auto value = py::reinterpret_steal<py::int_>(index);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow != 0) {
    throw py::value_error(name + " " + std::string(py::str(value)) + " does not fit int64");
  }
  return v;
}

double float_arg(const py::handle& obj, const std::string& name) {
  const double v = PyFloat_AsDouble(obj.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    const bool overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
    PyErr_Clear();
    if (overflow) {
      throw py::value_error(name + " " + std::string(py::str(obj)) + " does not fit a float");
    }
    throw py::type_error(name + " must be a float, got " + std::string(py::repr(obj)));
  }
  return v;
}

std::vector<int64_t> to_int_vector(const py::handle& obj, const char* name, const char* item) {
  if (py::isinstance<py::array>(obj)) {
    const auto arr = py::reinterpret_borrow<py::array>(obj);
    const char kind = arr.dtype().kind();
    if ((kind != 'i' && kind != 'u') || arr.ndim() != 1) {
      throw py::value_error(std::string(name) + " must be a 1-D integer array, got " +
                            std::string(py::str(arr.dtype())) + " of shape " +
                            std::string(py::str(obj.attr("shape"))));
    }
    if (kind == 'u' && arr.itemsize() == 8) {  // the one integer dtype int64 cannot hold
      const auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
      for (py::ssize_t i = 0; i < u.size(); ++i) {
        if (u.data()[i] > static_cast<uint64_t>(INT64_MAX)) {
          throw py::value_error(std::string(item) + " " + std::to_string(u.data()[i]) +
                                " does not fit int64");
        }
      }
    }
    const auto ints = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
    return std::vector<int64_t>(ints.data(), ints.data() + ints.size());
  }
  std::vector<int64_t> out;
  for (const py::handle element : py::iter(obj)) out.push_back(int64_arg(element, item));
  return out;
}

}  // namespace minivllm::bindings
