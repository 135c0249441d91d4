// CPU kernels for exact magnitude selection and pruning (DESIGN.md §3, §5).
//
// A weight's key k(w) is the float32 bit pattern of |w| (key_bits 32) or the
// 16-bit magnitude bits of a bfloat16/float16 weight (key_bits 16); keys order
// exactly like magnitudes. With m_i the mask (True = retained):
//
//   magnitude_histogram  H[u][d] = #{i in u : m_i, digit(k_i) = d}, digit =
//                        k >> 16 (pass 0, 32-bit keys), k (pass 0, 16-bit
//                        keys) or k & 0xffff over keys with k >> 16 = prefix[u]
//                        (pass 1).
//   rowwise_kth_key      per row r: t = ks[r]-th smallest retained key and
//                        #{i in r : m_i, k_i < t}.
//
// prune_masks and apply_masks_ are in prune_masks.cpp.
//
// Every kernel walks the chunk table of masked_power_sums (at::parallel_for
// over chunks of ~64K elements made of whole segments). Histograms hold
// integer counts, so merging per-thread tables with relaxed atomic adds is
// exact whatever the thread count or order; extra memory is a 512 KiB table
// per thread (two copies of 65,536 uint32 bins, see selection_keys.h) plus a
// few words per segment, independent of the model's size.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../shards.h"
#include "keys_avx512.h"
#include "magnitudes.h"
#include "row_select.h"
#include "selection_args.h"
#include "selection_keys.h"

namespace sap_kernels::cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
// A segment this short whose unit differs from the thread's table adds to the
// output directly, so 1,000 tiny tensors do not cost 1,000 table flushes.
constexpr int64_t kSmallSegment = 4096;
// Rows longer than this are selected by histogram (bounded memory) instead
// of std::nth_element on a copy of the row.
constexpr int64_t kLongRow = int64_t(1) << 16;
// Rows at least this long (and not long) are selected through 2,048 bins; in
// shorter ones clearing the bins would cost more than std::nth_element.
constexpr int64_t kBinnedRow = 512;

// --- magnitude_histogram ---------------------------------------------------

template <class Bins>
SAP_INLINE void histogram_segment(const Shard& shard, const Segment& seg, int64_t key_bits,
                                  int64_t pass, uint32_t prefix, Bins bins) {
  with_key_type(shard, key_bits, [&](auto type, auto bits, auto masked) SAP_INLINE_LAMBDA {
    constexpr int T = decltype(type)::value, B = decltype(bits)::value;
    constexpr bool M = decltype(masked)::value;
    if (pass == 0) {
      histogram_range<T, B, M, 0>(shard, seg.begin, seg.length, prefix, bins);
    } else {
      histogram_range<T, B, M, 1>(shard, seg.begin, seg.length, prefix, bins);
    }
  });
}

// Compiled once per instruction set (pass 1's block test vectorises).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
histogram_segment_local(const Shard& shard, const Segment& seg, int64_t key_bits, int64_t pass,
                        uint32_t prefix, uint32_t* bins) {
  const uint32_t copy_stride = pass == 0 ? kHalfBins : uint32_t(kBins);
  histogram_segment(shard, seg, key_bits, pass, prefix, LocalBins{bins, copy_stride});
}

void histogram_segment_atomic(const Shard& shard, const Segment& seg, int64_t key_bits,
                              int64_t pass, uint32_t prefix, int64_t* bins) {
  histogram_segment(shard, seg, key_bits, pass, prefix, AtomicBins{bins});
}

// Adds the second copy of a table into the first and clears it.
void fold_copies(uint32_t* bins, uint32_t copy_stride) {
  for (uint32_t d = 0; d < copy_stride; ++d) {
    bins[d] += bins[copy_stride + d];
    bins[copy_stride + d] = 0;
  }
}

// One thread's table for one unit at a time; flushed into the output row of
// that unit when the unit changes, before a bin could overflow, and at the end.
struct ThreadHistogram {
  std::vector<uint32_t> bins = std::vector<uint32_t>(2 * kBins, 0);
  int64_t unit = -1;
  int64_t added = 0;

  void flush(int64_t* out, int64_t pass) {
    if (added == 0) return;
    int64_t* row = out + unit * kBins;
    fold_copies(bins.data(), pass == 0 ? kHalfBins : uint32_t(kBins));
    for (int64_t d = 0; d < kBins; ++d) {
      if (bins[d] != 0) {
        __atomic_fetch_add(row + d, int64_t(bins[d]), __ATOMIC_RELAXED);
        bins[d] = 0;
      }
    }
    added = 0;
  }
};

at::Tensor magnitude_histogram_cpu(at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& masks, int64_t scope,
                                   int64_t key_bits, const at::Tensor& prefixes,
                                   int64_t pass_index) {
  constexpr const char* op = "magnitude_histogram";
  TORCH_CHECK_VALUE(scope == kGlobal || scope == kLayer, op,
                    ": scope must be 0 (global) or 1 (layer), got ", scope);
  TORCH_CHECK_VALUE(pass_index == 0 || pass_index == 1, op, ": pass_index must be 0 or 1, got ",
                    pass_index);
  const ShardTable table = checked_table(weights, masks, scope, key_bits, op);
  const at::Tensor prefix_values = per_unit_values(prefixes, table.num_units, op, "prefixes");
  const int64_t* prefix_data = prefix_values.data_ptr<int64_t>();
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  make_segments(table, scope, kChunk, segments, chunk_starts);

  at::Tensor out = at::zeros({table.num_units, kBins}, at::TensorOptions().dtype(at::kLong));
  int64_t* out_data = out.data_ptr<int64_t>();
  at::parallel_for(0, int64_t(chunk_starts.size()) - 1, 1, [&](int64_t first, int64_t last) {
    ThreadHistogram local;
    for (int64_t s = chunk_starts[first]; s < chunk_starts[last]; ++s) {
      const Segment& seg = segments[s];
      const Shard& shard = table.shards[seg.shard];
      const int64_t unit = shard.first_unit;
      // A prefix outside 0..65535 matches no key (pass 1 of an empty unit).
      const int64_t prefix = prefix_data[unit];
      if (pass_index == 1 && (prefix < 0 || prefix >= kBins)) continue;
      if (unit != local.unit && local.added > 0 && seg.length < kSmallSegment) {
        histogram_segment_atomic(shard, seg, key_bits, pass_index, uint32_t(prefix),
                                 out_data + unit * kBins);
        continue;
      }
      if (unit != local.unit || local.added + seg.length > std::numeric_limits<uint32_t>::max()) {
        local.flush(out_data, pass_index);
        local.unit = unit;
      }
      histogram_segment_local(shard, seg, key_bits, pass_index, uint32_t(prefix),
                              local.bins.data());
      local.added += seg.length;
    }
    local.flush(out_data, pass_index);
  });
  return out;
}

// --- rowwise_kth_key ---------------------------------------------------------

// The first digit d whose cumulative count reaches target (1-based), and the
// count of keys in bins below d.
uint32_t find_digit(const uint32_t* bins, int64_t target, int64_t& below) {
  int64_t cumulative = 0;
  for (uint32_t d = 0; d < kBins; ++d) {
    if (cumulative + bins[d] >= target) {
      below = cumulative;
      return d;
    }
    cumulative += bins[d];
  }
  below = cumulative;
  return kBins - 1;
}

// Short rows: the retained keys go into a thread-local buffer and
// std::nth_element places the k-th; the keys before it are <= it.
template <int Type, int KeyBits, bool Masked>
SAP_INLINE RowResult row_kth_by_partition(const Shard& shard, int64_t begin, int64_t length,
                                          int64_t k, RowScratch& scratch) {
  RowResult result;
  std::vector<uint32_t>& buffer = scratch.keys;
  buffer.resize(length);
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  int64_t n = 0;
  uint32_t max_key = 0;
  for (int64_t i = 0; i < length; ++i) {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    const bool keep = Masked ? mask[i] : true;
    buffer[n] = key;
    n += keep;
    max_key = keep && key > max_key ? key : max_key;
  }
  result.retained = n;
  if (n > 0 && max_key >= nonfinite_key<Type, KeyBits>()) result.status = kRowNonfinite;
  if (k < 0 || k > n) result.status = result.status ? result.status : kRowBadK;
  if (result.status != kRowOk || k == 0) return result;
  std::nth_element(buffer.begin(), buffer.begin() + (k - 1), buffer.begin() + n);
  const uint32_t kth = buffer[k - 1];
  result.key = kth;
  result.below = std::count_if(buffer.begin(), buffer.begin() + (k - 1),
                               [kth](uint32_t key) { return key < kth; });
  result.equal = std::count(buffer.begin(), buffer.begin() + n, kth);
  return result;
}

// Medium rows: one pass counts the retained keys in 2,048 bins of their top
// 11 significant bits (an eighth of an octave for float32 keys), a second
// copies the keys of the k-th key's bin (a few percent of a smooth row) and
// std::nth_element finds it among them: ~3 cheap passes instead of a
// partition of the whole row with its unpredictable branches. With AVX-512
// the sampled bracket of row_select.h goes first (a third faster on smooth
// rows: its count is of every 8th key) and this is its fallback on a miss.
constexpr int kRowDigitBits = 11;
constexpr uint32_t kRowBins = 1u << kRowDigitBits;

// The retained keys of a row with key >> Shift == bin, in flat order, by
// 16-key compares and register-form compress (then a plain store: the memory
// form is microcoded on Zen 4). keys needs room for the count + 16.
template <int Type, int KeyBits, bool Masked, int Shift>
__attribute__((target("arch=x86-64-v4"), noinline)) int64_t collect_bin_avx512(
    const Shard& shard, int64_t begin, int64_t length, uint32_t bin, uint32_t* keys) {
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  const __m512i target = _mm512_set1_epi32(int(bin));
  int64_t n = 0, i = 0;
  for (; i + 16 <= length; i += 16) {
    const __m512i key = load_keys<Type, KeyBits>(shard.data, begin + i);
    const __mmask16 keep = kept_lanes16<Masked>(mask, i);
    const __mmask16 inside =
        _mm512_mask_cmpeq_epi32_mask(keep, _mm512_maskz_srli_epi32(0xffff, key, Shift), target);
    _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi32(inside, key));
    n += _mm_popcnt_u32(inside);
  }
  for (; i < length; ++i) {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    keys[n] = key;
    n += (Masked ? mask[i] != 0 : true) && (key >> Shift) == bin;
  }
  return n;
}

template <int Type, int KeyBits, bool Masked>
SAP_INLINE RowResult row_kth_by_bins(const Shard& shard, int64_t begin, int64_t length, int64_t k,
                                     RowScratch& scratch, bool avx512) {
  constexpr int kShift = (KeyBits == 32 ? 31 : 15) - kRowDigitBits;
  constexpr uint32_t nonfinite = nonfinite_key<Type, KeyBits>();
  static_assert(nonfinite % (1u << kShift) == 0, "non-finite keys start a bin");
  RowResult result;
  // Two tables filled from alternate keys halve the dependency chains through
  // popular bins (see kHalfBins).
  scratch.bins.assign(2 * kRowBins, 0);
  uint32_t* bins = scratch.bins.data();
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  auto digit = [&](int64_t i) SAP_INLINE_LAMBDA {
    return key_at<Type, KeyBits>(shard.data, begin + i) >> kShift;
  };
  auto keep = [&](int64_t i) SAP_INLINE_LAMBDA { return Masked ? uint32_t(mask[i]) : 1u; };
  int64_t i = 0;
  for (; i + 2 <= length; i += 2) {
    prefetch_row_ahead<Type, Masked>(shard.data, begin, mask, i);
    bins[digit(i)] += keep(i);
    bins[kRowBins + digit(i + 1)] += keep(i + 1);
  }
  if (i < length) bins[digit(i)] += keep(i);
  uint32_t retained = 0, bad = 0;  // rows here are shorter than 2^32
  for (uint32_t d = 0; d < kRowBins; ++d) {
    bins[d] += bins[kRowBins + d];
    retained += bins[d];
    bad += d >= (nonfinite >> kShift) ? bins[d] : 0;
  }
  result.retained = retained;
  if (bad > 0) result.status = kRowNonfinite;
  if (k < 0 || k > retained) result.status = result.status ? result.status : kRowBadK;
  if (result.status != kRowOk || k == 0) return result;
  // The bin of the k-th key: whole groups of 16 bins first (vectorised sums).
  int64_t below = 0;
  uint32_t d = 0;
  for (; d + 16 <= kRowBins; d += 16) {
    uint32_t group = 0;
    for (uint32_t e = d; e < d + 16; ++e) group += bins[e];
    if (below + group >= k) break;
    below += group;
  }
  while (below + bins[d] < k) below += bins[d++];
  // The keys of that bin: with AVX-512, compares and compress 16 keys at a
  // time. Elsewhere blocks without one are skipped and the others copied
  // branch-free (membership is a coin toss). The bin is a constant copy: the
  // key stores could alias d itself, which kept the test scalar.
  const uint32_t bin = d;
  scratch.keys.resize(bins[bin] + 16);
  uint32_t* keys = scratch.keys.data();
  int64_t n = 0;
  if (kVectorKeys<Type, KeyBits> && avx512) {
    if constexpr (kVectorKeys<Type, KeyBits>) {
      n = collect_bin_avx512<Type, KeyBits, Masked, kShift>(shard, begin, length, bin, keys);
    }
  } else {
    auto in_bin = [&, bin](int64_t j) SAP_INLINE_LAMBDA {
      return keep(j) & uint32_t((key_at<Type, KeyBits>(shard.data, begin + j) >> kShift) == bin);
    };
    for_blocks_with_a_match<16>(length, in_bin, [&](int64_t first, int64_t last) SAP_INLINE_LAMBDA {
      for (int64_t j = first; j < last; ++j) {
        keys[n] = key_at<Type, KeyBits>(shard.data, begin + j);
        n += in_bin(j);
      }
    });
  }
  const int64_t r = k - below - 1;
  std::nth_element(keys, keys + r, keys + n);
  const uint32_t kth = keys[r];
  result.key = kth;
  result.below = below + std::count_if(keys, keys + r, [kth](uint32_t key) { return key < kth; });
  result.equal = std::count(keys, keys + n, kth);  // every key equal to kth is in its bin
  return result;
}

// Long rows: radix select with one or two 65,536-bin passes over the row.
template <int Type, int KeyBits, bool Masked>
SAP_INLINE RowResult row_kth_by_histogram(const Shard& shard, int64_t begin, int64_t length,
                                          int64_t k, RowScratch& scratch) {
  RowResult result;
  std::vector<uint32_t>& bins = scratch.bins;
  bins.assign(kBins, 0);
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  uint32_t max_key = 0;
  for (int64_t i = 0; i < length; ++i) {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    const uint32_t keep = Masked ? uint32_t(mask[i]) : 1u;
    bins[KeyBits == 32 ? key >> 16 : key] += keep;
    result.retained += keep;
    max_key = keep && key > max_key ? key : max_key;
  }
  if (result.retained > 0 && max_key >= nonfinite_key<Type, KeyBits>()) {
    result.status = kRowNonfinite;
  }
  if (k < 0 || k > result.retained) result.status = result.status ? result.status : kRowBadK;
  if (result.status != kRowOk || k == 0) return result;
  uint32_t digit = find_digit(bins.data(), k, result.below);
  if constexpr (KeyBits == 32) {
    std::fill(bins.begin(), bins.end(), 0u);
    const LocalBins one_table{bins.data(), 0};
    histogram_range<Type, KeyBits, Masked, 1>(shard, begin, length, digit, one_table);
    int64_t below_low = 0;
    const uint32_t low = find_digit(bins.data(), k - result.below, below_low);
    result.below += below_low;
    digit = (digit << 16) | low;
  }
  result.key = digit;
  return result;
}

}  // namespace

// Compiled once per instruction set (the bins' sums and block tests vectorise).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) RowResult
select_row(const Shard& shard, int64_t key_bits, int64_t begin, int64_t length, int64_t k,
           RowScratch& scratch, VectorIsa isa) {
  RowResult result;
  const bool avx512 = isa == VectorIsa::kAvx512;
  with_key_type(shard, key_bits, [&](auto type, auto bits, auto masked) SAP_INLINE_LAMBDA {
    constexpr int T = decltype(type)::value, B = decltype(bits)::value;
    constexpr bool M = decltype(masked)::value;
    if (length > kLongRow) {
      result = row_kth_by_histogram<T, B, M>(shard, begin, length, k, scratch);
    } else if (length >= kBinnedRow) {
      if constexpr (kVectorKeys<T, B>) {
        if (avx512 && row_kth_by_sample_avx512<T, B, M, kRowDigitBits>(shard, begin, length, k,
                                                                       scratch, result)) {
          return;
        }
        if (isa == VectorIsa::kAvx2 && row_kth_by_sample_avx2<T, B, M, kRowDigitBits>(
                                           shard, begin, length, k, scratch, result)) {
          return;
        }
      }
      result = row_kth_by_bins<T, B, M>(shard, begin, length, k, scratch, avx512);
    } else {
      result = row_kth_by_partition<T, B, M>(shard, begin, length, k, scratch);
    }
  });
  return result;
}

namespace {

at::Tensor rowwise_kth_key_cpu(at::TensorList weights,
                               const c10::List<std::optional<at::Tensor>>& masks, int64_t key_bits,
                               const at::Tensor& ks) {
  constexpr const char* op = "rowwise_kth_key";
  const ShardTable table = checked_table(weights, masks, kNeuron, key_bits, op);
  const at::Tensor k_values = per_unit_values(ks, table.num_units, op, "ks");
  const int64_t* k_data = k_values.data_ptr<int64_t>();
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  make_segments(table, kNeuron, kChunk, segments, chunk_starts);

  at::Tensor out = at::empty({table.num_units, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* out_data = out.data_ptr<int64_t>();
  std::vector<RowError> errors(chunk_starts.size() - 1);
  const VectorIsa isa = vector_isa();
  at::parallel_for(0, int64_t(chunk_starts.size()) - 1, 1, [&](int64_t first, int64_t last) {
    RowScratch scratch;
    for (int64_t c = first; c < last; ++c) {
      for (int64_t s = chunk_starts[c]; s < chunk_starts[c + 1]; ++s) {
        const Segment& seg = segments[s];
        const Shard& shard = table.shards[seg.shard];
        const int64_t length = shard.row_length;
        for (int64_t begin = seg.begin; begin < seg.begin + seg.length; begin += length) {
          const int64_t row = shard.first_unit + begin / length;
          const RowResult result =
              select_row(shard, key_bits, begin, length, k_data[row], scratch, isa);
          out_data[2 * row] = result.key;
          out_data[2 * row + 1] = result.below;
          if (result.status != kRowOk && errors[c].status == kRowOk) {
            errors[c] = RowError{result.status, row, seg.shard, k_data[row], result.retained};
          }
        }
      }
    }
  });
  // Rows of length 0: their result is (-1, 0), and only k = 0 is valid.
  for_each_empty_row(table, [&](int64_t row, int64_t shard) {
    out_data[2 * row] = -1;
    out_data[2 * row + 1] = 0;
    if (k_data[row] != 0) errors.push_back(RowError{kRowBadK, row, shard, k_data[row], 0});
  });
  raise_first_row_error(errors, op, "ks");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_kernels, CPU, m) {
  m.impl("magnitude_histogram", &magnitude_histogram_cpu);
  m.impl("rowwise_kth_key", &rowwise_kth_key_cpu);
}

}  // namespace sap_kernels::cpu
