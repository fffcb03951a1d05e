// Integer dot-product decode kernels for hf_svdq's residual (INT4/INT8 group base + INT8 low-rank
// correction) and low-rank INT8 layers, on PyTorch's own thread pool (at::parallel_for).
//
// As in ggml, each input row is quantized once per call to int8 per block of 32 (scale max|x|/127);
// the weights' integer codes are multiplied by those bytes with maddubs (AVX2) or vpdpbusd (AVX-512
// VNNI / AVX-VNNI), selected at run time from the CPU's features: one build runs on every x86-64 CPU
// (a scalar path where AVX2 is missing). The pure-PyTorch reference (hf_svdq/kernels/reference.py)
// stays the definition; tests bound the difference by the activation rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPrefetchTiles = 2;  // how far ahead the codes are prefetched, in tiles of 4 rows (1, 2 and 4 alike, 8 slower: one streamed run each)

struct Job {
  int rows = 0, in = 0, out_features = 0, bits = 0, groups = 0, group_size = 0, rank = 0;
  const int8_t* xq = nullptr;     // [rows, in] activation codes
  const int8_t* xq4 = nullptr;    // [rows, in] the same in the INT4 kernels' order (quantize_activations)
  const float* xd = nullptr;      // [rows, in / 32] activation block scales
  const float* xsum = nullptr;    // [rows, groups] group sums of the rounded activations
  const uint8_t* codes = nullptr; // [out, in * bits / 8] base codes (null: a low-rank layer)
  const uint16_t* scale = nullptr;// [out, groups] fp16 bits
  const uint8_t* zero = nullptr;  // [out, groups]
  const int8_t* u = nullptr;      // [out, rank]
  const float* u_scale = nullptr; // [out]
  const int8_t* vh = nullptr;     // [rank, in]
  const float* vh_scale = nullptr;// [rank]
  const float* bias = nullptr;    // [out] or null
  float* t = nullptr;             // [rows, rank] scratch
  float* out = nullptr;           // [rows, out]
};

// Per-thread scratch (grown, never shrunk): no allocation per call.
template <typename T>
T* scratch(std::vector<T>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

}  // namespace

#define SVDQ_NS isa_scalar
#define SVDQ_AVX2 0
#define SVDQ_VNNI 0
#include "rows.h"
#undef SVDQ_NS
#undef SVDQ_AVX2
#undef SVDQ_VNNI

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SVDQ_NS isa_avx2
#define SVDQ_AVX2 1
#define SVDQ_VNNI 0
#include "rows.h"
#undef SVDQ_NS
#undef SVDQ_AVX2
#undef SVDQ_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
#define SVDQ_NS isa_avx512vnni
#define SVDQ_AVX2 1
#define SVDQ_VNNI 1
#include "rows.h"
#undef SVDQ_NS
#undef SVDQ_AVX2
#undef SVDQ_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define SVDQ_NS isa_avxvnni
#define SVDQ_AVX2 1
#define SVDQ_VNNI 2
#include "rows.h"
#undef SVDQ_NS
#undef SVDQ_AVX2
#undef SVDQ_VNNI
#pragma GCC pop_options

namespace {

// Instruction sets, in the order `best_isa` prefers them.
enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX_VNNI = 2, AVX512_VNNI = 3 };

using Range = void (*)(const Job&, int64_t, int64_t);

struct Kernels {
  Range residual, hidden;
};

Kernels kernels_for(int64_t isa) {
  switch (isa) {
    case AVX512_VNNI: return {isa_avx512vnni::residual_range, isa_avx512vnni::hidden_range};
    case AVX_VNNI: return {isa_avxvnni::residual_range, isa_avxvnni::hidden_range};
    case AVX2: return {isa_avx2::residual_range, isa_avx2::hidden_range};
    default: return {isa_scalar::residual_range, isa_scalar::hidden_range};
  }
}

bool supports(int64_t isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (isa) {
    case SCALAR: return true;
    case AVX2: return avx2;
    case AVX_VNNI: return avx2 && __builtin_cpu_supports("avxvnni");
    case AVX512_VNNI: return avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
    default: return false;
  }
}

int64_t best_isa() {
  for (int64_t isa : {AVX512_VNNI, AVX_VNNI, AVX2})
    if (supports(isa)) return isa;
  return SCALAR;
}

// x [rows, in] float32 -> codes, block scales and (for a base) group sums of the ROUNDED activations
// (as ggml's Q8_1 keeps d * sum(q)): the zero-point term then meets the same activations as the codes, so
// the result is the layer applied to the rounded input, with no error amplified by the zero point.
// `xq4` (if not null) gets the codes in the order the INT4 kernels unpack nibbles: the even elements (the low
// nibbles) then the odd ones (the high nibbles), per 64 elements where a group holds an even number of
// blocks (the kernels read 32 packed bytes at a time), else per block of 32.
void quantize_activations(const float* x, int rows, int in, int group_size, int8_t* xq, int8_t* xq4, float* xd,
                          float* xsum) {
  const int blocks = in / 32;
  const int blocks_per_group = group_size > 0 ? group_size / 32 : 0;
  const bool pairs = blocks_per_group % 2 == 0;  // the INT4 kernels' pair order (see rows.h)
  for (int m = 0; m < rows; ++m) {
    const float* row = x + static_cast<int64_t>(m) * in;
    int8_t* codes = xq + static_cast<int64_t>(m) * in;
    float group_sum = 0.f;
    for (int b = 0; b < blocks; ++b) {
      float amax = 0.f;
      for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(row[b * 32 + k]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      xd[m * blocks + b] = d;
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) {
        const int8_t q = static_cast<int8_t>(std::nearbyint(row[b * 32 + k] * id));
        codes[b * 32 + k] = q;
        if (xq4 && pairs) {  // per 64 elements: the even ones, then the odd ones
          const int e = (b & 1) * 32 + k;
          xq4[static_cast<int64_t>(m) * in + (b & ~1) * 32 + (e & 1) * 32 + e / 2] = q;
        } else if (xq4) {
          xq4[static_cast<int64_t>(m) * in + b * 32 + (k & 1) * 16 + k / 2] = q;
        }
        sum += q;
      }
      if (blocks_per_group) {
        group_sum += d * static_cast<float>(sum);
        if ((b + 1) % blocks_per_group == 0) {
          xsum[m * (blocks / blocks_per_group) + b / blocks_per_group] = group_sum;
          group_sum = 0.f;
        }
      }
    }
  }
}

// One parallel_for over `n` items; small layers (`weights` below `min_parallel`) stay on this thread.
void run(Range range, const Job& job, int64_t n, int64_t weights, int64_t min_parallel) {
  if (n <= 0) return;
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || weights < min_parallel) {
    range(job, 0, n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, (n + threads - 1) / threads);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { range(job, begin, end); });
}

// A small float vector as float32 (converted when stored in another dtype), kept alive in `keep`.
const float* float_ptr(const c10::optional<at::Tensor>& t, const char* name, int64_t expected, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_floating_point() && t->numel() == expected, name, " must be a float tensor of ", expected, " elements");
  keep = t->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// y = x (Q + L R)^T + bias (codes given) or x (L R)^T + bias (codes absent): x float32 [..., in] -> [..., out].
at::Tensor forward(const at::Tensor& x, const c10::optional<at::Tensor>& codes, const c10::optional<at::Tensor>& scale,
                   const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group_size, int64_t out_features,
                   const c10::optional<at::Tensor>& u, const c10::optional<at::Tensor>& u_scale,
                   const c10::optional<at::Tensor>& vh, const c10::optional<at::Tensor>& vh_scale,
                   const c10::optional<at::Tensor>& bias, int64_t isa, int64_t min_parallel) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [..., in]");
  TORCH_CHECK(supports(isa), "this CPU does not support instruction set ", isa);
  const int in = static_cast<int>(x.size(-1));
  const int rows = in ? static_cast<int>(x.numel() / in) : 0;
  TORCH_CHECK(in % 32 == 0, "the input width must be a multiple of 32, got ", in);
  Job job;
  at::Tensor keep_u_scale, keep_vh_scale, keep_bias;
  job.rows = rows;
  job.in = in;
  job.out_features = static_cast<int>(out_features);
  if (codes.has_value()) {
    TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
    TORCH_CHECK(group_size % 32 == 0 && in % group_size == 0, "group_size must be a multiple of 32 dividing ", in);
    TORCH_CHECK(codes->scalar_type() == at::kByte && codes->is_contiguous() && codes->numel() == out_features * in * bits / 8,
                "codes must be contiguous uint8 of out * in * bits / 8 elements");
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kHalf && scale->is_contiguous() &&
                scale->numel() == out_features * (in / group_size), "scale must be contiguous float16 [out, groups]");
    TORCH_CHECK(zero.has_value() && zero->scalar_type() == at::kByte && zero->is_contiguous() &&
                zero->numel() == out_features * (in / group_size), "zero must be contiguous uint8 [out, groups]");
    job.bits = static_cast<int>(bits);
    job.group_size = static_cast<int>(group_size);
    job.groups = in / static_cast<int>(group_size);
    job.codes = codes->data_ptr<uint8_t>();
    job.scale = reinterpret_cast<const uint16_t*>(scale->data_ptr<at::Half>());
    job.zero = zero->data_ptr<uint8_t>();
  }
  if (u.has_value()) {
    TORCH_CHECK(vh.has_value() && u->scalar_type() == at::kChar && vh->scalar_type() == at::kChar && u->is_contiguous() &&
                vh->is_contiguous() && u->dim() == 2 && vh->dim() == 2 && u->size(0) == out_features &&
                vh->size(1) == in && u->size(1) == vh->size(0), "u [out, r] and vh [r, in] must be contiguous int8");
    job.rank = static_cast<int>(vh->size(0));
    job.u = u->data_ptr<int8_t>();
    job.vh = vh->data_ptr<int8_t>();
    job.u_scale = float_ptr(u_scale, "u_scale", out_features, keep_u_scale);
    job.vh_scale = float_ptr(vh_scale, "vh_scale", job.rank, keep_vh_scale);
    TORCH_CHECK(job.u_scale && job.vh_scale, "u_scale and vh_scale are required with u and vh");
  }
  TORCH_CHECK(job.codes || job.rank, "neither a base nor a low-rank part was given");
  job.bias = float_ptr(bias, "bias", out_features, keep_bias);

  thread_local std::vector<int8_t> xq, xq4;
  thread_local std::vector<float> xd, xsum, t;
  const int64_t n = static_cast<int64_t>(rows) * in;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());
  job.xq = scratch(xq, n);
  job.xq4 = job.bits == 4 ? scratch(xq4, n) : job.xq;
  job.xd = scratch(xd, n / 32);
  job.xsum = scratch(xsum, static_cast<int64_t>(rows) * std::max(job.groups, 1));
  job.t = scratch(t, static_cast<int64_t>(rows) * std::max(job.rank, 1));
  job.out = out.data_ptr<float>();
  quantize_activations(x.data_ptr<float>(), rows, in, job.group_size, const_cast<int8_t*>(job.xq),
                       job.bits == 4 ? const_cast<int8_t*>(job.xq4) : nullptr, const_cast<float*>(job.xd),
                       const_cast<float*>(job.xsum));
  const Kernels k = kernels_for(isa);
  if (job.rank) run(k.hidden, job, job.rank, static_cast<int64_t>(job.rank) * in, min_parallel);
  const int64_t weights = out_features * static_cast<int64_t>(in) * (job.codes ? 1 : 0) + out_features * job.rank;
  run(k.residual, job, out_features, weights, min_parallel);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_svdq integer dot-product decode kernels (CPU)";
  m.def("forward", &forward, "x (Q + L R)^T + bias with int8 activations");
  m.def("best_isa", &best_isa, "the fastest instruction set this CPU supports (0 scalar, 1 AVX2, 2 AVX-VNNI, 3 AVX-512 VNNI)");
  m.def("supports", &supports, "whether this CPU supports an instruction set");
}
