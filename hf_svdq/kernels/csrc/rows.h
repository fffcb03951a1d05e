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

// The int32 sums of two 32-byte products, lane by lane (a + b before the widening on AVX2: each
// maddubs pair sum is at most 2 * 15 * 127, so two of them still fit int16 for INT4 codes).
static inline __m256i dot_us2(__m256i w0, __m256i x0, __m256i w1, __m256i x1) {
#if SVDQ_VNNI == 1
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w0, x0), w1, x1);
#elif SVDQ_VNNI == 2
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w0, x0), w1, x1);
#else
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1)),
                           _mm256_set1_epi16(1));
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

// The group scales of `n` rows (fp16, rows `groups` apart) as float32 into `sc`: once per tile of output rows,
// shared by every input row.
static inline void tile_scales(const uint16_t* scale, int groups, int n, float* sc) {
  const int total = n * groups;
  int i = 0;
#if SVDQ_AVX2
  for (; i + 8 <= total; i += 8)
    _mm256_storeu_ps(sc + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + i))));
#endif
  for (; i < total; ++i) sc[i] = half_to_float(scale[i]);
}

// Each of R rows' zero-point term sum_g s[g] z[g] xsum[g] (float32 scales `sc`), vectorized over groups.
template <int R, int bits>
static inline void zero_terms(const float* sc, const uint8_t* zero, int groups, const float* xsum, float* offset) {
  const float shift = (bits == 8 && SVDQ_AVX2 && !SVDQ_VNNI) ? 128.f : 0.f;  // maddubs meets INT8 codes as codes - 128
  for (int r = 0; r < R; ++r) {
    const float* s_row = sc + r * groups;
    const uint8_t* z_row = zero + r * groups;
    float sum = 0.f;
    int g = 0;
#if SVDQ_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8) {
      const __m256 z = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z_row + g)))),
                                     _mm256_set1_ps(shift));
      acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s_row + g), z), _mm256_loadu_ps(xsum + g), acc);
    }
    sum = hsum(acc);
#endif
    for (; g < groups; ++g) sum += s_row[g] * (static_cast<float>(z_row[g]) - shift) * xsum[g];
    offset[r] = sum;
  }
}

// R consecutive output rows of the group-quantized base for one input row, into y[0..R). `codes`: the
// first row's packed codes (INT4: two per byte, element 2j in the low nibble of byte j; INT8: one per
// byte), rows `codes_per_row` bytes apart; `xq4`: the activation codes in the INT4 codes' order (groups of
// an even number of blocks: per 64 elements the 32 even ones, then the 32 odd ones; otherwise per block of
// 32: the 16 even, then the 16 odd), used for INT4; `sc` (the group scales as float32, tile_scales), `zero`:
// the first row's, rows `groups` apart. Several rows at once share each activation load and give the FMA
// chains independent accumulators.
template <int R, int bits>
static inline void base_rows(const uint8_t* codes, int64_t codes_per_row, const float* sc, const uint8_t* zero,
                             int groups, int group_size, const int8_t* xq, const int8_t* xq4, const float* xd,
                             const float* xsum, float* y) {
  const int blocks_per_group = group_size / 32;
  float offset[R];
  zero_terms<R, bits>(sc, zero, groups, xsum, offset);
#if SVDQ_AVX2
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  for (int g = 0; g < groups; ++g) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    if (bits == 4 && blocks_per_group % 2 == 0) {
      // Pairs of blocks: 32 packed bytes hold 64 elements; their low nibbles (the even elements) and high
      // nibbles (the odd ones) meet the activations in pair order (per 64: the 32 even, then the 32 odd), and
      // int32 lanes 0-3 sum block `block`, lanes 4-7 block `block + 1`.
      for (int b = 0; b < blocks_per_group; b += 2) {
        const int block = g * blocks_per_group + b;
        const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq4 + block * 32));
        const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq4 + block * 32 + 32));
        const __m256 d = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(xd[block])), _mm_set1_ps(xd[block + 1]), 1);
        for (int r = 0; r < R; ++r) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + r * codes_per_row + block * 16));
          const __m256i even = _mm256_and_si256(packed, low), odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us2(even, x_even, odd, x_odd)), d, acc[r]);
        }
      }
    } else
    for (int b = 0; b < blocks_per_group; ++b) {
      const int block = g * blocks_per_group + b;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>((bits == 4 ? xq4 : xq) + block * 32));
      const __m256 d = _mm256_set1_ps(xd[block]);
      for (int r = 0; r < R; ++r) {
        const uint8_t* row = codes + r * codes_per_row;
        __m256i sums;
        if constexpr (bits == 4) {  // low nibbles (even elements) in the low lane, high nibbles in the high lane: x4's order
          const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + block * 16)));
          sums = dot_us(_mm256_and_si256(_mm256_srlv_epi32(packed, nibble_shift), low), x);
        } else {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + block * 32));
#if SVDQ_VNNI
          sums = dot_us(w, x);  // dpbusd does not saturate: codes 0..255 as they are
#else
          sums = dot_ss(_mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))), x);  // codes - 128
#endif
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm256_fmadd_ps(acc[r], _mm256_broadcast_ss(sc + r * groups + g), total[r]);
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(total[r]) - offset[r];
#else
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = codes + r * codes_per_row;
    float total = 0.f;
    for (int g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int b = 0; b < blocks_per_group; ++b) {
        const int block = g * blocks_per_group + b;
        int32_t sum = 0;
        for (int k = 0; k < 32; ++k) {
          const int element = block * 32 + k;
          const int q = bits == 4 ? ((row[element / 2] >> ((element & 1) * 4)) & 15) : row[element];
          sum += q * xq[element];
        }
        acc += static_cast<float>(sum) * xd[block];
      }
      total += sc[r * groups + g] * acc;
    }
    y[r] = total - offset[r];
  }
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

// n <= R consecutive output rows: R at once when n == R, else one by one.
template <int R, int bits>
static inline void base_group(const uint8_t* codes, int64_t codes_per_row, const float* sc, const uint8_t* zero,
                              const Job& job, int n, const int8_t* xq, const int8_t* xq4, const float* xd,
                              const float* xsum, float* y) {
  if (n == R) {
    base_rows<R, bits>(codes, codes_per_row, sc, zero, job.groups, job.group_size, xq, xq4, xd, xsum, y);
    return;
  }
  for (int r = 0; r < n; ++r)
    base_rows<1, bits>(codes + r * codes_per_row, codes_per_row, sc + r * job.groups, zero + r * job.groups,
                       job.groups, job.group_size, xq, xq4, xd, xsum, y + r);
}

// Asks for the `bytes` at `from` + kPrefetchTiles tiles (the rows two tiles ahead), never past `limit`: the
// codes stream from memory while this tile computes. Without it the hardware prefetcher alone left memory
// and compute time adding up (benchmarks/kernel_stream.py, AMD EPYC, 1 thread: 9.7 -> 6.3 ms per token on
// AVX-512 VNNI, 9.8 -> 6.7 on AVX2; at 2 threads within the noise).
static inline void prefetch_ahead(const uint8_t* from, int64_t bytes, const uint8_t* limit) {
  const uint8_t* begin = from + kPrefetchTiles * bytes;
  const uint8_t* end = std::min(begin + bytes, limit);
  for (const uint8_t* line = begin; line < end; line += 64) _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
}

// Output rows [begin, end) of a residual layer (rank 0: no correction) for `rows` input rows, 4 at a time.
static void residual_range(const Job& job, int64_t begin, int64_t end) {
  const int64_t codes_per_row = static_cast<int64_t>(job.groups) * job.group_size * job.bits / 8;
  constexpr int R = 4;
  thread_local std::vector<float> scales;
  float* sc = scratch(scales, static_cast<int64_t>(R) * job.groups);
  for (int64_t o = begin; o < end; o += R) {
    const int n = static_cast<int>(std::min<int64_t>(R, end - o));
    const uint8_t* codes = job.codes ? job.codes + o * codes_per_row : nullptr;
    const uint8_t* zero = job.codes ? job.zero + o * job.groups : nullptr;
    if (codes) {
      prefetch_ahead(codes, R * codes_per_row, job.codes + end * codes_per_row);
      tile_scales(job.scale + o * job.groups, job.groups, n, sc);
    }
    for (int m = 0; m < job.rows; ++m) {
      float y[R] = {0.f, 0.f, 0.f, 0.f};
      if (job.codes) {
        const int8_t* xq = job.xq + static_cast<int64_t>(m) * job.in;
        const int8_t* xq4 = job.xq4 + static_cast<int64_t>(m) * job.in;
        const float* xd = job.xd + static_cast<int64_t>(m) * (job.in / 32);
        const float* xsum = job.xsum + static_cast<int64_t>(m) * job.groups;
        if (job.bits == 4) base_group<R, 4>(codes, codes_per_row, sc, zero, job, n, xq, xq4, xd, xsum, y);
        else base_group<R, 8>(codes, codes_per_row, sc, zero, job, n, xq, xq4, xd, xsum, y);
      }
      for (int r = 0; r < n; ++r) {
        float value = y[r];
        if (job.rank) value += job.u_scale[o + r] * mixed_dot(job.u + (o + r) * job.rank, job.t + m * job.rank, job.rank);
        if (job.bias) value += job.bias[o + r];
        job.out[static_cast<int64_t>(m) * job.out_features + o + r] = value;
      }
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
