// Read-bandwidth probe for scripts/bench_kernels.py: the rate at which all pool threads can stream a
// buffer much larger than the caches is the ceiling for decode-time weight streaming.
#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "paddle/extension.h"
#include "thread_pool.h"

namespace ernie {
namespace {

constexpr int64_t kChunk = 1 << 20;  // int64 values (8 MiB) per claimed chunk

#pragma GCC push_options
#pragma GCC target("avx512f")
int64_t sum_avx512(const int64_t* data, int64_t n) {
  __m512i s = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // 4 cache lines per iteration
    s = _mm512_add_epi64(s, _mm512_add_epi64(_mm512_loadu_si512(data + i), _mm512_loadu_si512(data + i + 8)));
    s = _mm512_add_epi64(s, _mm512_add_epi64(_mm512_loadu_si512(data + i + 16), _mm512_loadu_si512(data + i + 24)));
  }
  int64_t total = _mm512_reduce_add_epi64(s);
  for (; i < n; ++i) total += data[i];
  return total;
}
#pragma GCC pop_options

int64_t sum_scalar(const int64_t* data, int64_t n) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += data[i];
  return total;
}

}  // namespace

// Sum of an int64 buffer (so the reads cannot be optimised away).
std::vector<paddle::Tensor> ReadSum(const paddle::Tensor& x) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::INT64, "x must be a CPU int64 tensor");
  auto out = paddle::empty({1}, paddle::DataType::INT64, x.place());
  const int64_t n = x.numel(), chunks = (n + kChunk - 1) / kChunk;
  const bool avx512 = use_avx512();
  std::vector<int64_t> partial(chunks);
  ThreadPool::instance().run(chunks, [&](int64_t c) {
    const int64_t* start = x.data<int64_t>() + c * kChunk;
    const int64_t len = std::min(kChunk, n - c * kChunk);
    partial[c] = avx512 ? sum_avx512(start, len) : sum_scalar(start, len);
  });
  int64_t total = 0;
  for (int64_t v : partial) total += v;
  out.data<int64_t>()[0] = total;
  return {out};
}

}  // namespace ernie

PD_BUILD_OP(ernie_read_sum).Inputs({"X"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(ernie::ReadSum));
