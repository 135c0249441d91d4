// Operator schemas for sap_kernels, defined once. Each backend registers its
// kernels in its own file with TORCH_LIBRARY_IMPL; fakes live in
// sap_kernels/ops.py.
//
// Conventions shared by every op:
//   weights: float32 / bfloat16 / float16 tensors of any shape on one device.
//   masks:   one optional bool tensor per weight (same shape); True = retained.
//   scope:   0 = global (one unit), 1 = layer (one unit per tensor),
//            2 = neuron (one unit per row of each tensor viewed as (size(0), -1)).
//   keys:    the bit pattern of |w| as float32 (key_bits = 32) or, when every
//            tensor is bfloat16 or every tensor is float16, as that 16-bit type
//            (key_bits = 16). Keys order exactly like magnitudes.
#include <torch/extension.h>
#include <torch/library.h>

// Every op copies its shard table to the device and most read a result back
// (to raise on NaN or infinity), so none can be captured in a CUDA graph;
// the tag makes torch.compile(mode="reduce-overhead") run them outside one.
static const std::vector<at::Tag> kTags = {at::Tag::cudagraph_unsafe};

TORCH_LIBRARY(sap_kernels, m) {
  // float64 [units, 3]: (S_p, S_q, d) with S_r = sum over retained |w|^r and d
  // the retained count. Raises if a retained weight is NaN or infinite.
  m.def(
      "masked_power_sums(Tensor[] weights, Tensor?[] masks, float p, float q, "
      "int scope) -> Tensor",
      kTags);
  // int64 [units, 65536]: histogram of 16-bit digits of the keys of retained
  // weights. pass_index 0 bins the high 16 bits (or the whole 16-bit key);
  // pass_index 1 bins the low 16 bits of keys whose high 16 bits equal
  // prefixes[unit]. scope is 0 or 1.
  m.def(
      "magnitude_histogram(Tensor[] weights, Tensor?[] masks, int scope, "
      "int key_bits, Tensor prefixes, int pass_index) -> Tensor",
      kTags);
  // int64 [rows, 2] for the neuron scope: (key of the ks[row]-th smallest
  // retained magnitude of the row, number of retained keys below it);
  // (-1, 0) where ks[row] == 0. ks must lie in [0, retained count of the row].
  m.def(
      "rowwise_kth_key(Tensor[] weights, Tensor?[] masks, int key_bits, "
      "Tensor ks) -> Tensor",
      kTags);
  // int64 [units, 4] for the global (0) or layer (1) scope, on CPU: per unit
  // (key of the k-th smallest retained magnitude, retained keys below it,
  // retained count, retained non-finite count), found in one pass over the
  // weights after bracketing the keys with a sample of sample_size keys.
  // key = -1 when k == 0, k is out of range or a retained weight is NaN or
  // infinite; key = -2 when the sample missed (the caller then uses
  // magnitude_histogram). k has one entry per unit.
  m.def(
      "kth_key_by_sample(Tensor[] weights, Tensor?[] masks, int scope, int key_bits, Tensor k, "
      "int sample_size) -> Tensor",
      kTags);
  // prune_masks for the global or layer scope on CPU in one pass, choosing the
  // thresholds as kth_key_by_sample does (k = count): new contiguous bool
  // masks with each unit's count retained weights of smallest magnitude
  // removed (ties in flat order), and that op's int64 [units, 4] status. A
  // unit with count 0 keeps its mask; where a unit's status key is -2 (a miss)
  // or -1 with count > 0 (out of range, NaN or infinity), the masks are
  // undefined.
  m.def(
      "prune_masks_by_sample(Tensor[] weights, Tensor?[] masks, int scope, int key_bits, "
      "Tensor count, int sample_size) -> (Tensor[], Tensor)",
      kTags);
  // prune_masks_by_sample in place: updates masks (one contiguous bool tensor
  // per weight, none sharing memory) and returns the status. Where any unit
  // fails (a miss, count out of range, NaN or infinity), every mask is left
  // as it was.
  m.def(
      "prune_masks_by_sample_(Tensor[] weights, Tensor(a!)[] masks, int scope, int key_bits, "
      "Tensor count, int sample_size) -> Tensor",
      kTags);
  // New bool masks: retained weights with key < threshold_keys[unit] are
  // removed, and so are the first remove_equal[unit] retained weights with
  // key == threshold_keys[unit] in flat order. threshold_keys < 0 removes
  // nothing from that unit.
  m.def(
      "prune_masks(Tensor[] weights, Tensor?[] masks, int scope, int key_bits, "
      "Tensor threshold_keys, Tensor remove_equal) -> Tensor[]",
      kTags);
  // prune_masks written over masks (one contiguous bool tensor per weight,
  // none sharing memory); on an error every mask is left as it was.
  m.def(
      "prune_masks_(Tensor[] weights, Tensor(a!)[] masks, int scope, int key_bits, "
      "Tensor threshold_keys, Tensor remove_equal) -> ()",
      kTags);
  // Neuron scope, over masks (as prune_masks_): each row r loses its counts[r]
  // smallest retained |w| (earlier weights first among equals), found and
  // removed in one pass; the same masks as rowwise_kth_key(ks = counts) then
  // prune_masks_. On an error every mask is left as it was. CPU only.
  m.def("prune_rows_(Tensor[] weights, Tensor(a!)[] masks, int key_bits, Tensor counts) -> ()",
        kTags);
  // weights[i] *= masks[i] for every shard, in one pass.
  m.def("apply_masks_(Tensor(a!)[] weights, Tensor[] masks) -> ()", kTags);
}

namespace sap_kernels {
// csrc/tensor_list_summary.cpp: the API's one-pass argument facts.
void define_tensor_list_summary(pybind11::module_& module);
}  // namespace sap_kernels

#ifdef SAP_KERNELS_WITH_CUDA
namespace sap_kernels::cuda {
// csrc/cuda/binding.cpp: the CUDA ops' cache of device piece tables.
std::vector<int64_t> table_cache_stats();  // hits, misses, entries, bytes
void clear_table_cache();
}  // namespace sap_kernels::cuda
#endif

// The Python module anchors the shared library (every op is reached through
// torch.ops.sap_kernels), gives the API its argument facts and, in CUDA
// builds, reaches the table cache.
PYBIND11_MODULE(_C, module) {
  module.doc() = "sap_kernels compiled kernels (see torch.ops.sap_kernels)";
  sap_kernels::define_tensor_list_summary(module);
#ifdef SAP_KERNELS_WITH_CUDA
  module.def("cuda_table_cache_stats", &sap_kernels::cuda::table_cache_stats,
             "[hits, misses, entries, bytes] of the CUDA ops' piece-table cache");
  module.def("clear_cuda_table_cache", &sap_kernels::cuda::clear_table_cache,
             "Drops every cached CUDA piece table");
#endif
}
