// Attention for a flat mixed batch (prefill chunks and decode tokens) straight out of a paged KV cache.
//
// q [T, H, D]; key/value caches [S, KVH, D] (or the new k/v themselves when there is no cache);
// slots [B, max_kv]: the cache slot of each context position of each sequence (AttentionMetadata.kv_index);
// lens [2, B]: query_lens and context_lens. Query i of sequence b sits at position ctx - q_len + i and sees
// keys 0..that position. Each work item is one query token and one KV head: the H / KVH query heads that
// share the head read each tile of 16 key and value rows while it sits in L1, with q and the output
// accumulators in registers. Softmax is online (running max and sum per head), so nothing of size max_kv is
// materialised and no padded copy of K/V is gathered.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace ernie {
namespace {

constexpr int kTile = 16;

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* slots;
  int64_t max_kv, heads, kv_heads, dim;
  float scale;
  float* out;
};

// Portable path for one (token, kv head) item: q_pos + 1 visible keys of sequence `seq`.
void item_scalar(const Problem& p, int64_t t, int64_t g, int64_t seq, int64_t n_keys) {
  const int64_t group = p.heads / p.kv_heads;
  std::vector<float> scores(n_keys);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const float* qh = p.q + (t * p.heads + h) * p.dim;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n_keys; ++j) {
      const float* kr = p.k + (p.slots[seq * p.max_kv + j] * p.kv_heads + g) * p.dim;
      float dot = 0.f;
      for (int64_t d = 0; d < p.dim; ++d) dot += qh[d] * kr[d];
      scores[j] = dot * p.scale;
      max_score = std::max(max_score, scores[j]);
    }
    float* oh = p.out + (t * p.heads + h) * p.dim;
    std::fill(oh, oh + p.dim, 0.f);
    float total = 0.f;
    for (int64_t j = 0; j < n_keys; ++j) {
      const float w = std::exp(scores[j] - max_score);
      total += w;
      const float* vr = p.v + (p.slots[seq * p.max_kv + j] * p.kv_heads + g) * p.dim;
      for (int64_t d = 0; d < p.dim; ++d) oh[d] += w * vr[d];
    }
    for (int64_t d = 0; d < p.dim; ++d) oh[d] /= total;
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

constexpr int kKeys = 8;  // keys per score batch: 8 dot products reduced together

// Lane i of the result = the sum of v[i]'s 16 lanes (i < 8): halves folded, then a transposing hadd tree,
// about half the work of eight separate reductions.
inline __m256 reduce8(const __m512 (&v)[kKeys]) {
  __m256 w[kKeys];
  for (int i = 0; i < kKeys; ++i)
    w[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
  const __m256 t0 = _mm256_hadd_ps(w[0], w[1]), t1 = _mm256_hadd_ps(w[2], w[3]);
  const __m256 t2 = _mm256_hadd_ps(w[4], w[5]), t3 = _mm256_hadd_ps(w[6], w[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Scores of keys [j0, j0 + tile) for one head, q (scaled) held in NV registers: probs[0..tile).
template <int NV>
void head_scores(const __m512 (&q)[NV], const Problem& p, const int64_t* slots, int64_t g, int64_t j0,
                 int64_t tile, float* probs) {
  for (int64_t j = 0; j < tile; j += kKeys) {
    __m512 dot[kKeys];
    for (int i = 0; i < kKeys; ++i) {
      dot[i] = _mm512_setzero_ps();
      if (j + i >= tile) continue;
      const float* kr = p.k + (slots[j0 + j + i] * p.kv_heads + g) * p.dim;
      for (int v = 0; v < NV; ++v) dot[i] = _mm512_fmadd_ps(q[v], _mm512_loadu_ps(kr + v * 16), dot[i]);
    }
    _mm256_storeu_ps(probs + j, reduce8(dot));  // kTile is a multiple of kKeys: stays in the head's row
  }
}

// One (token, kv head) item for head_dim = NV * 16: the group's heads read each tile of kTile key and value
// rows from L1, q and the output accumulators in registers. `buf` (per thread): probs [group][kTile], acc
// [group][NV * 16], running max and sum per head.
template <int NV>
void item_avx512(const Problem& p, int64_t t, int64_t g, int64_t seq, int64_t n_keys, float* buf) {
  const int64_t group = p.heads / p.kv_heads;
  float* probs = buf;
  float* acc = probs + group * kTile;
  float* run_max = acc + group * NV * 16;
  float* run_sum = run_max + group;
  std::fill(acc, acc + group * NV * 16, 0.f);
  std::fill(run_max, run_max + group, -std::numeric_limits<float>::infinity());
  std::fill(run_sum, run_sum + group, 0.f);
  const int64_t* slots = p.slots + seq * p.max_kv;
  for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
    const int64_t tile = std::min<int64_t>(kTile, n_keys - j0);
    const __mmask16 valid = lane_mask(tile);
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = p.q + (t * p.heads + g * group + h) * p.dim;
      __m512 q[NV];
      for (int v = 0; v < NV; ++v) q[v] = _mm512_mul_ps(_mm512_loadu_ps(qh + v * 16), _mm512_set1_ps(p.scale));
      float* ph = probs + h * kTile;
      head_scores<NV>(q, p, slots, g, j0, tile, ph);
      // Online softmax: rescale what was accumulated when the running max grows.
      const __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, ph);
      const float new_max = std::max(run_max[h], _mm512_reduce_max_ps(s));
      const __m512 e = exp512(_mm512_sub_ps(s, _mm512_set1_ps(new_max)));
      const float correction = std::exp(run_max[h] - new_max);
      run_sum[h] = run_sum[h] * correction + _mm512_reduce_add_ps(e);
      run_max[h] = new_max;
      _mm512_storeu_ps(ph, e);
      // acc = acc * correction + sum_j e_j v_j, in registers for the tile.
      float* ah = acc + h * NV * 16;
      __m512 a[NV];
      for (int v = 0; v < NV; ++v) a[v] = _mm512_mul_ps(_mm512_loadu_ps(ah + v * 16), _mm512_set1_ps(correction));
      for (int64_t j = 0; j < tile; ++j) {
        const float* vr = p.v + (slots[j0 + j] * p.kv_heads + g) * p.dim;
        const __m512 w = _mm512_set1_ps(ph[j]);
        for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + v * 16), a[v]);
      }
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ah + v * 16, a[v]);
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* oh = p.out + (t * p.heads + g * group + h) * p.dim;
    const __m512 inv = _mm512_set1_ps(1.f / run_sum[h]);
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(oh + v * 16, _mm512_mul_ps(_mm512_loadu_ps(acc + (h * NV + v) * 16), inv));
  }
}

using ItemFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, float*);

// The AVX512 item for this head_dim (whole vectors, up to 128), or nullptr: then the scalar path.
ItemFn pick_item(int64_t dim) {
  switch (dim) {
    case 16: return item_avx512<1>;
    case 32: return item_avx512<2>;
    case 48: return item_avx512<3>;
    case 64: return item_avx512<4>;
    case 80: return item_avx512<5>;
    case 96: return item_avx512<6>;
    case 112: return item_avx512<7>;
    case 128: return item_avx512<8>;
    default: return nullptr;
  }
}

#pragma GCC pop_options

}  // namespace

std::vector<paddle::Tensor> PagedAttention(const paddle::Tensor& q, const paddle::Tensor& key_cache,
                                           const paddle::Tensor& value_cache, const paddle::Tensor& slots,
                                           const paddle::Tensor& lens, float scale) {
  for (const auto* t : {&q, &key_cache, &value_cache})
    PD_CHECK(t->is_cpu() && t->dtype() == paddle::DataType::FLOAT32 && t->dims().size() == 3,
             "q and the caches must be CPU fp32 [tokens, heads, head_dim]");
  PD_CHECK(slots.dtype() == paddle::DataType::INT64 && lens.dtype() == paddle::DataType::INT64,
           "slots and lens must be int64");
  const int64_t tokens = q.dims()[0], heads = q.dims()[1], dim = q.dims()[2];
  const int64_t kv_heads = key_cache.dims()[1], num_seqs = lens.numel() / 2;
  PD_CHECK(heads % kv_heads == 0 && key_cache.dims()[2] == dim && value_cache.dims() == key_cache.dims(),
           "q/k/v shapes disagree");
  PD_CHECK(num_seqs > 0 && slots.numel() % num_seqs == 0, "slots must be [num_seqs * max_kv]");
  const int64_t* query_lens = lens.data<int64_t>();
  const int64_t* context_lens = query_lens + num_seqs;

  // Per token: its sequence and how many keys it sees.
  std::vector<int64_t> token_seq(tokens), token_keys(tokens);
  int64_t t = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    PD_CHECK(query_lens[b] >= 1 && query_lens[b] <= context_lens[b], "bad query/context lengths");
    for (int64_t i = 0; i < query_lens[b]; ++i, ++t) {
      PD_CHECK(t < tokens, "query_lens sum past the number of tokens");
      token_seq[t] = b;
      token_keys[t] = context_lens[b] - query_lens[b] + i + 1;
    }
  }
  PD_CHECK(t == tokens, "query_lens must sum to the number of tokens");

  auto out = paddle::empty({tokens, heads, dim}, paddle::DataType::FLOAT32, q.place());
  const Problem p{q.data<float>(), key_cache.data<float>(), value_cache.data<float>(), slots.data<int64_t>(),
                  slots.numel() / num_seqs, heads, kv_heads, dim, scale, out.data<float>()};
  const int64_t items = tokens * kv_heads;
  const ItemFn avx512_item = use_avx512() ? pick_item(dim) : nullptr;
  const int64_t group = heads / kv_heads;
  // Prefill items cost up to max_kv keys, decode ones their whole context: threads claim them one by one.
  ThreadPool::instance().run(items, [&](int64_t it) {
    const int64_t tok = it / kv_heads, g = it % kv_heads;
    if (avx512_item) {
      thread_local std::vector<float> buf;
      buf.resize(static_cast<size_t>(group * (kTile + dim + 2)));
      avx512_item(p, tok, g, token_seq[tok], token_keys[tok], buf.data());
    } else {
      item_scalar(p, tok, g, token_seq[tok], token_keys[tok]);
    }
  });
  return {out};
}

std::vector<std::vector<int64_t>> PagedAttentionShape(const std::vector<int64_t>& q, const std::vector<int64_t>&,
                                                      const std::vector<int64_t>&, const std::vector<int64_t>&,
                                                      const std::vector<int64_t>&) {
  return {q};
}

std::vector<paddle::DataType> PagedAttentionDtype(const paddle::DataType& q, const paddle::DataType&,
                                                  const paddle::DataType&, const paddle::DataType&,
                                                  const paddle::DataType&) {
  return {q};
}

}  // namespace ernie

PD_BUILD_OP(ernie_paged_attention)
    .Inputs({"Q", "KeyCache", "ValueCache", "Slots", "Lens"})
    .Outputs({"Out"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(ernie::PagedAttention))
    .SetInferShapeFn(PD_INFER_SHAPE(ernie::PagedAttentionShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ernie::PagedAttentionDtype));
