// Keys of magnitudes and the histogram inner loop, shared by the selection
// kernels (selection.cpp). A key is the float32 bit pattern of |w| (key_bits
// 32) or the 16-bit magnitude bits of a bfloat16/float16 weight (key_bits 16).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../kernel_types.h"
#include "magnitudes.h"

namespace sap_kernels::cpu {

constexpr int64_t kBins = 65536;
// A thread fills two copies of its table from alternate elements, which halves
// the store-to-load dependency chains on popular bins (bfloat16 weights repeat
// a lot; exact zeros all land in one bin of pass 1). Pass-0 digits of
// magnitudes have no sign bit, so they are < 2^15 and both copies fit in
// 65,536 bins; pass 1 uses 2 x 65,536 (512 KiB, within L2).
constexpr uint32_t kHalfBins = 32768;

// Lambdas in the kernels' dispatch are inlined so that their loops are
// compiled inside the target_clones functions (for AVX2 / AVX-512).
#define SAP_INLINE_LAMBDA __attribute__((always_inline))

template <int V>
using IntC = std::integral_constant<int, V>;

template <int Type, int KeyBits>
SAP_INLINE uint32_t key_at(const void* data, int64_t i) {
  if constexpr (Type == kFloat32) {
    return magnitude_bits_f32(static_cast<const uint32_t*>(data)[i]);
  } else {
    const uint16_t b = static_cast<const uint16_t*>(data)[i];
    if constexpr (KeyBits == 16) return magnitude_key16(b);
    if constexpr (Type == kBFloat16) return magnitude_bits_bf16(b);
    return magnitude_bits_f16(b);
  }
}

// Smallest key that denotes NaN or infinity.
template <int Type, int KeyBits>
constexpr uint32_t nonfinite_key() {
  if constexpr (KeyBits == 32) return kFloat32InfBits;
  return Type == kBFloat16 ? 0x7f80u : 0x7c00u;
}

// Calls f(IntC<type>, IntC<key_bits>, bool_constant<masked>) for the shard.
template <class F>
SAP_INLINE void with_key_type(const Shard& shard, int64_t key_bits, F&& f) {
  auto go = [&](auto type, auto bits) SAP_INLINE_LAMBDA {
    if (shard.mask != nullptr) {
      f(type, bits, std::true_type{});
    } else {
      f(type, bits, std::false_type{});
    }
  };
  if (shard.type == kFloat32) return go(IntC<kFloat32>{}, IntC<32>{});
  if (shard.type == kBFloat16) {
    return key_bits == 16 ? go(IntC<kBFloat16>{}, IntC<16>{}) : go(IntC<kBFloat16>{}, IntC<32>{});
  }
  return key_bits == 16 ? go(IntC<kFloat16>{}, IntC<16>{}) : go(IntC<kFloat16>{}, IntC<32>{});
}

// Calls on_block(first, last) for each block [first, last) of Block indices
// in [0, length) where matches(i) (0 or 1) holds for some i, and for the
// shorter last block in any case (on_block must allow blocks without a
// match). The test is a vectorised loop (a constant trip count: GCC left the
// variable one scalar); blocks without a match, most of them when matches
// are rare, cost no branch per index.
template <int64_t Block, class Matches, class OnBlock>
SAP_INLINE void for_blocks_with_a_match(int64_t length, Matches&& matches, OnBlock&& on_block) {
  int64_t first = 0;
  for (; first + Block <= length; first += Block) {
    uint32_t any = 0;
    for (int64_t i = 0; i < Block; ++i) any |= matches(first + i);
    if (any != 0) on_block(first, first + Block);
  }
  if (first < length) on_block(first, length);
}

struct LocalBins {
  SAP_INLINE void add(uint32_t digit, uint32_t n) { bins[digit] += n; }
  SAP_INLINE void add_second_copy(uint32_t digit, uint32_t n) { bins[copy_stride + digit] += n; }
  uint32_t* bins;
  uint32_t copy_stride;  // 0: a single table
};
struct AtomicBins {
  SAP_INLINE void add(uint32_t digit, uint32_t n) {
    if (n != 0) __atomic_fetch_add(bins + digit, int64_t(n), __ATOMIC_RELAXED);
  }
  SAP_INLINE void add_second_copy(uint32_t digit, uint32_t n) { add(digit, n); }
  int64_t* bins;
};

template <int Type, int KeyBits, bool Masked, int Pass, class Bins>
SAP_INLINE void histogram_range(const Shard& shard, int64_t begin, int64_t length, uint32_t prefix,
                                Bins bins) {
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  if constexpr (Pass == 0) {
    auto digit = [&](int64_t i) SAP_INLINE_LAMBDA {
      const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
      return KeyBits == 32 ? key >> 16 : key;
    };
    auto keep = [&](int64_t i) SAP_INLINE_LAMBDA { return Masked ? uint32_t(mask[i]) : 1u; };
    int64_t i = 0;
    for (; i + 2 <= length; i += 2) {
      bins.add(digit(i), keep(i));
      bins.add_second_copy(digit(i + 1), keep(i + 1));
    }
    if (i < length) bins.add(digit(i), keep(i));
    return;
  }
  // Pass 1: few keys share the prefix, so blocks without one are skipped.
  auto count = [&](int64_t i) SAP_INLINE_LAMBDA {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    return uint32_t((key >> 16) == prefix) & (Masked ? uint32_t(mask[i]) : 1u);
  };
  auto low = [&](int64_t i) SAP_INLINE_LAMBDA {
    return key_at<Type, KeyBits>(shard.data, begin + i) & 0xffffu;
  };
  // Branch-free within a block: a key outside the prefix adds 0 to the bin of
  // its low bits (matches can be as unpredictable as a coin toss, e.g. zeros).
  for_blocks_with_a_match<16>(length, count, [&](int64_t first, int64_t last) SAP_INLINE_LAMBDA {
    int64_t i = first;
    for (; i + 2 <= last; i += 2) {
      bins.add(low(i), count(i));
      bins.add_second_copy(low(i + 1), count(i + 1));
    }
    if (i < last) bins.add(low(i), count(i));
  });
}

}  // namespace sap_kernels::cpu
