// Attention for a flat mixed batch (prefill chunks and decode tokens) straight out of a paged KV cache.
//
// q [T, H, D]; key/value caches [S, KVH, D] (or the new k/v themselves when there is no cache);
// slots [B, max_kv]: the cache slot of each context position of each sequence (AttentionMetadata.kv_index);
// lens [2, B]: query_lens and context_lens. Query i of sequence b sits at position ctx - q_len + i and sees
// keys 0..that position. Each work item is one query token and one KV head: the H / KVH query heads that
// share the head read each key and value row once. Softmax is online (running max and sum per head) over
// tiles of 16 keys, so nothing of size max_kv is materialised and no padded copy of K/V is gathered.
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

// `buf` (per thread) holds group * nv vectors of scaled q, as many of the output accumulator, the tile's
// probabilities [group][kTile], and the running max and sum per head.
void item_avx512(const Problem& p, int64_t t, int64_t g, int64_t seq, int64_t n_keys, float* buf) {
  const int64_t group = p.heads / p.kv_heads, nv = (p.dim + 15) / 16;
  const __mmask16 last = lane_mask(p.dim - (nv - 1) * 16);
  float* qs = buf;
  float* acc = qs + group * nv * 16;
  float* probs = acc + group * nv * 16;
  float* run_max = probs + group * kTile;
  float* run_sum = run_max + group;
  for (int64_t h = 0; h < group; ++h) {
    const float* qh = p.q + (t * p.heads + g * group + h) * p.dim;
    for (int64_t v = 0; v < nv; ++v) {
      const __m512 x = _mm512_maskz_loadu_ps(v == nv - 1 ? last : 0xFFFF, qh + v * 16);
      _mm512_storeu_ps(qs + (h * nv + v) * 16, _mm512_mul_ps(x, _mm512_set1_ps(p.scale)));
      _mm512_storeu_ps(acc + (h * nv + v) * 16, _mm512_setzero_ps());
    }
    run_max[h] = -std::numeric_limits<float>::infinity();
    run_sum[h] = 0.f;
  }
  const int64_t* slots = p.slots + seq * p.max_kv;
  for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
    const int64_t tile = std::min<int64_t>(kTile, n_keys - j0);
    // Scores of the tile for every head of the group: each key row is read once.
    for (int64_t j = 0; j < tile; ++j) {
      const float* kr = p.k + (slots[j0 + j] * p.kv_heads + g) * p.dim;
      for (int64_t h = 0; h < group; ++h) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t v = 0; v < nv; ++v) {
          const __m512 kv = _mm512_maskz_loadu_ps(v == nv - 1 ? last : 0xFFFF, kr + v * 16);
          dot = _mm512_fmadd_ps(_mm512_loadu_ps(qs + (h * nv + v) * 16), kv, dot);
        }
        probs[h * kTile + j] = _mm512_reduce_add_ps(dot);
      }
    }
    // Online softmax: rescale what was accumulated when the running max grows.
    const __mmask16 valid = lane_mask(tile);
    for (int64_t h = 0; h < group; ++h) {
      const __m512 s =
          _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, probs + h * kTile);
      const float new_max = std::max(run_max[h], _mm512_reduce_max_ps(s));
      const __m512 e = exp512(_mm512_sub_ps(s, _mm512_set1_ps(new_max)));
      const float correction = std::exp(run_max[h] - new_max);
      run_sum[h] = run_sum[h] * correction + _mm512_reduce_add_ps(e);
      run_max[h] = new_max;
      _mm512_storeu_ps(probs + h * kTile, e);
      if (correction != 1.f) {
        const __m512 c = _mm512_set1_ps(correction);
        for (int64_t v = 0; v < nv; ++v) {
          float* a = acc + (h * nv + v) * 16;
          _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), c));
        }
      }
    }
    for (int64_t j = 0; j < tile; ++j) {
      const float* vr = p.v + (slots[j0 + j] * p.kv_heads + g) * p.dim;
      for (int64_t v = 0; v < nv; ++v) {
        const __m512 vv = _mm512_maskz_loadu_ps(v == nv - 1 ? last : 0xFFFF, vr + v * 16);
        for (int64_t h = 0; h < group; ++h) {
          float* a = acc + (h * nv + v) * 16;
          _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(probs[h * kTile + j]), vv, _mm512_loadu_ps(a)));
        }
      }
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* oh = p.out + (t * p.heads + g * group + h) * p.dim;
    const __m512 inv = _mm512_set1_ps(1.f / run_sum[h]);
    for (int64_t v = 0; v < nv; ++v) {
      const __m512 r = _mm512_mul_ps(_mm512_loadu_ps(acc + (h * nv + v) * 16), inv);
      _mm512_mask_storeu_ps(oh + v * 16, v == nv - 1 ? last : 0xFFFF, r);
    }
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
  const bool avx512 = use_avx512();
  const int64_t group = heads / kv_heads, nv = (dim + 15) / 16;
  // Prefill items cost up to max_kv keys, decode ones their whole context: threads claim them one by one.
  ThreadPool::instance().run(items, [&](int64_t it) {
    const int64_t tok = it / kv_heads, g = it % kv_heads;
    if (avx512) {
      thread_local std::vector<float> buf;
      buf.resize(static_cast<size_t>(group * (2 * nv * 16 + kTile + 2)));
      item_avx512(p, tok, g, token_seq[tok], token_keys[tok], buf.data());
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
