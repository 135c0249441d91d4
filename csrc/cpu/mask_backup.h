// Masks updated in place (prune_masks_, prune_masks_by_sample_): the checks
// they need, and a copy of the old masks at one bit per weight to put them
// back when the op fails after writing (bad input must change nothing).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "../shards.h"
#include "magnitudes.h"

namespace sap_kernels::cpu {

// Bit j of the result = mask[j], for 8 bytes of 0 or 1: the multiply moves
// byte j's bit to bit 56 + j without carries.
SAP_INLINE uint32_t eight_mask_bits(const uint8_t* mask) {
  uint64_t bytes;
  std::memcpy(&bytes, mask, 8);
  return uint32_t((bytes * 0x0102040810204080ull) >> 56);
}

// Bit j % 16 of bits[j / 16] = mask[j].
SAP_INLINE void pack_mask_bits(const uint8_t* mask, int64_t length, uint16_t* bits) {
  int64_t first = 0;
  for (; first + 16 <= length; first += 16) {
    bits[first / 16] =
        uint16_t(eight_mask_bits(mask + first) | (eight_mask_bits(mask + first + 8) << 8));
  }
  if (first < length) {
    uint32_t word = 0;
    for (int64_t j = 0; first + j < length; ++j) word |= uint32_t(mask[first + j]) << j;
    bits[first / 16] = uint16_t(word);
  }
}

// The old bits of each segment's masks, from a whole word each (threads
// writing different segments never share a word).
class MaskBackup {
 public:
  explicit MaskBackup(const std::vector<Segment>& segments) : offsets_(segments.size() + 1, 0) {
    for (size_t i = 0; i < segments.size(); ++i) {
      offsets_[i + 1] = offsets_[i] + (segments[i].length + 15) / 16;
    }
    // Uninitialised: the kernel writes every word of a segment it goes through.
    bits_.reset(new uint16_t[size_t(offsets_.back())]);
  }
  uint16_t* segment_bits(size_t segment) { return bits_.get() + offsets_[segment]; }
  void save(size_t segment, const bool* mask, int64_t length) {
    pack_mask_bits(mask_bytes(mask), length, segment_bits(segment));
  }
  // Writes the old bits back over the masks (one per shard) of every segment
  // of the chunks the kernel went through (chunk_done; nullptr: all of them).
  void restore(const std::vector<Segment>& segments, const std::vector<int64_t>& chunk_starts,
               const std::vector<bool*>& masks, const std::vector<uint8_t>* chunk_done) const {
    at::parallel_for(0, int64_t(chunk_starts.size()) - 1, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        if (chunk_done != nullptr && !(*chunk_done)[c]) continue;
        for (int64_t i = chunk_starts[c]; i < chunk_starts[c + 1]; ++i) {
          bool* mask = masks[segments[i].shard] + segments[i].begin;
          const uint16_t* bits = bits_.get() + offsets_[i];
          for (int64_t j = 0; j < segments[i].length; ++j) mask[j] = (bits[j >> 4] >> (j & 15)) & 1;
        }
      }
    });
  }

 private:
  std::vector<int64_t> offsets_;
  std::unique_ptr<uint16_t[]> bits_;
};

// The optional masks of a table built from in-place masks.
inline c10::List<std::optional<at::Tensor>> optional_masks(at::TensorList masks) {
  c10::List<std::optional<at::Tensor>> list;
  for (const at::Tensor& mask : masks) list.push_back(mask);
  return list;
}

}  // namespace sap_kernels::cpu
