// Which vector loops the selection kernels run: the widest this CPU has, or a
// narrower one named by SAP_KERNELS_CPU_ISA (x86-64-v3: AVX2, baseline: the
// portable loops), the variable the power sums read too, so that tests check
// every copy on one machine. Read at each op call (tests set it).
#pragma once
#include <cstdlib>
#include <cstring>

namespace sap_kernels::cpu {

enum class VectorIsa { kBaseline, kAvx2, kAvx512 };

inline VectorIsa vector_isa() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  static const bool avx2 = __builtin_cpu_supports("x86-64-v3");
  const char* forced = std::getenv("SAP_KERNELS_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return VectorIsa::kBaseline;
  const bool narrowed = forced != nullptr && std::strcmp(forced, "x86-64-v3") == 0;
  if (avx512 && !narrowed) return VectorIsa::kAvx512;
  return avx2 ? VectorIsa::kAvx2 : VectorIsa::kBaseline;
}

inline bool use_avx512() {
  return vector_isa() == VectorIsa::kAvx512;
}

}  // namespace sap_kernels::cpu
