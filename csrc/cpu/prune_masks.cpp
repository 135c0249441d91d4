// CPU kernels that write masks and weights (DESIGN.md §3, §5), with keys and
// masks as in selection.cpp:
//
//   prune_masks   m'_i = m_i and not (k_i < t_u or (k_i = t_u and rank_i < e_u)),
//                 rank_i = #{j < i in u : m_j, k_j = t_u} in flat order
//                 (tensor order, then row-major).
//   prune_masks_  the same, written over the masks.
//   prune_rows_   neuron scope, t_u and e_u found per row (rowwise_kth_key with
//                 k = counts) in the same pass, written over the masks.
//   apply_masks_  w_i = m_i ? w_i : 0.
//
// Each walks the chunk table of masked_power_sums (at::parallel_for over
// chunks of ~64K elements made of whole segments).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../shards.h"
#include "magnitudes.h"
#include "mask_backup.h"
#include "row_select.h"
#include "selection_args.h"
#include "selection_keys.h"

namespace sap_kernels::cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;

// --- prune_masks -------------------------------------------------------------

// out_i = m_i and k_i >= threshold over a range; returns #{i : m_i, k_i = threshold}.
// Blocks go through a local buffer: a store through bool* may alias the
// weights as far as the compiler knows, which kept the loop scalar.
template <int Type, int KeyBits, bool Masked, int64_t Block>
SAP_INLINE uint32_t write_kept_block(const Shard& shard, int64_t begin, uint32_t threshold,
                                     bool* out) {
  const uint8_t* mask = Masked ? mask_bytes(shard.mask + begin) : nullptr;
  uint8_t kept[Block];
  uint32_t equal = 0;
  for (int64_t i = 0; i < Block; ++i) {
    const uint32_t key = key_at<Type, KeyBits>(shard.data, begin + i);
    const uint32_t keep = Masked ? uint32_t(mask[i]) : 1u;
    kept[i] = uint8_t(keep & uint32_t(key >= threshold));
    equal += keep & uint32_t(key == threshold);
  }
  std::memcpy(out, kept, size_t(Block));
  return equal;
}

template <int Type, int KeyBits, bool Masked>
SAP_INLINE int64_t write_kept(const Shard& shard, int64_t begin, int64_t length, uint32_t threshold,
                              bool* out) {
  constexpr int64_t kBlock = 256;
  int64_t equal = 0, i = 0;
  for (; i + kBlock <= length; i += kBlock) {
    equal += write_kept_block<Type, KeyBits, Masked, kBlock>(shard, begin + i, threshold, out + i);
  }
  for (; i < length; ++i) {  // the tail
    equal += write_kept_block<Type, KeyBits, Masked, 1>(shard, begin + i, threshold, out + i);
  }
  return equal;
}

// Compiled once per instruction set (the loop vectorises).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) int64_t
write_kept_range(const Shard& shard, int64_t key_bits, int64_t begin, int64_t length,
                 uint32_t threshold, bool* out) {
  int64_t equal = 0;
  with_key_type(shard, key_bits, [&](auto type, auto bits, auto masked) SAP_INLINE_LAMBDA {
    equal = write_kept<decltype(type)::value, decltype(bits)::value, decltype(masked)::value>(
        shard, begin, length, threshold, out);
  });
  return equal;
}

// Clears out_i for the first `count` retained keys equal to threshold. Ties
// are usually few and far apart: a vectorised test skips blocks without one.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
remove_first_equal(const Shard& shard, int64_t key_bits, int64_t begin, int64_t length,
                   uint32_t threshold, int64_t count, bool* out) {
  with_key_type(shard, key_bits, [&](auto type, auto bits, auto masked) SAP_INLINE_LAMBDA {
    constexpr int T = decltype(type)::value, B = decltype(bits)::value;
    const uint8_t* mask = decltype(masked)::value ? mask_bytes(shard.mask + begin) : nullptr;
    auto tie = [&](int64_t i) SAP_INLINE_LAMBDA {
      const uint32_t keep = decltype(masked)::value ? uint32_t(mask[i]) : 1u;
      return keep & uint32_t(key_at<T, B>(shard.data, begin + i) == threshold);
    };
    constexpr int64_t kBlock = 64;
    for (int64_t first = 0; first < length && count > 0; first += kBlock) {
      const int64_t last = std::min(length, first + kBlock);
      uint32_t any = 0;
      for (int64_t i = first; i < last; ++i) any |= tie(i);
      for (int64_t i = first; any != 0 && i < last && count > 0; ++i) {
        if (tie(i)) {
          out[i] = false;
          --count;
        }
      }
    }
  });
}

// New mask for a range given the unit's threshold; returns the retained keys
// equal to it (0 where threshold < 0, which removes nothing).
int64_t prune_range(const Shard& shard, int64_t key_bits, int64_t begin, int64_t length,
                    int64_t threshold, bool* out) {
  if (threshold >= 0) return write_kept_range(shard, key_bits, begin, length, threshold, out);
  if (shard.mask == out - begin) return 0;  // in place
  if (shard.mask != nullptr) {
    std::copy(shard.mask + begin, shard.mask + begin + length, out);
  } else {
    std::fill(out, out + length, true);
  }
  return 0;
}

// A row's new mask given its threshold key (< 0: the row keeps its mask) and
// the number of retained keys equal to it to remove, in flat order; false
// (with every tie removed) when the row has fewer ties than that. known_ties:
// the row's retained keys equal to the threshold if the caller counted them
// (-1 if not); when all of them go, one pass with threshold + 1 does it.
bool prune_row(const Shard& shard, int64_t key_bits, int64_t begin, int64_t length,
               int64_t threshold_key, int64_t remove_equal, bool* out, int64_t known_ties = -1) {
  if (threshold_key >= 0 && threshold_key < 0xffffffff && remove_equal == known_ties) {
    write_kept_range(shard, key_bits, begin, length, uint32_t(threshold_key) + 1, out);
    return true;
  }
  const int64_t ties = prune_range(shard, key_bits, begin, length, threshold_key, out);
  const int64_t remove = threshold_key >= 0 ? remove_equal : 0;
  const uint32_t threshold = uint32_t(threshold_key);
  if (remove >= ties && ties > 0 && threshold < 0xffffffffu) {
    // every tie goes (the common case): the row again, now in cache
    write_kept_range(shard, key_bits, begin, length, threshold + 1, out);
  } else if (remove > 0) {
    remove_first_equal(shard, key_bits, begin, length, threshold, std::min(remove, ties), out);
  }
  return remove <= ties;
}

// The checked per-unit inputs of prune_masks and prune_masks_.
struct PruneInputs {
  ShardTable table;
  at::Tensor thresholds, removals;
};

PruneInputs prune_inputs(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& masks,
                         int64_t scope, int64_t key_bits, const at::Tensor& threshold_keys,
                         const at::Tensor& remove_equal, const char* op) {
  PruneInputs in{checked_table(weights, masks, scope, key_bits, op), {}, {}};
  in.thresholds = per_unit_values(threshold_keys, in.table.num_units, op, "threshold_keys");
  in.removals = per_unit_values(remove_equal, in.table.num_units, op, "remove_equal");
  const int64_t* threshold_data = in.thresholds.data_ptr<int64_t>();
  const int64_t* remove_data = in.removals.data_ptr<int64_t>();
  for (int64_t u = 0; u < in.table.num_units; ++u) {
    TORCH_CHECK_VALUE(threshold_data[u] <= int64_t(std::numeric_limits<uint32_t>::max()), op,
                      ": threshold_keys[", u, "] = ", threshold_data[u], " is not a valid key");
    TORCH_CHECK_VALUE(remove_data[u] >= 0, op, ": remove_equal[", u, "] = ", remove_data[u],
                      " is negative");
  }
  return in;
}

// Writes the new masks into out_data (row-major, one per shard; the input
// masks themselves when backup is given, which first keeps their bits).
// Returns "" or the message of a remove_equal above a unit's ties, in which
// case out_data is partly written.
std::string prune_into(const PruneInputs& in, int64_t scope, int64_t key_bits,
                       const std::vector<bool*>& out_data, MaskBackup* backup,
                       const std::vector<Segment>& segments,
                       const std::vector<int64_t>& chunk_starts, const char* op) {
  const ShardTable& table = in.table;
  const int64_t* threshold_data = in.thresholds.data_ptr<int64_t>();
  const int64_t* remove_data = in.removals.data_ptr<int64_t>();
  // Neuron scope: a row lies in one segment, so its owner ranks the ties.
  // Other scopes: count ties per segment in the mask pass, then scan.
  std::vector<int64_t> equal(segments.size(), 0);
  std::vector<int64_t> short_row(chunk_starts.size() - 1, -1);
  at::parallel_for(0, int64_t(chunk_starts.size()) - 1, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      for (int64_t s = chunk_starts[c]; s < chunk_starts[c + 1]; ++s) {
        const Segment& seg = segments[s];
        const Shard& shard = table.shards[seg.shard];
        bool* out = out_data[seg.shard];
        if (backup != nullptr) backup->save(s, shard.mask + seg.begin, seg.length);
        if (scope != kNeuron) {
          const int64_t threshold = threshold_data[shard.first_unit];
          equal[s] =
              prune_range(shard, key_bits, seg.begin, seg.length, threshold, out + seg.begin);
          continue;
        }
        const int64_t length = shard.row_length;
        for (int64_t begin = seg.begin; begin < seg.begin + seg.length; begin += length) {
          const int64_t row = shard.first_unit + begin / length;
          const bool enough_ties = prune_row(shard, key_bits, begin, length, threshold_data[row],
                                             remove_data[row], out + begin);
          if (!enough_ties && short_row[c] < 0) short_row[c] = row;
        }
      }
    }
  });
  for (const int64_t row : short_row) {
    if (row >= 0) {
      return c10::str(op, ": remove_equal[", row, "] = ", remove_data[row],
                      " exceeds the retained weights of that row equal to its threshold");
    }
  }
  if (scope == kNeuron) return "";

  // Exclusive scan of the tie counts per unit in flat (segment) order; the
  // segments holding one of the first remove_equal[u] ties get a fix-up.
  std::vector<int64_t> seen(table.num_units, 0);
  std::vector<std::pair<int64_t, int64_t>> fixups;  // (segment, ties to clear)
  for (size_t s = 0; s < segments.size(); ++s) {
    const int64_t unit = table.shards[segments[s].shard].first_unit;
    const int64_t remove = threshold_data[unit] >= 0 ? remove_data[unit] : 0;
    const int64_t take = std::min(equal[s], std::max<int64_t>(0, remove - seen[unit]));
    if (take > 0) fixups.emplace_back(s, take);
    seen[unit] += equal[s];
  }
  for (int64_t u = 0; u < table.num_units; ++u) {
    const int64_t remove = threshold_data[u] >= 0 ? remove_data[u] : 0;
    if (remove > seen[u]) {
      return c10::str(op, ": remove_equal[", u, "] = ", remove, " exceeds the ", seen[u],
                      " retained weights equal to threshold_keys[", u, "]");
    }
  }
  at::parallel_for(0, int64_t(fixups.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t f = first; f < last; ++f) {
      const Segment& seg = segments[fixups[f].first];
      const Shard& shard = table.shards[seg.shard];
      const uint32_t threshold = uint32_t(threshold_data[shard.first_unit]);
      bool* out = out_data[seg.shard] + seg.begin;
      if (fixups[f].second == equal[fixups[f].first] && threshold < 0xffffffffu) {
        // Every tie of the segment goes: the vectorised pass with threshold + 1.
        write_kept_range(shard, key_bits, seg.begin, seg.length, threshold + 1, out);
      } else {
        remove_first_equal(shard, key_bits, seg.begin, seg.length, threshold, fixups[f].second,
                           out);
      }
    }
  });
  return "";
}

std::vector<at::Tensor> prune_masks_cpu(at::TensorList weights,
                                        const c10::List<std::optional<at::Tensor>>& masks,
                                        int64_t scope, int64_t key_bits,
                                        const at::Tensor& threshold_keys,
                                        const at::Tensor& remove_equal) {
  constexpr const char* op = "prune_masks";
  const PruneInputs in =
      prune_inputs(weights, masks, scope, key_bits, threshold_keys, remove_equal, op);
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  make_segments(in.table, scope, kChunk, segments, chunk_starts);
  std::vector<at::Tensor> outs = new_contiguous_masks(weights);
  std::vector<bool*> out_data;
  for (at::Tensor& out : outs) out_data.push_back(out.data_ptr<bool>());
  const std::string error =
      prune_into(in, scope, key_bits, out_data, nullptr, segments, chunk_starts, op);
  TORCH_CHECK_VALUE(error.empty(), error);
  // Masks are written in row-major order; a weight with permuted strides gets
  // a mask with the same strides (as the fake, empty_like, promises) by a copy.
  for (size_t i = 0; i < outs.size(); ++i) {
    if (weights[i].is_contiguous()) continue;  // empty_like would be contiguous too
    at::Tensor like = at::empty_like(weights[i], weights[i].options().dtype(at::kBool));
    if (!like.is_contiguous()) outs[i] = like.copy_(outs[i]);
  }
  return outs;
}

void prune_masks_in_place_cpu(at::TensorList weights, at::TensorList masks, int64_t scope,
                              int64_t key_bits, const at::Tensor& threshold_keys,
                              const at::Tensor& remove_equal) {
  constexpr const char* op = "prune_masks_";
  TORCH_CHECK_VALUE(masks.size() == weights.size(), op, ": got ", masks.size(), " masks for ",
                    weights.size(), " weights");
  const PruneInputs in = prune_inputs(weights, optional_masks(masks), scope, key_bits,
                                      threshold_keys, remove_equal, op);
  check_masks_in_place(masks, op);
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  make_segments(in.table, scope, kChunk, segments, chunk_starts);
  std::vector<bool*> mask_data;
  for (const Shard& shard : in.table.shards) mask_data.push_back(const_cast<bool*>(shard.mask));
  MaskBackup backup(segments);
  const std::string error =
      prune_into(in, scope, key_bits, mask_data, &backup, segments, chunk_starts, op);
  if (error.empty()) return;
  backup.restore(segments, chunk_starts, mask_data, nullptr);  // the pass wrote every segment
  TORCH_CHECK_VALUE(false, error);
}

// --- prune_rows_ -------------------------------------------------------------

// Neuron scope in one pass over the weights: each row's counts[r]-th smallest
// retained key (select_row) and then its mask, while the row is in cache. The
// masks are those of rowwise_kth_key (ks = counts) followed by prune_masks_
// with (key, counts - below), which read the weights twice.
void prune_rows_in_place_cpu(at::TensorList weights, at::TensorList masks, int64_t key_bits,
                             const at::Tensor& counts) {
  constexpr const char* op = "prune_rows_";
  TORCH_CHECK_VALUE(masks.size() == weights.size(), op, ": got ", masks.size(), " masks for ",
                    weights.size(), " weights");
  const ShardTable table = checked_table(weights, optional_masks(masks), kNeuron, key_bits, op);
  check_masks_in_place(masks, op);
  const at::Tensor count_values = per_unit_values(counts, table.num_units, op, "counts");
  const int64_t* k_data = count_values.data_ptr<int64_t>();
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  make_segments(table, kNeuron, kChunk, segments, chunk_starts);
  std::vector<bool*> mask_data;
  for (const Shard& shard : table.shards) mask_data.push_back(const_cast<bool*>(shard.mask));
  MaskBackup backup(segments);
  const int64_t chunks = int64_t(chunk_starts.size()) - 1;
  std::vector<RowError> errors(static_cast<size_t>(chunks));
  const VectorIsa isa = vector_isa();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    RowScratch scratch;
    for (int64_t c = first; c < last; ++c) {
      for (int64_t s = chunk_starts[c]; s < chunk_starts[c + 1]; ++s) {
        const Segment& seg = segments[s];
        const Shard& shard = table.shards[seg.shard];
        bool* mask = mask_data[seg.shard];
        backup.save(s, shard.mask + seg.begin, seg.length);
        const int64_t length = shard.row_length;
        for (int64_t begin = seg.begin; begin < seg.begin + seg.length; begin += length) {
          const int64_t row = shard.first_unit + begin / length;
          const int64_t k = k_data[row];
          const RowResult result = select_row(shard, key_bits, begin, length, k, scratch, isa);
          if (result.status != kRowOk) {
            if (errors[c].status == kRowOk) {
              errors[c] = RowError{result.status, row, seg.shard, k, result.retained};
            }
            continue;
          }
          // the exact k-th key leaves at least k - below ties to remove
          prune_row(shard, key_bits, begin, length, result.key, k - result.below, mask + begin,
                    result.equal);
        }
      }
    }
  });
  for_each_empty_row(table, [&](int64_t row, int64_t shard) {
    if (k_data[row] != 0) errors.push_back(RowError{kRowBadK, row, shard, k_data[row], 0});
  });
  if (std::any_of(errors.begin(), errors.end(),
                  [](const RowError& e) { return e.status != kRowOk; })) {
    backup.restore(segments, chunk_starts, mask_data, nullptr);  // every segment was saved
    raise_first_row_error(errors, op, "counts");
  }
}

// --- apply_masks_ ------------------------------------------------------------

// w_i = m_i ? w_i : 0 on the raw bits (so NaN * 0 cannot survive); blocks whose
// mask is all True are read but not written.
template <class Bits>
SAP_INLINE void zero_pruned(Bits* __restrict data, const uint8_t* __restrict mask, int64_t length) {
  constexpr int64_t kBlock = 256;
  for (int64_t begin = 0; begin < length; begin += kBlock) {
    const int64_t n = std::min(kBlock, length - begin);
    Bits* __restrict block = data + begin;
    const uint8_t* __restrict keep = mask + begin;
    uint8_t pruned = 0;
    for (int64_t i = 0; i < n; ++i) pruned |= keep[i] ^ 1;
    if (pruned == 0) continue;
    // An and with 0 or all ones: a conditional store would branch per weight.
    for (int64_t i = 0; i < n; ++i) block[i] = Bits(block[i] & Bits(0u - Bits(keep[i])));
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
zero_pruned_range(const Shard& shard, int64_t begin, int64_t length) {
  void* data = const_cast<void*>(shard.data);
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(shard.mask) + begin;  // bools are 0 or 1
  if (shard.type == kFloat32) {
    zero_pruned(static_cast<uint32_t*>(data) + begin, mask, length);
  } else {
    zero_pruned(static_cast<uint16_t*>(data) + begin, mask, length);
  }
}

void apply_masks_cpu(at::TensorList weights, at::TensorList masks) {
  constexpr const char* op = "apply_masks_";
  TORCH_CHECK_VALUE(masks.size() == weights.size(), op, ": got ", masks.size(), " masks for ",
                    weights.size(), " weights");
  // Non-contiguous weights are updated through a contiguous copy, copied back.
  std::vector<at::Tensor> contiguous;
  c10::List<std::optional<at::Tensor>> mask_list;
  for (size_t i = 0; i < weights.size(); ++i) {
    contiguous.push_back(weights[i].is_contiguous() ? weights[i] : weights[i].contiguous());
    mask_list.push_back(masks[i]);
  }
  const ShardTable table = make_shard_table(contiguous, mask_list, kGlobal, op);
  TORCH_CHECK_VALUE(weights[0].device().is_cpu(), op, ": expected CPU tensors, got ",
                    weights[0].device());
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  make_segments(table, kGlobal, kChunk, segments, chunk_starts);
  at::parallel_for(0, int64_t(chunk_starts.size()) - 1, 1, [&](int64_t first, int64_t last) {
    for (int64_t s = chunk_starts[first]; s < chunk_starts[last]; ++s) {
      zero_pruned_range(table.shards[segments[s].shard], segments[s].begin, segments[s].length);
    }
  });
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!weights[i].is_contiguous()) weights[i].copy_(contiguous[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_kernels, CPU, m) {
  m.impl("prune_masks", &prune_masks_cpu);
  m.impl("prune_masks_", &prune_masks_in_place_cpu);
  m.impl("prune_rows_", &prune_rows_in_place_cpu);
  m.impl("apply_masks_", &apply_masks_cpu);
}

}  // namespace sap_kernels::cpu
