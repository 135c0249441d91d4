// Fused masked power sums on CUDA, deterministic:
//
//   S_p[u] = sum_{i in u, m_i} |w_i|^p    S_q[u] = sum_{i in u, m_i} |w_i|^q
//   d[u]   = #{i in u : m_i}
//
// Kernel 1 (persistent grid over the piece table, one block per piece at a
// time): each thread adds the powers of each group of up to 8 weights in
// float32, then the group total in float64; the block reduces its threads with
// cub::BlockReduce (a fixed tree) into per-piece partials. Kernel 2 sums each
// unit's piece partials in a fixed order. No float atomics, so the same inputs
// give bit-identical sums run after run.
#include <cub/block/block_reduce.cuh>

#include "common.cuh"

namespace sap_kernels::cuda {
namespace {

constexpr int kThreads = 256;

// |w|^r in float32 for the exponent kinds of csrc/kernel_types.h. The general
// exponent: |w| = 2^e * m, y = r * (e + log2 m) in float64 (the integer part
// costs no precision), 2^y = 2^frac(y) * 2^n split in two float32 scale
// factors so subnormal and overflowing results come out as on the CPU.
__device__ __forceinline__ float power(float v, double r, int32_t kind) {
  switch (kind) {
    case kPowHalf: return sqrtf(v);
    case kPowOne: return v;
    case kPowTwo: return v * v;
    case kPowInt: {
      float result = 1.f, base = v;
      int e = int(r);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        result = (e & 1) ? result * base : result;
        base *= base;
        e >>= 1;
      }
      return result;
    }
    default: {
      if (v == 0.f) return 0.f;
      uint32_t bits = __float_as_uint(v);
      const bool subnormal = bits < 0x00800000u;
      if (subnormal) bits = __float_as_uint(v * 0x1p23f);
      const int exponent = int(bits >> 23) - 127 - (subnormal ? 23 : 0);
      const float mantissa = __uint_as_float((bits & 0x7fffffu) | 0x3f800000u);
      double y = r * (double(exponent) + double(log2f(mantissa)));
      y = fmin(fmax(y, -600.0), 600.0);
      const double whole = floor(y);
      const float fraction = exp2f(float(y - whole));
      int n = int(whole);
      n = n < -252 ? -252 : (n > 254 ? 254 : n);
      const int n1 = n >> 1, n2 = n - n1;
      return fraction * __uint_as_float(uint32_t(n1 + 127) << 23) *
             __uint_as_float(uint32_t(n2 + 127) << 23);
    }
  }
}

// PKind/QKind >= 0 fix the exponent kinds at compile time (the common pairs);
// -1 reads them from the plan.
template <int Type, int PKind, int QKind>
struct PowerVisit {
  const PowerPlan& plan;
  double sum_p = 0, sum_q = 0;
  float group_p = 0, group_q = 0;
  unsigned long long retained = 0, nonfinite = 0;

  __device__ __forceinline__ void operator()(int64_t, uint32_t raw, bool keep) {
    const uint32_t bits = magnitude_bits<Type>(raw);
    const bool bad = keep && bits >= kFloat32InfBits;
    retained += keep;
    nonfinite += bad;
    const float v = (keep && !bad) ? __uint_as_float(bits) : 0.f;
    if (v > plan.safe_max || (v > 0.f && v < plan.safe_min)) {
      sum_p += pow(double(v), plan.p);
      sum_q += pow(double(v), plan.q);
      return;
    }
    group_p += power(v, plan.p, PKind >= 0 ? PKind : plan.p_kind);
    group_q += power(v, plan.q, QKind >= 0 ? QKind : plan.q_kind);
  }
  __device__ __forceinline__ void flush() {
    sum_p += group_p;
    sum_q += group_q;
    group_p = group_q = 0.f;
  }
};

template <int PKind, int QKind>
struct PieceSums {
  const Shard& shard;
  const Segment& seg;
  const PowerPlan& plan;
  double sum_p = 0, sum_q = 0;
  unsigned long long retained = 0, nonfinite = 0;

  template <int Type>
  __device__ __forceinline__ void operator()() {
    PowerVisit<Type, PKind, QKind> visit{plan};
    walk_piece<Type>(shard, seg.begin, seg.length, threadIdx.x, blockDim.x, visit);
    sum_p = visit.sum_p;
    sum_q = visit.sum_q;
    retained = visit.retained;
    nonfinite = visit.nonfinite;
  }
};

template <int PKind, int QKind>
__global__ void __launch_bounds__(kThreads)
    piece_power_sums_kernel(PieceTable table, PowerPlan plan, double* partials,
                            unsigned long long* counts) {
  using DoubleReduce = cub::BlockReduce<double, kThreads>;
  using CountReduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ union {
    typename DoubleReduce::TempStorage doubles;
    typename CountReduce::TempStorage counts;
  } scratch;
  for (int64_t s = blockIdx.x; s < table.num_segments; s += gridDim.x) {
    const Segment seg = table.segments[s];
    const Shard shard = table.shards[seg.shard];
    PieceSums<PKind, QKind> body{shard, seg, plan};
    dispatch_type(shard.type, body);
    const double sum_p = DoubleReduce(scratch.doubles).Sum(body.sum_p);
    __syncthreads();
    const double sum_q = DoubleReduce(scratch.doubles).Sum(body.sum_q);
    __syncthreads();
    const unsigned long long retained = CountReduce(scratch.counts).Sum(body.retained);
    __syncthreads();
    const unsigned long long nonfinite = CountReduce(scratch.counts).Sum(body.nonfinite);
    __syncthreads();
    if (threadIdx.x == 0) {
      partials[2 * s] = sum_p;
      partials[2 * s + 1] = sum_q;
      counts[2 * s] = retained;
      counts[2 * s + 1] = nonfinite;
    }
  }
}

// out[u] = sum of the partials of pieces unit_starts[u] .. unit_starts[u+1]-1:
// thread t adds pieces t, t + blockDim, ... in order, then a fixed block tree.
__global__ void __launch_bounds__(kThreads)
    reduce_units_kernel(const int64_t* unit_starts, int64_t num_units, const double* partials,
                        const unsigned long long* counts, double* out) {
  using DoubleReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename DoubleReduce::TempStorage scratch;
  for (int64_t u = blockIdx.x; u < num_units; u += gridDim.x) {
    double sum_p = 0, sum_q = 0, retained = 0;
    for (int64_t s = unit_starts[u] + threadIdx.x; s < unit_starts[u + 1]; s += blockDim.x) {
      sum_p += partials[2 * s];
      sum_q += partials[2 * s + 1];
      retained += double(counts[2 * s]);
    }
    sum_p = DoubleReduce(scratch).Sum(sum_p);
    __syncthreads();
    sum_q = DoubleReduce(scratch).Sum(sum_q);
    __syncthreads();
    retained = DoubleReduce(scratch).Sum(retained);
    __syncthreads();
    if (threadIdx.x == 0) {
      out[3 * u] = sum_p;
      out[3 * u + 1] = sum_q;
      out[3 * u + 2] = retained;
    }
  }
}

}  // namespace

cudaError_t launch_power_sums(const PieceTable& table, const PowerPlan& plan,
                              const int64_t* unit_starts, int64_t num_units, double* partials,
                              unsigned long long* counts, double* out, cudaStream_t stream) {
  if (table.num_segments > 0) {
    const int grid = grid_for(table.num_segments, 8);
    if (plan.p_kind == kPowHalf && plan.q_kind == kPowOne) {
      piece_power_sums_kernel<kPowHalf, kPowOne>
          <<<grid, kThreads, 0, stream>>>(table, plan, partials, counts);
    } else if (plan.p_kind == kPowOne && plan.q_kind == kPowTwo) {
      piece_power_sums_kernel<kPowOne, kPowTwo>
          <<<grid, kThreads, 0, stream>>>(table, plan, partials, counts);
    } else {
      piece_power_sums_kernel<-1, -1><<<grid, kThreads, 0, stream>>>(table, plan, partials, counts);
    }
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (num_units > 0) {
    reduce_units_kernel<<<grid_for(num_units, 8), kThreads, 0, stream>>>(unit_starts, num_units,
                                                                         partials, counts, out);
  }
  return cudaGetLastError();
}

}  // namespace sap_kernels::cuda
