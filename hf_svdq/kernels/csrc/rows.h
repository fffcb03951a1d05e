// Row kernels of one instruction set, included once per set by svdq_cpu.cpp inside
// `#pragma GCC target(...)` with SVDQ_NS (the namespace), SVDQ_AVX2 (0/1) and SVDQ_VNNI (0: none,
// 1: AVX-512 VNNI with VL, 2: AVX-VNNI) defined. No include guard on purpose.
//
// Activations arrive quantized per block of 32 (int8 codes `xq`, float scale `xd` per block) and with
// the group sums of those rounded values `xsum` (for the zero points). Per output row o and group g:
//   y[o] += s[o,g] * (sum_b xd[b] * sum_{k in b} q[o,k] xq[k]  -  z[o,g] * xsum[g])
// with integer dot products of 32 bytes (AVX2: maddubs + madd; VNNI: dpbusd).

namespace SVDQ_NS {

#if SVDQ_AVX2
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 int32 partial sums of 32 unsigned (w <= 127 without VNNI) x 32 signed bytes.
static inline __m256i dot_us(__m256i w, __m256i x) {
#if SVDQ_VNNI == 1
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#elif SVDQ_VNNI == 2
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

// signed x signed: |a| times b with a's sign (ggml's trick; |a| <= 128 fits the unsigned side).
static inline __m256i dot_ss(__m256i a, __m256i b) {
  return dot_us(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) {
  const uint32_t exponent = (h >> 10) & 31u, mantissa = h & 1023u;
  float value = exponent ? std::ldexp(static_cast<float>(mantissa + 1024u), static_cast<int>(exponent) - 25)
                         : std::ldexp(static_cast<float>(mantissa), -24);
  return (h & 0x8000u) ? -value : value;
}
#endif

// One output row of the group-quantized base for one input row. `codes`: the row's packed codes
// (INT4: two per byte, element 2j in the low nibble of byte j; INT8: one per byte).
static float base_row(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int groups, int group_size,
                      int bits, const int8_t* xq, const float* xd, const float* xsum) {
  const int blocks_per_group = group_size / 32;
  float offset = 0.f;
#if SVDQ_AVX2
  __m256 total = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int g = 0; g < groups; ++g) {
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < blocks_per_group; ++b) {
      const int block = g * blocks_per_group + b;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + block * 32));
      __m256i sums;
      if (bits == 4) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + block * 16));
        const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        sums = dot_us(_mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)), x);
      } else {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + block * 32));
#if SVDQ_VNNI
        sums = dot_us(w, x);  // dpbusd does not saturate: codes 0..255 as they are
#else
        sums = dot_ss(_mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))), x);  // codes - 128
#endif
      }
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(xd[block]), acc);
    }
    const float s = half_to_float(scale[g]);
    total = _mm256_fmadd_ps(acc, _mm256_set1_ps(s), total);
#if SVDQ_VNNI
    offset += s * static_cast<float>(zero[g]) * xsum[g];
#else
    offset += s * static_cast<float>(bits == 8 ? static_cast<int>(zero[g]) - 128 : zero[g]) * xsum[g];
#endif
  }
  return hsum(total) - offset;
#else
  float total = 0.f;
  for (int g = 0; g < groups; ++g) {
    float acc = 0.f;
    for (int b = 0; b < blocks_per_group; ++b) {
      const int block = g * blocks_per_group + b;
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) {
        const int element = block * 32 + k;
        const int q = bits == 4 ? ((codes[element / 2] >> ((element & 1) * 4)) & 15) : codes[element];
        sum += q * xq[element];
      }
      acc += static_cast<float>(sum) * xd[block];
    }
    const float s = half_to_float(scale[g]);
    total += s * acc;
    offset += s * static_cast<float>(zero[g]) * xsum[g];
  }
  return total - offset;
#endif
}

// sum_k a[k] * b[k] for int8 a, b of length n (a multiple of 32), per block of 32 scaled by bd[block].
static float int8_dot(const int8_t* a, const int8_t* b, const float* bd, int n) {
#if SVDQ_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (int block = 0; block < n / 32; ++block) {
    const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + block * 32));
    const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + block * 32));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_ss(va, vb)), _mm256_set1_ps(bd[block]), acc);
  }
  return hsum(acc);
#else
  float acc = 0.f;
  for (int block = 0; block < n / 32; ++block) {
    int32_t sum = 0;
    for (int k = 0; k < 32; ++k) sum += a[block * 32 + k] * b[block * 32 + k];
    acc += static_cast<float>(sum) * bd[block];
  }
  return acc;
#endif
}

// sum_k u[k] * t[k] for int8 u and float t of length r (any r).
static float mixed_dot(const int8_t* u, const float* t, int r) {
  int k = 0;
  float acc = 0.f;
#if SVDQ_AVX2
  __m256 v = _mm256_setzero_ps();
  for (; k + 8 <= r; k += 8) {
    const __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u + k)));
    v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), _mm256_loadu_ps(t + k), v);
  }
  acc = hsum(v);
#endif
  for (; k < r; ++k) acc += static_cast<float>(u[k]) * t[k];
  return acc;
}

// Output rows [begin, end) of a residual layer (rank 0: no correction) for `rows` input rows.
static void residual_range(const Job& job, int64_t begin, int64_t end) {
  const int64_t codes_per_row = static_cast<int64_t>(job.groups) * job.group_size * job.bits / 8;
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* codes = job.codes + o * codes_per_row;
    const uint16_t* scale = job.scale + o * job.groups;
    const uint8_t* zero = job.zero + o * job.groups;
    for (int m = 0; m < job.rows; ++m) {
      float y = job.codes ? base_row(codes, scale, zero, job.groups, job.group_size, job.bits, job.xq + m * job.in,
                                     job.xd + m * (job.in / 32), job.xsum + m * job.groups)
                          : 0.f;
      if (job.rank) y += job.u_scale[o] * mixed_dot(job.u + o * job.rank, job.t + m * job.rank, job.rank);
      if (job.bias) y += job.bias[o];
      job.out[m * job.out_features + o] = y;
    }
  }
}

// t[m, k] = vh_scale[k] * (vh[k] . x[m]) for k in [begin, end), with the quantized activations.
static void hidden_range(const Job& job, int64_t begin, int64_t end) {
  for (int64_t k = begin; k < end; ++k)
    for (int m = 0; m < job.rows; ++m)
      job.t[m * job.rank + k] = job.vh_scale[k] * int8_dot(job.vh + k * job.in, job.xq + m * job.in, job.xd + m * (job.in / 32), job.in);
}

}  // namespace SVDQ_NS
