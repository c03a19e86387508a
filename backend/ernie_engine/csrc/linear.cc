// y[M, N] = x[M, K] (fp32) @ W^T + bias for weights held as bf16, int8 or int4 in the packed "k-pair" layout.
//
// Layout (made once at load by layers/cpu_kernels.pack_weight): W[N, K] is cut into blocks of 16 output
// columns; block b holds, for each pair p of input rows, the 16 columns' (W[n, 2p], W[n, 2p + 1]) side by
// side: P[b][p][16 lanes][pair], N padded to a multiple of 16 and K to an even count with zeros. A pair is
// two bf16 (64 bytes per step of a block), two int8 (32 bytes), or one byte of two int4 (16 bytes: 2p in the
// low nibble, 2p + 1 in the high one, layers/quant's order). int weights carry fp32 scales [G, N_pad]
// (G groups of whole pairs along K; G = 1 per channel). One step of a block becomes 16 bf16 pairs in a
// register - int8 and int4 values are exact in bf16 - and vdpbf16ps (AVX512-BF16) multiplies them with a
// broadcast x pair: 16 outputs gain two products each, with no horizontal reductions and one sequential
// stream per block.
//
// Numerics: x is rounded to bf16 (nearest, ties to even), as a bf16 model computes on XPU/GPU and in
// vLLM-CPU (W4A8's int8-valued activations stay exact); the products are exact in fp32 and each output sums
// its pairs in k order in fp32, group by group, each group's sum times its scale. That order is the same for
// every batch size and tile shape, so a sequence's logits do not depend on the batch it runs in. CPUs with
// AVX512 but not AVX512-BF16 split each pair into two fp32 FMAs; the scalar path computes the same sums one
// output at a time.
//
// Tiling, two shapes. Up to kMR (6) rows - decode of a few sequences, bound by memory - a tile is the rows
// against kNV (4) column blocks: four sequential weight streams per thread, one pass. More rows: a tall tile
// is up to kTallRows (16) rows against one block, so that at decode sizes the weights stream from memory once
// while the arithmetic of all 16 rows overlaps the stream (the old 6 x 4 tile run over 16 rows streamed on
// its first row tile and computed from L2 on the others, one after the other: 1.2-1.3x slower at M = 16);
// past 16 rows the next row chunk reuses the block from L1/L2. The 16 rows' x pairs are broadcast straight
// from memory; x rows are padded by a cache line (`x_stride_for`) because rows a power of two apart would
// share L1 sets and evict each other. Measured (`bench_kernels.py`, two threads): the LM head at M = 16
// ~400 GFLOP/s (from ~310), about the machine's vdpbf16ps peak; up to 6 rows the 4-stream tile measured
// 2-19 % faster than one stream (docs/PERFORMANCE.md).
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace ernie {
namespace {

constexpr int64_t kLanes = 16;  // outputs per column block
constexpr int kNV = 4;          // column blocks per tile
constexpr int kMR = 6;          // most x rows of a small-batch tile: 6 x 4 accumulators + 4 weight vectors
constexpr int kTallRows = 16;   // x rows of a tall tile: 16 accumulators against one block
// How far ahead (bytes of a block's stream) the tiles prefetch: one 4 KiB page, so that the next page's
// translation and first lines are on their way before the stream reaches it (see `tile`).
constexpr int64_t kPrefetchAhead = 4096;

// Weight formats: bytes per (lane, pair), and one pair's two values for the scalar path.
struct Bf16 {
  static constexpr int kPairBytes = 4;
  static void pair(const uint8_t* p, float* even, float* odd) {
    const auto* v = reinterpret_cast<const uint16_t*>(p);
    *even = bf16_to_float(v[0]);
    *odd = bf16_to_float(v[1]);
  }
};
struct Int8 {
  static constexpr int kPairBytes = 2;
  static void pair(const uint8_t* p, float* even, float* odd) {
    *even = static_cast<int8_t>(p[0]);
    *odd = static_cast<int8_t>(p[1]);
  }
};
struct Int4 {
  static constexpr int kPairBytes = 1;
  static void pair(const uint8_t* p, float* even, float* odd) {
    const auto byte = static_cast<int8_t>(p[0]);
    *even = static_cast<int8_t>(static_cast<uint8_t>(byte << 4)) >> 4;
    *odd = byte >> 4;
  }
};

struct Problem {
  const uint32_t* xp;  // x rounded to bf16, as pairs: xp[m * x_stride + p] = bf16(x[m][2p]) | bf16(x[m][2p + 1]) << 16
  int64_t x_stride, m_rows, pairs, groups, n_cols, n_pad;
  const uint8_t* w;
  const float* scale;  // [groups, n_pad], or nullptr (bf16)
  const float* bias;   // [n_cols], or nullptr
  float* y;
};

// Words between rows of packed x: whole 16-word chunks (the vector path writes 16 at a time) plus one cache
// line, so that rows a power of two apart do not share L1 sets when a tile reads 16 of them at once.
int64_t x_stride_for(int64_t pairs) { return (pairs + 15) / 16 * 16 + 16; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
// float_to_bf16 on 16 lanes (the same bits, NaN included).
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

// One row: 32 floats -> 16 words per step (little-endian pairs), zeros past k_dim.
void pack_row_avx512(const float* row, int64_t k_dim, uint32_t* out) {
  for (int64_t k = 0; k < k_dim; k += 32) {
    const __m512 lo = _mm512_maskz_loadu_ps(lane_mask(k_dim - k), row + k);
    const __m512 hi = _mm512_maskz_loadu_ps(lane_mask(std::max<int64_t>(0, k_dim - k - 16)), row + k + 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k / 2), to_bf16(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k / 2 + 8), to_bf16(hi));
  }
}
#pragma GCC pop_options

std::vector<uint32_t> pack_x(const float* x, int64_t m_rows, int64_t k_dim, int64_t stride) {
  std::vector<uint32_t> xp(static_cast<size_t>(m_rows * stride), 0);
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* row = x + m * k_dim;
    if (use_avx512()) {
      pack_row_avx512(row, k_dim, xp.data() + m * stride);
      continue;
    }
    for (int64_t k = 0; k < k_dim; ++k)
      xp[m * stride + k / 2] |= static_cast<uint32_t>(float_to_bf16(row[k])) << (16 * (k % 2));
  }
  return xp;
}

// Portable path: one output at a time, in the vector paths' order (pairs in k order, group by group).
template <class F>
void linear_scalar(const Problem& pr) {
  const int64_t block_bytes = pr.pairs * kLanes * F::kPairBytes, group_pairs = pr.pairs / pr.groups;
  ThreadPool::instance().run(pr.n_cols, [&](int64_t n) {
    const uint8_t* col = pr.w + (n / kLanes) * block_bytes + (n % kLanes) * F::kPairBytes;
    for (int64_t m = 0; m < pr.m_rows; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < pr.groups; ++g) {
        float part = 0.f;
        for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
          const uint32_t xv = pr.xp[m * pr.x_stride + p];
          float even, odd;
          F::pair(col + p * kLanes * F::kPairBytes, &even, &odd);
          part += bf16_to_float(static_cast<uint16_t>(xv)) * even + bf16_to_float(static_cast<uint16_t>(xv >> 16)) * odd;
        }
        acc += pr.scale ? part * pr.scale[g * pr.n_pad + n] : part;
      }
      pr.y[m * pr.n_cols + n] = acc + (pr.bias ? pr.bias[n] : 0.f);
    }
  });
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

// (even, odd) small integers as 32-bit ints -> bf16 pairs. Exact: |v| < 256 keeps its bits in bf16's upper half.
inline __m512i int_pairs_to_bf16(__m512i even, __m512i odd) {
  const __m512i fe = _mm512_castps_si512(_mm512_cvtepi32_ps(even));
  const __m512i fo = _mm512_castps_si512(_mm512_cvtepi32_ps(odd));
  return _mm512_or_si512(_mm512_srli_epi32(fe, 16), _mm512_and_si512(fo, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// One step of a block (16 lanes x one pair) as 16 bf16 pairs.
template <bool kDp>
inline __m512i load_pairs(Bf16, const uint8_t* p) {
  return _mm512_loadu_si512(p);
}
template <bool kDp>
inline __m512i load_pairs(Int8, const uint8_t* p) {
  if constexpr (kDp) {  // bytes e0 o0 e1 o1 ...: widen each half in order, convert, pack both halves to bf16
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  } else {
    const __m512i v = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return int_pairs_to_bf16(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24), _mm512_srai_epi32(v, 8));
  }
}
template <bool kDp>
inline __m512i load_pairs(Int4, const uint8_t* p) {
  const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return int_pairs_to_bf16(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28), _mm512_srai_epi32(v, 4));
}

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

// y[MR rows from m0, NV blocks from b0]: each group's sums in registers, folded (times the group's scales)
// into `out`, then bias and the stores (columns past n_cols are not stored). `w`: block b0's weights, blocks
// `pairs` steps apart.
template <class F, bool kDp, int MR, int NV>
void tile(const Problem& pr, int64_t m0, int64_t b0, const uint8_t* w) {
  constexpr int64_t kStep = kLanes * F::kPairBytes;
  const int64_t block_bytes = pr.pairs * kStep, group_pairs = pr.pairs / pr.groups;
  // The first row chunk reads the weights from memory, NV sequential streams. The hardware prefetchers stop at
  // each 4 KiB page, so the stream stalls at every page boundary (a TLB miss and a cold start); a software
  // prefetch kPrefetchAhead ahead, one per cache line, keeps it going. Measured 2-10 % faster at M = 4..64,
  // but 3-5 % slower at M = 1 (pure streaming, where the hardware prefetchers keep up): not there. Later row
  // chunks of a tall tile hit L1/L2.
  const bool streaming = m0 == 0 && pr.m_rows > 1;
  const uint32_t* xp = pr.xp + m0 * pr.x_stride;
  __m512 out[MR][NV];
  for (int64_t g = 0; g < pr.groups; ++g) {
    __m512 acc[MR][NV];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_ps();
    for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
      __m512i wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = load_pairs<kDp>(F{}, w + j * block_bytes + p * kStep);
      if (streaming && (p * kStep) % 64 == 0) {
        for (int j = 0; j < NV; ++j)  // past a block's end this touches the next block (or nothing: no fault)
          _mm_prefetch(reinterpret_cast<const char*>(w + j * block_bytes + p * kStep + kPrefetchAhead), _MM_HINT_T1);
      }
      for (int m = 0; m < MR; ++m) {
        const uint32_t x_pair = xp[m * pr.x_stride + p];
        for (int j = 0; j < NV; ++j) acc[m][j] = dot_pair<kDp>(acc[m][j], x_pair, wv[j]);
      }
    }
    for (int j = 0; j < NV; ++j) {
      const __m512 s = pr.scale ? _mm512_loadu_ps(pr.scale + g * pr.n_pad + (b0 + j) * kLanes) : _mm512_set1_ps(1.f);
      for (int m = 0; m < MR; ++m)
        out[m][j] = g == 0 ? _mm512_mul_ps(acc[m][j], s) : _mm512_fmadd_ps(acc[m][j], s, out[m][j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    const int64_t col = (b0 + j) * kLanes;
    const __mmask16 mask = lane_mask(pr.n_cols - col);
    const __m512 b = pr.bias ? _mm512_maskz_loadu_ps(mask, pr.bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m)
      _mm512_mask_storeu_ps(pr.y + (m0 + m) * pr.n_cols + col, mask, _mm512_add_ps(out[m][j], b));
  }
}

using TileFn = void (*)(const Problem&, int64_t, int64_t, const uint8_t*);

// The tile of `rows` (1..MR) rows by NV blocks.
template <class F, bool kDp, int NV, int MR>
TileFn pick_tile(int64_t rows) {
  if constexpr (MR > 1) {
    if (rows < MR) return pick_tile<F, kDp, NV, MR - 1>(rows);
  }
  return tile<F, kDp, MR, NV>;
}

// Work is claimed dynamically in chunks (~1/32 of it): a thread that runs late finds less left to do.
template <class Fn>
void run_chunks(int64_t units, int64_t chunks, Fn&& fn) {
  const int64_t per_chunk = std::max<int64_t>(1, units / chunks);
  ThreadPool::instance().run((units + per_chunk - 1) / per_chunk, [&](int64_t c) {
    for (int64_t u = c * per_chunk; u < std::min(units, (c + 1) * per_chunk); ++u) fn(u);
  });
}

template <class F, bool kDp>
void linear_avx512(const Problem& pr) {
  const int64_t n_blocks = pr.n_pad / kLanes, block_bytes = pr.pairs * kLanes * F::kPairBytes;
  if (pr.m_rows <= kMR) {  // all rows against kNV blocks at a time (the last tile may hold fewer)
    const TileFn wide = pick_tile<F, kDp, kNV, kMR>(pr.m_rows), narrow = pick_tile<F, kDp, 1, kMR>(pr.m_rows);
    run_chunks((n_blocks + kNV - 1) / kNV, 32, [&](int64_t t) {
      const int64_t b0 = t * kNV, nv = std::min<int64_t>(kNV, n_blocks - b0);
      if (nv == kNV) return wide(pr, 0, b0, pr.w + b0 * block_bytes);
      for (int64_t b = b0; b < b0 + nv; ++b) narrow(pr, 0, b, pr.w + b * block_bytes);
    });
    return;
  }
  // Tall tiles: one block at a time, kTallRows rows after kTallRows rows (the block stays in L1/L2).
  const TileFn full = pick_tile<F, kDp, 1, kTallRows>(kTallRows);
  const TileFn rest = pick_tile<F, kDp, 1, kTallRows>(pr.m_rows % kTallRows);
  run_chunks(n_blocks, 32, [&](int64_t b) {
    for (int64_t m = 0; m < pr.m_rows; m += kTallRows)
      (pr.m_rows - m >= kTallRows ? full : rest)(pr, m, b, pr.w + b * block_bytes);
  });
}

#pragma GCC pop_options

template <class F>
void linear_dispatch(const Problem& pr) {
  if (use_avx512_bf16()) return linear_avx512<F, true>(pr);
  if (use_avx512()) return linear_avx512<F, false>(pr);
  linear_scalar<F>(pr);
}

}  // namespace

// `w`: packed [N_pad / 16, K_pad / 2, 16 * pair] (see the top of this file) - bf16 (bits 16) or int8 bytes
// (bits 8: two per pair, bits 4: one per pair); `scale`: fp32 [G, N_pad] for bits 8 / 4; `n_cols` = N.
std::vector<paddle::Tensor> Linear(const paddle::Tensor& x, const paddle::Tensor& w,
                                   const paddle::optional<paddle::Tensor>& scale,
                                   const paddle::optional<paddle::Tensor>& bias, int n_cols, int bits) {
  PD_CHECK(bits == 16 || bits == 8 || bits == 4, "bits must be 16, 8 or 4");
  const int pair_bytes = bits == 16 ? 4 : bits == 8 ? 2 : 1;
  const int element_bytes = bits == 16 ? 2 : 1;
  PD_CHECK(w.dtype() == (bits == 16 ? paddle::DataType::BFLOAT16 : paddle::DataType::INT8) && w.dims().size() == 3 &&
               w.dims()[2] * element_bytes == kLanes * pair_bytes,
           "w must be packed [N/16, K/2, 16 x pair] (bf16 for bits 16, int8 otherwise)");
  const int64_t pairs = w.dims()[1], n_pad = w.dims()[0] * kLanes;
  PD_CHECK(n_cols > 0 && n_cols <= n_pad && n_pad - n_cols < kLanes, "n_cols ", n_cols, " does not match w");
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32 && x.dims().size() == 2, "x must be CPU fp32 [M, K]");
  const int64_t m_rows = x.dims()[0], k_dim = x.dims()[1];
  PD_CHECK((k_dim + 1) / 2 == pairs, "x has K = ", k_dim, ", w holds ", pairs, " input pairs");
  int64_t groups = 1;
  const float* sp = nullptr;
  PD_CHECK((bits == 16) == !scale, "int weights need a scale, bf16 ones none");
  if (scale) {
    PD_CHECK(scale->dtype() == paddle::DataType::FLOAT32 && scale->dims().size() == 2 && scale->dims()[1] == n_pad,
             "scale must be fp32 [G, N_pad]");
    groups = scale->dims()[0];
    PD_CHECK(groups >= 1 && pairs % groups == 0, "groups must hold whole input pairs");
    sp = scale->data<float>();
  }
  const float* bp = nullptr;
  if (bias) {
    PD_CHECK(bias->dtype() == paddle::DataType::FLOAT32 && bias->numel() == n_cols, "bias must be fp32 [N]");
    bp = bias->data<float>();
  }
  auto y = paddle::empty({m_rows, n_cols}, paddle::DataType::FLOAT32, x.place());
  if (m_rows == 0) return {y};
  const int64_t x_stride = x_stride_for(pairs);
  const std::vector<uint32_t> xp = pack_x(x.data<float>(), m_rows, k_dim, x_stride);
  const Problem pr{xp.data(), x_stride, m_rows, pairs, groups, n_cols, n_pad, static_cast<const uint8_t*>(w.data()),
                   sp, bp, y.data<float>()};
  if (bits == 16) linear_dispatch<Bf16>(pr);
  if (bits == 8) linear_dispatch<Int8>(pr);
  if (bits == 4) linear_dispatch<Int4>(pr);
  return {y};
}

std::vector<std::vector<int64_t>> LinearShape(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                              const paddle::optional<std::vector<int64_t>>&,
                                              const paddle::optional<std::vector<int64_t>>&, int n_cols, int) {
  return {{x[0], n_cols}};
}

std::vector<paddle::DataType> LinearDtype(const paddle::DataType&, const paddle::DataType&,
                                          const paddle::optional<paddle::DataType>&,
                                          const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace ernie

PD_BUILD_OP(ernie_linear)
    .Inputs({"X", "W", paddle::Optional("Scale"), paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"n_cols: int", "bits: int"})
    .SetKernelFn(PD_KERNEL(ernie::Linear))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::LinearShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::LinearDtype));
