// Device helpers shared by the CUDA kernels: magnitudes and radix keys from raw
// weight bits, each piece's unit, and a vectorised walk over a piece.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace sap_kernels::cuda {

constexpr uint32_t kFloat32InfBits = 0x7f800000u;

// |w| as float32 bits from the raw bits of a float32, bfloat16 or float16
// (exact: every bfloat16/float16 value is a float32 value). float16: shifting
// exponent and mantissa into place and scaling by 2^112 rebiases normals and
// turns subnormals into float32 normals; inf/NaN stay non-finite.
template <int Type>
__device__ __forceinline__ uint32_t magnitude_bits(uint32_t raw) {
  if constexpr (Type == kFloat32) {
    return raw & 0x7fffffffu;
  } else if constexpr (Type == kBFloat16) {
    return (raw & 0x7fffu) << 16;
  } else {
    const uint32_t em = raw & 0x7fffu;
    if (em >= 0x7c00u) return kFloat32InfBits | (em & 0x3ffu);
    return __float_as_uint(__uint_as_float(em << 13) * 0x1p112f);
  }
}

// Radix key: float32 bits of |w| (key_bits 32) or the 16-bit magnitude bits
// (key_bits 16, only when every weight has one 16-bit type).
template <int Type>
__device__ __forceinline__ uint32_t key_of(uint32_t raw, int key_bits) {
  return key_bits == 16 ? (raw & 0x7fffu) : magnitude_bits<Type>(raw);
}

// The key at and above which a key is NaN or infinite.
__device__ __forceinline__ uint32_t nonfinite_key(int key_bits, int32_t type) {
  if (key_bits == 32) return kFloat32InfBits;
  return type == kBFloat16 ? 0x7f80u : 0x7c00u;
}

__device__ __forceinline__ int64_t unit_of(const Shard& shard, const Segment& seg, int32_t scope) {
  return shard.first_unit + (scope == kNeuron ? seg.begin / shard.row_length : 0);
}

template <int Type>
using RawOf = std::conditional_t<Type == kFloat32, uint32_t, uint16_t>;

// Calls visit(index, raw_bits, keep) for the elements [0, length) of the piece
// starting at element `begin` of `shard` that belong to thread `lane` of
// `lanes`, then visit.flush() after each group of up to kVec elements. The
// assignment of elements to threads is fixed, so per-thread sums are the same
// run after run. The body uses 16-byte loads of weights (and kVec-byte loads
// of mask bytes) once the weight pointer is 16-byte aligned, if the mask
// pointer is then aligned too; otherwise every element is loaded singly.
template <int Type, class Visit>
__device__ __forceinline__ void walk_piece(const Shard& shard, int64_t begin, int64_t length,
                                           int lane, int lanes, Visit& visit) {
  using Raw = RawOf<Type>;
  constexpr int kVec = 16 / sizeof(Raw);
  const Raw* data = static_cast<const Raw*>(shard.data) + begin;
  const uint8_t* mask = shard.mask ? reinterpret_cast<const uint8_t*>(shard.mask) + begin : nullptr;
  int64_t head = int64_t((16 - (reinterpret_cast<uintptr_t>(data) & 15)) & 15) / sizeof(Raw);
  if (head > length) head = length;
  if (mask && (reinterpret_cast<uintptr_t>(mask + head) % kVec) != 0) head = length;
  for (int64_t i = lane; i < head; i += lanes) {
    visit(i, uint32_t(data[i]), mask ? mask[i] != 0 : true);
    visit.flush();
  }
  const int64_t vectors = (length - head) / kVec;
  const uint4* vector_data = reinterpret_cast<const uint4*>(data + head);
#pragma unroll 4
  for (int64_t v = lane; v < vectors; v += lanes) {
    const uint4 word = __ldg(vector_data + v);
    const Raw* raw = reinterpret_cast<const Raw*>(&word);
    uint64_t keep_bytes = ~uint64_t(0);
    if (mask) {
      if constexpr (kVec == 4) {
        keep_bytes = *reinterpret_cast<const uint32_t*>(mask + head + v * kVec);
      } else {
        keep_bytes = *reinterpret_cast<const uint64_t*>(mask + head + v * kVec);
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      visit(head + v * kVec + j, uint32_t(raw[j]), ((keep_bytes >> (8 * j)) & 0xffu) != 0);
    }
    visit.flush();
  }
  for (int64_t i = head + vectors * kVec + lane; i < length; i += lanes) {
    visit(i, uint32_t(data[i]), mask ? mask[i] != 0 : true);
    visit.flush();
  }
}

// Runs body.template operator()<Type>() for the piece's weight type (uniform
// across a block: one piece at a time).
template <class Body>
__device__ __forceinline__ void dispatch_type(int32_t type, Body& body) {
  switch (type) {
    case kFloat32: body.template operator()<kFloat32>(); break;
    case kBFloat16: body.template operator()<kBFloat16>(); break;
    default: body.template operator()<kFloat16>(); break;
  }
}

inline int grid_for(int64_t work, int blocks_per_sm) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t persistent = int64_t(sms) * blocks_per_sm;
  return int(work < persistent ? (work > 0 ? work : 1) : persistent);
}

}  // namespace sap_kernels::cuda
