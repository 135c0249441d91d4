// Loading blocks of weights as magnitudes, shared by the CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>

#include "../kernel_types.h"

#define SAP_INLINE inline __attribute__((always_inline))

namespace sap_kernels::cpu {

// A mask's bytes (0 or 1) as uint8_t: GCC 12 does not vectorise loops that
// read bool next to 32-bit compares (its bool pattern fails on the compare).
SAP_INLINE const uint8_t* mask_bytes(const bool* mask) {
  return reinterpret_cast<const uint8_t*>(mask);
}

template <class To, class From>
SAP_INLINE To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// |w| as float32 bits, from the raw bits of a float32, bfloat16 or float16.
// float16 -> float32: shifting the exponent+mantissa into place and scaling by
// 2^112 rebiases normals and turns float16 subnormals into float32 normals.
SAP_INLINE uint32_t magnitude_bits_f32(uint32_t bits) {
  return bits & 0x7fffffffu;
}
SAP_INLINE uint32_t magnitude_bits_bf16(uint16_t bits) {
  return uint32_t(bits & 0x7fffu) << 16;
}
SAP_INLINE uint32_t magnitude_bits_f16(uint16_t bits) {
  const uint32_t em = bits & 0x7fffu;
  const uint32_t finite = bits_as<uint32_t>(bits_as<float>(em << 13) * 0x1p112f);
  return em >= 0x7c00u ? (0x7f800000u | (em & 0x3ffu)) : finite;  // inf / NaN stay non-finite
}

constexpr uint32_t kFloat32InfBits = 0x7f800000u;

// The 16-bit key of a bfloat16 or float16 weight: its bits without the sign.
SAP_INLINE uint32_t magnitude_key16(uint16_t bits) {
  return bits & 0x7fffu;
}

// Key of element i of a shard: float32 bits of |w| (key_bits 32) or the
// native 16-bit magnitude bits (key_bits 16).
SAP_INLINE uint32_t magnitude_key(const Shard& shard, int64_t i, int key_bits) {
  switch (shard.type) {
    case kFloat32: return magnitude_bits_f32(static_cast<const uint32_t*>(shard.data)[i]);
    case kBFloat16: {
      const uint16_t b = static_cast<const uint16_t*>(shard.data)[i];
      return key_bits == 16 ? magnitude_key16(b) : magnitude_bits_bf16(b);
    }
    default: {
      const uint16_t b = static_cast<const uint16_t*>(shard.data)[i];
      return key_bits == 16 ? magnitude_key16(b) : magnitude_bits_f16(b);
    }
  }
}

// Whether a key denotes NaN or infinity.
SAP_INLINE bool key_is_nonfinite(uint32_t key, int key_bits, int32_t type) {
  if (key_bits == 32) return key >= kFloat32InfBits;
  return type == kBFloat16 ? key >= 0x7f80u : key >= 0x7c00u;
}

}  // namespace sap_kernels::cpu
