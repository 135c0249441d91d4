// CPU kernel for masked_power_sums: one parallel pass over every shard.
//
//   S_p[u] = sum_{i in u, m_i} |w_i|^p    S_q[u] = sum_{i in u, m_i} |w_i|^q
//   d[u]   = #{i in u : m_i}
//
// Shards are cut into segments of <= kChunk elements and grouped into chunks
// (so thousands of tiny tensors share chunks); at::parallel_for walks chunks.
// Each segment walks blocks of kBlock weights and accumulates |w|^p and |w|^q
// in 16 float32 lanes (64 terms per lane per block; pruned and non-finite
// weights count as 0, which every power maps to 0), then adds each block's
// total to float64, so rounding error does not grow with the model size.
// Exact powers (sqrt, 1, 2, integers) decode and sum 16 weights at a time in
// registers; general exponents (exp2/log2 per weight) first decode a block
// into an L1 buffer of magnitudes. Per-segment float64 partials are reduced
// in segment order, so results are bit-identical whatever the thread count.
// The block kernels (power_sums_blocks.h) are compiled for x86-64-v4, -v3 and
// the baseline; their order of additions does not depend on the vector width
// and none of them contracts a product and a sum into an FMA, so every copy
// gives the same bits.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../shards.h"
#include "magnitudes.h"

namespace sap_kernels::cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int kLanes = 16;  // lanes of a block sum; buffers are padded to whole lanes
constexpr int kBlock = 1024;

struct Sums {
  double sum_p = 0, sum_q = 0;
  int64_t retained = 0, nonfinite = 0;
};

struct PowerPlan {
  double p, q;
  PowerKind p_kind, q_kind;
  // Blocks whose largest magnitude lies outside [safe_min, safe_max] could
  // overflow or underflow float32 powers; they are summed in float64 instead.
  float safe_min, safe_max;
};

}  // namespace

// One copy of the block kernels per instruction set. No FMA contraction: the
// baseline has no FMA, and where the other copies would fuse `lane += v * v`
// depends on how GCC schedules each copy; without it every copy rounds every
// product and sum alike. (exp2_scaled's explicit __builtin_fmaf is not a
// contraction and stays.)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SAP_KERNELS_ISA x86_64_v4
#define SAP_KERNELS_VECTOR_WIDTH 16
#include "power_sums_blocks.h"
#undef SAP_KERNELS_ISA
#undef SAP_KERNELS_VECTOR_WIDTH
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define SAP_KERNELS_ISA x86_64_v3
#define SAP_KERNELS_VECTOR_WIDTH 8
#include "power_sums_blocks.h"
#undef SAP_KERNELS_ISA
#undef SAP_KERNELS_VECTOR_WIDTH
#pragma GCC pop_options

#define SAP_KERNELS_ISA x86_64_baseline
#define SAP_KERNELS_VECTOR_WIDTH 4
#include "power_sums_blocks.h"
#undef SAP_KERNELS_ISA
#undef SAP_KERNELS_VECTOR_WIDTH
#pragma GCC pop_options

namespace {

using RangePowerSums = void (*)(const Shard&, int64_t, int64_t, const PowerPlan&, Sums&);

// The widest instruction set this CPU runs, or a narrower one named by the
// environment variable SAP_KERNELS_CPU_ISA (x86-64-v3, baseline), so tests can
// check every copy on one machine.
RangePowerSums select_range_power_sums() {
  const char* forced = std::getenv("SAP_KERNELS_CPU_ISA");
  const std::string name = forced ? forced : "";
  if (name == "baseline") return &x86_64_baseline::range_power_sums;
  if (name != "x86-64-v3" && __builtin_cpu_supports("x86-64-v4")) {
    return &x86_64_v4::range_power_sums;
  }
  if (__builtin_cpu_supports("x86-64-v3")) return &x86_64_v3::range_power_sums;
  return &x86_64_baseline::range_power_sums;
}

PowerPlan make_plan(double p, double q) {
  PowerPlan plan{p, q, classify_power(p), classify_power(q), 0.f, 0.f};
  // Keep max|w|^q within [2^-100, 2^100] (and sums of 2^10 such terms in
  // float32 range); outside it the block is summed in float64.
  plan.safe_max = float(std::exp2(100.0 / q));
  plan.safe_min = float(std::exp2(-100.0 / q));
  return plan;
}

at::Tensor masked_power_sums_cpu(at::TensorList weights,
                                 const c10::List<std::optional<at::Tensor>>& masks, double p,
                                 double q, int64_t scope) {
  constexpr const char* op = "masked_power_sums";
  check_exponents(p, q, op);
  const ShardTable table = make_shard_table(weights, masks, scope, op);
  TORCH_CHECK_VALUE(table.shards[0].data == nullptr || weights[0].device().is_cpu(), op,
                    ": expected CPU tensors");
  std::vector<Segment> segments;
  std::vector<int64_t> chunk_starts;
  make_segments(table, scope, kChunk, segments, chunk_starts);
  const PowerPlan plan = make_plan(p, q);
  const RangePowerSums range_power_sums = select_range_power_sums();

  at::Tensor out = at::zeros({table.num_units, 3}, at::TensorOptions().dtype(at::kDouble));
  double* out_data = out.data_ptr<double>();
  // Neuron scope writes each row's sums directly (a segment holds whole rows);
  // the other scopes keep one partial per segment and reduce in order.
  std::vector<Sums> partials(scope == kNeuron ? 0 : segments.size());
  std::vector<int64_t> nonfinite_per_chunk(chunk_starts.size() - 1, 0);
  at::parallel_for(0, int64_t(chunk_starts.size()) - 1, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      for (int64_t s = chunk_starts[c]; s < chunk_starts[c + 1]; ++s) {
        const Segment& seg = segments[s];
        const Shard& shard = table.shards[seg.shard];
        if (scope != kNeuron) {
          range_power_sums(shard, seg.begin, seg.length, plan, partials[s]);
          nonfinite_per_chunk[c] += partials[s].nonfinite;
          continue;
        }
        for (int64_t row_begin = seg.begin; row_begin < seg.begin + seg.length;
             row_begin += shard.row_length) {
          Sums row;
          range_power_sums(shard, row_begin, shard.row_length, plan, row);
          double* o = out_data + 3 * (shard.first_unit + row_begin / shard.row_length);
          o[0] = row.sum_p;
          o[1] = row.sum_q;
          o[2] = double(row.retained);
          nonfinite_per_chunk[c] += row.nonfinite;
        }
      }
    }
  });
  for (size_t c = 0; c + 1 < chunk_starts.size(); ++c) {
    if (nonfinite_per_chunk[c] == 0) continue;
    const int32_t shard = segments[chunk_starts[c]].shard;
    for (int64_t s = chunk_starts[c]; s < chunk_starts[c + 1]; ++s) {
      // Name the first tensor of the chunk that holds a non-finite weight.
      const Segment& seg = segments[s];
      Sums probe;
      range_power_sums(table.shards[seg.shard], seg.begin, seg.length, plan, probe);
      TORCH_CHECK_VALUE(probe.nonfinite == 0, op, ": weights[", seg.shard,
                        "] contains NaN or infinity among its retained weights");
    }
    TORCH_CHECK_VALUE(false, op, ": weights[", shard, "] contains NaN or infinity");
  }
  if (scope != kNeuron) {
    for (size_t s = 0; s < segments.size(); ++s) {
      double* o = out_data + 3 * table.shards[segments[s].shard].first_unit;
      o[0] += partials[s].sum_p;
      o[1] += partials[s].sum_q;
      o[2] += double(partials[s].retained);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_kernels, CPU, m) {
  m.impl("masked_power_sums", &masked_power_sums_cpu);
}

}  // namespace sap_kernels::cpu
