// Torch binding of the CUDA kernels: argument checks (csrc/shards.h), the
// piece table (built on the host, copied to the device in one transfer, kept
// for later calls on the same tensors: piece_tables.h), the current stream,
// and the launchers of kernels.h. Built only where a CUDA
// torch and toolkit exist (setup.py); the kernels themselves need no torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../shards.h"
#include "kernels.h"
#include "piece_tables.h"

namespace sap_kernels::cuda {
namespace {

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

void check_on_cuda(at::TensorList weights, const char* op) {
  TORCH_CHECK_VALUE(weights[0].is_cuda(), op, ": expected CUDA tensors, got ", weights[0].device());
}

// The shard and piece tables (and any extra arrays) packed into one byte
// tensor, copied to the device in one transfer on the current stream.
class DeviceTables {
 public:
  template <class T>
  size_t add(const std::vector<T>& values) {
    const size_t offset = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(offset + values.size() * sizeof(T));
    if (!values.empty())
      std::memcpy(bytes_.data() + offset, values.data(), values.size() * sizeof(T));
    return offset;
  }
  // From pinned memory without blocking: a copy from pageable memory would wait
  // for the stream to drain. The host allocator keeps the pinned block until
  // the copy has run (it records an event on the stream).
  void upload(const at::Device& device) {
    const int64_t size = int64_t(std::max<size_t>(bytes_.size(), 1));
    at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr<uint8_t>(), bytes_.data(), bytes_.size());
    device_ = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(device));
    device_.copy_(host, /*non_blocking=*/true);
    std::vector<uint8_t>().swap(bytes_);
  }
  size_t device_bytes() const { return size_t(device_.nbytes()); }
  template <class T>
  T* pointer(size_t offset) const {
    return reinterpret_cast<T*>(device_.data_ptr<uint8_t>() + offset);
  }

 private:
  std::vector<uint8_t> bytes_;
  at::Tensor device_;
};

// The device guard and current stream of one op call. A stream being captured
// into a CUDA graph is refused: the tables' upload would be recorded as a copy
// from a pinned block that returns to torch's host allocator after the call
// (the graph's replays would read whatever it holds then), and a table cached
// during the capture would be read by later calls before any replay wrote it.
struct Launch {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  Launch(const at::Device& device, const char* op)
      : guard(device), stream(c10::cuda::getCurrentCUDAStream(device.index()).stream()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    check_launch(cudaStreamIsCapturing(stream, &capture), op);
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
                ": cannot run while its stream is captured into a CUDA graph (its tables are "
                "uploaded from host memory per layout); call it outside the capture");
  }
};

// One layout's piece table on the device: the shards, the pieces, each
// unit's first piece and each piece's unit's first piece, in one upload.
struct PieceTables {
  HostPieces pieces;
  DeviceTables device;
  size_t shards = 0, segments = 0, unit_starts = 0, unit_first_piece = 0;

  PieceTable table(int64_t scope) const {
    return PieceTable{device.pointer<const Shard>(shards), device.pointer<const Segment>(segments),
                      count(), int32_t(scope)};
  }
  int64_t count() const { return int64_t(pieces.segments.size()); }
  // Device arrays of int64 for torch ops on the current stream.
  at::Tensor longs(size_t offset, int64_t size, const at::Tensor& like) const {
    return at::from_blob(device.pointer<int64_t>(offset), {size}, like.options().dtype(at::kLong));
  }
};

// Tables kept between calls (a training loop calls with the same tensors
// every step): up to 64 MiB of device tables, the size of a few neuron-scope
// tables of a billion-weight model. Never destroyed: at exit the CUDA
// allocator may be gone before a static would be.
LruCache<PieceTables>& table_cache() {
  static auto* cache = new LruCache<PieceTables>(size_t(64) << 20, 32);
  return *cache;
}

// The piece tables of `table` for the current device and stream (a Launch is
// in scope). Inputs that were not contiguous were copied for this call only:
// their tables are built and not kept.
std::shared_ptr<const PieceTables> piece_tables(const ShardTable& table, int64_t scope,
                                                int64_t max_piece, const at::Device& device) {
  const auto build = [&] {
    PieceTables tables;
    tables.pieces = make_pieces(table.shards, table.num_units, scope, max_piece);
    tables.shards = tables.device.add(table.shards);
    tables.segments = tables.device.add(tables.pieces.segments);
    tables.unit_starts = tables.device.add(tables.pieces.unit_starts);
    tables.unit_first_piece = tables.device.add(tables.pieces.unit_first_piece);
    tables.device.upload(device);
    return tables;
  };
  if (table.has_copies) return std::make_shared<const PieceTables>(build());
  const int64_t stream = c10::cuda::getCurrentCUDAStream(device.index()).id();
  return table_cache().get(
      table_key(table.shards, table.num_units, scope, max_piece, device.index(), stream), build,
      [](const PieceTables& tables) { return tables.device.device_bytes(); });
}

void check_key_bits(const ShardTable& table, int64_t key_bits, const char* op) {
  if (key_bits == 32) return;
  const int32_t type = table.shards[0].type;
  bool same = type != kFloat32;
  for (const Shard& shard : table.shards) same = same && shard.type == type;
  TORCH_CHECK_VALUE(key_bits == 16 && same, op,
                    ": key_bits must be 32, or 16 when every weight is bfloat16 or every weight "
                    "is float16; got ",
                    key_bits);
}

at::Tensor masked_power_sums_cuda(at::TensorList weights, const OptionalTensors& masks, double p,
                                  double q, int64_t scope) {
  constexpr const char* op = "masked_power_sums";
  check_exponents(p, q, op);
  const ShardTable table = make_shard_table(weights, masks, scope, op);
  check_on_cuda(weights, op);
  const at::Device device = weights[0].device();
  Launch launch(device, op);
  const auto tables = piece_tables(table, scope, kPowerSumsPiece, device);

  PowerPlan plan{p, q, classify_power(p), classify_power(q), 0.f, 0.f};
  // Keep max|w|^q within [2^-100, 2^100] in float32, as the CPU kernel does.
  plan.safe_max = float(std::min(std::exp2(100.0 / q), 3.0e38));
  plan.safe_min = float(std::max(std::exp2(-100.0 / q), 1.2e-38));
  const int64_t count = tables->count();
  const auto options = weights[0].options();
  at::Tensor partials = at::empty({std::max<int64_t>(count, 1), 2}, options.dtype(at::kDouble));
  at::Tensor counts = at::zeros({std::max<int64_t>(count, 1), 2}, options.dtype(at::kLong));
  at::Tensor out = at::empty({table.num_units, 3}, options.dtype(at::kDouble));
  check_launch(launch_power_sums(tables->table(scope), plan,
                                 tables->device.pointer<const int64_t>(tables->unit_starts),
                                 table.num_units, partials.data_ptr<double>(),
                                 reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
                                 out.data_ptr<double>(), launch.stream),
               op);
  // One host sync (one reduction, one small copy): then name the first tensor
  // holding a retained NaN/inf.
  const at::Tensor nonfinite = counts.select(1, 1);
  if (nonfinite.amax().item<int64_t>() > 0) {
    const int64_t piece = nonfinite.gt(0).nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": weights[", tables->pieces.segments[piece].shard,
                      "] contains NaN or infinity among its retained weights");
  }
  return out;
}

at::Tensor magnitude_histogram_cuda(at::TensorList weights, const OptionalTensors& masks,
                                    int64_t scope, int64_t key_bits, const at::Tensor& prefixes,
                                    int64_t pass_index) {
  constexpr const char* op = "magnitude_histogram";
  const ShardTable table = make_shard_table(weights, masks, scope, op);
  check_on_cuda(weights, op);
  TORCH_CHECK_VALUE(scope == kGlobal || scope == kLayer, op,
                    ": scope must be 0 (global) or 1 (layer), got ", scope);
  check_key_bits(table, key_bits, op);
  TORCH_CHECK_VALUE(pass_index == 0 || (pass_index == 1 && key_bits == 32), op,
                    ": pass_index must be 0, or 1 with 32-bit keys, got ", pass_index);
  TORCH_CHECK_VALUE(prefixes.numel() >= table.num_units, op, ": prefixes has ", prefixes.numel(),
                    " entries for ", table.num_units, " units");
  const at::Device device = weights[0].device();
  Launch launch(device, op);
  const auto tables = piece_tables(table, scope, kHistogramPiece, device);
  const at::Tensor prefix_values = prefixes.to(device, at::kLong).contiguous();
  at::Tensor histogram = at::zeros({table.num_units, 65536}, weights[0].options().dtype(at::kLong));
  check_launch(
      launch_magnitude_histogram(
          tables->table(scope), int(key_bits), int(pass_index), prefix_values.data_ptr<int64_t>(),
          reinterpret_cast<unsigned long long*>(histogram.data_ptr<int64_t>()), launch.stream),
      op);
  return histogram;
}

at::Tensor rowwise_kth_key_cuda(at::TensorList weights, const OptionalTensors& masks,
                                int64_t key_bits, const at::Tensor& ks) {
  constexpr const char* op = "rowwise_kth_key";
  const ShardTable table = make_shard_table(weights, masks, kNeuron, op);
  check_on_cuda(weights, op);
  check_key_bits(table, key_bits, op);
  TORCH_CHECK_VALUE(ks.numel() == table.num_units, op, ": ks has ", ks.numel(), " entries for ",
                    table.num_units, " rows");
  const at::Device device = weights[0].device();
  Launch launch(device, op);
  // One piece per non-empty row: the select needs the whole row in one block.
  const auto tables = piece_tables(table, kNeuron, std::numeric_limits<int64_t>::max(), device);
  const at::Tensor k_values = ks.to(device, at::kLong).contiguous();
  const auto options = weights[0].options().dtype(at::kLong);
  at::Tensor result = at::empty({table.num_units, 2}, options);
  result.select(1, 0).fill_(-1);
  result.select(1, 1).zero_();
  at::Tensor nonfinite = at::zeros({table.num_units}, options.dtype(at::kInt));
  check_launch(launch_rowwise_kth_key(tables->table(kNeuron), int(key_bits),
                                      k_values.data_ptr<int64_t>(), result.data_ptr<int64_t>(),
                                      nonfinite.data_ptr<int32_t>(), launch.stream),
               op);
  // Rows of length 0 get no piece, hence no kernel check: only k = 0 is valid there.
  for (size_t s = 0; s < table.shards.size(); ++s) {
    const Shard& shard = table.shards[s];
    const int64_t end =
        s + 1 < table.shards.size() ? table.shards[s + 1].first_unit : table.num_units;
    if (shard.numel == 0 && end > shard.first_unit) {
      nonfinite.slice(0, shard.first_unit, end)
          .masked_fill_(k_values.slice(0, shard.first_unit, end).ne(0), -1);
    }
  }
  // nonfinite[row] > 0: retained NaN/inf; -1: ks[row] outside 0..retained (the
  // kernel then put the row's retained count in result[row][1]).
  const at::Tensor bad = nonfinite.ne(0).nonzero();
  if (bad.size(0) > 0) {
    const int64_t row = bad[0][0].item<int64_t>();
    size_t shard = 0;
    while (shard + 1 < table.shards.size() && table.shards[shard + 1].first_unit <= row) ++shard;
    TORCH_CHECK_VALUE(nonfinite[row].item<int32_t>() < 0, op, ": weights[", shard,
                      "] contains NaN or infinity among its retained weights");
    const int64_t retained = result[row][1].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": ks[", row, "] = ", k_values[row].item<int64_t>(),
                      " is out of range: that row (in weights[", shard, "]) has ", retained,
                      " retained weights (allowed: 0..", retained, ")");
  }
  return result;
}

// The CPU op's checks, with one copy to the host before any mask is written:
// thresholds are keys (<= 32 bits), quotas >= 0 and at most the unit's ties
// (equal_counts summed over the unit's pieces; counted where quota > 0).
void check_prune_arguments(const at::Tensor& thresholds, const at::Tensor& quotas,
                           const at::Tensor& equal_counts, const at::Tensor& starts,
                           const char* op) {
  const at::Tensor inclusive =
      at::cat({at::zeros({1}, equal_counts.options()), at::cumsum(equal_counts, 0)});
  const int64_t units = starts.numel() - 1;
  const at::Tensor ties = inclusive.index_select(0, starts.slice(0, 1)) -
                          inclusive.index_select(0, starts.slice(0, 0, units));
  const at::Tensor active = thresholds.ge(0);
  const at::Tensor bad_key = thresholds.gt(int64_t(0xffffffffLL));
  const at::Tensor negative = quotas.lt(0);
  const at::Tensor too_many =
      active.logical_and(quotas.gt(ties)).logical_and(bad_key.logical_not());
  const at::Tensor any_bad =
      at::stack({bad_key.any(), negative.any(), too_many.any()}).cpu();  // the one sync
  const bool* flags = any_bad.data_ptr<bool>();
  if (!(flags[0] || flags[1] || flags[2])) return;
  const auto first = [](const at::Tensor& where) { return where.nonzero()[0][0].item<int64_t>(); };
  if (flags[0]) {
    const int64_t u = first(bad_key);
    TORCH_CHECK_VALUE(false, op, ": threshold_keys[", u, "] = ", thresholds[u].item<int64_t>(),
                      " is not a valid key");
  }
  if (flags[1]) {
    const int64_t u = first(negative);
    TORCH_CHECK_VALUE(false, op, ": remove_equal[", u, "] = ", quotas[u].item<int64_t>(),
                      " is negative");
  }
  const int64_t u = first(too_many);
  TORCH_CHECK_VALUE(false, op, ": remove_equal[", u, "] = ", quotas[u].item<int64_t>(),
                    " exceeds the ", ties[u].item<int64_t>(),
                    " retained weights equal to threshold_keys[", u, "]");
}

// Writes the pruned masks to output_pointers[i] (one bool array per weight,
// laid out like the contiguous weight). An output may be the weight's own mask:
// each element's mask is read and written by the same thread, in one tile.
void prune_into(at::TensorList weights, const ShardTable& table, int64_t scope, int64_t key_bits,
                const at::Tensor& threshold_keys, const at::Tensor& remove_equal,
                const std::vector<uint8_t*>& output_pointers, const char* op) {
  const at::Device device = weights[0].device();
  Launch launch(device, op);
  const auto tables = piece_tables(table, scope, kPrunePiece, device);
  const int64_t count = tables->count();
  // The outputs are new masks on most calls: their table is not cached.
  DeviceTables outputs;
  const size_t output_table = outputs.add(output_pointers);
  outputs.upload(device);
  const auto long_options = weights[0].options().dtype(at::kLong);
  const PieceTable pieces_on_device = tables->table(scope);
  const at::Tensor thresholds = threshold_keys.to(device, at::kLong).contiguous();
  const at::Tensor quotas = remove_equal.to(device, at::kLong).contiguous();
  at::Tensor equal_counts = at::empty({count}, long_options);
  check_launch(launch_count_equal(pieces_on_device, int(key_bits), thresholds.data_ptr<int64_t>(),
                                  quotas.data_ptr<int64_t>(), equal_counts.data_ptr<int64_t>(),
                                  launch.stream),
               op);
  // Equal keys before each piece inside its unit: an exclusive scan (integer,
  // so deterministic) restarted at each unit's first piece.
  const at::Tensor exclusive = at::cumsum(equal_counts, 0) - equal_counts;
  const at::Tensor first = tables->longs(tables->unit_first_piece, count, equal_counts);
  const at::Tensor equal_before = (exclusive - exclusive.index_select(0, first)).contiguous();
  const at::Tensor starts = tables->longs(tables->unit_starts, table.num_units + 1, equal_counts);
  check_prune_arguments(thresholds, quotas, equal_counts, starts, op);
  if (count == 0) return;
  check_launch(launch_prune_masks(pieces_on_device, int(key_bits), thresholds.data_ptr<int64_t>(),
                                  quotas.data_ptr<int64_t>(), equal_before.data_ptr<int64_t>(),
                                  outputs.pointer<uint8_t* const>(output_table), launch.stream),
               op);
}

ShardTable checked_prune_table(at::TensorList weights, const OptionalTensors& masks, int64_t scope,
                               int64_t key_bits, const at::Tensor& threshold_keys,
                               const at::Tensor& remove_equal, const char* op) {
  ShardTable table = make_shard_table(weights, masks, scope, op);
  check_on_cuda(weights, op);
  check_key_bits(table, key_bits, op);
  TORCH_CHECK_VALUE(threshold_keys.numel() == table.num_units, op, ": threshold_keys has ",
                    threshold_keys.numel(), " entries for ", table.num_units, " units");
  TORCH_CHECK_VALUE(remove_equal.numel() == table.num_units, op, ": remove_equal has ",
                    remove_equal.numel(), " entries for ", table.num_units, " units");
  return table;
}

std::vector<at::Tensor> prune_masks_cuda(at::TensorList weights, const OptionalTensors& masks,
                                         int64_t scope, int64_t key_bits,
                                         const at::Tensor& threshold_keys,
                                         const at::Tensor& remove_equal) {
  constexpr const char* op = "prune_masks";
  const ShardTable table =
      checked_prune_table(weights, masks, scope, key_bits, threshold_keys, remove_equal, op);
  std::vector<at::Tensor> outputs;
  std::vector<uint8_t*> output_pointers;
  for (const at::Tensor& w : weights) {
    outputs.push_back(at::empty(w.sizes(), w.options().dtype(at::kBool)));
    output_pointers.push_back(reinterpret_cast<uint8_t*>(outputs.back().data_ptr<bool>()));
  }
  prune_into(weights, table, scope, key_bits, threshold_keys, remove_equal, output_pointers, op);
  // Masks with the weights' strides, as the fake (empty_like) promises.
  for (size_t i = 0; i < weights.size(); ++i) {
    if (weights[i].is_contiguous()) continue;
    at::Tensor like = at::empty_like(weights[i], weights[i].options().dtype(at::kBool));
    if (!like.is_contiguous()) outputs[i] = like.copy_(outputs[i]);
  }
  return outputs;
}

// prune_masks written over the masks. Every check runs before the first write,
// and the kernels cannot fail on valid input, so an error changes nothing.
void prune_masks_in_place_cuda(at::TensorList weights, at::TensorList masks, int64_t scope,
                               int64_t key_bits, const at::Tensor& threshold_keys,
                               const at::Tensor& remove_equal) {
  constexpr const char* op = "prune_masks_";
  TORCH_CHECK_VALUE(masks.size() == weights.size(), op, ": got ", masks.size(), " masks for ",
                    weights.size(), " weights");
  OptionalTensors mask_list;
  for (const at::Tensor& mask : masks) mask_list.push_back(mask);
  const ShardTable table =
      checked_prune_table(weights, mask_list, scope, key_bits, threshold_keys, remove_equal, op);
  check_masks_in_place(masks, op);
  std::vector<uint8_t*> output_pointers;
  for (const at::Tensor& mask : masks)
    output_pointers.push_back(reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()));
  prune_into(weights, table, scope, key_bits, threshold_keys, remove_equal, output_pointers, op);
}

void apply_masks_cuda(at::TensorList weights, at::TensorList masks) {
  constexpr const char* op = "apply_masks_";
  TORCH_CHECK_VALUE(masks.size() == weights.size(), op, ": got ", masks.size(), " masks for ",
                    weights.size(), " weights");
  // Zero non-contiguous weights in a contiguous copy, then copy it back.
  std::vector<at::Tensor> targets;
  OptionalTensors mask_list;
  for (size_t i = 0; i < weights.size(); ++i) {
    targets.push_back(weights[i].is_contiguous() ? weights[i] : weights[i].contiguous());
    mask_list.push_back(masks[i]);
  }
  ShardTable table = make_shard_table(targets, mask_list, kGlobal, op);
  for (const at::Tensor& w : weights) table.has_copies = table.has_copies || !w.is_contiguous();
  check_on_cuda(weights, op);
  const at::Device device = weights[0].device();
  Launch launch(device, op);
  const auto tables = piece_tables(table, kGlobal, kPrunePiece, device);
  check_launch(launch_apply_masks(tables->table(kGlobal), launch.stream), op);
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!weights[i].is_contiguous()) weights[i].copy_(targets[i]);
  }
}

}  // namespace

std::vector<int64_t> table_cache_stats() {
  const auto stats = table_cache().stats();
  return {stats.hits, stats.misses, stats.entries, stats.bytes};
}

void clear_table_cache() {
  table_cache().clear();
}

TORCH_LIBRARY_IMPL(sap_kernels, CUDA, m) {
  m.impl("masked_power_sums", &masked_power_sums_cuda);
  m.impl("magnitude_histogram", &magnitude_histogram_cuda);
  m.impl("rowwise_kth_key", &rowwise_kth_key_cuda);
  m.impl("prune_masks", &prune_masks_cuda);
  m.impl("prune_masks_", &prune_masks_in_place_cuda);
  m.impl("apply_masks_", &apply_masks_cuda);
}

}  // namespace sap_kernels::cuda
