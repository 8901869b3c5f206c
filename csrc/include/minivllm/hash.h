// minivllm/hash.h — the 64-bit hash behind the prefix cache.
//
// xxh64() is XXH64 written from its public specification
// (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md); tests check it against the
// `xxhash` Python package. hash_block_tokens() chains it over the KV blocks of a sequence:
//
//   hash(block j) = XXH64(token ids of block j as int32 little-endian bytes, seed = hash(block j-1))
//
// with seed 0 for block 0, so a block's hash covers the whole prefix up to and including it. The
// pure-Python twin (minivllm/engine/reference/hash.py) computes the same values.
#pragma once

#include <cstddef>
#include <cstdint>

namespace minivllm {

// XXH64 of `size` bytes at `data` with a 64-bit seed.
uint64_t xxh64(const void* data, size_t size, uint64_t seed);

// The prefix-cache hash of one full block of `num_tokens` token ids whose parent block hashed to
// `parent_hash` (0 for the first block).
uint64_t hash_block_tokens(uint64_t parent_hash, const int32_t* token_ids, size_t num_tokens);

// SplitMix64's finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mixer.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// The uniform a sampled row draws its token with: from the request's hashed seed and the row's
// context length, so a request's draws never depend on the rest of the batch. In [0, 1 - 2^-24]
// as float32 (the float64 value rounded, then kept below 1).
inline float sampling_uniform(uint64_t seed_hash, uint64_t counter) {
  const uint64_t h = splitmix64(seed_hash ^ counter);
  const auto u = static_cast<float>(static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0));
  constexpr float kBelowOne = 1.0f - 5.9604644775390625e-08f;  // 1 - 2^-24
  return u < kBelowOne ? u : kBelowOne;
}

}  // namespace minivllm
