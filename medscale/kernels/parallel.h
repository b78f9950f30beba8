// ParallelFor over XLA's intra-op thread pool (the FFI ThreadPool context), shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace medscale {

// Runs body(0..n-1) on the caller and on up to num_threads - 1 helpers from XLA's pool. The caller waits
// only for tasks that have started, never for a helper to be scheduled, so two such calls running at once
// on a small pool cannot wait on each other.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> body) {
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::function<void(int64_t)> body;
    int64_t n;
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  st->body = std::move(body);
  st->n = n;
  auto work = [](const std::shared_ptr<State>& s) {
    for (int64_t i; (i = s->next.fetch_add(1)) < s->n;) {
      s->body(i);
      std::lock_guard<std::mutex> lock(s->mu);
      if (++s->done == s->n) s->cv.notify_all();
    }
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([st, work]() { work(st); });
  work(st);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done == st->n; });
}

}  // namespace medscale
