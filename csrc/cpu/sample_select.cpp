// Exact k-th smallest retained magnitude of each unit (global or layer scope)
// in one pass over the weights, by bracketing it with a sample first
// (DESIGN.md §5).
//
// kth_key_by_sample, with keys k(w) as in selection.cpp, and per unit u with
// r retained weights and 1 <= k <= r:
//   1. Sample s keys at stratified positions of the flat order (one per
//      stratum of n/s elements, deterministically jittered; a unit gets its
//      share). Among the s' retained ones of u, the keys of ranks f s' -+ delta
//      (f = k / r, r estimated from the sample; delta about 4 standard
//      deviations of a sample quantile) bracket the k-th key: lo, hi. A unit
//      with fewer than 64 of them brackets the whole key range.
//   2. One pass: below = #{retained : k(w) < lo}, the candidates C = {retained
//      k(w) in [lo, hi]} (kept per chunk, counted per segment), and the
//      retained and non-finite counts.
//   3. If below < k <= below + |C|, the answer is the (k - below)-th smallest
//      candidate (std::nth_element, after a histogram of
//      (key - lo) >> shift over C when C is large). Otherwise the sample
//      missed (rare), or all C outgrew their budget (heavy ties around the
//      k-th key): the result says so and the caller runs the radix select.
//
// Result int64 [units, 4]: (key, below, retained, nonfinite) per unit, where
// below counts the retained keys smaller than key. key = -1 when k == 0, when
// k is outside [0, retained] or when a retained weight is NaN or infinite (the
// caller raises); key = -2 on a miss.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <vector>

#include "../shards.h"
#include "magnitudes.h"
#include "mask_backup.h"
#include "sample_pass.h"
#include "selection_args.h"
#include "selection_keys.h"

namespace sap_kernels::cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kKeyUnknown = -1, kSampleMissed = -2;

// A deterministic jitter in [0, 1) for stratum j (splitmix64 finaliser).
double jitter(uint64_t j) {
  uint64_t z = j + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return double(z >> 11) * 0x1p-53;
}

// A unit's share of the sample: the keys of its retained sampled weights and
// the number of sampled positions (retained or not) that fell in the unit.
struct UnitSample {
  std::vector<uint32_t> keys;
  int64_t positions = 0;
};

// Sampled weights are located in batches of this many: their lines are
// prefetched first, so the batch's cache misses overlap instead of each read
// waiting on its own (with the shard walked forward instead of a binary
// search per key: 262,144 keys of 261M float32 weights, layer scope,
// kth_key_by_sample 52-53 -> 45-47 ms; 4M keys 197 -> 113-116 ms).
constexpr int64_t kSampleBatch = 64;

// The keys at s stratified positions of the flat order, per unit (a unit gets
// positions in proportion to its size).
std::vector<UnitSample> sample_keys(const ShardTable& table, int64_t key_bits, int64_t s) {
  const int64_t n = table.total_numel;
  std::vector<int64_t> shard_end(table.shards.size());
  int64_t end = 0;
  for (size_t i = 0; i < table.shards.size(); ++i) shard_end[i] = end += table.shards[i].numel;
  std::vector<int64_t> keys(s, -1);  // -1: the sampled weight is pruned
  std::vector<int64_t> units(s, 0);
  at::parallel_for(0, s, 4096, [&](int64_t first, int64_t last) {
    auto position = [&](int64_t j) {
      const int64_t flat = int64_t((double(j) + jitter(uint64_t(j))) * double(n) / double(s));
      return std::min(flat, n - 1);
    };
    // positions rise with j: the shard is found once, then walked forward
    size_t i = size_t(std::upper_bound(shard_end.begin(), shard_end.end(), position(first)) -
                      shard_end.begin());
    int64_t shard_of[kSampleBatch], offset_of[kSampleBatch];
    for (int64_t batch = first; batch < last; batch += kSampleBatch) {
      const int64_t size = std::min(kSampleBatch, last - batch);
      for (int64_t b = 0; b < size; ++b) {
        const int64_t flat = position(batch + b);
        while (flat >= shard_end[i]) ++i;
        const Shard& shard = table.shards[i];
        const int64_t offset = flat - (shard_end[i] - shard.numel);
        shard_of[b] = int64_t(i);
        offset_of[b] = offset;
        _mm_prefetch(static_cast<const char*>(shard.data) + offset * weight_bytes(shard.type),
                     _MM_HINT_T0);
        if (shard.mask != nullptr) {
          _mm_prefetch(reinterpret_cast<const char*>(shard.mask) + offset, _MM_HINT_T0);
        }
      }
      for (int64_t b = 0; b < size; ++b) {
        const Shard& shard = table.shards[shard_of[b]];
        units[batch + b] = shard.first_unit;
        if (shard.mask != nullptr && !shard.mask[offset_of[b]]) continue;
        keys[batch + b] = magnitude_key(shard, offset_of[b], int(key_bits));
      }
    }
  });
  std::vector<UnitSample> sample(table.num_units);
  for (int64_t j = 0; j < s; ++j) {
    UnitSample& unit = sample[units[j]];
    ++unit.positions;
    if (keys[j] >= 0) unit.keys.push_back(uint32_t(keys[j]));
  }
  return sample;
}

// Keys of sample ranks f s' -+ delta; the whole key range where the sample is
// too small to say anything.
Bracket bracket_from_sample(std::vector<uint32_t>& sample, int64_t s, int64_t n, int64_t k) {
  const double taken = double(sample.size());
  if (taken < 64) return {};
  const double kept_fraction = taken / double(s);
  const double f = std::min(1.0, double(k) / (kept_fraction * double(n)));
  // Variance of the sample rank of the k-th key, plus that of the retained
  // fraction's estimate (which moves the target rank when masks are given).
  const double variance = taken * (f * (1.0 - f) + f * f * (1.0 - kept_fraction));
  const double delta = 4.0 * std::sqrt(variance) + 8.0;
  const double center = f * taken;
  const int64_t rank_lo = int64_t(std::floor(center - delta));
  const int64_t rank_hi = int64_t(std::ceil(center + delta));
  Bracket bracket;
  if (rank_hi < int64_t(sample.size())) {
    std::nth_element(sample.begin(), sample.begin() + rank_hi, sample.end());
    bracket.hi = sample[rank_hi];
  }
  if (rank_lo >= 0) {
    const auto stop = rank_hi < int64_t(sample.size()) ? sample.begin() + rank_hi : sample.end();
    std::nth_element(sample.begin(), sample.begin() + rank_lo, stop);
    bracket.lo = sample[rank_lo];
  }
  return bracket;
}

// A run of candidates' keys (those of one segment).
struct Span {
  const uint32_t* keys;
  int64_t size;
};

// Fewer candidates than this are selected by std::nth_element on a copy;
// more through a histogram (in parallel) first.
constexpr int64_t kDirectSelect = int64_t(1) << 16;
// The histogram has about this many candidates per bin (a bracket is narrow,
// so its keys spread about evenly over it), between 2^8 and 2^16 bins: a few
// hundred keys go to std::nth_element, and the counts stay small enough to
// zero, fill and merge in L1/L2. Layer scope selects in each of many units: a
// fixed 65,536 bins made that 84 x 768 KiB of counts to zero and merge
// (kth_key_by_sample, layer scope, 261M float32 weights: 60-62 -> 51-52 ms).
constexpr int64_t kCandidatesPerBin = 256;

// The rank-th (1-based) smallest of the candidates, all in [lo, hi], and the
// number of candidates smaller than it.
std::pair<uint32_t, int64_t> select_candidate(const std::vector<Span>& spans, int64_t total,
                                              Bracket b, int64_t rank) {
  std::vector<uint32_t> in_bin;
  int64_t below = 0;
  if (total <= kDirectSelect) {
    in_bin.reserve(size_t(total));
    for (const Span& span : spans) in_bin.insert(in_bin.end(), span.keys, span.keys + span.size);
  } else {
    const int bin_bits =
        std::clamp(64 - __builtin_clzll(uint64_t(total / kCandidatesPerBin)), 8, 16);
    const int64_t num_bins = int64_t(1) << bin_bits;
    const uint32_t width = b.hi - b.lo;
    // (key - lo) >> shift < num_bins for every key in [lo, hi]
    const int shift = std::max(0, (width == 0 ? 0 : 32 - __builtin_clz(width)) - bin_bits);
    std::vector<int64_t> bins(num_bins, 0);
    at::parallel_for(0, int64_t(spans.size()), 1, [&](int64_t first, int64_t last) {
      std::vector<uint32_t> local(num_bins, 0);
      int64_t added = 0;
      for (int64_t i = first; i < last; ++i) {
        for (int64_t j = 0; j < spans[i].size; ++j) ++local[(spans[i].keys[j] - b.lo) >> shift];
        added += spans[i].size;
      }
      if (added == 0) return;
      for (int64_t d = 0; d < num_bins; ++d) {
        if (local[d] != 0) __atomic_fetch_add(&bins[d], int64_t(local[d]), __ATOMIC_RELAXED);
      }
    });
    uint32_t digit = 0;
    while (below + bins[digit] < rank) below += bins[digit++];
    if (shift == 0) return {b.lo + digit, below};
    in_bin.reserve(size_t(bins[digit]));
    for (const Span& span : spans) {
      for (int64_t j = 0; j < span.size; ++j) {
        if (((span.keys[j] - b.lo) >> shift) == digit) in_bin.push_back(span.keys[j]);
      }
    }
  }
  const int64_t r = rank - below - 1;
  std::nth_element(in_bin.begin(), in_bin.begin() + r, in_bin.end());
  const uint32_t key = in_bin[r];
  below += std::count_if(in_bin.begin(), in_bin.begin() + r, [key](uint32_t x) { return x < key; });
  return {key, below};
}

// What the pass found in one segment: its counts, and its candidates
// [first, last) in its chunk's lists, whose positions start at `offset`.
struct SegmentCounts {
  int64_t below = 0, retained = 0, nonfinite = 0;
  int64_t chunk = 0, first = 0, last = 0;
  uint32_t offset = 0;
};

// A unit's result as the ops return it: (key, below, retained, nonfinite).
struct UnitResult {
  int64_t key = kKeyUnknown, below = 0, retained = 0, nonfinite = 0;
};

// What a pruning pass writes: m_i and k_i >= lo into masks (one per shard);
// in_place when those are the input masks, whose bits the pass then keeps.
struct PassMasks {
  std::vector<bool*> masks;
  bool in_place = false;
};

// The sample, the pass and the selection among candidates, shared by the ops.
struct SamplePass {
  std::vector<Bracket> brackets;  // per unit
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  std::vector<int64_t> unit_segments;  // unit u's segments: [unit_segments[u], [u + 1])
  std::vector<ChunkCounts> chunks;
  std::vector<SegmentCounts> counts;  // per segment
  std::vector<UnitResult> units;
  // In place: the old masks' bits, and which chunks the pass went through
  // (it stops early on an overflow).
  std::optional<MaskBackup> backup;
  std::vector<uint8_t> chunk_done;
};

// Brackets each unit's k-th key, runs the pass (writing m_i and k_i >= lo into
// the masks of `out` when given) and selects the keys among the candidates.
SamplePass run_sample_pass(const ShardTable& table, int64_t scope, int64_t key_bits,
                           const int64_t* ks, int64_t sample_size, const PassMasks* out) {
  SamplePass pass;
  const int64_t n = table.total_numel, num_units = table.num_units;
  std::vector<int64_t> unit_numel(num_units, 0);
  for (const Shard& shard : table.shards) unit_numel[shard.first_unit] += shard.numel;
  // Small inputs (or a sample as large as the input) keep every retained key.
  const int64_t s = std::min(sample_size, n);
  std::vector<UnitSample> sample;
  if (n > 4 * s) sample = sample_keys(table, key_bits, s);
  pass.brackets.assign(num_units, Bracket{});
  for (int64_t u = 0; u < num_units; ++u) {
    if (ks[u] <= 0 || ks[u] > unit_numel[u]) {
      pass.brackets[u] = kCountsOnly;
    } else if (!sample.empty()) {
      UnitSample& unit = sample[u];
      pass.brackets[u] = bracket_from_sample(unit.keys, unit.positions, unit_numel[u], ks[u]);
    }
  }
  // A global bracket holds ~1.5% of the weights for s = 65,536 (~1% for the
  // CPU's 131,072); layer scope's 84 units of a 261M model ~5% for 524,288.
  // A sixteenth plus 16 s keys leaves room for unlucky ones and bounds the
  // memory.
  const int64_t budget = n / 16 + 16 * s;

  make_segments(table, scope, kChunk, pass.segments, pass.chunk_starts);
  const int64_t num_chunks = int64_t(pass.chunk_starts.size()) - 1;
  pass.chunks.resize(num_chunks);
  pass.counts.resize(pass.segments.size());
  pass.chunk_done.assign(num_chunks, 0);
  if (out != nullptr && out->in_place) pass.backup.emplace(pass.segments);
  const bool avx512 = use_avx512();
  std::atomic<int64_t> collected{0};
  std::atomic<bool> overflow{false};
  at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last && !overflow.load(std::memory_order_relaxed); ++c) {
      ChunkCounts& chunk = pass.chunks[c];
      uint32_t position = 0;
      for (int64_t i = pass.chunk_starts[c]; i < pass.chunk_starts[c + 1]; ++i) {
        const Segment& seg = pass.segments[i];
        const Shard& shard = table.shards[seg.shard];
        const Bracket bracket = pass.brackets[shard.first_unit];
        MaskOutput write;
        if (out != nullptr) {
          uint16_t* old_bits = pass.backup ? pass.backup->segment_bits(i) : nullptr;
          write = {out->masks[seg.shard] + seg.begin, position, old_bits};
        }
        const SegmentCounts before{chunk.below, chunk.retained, chunk.nonfinite, c, chunk.used};
        if (avx512) {
          count_and_collect_range_avx512(shard, key_bits, seg.begin, seg.length, bracket, chunk,
                                         write);
        } else {
          count_and_collect_range(shard, key_bits, seg.begin, seg.length, bracket, chunk, write);
        }
        pass.counts[i] = SegmentCounts{chunk.below - before.below,
                                       chunk.retained - before.retained,
                                       chunk.nonfinite - before.nonfinite,
                                       c,
                                       before.first,
                                       chunk.used,
                                       position};
        position += uint32_t(seg.length);
      }
      chunk.trim();
      pass.chunk_done[c] = 1;
      const int64_t size = chunk.used;
      if (collected.fetch_add(size, std::memory_order_relaxed) + size > budget) {
        overflow.store(true, std::memory_order_relaxed);
      }
    }
  });
  // Segments come in shard order, so each unit's segments are consecutive.
  pass.unit_segments.assign(num_units + 1, int64_t(pass.segments.size()));
  for (int64_t i = int64_t(pass.segments.size()) - 1; i >= 0; --i) {
    pass.unit_segments[table.shards[pass.segments[i].shard].first_unit] = i;
  }
  for (int64_t u = num_units - 1; u >= 0; --u) {
    pass.unit_segments[u] = std::min(pass.unit_segments[u], pass.unit_segments[u + 1]);
  }
  pass.units.assign(num_units, UnitResult{});
  if (overflow.load()) {
    for (UnitResult& unit : pass.units) unit.key = kSampleMissed;
    return pass;
  }
  // Units in parallel (select_candidate's own parallel_for then runs inline);
  // one unit (global scope) in parallel over its candidates.
  at::parallel_for(0, num_units, 1, [&](int64_t first_unit, int64_t last_unit) {
    for (int64_t u = first_unit; u < last_unit; ++u) {
      UnitResult& unit = pass.units[u];
      int64_t below_bracket = 0, candidates = 0;
      std::vector<Span> spans;
      for (int64_t i = pass.unit_segments[u]; i < pass.unit_segments[u + 1]; ++i) {
        const SegmentCounts& seg = pass.counts[i];
        below_bracket += seg.below;
        unit.retained += seg.retained;
        unit.nonfinite += seg.nonfinite;
        candidates += seg.last - seg.first;
        if (seg.last > seg.first) {
          spans.push_back(
              Span{pass.chunks[seg.chunk].candidates.data() + seg.first, seg.last - seg.first});
        }
      }
      const int64_t k = ks[u];
      if (k <= 0 || k > unit.retained || unit.nonfinite > 0) continue;  // key stays -1
      if (k <= below_bracket || k > below_bracket + candidates) {
        unit.key = kSampleMissed;
        continue;
      }
      const auto [key, below_in_bracket] =
          select_candidate(spans, candidates, pass.brackets[u], k - below_bracket);
      unit.key = key;
      unit.below = below_bracket + below_in_bracket;
    }
  });
  return pass;
}

at::Tensor status_of(const SamplePass& pass) {
  const int64_t num_units = int64_t(pass.units.size());
  at::Tensor status = at::empty({num_units, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = status.data_ptr<int64_t>();
  for (int64_t u = 0; u < num_units; ++u) {
    const UnitResult& unit = pass.units[u];
    const bool missed = unit.key == kSampleMissed;
    out[4 * u] = unit.key;
    out[4 * u + 1] = unit.below;
    out[4 * u + 2] = missed ? 0 : unit.retained;
    out[4 * u + 3] = missed ? 0 : unit.nonfinite;
  }
  return status;
}

// The checked inputs of both ops: the table and one k per unit.
std::pair<ShardTable, at::Tensor> sample_op_inputs(
    at::TensorList weights, const c10::List<std::optional<at::Tensor>>& masks, int64_t scope,
    int64_t key_bits, const at::Tensor& k_tensor, int64_t sample_size, const char* op,
    const char* k_name) {
  TORCH_CHECK_VALUE(scope == kGlobal || scope == kLayer, op,
                    ": scope must be 0 (global) or 1 (layer), got ", scope);
  ShardTable table = checked_table(weights, masks, scope, key_bits, op);
  at::Tensor ks = per_unit_values(k_tensor, table.num_units, op, k_name);
  TORCH_CHECK_VALUE(sample_size >= 1, op, ": sample_size must be >= 1, got ", sample_size);
  return {std::move(table), std::move(ks)};
}

at::Tensor kth_key_by_sample_cpu(at::TensorList weights,
                                 const c10::List<std::optional<at::Tensor>>& masks, int64_t scope,
                                 int64_t key_bits, const at::Tensor& k_tensor,
                                 int64_t sample_size) {
  const auto [table, ks] = sample_op_inputs(weights, masks, scope, key_bits, k_tensor, sample_size,
                                            "kth_key_by_sample", "k");
  return status_of(
      run_sample_pass(table, scope, key_bits, ks.data_ptr<int64_t>(), sample_size, nullptr));
}

// After the pass every candidate is kept; this removes, in each unit u with a
// key t_u, those below t_u and the first remove_equal_u retained keys equal to
// t_u in flat order (segments are in flat order, and so are their candidates).
void remove_candidates(const SamplePass& pass, const std::vector<bool*>& new_masks,
                       const ShardTable& table, const int64_t* counts) {
  const int64_t num_segments = int64_t(pass.segments.size());
  auto unit_of = [&](int64_t i) { return table.shards[pass.segments[i].shard].first_unit; };
  auto keys_of = [&](int64_t i) {
    const SegmentCounts& seg = pass.counts[i];
    return pass.chunks[seg.chunk].candidates.data() + seg.first;
  };
  // Keys equal to t_u in the unit's earlier segments.
  std::vector<int64_t> equal_before(num_segments, 0);
  at::parallel_for(0, num_segments, 16, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t t = pass.units[unit_of(i)].key;
      const int64_t size = pass.counts[i].last - pass.counts[i].first;
      if (t >= 0) equal_before[i] = std::count(keys_of(i), keys_of(i) + size, uint32_t(t));
    }
  });
  for (int64_t u = 0; u < table.num_units; ++u) {
    int64_t seen = 0;
    for (int64_t i = pass.unit_segments[u]; i < pass.unit_segments[u + 1]; ++i) {
      const int64_t here = equal_before[i];
      equal_before[i] = seen;
      seen += here;
    }
  }
  at::parallel_for(0, num_segments, 16, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t u = unit_of(i);
      const UnitResult& unit = pass.units[u];
      if (unit.key < 0) continue;
      const uint32_t t = uint32_t(unit.key);
      const int64_t remove_equal = counts[u] - unit.below;
      const SegmentCounts& seg = pass.counts[i];
      const uint32_t* keys = keys_of(i);
      const uint32_t* positions = pass.chunks[seg.chunk].positions.data() + seg.first;
      bool* mask = new_masks[pass.segments[i].shard] + pass.segments[i].begin;
      int64_t equal_seen = equal_before[i];
      // Branch-free: about half the candidates go (those below t), in no
      // order a predictor could learn. Every candidate's mask is true here.
      for (int64_t j = 0; j < seg.last - seg.first; ++j) {
        const bool equal = keys[j] == t;
        const bool remove = (keys[j] < t) | (equal & (equal_seen < remove_equal));
        equal_seen += equal;
        mask[positions[j] - seg.offset] = !remove;
      }
    }
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor> prune_masks_by_sample_cpu(
    at::TensorList weights, const c10::List<std::optional<at::Tensor>>& masks, int64_t scope,
    int64_t key_bits, const at::Tensor& count_tensor, int64_t sample_size) {
  const auto [table, counts] = sample_op_inputs(weights, masks, scope, key_bits, count_tensor,
                                                sample_size, "prune_masks_by_sample", "count");
  std::vector<at::Tensor> outs = new_contiguous_masks(weights);
  std::vector<bool*> out_data;
  for (at::Tensor& out : outs) out_data.push_back(out.data_ptr<bool>());
  const int64_t* count_data = counts.data_ptr<int64_t>();
  const PassMasks out{out_data, false};
  const SamplePass pass = run_sample_pass(table, scope, key_bits, count_data, sample_size, &out);
  remove_candidates(pass, out_data, table, count_data);
  return {outs, status_of(pass)};
}

// Whether every unit has what the caller asked for: a key for count > 0, a
// count within [0, retained] and only finite retained weights.
bool every_unit_found(const SamplePass& pass, const int64_t* counts) {
  for (size_t u = 0; u < pass.units.size(); ++u) {
    const UnitResult& unit = pass.units[u];
    if (unit.key == kSampleMissed || unit.nonfinite > 0 || counts[u] < 0 ||
        counts[u] > unit.retained || (counts[u] > 0 && unit.key < 0)) {
      return false;
    }
  }
  return true;
}

at::Tensor prune_masks_by_sample_in_place_cpu(at::TensorList weights, at::TensorList masks,
                                              int64_t scope, int64_t key_bits,
                                              const at::Tensor& count_tensor, int64_t sample_size) {
  constexpr const char* op = "prune_masks_by_sample_";
  TORCH_CHECK_VALUE(masks.size() == weights.size(), op, ": got ", masks.size(), " masks for ",
                    weights.size(), " weights");
  const auto [table, counts] = sample_op_inputs(weights, optional_masks(masks), scope, key_bits,
                                                count_tensor, sample_size, op, "count");
  check_masks_in_place(masks, op);
  PassMasks out{{}, true};
  for (const Shard& shard : table.shards) out.masks.push_back(const_cast<bool*>(shard.mask));
  const int64_t* count_data = counts.data_ptr<int64_t>();
  const SamplePass pass = run_sample_pass(table, scope, key_bits, count_data, sample_size, &out);
  if (every_unit_found(pass, count_data)) {
    remove_candidates(pass, out.masks, table, count_data);
  } else {
    pass.backup->restore(pass.segments, pass.chunk_starts, out.masks, &pass.chunk_done);
  }
  return status_of(pass);
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_kernels, CPU, m) {
  m.impl("kth_key_by_sample", &kth_key_by_sample_cpu);
  m.impl("prune_masks_by_sample", &prune_masks_by_sample_cpu);
  m.impl("prune_masks_by_sample_", &prune_masks_by_sample_in_place_cpu);
}

}  // namespace sap_kernels::cpu
