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

struct PowHalf {
  SAP_INLINE float operator()(float v) const { return __builtin_sqrtf(v); }
};
struct PowOne {
  SAP_INLINE float operator()(float v) const { return v; }
};
struct PowTwo {
  SAP_INLINE float operator()(float v) const { return v * v; }
};
// Integer exponent 3..15 by square-and-multiply with a fixed trip count, so
// the loop stays branch-free and vectorises.
struct PowInt {
  int n;
  SAP_INLINE float operator()(float v) const {
    float result = 1.f, base = v;
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
  float r;      // the exponent rounded to float32
  float r_low;  // exponent - r, so r + r_low carries the float64 exponent
  SAP_INLINE float operator()(float v) const {
    float e, log2_m;
    log2_parts(v, e, log2_m);
    const float value = exp2_scaled(r, r_low, e, log2_m);
    return v == 0.f ? 0.f : value;
  }
};

inline PowGeneral general_power(double r) {
  const float high = float(r);
  return PowGeneral{high, float(r - double(high))};
}

// Decodes n <= kBlock weights starting at `begin` into buf as magnitudes and
// pads buf to a multiple of kLanes with zeros. Returns the largest magnitude's
// bits. Branch-free with 32-bit counters so that it vectorises.
template <int32_t Type, bool Masked>
SAP_INLINE uint32_t load_block(const Shard& shard, int64_t begin, int n, float* __restrict buf,
                               Sums& sums) {
  uint32_t max_bits = 0;
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
    buf[i] = bits_as<float>(bits);
  }
  for (int i = n; i < kBlock && (i % kLanes) != 0; ++i) buf[i] = 0.f;
  sums.retained += retained;
  sums.nonfinite += nonfinite;
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
                                 Sums& sums) {
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
  float block_p = 0.f, block_q = 0.f;
  for (int l = 0; l < kLanes; ++l) {
    block_p += lane_p[l];
    block_q += lane_q[l];
  }
  sums.sum_p += block_p;
  sums.sum_q += block_q;
}

SAP_INLINE void add_block_powers_f64(const float* buf, int n, const PowerPlan& plan, Sums& sums) {
  for (int i = 0; i < n; ++i) {
    const double v = buf[i];
    if (v != 0) {
      sums.sum_p += std::pow(v, plan.p);
      sums.sum_q += std::pow(v, plan.q);
    }
  }
}

template <int32_t Type, bool Masked, class P, class Q>
SAP_INLINE void range_sums(const Shard& shard, int64_t begin, int64_t length, const PowerPlan& plan,
                           P pow_p, Q pow_q, Sums& sums) {
  alignas(64) float buf[kBlock];
  const uint32_t safe_min = bits_as<uint32_t>(plan.safe_min);
  const uint32_t safe_max = bits_as<uint32_t>(plan.safe_max);
  for (int64_t offset = 0; offset < length; offset += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, length - offset));
    const uint32_t max_bits = load_block<Type, Masked>(shard, begin + offset, n, buf, sums);
    const int padded = (n + kLanes - 1) / kLanes * kLanes;
    if (max_bits == 0) continue;
    if (max_bits < safe_min || max_bits > safe_max) {
      add_block_powers_f64(buf, n, plan, sums);
    } else {
      add_block_powers(buf, padded, PowerPair<P, Q>{pow_p, pow_q}, sums);
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
      return range_sums_dispatch(shard, begin, length, plan, pow_p, general_power(plan.q), sums);
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
    default: return range_sums_q(shard, begin, length, plan, general_power(plan.p), sums);
  }
}

}  // namespace SAP_KERNELS_ISA
