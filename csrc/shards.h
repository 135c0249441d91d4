// Turning op arguments (lists of tensors and optional masks) into a table of
// shards and segments, with the argument checks every backend shares.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "kernel_types.h"

namespace sap_kernels {

// Contiguous views of the inputs, kept alive while kernels read them.
struct ShardTable {
  std::vector<at::Tensor> keep_alive;
  std::vector<Shard> shards;
  int64_t num_units = 0;
  int64_t total_numel = 0;
  bool has_copies = false;  // some input was not contiguous: a copy made for this call
};

inline WeightType weight_type_of(const at::Tensor& t, const char* op, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": weights[", i, "] has dtype ", t.scalar_type(),
                       "; expected float32, bfloat16 or float16");
  }
}

inline int64_t rows_of(const at::Tensor& t) {
  return t.dim() == 0 ? 1 : t.size(0);
}

// The exponents of masked_power_sums: 0 < p < q, both finite.
inline void check_exponents(double p, double q, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, op, ": p must be a finite number > 0, got ", p);
  TORCH_CHECK_VALUE(std::isfinite(q) && q > p, op, ": q must be finite and > p, got q=", q,
                    " with p=", p);
}

// Checks shapes, dtypes and devices and computes each shard's first unit.
inline ShardTable make_shard_table(const at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& masks, int64_t scope,
                                   const char* op) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights is an empty list");
  TORCH_CHECK_VALUE(masks.size() == 0 || masks.size() == weights.size(), op, ": got ", masks.size(),
                    " masks for ", weights.size(), " weights");
  TORCH_CHECK_VALUE(scope >= kGlobal && scope <= kNeuron, op, ": scope must be 0, 1 or 2, got ",
                    scope);
  ShardTable table;
  table.keep_alive.reserve(2 * weights.size());
  table.shards.reserve(weights.size());
  const auto device = weights[0].device();
  int64_t unit = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_VALUE(w.device() == device, op, ": weights[", i, "] is on ", w.device(),
                      " but weights[0] is on ", device);
    Shard shard{};
    shard.type = weight_type_of(w, op, i);
    at::Tensor wc = w.contiguous();
    table.has_copies = table.has_copies || !w.is_contiguous();
    table.keep_alive.push_back(wc);
    shard.data = wc.data_ptr();
    shard.numel = wc.numel();
    const int64_t rows = rows_of(w);
    shard.row_length = rows > 0 ? shard.numel / rows : 1;
    if (shard.row_length == 0) shard.row_length = 1;
    shard.mask = nullptr;
    if (masks.size() > 0) {
      const std::optional<at::Tensor> m = masks.get(i);
      if (m.has_value()) {
        TORCH_CHECK_TYPE(m->scalar_type() == at::kBool, op, ": masks[", i, "] has dtype ",
                         m->scalar_type(), "; expected bool");
        TORCH_CHECK_VALUE(m->sizes() == w.sizes(), op, ": masks[", i, "] has shape ", m->sizes(),
                          " but weights[", i, "] has shape ", w.sizes());
        TORCH_CHECK_VALUE(m->device() == device, op, ": masks[", i, "] is on ", m->device(),
                          " but weights[", i, "] is on ", device);
        at::Tensor mc = m->contiguous();
        table.has_copies = table.has_copies || !m->is_contiguous();
        table.keep_alive.push_back(mc);
        shard.mask = mc.data_ptr<bool>();
      }
    }
    shard.first_unit = scope == kGlobal ? 0 : unit;
    unit += scope == kLayer ? 1 : (scope == kNeuron ? rows : 0);
    table.total_numel += shard.numel;
    table.shards.push_back(shard);
  }
  table.num_units = scope == kGlobal ? 1 : unit;
  return table;
}

// Splits the shards into segments of at most `target` elements (whole rows in
// neuron scope) and groups consecutive segments into chunks of about `target`
// elements, so many tiny tensors share one chunk. chunk_starts has one more
// entry than there are chunks.
inline void make_segments(const ShardTable& table, int64_t scope, int64_t target,
                          std::vector<Segment>& segments, std::vector<int64_t>& chunk_starts) {
  segments.clear();
  chunk_starts.assign(1, 0);
  int64_t chunk_fill = 0;
  for (size_t s = 0; s < table.shards.size(); ++s) {
    const Shard& shard = table.shards[s];
    int64_t step = target;
    if (scope == kNeuron) step = std::max<int64_t>(1, target / shard.row_length) * shard.row_length;
    for (int64_t begin = 0; begin < shard.numel; begin += step) {
      const int64_t length = std::min(step, shard.numel - begin);
      segments.push_back(Segment{begin, length, static_cast<int32_t>(s)});
      chunk_fill += length;
      if (chunk_fill >= target) {
        chunk_starts.push_back(static_cast<int64_t>(segments.size()));
        chunk_fill = 0;
      }
    }
  }
  if (chunk_starts.back() != static_cast<int64_t>(segments.size()))
    chunk_starts.push_back(static_cast<int64_t>(segments.size()));
}

// Masks written where they are must be contiguous and must not share memory
// (a weight would be pruned twice).
inline void check_masks_in_place(at::TensorList masks, const char* op) {
  std::vector<std::pair<const char*, size_t>> starts;
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK_VALUE(masks[i].is_contiguous(), op, ": masks[", i,
                      "] must be contiguous (it is updated in place)");
    if (masks[i].numel() > 0) starts.emplace_back(static_cast<const char*>(masks[i].data_ptr()), i);
  }
  std::sort(starts.begin(), starts.end());
  for (size_t j = 1; j < starts.size(); ++j) {
    const auto [previous, i] = starts[j - 1];
    TORCH_CHECK_VALUE(previous + masks[i].numel() <= starts[j].first, op, ": masks[", i,
                      "] and masks[", starts[j].second, "] share memory");
  }
}

}  // namespace sap_kernels
