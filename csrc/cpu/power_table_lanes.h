// The table form of general powers (PowerTable in power_sums.cpp), in lanes.
// Included by power_sums_blocks.h inside its per-instruction-set namespace, so
// Lanes, kWidth and PowGeneral are that copy's. No include guard on purpose.

// a * b + c rounded once, lane-wise. Intrinsics: GCC 12 scalarises some
// inlined copies of the lane loop. (bits_as moves between GCC's vector types
// and the intrinsics' types of the same size.)
SAP_INLINE Lanes fma_each(Lanes a, Lanes b, Lanes c) {
#if SAP_KERNELS_VECTOR_WIDTH == 16
  return bits_as<Lanes>(
      _mm512_fmadd_ps(bits_as<__m512>(a), bits_as<__m512>(b), bits_as<__m512>(c)));
#elif SAP_KERNELS_VECTOR_WIDTH == 8
  return bits_as<Lanes>(
      _mm256_fmadd_ps(bits_as<__m256>(a), bits_as<__m256>(b), bits_as<__m256>(c)));
#else
  Lanes out;
  for (int l = 0; l < kWidth; ++l) out[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return out;
#endif
}

// table[index & 31] in every lane: one two-register permute where the copy
// has it.
SAP_INLINE Lanes lookup32(const float* table, LaneInts index) {
#if SAP_KERNELS_VECTOR_WIDTH == 16
  return bits_as<Lanes>(_mm512_permutex2var_ps(_mm512_loadu_ps(table), bits_as<__m512i>(index),
                                               _mm512_loadu_ps(table + 16)));
#elif SAP_KERNELS_VECTOR_WIDTH == 8
  // Four 8-entry permutes, then index bits 3 and 4 (moved to the sign bit) pick.
  const __m256i lanes = bits_as<__m256i>(index);
  const auto quarter = [&](int q) {
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8 * q), lanes);
  };
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 28));
  const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 27));
  return bits_as<Lanes>(_mm256_blendv_ps(_mm256_blendv_ps(quarter(0), quarter(1), bit3),
                                         _mm256_blendv_ps(quarter(2), quarter(3), bit3), bit4));
#else
  Lanes out;
  for (int l = 0; l < kWidth; ++l) out[l] = table[index[l] & 31];
  return out;
#endif
}

// What the table form needs of kWidth magnitudes, shared by both exponents
// (PowerTable in power_sums.cpp gives the formula).
struct BinnedLanes {
  LaneInts nonzero;     // -1 where |w| != 0
  LaneInts window_row;  // exponent field - the block's window base, in [0, 32) where nonzero
  LaneInts bin;         // the top 5 fraction bits, in the low 5 bits
  Lanes delta;          // (m - c_bin) / c_bin
};

SAP_INLINE BinnedLanes bin_lanes(LaneInts bits, int window_base, const float* bin_inverse) {
  BinnedLanes out;
  out.nonzero = bits != 0;
  out.window_row = (bits >> 23) - window_base;
  out.bin = bits >> 18;
  const Lanes m = (Lanes)((bits & 0x7fffff) | 0x3f800000);
  const Lanes centre = (Lanes)((bits & 0x7c0000) | 0x3f820000);  // 1 + (bin + 1/2) / 32
  out.delta = (m - centre) * lookup32(bin_inverse, out.bin);     // m - centre is exact
  return out;
}

// |w|^r in lanes: the exact powers directly, general ones by table.
template <class P>
SAP_INLINE Lanes power_lanes(const P& power, Lanes v, const BinnedLanes&, int) {
  return power(v);
}
SAP_INLINE Lanes power_lanes(const PowGeneral& power, Lanes, const BinnedLanes& lanes,
                             int window_base) {
  const PowerTable& table = *power.table;
  const Lanes scale = lookup32(table.scale + window_base, lanes.window_row);
  const Lanes bin_power = lookup32(table.bin_power, lanes.bin);
  const Lanes product = scale * bin_power;
  const Lanes product_error = fma_each(scale, bin_power, -product);  // exact
  // (1 + delta)^r - 1 plus the tables' relative rounding errors.
  Lanes series = splat<Lanes>(table.binomial[table.degree - 1]);
  for (int k = table.degree - 2; k >= 0; --k) {
    series = fma_each(series, lanes.delta, splat<Lanes>(table.binomial[k]));
  }
  const Lanes corrections = lookup32(table.scale_error + window_base, lanes.window_row) +
                            lookup32(table.bin_power_error, lanes.bin);
  series = fma_each(series, lanes.delta, corrections);
  const Lanes value = product + fma_each(product, series, product_error);
  return (Lanes)((LaneInts)value & lanes.nonzero);
}

// The same sums as add_block_powers, for blocks whose nonzero magnitudes all
// lie in the 32 exponents from window_base (>= 1: no subnormals).
template <class P, class Q>
SAP_INLINE void add_block_powers_tabled(const float* __restrict buf, int padded, int window_base,
                                        const float* bin_inverse, P pow_p, Q pow_q, float& block_p,
                                        float& block_q) {
  Lanes sum_p[kParts] = {}, sum_q[kParts] = {};
  for (int group = 0; group < padded; group += kLanes) {
    for (int j = 0; j < kParts; ++j) {
      LaneInts bits;
      std::memcpy(&bits, buf + group + j * kWidth, sizeof(bits));
      const BinnedLanes lanes = bin_lanes(bits, window_base, bin_inverse);
      const Lanes v = (Lanes)bits;
      sum_p[j] += power_lanes(pow_p, v, lanes, window_base);
      sum_q[j] += power_lanes(pow_q, v, lanes, window_base);
    }
  }
  block_p = ordered_lane_sum(sum_p);
  block_q = ordered_lane_sum(sum_q);
}
