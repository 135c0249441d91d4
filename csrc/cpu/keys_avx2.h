// AVX2 pieces of the row select (row_select.h) for CPUs without AVX-512:
// 8 keys from one vector load, which of them are retained, and a compress
// (AVX2 has none) by a permutation looked up per 8-bit lane mask.
#pragma once
#include <immintrin.h>

#include <array>
#include <cstdint>

#include "../kernel_types.h"

namespace sap_kernels::cpu {

// Keys of weights i..i+7 (magnitude bits, below 2^31, so signed compares
// order them). Float16 with 32-bit keys has no vector form (kVectorKeys).
template <int Type, int KeyBits>
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i load_keys8(const void* data,
                                                                                   int64_t i) {
  if constexpr (Type == kFloat32) {
    const __m256i bits = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint32_t*>(data) + i));
    return _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  } else {
    const __m128i half =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(data) + i));
    const __m256i bits = _mm256_cvtepu16_epi32(half);
    if constexpr (KeyBits == 16) return _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff));
    static_assert(KeyBits == 16 || Type == kBFloat16, "float16 with 32-bit keys is scalar");
    return _mm256_and_si256(_mm256_slli_epi32(bits, 16), _mm256_set1_epi32(0x7fffffff));
  }
}

// Bit j set where mask byte j (of 8) is non-zero; all 8 without masks.
template <bool Masked>
__attribute__((target("arch=x86-64-v3"), always_inline)) inline uint32_t kept_lanes8(
    const uint8_t* mask, int64_t i) {
  if constexpr (!Masked) return 0xffu;
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + i));
  const uint32_t zero = uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128())));
  return ~zero & 0xffu;
}

// Lane mask of a compare's result.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline uint32_t lanes8(__m256i compare) {
  return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(compare)));
}

// For each 8-bit lane mask, the indices of its set lanes in order, one byte
// each (the rest 0): the permutation that packs those lanes to the front.
inline constexpr std::array<uint64_t, 256> kCompressIndices = [] {
  std::array<uint64_t, 256> table{};
  for (uint32_t m = 0; m < 256; ++m) {
    int out = 0;
    for (uint32_t lane = 0; lane < 8; ++lane) {
      if (m & (1u << lane)) table[m] |= uint64_t(lane) << (8 * out++);
    }
  }
  return table;
}();

// The lanes of `keys` selected by `lanes`, packed to the front (the rest is
// don't-care). A table, not pdep/pext: those are microcoded on Zen 2.
__attribute__((target("arch=x86-64-v3"), always_inline)) inline __m256i compress8(__m256i keys,
                                                                                  uint32_t lanes) {
  const __m128i packed = _mm_cvtsi64_si128(int64_t(kCompressIndices[lanes]));
  return _mm256_permutevar8x32_epi32(keys, _mm256_cvtepu8_epi32(packed));
}

}  // namespace sap_kernels::cpu
