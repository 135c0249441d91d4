// The block kernels of masked_power_sums, included by power_sums.cpp once per
// instruction set (x86-64-v4, -v3, baseline) under `#pragma GCC target`, each
// copy in its own namespace SAP_KERNELS_ISA. No include guard on purpose.
//
// Why not target_clones: in a target_clones function's AVX-512 clone, GCC 12
// vectorised the inlined loops that mix element widths (uint8 masks, 16-bit
// weights) with 128-bit vectors; functions defined under a target pragma get
// full-width vectors. Explicit copies can also be chosen by a test
// (SAP_KERNELS_CPU_ISA), so every copy is checked on one machine.

namespace SAP_KERNELS_ISA {
namespace {

// The 16 lanes of a block sum live in kParts registers of kWidth float32
// lanes: one zmm in the x86-64-v4 copy, two ymm in -v3, four xmm in the
// baseline (SAP_KERNELS_VECTOR_WIDTH is set per copy). Lane j * kWidth + l is
// lane l of part j, so every copy adds the same terms in the same order. The
// lane functions are inlined, so no vector crosses a call (setup.py silences
// -Wpsabi).
constexpr int kWidth = SAP_KERNELS_VECTOR_WIDTH;
constexpr int kParts = kLanes / kWidth;
using Lanes = float __attribute__((vector_size(4 * kWidth)));
using LaneInts = int32_t __attribute__((vector_size(4 * kWidth)));
using LaneHalves = uint16_t __attribute__((vector_size(2 * kWidth)));

// x in every lane of V (V a scalar or a GCC vector of x's type).
template <class V, class Scalar>
SAP_INLINE V splat(Scalar x) {
  if constexpr (std::is_arithmetic_v<V>) {
    return x;
  } else {
    return V{} + x;
  }
}

// kWidth mask bytes (0 or 1, as the other kernels read them) as lanes: -1
// retained, 0 pruned. One vpmovzxbd where the copy has it: GCC 12 turns a
// uint8 -> int32 __builtin_convertvector into scalar code.
SAP_INLINE LaneInts kept_lanes(const uint8_t* mask) {
  LaneInts bytes;
#if SAP_KERNELS_VECTOR_WIDTH == 16
  // The maskz form: GCC 12's _mm512_cvtepu8_epi32 trips -Wmaybe-uninitialized.
  const __m512i widened = _mm512_maskz_cvtepu8_epi32(
      __mmask16(0xffff), _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask)));
  std::memcpy(&bytes, &widened, sizeof(bytes));
#elif SAP_KERNELS_VECTOR_WIDTH == 8
  const __m256i widened =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask)));
  std::memcpy(&bytes, &widened, sizeof(bytes));
#else
  for (int l = 0; l < kWidth; ++l) bytes[l] = mask[l];
#endif
  return -bytes;
}

SAP_INLINE float sqrt_each(float v) {
  return __builtin_sqrtf(v);
}
SAP_INLINE Lanes sqrt_each(Lanes v) {
  Lanes root;
  for (int l = 0; l < kWidth; ++l) root[l] = __builtin_sqrtf(v[l]);  // one (v)sqrtps
  return root;
}

// The exponents with exact lane-wise forms work on a float or on Lanes.
struct PowHalf {
  template <class V>
  SAP_INLINE V operator()(V v) const {
    return sqrt_each(v);
  }
};
struct PowOne {
  template <class V>
  SAP_INLINE V operator()(V v) const {
    return v;
  }
};
struct PowTwo {
  template <class V>
  SAP_INLINE V operator()(V v) const {
    return v * v;
  }
};
// Integer exponent 3..15 by square-and-multiply with a fixed trip count, so
// the loop stays branch-free and vectorises.
struct PowInt {
  int n;
  template <class V>
  SAP_INLINE V operator()(V v) const {
    V result = splat<V>(1.f), base = v;
    int e = n;
    for (int k = 0; k < 4; ++k) {
      result = (e & 1) ? result * base : result;
      base *= base;
      e >>= 1;
    }
    return result;
  }
};
// |w|^r = 2^(r log2|w|) for any r > 0, in float32 lanes. log2 of the
// mantissa m in [sqrt(1/2), sqrt(2)) from the atanh series in
// t = (m-1)/(m+1) (|t| < 0.172, truncation < 1e-9). y = r*e + r*log2(m) is
// kept as an unevaluated sum (the product r*e is split exactly with an FMA),
// so the fraction f = y - rint(y) carries no error from the exponent's size;
// 2^f for |f| <= 1/2 from its degree-7 Taylor polynomial (truncation < 3e-9).
// Measured bias against float64 pow: below 1e-8 relative. |w| = 0 gives 0.
// log2|w| = exponent + log2(m), returned as its two parts.
SAP_INLINE void log2_parts(float v, float& exponent_out, float& log2_m_out) {
  uint32_t bits = bits_as<uint32_t>(v);
  const bool subnormal = bits < 0x00800000u;
  bits = subnormal ? bits_as<uint32_t>(v * 0x1p23f) : bits;
  int32_t exponent = int32_t(bits >> 23) - (subnormal ? 150 : 127);
  float m = bits_as<float>((bits & 0x7fffffu) | 0x3f800000u);
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  exponent += high ? 1 : 0;
  const float t = (m - 1.f) / (m + 1.f);
  const float t2 = t * t;
  // 2/ln2 * (t + t^3/3 + t^5/5 + t^7/7 + t^9/9)
  log2_m_out =
      t * (2.88539008f +
           t2 * (0.96179669f + t2 * (0.57707802f + t2 * (0.41219859f + t2 * 0.32059890f))));
  exponent_out = float(exponent);
}

// 2^(r * (e + log2_m)) with r = r_high + r_low.
SAP_INLINE float exp2_scaled(float r_high, float r_low, float e, float log2_m) {
  const float y_high = r_high * e;
  const float y_low = __builtin_fmaf(r_high, e, -y_high) + r_low * e;  // exact error of r*e
  const float y_tail = r_high * log2_m;
  float whole = __builtin_rintf(y_high + y_tail);
  whole = whole < -252.f ? -252.f : (whole > 254.f ? 254.f : whole);
  const float f = (y_high - whole) + (y_tail + y_low);  // y_high - whole is exact
  // 2^f = e^(f ln2), Taylor coefficients ln2^k / k!
  const float p =
      1.f +
      f * (0.693147181f +
           f * (0.240226507f +
                f * (0.0555041087f +
                     f * (0.00961812911f +
                          f * (0.00133335581f + f * (0.000154035304f + f * 1.52527338e-05f))))));
  const int32_t n = int32_t(whole);
  const int32_t n1 = n >> 1, n2 = n - n1;  // two steps reach subnormals and overflow to inf
  return p * bits_as<float>(uint32_t(n1 + 127) << 23) * bits_as<float>(uint32_t(n2 + 127) << 23);
}

struct PowGeneral {
  float r;                  // the exponent rounded to float32
  float r_low;              // exponent - r, so r + r_low carries the float64 exponent
  const PowerTable* table;  // the table form (power_sums.cpp), if its series converges
  SAP_INLINE float operator()(float v) const {
    float e, log2_m;
    log2_parts(v, e, log2_m);
    const float value = exp2_scaled(r, r_low, e, log2_m);
    return v == 0.f ? 0.f : value;
  }
};

inline PowGeneral general_power(double r, const PowerTable& table) {
  const float high = float(r);
  return PowGeneral{high, float(r - double(high)), table.degree > 0 ? &table : nullptr};
}

// Whether a power has a form that the table kernel (add_block_powers_tabled) runs.
template <class P>
SAP_INLINE bool has_table_form(const P&) {
  return true;  // the exact powers work on lanes as they are
}
SAP_INLINE bool has_table_form(const PowGeneral& power) {
  return power.table != nullptr;
}

// Decodes n <= kBlock weights starting at `begin` into buf as magnitudes and
// pads buf to a multiple of kLanes with zeros. Returns the largest magnitude's
// bits. Branch-free with 32-bit counters so that it vectorises.
// min_nonzero_bits gets the smallest nonzero magnitude's bits (~0u if none).
template <int32_t Type, bool Masked>
SAP_INLINE uint32_t load_block(const Shard& shard, int64_t begin, int n, float* __restrict buf,
                               Sums& sums, uint32_t& min_nonzero_bits) {
  uint32_t max_bits = 0, min_bits_less_one = ~0u;
  int32_t retained = 0, nonfinite = 0;
  const uint8_t* mask = Masked ? reinterpret_cast<const uint8_t*>(shard.mask) + begin : nullptr;
  for (int i = 0; i < n; ++i) {
    uint32_t bits;
    if constexpr (Type == kFloat32) {
      bits = magnitude_bits_f32(static_cast<const uint32_t*>(shard.data)[begin + i]);
    } else if constexpr (Type == kBFloat16) {
      bits = magnitude_bits_bf16(static_cast<const uint16_t*>(shard.data)[begin + i]);
    } else {
      bits = magnitude_bits_f16(static_cast<const uint16_t*>(shard.data)[begin + i]);
    }
    uint32_t keep = 1u;
    if constexpr (Masked) keep = mask[i];
    retained += int32_t(keep);
    const uint32_t bad = keep & uint32_t(bits >= kFloat32InfBits);
    nonfinite += int32_t(bad);
    bits &= 0u - (keep & (bad ^ 1u));  // pruned and non-finite weights contribute 0
    max_bits = bits > max_bits ? bits : max_bits;
    // bits - 1 wraps 0 to the largest value, so the minimum skips zeros.
    min_bits_less_one = bits - 1u < min_bits_less_one ? bits - 1u : min_bits_less_one;
    buf[i] = bits_as<float>(bits);
  }
  for (int i = n; i < kBlock && (i % kLanes) != 0; ++i) buf[i] = 0.f;
  sums.retained += retained;
  sums.nonfinite += nonfinite;
  min_nonzero_bits = min_bits_less_one + 1u;
  return max_bits;
}

// (|w|^p, |w|^q) of one magnitude.
template <class P, class Q>
struct PowerPair {
  P pow_p;
  Q pow_q;
  SAP_INLINE void operator()(float v, float& vp, float& vq) const {
    vp = pow_p(v);
    vq = pow_q(v);
  }
};
// Both exponents general: log2|w| is computed once for the two powers.
template <>
struct PowerPair<PowGeneral, PowGeneral> {
  PowGeneral pow_p, pow_q;
  SAP_INLINE void operator()(float v, float& vp, float& vq) const {
    float e, log2_m;
    log2_parts(v, e, log2_m);
    vp = exp2_scaled(pow_p.r, pow_p.r_low, e, log2_m);
    vq = exp2_scaled(pow_q.r, pow_q.r_low, e, log2_m);
    vp = v == 0.f ? 0.f : vp;
    vq = v == 0.f ? 0.f : vq;
  }
};

// Float32 partial sums over one block of `padded` magnitudes (a multiple of
// kLanes) in kLanes fixed lanes: lane l adds elements l, l + kLanes, ...
// (at most kBlock / kLanes terms) and the lanes are then added in order. The
// order of every addition is fixed by the code, not by the vector width this
// copy was compiled for, so each instruction set gives the same sums.
template <class P, class Q>
SAP_INLINE void add_block_powers(const float* __restrict buf, int padded, PowerPair<P, Q> powers,
                                 float& block_p, float& block_q) {
  float lane_p[kLanes] = {}, lane_q[kLanes] = {};
  for (int group = 0; group < padded; group += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      float vp, vq;
      powers(buf[group + l], vp, vq);
      lane_p[l] += vp;
      lane_q[l] += vq;
    }
  }
  block_p = 0.f;
  block_q = 0.f;
  for (int l = 0; l < kLanes; ++l) {
    block_p += lane_p[l];
    block_q += lane_q[l];
  }
}

// The 16 lanes of kParts registers added in lane order (the parts' lanes are
// contiguous), as add_block_powers adds its lane array.
SAP_INLINE float ordered_lane_sum(const Lanes (&parts)[kParts]) {
  alignas(64) float lanes[kLanes];
  std::memcpy(lanes, parts, sizeof(lanes));
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

#include "power_table_lanes.h"

SAP_INLINE void add_block_powers_f64(const float* buf, int n, const PowerPlan& plan, Sums& sums) {
  for (int i = 0; i < n; ++i) {
    const double v = buf[i];
    if (v != 0) {
      sums.sum_p += std::pow(v, plan.p);
      sums.sum_q += std::pow(v, plan.q);
    }
  }
}

// kWidth weights from element i on as magnitude bits (float32 bits of |w|),
// held as signed lanes (the sign bit is clear): AVX2 has no unsigned compare.
template <int32_t Type>
SAP_INLINE LaneInts load_magnitude_lanes(const void* data, int64_t i) {
  if constexpr (Type == kFloat32) {
    LaneInts bits;
    std::memcpy(&bits, static_cast<const uint32_t*>(data) + i, sizeof(bits));
    return bits & 0x7fffffff;
  } else {
    LaneHalves halves;
    std::memcpy(&halves, static_cast<const uint16_t*>(data) + i, sizeof(halves));
    const LaneInts em = __builtin_convertvector(halves, LaneInts) & 0x7fff;
    if constexpr (Type == kBFloat16) {
      return em << 16;
    } else {  // as magnitude_bits_f16, lane-wise
      const LaneInts finite = (LaneInts)((Lanes)(em << 13) * 0x1p112f);
      return em >= 0x7c00 ? (0x7f800000 | (em & 0x3ff)) : finite;
    }
  }
}

// One block's float32 sums, the bits of its largest magnitude and its counts.
struct LaneBlock {
  float sum_p, sum_q;
  uint32_t max_bits;
  int32_t retained, nonfinite;
};

struct LaneAccumulators {
  Lanes sum_p[kParts] = {}, sum_q[kParts] = {};
  LaneInts max_bits[kParts] = {}, retained[kParts] = {}, nonfinite[kParts] = {};
};

// Adds the 16 weights from element i on (with their mask bytes if Masked).
template <int32_t Type, bool Masked, class P, class Q>
SAP_INLINE void add_lane_group(LaneAccumulators& acc, const void* data, int64_t i,
                               const uint8_t* mask, P pow_p, Q pow_q) {
  for (int j = 0; j < kParts; ++j) {
    LaneInts bits = load_magnitude_lanes<Type>(data, i + j * kWidth);
    const LaneInts kept = Masked ? kept_lanes(mask + j * kWidth) : splat<LaneInts>(int32_t(-1));
    const LaneInts finite = bits < int32_t(kFloat32InfBits);
    acc.retained[j] -= kept;
    acc.nonfinite[j] -= kept & ~finite;
    bits &= kept & finite;  // pruned and non-finite weights contribute 0
    acc.max_bits[j] = bits > acc.max_bits[j] ? bits : acc.max_bits[j];
    const Lanes v = (Lanes)bits;
    acc.sum_p[j] += pow_p(v);
    acc.sum_q[j] += pow_q(v);
  }
}

// The sums of one block of n <= kBlock weights in a single pass: each group
// of 16 is decoded and its powers added to the lanes while in registers, so
// loads, decoding and the square roots overlap. The order of additions is
// that of load_block + add_block_powers (lane l adds elements l, l + 16, ...;
// then the lanes in order), so both give the same bits.
template <int32_t Type, bool Masked, class P, class Q>
SAP_INLINE LaneBlock lane_block_sums(const Shard& shard, int64_t begin, int n, P pow_p, Q pow_q) {
  LaneAccumulators acc;
  const uint8_t* mask = Masked ? mask_bytes(shard.mask) + begin : nullptr;
  const int whole = n / kLanes * kLanes;
  for (int i = 0; i < whole; i += kLanes) {
    add_lane_group<Type, Masked>(acc, shard.data, begin + i, mask + (Masked ? i : 0), pow_p, pow_q);
  }
  if (whole < n) {  // the last, partial group, padded with pruned zeros
    const int rest = n - whole;
    const size_t width = weight_bytes(Type);
    alignas(64) unsigned char raw[4 * kLanes] = {};
    std::memcpy(raw, static_cast<const unsigned char*>(shard.data) + (begin + whole) * width,
                rest * width);
    alignas(16) uint8_t kept[kLanes] = {};
    for (int l = 0; l < rest; ++l) kept[l] = Masked ? mask[whole + l] : 1;
    add_lane_group<Type, true>(acc, raw, 0, kept, pow_p, pow_q);
  }
  // The 16 lanes in order, through arrays (the parts' lanes are contiguous).
  alignas(64) int32_t lane_max[kLanes], lane_retained[kLanes], lane_nonfinite[kLanes];
  std::memcpy(lane_max, acc.max_bits, sizeof(lane_max));
  std::memcpy(lane_retained, acc.retained, sizeof(lane_retained));
  std::memcpy(lane_nonfinite, acc.nonfinite, sizeof(lane_nonfinite));
  LaneBlock block{ordered_lane_sum(acc.sum_p), ordered_lane_sum(acc.sum_q), 0, 0, 0};
  for (int l = 0; l < kLanes; ++l) {
    block.max_bits = std::max(block.max_bits, uint32_t(lane_max[l]));
    block.retained += lane_retained[l];
    block.nonfinite += lane_nonfinite[l];
  }
  return block;
}

// The same sums in two phases, for general exponents: the block is decoded
// into buf (finding its smallest and largest magnitude), then its powers are
// summed. The table form runs when the block's nonzero magnitudes span at most
// 32 binades, none below the tables' lowest row (so none is subnormal);
// otherwise the exp2/log2 form does (~4x the time, up to ~5 ulps per power
// against ~1).
template <int32_t Type, bool Masked, class P, class Q>
SAP_INLINE LaneBlock buffered_block_sums(const Shard& shard, int64_t begin, int n, P pow_p, Q pow_q,
                                         const PowerPlan& plan, float* buf) {
  Sums counts;
  uint32_t min_bits;
  LaneBlock block{0.f, 0.f, load_block<Type, Masked>(shard, begin, n, buf, counts, min_bits),
                  int32_t(counts.retained), int32_t(counts.nonfinite)};
  if (block.max_bits != 0) {
    const int padded = (n + kLanes - 1) / kLanes * kLanes;
    const int window_base = std::max(plan.lowest_window_row, int(block.max_bits >> 23) - 31);
    if (has_table_form(pow_p) && has_table_form(pow_q) && min_bits >= uint32_t(window_base) << 23) {
      add_block_powers_tabled(buf, padded, window_base, plan.bin_inverse, pow_p, pow_q, block.sum_p,
                              block.sum_q);
    } else {
      add_block_powers(buf, padded, PowerPair<P, Q>{pow_p, pow_q}, block.sum_p, block.sum_q);
    }
  }
  return block;
}

// Sums over elements [begin, begin + length) of one shard, block by block.
// Blocks whose largest magnitude could overflow or underflow float32 powers
// are summed again in float64. Not inlined: inside the one function that
// inlines every (type, mask, p, q) case, GCC kept the lane accumulators in
// memory.
template <int32_t Type, bool Masked, class P, class Q>
__attribute__((noinline)) void range_sums(const Shard& shard, int64_t begin, int64_t length,
                                          const PowerPlan& plan, P pow_p, Q pow_q, Sums& sums) {
  constexpr bool kOnePass = !std::is_same_v<P, PowGeneral> && !std::is_same_v<Q, PowGeneral>;
  alignas(64) float buf[kBlock];
  const uint32_t safe_min = bits_as<uint32_t>(plan.safe_min);
  const uint32_t safe_max = bits_as<uint32_t>(plan.safe_max);
  for (int64_t offset = 0; offset < length; offset += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, length - offset));
    LaneBlock block;
    if constexpr (kOnePass) {
      block = lane_block_sums<Type, Masked>(shard, begin + offset, n, pow_p, pow_q);
    } else {
      block = buffered_block_sums<Type, Masked>(shard, begin + offset, n, pow_p, pow_q, plan, buf);
    }
    sums.retained += block.retained;
    sums.nonfinite += block.nonfinite;
    if (block.max_bits == 0) continue;
    if (block.max_bits < safe_min || block.max_bits > safe_max) {
      Sums counted_already;
      uint32_t unused_min;
      if constexpr (kOnePass)
        load_block<Type, Masked>(shard, begin + offset, n, buf, counted_already, unused_min);
      add_block_powers_f64(buf, n, plan, sums);
    } else {
      sums.sum_p += block.sum_p;
      sums.sum_q += block.sum_q;
    }
  }
}

template <class P, class Q>
SAP_INLINE void range_sums_dispatch(const Shard& shard, int64_t begin, int64_t length,
                                    const PowerPlan& plan, P pow_p, Q pow_q, Sums& sums) {
  const bool masked = shard.mask != nullptr;
  switch (shard.type) {
    case kFloat32:
      return masked ? range_sums<kFloat32, true>(shard, begin, length, plan, pow_p, pow_q, sums)
                    : range_sums<kFloat32, false>(shard, begin, length, plan, pow_p, pow_q, sums);
    case kBFloat16:
      return masked ? range_sums<kBFloat16, true>(shard, begin, length, plan, pow_p, pow_q, sums)
                    : range_sums<kBFloat16, false>(shard, begin, length, plan, pow_p, pow_q, sums);
    default:
      return masked ? range_sums<kFloat16, true>(shard, begin, length, plan, pow_p, pow_q, sums)
                    : range_sums<kFloat16, false>(shard, begin, length, plan, pow_p, pow_q, sums);
  }
}

template <class P>
SAP_INLINE void range_sums_q(const Shard& shard, int64_t begin, int64_t length,
                             const PowerPlan& plan, P pow_p, Sums& sums) {
  switch (plan.q_kind) {
    case kPowHalf: return range_sums_dispatch(shard, begin, length, plan, pow_p, PowHalf{}, sums);
    case kPowOne: return range_sums_dispatch(shard, begin, length, plan, pow_p, PowOne{}, sums);
    case kPowTwo: return range_sums_dispatch(shard, begin, length, plan, pow_p, PowTwo{}, sums);
    case kPowInt:
      return range_sums_dispatch(shard, begin, length, plan, pow_p, PowInt{int(plan.q)}, sums);
    default:
      return range_sums_dispatch(shard, begin, length, plan, pow_p,
                                 general_power(plan.q, plan.q_table), sums);
  }
}

}  // namespace

// Sums over elements [begin, begin + length) of one shard.
void range_power_sums(const Shard& shard, int64_t begin, int64_t length, const PowerPlan& plan,
                      Sums& sums) {
  switch (plan.p_kind) {
    case kPowHalf: return range_sums_q(shard, begin, length, plan, PowHalf{}, sums);
    case kPowOne: return range_sums_q(shard, begin, length, plan, PowOne{}, sums);
    case kPowTwo: return range_sums_q(shard, begin, length, plan, PowTwo{}, sums);
    case kPowInt: return range_sums_q(shard, begin, length, plan, PowInt{int(plan.p)}, sums);
    default:
      return range_sums_q(shard, begin, length, plan, general_power(plan.p, plan.p_table), sums);
  }
}

}  // namespace SAP_KERNELS_ISA
