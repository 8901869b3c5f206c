#include "minivllm/block_manager.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace minivllm {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      ref_counts_(num_blocks, 0),
      has_hash_(num_blocks, 0),
      hashes_(num_blocks, 0),
      parent_hashes_(num_blocks, 0),
      token_ids_(num_blocks),
      // One more node, the sentinel (in size_t: num_blocks may be INT32_MAX).
      lru_prev_(static_cast<size_t>(num_blocks) + 1, num_blocks),
      lru_next_(static_cast<size_t>(num_blocks) + 1, num_blocks) {
  free_block_ids_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_block_ids_.push_back(b);
  hash_to_block_.reserve(static_cast<size_t>(num_blocks));
}

void BlockManager::lru_push_back(int32_t block_id) {
  const int32_t sentinel = num_blocks_;
  const int32_t last = lru_prev_[sentinel];
  lru_next_[last] = block_id;
  lru_prev_[block_id] = last;
  lru_next_[block_id] = sentinel;
  lru_prev_[sentinel] = block_id;
  ++num_cached_;
}

void BlockManager::lru_unlink(int32_t block_id) {
  lru_next_[lru_prev_[block_id]] = lru_next_[block_id];
  lru_prev_[lru_next_[block_id]] = lru_prev_[block_id];
  --num_cached_;
}

int32_t BlockManager::allocate() {
  int32_t block_id;
  if (!free_block_ids_.empty()) {
    block_id = free_block_ids_.back();
    free_block_ids_.pop_back();
  } else if (num_cached_ > 0) {
    block_id = lru_next_[num_blocks_];  // least recently freed
    lru_unlink(block_id);
    hash_to_block_.erase(hashes_[block_id]);
    has_hash_[block_id] = 0;
  } else {
    throw std::logic_error("BlockManager::allocate: no free block");
  }
  ref_counts_[block_id] = 1;
  return block_id;
}

void BlockManager::take(int32_t block_id) {
  if (ref_counts_[block_id] == 0) lru_unlink(block_id);
  ++ref_counts_[block_id];
}

void BlockManager::release(const std::vector<int32_t>& block_table) {
  for (auto it = block_table.rbegin(); it != block_table.rend(); ++it) {
    const int32_t block_id = *it;
    if (--ref_counts_[block_id] == 0) {
      if (has_hash_[block_id]) {
        lru_push_back(block_id);
      } else {
        free_block_ids_.push_back(block_id);
      }
    }
  }
}

std::optional<int32_t> BlockManager::lookup(uint64_t block_hash, uint64_t parent_hash,
                                            const int32_t* token_ids) const {
  const auto it = hash_to_block_.find(block_hash);
  if (it == hash_to_block_.end()) return std::nullopt;
  const int32_t block_id = it->second;
  if (parent_hashes_[block_id] != parent_hash) return std::nullopt;
  if (std::memcmp(token_ids_[block_id].data(), token_ids,
                  static_cast<size_t>(block_size_) * sizeof(int32_t)) != 0) {
    return std::nullopt;
  }
  return block_id;
}

void BlockManager::register_block(int32_t block_id, uint64_t block_hash, uint64_t parent_hash,
                                  const int32_t* token_ids) {
  if (has_hash_[block_id]) return;
  if (!hash_to_block_.emplace(block_hash, block_id).second) return;
  has_hash_[block_id] = 1;
  hashes_[block_id] = block_hash;
  parent_hashes_[block_id] = parent_hash;
  token_ids_[block_id].assign(token_ids, token_ids + block_size_);
}

int32_t BlockManager::reset_prefix_cache() {
  const auto dropped = static_cast<int32_t>(hash_to_block_.size());
  for (int32_t b = lru_next_[num_blocks_]; b != num_blocks_;) {
    const int32_t next = lru_next_[b];
    lru_unlink(b);
    free_block_ids_.push_back(b);
    b = next;
  }
  std::fill(has_hash_.begin(), has_hash_.end(), 0);
  hash_to_block_.clear();
  return dropped;
}

std::optional<uint64_t> BlockManager::block_hash(int32_t block_id) const {
  if (!has_hash_[block_id]) return std::nullopt;
  return hashes_[block_id];
}

std::vector<int32_t> BlockManager::cached_block_ids() const {
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(num_cached_));
  for (int32_t b = lru_next_[num_blocks_]; b != num_blocks_; b = lru_next_[b]) out.push_back(b);
  return out;
}

}  // namespace minivllm
