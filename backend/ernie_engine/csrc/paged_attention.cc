// Attention for a flat mixed batch (prefill chunks and decode tokens) straight out of a paged KV cache.
//
// q [T, H, D] fp32; key/value caches [S, KVH, D], fp32 or bf16 (or the new k/v themselves when there is no
// cache); scores, softmax and sums are fp32 either way (a bf16 tile is widened as it is gathered);
// slots [B, max_kv]: the cache slot of each context position of each sequence (AttentionMetadata.kv_index);
// lens [2, B]: query_lens and context_lens. Query i of sequence b sits at position ctx - q_len + i and sees
// keys 0..that position.
//
// A work item is a block of consecutive query tokens of one sequence and one KV head: its rows (token x query
// head of the group, up to kMaxRows) sit kLanes to a vector, "rows in lanes", with q transposed to [D][rows]
// once per item. Each tile of kTile key and value rows is gathered once into an L1 buffer and used by every
// row of the item: scores by broadcast-FMA over d (no horizontal sums), online softmax lane by lane (running
// max and sum per row), and the output accumulated transposed, [D][rows]. So a prefill reads K/V once per
// block of tokens rather than once per token, and nothing of size max_kv is materialised.
//
// Batch invariance: a row's arithmetic never depends on the other rows of its item. Every lane runs the same
// operations in the same order; tiles start at key 0 of the sequence; keys a row cannot see (later tokens of
// its block, or copies of the tile's last key past the block's end) get a score of -inf, whose weight is
// exactly 0, and a tile a row sees none of leaves it exactly as it was (correction exp(0) = 1, weights 0).
// So a token's output is bit-identical whatever else is in the batch, however its prompt is chunked, and
// whether it is prefilled or decoded (a decode token is a block of one). The portable path (no AVX512, or a
// head_dim that is not a whole number of vectors) goes token by token and is just as invariant.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace ernie {
namespace {

constexpr int kTile = 16;          // keys per tile; tiles start at key 0 of the sequence
// Rows per vector: a decode token of a GQA-8 group fills one exactly, and on Zen 4 __m256 FMAs give as many
// FLOP/cycle as __m512 ones.
constexpr int kLanes = 8;
constexpr int64_t kMaxRows = 128;  // rows per item: 16 tokens of a GQA-8 group share each K/V tile

// T: the caches' element, float or uint16_t (bf16 bits).
template <class T>
struct Problem {
  const float* q;
  const T* k;
  const T* v;
  const int64_t* slots;
  int64_t max_kv, heads, kv_heads, dim;
  float scale;
  float* out;
};

// `tokens` consecutive query tokens of sequence `seq` for KV head `g`: flat tokens first.., the first at
// position `pos` (so the last sees pos + tokens keys).
struct Item {
  int64_t seq, first, tokens, pos, g;
};

// Per-thread working memory of the items (grown, never shrunk).
struct Scratch {
  std::vector<float> buf;
  std::vector<int32_t> pos;
  std::vector<int64_t> offset;
};

// Portable path for one (token, kv head): the n_keys visible keys of sequence `seq`.
template <class T>
void token_scalar(const Problem<T>& p, int64_t t, int64_t g, int64_t seq, int64_t n_keys) {
  const int64_t group = p.heads / p.kv_heads;
  std::vector<float> scores(n_keys);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const float* qh = p.q + (t * p.heads + h) * p.dim;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n_keys; ++j) {
      const T* kr = p.k + (p.slots[seq * p.max_kv + j] * p.kv_heads + g) * p.dim;
      float dot = 0.f;
      for (int64_t d = 0; d < p.dim; ++d) dot += qh[d] * to_float(kr[d]);
      scores[j] = dot * p.scale;
      max_score = std::max(max_score, scores[j]);
    }
    float* oh = p.out + (t * p.heads + h) * p.dim;
    std::fill(oh, oh + p.dim, 0.f);
    float total = 0.f;
    for (int64_t j = 0; j < n_keys; ++j) {
      const float w = std::exp(scores[j] - max_score);
      total += w;
      const T* vr = p.v + (p.slots[seq * p.max_kv + j] * p.kv_heads + g) * p.dim;
      for (int64_t d = 0; d < p.dim; ++d) oh[d] += w * to_float(vr[d]);
    }
    for (int64_t d = 0; d < p.dim; ++d) oh[d] /= total;
  }
}

template <class T>
void item_scalar(const Problem<T>& p, const Item& it, Scratch&) {
  for (int64_t i = 0; i < it.tokens; ++i) token_scalar(p, it.first + i, it.g, it.seq, it.pos + i + 1);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

// exp of one vector of rows, and of two at once (exp512 works lane by lane: the same results either way).
inline __m256 exp8(__m256 x) { return _mm512_castps512_ps256(exp512(_mm512_zextps256_ps512(x))); }

inline void exp_pair(__m256& a, __m256& b) {
  const __m512 e = exp512(_mm512_insertf32x8(_mm512_zextps256_ps512(a), b, 1));
  a = _mm512_castps512_ps256(e);
  b = _mm512_extractf32x8_ps(e, 1);
}

// One cache row of D elements into an fp32 tile row.
template <int D>
inline void load_row(float* dst, const float* src) {
  for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_loadu_ps(src + d));
}
template <int D>
inline void load_row(float* dst, const uint16_t* src) {
  for (int d = 0; d < D; d += 16) {  // bf16 -> fp32: the bits move to the upper half
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
    _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)));
  }
}

// Transpose 8 x 8 floats held as 8 rows.
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// One tile for one vector of rows: qt [D][kLanes] (scaled q), kt / vt [kTile][D] (the tile's keys and values),
// pos [kLanes] (each row's position), ot [D][kLanes] and the running max / sum are updated.
// Always inlined: called from an item's tile loop, its registers (running max and sum) stay registers; as a
// call (GCC stops inlining it once both cache types instantiate it) the kernels ran ~40 % slower.
template <int D>
__attribute__((always_inline)) inline void tile_update(const float* qt, const float* kt, const float* vt, __m256i pos, int64_t j0, bool diagonal,
                 float* ot, __m256& run_max, __m256& run_sum) {
  __m256 s[kTile];
  for (int j = 0; j < kTile; ++j) s[j] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    const __m256 qd = _mm256_loadu_ps(qt + d * kLanes);
#pragma GCC unroll 16
    for (int j = 0; j < kTile; ++j) s[j] = _mm256_fmadd_ps(qd, _mm256_broadcast_ss(kt + j * D + d), s[j]);
  }
  if (diagonal) {  // some row sees only part of the tile: -inf for key j0 + j past its position
    for (int j = 0; j < kTile; ++j) {
      const __mmask8 hidden = _mm256_cmp_epi32_mask(pos, _mm256_set1_epi32(static_cast<int>(j0 + j)), _MM_CMPINT_LT);
      s[j] = _mm256_mask_blend_ps(hidden, s[j], _mm256_set1_ps(-std::numeric_limits<float>::infinity()));
    }
  }
  // Online softmax: the running max grows by the tile's, what was accumulated is rescaled by `correction`.
  __m256 new_max = run_max;
  for (int j = 0; j < kTile; ++j) new_max = _mm256_max_ps(new_max, s[j]);
  const __m256 correction = exp8(_mm256_sub_ps(run_max, new_max));  // 0 on the first tile (max -inf)
  for (int j = 0; j < kTile; j += 2) {
    s[j] = _mm256_sub_ps(s[j], new_max);
    s[j + 1] = _mm256_sub_ps(s[j + 1], new_max);
    exp_pair(s[j], s[j + 1]);
  }
  __m256 total = _mm256_mul_ps(run_sum, correction);
  for (int j = 0; j < kTile; ++j) total = _mm256_add_ps(total, s[j]);
  run_sum = total;
  run_max = new_max;
  // ot = ot * correction + sum_j s_j v_j, 16 dims at a time in registers (16 independent FMA chains, enough to
  // hide the FMA latency); the weights go through L1, the registers are taken by the accumulators.
  alignas(32) float weights[kTile * kLanes];
  for (int j = 0; j < kTile; ++j) _mm256_store_ps(weights + j * kLanes, s[j]);
  for (int d0 = 0; d0 < D; d0 += 16) {
    __m256 a[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(ot + (d0 + i) * kLanes), correction);
    for (int j = 0; j < kTile; ++j) {
      const __m256 w = _mm256_load_ps(weights + j * kLanes);
      for (int i = 0; i < 16; ++i) a[i] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(vt + j * D + d0 + i), a[i]);
    }
    for (int i = 0; i < 16; ++i) _mm256_storeu_ps(ot + (d0 + i) * kLanes, a[i]);
  }
}

// One item for head_dim D. Scratch: buf holds kt, vt [kTile][D], then per vector of rows qt and ot [D][kLanes]
// and the running max and sum [kLanes]; per row (vectors x kLanes) its position and the offset of its q in q
// (and of its output in out).
template <int D, class T>
void item_avx512(const Problem<T>& p, const Item& it, Scratch& scratch) {
  const int64_t group = p.heads / p.kv_heads, rows = it.tokens * group;
  const int64_t vecs = (rows + kLanes - 1) / kLanes, per_vec = 2 * D * kLanes + 2 * kLanes;
  const size_t buf_size = static_cast<size_t>(2 * kTile * D + vecs * per_vec);
  if (scratch.buf.size() < buf_size) scratch.buf.resize(buf_size);
  if (scratch.pos.size() < static_cast<size_t>(vecs * kLanes)) {
    scratch.pos.resize(vecs * kLanes);
    scratch.offset.resize(vecs * kLanes);
  }
  float* kt = scratch.buf.data();
  float* vt = kt + kTile * D;
  const auto qt = [&](int64_t i) { return vt + kTile * D + i * per_vec; };
  const auto ot = [&](int64_t i) { return qt(i) + D * kLanes; };
  const auto stats = [&](int64_t i) { return qt(i) + 2 * D * kLanes; };  // running max, then sum
  // Row r = (token, head) of the item; rows padding the last vector repeat the last row (output dropped).
  int32_t* pos = scratch.pos.data();
  int64_t* offset = scratch.offset.data();
  for (int64_t tok = 0, r = 0; tok < it.tokens; ++tok)
    for (int64_t h = 0; h < group; ++h, ++r) {
      pos[r] = static_cast<int32_t>(it.pos + tok);
      offset[r] = ((it.first + tok) * p.heads + it.g * group + h) * D;
    }
  for (int64_t r = rows; r < vecs * kLanes; ++r) {
    pos[r] = pos[rows - 1];
    offset[r] = offset[rows - 1];
  }

  // Vector i's q rows, scaled and transposed to qt, and its accumulators cleared: just before its first tile,
  // with the next vector's q rows prefetched meanwhile (q often comes from DRAM).
  const auto start_vector = [&](int64_t i) {
    for (int d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int l = 0; l < kLanes; ++l)
        r[l] = _mm256_mul_ps(_mm256_loadu_ps(p.q + offset[i * kLanes + l] + d0), _mm256_set1_ps(p.scale));
      transpose8(r);
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(qt(i) + (d0 + k) * kLanes, r[k]);
    }
    std::fill(ot(i), ot(i) + D * kLanes, 0.f);
    std::fill(stats(i), stats(i) + kLanes, -std::numeric_limits<float>::infinity());
    std::fill(stats(i) + kLanes, stats(i) + 2 * kLanes, 0.f);
    if (i + 1 < vecs)
      for (int l = 0; l < kLanes; ++l)
        for (int d = 0; d < D; d += 16)
          _mm_prefetch(reinterpret_cast<const char*>(p.q + offset[(i + 1) * kLanes + l] + d), _MM_HINT_T0);
  };

  const int64_t* slots = p.slots + it.seq * p.max_kv;
  const auto key_offset = [&](int64_t j) { return (slots[j] * p.kv_heads + it.g) * D; };
  const int64_t n_keys = it.pos + it.tokens;
  for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
    // Gather the tile; keys past the last one the item sees repeat it (masked: real, finite values).
    const int64_t last = std::min<int64_t>(kTile, n_keys - j0) - 1;
    for (int j = 0; j < kTile; ++j) {
      const int64_t offset = key_offset(j0 + std::min<int64_t>(j, last));
      load_row<D>(kt + j * D, p.k + offset);
      load_row<D>(vt + j * D, p.v + offset);
    }
    // Prefetch the next tile (from L3 or DRAM) while this one is computed.
    for (int64_t j = j0 + kTile; j < std::min(j0 + 2 * kTile, n_keys); ++j)
      for (int d = 0; d < D; d += 64 / static_cast<int>(sizeof(T))) {  // one per cache line
        _mm_prefetch(reinterpret_cast<const char*>(p.k + key_offset(j) + d), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p.v + key_offset(j) + d), _MM_HINT_T0);
      }
    for (int64_t i = 0; i < vecs; ++i) {
      const int32_t* vec_pos = pos + i * kLanes;  // ascending: the first lane sees least, the last most
      if (vec_pos[kLanes - 1] < j0) continue;     // no row here sees this tile: it would change nothing
      if (j0 == 0) start_vector(i);
      __m256 run_max = _mm256_loadu_ps(stats(i)), run_sum = _mm256_loadu_ps(stats(i) + kLanes);
      tile_update<D>(qt(i), kt, vt, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vec_pos)), j0,
                     vec_pos[0] < j0 + kTile - 1, ot(i), run_max, run_sum);
      _mm256_storeu_ps(stats(i), run_max);
      _mm256_storeu_ps(stats(i) + kLanes, run_sum);
    }
  }

  // out = ot / sum, transposed back to rows.
  for (int64_t i = 0; i < vecs; ++i) {
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_loadu_ps(stats(i) + kLanes));
    const int valid = static_cast<int>(std::min<int64_t>(kLanes, rows - i * kLanes));
    for (int d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_mul_ps(_mm256_loadu_ps(ot(i) + (d0 + k) * kLanes), inv);
      transpose8(r);
      for (int l = 0; l < valid; ++l) _mm256_storeu_ps(p.out + offset[i * kLanes + l] + d0, r[l]);
    }
  }
}

template <class T>
using ItemFn = void (*)(const Problem<T>&, const Item&, Scratch&);

// The AVX512 item for this head_dim (whole vectors, up to 128), or nullptr: then the scalar path.
template <class T>
ItemFn<T> pick_item(int64_t dim) {
  switch (dim) {
    case 16: return item_avx512<16, T>;
    case 32: return item_avx512<32, T>;
    case 48: return item_avx512<48, T>;
    case 64: return item_avx512<64, T>;
    case 80: return item_avx512<80, T>;
    case 96: return item_avx512<96, T>;
    case 112: return item_avx512<112, T>;
    case 128: return item_avx512<128, T>;
    default: return nullptr;
  }
}

#pragma GCC pop_options

template <class T>
void run_items(const Problem<T>& p, const std::vector<Item>& items) {
  const ItemFn<T> avx512_item = use_avx512() ? pick_item<T>(p.dim) : nullptr;
  const ItemFn<T> item_fn = avx512_item ? avx512_item : item_scalar<T>;
  ThreadPool::instance().run(static_cast<int64_t>(items.size()), [&](int64_t i) {
    thread_local Scratch scratch;
    item_fn(p, items[i], scratch);
  });
}

}  // namespace

std::vector<paddle::Tensor> PagedAttention(const paddle::Tensor& q, const paddle::Tensor& key_cache,
                                           const paddle::Tensor& value_cache, const paddle::Tensor& slots,
                                           const paddle::Tensor& lens, float scale) {
  PD_CHECK(q.is_cpu() && q.dtype() == paddle::DataType::FLOAT32 && q.dims().size() == 3,
           "q must be CPU fp32 [tokens, heads, head_dim]");
  check_caches(key_cache, value_cache);
  PD_CHECK(slots.dtype() == paddle::DataType::INT64 && lens.dtype() == paddle::DataType::INT64,
           "slots and lens must be int64");
  const int64_t tokens = q.dims()[0], heads = q.dims()[1], dim = q.dims()[2];
  const int64_t kv_heads = key_cache.dims()[1], num_seqs = lens.numel() / 2;
  PD_CHECK(heads % kv_heads == 0 && key_cache.dims()[2] == dim,
           "q/k/v shapes disagree");
  PD_CHECK(num_seqs > 0 && slots.numel() % num_seqs == 0, "slots must be [num_seqs * max_kv]");
  const int64_t* query_lens = lens.data<int64_t>();
  const int64_t* context_lens = query_lens + num_seqs;
  const int64_t group = heads / kv_heads;

  // Items: each sequence's query tokens in blocks of kMaxRows / group, per KV head. Sequences in order of
  // cost (query tokens x context), the costliest first, and within one its blocks from the last: so the
  // threads' last claims are cheap ones, and consecutive items read the same K/V (still in L2).
  const int64_t block = std::max<int64_t>(1, kMaxRows / group);
  std::vector<int64_t> first_token(num_seqs), order(num_seqs);
  int64_t t = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    PD_CHECK(query_lens[b] >= 1 && query_lens[b] <= context_lens[b], "bad query/context lengths");
    PD_CHECK(context_lens[b] < std::numeric_limits<int32_t>::max(), "context too long");
    first_token[b] = t;
    order[b] = b;
    t += query_lens[b];
  }
  PD_CHECK(t == tokens, "query_lens must sum to the number of tokens");
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return query_lens[a] * context_lens[a] > query_lens[b] * context_lens[b];
  });
  std::vector<Item> items;
  for (const int64_t b : order)
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t i = (query_lens[b] - 1) / block * block; i >= 0; i -= block)
        items.push_back({b, first_token[b] + i, std::min(block, query_lens[b] - i),
                         context_lens[b] - query_lens[b] + i, g});

  auto out = paddle::empty({tokens, heads, dim}, paddle::DataType::FLOAT32, q.place());
  with_cache_elements(key_cache, value_cache, [&](auto* key, auto* value) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(key)>>;  // float, or uint16_t bf16 bits
    run_items(Problem<T>{q.data<float>(), key, value, slots.data<int64_t>(), slots.numel() / num_seqs, heads,
                         kv_heads, dim, scale, out.data<float>()},
              items);
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
