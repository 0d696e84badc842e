// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels (cpu_attention.cc, cpu_int8.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace sce_jax {

// Runs fn(chunk) for chunks 0..chunks-1 on the calling thread and XLA's intra-op pool. Helpers that start after
// the last chunk was taken return without touching `fn`, so they may outlive this call.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  auto work = [](State* st, const std::function<void(int64_t)>* f) {
    for (int64_t c; (c = st->next.fetch_add(1)) < st->chunks;) {
      (*f)(c);
      if (st->done.fetch_add(1) + 1 == st->chunks) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, &fn, work] { work(state.get(), &fn); });
  work(state.get(), &fn);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->chunks; });
}

}  // namespace sce_jax
