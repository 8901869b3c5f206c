// minivllm/block_manager.h — KV cache blocks: reference counts, free stack, LRU prefix cache.
//
// Every block is exactly one of:
//   free        refcount 0, no hash, on a LIFO stack (block 0 is handed out first);
//   cached-free refcount 0, holds a prefix hash, on an LRU list (least recently freed first);
//   referenced  refcount > 0, equal to its number of occurrences in block tables.
// allocate() pops the free stack and only when it is empty evicts the least recently freed cached
// block, dropping its hash. release() walks a block table in reverse, so a sequence's tail blocks
// are evicted before its head. A hash maps to at most one block; lookup() compares the parent
// hash and every token id, so a hash collision can never produce a wrong hit.
#pragma once

#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

namespace minivllm {

class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  // Free plus cached-free blocks: how many allocate() can hand out.
  int32_t num_free_blocks() const {
    return static_cast<int32_t>(free_block_ids_.size()) + num_cached_;
  }

  // A block with refcount 1. Throws std::logic_error when num_free_blocks() == 0.
  int32_t allocate();
  // One more reference to a block found by lookup() (a prefix-cache hit).
  void take(int32_t block_id);
  // Drops one reference to each block of `block_table`, last block first.
  void release(const std::vector<int32_t>& block_table);

  // The cached block holding `block_hash` whose parent hash and tokens match exactly.
  std::optional<int32_t> lookup(uint64_t block_hash, uint64_t parent_hash,
                                const int32_t* token_ids) const;
  // Offers a full, referenced block to the prefix cache; a no-op when the block already holds a
  // hash or another block holds this one.
  void register_block(int32_t block_id, uint64_t block_hash, uint64_t parent_hash,
                      const int32_t* token_ids);

  // Forgets every prefix: all hashes are dropped, and the cached-free blocks go back to the free
  // stack, least recently freed first (so the most recently freed is handed out first). Blocks
  // still referenced lose their hash too and are not offered again. Returns the hashes dropped.
  int32_t reset_prefix_cache();

  // Introspection, for tests.
  int32_t ref_count(int32_t block_id) const { return ref_counts_[block_id]; }
  std::optional<uint64_t> block_hash(int32_t block_id) const;
  const std::vector<int32_t>& free_block_ids() const { return free_block_ids_; }
  std::vector<int32_t> cached_block_ids() const;  // LRU order, oldest first
  const std::unordered_map<uint64_t, int32_t>& hash_to_block() const { return hash_to_block_; }

 private:
  void lru_push_back(int32_t block_id);
  void lru_unlink(int32_t block_id);

  int32_t num_blocks_;
  int32_t block_size_;
  std::vector<int32_t> ref_counts_;
  std::vector<uint8_t> has_hash_;
  std::vector<uint64_t> hashes_;
  std::vector<uint64_t> parent_hashes_;
  std::vector<std::vector<int32_t>> token_ids_;  // of cached blocks; capacity is kept for reuse
  std::vector<int32_t> free_block_ids_;          // stack
  // LRU list of cached-free blocks: circular, doubly linked, node num_blocks_ is the sentinel.
  std::vector<int32_t> lru_prev_;
  std::vector<int32_t> lru_next_;
  int32_t num_cached_ = 0;
  std::unordered_map<uint64_t, int32_t> hash_to_block_;
};

}  // namespace minivllm
