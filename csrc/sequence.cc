#include "minivllm/sequence.h"

#include "minivllm/hash.h"

namespace minivllm {

uint64_t Sequence::block_hash(int64_t j, int64_t block_size) {
  while (static_cast<int64_t>(block_hashes.size()) <= j) {
    const int64_t k = static_cast<int64_t>(block_hashes.size());
    const uint64_t parent = k == 0 ? 0 : block_hashes.back();
    block_hashes.push_back(hash_block_tokens(parent, token_ids.data() + k * block_size,
                                             static_cast<size_t>(block_size)));
  }
  return block_hashes[static_cast<size_t>(j)];
}

}  // namespace minivllm
