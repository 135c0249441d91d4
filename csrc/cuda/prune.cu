// Tie-aware mask update and in-place mask application on CUDA.
//
// prune_masks removes, per unit u with threshold t = threshold_keys[u] >= 0,
// every retained key < t and the first remove_equal[u] retained keys == t in
// flat order. Pass 1 counts the equal keys per piece; the binding scans those
// counts into equal_before[piece]; pass 2 ranks the equal keys inside a piece
// with a block-wide exclusive scan, tile by tile in flat order.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace sap_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // consecutive elements per thread per tile
constexpr int kTile = kThreads * kItems;

template <int Type>
__device__ __forceinline__ uint32_t load_key(const Shard& shard, int64_t i, int key_bits) {
  return key_of<Type>(uint32_t(static_cast<const RawOf<Type>*>(shard.data)[i]), key_bits);
}

__device__ __forceinline__ bool load_keep(const Shard& shard, int64_t i) {
  return shard.mask == nullptr || shard.mask[i];
}

template <int Type>
struct EqualCount {
  int key_bits;
  uint32_t threshold;
  unsigned long long count = 0;
  __device__ __forceinline__ void operator()(int64_t, uint32_t raw, bool keep) {
    count += keep && key_of<Type>(raw, key_bits) == threshold;
  }
  __device__ __forceinline__ void flush() {}
};

struct EqualCountBody {
  const Shard& shard;
  const Segment& seg;
  int key_bits;
  uint32_t threshold;
  unsigned long long count = 0;
  template <int Type>
  __device__ __forceinline__ void operator()() {
    EqualCount<Type> visit{key_bits, threshold};
    walk_piece<Type>(shard, seg.begin, seg.length, threadIdx.x, blockDim.x, visit);
    count = visit.count;
  }
};

// equal_counts[s] = #{retained i in piece s : key_i == threshold_keys[unit]}.
__global__ void __launch_bounds__(kThreads)
    count_equal_kernel(PieceTable table, int key_bits, const int64_t* threshold_keys,
                       const int64_t* remove_equal, int64_t* equal_counts) {
  using CountReduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename CountReduce::TempStorage scratch;
  for (int64_t s = blockIdx.x; s < table.num_segments; s += gridDim.x) {
    const Segment seg = table.segments[s];
    const Shard shard = table.shards[seg.shard];
    const int64_t unit = unit_of(shard, seg, table.scope);
    const int64_t threshold = threshold_keys[unit];
    // (a threshold above 32 bits is refused by the binding before pass 2)
    if (threshold < 0 || threshold > 0xffffffffLL || remove_equal[unit] <= 0) {
      if (threadIdx.x == 0) equal_counts[s] = 0;
      continue;
    }
    EqualCountBody body{shard, seg, key_bits, uint32_t(threshold)};
    dispatch_type(shard.type, body);
    const unsigned long long total = CountReduce(scratch).Sum(body.count);
    __syncthreads();
    if (threadIdx.x == 0) equal_counts[s] = int64_t(total);
  }
}

struct PruneBody {
  const Shard& shard;
  const Segment& seg;
  int key_bits;
  int64_t threshold, quota, seen;
  uint8_t* out;
  typename cub::BlockScan<int, kThreads>::TempStorage& scan;

  // Tile by tile in flat order: thread t owns elements t*kItems .. +kItems-1
  // of the tile, so an exclusive scan of the threads' equal counts gives
  // each equal key's rank within the tile.
  template <int Type>
  __device__ __forceinline__ void operator()() {
    const bool active = threshold >= 0;
    for (int64_t tile = 0; tile < seg.length; tile += kTile) {
      bool keep[kItems], equal[kItems], below[kItems];
      int equal_here = 0;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = tile + threadIdx.x * kItems + j;
        keep[j] = equal[j] = below[j] = false;
        if (i < seg.length) {
          keep[j] = load_keep(shard, seg.begin + i);
          const int64_t key = load_key<Type>(shard, seg.begin + i, key_bits);
          equal[j] = active && keep[j] && key == threshold;
          below[j] = active && key < threshold;
          equal_here += equal[j];
        }
      }
      int rank_in_tile, tile_equal;
      cub::BlockScan<int, kThreads>(scan).ExclusiveSum(equal_here, rank_in_tile, tile_equal);
      __syncthreads();
      int64_t rank = seen + rank_in_tile;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = tile + threadIdx.x * kItems + j;
        if (i >= seg.length) continue;
        const bool removed = below[j] || (equal[j] && rank < quota);
        rank += equal[j];
        out[seg.begin + i] = uint8_t(keep[j] && !removed);
      }
      seen += tile_equal;
    }
  }
};

__global__ void __launch_bounds__(kThreads)
    prune_kernel(PieceTable table, int key_bits, const int64_t* threshold_keys,
                 const int64_t* remove_equal, const int64_t* equal_before,
                 uint8_t* const* outputs) {
  __shared__ typename cub::BlockScan<int, kThreads>::TempStorage scan;
  for (int64_t s = blockIdx.x; s < table.num_segments; s += gridDim.x) {
    const Segment seg = table.segments[s];
    const Shard shard = table.shards[seg.shard];
    const int64_t unit = unit_of(shard, seg, table.scope);
    PruneBody body{shard,
                   seg,
                   key_bits,
                   threshold_keys[unit],
                   remove_equal[unit],
                   equal_before[s],
                   outputs[seg.shard],
                   scan};
    dispatch_type(shard.type, body);
  }
}

// w_i = +0 where m_i is false: the weight bits are overwritten (a pruned NaN
// cannot survive as it would with w * m), and only the masks are read.
__global__ void __launch_bounds__(kThreads) apply_masks_kernel(PieceTable table) {
  for (int64_t s = blockIdx.x; s < table.num_segments; s += gridDim.x) {
    const Segment seg = table.segments[s];
    const Shard shard = table.shards[seg.shard];
    const bool* mask = shard.mask + seg.begin;
    // The binding passes the weights' own (mutable) storage as shard.data.
    if (shard.type == kFloat32) {
      uint32_t* data = static_cast<uint32_t*>(const_cast<void*>(shard.data)) + seg.begin;
      for (int64_t i = threadIdx.x; i < seg.length; i += blockDim.x)
        if (!mask[i]) data[i] = 0u;
    } else {
      uint16_t* data = static_cast<uint16_t*>(const_cast<void*>(shard.data)) + seg.begin;
      for (int64_t i = threadIdx.x; i < seg.length; i += blockDim.x)
        if (!mask[i]) data[i] = 0u;
    }
  }
}

}  // namespace

cudaError_t launch_count_equal(const PieceTable& table, int key_bits, const int64_t* threshold_keys,
                               const int64_t* remove_equal, int64_t* equal_counts,
                               cudaStream_t stream) {
  if (table.num_segments == 0) return cudaSuccess;
  count_equal_kernel<<<grid_for(table.num_segments, 8), kThreads, 0, stream>>>(
      table, key_bits, threshold_keys, remove_equal, equal_counts);
  return cudaGetLastError();
}

cudaError_t launch_prune_masks(const PieceTable& table, int key_bits, const int64_t* threshold_keys,
                               const int64_t* remove_equal, const int64_t* equal_before,
                               uint8_t* const* outputs, cudaStream_t stream) {
  if (table.num_segments == 0) return cudaSuccess;
  prune_kernel<<<grid_for(table.num_segments, 8), kThreads, 0, stream>>>(
      table, key_bits, threshold_keys, remove_equal, equal_before, outputs);
  return cudaGetLastError();
}

cudaError_t launch_apply_masks(const PieceTable& table, cudaStream_t stream) {
  if (table.num_segments == 0) return cudaSuccess;
  apply_masks_kernel<<<grid_for(table.num_segments, 8), kThreads, 0, stream>>>(table);
  return cudaGetLastError();
}

}  // namespace sap_kernels::cuda
