// Radix select on CUDA: 65,536-bin digit histograms (global and layer scope)
// and a per-row radix select (neuron scope). Keys are the bit patterns of |w|,
// which order like the magnitudes (see csrc/ops.cpp).
#include "common.cuh"

namespace sap_kernels::cuda {
namespace {

constexpr int kHistogramThreads = 1024;
// Pieces shorter than this add straight to the global histogram: clearing and
// flushing 128 KiB of shared counters would cost more than their atomics.
constexpr int64_t kSharedHistogramMin = 4096;
constexpr int kBins = 65536;
constexpr int kSharedWords = kBins / 2;  // two 16-bit counters per 32-bit word
constexpr int kSelectThreads = 256;

// Adds a piece's digits to a histogram. Shared: bin b is the 16-bit half
// (b & 1) of word b / 2, incremented by a 32-bit atomicAdd of 1 << 16*(b & 1);
// a piece has at most 65,535 elements, so a half never carries into the other.
struct HistogramVisit {
  int key_bits, pass_index;
  uint32_t prefix;
  uint32_t* shared_words;      // nullptr: add to `global` directly
  unsigned long long* global;  // this unit's 65,536 bins
  template <int Type>
  __device__ __forceinline__ void add(uint32_t raw, bool keep) {
    if (!keep) return;
    const uint32_t key = key_of<Type>(raw, key_bits);
    uint32_t digit;
    if (pass_index == 0) {
      digit = key_bits == 32 ? key >> 16 : key;
    } else {
      if ((key >> 16) != prefix) return;
      digit = key & 0xffffu;
    }
    if (shared_words) {
      atomicAdd(shared_words + (digit >> 1), 1u << (16 * (digit & 1)));
    } else {
      atomicAdd(global + digit, 1ull);
    }
  }
};

template <int Type>
struct TypedHistogramVisit {
  HistogramVisit& inner;
  __device__ __forceinline__ void operator()(int64_t, uint32_t raw, bool keep) {
    inner.template add<Type>(raw, keep);
  }
  __device__ __forceinline__ void flush() {}
};

struct HistogramBody {
  const Shard& shard;
  const Segment& seg;
  HistogramVisit& visit;
  template <int Type>
  __device__ __forceinline__ void operator()() {
    TypedHistogramVisit<Type> typed{visit};
    walk_piece<Type>(shard, seg.begin, seg.length, threadIdx.x, blockDim.x, typed);
  }
};

// histogram[u][digit] += #{retained i in piece, unit u, with that digit}.
// Integer atomics only, so the counts are exact and the same every run.
// Without the 128 KiB of shared counters (GPUs that grant less, launched with
// no dynamic shared memory) every piece counts in global memory.
// One block per SM (the shared counters take most of an SM): the bound lets
// ptxas use more than 32 registers, which avoids spills in the loop.
__global__ void __launch_bounds__(kHistogramThreads, 1)
    histogram_kernel(PieceTable table, int key_bits, int pass_index, const int64_t* prefixes,
                     unsigned long long* histogram, bool shared_counters) {
  extern __shared__ uint32_t shared_words[];
  if (shared_counters) {
    for (int i = threadIdx.x; i < kSharedWords; i += blockDim.x) shared_words[i] = 0;
  }
  __syncthreads();
  for (int64_t s = blockIdx.x; s < table.num_segments; s += gridDim.x) {
    const Segment seg = table.segments[s];
    const Shard shard = table.shards[seg.shard];
    const int64_t unit = unit_of(shard, seg, table.scope);
    const bool use_shared = shared_counters && seg.length >= kSharedHistogramMin;
    // A prefix outside 16 bits matches no key (as on the CPU), never a truncation.
    const int64_t raw_prefix = prefixes[unit];
    const uint32_t prefix =
        raw_prefix >= 0 && raw_prefix <= 0xffff ? uint32_t(raw_prefix) : 0x10000u;
    HistogramVisit visit{key_bits, pass_index, prefix, use_shared ? shared_words : nullptr,
                         histogram + unit * kBins};
    HistogramBody body{shard, seg, visit};
    dispatch_type(shard.type, body);
    if (!use_shared) continue;
    __syncthreads();
    // Flush the non-zero counters and clear them for the next piece.
    for (int i = threadIdx.x; i < kSharedWords; i += blockDim.x) {
      const uint32_t word = shared_words[i];
      if (word == 0) continue;
      shared_words[i] = 0;
      if (word & 0xffffu) atomicAdd(visit.global + 2 * i, (unsigned long long)(word & 0xffffu));
      if (word >> 16) atomicAdd(visit.global + 2 * i + 1, (unsigned long long)(word >> 16));
    }
    __syncthreads();
  }
}

// Radix select of one row on 8-bit digits, most significant first. Level j
// histograms digit j of the retained keys whose higher digits equal the
// prefix chosen so far; the digit where the cumulative count reaches the
// remaining rank k' is appended to the prefix, and the counts of smaller
// digits are added to `below` and taken off k'. After the last level the
// prefix is the k-th smallest key and `below` the number of keys under it.
template <int Type>
struct RowSelect {
  const Shard& shard;
  const Segment& seg;
  int key_bits;
  int level;
  uint32_t prefix;
  unsigned int* counts;  // shared [256]
  unsigned int nonfinite = 0;

  __device__ __forceinline__ void operator()(int64_t, uint32_t raw, bool keep) {
    if (!keep) return;
    const uint32_t key = key_of<Type>(raw, key_bits);
    const int shift = key_bits - 8 * (level + 1);
    if (level == 0) {
      nonfinite += key >= nonfinite_key(key_bits, Type);
    } else if ((key >> (shift + 8)) != prefix) {
      return;
    }
    atomicAdd(counts + ((key >> shift) & 0xffu), 1u);
  }
  __device__ __forceinline__ void flush() {}
};

struct RowSelectBody {
  const Shard& shard;
  const Segment& seg;
  int key_bits, level;
  uint32_t prefix;
  unsigned int* counts;
  unsigned int nonfinite = 0;
  template <int Type>
  __device__ __forceinline__ void operator()() {
    RowSelect<Type> visit{shard, seg, key_bits, level, prefix, counts};
    walk_piece<Type>(shard, seg.begin, seg.length, threadIdx.x, blockDim.x, visit);
    nonfinite = visit.nonfinite;
  }
};

__global__ void __launch_bounds__(kSelectThreads)
    rowwise_kth_kernel(PieceTable table, int key_bits, const int64_t* ks, int64_t* result,
                       int32_t* nonfinite) {
  __shared__ unsigned int counts[256];
  __shared__ uint32_t prefix;
  __shared__ int64_t remaining, below, retained;
  __shared__ unsigned int bad;
  __shared__ bool out_of_range;
  for (int64_t s = blockIdx.x; s < table.num_segments; s += gridDim.x) {
    const Segment seg = table.segments[s];
    const Shard shard = table.shards[seg.shard];
    const int64_t row = unit_of(shard, seg, table.scope);
    const int64_t k = ks[row];
    if (threadIdx.x == 0) {
      prefix = 0;
      remaining = k;
      below = 0;
      bad = 0;
      out_of_range = false;
    }
    const int levels = key_bits / 8;
    for (int level = 0; level < levels; ++level) {
      // level 0 still counts NaN/inf and the row's retained weights
      if ((k == 0 || out_of_range) && level > 0) break;
      for (int i = threadIdx.x; i < 256; i += blockDim.x) counts[i] = 0;
      __syncthreads();
      RowSelectBody body{shard, seg, key_bits, level, prefix, counts};
      dispatch_type(shard.type, body);
      if (body.nonfinite) atomicAdd(&bad, body.nonfinite);
      __syncthreads();
      if (threadIdx.x == 0) {
        if (level == 0) {  // the CPU op's check: 0 <= k <= retained
          retained = 0;
          for (int i = 0; i < 256; ++i) retained += counts[i];
          out_of_range = k < 0 || k > retained;
        }
        int64_t cumulative = 0;
        int digit = 0;
        while (digit < 255 && cumulative + counts[digit] < remaining) cumulative += counts[digit++];
        below += cumulative;
        remaining -= cumulative;
        prefix = (prefix << 8) | uint32_t(digit);
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      result[2 * row] = k > 0 && !out_of_range ? int64_t(prefix) : -1;
      // for a k out of range: the row's retained count, for the message
      result[2 * row + 1] = out_of_range ? retained : (k > 0 ? below : 0);
      nonfinite[row] = bad > 0 ? int32_t(bad) : (out_of_range ? -1 : 0);
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_magnitude_histogram(const PieceTable& table, int key_bits, int pass_index,
                                       const int64_t* prefixes, unsigned long long* histogram,
                                       cudaStream_t stream) {
  if (table.num_segments == 0) return cudaSuccess;
  constexpr int shared_bytes = kSharedWords * sizeof(uint32_t);
  int device = 0, granted = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&granted, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess) return error;
  const bool shared_counters = granted >= shared_bytes;  // 227 KiB on sm_90, 99 KiB on sm_89
  if (shared_counters) {
    error = cudaFuncSetAttribute(histogram_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 shared_bytes);
    if (error != cudaSuccess) return error;
  }
  histogram_kernel<<<grid_for(table.num_segments, 1), kHistogramThreads,
                     shared_counters ? shared_bytes : 0, stream>>>(
      table, key_bits, pass_index, prefixes, histogram, shared_counters);
  return cudaGetLastError();
}

cudaError_t launch_rowwise_kth_key(const PieceTable& table, int key_bits, const int64_t* ks,
                                   int64_t* result, int32_t* nonfinite, cudaStream_t stream) {
  if (table.num_segments == 0) return cudaSuccess;
  rowwise_kth_kernel<<<grid_for(table.num_segments, 8), kSelectThreads, 0, stream>>>(
      table, key_bits, ks, result, nonfinite);
  return cudaGetLastError();
}

}  // namespace sap_kernels::cuda
