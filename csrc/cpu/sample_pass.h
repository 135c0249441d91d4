// The one pass of the sampled selection (sample_select.cpp, its only
// includer): per segment, the retained count, the keys below the bracket, the
// non-finite keys and the candidates in the bracket, and when pruning the new
// masks m_i and k_i >= lo. A scalar loop for any CPU (compiled per instruction
// set) and an AVX-512 loop with compress.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kernel_types.h"
#include "keys_avx512.h"
#include "magnitudes.h"
#include "mask_backup.h"
#include "selection_keys.h"

namespace sap_kernels::cpu {
namespace {

struct Bracket {
  uint32_t lo = 0, hi = 0xffffffffu;
  bool collect = true;  // false: counts only (and a pruning pass keeps m_i)
};
// For k = 0 (nothing to find) or k out of range (an error): nothing is below
// lo = 0, so a pruning pass copies the masks; no candidates.
constexpr Bracket kCountsOnly{0, 0xffffffffu, false};

struct ChunkCounts {
  int64_t below = 0, retained = 0, nonfinite = 0;
  // The first `used` entries are the candidates' keys and (when pruning) their
  // element indices within the chunk; trimmed after the pass.
  std::vector<uint32_t> candidates, positions;
  int64_t used = 0;

  // Room for one more block of candidates, written branch-free. Inline, so
  // that the AVX-512 loop keeps its registers (a call would spill them).
  SAP_INLINE void reserve_block(int64_t block, bool with_positions) {
    if (used + block > int64_t(candidates.size())) grow(block, with_positions);
  }
  __attribute__((noinline, cold)) void grow(int64_t block, bool with_positions) {
    const int64_t size =
        std::max<int64_t>(2 * candidates.size(), used + std::max<int64_t>(block, 256));
    candidates.resize(size);
    if (with_positions) positions.resize(size);
  }
  void trim() {
    candidates.resize(used);
    if (!positions.empty()) positions.resize(used);
  }
};

// Where a pruning pass writes: the segment's new mask (m_i and k_i >= lo, the
// candidates fixed up later), the chunk index of its first element and, in
// place (mask is the input mask), the old mask's bits (one bit per element,
// 16 per word) to restore it when the selection fails.
struct MaskOutput {
  bool* mask = nullptr;  // nullptr: counting only
  uint32_t position = 0;
  uint16_t* old_bits = nullptr;
};

template <int Type, int KeyBits, bool Masked, bool Prune>
SAP_INLINE void count_and_collect(const Shard& shard, int64_t begin, int64_t length, Bracket b,
                                  ChunkCounts& out, MaskOutput write) {
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  constexpr uint32_t nonfinite = nonfinite_key<Type, KeyBits>();
  if (Prune && Masked && write.old_bits != nullptr) pack_mask_bits(mask, length, write.old_bits);
  // The counts (and new masks, possibly over the old ones: m_i is read before
  // it is written, and the candidates below have m_i = m_i and k_i >= lo):
  // one vectorised loop over the segment.
  int64_t below = 0, kept = 0, bad = 0;
  for (int64_t i = 0; i < length; ++i) {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    const uint32_t keep = Masked ? uint32_t(mask[i]) : 1u;
    below += keep & uint32_t(key < b.lo);
    kept += keep;
    bad += keep & uint32_t(key >= nonfinite);
    if constexpr (Prune) write.mask[i] = bool(keep & uint32_t(key >= b.lo));
  }
  out.below += below;
  out.retained += kept;
  out.nonfinite += bad;
  if (!b.collect) return;
  // The candidates, from the segment again (now in cache): blocks without one
  // are skipped; the others are copied branch-free, since whether a key is a
  // candidate is as unpredictable as a coin toss.
  auto inside = [&](int64_t i) SAP_INLINE_LAMBDA {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    return (Masked ? uint32_t(mask[i]) : 1u) & uint32_t(key - b.lo <= b.hi - b.lo);
  };
  constexpr int64_t kBlock = 32;
  for_blocks_with_a_match<kBlock>(
      length, inside, [&](int64_t first, int64_t last) SAP_INLINE_LAMBDA {
        out.reserve_block(kBlock, Prune);
        uint32_t* keys = out.candidates.data() + out.used;
        uint32_t* positions = Prune ? out.positions.data() + out.used : nullptr;
        int64_t taken = 0;
        for (int64_t i = first; i < last; ++i) {
          keys[taken] = key_at<Type, KeyBits>(shard.data, begin + i);
          if constexpr (Prune) positions[taken] = write.position + uint32_t(i);
          taken += inside(i);
        }
        out.used += taken;
      });
}

// AVX-512 (x86-64-v4): counts, new masks and candidates in a single loop. A
// block of 16 keys gives bit masks for "retained", "below lo", "in the
// bracket" and "non-finite"; the counts are popcounts and the candidates are
// compressed into place (register-form compress, then a plain store: the
// memory form is microcoded and slow on Zen 4) without a branch.
template <int Type, int KeyBits, bool Masked, bool Prune>
__attribute__((target("arch=x86-64-v4"))) void count_and_collect_avx512(const Shard& shard,
                                                                        int64_t begin,
                                                                        int64_t length, Bracket b,
                                                                        ChunkCounts& out,
                                                                        MaskOutput write) {
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  const __m512i lo = _mm512_set1_epi32(int(b.lo));
  const __m512i width = _mm512_set1_epi32(int(b.hi - b.lo));
  const __m512i nonfinite = _mm512_set1_epi32(int(nonfinite_key<Type, KeyBits>()));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const bool collect = b.collect;
  int64_t below = 0, kept = 0, bad = 0, i = 0;
  // Groups of 16 vectors share one room check, and the candidates' count
  // stays in a register within a group.
  constexpr int64_t kGroup = 256;
  const int64_t vectors_end = length & ~int64_t(15);
  while (i < vectors_end) {
    const int64_t group_end = std::min(vectors_end, i + kGroup);
    if (collect) out.reserve_block(group_end - i, Prune);
    uint32_t* keys = out.candidates.data();
    uint32_t* positions = Prune ? out.positions.data() : nullptr;
    int64_t used = out.used;
    for (; i < group_end; i += 16) {
      const __m512i key = load_keys<Type, KeyBits>(shard.data, begin + i);
      const __mmask16 keep = kept_lanes16<Masked>(mask, i);
      if constexpr (Masked) {
        if (Prune && write.old_bits != nullptr) write.old_bits[i / 16] = keep;
      }
      const __mmask16 low = _mm512_mask_cmplt_epu32_mask(keep, key, lo);
      below += _mm_popcnt_u32(low);
      kept += _mm_popcnt_u32(keep);
      bad += _mm_popcnt_u32(_mm512_mask_cmpge_epu32_mask(keep, key, nonfinite));
      if constexpr (Prune) {
        const __m128i ones = _mm_maskz_set1_epi8(__mmask16(keep & ~low), 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(write.mask + i), ones);
      }
      if (collect) {
        const __mmask16 inside =
            _mm512_mask_cmple_epu32_mask(keep, _mm512_sub_epi32(key, lo), width);
        _mm512_storeu_si512(keys + used, _mm512_maskz_compress_epi32(inside, key));
        if constexpr (Prune) {
          const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(int(write.position + i)), lane);
          _mm512_storeu_si512(positions + used, _mm512_maskz_compress_epi32(inside, index));
        }
        used += _mm_popcnt_u32(inside);
      }
    }
    out.used = used;
  }
  out.below += below;
  out.retained += kept;
  out.nonfinite += bad;
  if (i < length) {
    MaskOutput tail{Prune ? write.mask + i : nullptr, write.position + uint32_t(i),
                    Prune && write.old_bits != nullptr ? write.old_bits + i / 16 : nullptr};
    count_and_collect<Type, KeyBits, Masked, Prune>(shard, begin + i, length - i, b, out, tail);
  }
}

__attribute__((target("arch=x86-64-v4"))) void count_and_collect_range_avx512(
    const Shard& shard, int64_t key_bits, int64_t begin, int64_t length, Bracket bracket,
    ChunkCounts& out, MaskOutput write) {
  with_key_type(shard, key_bits, [&](auto type, auto bits, auto masked) SAP_INLINE_LAMBDA {
    constexpr int T = decltype(type)::value, B = decltype(bits)::value;
    constexpr bool M = decltype(masked)::value;
    if constexpr (!kVectorKeys<T, B>) {
      if (write.mask != nullptr) {
        count_and_collect<T, B, M, true>(shard, begin, length, bracket, out, write);
      } else {
        count_and_collect<T, B, M, false>(shard, begin, length, bracket, out, write);
      }
    } else if (write.mask != nullptr) {
      count_and_collect_avx512<T, B, M, true>(shard, begin, length, bracket, out, write);
    } else {
      count_and_collect_avx512<T, B, M, false>(shard, begin, length, bracket, out, write);
    }
  });
}

// Compiled once per instruction set (the counting loop vectorises).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
count_and_collect_range(const Shard& shard, int64_t key_bits, int64_t begin, int64_t length,
                        Bracket bracket, ChunkCounts& out, MaskOutput write) {
  with_key_type(shard, key_bits, [&](auto type, auto bits, auto masked) SAP_INLINE_LAMBDA {
    constexpr int T = decltype(type)::value, B = decltype(bits)::value;
    constexpr bool M = decltype(masked)::value;
    if (write.mask != nullptr) {
      count_and_collect<T, B, M, true>(shard, begin, length, bracket, out, write);
    } else {
      count_and_collect<T, B, M, false>(shard, begin, length, bracket, out, write);
    }
  });
}

}  // namespace
}  // namespace sap_kernels::cpu
