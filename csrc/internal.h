// Helpers the core's source files share (not part of its interface).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace minivllm::internal {

inline constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
// The smallest double that rounds to float32 infinity: halfway between FLT_MAX and 2^128.
inline constexpr double kFloat32Overflow = 0x1.ffffffp+127;
inline constexpr int32_t kPlaceholder = -1;  // a token scheduled to be sampled, not delivered yet

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

// For a >= 0 and b >= 1; never overflows.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

inline bool contains(const std::vector<int64_t>& ids, int64_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

}  // namespace minivllm::internal
