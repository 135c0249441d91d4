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
// registers; general exponents first decode a block into an L1 buffer of
// magnitudes (finding its smallest and largest), then take each power from
// tables and a short series (PowerTable) or, for blocks spanning more than 32
// binades, from exp2/log2. Per-segment float64 partials are reduced
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
#include <type_traits>

#include "../shards.h"
#include "magnitudes.h"
#include "vector_isa.h"

namespace sap_kernels::cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int kLanes = 16;  // lanes of a block sum; buffers are padded to whole lanes
constexpr int kBlock = 1024;

struct Sums {
  double sum_p = 0, sum_q = 0;
  int64_t retained = 0, nonfinite = 0;
};

// |w|^r for a general exponent r by table lookups instead of exp2/log2.
// With |w| = 2^(e-127) * m, m in [1, 2) lying in bin i (the top 5 bits of its
// fraction) around the bin's centre c_i = 1 + (i + 1/2) / 32:
//
//   |w|^r = 2^(r (e-127)) * c_i^r * (1 + delta)^r,   delta = (m - c_i) / c_i,
//
// |delta| < 1/64. Both powers come from tables rounded to float32, each with
// its rounding error kept as a relative correction, so the float32 product
// carries no bias from the tables; (1 + delta)^r - 1 is its binomial series,
// cut where the next term is below 1e-10 relative. A block uses the 32
// exponents below its largest magnitude's, one register pair's worth.
struct PowerTable {
  static constexpr int kBins = 32;
  static constexpr int kMaxDegree = 16;
  int degree = 0;  // 0: r is too large for the series, so the exp2/log2 form is used
  float binomial[kMaxDegree] = {};                           // C(r, k), k = 1..degree
  float scale[256] = {}, scale_error[256] = {};              // 2^(r (e-127)) by exponent field e
  float bin_power[kBins] = {}, bin_power_error[kBins] = {};  // c_i^r
  // The smallest exponent field whose scale is >= 2^-102, so the product with
  // c_i^r and its rounding error stay normal floats. Large r push it up (r = 40:
  // 125); blocks reaching below it take the exp2/log2 form.
  int lowest_row = 1;
};

struct PowerPlan {
  double p, q;
  PowerKind p_kind, q_kind;
  // Blocks whose largest magnitude lies outside [safe_min, safe_max] could
  // overflow or underflow float32 powers; they are summed in float64 instead.
  float safe_min, safe_max;
  PowerTable p_table, q_table;           // filled for general exponents only
  float bin_inverse[PowerTable::kBins];  // 1 / c_i
  int lowest_window_row;                 // the larger lowest_row of the tabled exponents
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

// The copy for the instruction set vector_isa.h picks.
RangePowerSums select_range_power_sums() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return &x86_64_v4::range_power_sums;
    case VectorIsa::kAvx2: return &x86_64_v3::range_power_sums;
    default: return &x86_64_baseline::range_power_sums;
  }
}

double bin_centre(int bin) {
  return 1.0 + (bin + 0.5) / PowerTable::kBins;
}

// exact / float(exact) - 1, or 0 where float(exact) is not a normal float.
float rounding_error(double exact, float rounded) {
  return std::isnormal(rounded) ? float(exact / double(rounded) - 1.0) : 0.f;
}

void fill_power_table(double r, PowerTable& table) {
  // |C(r, n+1)| (1/64)^(n+1) bounds the series' tail after degree n.
  double binomial = 1.0;
  for (int k = 1; k <= PowerTable::kMaxDegree; ++k) {
    binomial *= (r - (k - 1)) / k;
    table.binomial[k - 1] = float(binomial);
    const double next_term = std::abs(binomial * (r - k) / (k + 1)) * std::exp2(-6.0 * (k + 1));
    if (next_term < 1e-10) {
      table.degree = k;
      break;
    }
  }
  if (table.degree == 0) return;
  table.lowest_row = 255;
  for (int e = 254; e >= 1; --e) {
    const double exact = std::exp2(r * (e - 127));
    table.scale[e] = float(exact);
    table.scale_error[e] = rounding_error(exact, table.scale[e]);
    if (exact >= 0x1p-102) table.lowest_row = e;
  }
  for (int bin = 0; bin < PowerTable::kBins; ++bin) {
    const double exact = std::pow(bin_centre(bin), r);
    table.bin_power[bin] = float(exact);
    table.bin_power_error[bin] = rounding_error(exact, table.bin_power[bin]);
  }
}

PowerPlan make_plan(double p, double q) {
  PowerPlan plan{p, q, classify_power(p), classify_power(q), 0.f, 0.f, {}, {}, {}, 1};
  // Keep max|w|^q within [2^-100, 2^100] (and sums of 2^10 such terms in
  // float32 range); outside it the block is summed in float64.
  plan.safe_max = float(std::exp2(100.0 / q));
  plan.safe_min = float(std::exp2(-100.0 / q));
  if (plan.p_kind == kPowGeneral) fill_power_table(p, plan.p_table);
  if (plan.q_kind == kPowGeneral) fill_power_table(q, plan.q_table);
  for (int bin = 0; bin < PowerTable::kBins; ++bin) {
    plan.bin_inverse[bin] = float(1.0 / bin_centre(bin));
  }
  plan.lowest_window_row = std::max(plan.p_table.lowest_row, plan.q_table.lowest_row);
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
