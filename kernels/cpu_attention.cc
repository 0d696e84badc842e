// One sparse cross-encoder layer's attention on CPU, fused, as an XLA FFI custom call. Built and registered by
// kernels/cpu_attention.py, whose docstring states the contract; sce_jax.attention.sparse_attention is the
// reference it matches.
//
// Every token gathers the list of keys it may see (its window, its [CLS], its query), then runs one float32
// softmax per head over just those keys, reading queries, keys and values straight from the QKV projection's
// [tokens, 3, heads, head_dim] output and writing [tokens, heads, head_dim], the layout the output projection
// reads. XLA's version of the same needs block copies, transposes, masked scores over padded key sets and a
// join of the three token groups; here the work is the arithmetic alone.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Bits of the `flags` attribute (the config's attention flags, and the [CLS]-only mode of the last layer).
constexpr int64_t kClsQuery = 1, kClsDoc = 2, kDocCls = 4, kDocQuery = 8, kClsOnly = 16;

// Tokens are numbered as in the model's flat token matrix: [CLS] (row d, slot c) at d*C + c, query token i of
// query q at D*C + q*Lq + i, document token l of row d at D*C + Q*Lq + d*L + l.
struct Problem {
  const float* q;  // token t's query vectors [H, K] at q + t * q_stride
  const float* k;  // its key and value vectors at k / v + t * kv_stride
  const float* v;
  int64_t q_stride, kv_stride;
  const int32_t* doc_slot;    // [D, L] document slot of each token of a row, -1 for padding
  const int32_t* doc_query;   // [D] each row's query
  const int32_t* query_mask;  // [Q, Lq] 1 for real query tokens
  float* out;                 // [tokens, H, K]
  int64_t rows, slots, queries, query_len, row_len, heads, head_dim, window, flags;
  float scale;
};

struct Scratch {
  std::vector<int64_t> keys;
  std::vector<float> probs;  // [H, keys]
};

// out_row = softmax(q_row . k[keys] * scale) @ v[keys], per head; all zeros without keys.
template <int64_t kHeadDim>
void Attend(const Problem& p, const float* q_row, const std::vector<int64_t>& keys, float* out_row, Scratch& s) {
  const int64_t H = p.heads, K = kHeadDim > 0 ? kHeadDim : p.head_dim, n = static_cast<int64_t>(keys.size());
  std::fill(out_row, out_row + H * K, 0.0f);
  if (n == 0) return;
  s.probs.resize(H * n);
  float* probs = s.probs.data();
  // Key-major loops: each key's [H, K] row is read once, contiguously.
  for (int64_t j = 0; j < n; ++j) {
    const float* k_row = p.k + keys[j] * p.kv_stride;
    for (int64_t h = 0; h < H; ++h) {
      const float* a = q_row + h * K;
      const float* b = k_row + h * K;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < K; ++i) dot += a[i] * b[i];
      probs[h * n + j] = dot * p.scale;
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float* row = probs + h * n;
    float max = row[0];
    for (int64_t j = 1; j < n; ++j) max = std::max(max, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - max);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* v_row = p.v + keys[j] * p.kv_stride;
    for (int64_t h = 0; h < H; ++h) {
      const float w = probs[h * n + j];
      float* o = out_row + h * K;
      const float* b = v_row + h * K;
#pragma omp simd
      for (int64_t i = 0; i < K; ++i) o[i] += w * b[i];
    }
  }
}

// The keys token t may see, in the order [CLS], query, document.
void GatherKeys(const Problem& p, int64_t t, std::vector<int64_t>& keys) {
  const int64_t C = p.slots, Lq = p.query_len, L = p.row_len;
  const int64_t query_base = p.rows * C, doc_base = query_base + p.queries * Lq;
  keys.clear();
  auto add_query = [&](int64_t query) {
    const int32_t* mask = p.query_mask + query * Lq;
    for (int64_t i = 0; i < Lq; ++i)
      if (mask[i]) keys.push_back(query_base + query * Lq + i);
  };
  if (t < query_base) {  // [CLS]: itself, the query, its document
    const int64_t d = t / C, c = t % C;
    keys.push_back(t);
    if (p.flags & kClsQuery) add_query(p.doc_query[d]);
    if (p.flags & kClsDoc) {
      const int32_t* slot = p.doc_slot + d * L;
      for (int64_t l = 0; l < L; ++l)
        if (slot[l] == c) keys.push_back(doc_base + d * L + l);
    }
  } else if (t < doc_base) {  // query token: the query
    add_query((t - query_base) / Lq);
  } else {  // document token: its [CLS], the query, the window within its document
    const int64_t d = (t - doc_base) / L, l = (t - doc_base) % L;
    const int32_t* slot = p.doc_slot + d * L;
    const int32_t own = slot[l];
    // With one document per row every token (padding too) sees the row's [CLS] and document tokens, as in the
    // XLA path; with several, only those of its own document.
    if (p.flags & kDocCls)
      for (int64_t c = 0; c < C; ++c)
        if (C == 1 || c == own) keys.push_back(d * C + c);
    if (p.flags & kDocQuery) add_query(p.doc_query[d]);
    const int64_t first = std::max<int64_t>(0, l - p.window), last = std::min<int64_t>(L - 1, l + p.window);
    for (int64_t m = first; m <= last; ++m)
      if (slot[m] >= 0 && (C == 1 || slot[m] == own)) keys.push_back(doc_base + d * L + m);
  }
}

template <int64_t kHeadDim>
void AttendTokens(const Problem& p, int64_t begin, int64_t end) {
  thread_local Scratch scratch;
  for (int64_t t = begin; t < end; ++t) {
    GatherKeys(p, t, scratch.keys);
    Attend<kHeadDim>(p, p.q + t * p.q_stride, scratch.keys, p.out + t * p.heads * p.head_dim, scratch);
  }
}

ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kv, ffi::Buffer<ffi::S32> doc_slot,
               ffi::Buffer<ffi::S32> doc_query, ffi::Buffer<ffi::S32> query_mask, ffi::ResultBuffer<ffi::F32> out,
               int64_t window, int64_t flags) {
  const auto qd = q.dimensions(), kvd = kv.dimensions(), sd = doc_slot.dimensions(), md = query_mask.dimensions();
  const auto od = out->dimensions();
  if (qd.size() != 4 || kvd.size() != 4 || sd.size() != 2 || md.size() != 2 || od.size() != 3)
    return ffi::Error::InvalidArgument("sce_jax_cpu_attention: wrong ranks");
  const int64_t H = kvd[2], K = kvd[3], tokens = kvd[0], D = sd[0], L = sd[1], Q = md[0], Lq = md[1];
  if (qd[2] != H || qd[3] != K || kvd[1] < 2 || od[1] != H || od[2] != K || D <= 0 ||
      doc_query.dimensions().size() != 1 || doc_query.dimensions()[0] != D || tokens <= Q * Lq + D * L ||
      (tokens - Q * Lq - D * L) % D != 0 || window < 0)
    return ffi::Error::InvalidArgument("sce_jax_cpu_attention: inconsistent shapes");
  const int64_t C = (tokens - Q * Lq - D * L) / D;
  const int64_t out_tokens = (flags & kClsOnly) ? D * C : tokens;
  if (od[0] != out_tokens || qd[0] < out_tokens)
    return ffi::Error::InvalidArgument("sce_jax_cpu_attention: output or query rows do not match the tokens");
  const int32_t* rows_query = doc_query.typed_data();
  for (int64_t d = 0; d < D; ++d)
    if (rows_query[d] < 0 || rows_query[d] >= Q)
      return ffi::Error::InvalidArgument("sce_jax_cpu_attention: doc_query out of range");

  const int64_t F = H * K;
  Problem p{q.typed_data(), kv.typed_data() + (kvd[1] - 2) * F, kv.typed_data() + (kvd[1] - 1) * F,
            qd[1] * F, kvd[1] * F, doc_slot.typed_data(), rows_query, query_mask.typed_data(), out->typed_data(),
            D, C, Q, Lq, L, H, K, window, flags, 1.0f / std::sqrt(static_cast<float>(K))};
  // Chunks of tokens small enough to balance the threads ([CLS] rows of long documents cost the most).
  const int64_t chunk = 32, chunks = (out_tokens + chunk - 1) / chunk;
  auto attend = K == 32 ? AttendTokens<32> : K == 64 ? AttendTokens<64> : AttendTokens<0>;
  sce_jax::ParallelFor(pool, chunks, [&](int64_t c) { attend(p, c * chunk, std::min(out_tokens, (c + 1) * chunk)); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SceJaxCpuAttention, Run,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q   [Tq, Pq, H, K], plane 0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kv  [T, Pkv, H, K], planes Pkv-2 (k), Pkv-1 (v)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // doc_slot   [D, L]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // doc_query  [D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_mask [Q, Lq]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T or D*C, H, K]
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("flags"));
