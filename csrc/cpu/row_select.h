// The row selections of rowwise_kth_key (selection.cpp): their result and
// scratch buffers, and the sampled fast path for medium rows on AVX-512.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../kernel_types.h"
#include "../shards.h"
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
                     RowScratch& scratch, bool avx512);

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
// the pass over the row is compares and compresses, 16 keys at a time.
constexpr int64_t kRowSampleStride = 8;
// Fewer retained keys than this in the sample: the caller's full count.
constexpr int64_t kRowMinSample = 32;
// The first read of a row is a scalar loop (the sample: one load per 8 keys;
// the full count: one per key), which the hardware prefetcher alone leaves
// waiting on memory (perf: ~45% of the sampled select on one load).
// Prefetching this far ahead, more than a typical row, took rowwise_kth_key
// from 84 to 59-61 ms on 261M float32 weights (4 KiB: 63, 1 KiB: 76), and the
// full count's path (SAP_KERNELS_NO_AVX512) from 196-201 to 184-186 ms
// (alternating-process A/B, rows of 1,536 keys).
constexpr int64_t kRowPrefetchBytes = 8192;

// Prefetches the line kRowPrefetchBytes past the row's key i (data[begin + i];
// masked, also the mask's line as far ahead in keys, mask = the row's first
// mask byte). Called for every key or sampled key, it issues one prefetch per
// line.
template <int Type, bool Masked>
SAP_INLINE void prefetch_row_ahead(const void* data, int64_t begin, const uint8_t* mask,
                                   int64_t i) {
  constexpr int64_t kKeyBytes = Type == kFloat32 ? 4 : 2, kLineKeys = 64 / kKeyBytes;
  if (i % kLineKeys == 0) {
    _mm_prefetch(static_cast<const char*>(data) + (begin + i) * kKeyBytes + kRowPrefetchBytes,
                 _MM_HINT_T0);
  }
  if (Masked && i % 64 == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(mask) + i + kRowPrefetchBytes / kKeyBytes,
                 _MM_HINT_T0);
  }
}

template <int Type, int KeyBits, bool Masked, int DigitBits>
__attribute__((target("arch=x86-64-v4"), noinline)) bool row_kth_by_sample_avx512(
    const Shard& shard, int64_t begin, int64_t length, int64_t k, RowScratch& scratch,
    RowResult& result) {
  constexpr int kShift = (KeyBits == 32 ? 31 : 15) - DigitBits;
  constexpr uint32_t kBins = 1u << DigitBits;
  constexpr uint32_t kNonfinite = nonfinite_key<Type, KeyBits>();
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  // k <= 0 selects nothing: an empty bracket, and the pass only counts.
  uint32_t lo = 1, hi = 0;
  if (k > 0) {
    scratch.bins.assign(kBins, 0);
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
  }

  scratch.keys.resize(size_t(length) + 16);
  uint32_t* keys = scratch.keys.data();
  const __m512i low = _mm512_set1_epi32(int(lo)), high = _mm512_set1_epi32(int(hi));
  const __m512i nonfinite = _mm512_set1_epi32(int(kNonfinite));
  int64_t retained = 0, bad = 0, below = 0, n = 0, i = 0;
  for (; i + 16 <= length; i += 16) {
    const __m512i key = load_keys<Type, KeyBits>(shard.data, begin + i);
    const __mmask16 keep = kept_lanes16<Masked>(mask, i);
    const __mmask16 under = _mm512_mask_cmplt_epu32_mask(keep, key, low);
    const __mmask16 inside = _mm512_mask_cmple_epu32_mask(keep & ~under, key, high);
    retained += _mm_popcnt_u32(keep);
    bad += _mm_popcnt_u32(_mm512_mask_cmpge_epu32_mask(keep, key, nonfinite));
    below += _mm_popcnt_u32(under);
    // register-form compress, then a plain store (the memory form is microcoded on Zen 4)
    _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi32(inside, key));
    n += _mm_popcnt_u32(inside);
  }
  for (; i < length; ++i) {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    const int64_t keep = Masked ? int64_t(mask[i] != 0) : 1;
    retained += keep;
    bad += keep & int64_t(key >= kNonfinite);
    below += keep & int64_t(key < lo);
    keys[n] = key;
    n += keep & int64_t(key >= lo && key <= hi);
  }
  result.retained = retained;
  if (bad > 0) result.status = kRowNonfinite;
  if (k < 0 || k > retained) result.status = result.status ? result.status : kRowBadK;
  if (result.status != kRowOk || k == 0) return true;
  if (!(below < k && k <= below + n)) return false;

  // The k-th key among the bracket's n: its bin of 256 over [lo, hi], then
  // std::nth_element over that bin's keys.
  int shift = 0;
  while (((hi - lo) >> shift) >= 256) ++shift;
  uint32_t counts[256] = {};
  for (int64_t j = 0; j < n; ++j) ++counts[(keys[j] - lo) >> shift];
  int64_t rank = k - below - 1;  // 0-based within the bracket
  uint32_t bin = 0;
  while (counts[bin] <= rank) rank -= counts[bin++];
  const int64_t smaller_bins = (k - below - 1) - rank;
  // compacted in place: a store lands at or before the keys still to read
  const __m512i target = _mm512_set1_epi32(int(bin));
  const __m128i shift_count = _mm_cvtsi32_si128(shift);
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
  for (; j < n; ++j) {
    const uint32_t key = keys[j];
    keys[m] = key;
    m += ((key - lo) >> shift) == bin;
  }
  std::nth_element(keys, keys + rank, keys + m);
  const uint32_t kth = keys[rank];
  result.key = kth;
  result.below = below + smaller_bins +
                 std::count_if(keys, keys + rank, [kth](uint32_t key) { return key < kth; });
  result.equal = std::count(keys, keys + m, kth);  // every key equal to kth is in its bin
  return true;
}

}  // namespace sap_kernels::cpu
