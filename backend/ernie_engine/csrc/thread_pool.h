// A small work-sharing pool for the CPU ops, used instead of OpenMP.
//
// Why not OpenMP: on this project's machines the cores are shared (several processes, plus Paddle's own
// MKL/oneDNN threads). A fork-join team makes every call wait until each worker has been scheduled, and a
// libgomp worker that is descheduled costs a scheduler tick (4-16 ms measured) on a 0.3 ms decode matmul.
// Here the calling thread claims chunks from an atomic counter too, so when a worker is late the caller
// simply does the work; it only ever waits for chunks a worker has already claimed.
//
// Epoch protocol: `state_` packs (epoch << 32 | next chunk). A worker claims a chunk with a CAS that fails
// once the epoch moves on, so a late worker can never run a newer job with an older job's data. Job data
// is double-buffered by epoch parity, and run() returns only when no worker is inside a job (`busy_`), so a
// slot is never rewritten while a worker may still read it.
#pragma once

#include <immintrin.h>
#include <sched.h>

#include <algorithm>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ernie {

class ThreadPool {
 public:
  using Job = std::function<void(int64_t)>;

  static ThreadPool& instance() {
    static ThreadPool pool(default_threads());
    return pool;
  }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) for every i in [0, n), spread over the workers and the calling thread.
  void run(int64_t n, const Job& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mutex_);  // one job at a time (callers from several threads)
    const uint64_t epoch = (state_.load() >> 32) + 1;
    slots_[epoch & 1] = {&fn, n};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      state_.store(epoch << 32);
    }
    cv_.notify_all();
    work(epoch);
    while (busy_.load(std::memory_order_acquire) > 0) std::this_thread::yield();
  }

 private:
  struct Slot {
    const Job* fn = nullptr;
    int64_t n = 0;
  };

  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

  static int default_threads() {
    if (const char* env = std::getenv("ERNIE_CPU_KERNELS_THREADS")) return std::max(1, std::atoi(env));
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
  }

  // Claim and run chunks of `epoch` until none are left (or a newer job started).
  void work(uint64_t epoch) {
    const Slot& slot = slots_[epoch & 1];
    uint64_t cur = state_.load();
    while ((cur >> 32) == epoch && static_cast<int64_t>(cur & 0xFFFFFFFFu) < slot.n) {
      if (state_.compare_exchange_weak(cur, cur + 1)) {
        (*slot.fn)(static_cast<int64_t>(cur & 0xFFFFFFFFu));
        cur = state_.load();
      }
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly: decode issues hundreds of ops back to back, each a fraction of a millisecond.
      for (int i = 0; i < 20000 && (state_.load() >> 32) == seen && !stop_; ++i) _mm_pause();
      if ((state_.load() >> 32) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || (state_.load() >> 32) != seen; });
        if (stop_) return;
      }
      busy_.fetch_add(1, std::memory_order_acq_rel);
      seen = state_.load() >> 32;
      work(seen);
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> busy_{0};
  Slot slots_[2];
  std::atomic<bool> stop_{false};
};

}  // namespace ernie
