// Placeholder translation unit so the static core library always has a source.
namespace minivllm {
const char* version() { return "0.1.0"; }
}  // namespace minivllm
