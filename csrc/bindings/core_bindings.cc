#include <pybind11/pybind11.h>

namespace minivllm {
const char* version();
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "minivllm host core";
  m.def("version", &minivllm::version);
}
