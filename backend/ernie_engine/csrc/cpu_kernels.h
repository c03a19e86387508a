// Shared helpers of the CPU custom operators (csrc/*.cc), built by backend/ernie_engine/layers/cpu_kernels.py.
//
// The library is compiled for the baseline x86-64 ISA; AVX512 code lives in functions marked with
// `ERNIE_AVX512` (a GCC target attribute) and only runs when the CPU reports AVX512F/BW/VL at run time.
// Every op keeps a scalar path in the same binary, so one build works on any x86-64 CPU and tests can
// compare the paths (ERNIE_CPU_KERNELS_ISA=scalar forces the scalar one, =avx512 leaves out AVX512-BF16).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "paddle/extension.h"

#define ERNIE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace ernie {

// True when the AVX512 paths may run: CPU support, and not switched off by the environment.
// getenv per call costs ~50 ns against several microseconds of op dispatch, and lets tests flip it.
inline bool use_avx512() {
  static const bool cpu_has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* isa = std::getenv("ERNIE_CPU_KERNELS_ISA");
  return cpu_has && !(isa && std::strcmp(isa, "scalar") == 0);
}

// True when the bf16 dot-product instructions (vdpbf16ps, AVX512-BF16) may run as well
// (ERNIE_CPU_KERNELS_ISA=avx512 keeps to plain AVX512, as on CPUs without them).
inline bool use_avx512_bf16() {
  static const bool cpu_has = __builtin_cpu_supports("avx512bf16");
  const char* isa = std::getenv("ERNIE_CPU_KERNELS_ISA");
  return cpu_has && use_avx512() && !(isa && std::strcmp(isa, "avx512") == 0);
}

// Round to the nearest bf16, ties to even (what vcvtneps2bf16 does on normal numbers); NaN stays NaN.
inline uint16_t float_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float round_to_bf16(float v) { return bf16_to_float(float_to_bf16(v)); }

// KV caches hold fp32 or bf16 (as uint16_t bits): one element of either, as a float and back (rounded).
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline void store_float(float v, float* out) { *out = v; }
inline void store_float(float v, uint16_t* out) { *out = float_to_bf16(v); }

// Paged KV caches, (keys, values): CPU [slots, kv_heads, head_dim], alike, fp32 or bf16.
inline void check_caches(const paddle::Tensor& key_cache, const paddle::Tensor& value_cache) {
  PD_CHECK(key_cache.is_cpu() && value_cache.is_cpu() &&
               (key_cache.dtype() == paddle::DataType::FLOAT32 || key_cache.dtype() == paddle::DataType::BFLOAT16) &&
               value_cache.dtype() == key_cache.dtype() && key_cache.dims().size() == 3 &&
               value_cache.dims() == key_cache.dims(),
           "the caches must be CPU [slots, kv_heads, head_dim] tensors, alike, both fp32 or both bf16");
}

// fn(keys, values) with checked caches' elements: float*, or uint16_t* (bf16 bits); const for const caches.
template <class Tensor, class Fn>
void with_cache_elements(Tensor& key_cache, Tensor& value_cache, Fn&& fn) {
  using Bits = std::conditional_t<std::is_const_v<Tensor>, const uint16_t, uint16_t>;
  if (key_cache.dtype() == paddle::DataType::BFLOAT16)
    fn(static_cast<Bits*>(key_cache.data()), static_cast<Bits*>(value_cache.data()));
  else
    fn(key_cache.template data<float>(), value_cache.template data<float>());
}

// exp(x) for x <= 0 (softmax arguments after subtracting the max): Cephes-style range reduction
// x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, then scalef by 2^n. Relative error ~2e-7;
// very negative inputs (and -inf) flush to 0.
ERNIE_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __m512 xc = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 out = _mm512_scalef_ps(p, n);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), out, _mm512_setzero_ps());
}

// Mask of the first `n` (0..16) lanes.
inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

}  // namespace ernie
