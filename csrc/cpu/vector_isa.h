// Which vector loops the CPU kernels (power sums, selection) run: the widest
// this CPU has, or a narrower one named by SAP_KERNELS_CPU_ISA (x86-64-v3:
// AVX2, baseline: the portable loops), so that tests check every copy on one
// machine. Read at each op call (tests set it).
#pragma once
#include <cstdlib>
#include <cstring>

namespace sap_kernels::cpu {

enum class VectorIsa { kBaseline, kAvx2, kAvx512 };

// The AVX-512 and AVX2 loops are compiled for x86-64-v4 and -v3 (target
// attributes), so those levels gate them.
inline VectorIsa vector_isa() {
  static const bool v4 = __builtin_cpu_supports("x86-64-v4");
  static const bool v3 = __builtin_cpu_supports("x86-64-v3");
  const char* forced = std::getenv("SAP_KERNELS_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return VectorIsa::kBaseline;
  const bool narrowed = forced != nullptr && std::strcmp(forced, "x86-64-v3") == 0;
  if (v4 && !narrowed) return VectorIsa::kAvx512;
  return v3 ? VectorIsa::kAvx2 : VectorIsa::kBaseline;
}

inline bool use_avx512() {
  return vector_isa() == VectorIsa::kAvx512;
}

}  // namespace sap_kernels::cpu
