// Argument handling shared by the CPU selection kernels (selection.cpp, prune_masks.cpp,
// sample_select.cpp).
#pragma once
#include <ATen/ATen.h>
#include <sys/mman.h>

#include <vector>

#include "../shards.h"

namespace sap_kernels::cpu {

// The shard table of a selection op, with its device and key_bits checks.
inline ShardTable checked_table(at::TensorList weights,
                                const c10::List<std::optional<at::Tensor>>& masks, int64_t scope,
                                int64_t key_bits, const char* op) {
  ShardTable table = make_shard_table(weights, masks, scope, op);
  TORCH_CHECK_VALUE(weights[0].device().is_cpu(), op, ": expected CPU tensors, got ",
                    weights[0].device());
  TORCH_CHECK_VALUE(key_bits == 16 || key_bits == 32, op, ": key_bits must be 16 or 32, got ",
                    key_bits);
  for (size_t i = 0; key_bits == 16 && i < table.shards.size(); ++i) {
    const int32_t type = table.shards[i].type;
    TORCH_CHECK_VALUE(type != kFloat32 && type == table.shards[0].type, op,
                      ": key_bits=16 needs every weight to be bfloat16 or every weight ",
                      "float16, but weights[", i, "] is ", weights[i].scalar_type(),
                      " and weights[0] is ", weights[0].scalar_type());
  }
  return table;
}

// A 1-d int64 CPU tensor with one entry per unit.
inline at::Tensor per_unit_values(const at::Tensor& values, int64_t units, const char* op,
                                  const char* name) {
  TORCH_CHECK_VALUE(values.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
                    values.device());
  TORCH_CHECK_TYPE(
      !values.is_floating_point() && !values.is_complex() && values.scalar_type() != at::kBool, op,
      ": ", name, " must hold integers, got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == units, op, ": ", name,
                    " must have shape [", units, "] (one entry per unit), got ", values.sizes());
  return values.to(at::kLong).contiguous();
}

// New masks are first touched by the kernel. Where transparent huge pages are
// on request (the "madvise" mode), asking for them turns 512 page faults into
// one: on a 1 GB model the faults of 4 KiB pages cost as much as the pass.
inline void advise_huge_pages(void* data, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const uintptr_t first = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(data) + uintptr_t(bytes)) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// Uninitialised row-major bool masks shaped like the weights, for a kernel to
// fill; large ones are advised onto huge pages.
inline std::vector<at::Tensor> new_contiguous_masks(at::TensorList weights) {
  std::vector<at::Tensor> outs;
  outs.reserve(weights.size());
  for (const at::Tensor& w : weights) {
    outs.push_back(at::empty(w.sizes(), w.options().dtype(at::kBool)));
    if (w.numel() >= (int64_t(4) << 20)) advise_huge_pages(outs.back().data_ptr(), w.numel());
  }
  return outs;
}

}  // namespace sap_kernels::cpu
