// Plain types shared by the CPU and CUDA kernels. No torch headers: the CUDA
// kernels include this from .cu files that build with the CUDA toolkit alone.
#pragma once
#include <cstdint>

namespace sap_kernels {

enum Scope : int64_t { kGlobal = 0, kLayer = 1, kNeuron = 2 };
enum WeightType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Bytes per weight of a WeightType.
constexpr int64_t weight_bytes(int32_t type) {
  return type == kFloat32 ? 4 : 2;
}

// One weight tensor, flattened and contiguous.
struct Shard {
  const void* data;
  const bool* mask;  // nullptr: every weight retained
  int64_t numel;
  int64_t row_length;  // numel / size(0), at least 1
  int64_t first_unit;  // unit of element 0 (row 0 in neuron scope)
  int32_t type;        // WeightType
};

// Elements [begin, begin + length) of shard `shard`, all in one unit unless
// the scope is neuron, where a segment holds whole rows.
struct Segment {
  int64_t begin;
  int64_t length;
  int32_t shard;
};

// Power exponents with a cheaper exact form than exp2(r * log2 |w|).
enum PowerKind : int32_t { kPowHalf = 0, kPowOne = 1, kPowTwo = 2, kPowInt = 3, kPowGeneral = 4 };

inline PowerKind classify_power(double r) {
  if (r == 0.5) return kPowHalf;
  if (r == 1.0) return kPowOne;
  if (r == 2.0) return kPowTwo;
  if (r >= 3.0 && r <= 15.0 && r == static_cast<double>(static_cast<int>(r))) return kPowInt;
  return kPowGeneral;
}

}  // namespace sap_kernels
