// The row selections of rowwise_kth_key (selection.cpp): their result and
// scratch buffers, and the sampled fast path for medium rows (AVX-512, AVX2).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../kernel_types.h"
#include "../shards.h"
#include "keys_avx2.h"
#include "keys_avx512.h"
#include "magnitudes.h"
#include "selection_keys.h"

namespace sap_kernels::cpu {

enum RowStatus : int32_t { kRowOk = 0, kRowNonfinite = 1, kRowBadK = 2 };

struct RowResult {
  int32_t status = kRowOk;
  int64_t key = -1, below = 0, retained = 0;
  int64_t equal = -1;  // retained keys equal to key; -1: not counted (long rows)
};

// A thread's reusable buffers for the row selections.
struct RowScratch {
  std::vector<uint32_t> keys, bins;
};

// selection.cpp: the k-th smallest retained key of a row (key -1 when k = 0)
// and the retained keys below it, or the row's error status.
RowResult select_row(const Shard& shard, int64_t key_bits, int64_t begin, int64_t length, int64_t k,
                     RowScratch& scratch, VectorIsa isa);

// The first failing row of a chunk (rowwise_kth_key, prune_rows_).
struct RowError {
  int32_t status = kRowOk;
  int64_t row = 0, shard = 0, k = 0, retained = 0;
};

// Calls visit(row, shard) for each row of length 0: such rows have no segment.
template <class Visit>
void for_each_empty_row(const ShardTable& table, Visit visit) {
  for (size_t s = 0; s < table.shards.size(); ++s) {
    const Shard& shard = table.shards[s];
    if (shard.numel != 0) continue;
    const int64_t end =
        s + 1 < table.shards.size() ? table.shards[s + 1].first_unit : table.num_units;
    for (int64_t row = shard.first_unit; row < end; ++row) visit(row, int64_t(s));
  }
}

// Raises the error of the lowest failing row, if any; `argument` names the
// per-row k (ks, counts).
inline void raise_first_row_error(const std::vector<RowError>& errors, const char* op,
                                  const char* argument) {
  const RowError* first = nullptr;
  for (const RowError& e : errors) {
    if (e.status != kRowOk && (first == nullptr || e.row < first->row)) first = &e;
  }
  if (first == nullptr) return;
  const RowError& e = *first;
  TORCH_CHECK_VALUE(e.status != kRowNonfinite, op, ": weights[", e.shard,
                    "] contains NaN or infinity among its retained weights (row ", e.row,
                    " of all rows)");
  TORCH_CHECK_VALUE(false, op, ": ", argument, "[", e.row, "] = ", e.k,
                    " is out of range: that row (in weights[", e.shard, "]) has ", e.retained,
                    " retained weights (allowed: 0..", e.retained, ")");
}

// The sampled row select: every kRowSampleStride-th key of the row (the
// retained ones) is counted in 2^DigitBits bins of its top significant bits;
// the bins holding the sample ranks f s -+ (4 sigma + 2) (f = k / retained,
// estimated from the sample; sigma = sqrt(s f (1 - f))) bracket the k-th key:
// [lo, hi]. One vector pass over the row then counts the retained keys, the
// non-finite ones and those below lo, and compresses the keys in [lo, hi]
// into a buffer. If below < k <= below + #bracket, 256 bins of the bracket
// leave the k-th key's bin (a few keys) to std::nth_element; otherwise the
// sample missed (or held too few keys) and the caller selects through all
// bins (returns false). k <= 0 takes the pass alone (its counts).
// Against counting every key in the bins (a scalar store per key, with chains
// through popular bins), the sample counts one key in kRowSampleStride and
// the pass over the row is compares and compresses, 16 keys at a time (8 on
// AVX2).
constexpr int64_t kRowSampleStride = 8;
// Fewer retained keys than this in the sample: the caller's full count.
constexpr int64_t kRowMinSample = 32;
// The first read of a row is a scalar loop (the sample: one load per 8 keys;
// the full count: one per key), which the hardware prefetcher alone leaves
// waiting on memory (perf: ~45% of the sampled select on one load).
// Prefetching this far ahead, more than a typical row, took rowwise_kth_key
// from 84 to 59-61 ms on 261M float32 weights (4 KiB: 63, 1 KiB: 76), and the
// full count's path (SAP_KERNELS_CPU_ISA=baseline) from 196-201 to 184-186 ms
// (alternating-process A/B, rows of 1,536 keys).
constexpr int64_t kRowPrefetchBytes = 8192;

// Prefetches the line kRowPrefetchBytes past the row's key i (data[begin + i];
// masked, also the mask's line as far ahead in keys, mask = the row's first
// mask byte). Called for every key or sampled key, it issues one prefetch per
// line.
template <int Type, bool Masked>
SAP_INLINE void prefetch_row_ahead(const void* data, int64_t begin, const uint8_t* mask,
                                   int64_t i) {
  constexpr int64_t kKeyBytes = weight_bytes(Type), kLineKeys = 64 / kKeyBytes;
  if (i % kLineKeys == 0) {
    _mm_prefetch(static_cast<const char*>(data) + (begin + i) * kKeyBytes + kRowPrefetchBytes,
                 _MM_HINT_T0);
  }
  if (Masked && i % 64 == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(mask) + i + kRowPrefetchBytes / kKeyBytes,
                 _MM_HINT_T0);
  }
}

// The bracket [lo, hi] of the row's k-th key (k > 0) from the sample, or
// false when the sample holds fewer than kRowMinSample retained keys.
template <int Type, int KeyBits, bool Masked, int DigitBits>
SAP_INLINE bool bracket_row_by_sample(const Shard& shard, int64_t begin, int64_t length, int64_t k,
                                      const uint8_t* mask, RowScratch& scratch, uint32_t& lo,
                                      uint32_t& hi) {
  constexpr int kShift = (KeyBits == 32 ? 31 : 15) - DigitBits;
  scratch.bins.assign(size_t(1) << DigitBits, 0);
  uint32_t* bins = scratch.bins.data();
  int64_t sampled = 0;
  for (int64_t i = 0; i < length; i += kRowSampleStride) {
    prefetch_row_ahead<Type, Masked>(shard.data, begin, mask, i);
    const bool keep = Masked ? mask[i] != 0 : true;
    bins[key_at<Type, KeyBits>(shard.data, begin + i) >> kShift] += keep;
    sampled += keep;
  }
  if (sampled < kRowMinSample) return false;
  const int64_t positions = (length + kRowSampleStride - 1) / kRowSampleStride;
  const double retained_estimate = double(sampled) * double(length) / double(positions);
  const double f = std::min(1.0, double(k) / retained_estimate);
  const double centre = f * double(sampled);
  const double margin = 4.0 * std::sqrt(centre * (1.0 - f)) + 2.0;
  const int64_t low_rank = std::max<int64_t>(0, int64_t(std::floor(centre - margin)));
  const int64_t high_rank = std::min<int64_t>(sampled - 1, int64_t(std::ceil(centre + margin)));
  // the bins sum to sampled > high_rank >= low_rank: both walks stop inside
  // (whole groups of 16 bins first: most bins below the weights' scale are empty)
  uint32_t d = 0;
  int64_t cumulative = 0;
  for (;; d += 16) {
    uint32_t group = 0;
    for (uint32_t e = d; e < d + 16; ++e) group += bins[e];
    if (cumulative + group > low_rank) break;
    cumulative += group;
  }
  while (cumulative + bins[d] <= low_rank) cumulative += bins[d++];
  lo = d << kShift;
  while (cumulative + bins[d] <= high_rank) cumulative += bins[d++];
  hi = ((d + 1) << kShift) - 1;
  return true;
}

// What the pass over a row found: its retained keys, the non-finite ones,
// those below lo, and the n keys in [lo, hi] it gathered.
struct RowPass {
  int64_t retained = 0, bad = 0, below = 0, n = 0;
};

// The pass's scalar tail, keys i..length-1.
template <int Type, int KeyBits, bool Masked>
SAP_INLINE void row_pass_tail(const Shard& shard, int64_t begin, int64_t length, int64_t i,
                              const uint8_t* mask, uint32_t lo, uint32_t hi, uint32_t* keys,
                              RowPass& pass) {
  constexpr uint32_t kNonfinite = nonfinite_key<Type, KeyBits>();
  for (; i < length; ++i) {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    const int64_t keep = Masked ? int64_t(mask[i] != 0) : 1;
    pass.retained += keep;
    pass.bad += keep & int64_t(key >= kNonfinite);
    pass.below += keep & int64_t(key < lo);
    keys[pass.n] = key;
    pass.n += keep & int64_t(key >= lo && key <= hi);
  }
}

template <int Type, int KeyBits, bool Masked>
__attribute__((target("arch=x86-64-v4"), always_inline)) inline RowPass row_pass_avx512(
    const Shard& shard, int64_t begin, int64_t length, const uint8_t* mask, uint32_t lo,
    uint32_t hi, uint32_t* keys) {
  const __m512i low = _mm512_set1_epi32(int(lo)), high = _mm512_set1_epi32(int(hi));
  const __m512i nonfinite = _mm512_set1_epi32(int(nonfinite_key<Type, KeyBits>()));
  RowPass pass;
  int64_t i = 0;
  for (; i + 16 <= length; i += 16) {
    const __m512i key = load_keys<Type, KeyBits>(shard.data, begin + i);
    const __mmask16 keep = kept_lanes16<Masked>(mask, i);
    const __mmask16 under = _mm512_mask_cmplt_epu32_mask(keep, key, low);
    const __mmask16 inside = _mm512_mask_cmple_epu32_mask(keep & ~under, key, high);
    pass.retained += _mm_popcnt_u32(keep);
    pass.bad += _mm_popcnt_u32(_mm512_mask_cmpge_epu32_mask(keep, key, nonfinite));
    pass.below += _mm_popcnt_u32(under);
    // register-form compress, then a plain store (the memory form is microcoded on Zen 4)
    _mm512_storeu_si512(keys + pass.n, _mm512_maskz_compress_epi32(inside, key));
    pass.n += _mm_popcnt_u32(inside);
  }
  row_pass_tail<Type, KeyBits, Masked>(shard, begin, length, i, mask, lo, hi, keys, pass);
  return pass;
}

// Keys are below 2^31, so signed compares order them.
template <int Type, int KeyBits, bool Masked>
__attribute__((target("arch=x86-64-v3"), always_inline)) inline RowPass row_pass_avx2(
    const Shard& shard, int64_t begin, int64_t length, const uint8_t* mask, uint32_t lo,
    uint32_t hi, uint32_t* keys) {
  const __m256i low = _mm256_set1_epi32(int(lo)), high = _mm256_set1_epi32(int(hi));
  const __m256i finite = _mm256_set1_epi32(int(nonfinite_key<Type, KeyBits>() - 1));
  RowPass pass;
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) {
    const __m256i key = load_keys8<Type, KeyBits>(shard.data, begin + i);
    const uint32_t keep = kept_lanes8<Masked>(mask, i);
    const uint32_t under = keep & lanes8(_mm256_cmpgt_epi32(low, key));
    const uint32_t above = lanes8(_mm256_cmpgt_epi32(key, high));
    const uint32_t inside = keep & ~under & ~above;
    pass.retained += _mm_popcnt_u32(keep);
    pass.bad += _mm_popcnt_u32(keep & lanes8(_mm256_cmpgt_epi32(key, finite)));
    pass.below += _mm_popcnt_u32(under);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + pass.n), compress8(key, inside));
    pass.n += _mm_popcnt_u32(inside);
  }
  row_pass_tail<Type, KeyBits, Masked>(shard, begin, length, i, mask, lo, hi, keys, pass);
  return pass;
}

// What the pass leaves: an answer (an error, or k = 0: nothing to find), a
// miss (the k-th key is not among the pass's keys) or the select among them.
enum class RowPassOutcome { kSettled, kMissed, kSelect };

SAP_INLINE RowPassOutcome settle_row(const RowPass& pass, int64_t k, RowResult& result) {
  result.retained = pass.retained;
  if (pass.bad > 0) result.status = kRowNonfinite;
  if (k < 0 || k > pass.retained) result.status = result.status ? result.status : kRowBadK;
  if (result.status != kRowOk || k == 0) return RowPassOutcome::kSettled;
  return pass.below < k && k <= pass.below + pass.n ? RowPassOutcome::kSelect
                                                    : RowPassOutcome::kMissed;
}

// The k-th key's bin among 256 over [lo, hi] (bins of 2^shift keys), its
// 0-based rank inside the bin, and the bracket's keys in smaller bins.
struct BracketBin {
  uint32_t bin = 0;
  int shift = 0;
  int64_t rank = 0, smaller = 0;
};

SAP_INLINE BracketBin bin_of_kth(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi,
                                 int64_t rank) {
  BracketBin b;
  while (((hi - lo) >> b.shift) >= 256) ++b.shift;
  uint32_t counts[256] = {};
  for (int64_t j = 0; j < n; ++j) ++counts[(keys[j] - lo) >> b.shift];
  b.rank = rank;
  while (counts[b.bin] <= b.rank) b.rank -= counts[b.bin++];
  b.smaller = rank - b.rank;
  return b;
}

// The keys j0..n-1 of the bin, moved down to follow the m already gathered;
// returns their total.
SAP_INLINE int64_t gather_bin_tail(uint32_t* keys, int64_t j, int64_t n, int64_t m, uint32_t lo,
                                   const BracketBin& b) {
  for (; j < n; ++j) {
    const uint32_t key = keys[j];
    keys[m] = key;
    m += ((key - lo) >> b.shift) == b.bin;
  }
  return m;
}

// Gathered in place: a store lands at or before the keys still to read.
__attribute__((target("arch=x86-64-v4"), always_inline)) inline int64_t gather_bin_avx512(
    uint32_t* keys, int64_t n, uint32_t lo, const BracketBin& b) {
  const __m512i low = _mm512_set1_epi32(int(lo)), target = _mm512_set1_epi32(int(b.bin));
  const __m128i shift_count = _mm_cvtsi32_si128(b.shift);
  int64_t m = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i key = _mm512_loadu_si512(keys + j);
    // zero-masking forms: GCC 12 warns about the undefined source of the plain ones
    const __m512i offset =
        _mm512_maskz_srl_epi32(0xffff, _mm512_maskz_sub_epi32(0xffff, key, low), shift_count);
    const __mmask16 same = _mm512_cmpeq_epi32_mask(offset, target);
    _mm512_storeu_si512(keys + m, _mm512_maskz_compress_epi32(same, key));
    m += _mm_popcnt_u32(same);
  }
  return gather_bin_tail(keys, j, n, m, lo, b);
}

__attribute__((target("arch=x86-64-v3"), always_inline)) inline int64_t gather_bin_avx2(
    uint32_t* keys, int64_t n, uint32_t lo, const BracketBin& b) {
  const __m256i low = _mm256_set1_epi32(int(lo)), target = _mm256_set1_epi32(int(b.bin));
  const __m128i shift_count = _mm_cvtsi32_si128(b.shift);
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    const __m256i offset = _mm256_srl_epi32(_mm256_sub_epi32(key, low), shift_count);
    const uint32_t same = lanes8(_mm256_cmpeq_epi32(offset, target));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + m), compress8(key, same));
    m += _mm_popcnt_u32(same);
  }
  return gather_bin_tail(keys, j, n, m, lo, b);
}

// The k-th key from the m keys of its bin (std::nth_element), with the keys
// below it (`below`: the bracket's keys below the bin and the row's below lo).
SAP_INLINE void kth_in_bin(uint32_t* keys, int64_t m, const BracketBin& b, int64_t below,
                           RowResult& result) {
  std::nth_element(keys, keys + b.rank, keys + m);
  const uint32_t kth = keys[b.rank];
  result.key = kth;
  result.below =
      below + std::count_if(keys, keys + b.rank, [kth](uint32_t key) { return key < kth; });
  result.equal = std::count(keys, keys + m, kth);  // every key equal to kth is in its bin
}

// The sampled select of one row, per instruction set (see above); false when
// the caller must count every key (the sample missed or held too few keys).
// k <= 0 selects nothing: an empty bracket, and the pass only counts. A macro:
// a function's target attribute cannot depend on a template parameter.
#define SAP_ROW_KTH_BY_SAMPLE(ISA, TARGET)                                               \
  template <int Type, int KeyBits, bool Masked, int DigitBits>                           \
  __attribute__((target(TARGET), noinline)) bool row_kth_by_sample_##ISA(                \
      const Shard& shard, int64_t begin, int64_t length, int64_t k, RowScratch& scratch, \
      RowResult& result) {                                                               \
    const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;             \
    uint32_t lo = 1, hi = 0;                                                             \
    if (k > 0 && !bracket_row_by_sample<Type, KeyBits, Masked, DigitBits>(               \
                     shard, begin, length, k, mask, scratch, lo, hi)) {                  \
      return false;                                                                      \
    }                                                                                    \
    scratch.keys.resize(size_t(length) + 16);                                            \
    uint32_t* keys = scratch.keys.data();                                                \
    const RowPass pass =                                                                 \
        row_pass_##ISA<Type, KeyBits, Masked>(shard, begin, length, mask, lo, hi, keys); \
    const RowPassOutcome outcome = settle_row(pass, k, result);                          \
    if (outcome != RowPassOutcome::kSelect) return outcome == RowPassOutcome::kSettled;  \
    const BracketBin bin = bin_of_kth(keys, pass.n, lo, hi, k - pass.below - 1);         \
    const int64_t m = gather_bin_##ISA(keys, pass.n, lo, bin);                           \
    kth_in_bin(keys, m, bin, pass.below + bin.smaller, result);                          \
    return true;                                                                         \
  }

SAP_ROW_KTH_BY_SAMPLE(avx512, "arch=x86-64-v4")
SAP_ROW_KTH_BY_SAMPLE(avx2, "arch=x86-64-v3")
#undef SAP_ROW_KTH_BY_SAMPLE

}  // namespace sap_kernels::cpu
