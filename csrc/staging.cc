// The staging-buffer layout; see minivllm/staging.h.
#include "minivllm/staging.h"

#include <algorithm>
#include <string>

#include "internal.h"
#include "minivllm/errors.h"

namespace minivllm {
namespace {

using internal::cat;
using D = StagingDtype;
using E = StagingExtent;
using W = StagingWriter;

}  // namespace

const std::array<StagingFieldInfo, kNumStagingFields> kStagingFields = {{
    {"input_ids", D::kInt32, E::kTokens, W::kScheduler},
    {"positions", D::kInt32, E::kTokens, W::kScheduler},
    {"slot_mapping", D::kInt32, E::kTokens, W::kScheduler},
    {"logits_indices", D::kInt32, E::kSeqs, W::kScheduler},
    {"seq_lens", D::kInt32, E::kSeqs, W::kScheduler},
    {"prefill_cu_seqlens", D::kInt32, E::kSeqsPlus1, W::kModelRunner},
    {"block_tables", D::kInt32, E::kBlockTables, W::kScheduler},
    {"top_k", D::kInt32, E::kSeqs, W::kScheduler},
    {"temperature", D::kFloat32, E::kSeqs, W::kScheduler},
    {"top_p", D::kFloat32, E::kSeqs, W::kScheduler},
    {"min_p", D::kFloat32, E::kSeqs, W::kScheduler},
    {"uniforms", D::kFloat32, E::kSeqs, W::kScheduler},
    {"prefill_tiles", D::kInt32, E::kTiles, W::kModelRunner},
    {"decode_order", D::kInt32, E::kSeqs, W::kModelRunner},
}};

const char* staging_dtype_name(StagingDtype dtype) {
  return dtype == StagingDtype::kInt32 ? "int32" : "float32";
}

const char* staging_extent_name(StagingExtent extent) {
  switch (extent) {
    case StagingExtent::kTokens:
      return "tokens";
    case StagingExtent::kSeqs:
      return "seqs";
    case StagingExtent::kSeqsPlus1:
      return "seqs+1";
    case StagingExtent::kBlockTables:
      return "block_tables";
    case StagingExtent::kTiles:
      return "tiles";
  }
  return "?";
}

std::optional<StagingField> find_staging_field(std::string_view name) {
  for (int f = 0; f < kNumStagingFields; ++f) {
    if (name == kStagingFields[f].name) return static_cast<StagingField>(f);
  }
  return std::nullopt;
}

StagingLayout::StagingLayout(int64_t max_tokens, int64_t max_seqs, int64_t max_blocks,
                             int64_t max_tiles)
    : StagingLayout(max_tokens, max_seqs, max_blocks, max_tiles, nullptr) {}

StagingLayout::StagingLayout(int64_t max_tokens, int64_t max_seqs, int64_t max_blocks,
                             int64_t max_tiles, const Offsets& offsets)
    : StagingLayout(max_tokens, max_seqs, max_blocks, max_tiles, &offsets) {}

StagingLayout::StagingLayout(int64_t max_tokens, int64_t max_seqs, int64_t max_blocks,
                             int64_t max_tiles, const Offsets* offsets)
    : max_tokens_(max_tokens),
      max_seqs_(max_seqs),
      max_blocks_(max_blocks),
      max_tiles_(max_tiles) {
  const auto at_least_one = [](const char* name, int64_t value) {
    if (value < 1) {
      throw InvalidArgument(cat("staging layout: ", name, " must be >= 1, got ", value));
    }
  };
  at_least_one("max_tokens", max_tokens);
  at_least_one("max_seqs", max_seqs);
  at_least_one("max_blocks", max_blocks);
  at_least_one("max_tiles", max_tiles);
  // The extents. max_seqs + 1 and max_seqs * max_blocks are the only ones that can overflow.
  int64_t seqs_plus_1 = 0, block_tables = 0;
  if (__builtin_add_overflow(max_seqs, int64_t{1}, &seqs_plus_1)) {
    throw InvalidArgument(
        cat("staging layout: max_seqs + 1 = ", max_seqs, " + 1 does not fit int64"));
  }
  if (__builtin_mul_overflow(max_seqs, max_blocks, &block_tables)) {
    throw InvalidArgument(cat("staging layout: block_tables size max_seqs * max_blocks = ",
                              max_seqs, " * ", max_blocks, " does not fit int64"));
  }
  for (int f = 0; f < kNumStagingFields; ++f) {
    switch (kStagingFields[f].extent) {
      case StagingExtent::kTokens:
        sizes_[f] = max_tokens;
        break;
      case StagingExtent::kSeqs:
        sizes_[f] = max_seqs;
        break;
      case StagingExtent::kSeqsPlus1:
        sizes_[f] = seqs_plus_1;
        break;
      case StagingExtent::kBlockTables:
        sizes_[f] = block_tables;
        break;
      case StagingExtent::kTiles:
        sizes_[f] = max_tiles;
        break;
    }
  }

  std::array<int64_t, kNumStagingFields> ends{};
  for (int f = 0; f < kNumStagingFields; ++f) {
    const char* name = kStagingFields[f].name;
    if (offsets == nullptr) {
      offsets_[f] = f == 0 ? 0 : ends[f - 1];
    } else {
      offsets_[f] = (*offsets)[f];
      if (offsets_[f] < 0) {
        throw InvalidArgument(cat("staging layout: offset of ", name, " must be >= 0, got ",
                                  offsets_[f]));
      }
    }
    if (__builtin_add_overflow(offsets_[f], sizes_[f], &ends[f])) {
      throw InvalidArgument(cat("staging layout: ", name, " at offset ", offsets_[f],
                                " with size ", sizes_[f], " ends past int64"));
    }
  }

  // No two fields overlap: sorted by offset, each ends where the next may start.
  std::array<int, kNumStagingFields> order{};
  for (int f = 0; f < kNumStagingFields; ++f) order[f] = f;
  std::sort(order.begin(), order.end(),
            [this](int a, int b) { return offsets_[a] < offsets_[b]; });
  for (int i = 0; i + 1 < kNumStagingFields; ++i) {
    const int a = order[i], b = order[i + 1];
    if (ends[a] > offsets_[b]) {
      throw InvalidArgument(cat("staging layout: fields ", kStagingFields[a].name, " [",
                                offsets_[a], ", ", ends[a], ") and ", kStagingFields[b].name,
                                " [", offsets_[b], ", ", ends[b], ") overlap"));
    }
  }
  total_ = ends[order[kNumStagingFields - 1]];
}

void StagingLayout::check_size(int64_t num_elements) const {
  if (num_elements < total_) {
    throw InvalidArgument(cat("host buffer has ", num_elements,
                              " int32 elements, the staging layout needs ", total_));
  }
}

}  // namespace minivllm
