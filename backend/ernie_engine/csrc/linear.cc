// y[M, N] = x[M, K] (fp32) @ W^T + bias with W held as int8 or packed int4, never expanded to fp32 (bf16
// weights: linear_bf16.cc).
//
// Weight layout: output-major rows, W[N, K] (the -Paddle [K, N] weight transposed once at load), so each
// output column is one contiguous stream. Decode (M of 1..32) is bound by weight bandwidth: each thread
// streams a few rows at once while x stays in L1. Rows carry fp32 scales [N, G] (G groups along K, G = 1 per
// channel) and are dequantized in registers; int4 bytes hold k = 2j in the low nibble and k = 2j + 1 in the
// high one (layers/quant's convention). Rather than shuffle nibbles, x is reordered once per call so that
// each 16-byte chunk meets its 16 even and 16 odd activations as two plain vectors.
//
// Numerics: fp32 products of the exact weight values with fp32 accumulation, i.e. an fp32 matmul on the same
// dequantized weights up to summation order.
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace ernie {
namespace {

// Storage formats. `kVecs` fp32 vectors come out of one `kStepBytes` chunk of a weight row, which holds 16
// `units` (the lanes of one masked load).
struct Int8 {
  static constexpr int kVecs = 1, kStepBytes = 16;
  static int64_t row_bytes(int64_t k) { return k; }
  static int64_t units(int64_t k) { return k; }
  static float get(const uint8_t* row, int64_t k) { return static_cast<int8_t>(row[k]); }
};
struct Int4 {
  static constexpr int kVecs = 2, kStepBytes = 16;
  static int64_t row_bytes(int64_t k) { return k / 2; }
  static int64_t units(int64_t k) { return k / 2; }
  static float get(const uint8_t* row, int64_t k) {
    const int8_t byte = static_cast<int8_t>(row[k / 2]);
    return (k % 2) ? (byte >> 4) : static_cast<int8_t>(static_cast<uint8_t>(byte << 4)) >> 4;
  }
};

// Portable path: one output at a time, groups scaled as the AVX512 path does.
template <class F>
void linear_scalar(const float* x, int64_t m_rows, int64_t k_dim, const uint8_t* w, int64_t n_cols,
                   const float* scale, int64_t groups, const float* bias, float* y) {
  const int64_t row_bytes = F::row_bytes(k_dim), group_k = k_dim / std::max<int64_t>(groups, 1);
  ThreadPool::instance().run(n_cols, [&](int64_t n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* xr = x + m * k_dim;
      float acc = 0.f;
      if (scale == nullptr) {
        for (int64_t k = 0; k < k_dim; ++k) acc += xr[k] * F::get(row, k);
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          float part = 0.f;
          for (int64_t k = g * group_k; k < (g + 1) * group_k; ++k) part += xr[k] * F::get(row, k);
          acc += part * scale[n * groups + g];
        }
      }
      y[m * n_cols + n] = acc + (bias ? bias[n] : 0.f);
    }
  });
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

inline void load_weights(Int8, const uint8_t* p, __mmask16 mask, __m512* out) {
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
inline void load_weights(Int4, const uint8_t* p, __mmask16 mask, __m512* out) {
  const __m512i bytes = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p));  // sign-extended
  out[0] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(bytes, 28), 28));  // even k
  out[1] = _mm512_cvtepi32_ps(_mm512_srai_epi32(bytes, 4));                           // odd k
}

// One step (kStepBytes of each of NR weight rows) for MR rows of prepared x into acc.
template <class F, int MR, int NR>
inline void step(const float* xp, int64_t xs, const uint8_t* w, int64_t ws, int64_t s, __mmask16 mask,
                 __m512 (&acc)[MR][NR]) {
  __m512 wv[NR][F::kVecs];
  for (int r = 0; r < NR; ++r) load_weights(F{}, w + r * ws + s * F::kStepBytes, mask, wv[r]);
  for (int v = 0; v < F::kVecs; ++v) {
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(xp + m * xs + (s * F::kVecs + v) * 16);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r][v], acc[m][r]);
    }
  }
}

// y[MR, NR] block. Groups (GROUPED) scale partial sums per group; otherwise a per-row scale (or none,
// none) is applied once at the end. Only ungrouped rows can end in a partial step (`tail` units).
template <class F, int MR, int NR, bool GROUPED>
void tile(const float* xp, int64_t xs, const uint8_t* w, int64_t ws, int64_t steps, int64_t tail,
          const float* scale, int64_t groups, const float* bias, float* y, int64_t ys) {
  __m512 acc[MR][NR];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  if constexpr (GROUPED) {
    const int64_t per_group = steps / groups;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[MR][NR];
      for (auto& row : part)
        for (auto& a : row) a = _mm512_setzero_ps();
      for (int64_t s = g * per_group; s < (g + 1) * per_group; ++s)
        step<F, MR, NR>(xp, xs, w, ws, s, 0xFFFF, part);
      for (int r = 0; r < NR; ++r) {
        const __m512 sc = _mm512_set1_ps(scale[r * groups + g]);
        for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_fmadd_ps(part[m][r], sc, acc[m][r]);
      }
    }
  } else {
    for (int64_t s = 0; s < steps - 1; ++s) {
      if constexpr (MR == 1) {  // decode streams NR rows at once: ask for each a few lines ahead (~4 % measured)
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * ws + (s + 8) * F::kStepBytes), _MM_HINT_T0);
      }
      step<F, MR, NR>(xp, xs, w, ws, s, 0xFFFF, acc);
    }
    step<F, MR, NR>(xp, xs, w, ws, steps - 1, lane_mask(tail), acc);
  }
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < NR; ++r) {
      float v = _mm512_reduce_add_ps(acc[m][r]);
      if (!GROUPED && scale) v *= scale[r];
      y[m * ys + r] = v + (bias ? bias[r] : 0.f);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, const float*, int64_t,
                        const float*, float*, int64_t);

template <class F, int NR, bool GROUPED>
TileFn pick_tile(int64_t mr) {
  switch (mr) {
    case 1: return tile<F, 1, NR, GROUPED>;
    case 2: return tile<F, 2, NR, GROUPED>;
    case 3: return tile<F, 3, NR, GROUPED>;
    default: return tile<F, 4, NR, GROUPED>;
  }
}

template <class F, bool GROUPED>
void linear_avx512_impl(const float* x, int64_t m_rows, int64_t k_dim, const uint8_t* w, int64_t n_cols,
                        const float* scale, int64_t groups, const float* bias, float* y) {
  // Units (elements or bytes) a weight row holds, and the steps covering them.
  const int64_t row_bytes = F::row_bytes(k_dim);
  const int64_t units = F::units(k_dim);
  const int64_t steps = (units + 15) / 16, tail = units - (steps - 1) * 16;
  const int64_t kp = steps * 16 * F::kVecs;  // prepared x row length (zero padded)

  // Prepared x: rows padded to whole steps; for int4 each step is [16 even k, 16 odd k].
  std::vector<float> xp(static_cast<size_t>(m_rows * kp), 0.f);
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* src = x + m * k_dim;
    float* dst = xp.data() + m * kp;
    if (F::kVecs == 1) {
      std::copy(src, src + k_dim, dst);
    } else {
      for (int64_t j = 0; j < k_dim / 2; ++j) {
        dst[(j / 16) * 32 + j % 16] = src[2 * j];
        dst[(j / 16) * 32 + 16 + j % 16] = src[2 * j + 1];
      }
    }
  }
  // Decode streams 8 rows per thread; larger M blocks 4 rows x up to 4 (2 when grouped) x rows in registers.
  const int64_t max_mr = GROUPED ? 2 : 4;
  const int64_t nr = m_rows == 1 ? 8 : 4;
  // x chunk kept in L2 while every thread streams its share of the weight rows over it.
  const int64_t mc = std::max<int64_t>(max_mr, (256 * 1024 / (kp * 4)) / max_mr * max_mr);
  const int64_t n_blocks = (n_cols + nr - 1) / nr;
  for (int64_t m0 = 0; m0 < m_rows; m0 += mc) {
    const int64_t m1 = std::min(m_rows, m0 + mc);
    // Chunks of ~1/32 of the rows, claimed dynamically: a thread that runs late finds less left to do.
    const int64_t per_chunk = std::max<int64_t>(1, n_blocks / 32);
    const int64_t chunks = (n_blocks + per_chunk - 1) / per_chunk;
    ThreadPool::instance().run(chunks, [&](int64_t c) {
      for (int64_t b = c * per_chunk; b < std::min(n_blocks, (c + 1) * per_chunk); ++b) {
        const int64_t n0 = b * nr, nb = std::min(nr, n_cols - n0);
        const uint8_t* wb = w + n0 * row_bytes;
        const float* sb = scale ? scale + n0 * groups : nullptr;
        const float* bb = bias ? bias + n0 : nullptr;
        for (int64_t m = m0; m < m1; m += max_mr) {
          const int64_t mr = std::min(max_mr, m1 - m);
          const float* xm = xp.data() + m * kp;
          float* ym = y + m * n_cols + n0;
          if (nb == 8) {
            tile<F, 1, 8, GROUPED>(xm, kp, wb, row_bytes, steps, tail, sb, groups, bb, ym, n_cols);
          } else if (nb == 4) {
            pick_tile<F, 4, GROUPED>(mr)(xm, kp, wb, row_bytes, steps, tail, sb, groups, bb, ym, n_cols);
          } else {
            for (int64_t r = 0; r < nb; ++r)
              pick_tile<F, 1, GROUPED>(mr)(xm, kp, wb + r * row_bytes, row_bytes, steps, tail,
                                           sb ? sb + r * groups : nullptr, groups, bb ? bb + r : nullptr,
                                           ym + r, n_cols);
          }
        }
      }
    });
  }
}

// fp32 copy of weight rows [n0, n1): out[n, k] = W[n, k] * scale (of k's group).
template <class F>
void dequantize_rows_avx512(const uint8_t* w, int64_t n0, int64_t n1, int64_t k_dim, const float* scale,
                            int64_t groups, float* out) {
  const int64_t row_bytes = F::row_bytes(k_dim);
  const int64_t units = F::units(k_dim);
  const int64_t steps = (units + 15) / 16, tail = units - (steps - 1) * 16;
  const int64_t group_steps = groups > 1 ? steps / groups : steps;  // grouped rows have no partial step
  // int4 steps yield 16 even and 16 odd k: interleave them back into k order.
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    float* dst = out + n * k_dim;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t left = s + 1 < steps ? 16 : tail;
      __m512 v[2];
      load_weights(F{}, row + s * F::kStepBytes, lane_mask(left), v);
      const __m512 sc = _mm512_set1_ps(scale ? scale[n * groups + s / group_steps] : 1.f);
      if constexpr (F::kVecs == 1) {
        _mm512_mask_storeu_ps(dst + s * 16, lane_mask(left), _mm512_mul_ps(v[0], sc));
      } else {
        const __m512 even = _mm512_mul_ps(v[0], sc), odd = _mm512_mul_ps(v[1], sc);
        _mm512_mask_storeu_ps(dst + s * 32, lane_mask(2 * left), _mm512_permutex2var_ps(even, lo_idx, odd));
        _mm512_mask_storeu_ps(dst + s * 32 + 16, lane_mask(std::max<int64_t>(0, 2 * left - 16)),
                              _mm512_permutex2var_ps(even, hi_idx, odd));
      }
    }
  }
}

#pragma GCC pop_options

template <class F>
void dequantize_rows_scalar(const uint8_t* w, int64_t n0, int64_t n1, int64_t k_dim, const float* scale,
                            int64_t groups, float* out) {
  const int64_t row_bytes = F::row_bytes(k_dim), group_k = k_dim / std::max<int64_t>(groups, 1);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < k_dim; ++k) {
      const float sc = scale ? scale[n * groups + k / group_k] : 1.f;
      out[n * k_dim + k] = F::get(w + n * row_bytes, k) * sc;
    }
  }
}

template <class F>
void dequantize(const uint8_t* w, int64_t n_cols, int64_t k_dim, const float* scale, int64_t groups, float* out) {
  const bool avx512 = use_avx512();
  const int64_t per_chunk = std::max<int64_t>(1, n_cols / 64);
  ThreadPool::instance().run((n_cols + per_chunk - 1) / per_chunk, [&](int64_t c) {
    const int64_t n0 = c * per_chunk, n1 = std::min(n_cols, n0 + per_chunk);
    if (avx512) {
      dequantize_rows_avx512<F>(w, n0, n1, k_dim, scale, groups, out);
    } else {
      dequantize_rows_scalar<F>(w, n0, n1, k_dim, scale, groups, out);
    }
  });
}

template <class F>
void linear_dispatch(const float* x, int64_t m_rows, int64_t k_dim, const uint8_t* w, int64_t n_cols,
                     const float* scale, int64_t groups, const float* bias, float* y) {
  if (m_rows == 0 || n_cols == 0) return;
  if (!use_avx512()) return linear_scalar<F>(x, m_rows, k_dim, w, n_cols, scale, groups, bias, y);
  if (groups > 1) return linear_avx512_impl<F, true>(x, m_rows, k_dim, w, n_cols, scale, groups, bias, y);
  linear_avx512_impl<F, false>(x, m_rows, k_dim, w, n_cols, scale, groups, bias, y);
}

const float* bias_ptr(const paddle::optional<paddle::Tensor>& bias, int64_t n_cols) {
  if (!bias) return nullptr;
  PD_CHECK(bias->dtype() == paddle::DataType::FLOAT32 && bias->numel() == n_cols, "bias must be fp32 [N]");
  return bias->data<float>();
}

void check_x(const paddle::Tensor& x, int64_t k_dim) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "x must be a CPU fp32 tensor");
  PD_CHECK(x.dims().size() == 2 && x.dims()[1] == k_dim, "x must be [M, K] with K = ", k_dim);
}

}  // namespace

// `w` int8 [N, K] (bits 8) or [N, K/2] (bits 4, two per byte); `scale` fp32 [N, G].
std::vector<paddle::Tensor> LinearInt(const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& scale,
                                      const paddle::optional<paddle::Tensor>& bias, int bits) {
  PD_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  PD_CHECK(w.dtype() == paddle::DataType::INT8 && w.dims().size() == 2, "w must be int8 [N, K or K/2]");
  const int64_t n_cols = w.dims()[0], k_dim = w.dims()[1] * (bits == 4 ? 2 : 1), m_rows = x.dims()[0];
  check_x(x, k_dim);
  PD_CHECK(scale.dtype() == paddle::DataType::FLOAT32 && scale.dims().size() == 2 && scale.dims()[0] == n_cols,
           "scale must be fp32 [N, G]");
  const int64_t groups = scale.dims()[1];
  // Groups must cover whole vector steps (16 int8 or 32 int4 values).
  PD_CHECK(groups == 1 || (k_dim % groups == 0 && (k_dim / groups) % (bits == 4 ? 32 : 16) == 0),
           "group size must be a multiple of ", bits == 4 ? 32 : 16);
  auto y = paddle::empty({m_rows, n_cols}, paddle::DataType::FLOAT32, x.place());
  const auto* wp = static_cast<const uint8_t*>(w.data());
  const float* bp = bias_ptr(bias, n_cols);
  if (bits == 8) {
    linear_dispatch<Int8>(x.data<float>(), m_rows, k_dim, wp, n_cols, scale.data<float>(), groups, bp, y.data<float>());
  } else {
    linear_dispatch<Int4>(x.data<float>(), m_rows, k_dim, wp, n_cols, scale.data<float>(), groups, bp, y.data<float>());
  }
  return {y};
}

// fp32 copy [N, K] of a kernel-layout int weight (int8 `w` [N, K] for bits 8, [N, K/2] for bits 4, fp32
// `scale` [N, G]). Prefill-sized batches multiply it with Paddle's sgemm, which beats streaming at large M.
std::vector<paddle::Tensor> Dequantize(const paddle::Tensor& w, const paddle::Tensor& scale, int bits) {
  PD_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  PD_CHECK(w.dims().size() == 2 && w.dtype() == paddle::DataType::INT8, "w must be int8 [N, K or K/2]");
  const int64_t n_cols = w.dims()[0], k_dim = w.dims()[1] * (bits == 4 ? 2 : 1), groups = scale.dims()[1];
  PD_CHECK(scale.dtype() == paddle::DataType::FLOAT32 && scale.dims()[0] == n_cols && k_dim % groups == 0 &&
               (groups == 1 || (k_dim / groups) % (bits == 4 ? 32 : 16) == 0),
           "scale must be fp32 [N, G] with whole vector steps per group");
  auto out = paddle::empty({n_cols, k_dim}, paddle::DataType::FLOAT32, w.place());
  const auto* wp = static_cast<const uint8_t*>(w.data());
  if (bits == 8) dequantize<Int8>(wp, n_cols, k_dim, scale.data<float>(), groups, out.data<float>());
  if (bits == 4) dequantize<Int4>(wp, n_cols, k_dim, scale.data<float>(), groups, out.data<float>());
  return {out};
}

std::vector<std::vector<int64_t>> LinearIntShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                 const std::vector<int64_t>&,
                                                 const paddle::optional<std::vector<int64_t>>&) {
  return {{x[0], w[0]}};
}

std::vector<std::vector<int64_t>> DequantizeShape(const std::vector<int64_t>& w, const std::vector<int64_t>&,
                                                  int bits) {
  return {{w[0], w[1] * (bits == 4 ? 2 : 1)}};
}

std::vector<paddle::DataType> DequantizeDtype(const paddle::DataType&, const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

std::vector<paddle::DataType> LinearIntDtype(const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
                                             const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace ernie

PD_BUILD_OP(ernie_linear_int)
    .Inputs({"X", "W", "Scale", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"bits: int"})
    .SetKernelFn(PD_KERNEL(ernie::LinearInt))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::LinearIntShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::LinearIntDtype));

PD_BUILD_OP(ernie_dequantize)
    .Inputs({"W", "Scale"})
    .Outputs({"Out"})
    .Attrs({"bits: int"})
    .SetKernelFn(PD_KERNEL(ernie::Dequantize))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::DequantizeShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::DequantizeDtype));
