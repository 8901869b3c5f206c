// minivllm/staging.h — the layout of the model runner's staging buffer, defined once.
//
// Every engine step the host writes the step's inputs into one int32 buffer, which the model
// runner uploads to the device in a single copy. This header is the one place that names the
// buffer's fields, their dtypes and extents, and says where each one sits; Python reads all of it
// from minivllm._core (STAGING_FIELDS, StagingLayout) and repeats none of it.
//
// Fields, in buffer order:
//
//   field               dtype    extent        written by
//   input_ids           int32    tokens        scheduler
//   positions           int32    tokens        scheduler
//   slot_mapping        int32    tokens        scheduler
//   logits_indices      int32    seqs          scheduler
//   seq_lens            int32    seqs          scheduler
//   prefill_cu_seqlens  int32    seqs+1        model runner
//   block_tables        int32    block_tables  scheduler
//   top_k               int32    seqs          scheduler
//   temperature         float32  seqs          scheduler
//   top_p               float32  seqs          scheduler
//   min_p               float32  seqs          scheduler
//   uniforms            float32  seqs          scheduler
//   prefill_tiles       int32    tiles         model runner
//   decode_order        int32    seqs          model runner
//
// Extents, in int32 elements: tokens = max_tokens, seqs = max_seqs, seqs+1 = max_seqs + 1,
// block_tables = max_seqs * max_blocks (row-major, row stride max_blocks), tiles = max_tiles.
// float32 fields hold float32 bit patterns in the int32 buffer. The scheduler writes only the
// used prefix of its fields each step (see Scheduler::schedule_into); the model runner writes
// the rest (the prefill rows' cu_seqlens, a CUDA graph's tile table and decode row order).
//
// A layout is packed (the fields back to back in buffer order from offset 0) or given (every
// field's offset, in any order, gaps allowed, no two fields overlapping). Capacities must be
// >= 1. Every size and offset is computed with overflow checks: a layout whose end does not fit
// int64 is refused with InvalidArgument naming the value, never wrapped.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace minivllm {

enum StagingField : int {
  kInputIds,
  kPositions,
  kSlotMapping,
  kLogitsIndices,
  kSeqLens,
  kPrefillCuSeqlens,
  kBlockTables,
  kTopK,
  kTemperature,
  kTopP,
  kMinP,
  kUniforms,
  kPrefillTiles,
  kDecodeOrder,
  kNumStagingFields
};

enum class StagingDtype { kInt32, kFloat32 };
enum class StagingExtent { kTokens, kSeqs, kSeqsPlus1, kBlockTables, kTiles };
enum class StagingWriter { kScheduler, kModelRunner };

struct StagingFieldInfo {
  const char* name;
  StagingDtype dtype;
  StagingExtent extent;
  StagingWriter writer;
};

// Indexed by StagingField, in buffer order.
extern const std::array<StagingFieldInfo, kNumStagingFields> kStagingFields;

const char* staging_dtype_name(StagingDtype dtype);     // "int32" / "float32"
const char* staging_extent_name(StagingExtent extent);  // "tokens", "seqs", "seqs+1", ...
// The field called `name`, or nullopt.
std::optional<StagingField> find_staging_field(std::string_view name);

class StagingLayout {
 public:
  using Offsets = std::array<int64_t, kNumStagingFields>;  // int32 elements, by StagingField

  // Packed. Throws InvalidArgument on a capacity < 1 or an end past int64.
  StagingLayout(int64_t max_tokens, int64_t max_seqs, int64_t max_blocks, int64_t max_tiles);
  // At `offsets`. Also throws InvalidArgument on a negative offset or overlapping fields.
  StagingLayout(int64_t max_tokens, int64_t max_seqs, int64_t max_blocks, int64_t max_tiles,
                const Offsets& offsets);

  int64_t offset(StagingField field) const { return offsets_[field]; }
  int64_t size(StagingField field) const { return sizes_[field]; }  // int32 elements
  int64_t total() const { return total_; }  // one past the end of the last field
  int64_t max_tokens() const { return max_tokens_; }
  int64_t max_seqs() const { return max_seqs_; }
  int64_t max_blocks() const { return max_blocks_; }  // the block-table row stride
  int64_t max_tiles() const { return max_tiles_; }

  // Throws InvalidArgument unless a buffer of `num_elements` int32 holds every field.
  void check_size(int64_t num_elements) const;

 private:
  StagingLayout(int64_t max_tokens, int64_t max_seqs, int64_t max_blocks, int64_t max_tiles,
                const Offsets* offsets);

  int64_t max_tokens_, max_seqs_, max_blocks_, max_tiles_;
  Offsets offsets_{};
  Offsets sizes_{};
  int64_t total_ = 0;
};

}  // namespace minivllm
