// The int8 model's linear layers on CPU as XLA FFI custom calls, fused so that each block of 32 tokens goes
// through quantization, the integer products and every elementwise step in cache. Built into one library per
// instruction set with the attention kernel (setup.py; loaded by kernels/cpu_library.py); kernels/cpu_int8.py
// states the contract, packs the weights and holds the numpy reference; sce_jax/quant.py the scheme.
//
// SceJaxInt8Linear:    y = dq(q(x / smooth) W) + b, for output channels [col_begin, col_end) (the QKV projection).
// SceJaxInt8LayerTail: the rest of a layer after attention: x1 = LN1(x + dq(q(att) Wo) + bo);
//                      out = LN2(x1 + dq(q(act(dq(q(x1 / smooth1) W1) + b1)) W2) + b2); every linear's input is
//                      divided by its smoothing (the model smooths only W1's and QKV's: ones elsewhere).
// q: symmetric int8 per token (row), scale = max|row| / 127; W: int8 in two passes per output channel,
// W ≈ scale · (Q + R / 254) (R: what Q's rounding leaves, in steps of 1/254); dq: the exact integer sums
// x·Q + x·R / 254 times both scales. The first `float_rows` rows ([CLS] and query tokens) are quantized in two
// passes too: the row, then what its int8 copy leaves (x - q·scale) with a scale of its own; both products are
// summed, so those rows carry about 15 bits.
//
// The products, by the instruction set this file is compiled for (one packed weight layout each, made by
// sce_jax.kernels.cpu_int8.pack_kernel; SceJaxInt8Layout says which):
// - AMX (layout "tiles"): int8 x int8 -> int32 on 16x64-byte tiles (TDPBSSD), Q and R as two int8 passes:
//   [O/16 blocks][Q, R][I/64 blocks][16 rows of 4 inputs][16 outputs][4].
// - every other build (layout "pairs"): Q and R as one int16 weight, 254·Q + R (|.| <= 32385), times the int8
//   activations widened to int16, one product instead of two: vpdpwssd (AVX-512 VNNI), vpmaddwd + vpaddd (AVX2), or
//   plain loops: [O/16 blocks][I/2 pairs][16 outputs][2] int16. One such product reaches 127 · 32385 ≈ 4.1e6, so the
//   int32 sums run over at most 512 inputs at a time (< 2^31) and are added up in float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#define SCE_JAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 32;       // tokens per block (a multiple of 32: pairs of 16-row tiles)
constexpr int64_t kWidth = 16;      // output channels per weight block
constexpr float kResidualStep = 1.0f / 254.0f;  // R's unit, in Q's steps

// Activation codes (the `activation` attribute).
constexpr int64_t kGelu = 0, kGeluTanh = 1, kRelu = 2;

#ifdef SCE_JAX_AMX
constexpr int kLayout = 1;          // "tiles"
constexpr int64_t kDepth = 64;      // inputs per tile row (bytes)
constexpr int64_t kTile = 1024;     // bytes of one packed weight tile
using Act = int8_t;                 // quantized activations as the products read them
// The int32 sums of 32 rows against one block of 16 outputs, both weight passes: row r holds Q's 16 sums, then
// R's 16.
struct alignas(64) Sums {
  int32_t v[kRows][2 * kWidth];
};
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SCE_JAX_QUADS 1
constexpr int kLayout = 3;          // "quads"
constexpr int64_t kDepth = 4;       // inputs per weight quad (one vpdpbusd lane)
constexpr int64_t kChunkQuads = 4096;  // 16384 inputs per int32 sum: 16384 · 255 · 127 < 2^31
constexpr int32_t kActOffset = 128;    // activations stored as q + 128 (unsigned), as vpdpbusd reads them
using Act = uint8_t;
// The sums of 32 rows against one block of 16 outputs (254·Q + R in one), as float32.
struct alignas(64) Sums {
  float v[kRows][2 * kWidth];
};
#else
constexpr int kLayout = 2;          // "pairs"
constexpr int64_t kDepth = 2;       // inputs per weight pair
constexpr int64_t kChunkPairs = 256;  // 512 inputs per int32 sum: 512 · 127 · 32385 < 2^31
using Act = int16_t;
// The sums of 32 rows against up to two blocks of 16 outputs (254·Q + R in one), as float32.
struct alignas(64) Sums {
  float v[kRows][2 * kWidth];
};
#endif

#ifndef SCE_JAX_QUADS
constexpr int32_t kActOffset = 0;
#endif

struct Linear {
  const int8_t* packed;      // the weights in this build's layout (see the top of the file)
  const float* scale;        // [out]
  const float* bias;         // [out]
  const float* inv_smooth;   // [in] or nullptr
  int64_t in, out, depth;    // depth: `in` rounded up to kDepth (the quantized rows' stride)
};

// Per-thread buffers, grown on demand.
struct Scratch {
  std::vector<Act> a, a2;          // [kRows, depth] quantized rows, and the two-pass rows' residuals
  Sums sums, sums2;
  std::vector<float> values, x1, hidden;
  float scale[kRows], scale2[kRows];
};

// v = x (times inv_smooth when given); returns max |v|.
float Load(const float* x, const float* inv_smooth, int64_t n, float* v) {
#ifdef __AVX512F__
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
    __m512 value = _mm512_maskz_loadu_ps(mask, x + k);
    if (inv_smooth) value = _mm512_mul_ps(value, _mm512_maskz_loadu_ps(mask, inv_smooth + k));
    _mm512_mask_storeu_ps(v + k, mask, value);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(value));
  }
  return _mm512_reduce_max_ps(amax);
#else
  int64_t k = 0;
  float amax = 0.0f;
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax8 = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) {
    __m256 value = _mm256_loadu_ps(x + k);
    if (inv_smooth) value = _mm256_mul_ps(value, _mm256_loadu_ps(inv_smooth + k));
    _mm256_storeu_ps(v + k, value);
    amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, value));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax8);
  for (float lane : lanes) amax = std::max(amax, lane);
#endif
  for (; k < n; ++k) {
    v[k] = inv_smooth ? x[k] * inv_smooth[k] : x[k];
    amax = std::max(amax, std::fabs(v[k]));
  }
  return amax;
#endif
}

// q = round_half_even(v * inv), clamped to [-127, 127] (the default rounding mode: to nearest, ties to even).
void Round(const float* v, int64_t n, float inv, Act* q) {
#ifdef __AVX512F__
  const __m512 factor = _mm512_set1_ps(inv);
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, v + k), factor));
    r = _mm512_min_epi32(_mm512_max_epi32(r, low), high);
    if constexpr (kActOffset != 0) r = _mm512_add_epi32(r, _mm512_set1_epi32(kActOffset));
    if constexpr (sizeof(Act) == 1) {
      _mm512_mask_cvtepi32_storeu_epi8(q + k, mask, r);
    } else {
      _mm512_mask_cvtepi32_storeu_epi16(q + k, mask, r);
    }
  }
#else
  int64_t k = 0;
#ifdef __AVX2__
  const __m256 factor = _mm256_set1_ps(inv);
  const __m256i low = _mm256_set1_epi32(-127), high = _mm256_set1_epi32(127);
  for (; k + 8 <= n; k += 8) {
    __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k), factor));
    r = _mm256_min_epi32(_mm256_max_epi32(r, low), high);
    const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), packed);
  }
#endif
  for (; k < n; ++k) q[k] = static_cast<Act>(std::min(127.0f, std::max(-127.0f, std::nearbyint(v[k] * inv))));
#endif
}

// Quantizes rows [0, m) of x (row stride ld; times inv_smooth when given) into s.a (zero padded to kRows x
// depth) and s.scale; rows r < two_pass also into s.a2 / s.scale2 (the residual). Rounds half to even.
void Quantize(const float* x, int64_t ld, int64_t m, int64_t in, const float* inv_smooth, int64_t depth,
              int64_t two_pass, Scratch& s) {
  s.a.resize(kRows * depth);
  if (depth > in || m < kRows) std::fill(s.a.begin(), s.a.end(), 0);
  if (two_pass > 0) s.a2.assign(kRows * depth, 0);
  s.values.resize(in + 16);
  float* v = s.values.data();
  for (int64_t r = 0; r < m; ++r) {
    const float amax = Load(x + r * ld, inv_smooth, in, v);
    s.scale[r] = amax > 0.0f ? amax / 127.0f : 1.0f;
    Act* q = s.a.data() + r * depth;
    Round(v, in, amax > 0.0f ? 127.0f / amax : 1.0f, q);
    if (r < two_pass) {
      const float scale = s.scale[r];
      float amax2 = 0.0f;
#pragma omp simd reduction(max : amax2)
      for (int64_t k = 0; k < in; ++k) {
        v[k] -= static_cast<float>(static_cast<int32_t>(q[k]) - kActOffset) * scale;
        amax2 = std::max(amax2, std::fabs(v[k]));
      }
      s.scale2[r] = amax2 > 0.0f ? amax2 / 127.0f : 1.0f;
      Round(v, in, amax2 > 0.0f ? 127.0f / amax2 : 1.0f, s.a2.data() + r * depth);
    }
  }
}

#ifdef SCE_JAX_AMX
bool AmxReady() {
  // Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA);
  // sce_jax.kernels.cpu_library asks before choosing this build, so this only confirms it.
  static const bool ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: int32 sums (2 row tiles x 2 column tiles), 4-5: activations, 6-7: weights; all 16 x 64 bytes.
void ConfigureTiles() {
  TileConfig config{};
  config.palette = 1;
  for (int i = 0; i < 8; ++i) {
    config.colsb[i] = 64;
    config.rows[i] = 16;
  }
  _tile_loadconfig(&config);
}

// sums = a[0:32] . Q_j and a[0:32] . R_j for output block j (a: row stride w.depth; 2x2 tiles: two row tiles
// times Q's and R's tiles, per step over the depth).
void BlockAmx(const int8_t* a, const Linear& w, int64_t j, Sums& sums) {
  const int64_t depth_blocks = w.depth / kDepth;
  const int8_t* bq = w.packed + 2 * j * depth_blocks * kTile;
  const int8_t* br = bq + depth_blocks * kTile;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < depth_blocks; ++k) {
    _tile_loadd(4, a + k * kDepth, w.depth);
    _tile_loadd(5, a + 16 * w.depth + k * kDepth, w.depth);
    _tile_loadd(6, bq + k * kTile, 64);
    _tile_loadd(7, br + k * kTile, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, &sums.v[0][0], sizeof(sums.v[0]));
  _tile_stored(1, &sums.v[0][kWidth], sizeof(sums.v[0]));
  _tile_stored(2, &sums.v[16][0], sizeof(sums.v[0]));
  _tile_stored(3, &sums.v[16][kWidth], sizeof(sums.v[0]));
}

// The sums of one row against both weight passes, for 16 outputs: acc[c] (Q) + acc[16 + c] / 254 (R).
inline float Combined(const int32_t* acc, int64_t c) {
  return static_cast<float>(acc[c]) + static_cast<float>(acc[kWidth + c]) * kResidualStep;
}

// y[r][c] = sums · (sx[r] · ws[c]) (+ the residual rows' sums · (sx2[r] · ws[c]) for r < two_pass) + b[c], for the
// block's rows [0, rows) and its outputs [c0, c0 + count) (ws, b and y start at output c0; y has row stride ld).
void DequantizeBlock(const Sums& sums, const Sums& sums2, int64_t rows, int64_t two_pass, const float* sx,
                     const float* sx2, int64_t c0, int64_t count, const float* ws, const float* b, float* y,
                     int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* acc = &sums.v[r][c0];
    float* yr = y + r * ld;
    if (r < two_pass) {
      const int32_t* acc2 = &sums2.v[r][c0];
#pragma omp simd
      for (int64_t c = 0; c < count; ++c)
        yr[c] = Combined(acc, c) * (sx[r] * ws[c]) + Combined(acc2, c) * (sx2[r] * ws[c]) + b[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) yr[c] = Combined(acc, c) * (sx[r] * ws[c]) + b[c];
    }
  }
}

// One linear layer on a block of m <= kRows rows: quantize, then per block of 16 outputs: the int8 products of
// all 32 rows against both weight passes (and the two-pass rows' residuals), dequantized while the sums are in
// cache.
void Apply(const Linear& w, const float* x, int64_t ld_x, int64_t m, int64_t two_pass, int64_t col_begin,
           int64_t col_end, Scratch& s, float* out, int64_t ld_out) {
  Quantize(x, ld_x, m, w.in, w.inv_smooth, w.depth, two_pass, s);
  for (int64_t j = col_begin / kWidth; j * kWidth < col_end; ++j) {
    const int64_t c0 = std::max(col_begin - j * kWidth, int64_t{0});
    const int64_t count = std::min(col_end - j * kWidth, kWidth) - c0;
    const int64_t o = j * kWidth + c0;  // the first output channel of this block
    BlockAmx(s.a.data(), w, j, s.sums);
    if (two_pass > 0) BlockAmx(s.a2.data(), w, j, s.sums2);
    DequantizeBlock(s.sums, s.sums2, m, two_pass, s.scale, s.scale2, c0, count, w.scale + o, w.bias + o,
                    out + (o - col_begin), ld_out);
  }
}

// Tile state is per thread: configured for each block of work and released after it.
template <typename Fn>
void WithTiles(Fn&& fn) {
  ConfigureTiles();
  fn();
  _tile_release();
}

bool ProductsReady() { return AmxReady(); }

#else  // the "pairs" layout

inline int32_t Pair(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#if defined(SCE_JAX_QUADS)
constexpr int64_t kGroupRows = 8, kStepBlocks = 1;  // 16 int32 accumulators of 16 lanes: 8 rows x (Q, R)

inline int32_t Quad(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// acc + the sums of four products of unsigned bytes x and signed bytes w per lane (vpdpbusd). In assembly: GCC 12
// copies the accumulators of the intrinsic (_mm512_dpbusd_epi32) from register to register at every step of the
// loop below.
inline __m512i Dp(__m512i acc, __m512i x, __m512i w) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}

// sums[r0 + r][c] = 254 · (x · Q) + x · R for rows r < 8 of `a` (x + 128 as unsigned bytes, row stride lda) and
// one output block (w: its packed bytes: `quads` rows of Q's 64 bytes then R's, then 128 · Q's and 128 · R's
// column sums as int32, which take the offset back out), as float32; int32 over kChunkQuads quads at a time. (Four
// rows against two blocks, the same number of accumulators, ran slower on an AMD EPYC Zen 5.)
void QuadsGroup(const uint8_t* a, int64_t lda, const int8_t* w, int64_t quads, Sums& sums, int64_t r0) {
  const __m512i offset_q = _mm512_loadu_si512(w + quads * 128), offset_r = _mm512_loadu_si512(w + quads * 128 + 64);
  const __m512 steps = _mm512_set1_ps(254.0f);
  for (int64_t k0 = 0; k0 < quads; k0 += kChunkQuads) {
    const int64_t k1 = std::min(quads, k0 + kChunkQuads);
    __m512i p0 = _mm512_setzero_si512(), p1 = p0, p2 = p0, p3 = p0, p4 = p0, p5 = p0, p6 = p0, p7 = p0;
    __m512i q0 = p0, q1 = p0, q2 = p0, q3 = p0, q4 = p0, q5 = p0, q6 = p0, q7 = p0;
    for (int64_t k = k0; k < k1; ++k) {
      const __m512i wq = _mm512_loadu_si512(w + k * 128), wr = _mm512_loadu_si512(w + k * 128 + 64);
      const uint8_t* ak = a + 4 * k;
#define SCE_JAX_ROW(r)                                       \
  {                                                          \
    const __m512i x = _mm512_set1_epi32(Quad(ak + r * lda)); \
    p##r = Dp(p##r, x, wq);                                  \
    q##r = Dp(q##r, x, wr);                                  \
  }
      SCE_JAX_ROW(0) SCE_JAX_ROW(1) SCE_JAX_ROW(2) SCE_JAX_ROW(3)
      SCE_JAX_ROW(4) SCE_JAX_ROW(5) SCE_JAX_ROW(6) SCE_JAX_ROW(7)
#undef SCE_JAX_ROW
    }
    const __m512i ps[kGroupRows] = {p0, p1, p2, p3, p4, p5, p6, p7}, qs[kGroupRows] = {q0, q1, q2, q3, q4, q5, q6, q7};
    for (int r = 0; r < kGroupRows; ++r) {
      __m512i sq = ps[r], sr = qs[r];
      if (k0 == 0) {
        sq = _mm512_sub_epi32(sq, offset_q);
        sr = _mm512_sub_epi32(sr, offset_r);
      }
      __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sq), steps, _mm512_cvtepi32_ps(sr));
      float* out = &sums.v[r0 + r][0];
      if (k0 > 0) value = _mm512_add_ps(value, _mm512_loadu_ps(out));
      _mm512_storeu_ps(out, value);
    }
  }
}
#elif defined(__AVX2__)
constexpr int64_t kGroupRows = 4, kStepBlocks = 1;  // 8 int32 accumulators of 8 lanes: 4 rows x 16 outputs

// acc + the sums of pairwise products of x and w (vpmaddwd, vpaddd; the addition in assembly for the same reason
// as Dp above: GCC 12 otherwise copies every accumulator once per step).
inline __m256i Dp(__m256i acc, __m256i x, __m256i w) {
  const __m256i product = _mm256_madd_epi16(x, w);
  __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(product));
  return acc;
}

// As above with vpmaddwd + vpaddd (one block of 16 outputs: two registers per row).
template <int N>
void PairsGroup(const int16_t* a, int64_t lda, const int16_t* w, int64_t, int64_t pairs, Sums& sums, int64_t r0) {
  static_assert(N == 1, "one block of 16 outputs at a time");
  for (int64_t k0 = 0; k0 < pairs; k0 += kChunkPairs) {
    const int64_t k1 = std::min(pairs, k0 + kChunkPairs);
    __m256i p0 = _mm256_setzero_si256(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 2 * kWidth));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 2 * kWidth + kWidth));
      const int16_t* ak = a + 2 * k;
#define SCE_JAX_ROW(r)                                       \
  {                                                          \
    const __m256i x = _mm256_set1_epi32(Pair(ak + r * lda)); \
    p##r = Dp(p##r, x, w0);                                  \
    q##r = Dp(q##r, x, w1);                                  \
  }
      SCE_JAX_ROW(0) SCE_JAX_ROW(1) SCE_JAX_ROW(2) SCE_JAX_ROW(3)
#undef SCE_JAX_ROW
    }
    const __m256i ps[kGroupRows] = {p0, p1, p2, p3}, qs[kGroupRows] = {q0, q1, q2, q3};
    for (int r = 0; r < kGroupRows; ++r)
      for (int h = 0; h < 2; ++h) {
        float* out = &sums.v[r0 + r][h * 8];
        __m256 value = _mm256_cvtepi32_ps(h == 0 ? ps[r] : qs[r]);
        if (k0 > 0) value = _mm256_add_ps(value, _mm256_loadu_ps(out));
        _mm256_storeu_ps(out, value);
      }
  }
}
#elif defined(__SSE2__)
constexpr int64_t kGroupRows = 2, kStepBlocks = 1;  // 8 int32 accumulators of 4 lanes: 2 rows x 16 outputs

// As above with the baseline x86-64 instructions (pmaddwd, paddd: SSE2).
template <int N>
void PairsGroup(const int16_t* a, int64_t lda, const int16_t* w, int64_t, int64_t pairs, Sums& sums, int64_t r0) {
  static_assert(N == 1, "one block of 16 outputs at a time");
  for (int64_t k0 = 0; k0 < pairs; k0 += kChunkPairs) {
    const int64_t k1 = std::min(pairs, k0 + kChunkPairs);
    __m128i acc[kGroupRows][4];
    for (auto& row : acc)
      for (auto& v : row) v = _mm_setzero_si128();
    for (int64_t k = k0; k < k1; ++k) {
      const __m128i* wk = reinterpret_cast<const __m128i*>(w + k * 2 * kWidth);
      const __m128i w0 = _mm_loadu_si128(wk), w1 = _mm_loadu_si128(wk + 1), w2 = _mm_loadu_si128(wk + 2),
                    w3 = _mm_loadu_si128(wk + 3);
      for (int r = 0; r < kGroupRows; ++r) {
        const __m128i x = _mm_set1_epi32(Pair(a + r * lda + 2 * k));
        acc[r][0] = _mm_add_epi32(acc[r][0], _mm_madd_epi16(x, w0));
        acc[r][1] = _mm_add_epi32(acc[r][1], _mm_madd_epi16(x, w1));
        acc[r][2] = _mm_add_epi32(acc[r][2], _mm_madd_epi16(x, w2));
        acc[r][3] = _mm_add_epi32(acc[r][3], _mm_madd_epi16(x, w3));
      }
    }
    for (int r = 0; r < kGroupRows; ++r)
      for (int h = 0; h < 4; ++h) {
        float* out = &sums.v[r0 + r][h * 4];
        __m128 value = _mm_cvtepi32_ps(acc[r][h]);
        if (k0 > 0) value = _mm_add_ps(value, _mm_loadu_ps(out));
        _mm_storeu_ps(out, value);
      }
  }
}
#else
constexpr int64_t kGroupRows = 1, kStepBlocks = 1;

// As above in plain loops (other architectures: what their compiler makes of them).
template <int N>
void PairsGroup(const int16_t* a, int64_t lda, const int16_t* w, int64_t, int64_t pairs, Sums& sums, int64_t r0) {
  static_assert(N == 1, "one block of 16 outputs at a time");
  for (int64_t k0 = 0; k0 < pairs; k0 += kChunkPairs) {
    const int64_t k1 = std::min(pairs, k0 + kChunkPairs);
    int32_t acc[kWidth] = {};
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t x0 = a[2 * k], x1 = a[2 * k + 1];
      const int16_t* wk = w + k * 2 * kWidth;
      for (int64_t c = 0; c < kWidth; ++c) acc[c] += x0 * wk[2 * c] + x1 * wk[2 * c + 1];
    }
    float* out = sums.v[r0];
    for (int64_t c = 0; c < kWidth; ++c) out[c] = (k0 > 0 ? out[c] : 0.0f) + static_cast<float>(acc[c]);
  }
}
#endif

// sums[r][16 n + c] = row r of `a` (rows [0, rows) and the rest of their group) against the weights of output
// block j + n, n < nb.
void BlockPairs(const Act* a, const Linear& w, int64_t j, int64_t nb, int64_t rows, Sums& sums) {
#if defined(SCE_JAX_QUADS)
  const int64_t quads = w.depth / kDepth;
  const int8_t* wj = w.packed + j * (quads + 1) * 128;
  for (int64_t r0 = 0; r0 < rows; r0 += kGroupRows) QuadsGroup(a + r0 * w.depth, w.depth, wj, quads, sums, r0);
  (void)nb;
#else
  const int64_t pairs = w.depth / 2, stride = pairs * 2 * kWidth;
  const int16_t* wj = reinterpret_cast<const int16_t*>(w.packed) + j * stride;
  for (int64_t r0 = 0; r0 < rows; r0 += kGroupRows) {
    if (nb == 2) {
      if constexpr (kStepBlocks >= 2) PairsGroup<2>(a + r0 * w.depth, w.depth, wj, stride, pairs, sums, r0);
    } else {
      PairsGroup<1>(a + r0 * w.depth, w.depth, wj, stride, pairs, sums, r0);
    }
  }
#endif
}

// y[r][c] = sums[r][off + c] / 254 · (sx[r] · ws[c]) (+ the residual rows' sums the same way with sx2, for
// r < two_pass) + b[c], for rows [0, rows) and `count` outputs (ws, b and y start at the first of them).
void DequantizeBlock(const Sums& sums, const Sums& sums2, int64_t off, int64_t rows, int64_t two_pass,
                     const float* sx, const float* sx2, int64_t count, const float* ws, const float* b, float* y,
                     int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* acc = &sums.v[r][off];
    const float f = sx[r] * kResidualStep;
    float* yr = y + r * ld;
    if (r < two_pass) {
      const float* acc2 = &sums2.v[r][off];
      const float f2 = sx2[r] * kResidualStep;
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) yr[c] = acc[c] * (f * ws[c]) + acc2[c] * (f2 * ws[c]) + b[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) yr[c] = acc[c] * (f * ws[c]) + b[c];
    }
  }
}

// One linear layer on a block of m <= kRows rows: quantize, then per step of kStepBlocks blocks of 16 outputs:
// the products of the rows (and the two-pass rows' residuals), dequantized while the sums are in cache.
void Apply(const Linear& w, const float* x, int64_t ld_x, int64_t m, int64_t two_pass, int64_t col_begin,
           int64_t col_end, Scratch& s, float* out, int64_t ld_out) {
  Quantize(x, ld_x, m, w.in, w.inv_smooth, w.depth, two_pass, s);
  const int64_t last = (col_end + kWidth - 1) / kWidth;
  for (int64_t j = col_begin / kWidth; j < last; j += kStepBlocks) {
    const int64_t nb = std::min(kStepBlocks, last - j);
    BlockPairs(s.a.data(), w, j, nb, m, s.sums);
    if (two_pass > 0) BlockPairs(s.a2.data(), w, j, nb, two_pass, s.sums2);
    for (int64_t n = 0; n < nb; ++n) {
      const int64_t c0 = std::max(col_begin - (j + n) * kWidth, int64_t{0});
      const int64_t count = std::min(col_end - (j + n) * kWidth, kWidth) - c0;
      const int64_t o = (j + n) * kWidth + c0;  // the first output channel of this block
      DequantizeBlock(s.sums, s.sums2, n * kWidth + c0, m, two_pass, s.scale, s.scale2, count, w.scale + o,
                      w.bias + o, out + (o - col_begin), ld_out);
    }
  }
}

template <typename Fn>
void WithTiles(Fn&& fn) {
  fn();
}

bool ProductsReady() { return true; }

#endif  // SCE_JAX_AMX

// In place: row = LayerNorm(row) · gamma + beta.
void LayerNorm(float* row, int64_t n, const float* gamma, const float* beta, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += row[i];
  const float mean = sum / static_cast<float>(n);
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += (row[i] - mean) * (row[i] - mean);
  const float inv = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row[i] = (row[i] - mean) * inv * gamma[i] + beta[i];
}

// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26), in arithmetic the compiler vectorizes.
inline float Erf(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  return std::copysign(1.0f - poly * std::exp(-a * a), x);
}

void Activate(float* u, int64_t n, int64_t activation) {
  if (activation == kGelu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) u[i] = 0.5f * u[i] * (1.0f + Erf(u[i] * 0.70710678118654752f));
  } else if (activation == kGeluTanh) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float z = 0.7978845608028654f * (u[i] + 0.044715f * u[i] * u[i] * u[i]);
      u[i] = 0.5f * u[i] * (2.0f - 2.0f / (std::exp(2.0f * z) + 1.0f));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) u[i] = std::max(u[i], 0.0f);
  }
}

ffi::Error PackedLinear(ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        const float* inv_smooth, int64_t in, const char* name, Linear& out) {
  const auto pd = packed.dimensions();
  const int64_t o = scale.dimensions().size() == 1 ? scale.dimensions()[0] : -1;
  const int64_t depth = (in + kDepth - 1) / kDepth * kDepth, blocks = (o + kWidth - 1) / kWidth;
#ifdef SCE_JAX_AMX
  const bool layout = pd.size() == 3 && pd[0] == 2 * blocks && pd[1] == depth / kDepth && pd[2] == kTile;
#elif defined(SCE_JAX_QUADS)
  const bool layout = pd.size() == 3 && pd[0] == blocks && pd[1] == depth / kDepth + 1 && pd[2] == 2 * kWidth * 4;
#else
  const bool layout = pd.size() == 3 && pd[0] == blocks && pd[1] == depth / kDepth && pd[2] == 2 * kWidth * 2;
#endif
  if (!layout || o <= 0 || bias.dimensions().size() != 1 || bias.dimensions()[0] != o)
    return ffi::Error::InvalidArgument(std::string("sce_jax int8: inconsistent shapes of ") + name);
  out = Linear{packed.typed_data(), scale.typed_data(), bias.typed_data(), inv_smooth, in, o, depth};
  return ffi::Error::Success();
}

ffi::Error NotReady() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "sce_jax int8: this process may not use AMX tiles (Linux did not grant them)");
}

ffi::Error LinearRun(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> inv_smooth,
                     ffi::ResultBuffer<ffi::F32> y, int64_t float_rows, int64_t col_begin, int64_t col_end) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || inv_smooth.dimensions().size() != 1 || inv_smooth.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("sce_jax_int8_linear: wrong ranks or smoothing size");
  Linear w;
  if (auto e = PackedLinear(packed, scale, bias, inv_smooth.typed_data(), xd[1], "the linear", w); e.failure()) return e;
  const int64_t tokens = xd[0];
  if (col_begin < 0 || col_begin >= col_end || col_end > w.out || yd[0] != tokens || yd[1] != col_end - col_begin)
    return ffi::Error::InvalidArgument("sce_jax_int8_linear: output columns do not match");
  if (!ProductsReady()) return NotReady();
  const float* in = x.typed_data();
  float* out = y->typed_data();
  const int64_t width = col_end - col_begin;
  sce_jax::ParallelFor(pool, (tokens + kRows - 1) / kRows, [&](int64_t block) {
    thread_local Scratch s;
    const int64_t r0 = block * kRows, m = std::min(kRows, tokens - r0);
    const int64_t two_pass = std::max<int64_t>(0, std::min(m, float_rows - r0));
    WithTiles([&] { Apply(w, in + r0 * w.in, w.in, m, two_pass, col_begin, col_end, s, out + r0 * width, width); });
  });
  return ffi::Error::Success();
}

ffi::Error TailRun(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> attended,
                   ffi::Buffer<ffi::S8> wo, ffi::Buffer<ffi::F32> so, ffi::Buffer<ffi::F32> bo,
                   ffi::Buffer<ffi::F32> inv_smooth_o, ffi::Buffer<ffi::F32> gamma1, ffi::Buffer<ffi::F32> beta1,
                   ffi::Buffer<ffi::S8> w1, ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1,
                   ffi::Buffer<ffi::F32> inv_smooth1,
                   ffi::Buffer<ffi::S8> w2, ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2,
                   ffi::Buffer<ffi::F32> inv_smooth2, ffi::Buffer<ffi::F32> gamma2, ffi::Buffer<ffi::F32> beta2,
                   ffi::ResultBuffer<ffi::F32> y, int64_t float_rows, float eps, int64_t activation) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || attended.dimensions().size() != 2 || attended.dimensions()[0] != xd[0] ||
      attended.dimensions()[1] != xd[1] || y->dimensions().size() != 2 || y->dimensions()[0] != xd[0] ||
      y->dimensions()[1] != xd[1])
    return ffi::Error::InvalidArgument("sce_jax_int8_layer_tail: x, attended and the output differ in shape");
  const int64_t tokens = xd[0], hidden = xd[1];
  Linear lo, l1, l2;
  if (auto e = PackedLinear(wo, so, bo, inv_smooth_o.typed_data(), hidden, "the attention output", lo); e.failure()) return e;
  if (auto e = PackedLinear(w1, s1, b1, inv_smooth1.typed_data(), hidden, "the intermediate", l1); e.failure()) return e;
  if (auto e = PackedLinear(w2, s2, b2, inv_smooth2.typed_data(), l1.out, "the output", l2); e.failure()) return e;
  if (inv_smooth_o.dimensions().size() != 1 || inv_smooth_o.dimensions()[0] != hidden ||
      inv_smooth1.dimensions().size() != 1 || inv_smooth1.dimensions()[0] != hidden ||
      inv_smooth2.dimensions().size() != 1 || inv_smooth2.dimensions()[0] != l1.out)
    return ffi::Error::InvalidArgument("sce_jax_int8_layer_tail: smoothing sizes");
  for (auto* v : {&gamma1, &beta1, &gamma2, &beta2})
    if (v->dimensions().size() != 1 || v->dimensions()[0] != hidden)
      return ffi::Error::InvalidArgument("sce_jax_int8_layer_tail: layer norm sizes");
  if (lo.out != hidden || l2.out != hidden || activation < kGelu || activation > kRelu)
    return ffi::Error::InvalidArgument("sce_jax_int8_layer_tail: output sizes or activation");
  if (!ProductsReady()) return NotReady();
  const int64_t inter = l1.out;
  sce_jax::ParallelFor(pool, (tokens + kRows - 1) / kRows, [&](int64_t block) {
    thread_local Scratch s;
    const int64_t r0 = block * kRows, m = std::min(kRows, tokens - r0);
    const int64_t two_pass = std::max<int64_t>(0, std::min(m, float_rows - r0));
    s.x1.resize(kRows * hidden);
    s.hidden.resize(kRows * inter);
    float* x1 = s.x1.data();
    float* h = s.hidden.data();
    float* out = y->typed_data() + r0 * hidden;
    const float* residual = x.typed_data() + r0 * hidden;
    WithTiles([&] {
      Apply(lo, attended.typed_data() + r0 * hidden, hidden, m, two_pass, 0, hidden, s, x1, hidden);
      for (int64_t r = 0; r < m; ++r) {
        float* row = x1 + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) row[i] += residual[r * hidden + i];
        LayerNorm(row, hidden, gamma1.typed_data(), beta1.typed_data(), eps);
      }
      Apply(l1, x1, hidden, m, two_pass, 0, inter, s, h, inter);
      for (int64_t r = 0; r < m; ++r) Activate(h + r * inter, inter, activation);
      Apply(l2, h, inter, m, two_pass, 0, hidden, s, out, hidden);
      for (int64_t r = 0; r < m; ++r) {
        float* row = out + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) row[i] += x1[r * hidden + i];
        LayerNorm(row, hidden, gamma2.typed_data(), beta2.typed_data(), eps);
      }
    });
  });
  return ffi::Error::Success();
}

}  // namespace

// The packed weights' layout this build reads: 1 "tiles" (AMX), 2 "pairs" (int16 pairs: AVX2 and the plain builds),
// 3 "quads" (int8 quads: AVX-512 VNNI).
extern "C" int SceJaxInt8Layout() { return kLayout; }

// The instruction set this library was compiled for (the build variant's name in sce_jax.kernels.cpu_library).
extern "C" const char* SceJaxCpuKernelsIsa() {
#if defined(SCE_JAX_AMX)
  return "amx";
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "avx512_vnni";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SceJaxInt8Linear, LinearRun,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, I]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // packed weights (the build's layout)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight scales [O]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [O]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // 1 / smoothing [I]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, col_end - col_begin]
                                  .Attr<int64_t>("float_rows")
                                  .Attr<int64_t>("col_begin")
                                  .Attr<int64_t>("col_end"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SceJaxInt8LayerTail, TailRun,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, F], the layer's input (residual)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // attended [T, F]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // attention output: packed, scale, bias, 1 / smoothing
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // attention layer norm: gamma, beta
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // intermediate: packed, scale, bias, 1 / smoothing
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // output: packed, scale, bias, 1 / smoothing
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // output layer norm: gamma, beta
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T, F]
                                  .Attr<int64_t>("float_rows")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("activation"));
