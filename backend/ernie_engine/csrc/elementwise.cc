// RMSNorm, interleaved rotary embedding and SwiGLU for fp32 activations: the per-layer element-wise steps
// that, as chains of small Paddle ops (pow, mean, rsqrt, stack, ...) or single-threaded ones (swiglu), cost
// as much as a decode step's matmuls. The fused forms save a decode step the dispatch of the small ops around
// them (a few microseconds each, per layer), with the same arithmetic, so results are bit-identical.
//
// rms_norm: y[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps), sums in fp32.
// add_rms_norm: s = x + residual, then (rms_norm(s), s): the residual add before each norm of a layer.
// rotary: pairs (x[2i], x[2i + 1]) of every head of token t rotated by the angle whose cos / sin are
// cos[t, i] / sin[t, i] (layers/rotary.RotaryEmbedding computes them once per forward).
// rotary_kv_write: the attention input from the fused q/k/v projection's output [T, (H + 2 KVH) * D]
// (per token: q heads, k heads, v heads): q and k rotated as by `rotary`, k and v stored into paged caches
// [S, KVH, D] at slots[t] (fp32, or bf16 rounded to nearest even as Paddle's cast rounds); returns q
// [T, H, D].
// swiglu: y[t] = silu(x[t, :I]) * x[t, I:] for x [T, 2I] (the fused gate / up projection's output).
#include <cmath>
#include <vector>

#include "cpu_kernels.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace ernie {
namespace {

void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

// One head's pairs rotated: shared by `rotary` and `rotary_kv_write` (baseline ISA, no FMA contraction).
void rotate_head(const float* in, const float* c, const float* s, int64_t half, float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float even = in[2 * i], odd = in[2 * i + 1];
    out[2 * i] = even * c[i] - odd * s[i];
    out[2 * i + 1] = odd * c[i] + even * s[i];
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

void rms_norm_row_avx512(const float* x, const float* w, int64_t n, float eps, float* y) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lane_mask(n - i), x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + eps);
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = lane_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), scale);
    _mm512_mask_storeu_ps(y + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, w + i), v));
  }
}

// silu(a) * b, 16 lanes: sigmoid from e = exp(-|a|) (never overflows): 1 / (1 + e) for a >= 0, e / (1 + e)
// below.
inline __m512 silu_mul(__m512 a, __m512 b) {
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(a)));
  const __m512 one = _mm512_set1_ps(1.f);
  const __mmask16 negative = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
  return _mm512_mul_ps(_mm512_mul_ps(a, sigmoid), b);
}

void swiglu_row_avx512(const float* x, int64_t half, float* y) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 mask = lane_mask(half - i);
    const __m512 a = _mm512_maskz_loadu_ps(mask, x + i), b = _mm512_maskz_loadu_ps(mask, x + half + i);
    _mm512_mask_storeu_ps(y + i, mask, silu_mul(a, b));
  }
}

#pragma GCC pop_options

void swiglu_row(const float* x, int64_t half, float* y) {
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] / (1.f + std::exp(-x[i])) * x[half + i];
}

// fn(r) for every row r, in ~16 chunks over the pool (a decode row alone runs on the calling thread).
template <class Fn>
void for_each_row(int64_t rows, const Fn& fn) {
  const int64_t per_chunk = std::max<int64_t>(1, rows / 16);
  ThreadPool::instance().run((rows + per_chunk - 1) / per_chunk, [&](int64_t c) {
    for (int64_t r = c * per_chunk; r < std::min(rows, (c + 1) * per_chunk); ++r) fn(r);
  });
}

void check_fp32(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32, what, " must be a CPU fp32 tensor");
}

using NormRowFn = void (*)(const float*, const float*, int64_t, float, float*);

NormRowFn norm_row_fn() { return use_avx512() ? rms_norm_row_avx512 : rms_norm_row; }

}  // namespace

// x [..., H], weight [H] -> y like x.
std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight, float eps) {
  check_fp32(x, "x");
  check_fp32(weight, "weight");
  const int64_t n = weight.numel();
  PD_CHECK(x.dims().size() >= 1 && x.dims()[x.dims().size() - 1] == n, "x's last dimension must be ", n);
  const int64_t rows = x.numel() / n;
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  const float *xp = x.data<float>(), *wp = weight.data<float>();
  float* yp = y.data<float>();
  const NormRowFn row_fn = norm_row_fn();
  for_each_row(rows, [&](int64_t r) { row_fn(xp + r * n, wp, n, eps, yp + r * n); });
  return {y};
}

// x, residual [..., H], weight [H] -> (rms_norm(x + residual), x + residual).
std::vector<paddle::Tensor> AddRmsNorm(const paddle::Tensor& x, const paddle::Tensor& residual,
                                       const paddle::Tensor& weight, float eps) {
  for (const auto* t : {&x, &residual, &weight}) check_fp32(*t, "x, residual and weight");
  const int64_t n = weight.numel();
  PD_CHECK(x.dims().size() >= 1 && x.dims()[x.dims().size() - 1] == n, "x's last dimension must be ", n);
  PD_CHECK(residual.dims() == x.dims(), "residual must be shaped like x");
  const int64_t rows = x.numel() / n;
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  auto sum = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  const float *xp = x.data<float>(), *rp = residual.data<float>(), *wp = weight.data<float>();
  float *yp = y.data<float>(), *sp = sum.data<float>();
  const NormRowFn row_fn = norm_row_fn();
  for_each_row(rows, [&](int64_t r) {
    float* s = sp + r * n;
    for (int64_t i = 0; i < n; ++i) s[i] = xp[r * n + i] + rp[r * n + i];
    row_fn(s, wp, n, eps, yp + r * n);
  });
  return {y, sum};
}

// x [T, heads, D]; cos, sin [T, D/2] (any shape with T * D/2 elements) -> rotated copy of x.
std::vector<paddle::Tensor> Rotary(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& sin) {
  for (const auto* t : {&x, &cos, &sin}) check_fp32(*t, "x, cos and sin");
  PD_CHECK(x.dims().size() == 3 && x.dims()[2] % 2 == 0, "x must be [tokens, heads, even head_dim]");
  const int64_t tokens = x.dims()[0], heads = x.dims()[1], half = x.dims()[2] / 2;
  PD_CHECK(cos.numel() == tokens * half && sin.numel() == tokens * half, "cos and sin must be [tokens, head_dim/2]");
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  const float *xp = x.data<float>(), *cp = cos.data<float>(), *sp = sin.data<float>();
  float* yp = y.data<float>();
  for (int64_t t = 0; t < tokens; ++t) {  // a few thousand pairs per decode token: not worth threads
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t at = (t * heads + h) * 2 * half;
      rotate_head(xp + at, cp + t * half, sp + t * half, half, yp + at);
    }
  }
  return {y};
}

// qkv [T, (H + 2 KVH) * D]; cos, sin [T, D/2] (any shape with T * D/2 elements); caches [S, KVH, D] (written
// in place); slots [T] int64 -> q [T, H, D].
std::vector<paddle::Tensor> RotaryKvWrite(const paddle::Tensor& qkv, const paddle::Tensor& cos,
                                          const paddle::Tensor& sin, paddle::Tensor& key_cache,
                                          paddle::Tensor& value_cache, const paddle::Tensor& slots) {
  for (const auto* t : {&qkv, &cos, &sin}) check_fp32(*t, "qkv, cos and sin");
  check_caches(key_cache, value_cache);
  const int64_t num_slots = key_cache.dims()[0], kv_heads = key_cache.dims()[1], dim = key_cache.dims()[2];
  PD_CHECK(dim % 2 == 0 && qkv.dims().size() == 2 && qkv.dims()[1] % dim == 0 &&
               qkv.dims()[1] / dim > 2 * kv_heads,
           "qkv must be [tokens, (heads + 2 * kv_heads) * head_dim]");
  const int64_t tokens = qkv.dims()[0], heads = qkv.dims()[1] / dim - 2 * kv_heads, half = dim / 2;
  PD_CHECK(cos.numel() == tokens * half && sin.numel() == tokens * half, "cos and sin must be [tokens, head_dim/2]");
  PD_CHECK(slots.is_cpu() && slots.dtype() == paddle::DataType::INT64 && slots.numel() == tokens,
           "slots must be CPU int64 [tokens]");
  const int64_t* sl = slots.data<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) PD_CHECK(sl[t] >= 0 && sl[t] < num_slots, "slot ", sl[t], " out of range");
  auto q = paddle::empty({tokens, heads, dim}, paddle::DataType::FLOAT32, qkv.place());
  const float *in = qkv.data<float>(), *cp = cos.data<float>(), *sp = sin.data<float>();
  float* qp = q.data<float>();
  const int64_t width = (heads + 2 * kv_heads) * dim;
  with_cache_elements(key_cache, value_cache, [&](auto* kp, auto* vp) {
    const int64_t kv_width = kv_heads * dim;
    std::vector<float> k(kv_width);
    for (int64_t t = 0; t < tokens; ++t) {  // as in `rotary`: not worth threads
      const float *row = in + t * width, *c = cp + t * half, *s = sp + t * half;
      for (int64_t h = 0; h < heads; ++h) rotate_head(row + h * dim, c, s, half, qp + (t * heads + h) * dim);
      for (int64_t h = 0; h < kv_heads; ++h) rotate_head(row + (heads + h) * dim, c, s, half, k.data() + h * dim);
      const float* v = row + (heads + kv_heads) * dim;
      for (int64_t i = 0; i < kv_width; ++i) {
        store_float(k[i], kp + sl[t] * kv_width + i);
        store_float(v[i], vp + sl[t] * kv_width + i);
      }
    }
  });
  return {q};
}

// x [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I].
std::vector<paddle::Tensor> Swiglu(const paddle::Tensor& x) {
  check_fp32(x, "x");
  PD_CHECK(x.dims().size() == 2 && x.dims()[1] % 2 == 0, "x must be [tokens, 2 * width]");
  const int64_t rows = x.dims()[0], half = x.dims()[1] / 2;
  auto y = paddle::empty({rows, half}, paddle::DataType::FLOAT32, x.place());
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  const auto row_fn = use_avx512() ? swiglu_row_avx512 : swiglu_row;
  for_each_row(rows, [&](int64_t r) { row_fn(xp + r * 2 * half, half, yp + r * half); });
  return {y};
}

std::vector<std::vector<int64_t>> SwigluShape(const std::vector<int64_t>& x) { return {{x[0], x[1] / 2}}; }
std::vector<paddle::DataType> Fp32x1(const paddle::DataType&) { return {paddle::DataType::FLOAT32}; }

std::vector<std::vector<int64_t>> SameAsX(const std::vector<int64_t>& x, const std::vector<int64_t>&) { return {x}; }
std::vector<std::vector<int64_t>> SameAsX3(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                           const std::vector<int64_t>&) {
  return {x};
}
std::vector<paddle::DataType> Fp32(const paddle::DataType&, const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}
std::vector<paddle::DataType> Fp32x3(const paddle::DataType&, const paddle::DataType&, const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> AddRmsNormShape(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                                  const std::vector<int64_t>&) {
  return {x, x};
}
std::vector<paddle::DataType> AddRmsNormDtype(const paddle::DataType&, const paddle::DataType&,
                                              const paddle::DataType&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

using Shape = std::vector<int64_t>;
std::vector<Shape> RotaryKvWriteShape(const Shape& qkv, const Shape&, const Shape&, const Shape& key_cache,
                                      const Shape&, const Shape&) {
  return {{qkv[0], qkv[1] / key_cache[2] - 2 * key_cache[1], key_cache[2]}};
}
std::vector<paddle::DataType> RotaryKvWriteDtype(const paddle::DataType&, const paddle::DataType&,
                                                 const paddle::DataType&, const paddle::DataType&,
                                                 const paddle::DataType&, const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace ernie

PD_BUILD_OP(ernie_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(ernie::RmsNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::SameAsX))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::Fp32));

PD_BUILD_OP(ernie_add_rms_norm)
    .Inputs({"X", "Residual", "Weight"})
    .Outputs({"Out", "Sum"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(ernie::AddRmsNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::AddRmsNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::AddRmsNormDtype));

PD_BUILD_OP(ernie_rotary_kv_write)
    .Inputs({"Qkv", "Cos", "Sin", "KeyCache", "ValueCache", "Slots"})
    .Outputs({"Q", "KeyCacheOut", "ValueCacheOut"})
    .SetInplaceMap({{"KeyCache", "KeyCacheOut"}, {"ValueCache", "ValueCacheOut"}})
    .SetKernelFn(PD_KERNEL(ernie::RotaryKvWrite))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::RotaryKvWriteShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::RotaryKvWriteDtype));

PD_BUILD_OP(ernie_rotary)
    .Inputs({"X", "Cos", "Sin"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(ernie::Rotary))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::SameAsX3))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::Fp32x3));

PD_BUILD_OP(ernie_swiglu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(ernie::Swiglu))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::SwigluShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::Fp32x1));
