// AVX-512 pieces shared by the selection kernels (sample_pass.h,
// selection.cpp): 16 keys from one vector load, and which of 16 are retained.
// vector_isa.h says whether the AVX-512 loops run.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "../kernel_types.h"
#include "vector_isa.h"

namespace sap_kernels::cpu {

// Whether load_keys has a vector form: float16 weights with 32-bit keys
// (their float32 bit patterns) are converted one at a time.
template <int Type, int KeyBits>
inline constexpr bool kVectorKeys = !(Type == kFloat16 && KeyBits == 32);

template <int Type, int KeyBits>
__attribute__((target("arch=x86-64-v4"), always_inline)) inline __m512i load_keys(const void* data,
                                                                                  int64_t i) {
  if constexpr (Type == kFloat32) {
    const __m512i bits = _mm512_loadu_si512(static_cast<const uint32_t*>(data) + i);
    return _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  } else {
    const __m256i half = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(data) + i));
    // Zero-masking forms: GCC 12 warns about the undefined source of the plain ones.
    const __m512i bits = _mm512_maskz_cvtepu16_epi32(0xffff, half);
    if constexpr (KeyBits == 16) return _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff));
    static_assert(KeyBits == 16 || Type == kBFloat16, "float16 with 32-bit keys is scalar");
    const __m512i high = _mm512_maskz_slli_epi32(0xffff, bits, 16);
    return _mm512_and_si512(high, _mm512_set1_epi32(0x7fffffff));
  }
}

// Lane j set where mask byte j (of 16) is non-zero: which of 16 keys are
// retained; all 16 without masks.
template <bool Masked>
__attribute__((target("arch=x86-64-v4"), always_inline)) inline __mmask16 kept_lanes16(
    const uint8_t* mask, int64_t i) {
  if constexpr (!Masked) return 0xffff;
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + i));
  return _mm_test_epi8_mask(bytes, bytes);
}

}  // namespace sap_kernels::cpu
