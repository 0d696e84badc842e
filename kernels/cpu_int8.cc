// The int8 model's linear layers on CPU as XLA FFI custom calls, fused so that each block of 32 tokens goes
// through quantization, the int8 products and every elementwise step in cache. Built and registered with the
// attention kernel (kernels/cpu_attention.py); kernels/cpu_int8.py states the contract and holds the numpy
// reference; sce_jax/quant.py the scheme.
//
// SceJaxInt8Linear:    y = dq(q(x / smooth) W) + b, for output channels [col_begin, col_end) (the QKV projection).
// SceJaxInt8LayerTail: the rest of a layer after attention: x1 = LN1(x + dq(q(att) Wo) + bo);
//                      out = LN2(x1 + dq(q(act(dq(q(x1 / smooth1) W1) + b1)) W2) + b2); every linear's input is
//                      divided by its smoothing (the model smooths only W1's and QKV's: ones elsewhere).
// q: symmetric int8 per token (row), scale = max|row| / 127; W: int8 in two passes per output channel,
// W ≈ scale · (Q + R / 254) (R: what Q's rounding leaves, in steps of 1/254); dq: the int32 sums of both passes,
// (x·Q + x·R / 254), times both scales. The first `float_rows` rows ([CLS] and query tokens) are quantized in two
// passes too: the row, then what its int8 copy leaves (x - q·scale) with a scale of its own; both products are
// summed, so those rows carry about 15 bits.
//
// The int8 x int8 -> int32 products run on AMX tiles where the CPU has them and Linux grants them (TDPBSSD on
// 16x64-byte tiles), else in plain loops (the same sums, exactly). Weights come packed for the tiles
// (sce_jax.kernels.cpu_int8.pack_kernel): [O/16 blocks][Q, R][I/64 blocks][16 rows of 4 inputs][16 outputs][4],
// so that a pair of tiles (Q's and R's of the same 16 outputs) runs as a pair of column blocks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SCE_JAX_AMX 1
#endif

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 32;       // tokens per block (a multiple of 32: pairs of 16-row tiles)
constexpr int64_t kDepth = 64;      // inputs per tile row (bytes)
constexpr int64_t kWidth = 16;      // output channels per tile
constexpr int64_t kTile = 1024;     // bytes of one packed weight tile
constexpr float kResidualStep = 1.0f / 254.0f;  // R's unit, in Q's steps

// Activation codes (the `activation` attribute).
constexpr int64_t kGelu = 0, kGeluTanh = 1, kRelu = 2;

struct Linear {
  const int8_t* packed;      // [2 * blocks, depth_blocks, kTile]: Q's and R's tiles of each block of 16 outputs
  const float* scale;        // [out]
  const float* bias;         // [out]
  const float* inv_smooth;   // [in] or nullptr
  int64_t in, out, depth;    // depth: `in` rounded up to kDepth
};

// The int32 sums of 32 rows against one block of 16 outputs, both weight passes: row r holds Q's 16 sums, then
// R's 16.
struct alignas(64) BlockSums {
  int32_t v[32][2 * kWidth];
};

bool AmxReady() {
#ifdef SCE_JAX_AMX
  // Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
  static const bool ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ready;
#else
  return false;
#endif
}

#ifdef SCE_JAX_AMX
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
void BlockAmx(const int8_t* a, const Linear& w, int64_t j, BlockSums& sums) {
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
#endif

// The same sums in plain loops, for rows [0, rows) only.
void BlockPortable(const int8_t* a, const Linear& w, int64_t j, int64_t rows, BlockSums& sums) {
  const int64_t depth_blocks = w.depth / kDepth;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = a + r * w.depth;
    for (int64_t pass = 0; pass < 2; ++pass) {
      int32_t* c = &sums.v[r][pass * kWidth];
      std::fill(c, c + kWidth, 0);
      for (int64_t k = 0; k < depth_blocks; ++k) {
        const int8_t* b = w.packed + ((2 * j + pass) * depth_blocks + k) * kTile;
        const int8_t* x = row + k * kDepth;
        for (int64_t i = 0; i < 16; ++i)
          for (int64_t n = 0; n < kWidth; ++n)
            for (int64_t t = 0; t < 4; ++t) c[n] += int32_t(x[i * 4 + t]) * int32_t(b[i * 64 + n * 4 + t]);
      }
    }
  }
}

// Per-thread buffers, grown on demand.
struct Scratch {
  std::vector<int8_t> a, a2;       // [kRows, depth] quantized rows, and the two-pass rows' residuals
  BlockSums sums, sums2;
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
  float amax = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    v[k] = inv_smooth ? x[k] * inv_smooth[k] : x[k];
    amax = std::max(amax, std::fabs(v[k]));
  }
  return amax;
#endif
}

// q = round_half_even(v * inv), clamped to [-127, 127].
void Round(const float* v, int64_t n, float inv, int8_t* q) {
#ifdef __AVX512F__
  const __m512 factor = _mm512_set1_ps(inv);
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
    // The default rounding mode (MXCSR): to nearest, ties to even.
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, v + k), factor));
    r = _mm512_min_epi32(_mm512_max_epi32(r, low), high);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, mask, r);
  }
#else
  for (int64_t k = 0; k < n; ++k) q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(v[k] * inv))));
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
    int8_t* q = s.a.data() + r * depth;
    Round(v, in, amax > 0.0f ? 127.0f / amax : 1.0f, q);
    if (r < two_pass) {
      const float scale = s.scale[r];
      float amax2 = 0.0f;
      for (int64_t k = 0; k < in; ++k) {
        v[k] -= static_cast<float>(q[k]) * scale;
        amax2 = std::max(amax2, std::fabs(v[k]));
      }
      s.scale2[r] = amax2 > 0.0f ? amax2 / 127.0f : 1.0f;
      Round(v, in, amax2 > 0.0f ? 127.0f / amax2 : 1.0f, s.a2.data() + r * depth);
    }
  }
}

// The sums of one row against both weight passes, for 16 outputs: acc[c] (Q) + acc[16 + c] / 254 (R).
inline float Combined(const int32_t* acc, int64_t c) {
  return static_cast<float>(acc[c]) + static_cast<float>(acc[kWidth + c]) * kResidualStep;
}

// y[r][c] = sums · (sx[r] · ws[c]) (+ the residual rows' sums · (sx2[r] · ws[c]) for r < two_pass) + b[c], for the
// block's rows [0, rows) and its outputs [c0, c0 + count) (ws, b and y start at output c0; y has row stride ld).
void DequantizeBlock(const BlockSums& sums, const BlockSums& sums2, int64_t rows, int64_t two_pass, const float* sx,
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

// One linear layer on a block of m <= kRows rows: quantize, then per block of 16 outputs and 32 rows: the int8
// products against both weight passes (and the two-pass rows' residuals), dequantized while the sums are in cache.
void Apply(const Linear& w, const float* x, int64_t ld_x, int64_t m, int64_t two_pass, int64_t col_begin,
           int64_t col_end, bool amx, Scratch& s, float* out, int64_t ld_out) {
  Quantize(x, ld_x, m, w.in, w.inv_smooth, w.depth, two_pass, s);
  for (int64_t j = col_begin / kWidth; j * kWidth < col_end; ++j) {
    const int64_t c0 = std::max(col_begin - j * kWidth, int64_t{0});
    const int64_t count = std::min(col_end - j * kWidth, kWidth) - c0;
    const int64_t o = j * kWidth + c0;  // the first output channel of this block
    for (int64_t r0 = 0; r0 < m; r0 += 32) {
      const int64_t rows = std::min<int64_t>(32, m - r0), rows2 = std::max<int64_t>(0, std::min(rows, two_pass - r0));
#ifdef SCE_JAX_AMX
      if (amx) {
        BlockAmx(s.a.data() + r0 * w.depth, w, j, s.sums);
        if (rows2 > 0) BlockAmx(s.a2.data() + r0 * w.depth, w, j, s.sums2);
      }
#endif
      if (!amx) {
        BlockPortable(s.a.data() + r0 * w.depth, w, j, rows, s.sums);
        if (rows2 > 0) BlockPortable(s.a2.data() + r0 * w.depth, w, j, rows2, s.sums2);
      }
      DequantizeBlock(s.sums, s.sums2, rows, rows2, s.scale + r0, s.scale2 + r0, c0, count, w.scale + o, w.bias + o,
                      out + r0 * ld_out + (o - col_begin), ld_out);
    }
  }
}

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

// Tile state is per thread: configured for each block of work and released after it.
template <typename Fn>
void WithTiles(bool amx, Fn&& fn) {
#ifdef SCE_JAX_AMX
  if (amx) ConfigureTiles();
#endif
  fn();
#ifdef SCE_JAX_AMX
  if (amx) _tile_release();
#endif
}

ffi::Error PackedLinear(ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        const float* inv_smooth, int64_t in, const char* name, Linear& out) {
  const auto pd = packed.dimensions();
  const int64_t o = scale.dimensions().size() == 1 ? scale.dimensions()[0] : -1;
  const int64_t depth = (in + kDepth - 1) / kDepth * kDepth;
  if (pd.size() != 3 || o <= 0 || pd[0] != 2 * ((o + kWidth - 1) / kWidth) || pd[1] != depth / kDepth || pd[2] != kTile ||
      bias.dimensions().size() != 1 || bias.dimensions()[0] != o)
    return ffi::Error::InvalidArgument(std::string("sce_jax int8: inconsistent shapes of ") + name);
  out = Linear{packed.typed_data(), scale.typed_data(), bias.typed_data(), inv_smooth, in, o, depth};
  return ffi::Error::Success();
}

bool UseAmx(int64_t portable) { return portable == 0 && AmxReady(); }

ffi::Error LinearRun(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> inv_smooth,
                     ffi::ResultBuffer<ffi::F32> y, int64_t float_rows, int64_t col_begin, int64_t col_end,
                     int64_t portable) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || inv_smooth.dimensions().size() != 1 || inv_smooth.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("sce_jax_int8_linear: wrong ranks or smoothing size");
  Linear w;
  if (auto e = PackedLinear(packed, scale, bias, inv_smooth.typed_data(), xd[1], "the linear", w); e.failure()) return e;
  const int64_t tokens = xd[0];
  if (col_begin < 0 || col_begin >= col_end || col_end > w.out || yd[0] != tokens || yd[1] != col_end - col_begin)
    return ffi::Error::InvalidArgument("sce_jax_int8_linear: output columns do not match");
  const bool amx = UseAmx(portable);
  const float* in = x.typed_data();
  float* out = y->typed_data();
  const int64_t width = col_end - col_begin;
  sce_jax::ParallelFor(pool, (tokens + kRows - 1) / kRows, [&](int64_t block) {
    thread_local Scratch s;
    const int64_t r0 = block * kRows, m = std::min(kRows, tokens - r0);
    const int64_t two_pass = std::max<int64_t>(0, std::min(m, float_rows - r0));
    WithTiles(amx, [&] { Apply(w, in + r0 * w.in, w.in, m, two_pass, col_begin, col_end, amx, s, out + r0 * width, width); });
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
                   ffi::ResultBuffer<ffi::F32> y, int64_t float_rows, float eps, int64_t activation,
                   int64_t portable) {
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
  const bool amx = UseAmx(portable);
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
    WithTiles(amx, [&] {
      Apply(lo, attended.typed_data() + r0 * hidden, hidden, m, two_pass, 0, hidden, amx, s, x1, hidden);
      for (int64_t r = 0; r < m; ++r) {
        float* row = x1 + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) row[i] += residual[r * hidden + i];
        LayerNorm(row, hidden, gamma1.typed_data(), beta1.typed_data(), eps);
      }
      Apply(l1, x1, hidden, m, two_pass, 0, inter, amx, s, h, inter);
      for (int64_t r = 0; r < m; ++r) Activate(h + r * inter, inter, activation);
      Apply(l2, h, inter, m, two_pass, 0, hidden, amx, s, out, hidden);
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

// 1 when the int8 products run on AMX tiles here (built with them, and Linux grants them), else 0.
extern "C" int SceJaxInt8Amx() { return AmxReady() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SceJaxInt8Linear, LinearRun,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, I]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // packed weights [2 O/16, I/64, 1024]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight scales [O]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [O]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // 1 / smoothing [I]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, col_end - col_begin]
                                  .Attr<int64_t>("float_rows")
                                  .Attr<int64_t>("col_begin")
                                  .Attr<int64_t>("col_end")
                                  .Attr<int64_t>("portable"));

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
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("portable"));
