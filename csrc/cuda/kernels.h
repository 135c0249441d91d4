// Launchers of the CUDA kernels. Plain C++ (CUDA runtime types only, no torch):
// the kernels build with nvcc alone (tools/compile_cuda.sh), and the torch
// binding (binding.cpp) calls these with device pointers it owns.
//
// Every launcher walks a piece table: Segments {begin, length, shard} that each
// lie inside one unit, so a piece's unit is
//   shards[shard].first_unit + (scope == kNeuron ? begin / row_length : 0),
// in global order (tensor order, then flat order; units non-decreasing).
// Every launcher returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernel_types.h"

namespace sap_kernels::cuda {

struct PieceTable {
  const Shard* shards;      // device array
  const Segment* segments;  // device array, global order
  int64_t num_segments;
  int32_t scope;  // Scope
};

struct PowerPlan {
  double p, q;
  int32_t p_kind, q_kind;  // PowerKind
  // Magnitudes outside [safe_min, safe_max] take float64 powers: their float32
  // powers could overflow or underflow.
  float safe_min, safe_max;
};

// Largest piece each op accepts (the histogram's packed 16-bit shared counters
// hold at most 65,535 counts per bin between flushes).
constexpr int64_t kPowerSumsPiece = int64_t(1) << 16;
constexpr int64_t kHistogramPiece = 65535;
constexpr int64_t kPrunePiece = int64_t(1) << 16;

// partials[s] = (S_p, S_q) and counts[s] = (retained, nonfinite) per piece;
// then out[u] = (S_p, S_q, d) summed over the pieces unit_starts[u] ..
// unit_starts[u + 1] - 1 in a fixed order. No float atomics.
cudaError_t launch_power_sums(const PieceTable& table, const PowerPlan& plan,
                              const int64_t* unit_starts, int64_t num_units, double* partials,
                              unsigned long long* counts, double* out, cudaStream_t stream);

// histogram[unit][digit] += retained keys per 16-bit digit (see csrc/ops.cpp);
// pieces hold at most kHistogramPiece elements.
cudaError_t launch_magnitude_histogram(const PieceTable& table, int key_bits, int pass_index,
                                       const int64_t* prefixes, unsigned long long* histogram,
                                       cudaStream_t stream);

// One piece per non-empty row (unit = row): result[row] = (key of the ks[row]-th
// smallest retained key, retained keys below it), (-1, 0) when ks[row] == 0;
// nonfinite[row] = retained NaN/inf keys.
cudaError_t launch_rowwise_kth_key(const PieceTable& table, int key_bits, const int64_t* ks,
                                   int64_t* result, int32_t* nonfinite, cudaStream_t stream);

// equal_counts[s] = retained keys == threshold_keys[unit] in piece s (0 when the
// unit removes no equal key).
cudaError_t launch_count_equal(const PieceTable& table, int key_bits, const int64_t* threshold_keys,
                               const int64_t* remove_equal, int64_t* equal_counts,
                               cudaStream_t stream);

// outputs[shard][i] = retained and not removed (see csrc/ops.cpp prune_masks);
// equal_before[s] = keys equal to the threshold in the unit before piece s.
cudaError_t launch_prune_masks(const PieceTable& table, int key_bits, const int64_t* threshold_keys,
                               const int64_t* remove_equal, const int64_t* equal_before,
                               uint8_t* const* outputs, cudaStream_t stream);

// data[i] = 0 where mask[i] is false, for every piece (every shard has a mask).
cudaError_t launch_apply_masks(const PieceTable& table, cudaStream_t stream);

}  // namespace sap_kernels::cuda
