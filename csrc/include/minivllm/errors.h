// minivllm/errors.h — the exceptions the core throws.
//
// InvalidArgument (a std::invalid_argument) reports bad input and names the bad value; pybind11
// turns it into ValueError. ProtocolError (a std::runtime_error) reports calls in the wrong order
// (schedule() twice without update(), update() with no Batch outstanding); it becomes RuntimeError.
// The core validates everything that comes from outside before touching any state or index, so a
// throw leaves the scheduler exactly as it was.
#pragma once

#include <stdexcept>
#include <string>

namespace minivllm {

class InvalidArgument : public std::invalid_argument {
 public:
  explicit InvalidArgument(const std::string& what) : std::invalid_argument(what) {}
};

class ProtocolError : public std::runtime_error {
 public:
  explicit ProtocolError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace minivllm
