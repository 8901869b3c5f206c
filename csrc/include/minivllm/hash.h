// minivllm/hash.h — the 64-bit hash behind the prefix cache.
//
// xxh64() is XXH64 written from its public specification
// (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md); tests check it against the
// `xxhash` Python package. hash_block_tokens() chains it over the KV blocks of a sequence:
//
//   hash(block j) = XXH64(token ids of block j as int32 little-endian bytes, seed = hash(block j-1))
//
// with seed 0 for block 0, so a block's hash covers the whole prefix up to and including it. The
// pure-Python twin (minivllm/engine/reference.py) computes the same values.
#pragma once

#include <cstddef>
#include <cstdint>

namespace minivllm {

// XXH64 of `size` bytes at `data` with a 64-bit seed.
uint64_t xxh64(const void* data, size_t size, uint64_t seed);

// The prefix-cache hash of one full block of `num_tokens` token ids whose parent block hashed to
// `parent_hash` (0 for the first block).
uint64_t hash_block_tokens(uint64_t parent_hash, const int32_t* token_ids, size_t num_tokens);

}  // namespace minivllm
