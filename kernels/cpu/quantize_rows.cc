// onnxqf's CPU op library (libonnxqf_cpu.so): per-token uint8 quantization in one node for ONNX Runtime's CPU
// provider, domain "onnxqf.cpu". See kernels/README.md ("The CPU library").
//
// QuantizeRows: X float32 [..., K] -> Q uint8 [..., K], A float32 [..., 1], for every row (token) x:
//   A = max(max_k |x_k|, 1e-6)          (the float32 steps of Max(ReduceMax(Abs(x)), 1e-6))
//   s = A / 127                         (float32 division, as Div(amax, 127))
//   Q = saturate(round_half_even(x / s) + 128)   (as QuantizeLinear(x, s, 128) into uint8)
// which are the codes and the scale of onnxqf's uint8-token-ql lowering (onnxqf/lowering/w8a8.py), made in one
// pass over the row instead of six nodes. Rows are spread over ONNX Runtime's intra-op threads.
//
// With the attribute rotation_sizes (n_1 .. n_t, product K) each row is first rotated, x <- x @ kron(F_1, .., F_t),
// factor by factor along its axis of the row seen as an [n_1, .., n_t] tensor; rotation_kinds says what each F is:
// 0 the identity, 1 a dense matrix (the next n*n values of input R, F[i][j] row-major), 2 Sylvester's Hadamard
// matrix H_n / sqrt(n), 3 its negative (2 and 3: a fast Walsh-Hadamard transform, n a power of two). Float32 sums.
//
// With the attribute asymmetric = 1 the codes are asymmetric per row, the steps of onnxqf's uint8-token-asym lowering
// (onnxqf.lowering.w8a8.asymmetric_codes), and the op has a third output Z float32 [..., 1]:
//   hi = max(max_k x_k, 0), lo = min(min_k x_k, 0), A = max((hi - lo) / 255, 1e-6)  (the row's scale)
//   Z = round_half_even(-lo / A),   Q = clip(round_half_even(x / A) + Z, 0, 255)
//
// DequantizeRows: Y float32 [..., N], S and Z float32 [..., 1], C float32 [N] -> O = (Y - Z * C) * S per row: the
// epilogue of a GEMM of asymmetric codes (Y = the codes' product with the weights, C = the weights' column sums in
// Y's units), one pass over Y.
//
// W8A8Linear: X float32 [..., K], W int8 [N / 16, K / 4, 64] (the weights' codes Wq [K, N] in gemm_u8s8.h's VNNI
// order), S float32 [N] (the weights' scales), C float32 [N] (colsum(Wq) * S), optional R as QuantizeRows' ->
// Y float32 [..., N]: QuantizeRows' codes of each row (same attributes), then onnxqf's int8 GEMM (gemm_u8s8.cc) with
// the dequantization in its epilogue, Y = s * (S * (codes @ Wq) - z * C), s and z the row's scale and zero point
// (symmetric codes: A / 127 and 128). One node for QuantizeRows -> MatMulIntegerToFloat -> DequantizeRows.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "gemm_u8s8.h"

#define ONNXQF_CPU_VERSION "3"  // 2: QuantizeRows asymmetric=1, DequantizeRows; 3: W8A8Linear

namespace {

const OrtApi* g_api = nullptr;

OrtStatusPtr fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, msg.c_str()); }

constexpr float kFloor = 1e-6f;  // = the tiny of onnxqf.lowering.w8a8.token_amax for float32 graphs
constexpr float kQmax = 127.f;
constexpr float kRound = 12582912.f;  // 1.5 * 2^23

#if defined(__x86_64__)
#define ONNXQF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ONNXQF_CLONES
#endif

// The row's steps, from value k0 on: the max of |x|'s bit patterns without their sign bit (ordered as the values
// are, for every non-NaN float: an integer reduction, which vectorizes where a float max or fmax does not) ...
__attribute__((always_inline)) inline uint32_t abs_bits_max(const float* __restrict__ x, int64_t k0, int64_t K,
                                                            uint32_t mb) {
  for (int64_t k = k0; k < K; ++k) {
    uint32_t b;
    std::memcpy(&b, x + k, sizeof b);
    b &= 0x7fffffffu;
    mb = b > mb ? b : mb;
  }
  return mb;
}

// ... that max as the floored amax (a NaN in the row orders above every float here: the amax falls to the floor, the
// row's codes saturate and its NaN values get code 0) ...
inline float floored_amax(uint32_t mb) {
  float m;
  std::memcpy(&m, &mb, sizeof m);
  return m > kFloor ? m : kFloor;
}

// ... and the codes: comparisons, not fmax/fmin; round half to even without a library call: adding and taking away
// 1.5 * 2^23 leaves the nearest integer in the default rounding mode, exactly nearbyint's, for |v| < 2^22 (|v| <= 128
// here).
// (offset: 128 for the symmetric codes, the row's zero point for the asymmetric ones).
__attribute__((always_inline)) inline void row_codes(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t k0,
                                                     int64_t K, float step, float offset) {
  for (int64_t k = k0; k < K; ++k) {
    const float r = x[k] / step;
    float v = (r + kRound) - kRound + offset;
    v = v > 0.f ? v : 0.f;
    v = v < 255.f ? v : 255.f;
    q[k] = static_cast<uint8_t>(v);
  }
}

// One row: its amax (floored) and its codes, as the compiler vectorizes them (for CPUs without the paths below).
ONNXQF_CLONES float quantize_row(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t K) {
  const float amax = floored_amax(abs_bits_max(x, 0, K, 0));
  row_codes(x, q, 0, K, amax / kQmax, 128.f);
  return amax;
}

// The asymmetric row's range: hi and lo over values k0.. (started at 0, which also makes them max(.., 0) and
// min(.., 0); a NaN value is passed over, as MAXPS / MINPS do) ...
__attribute__((always_inline)) inline void row_range(const float* __restrict__ x, int64_t k0, int64_t K, float& hi,
                                                     float& lo) {
  for (int64_t k = k0; k < K; ++k) {
    hi = x[k] > hi ? x[k] : hi;
    lo = x[k] < lo ? x[k] : lo;
  }
}

// ... and its scale (returned) and zero point (in zp), the float32 steps of asymmetric_codes.
inline float affine_step(float hi, float lo, float& zp) {
  const float step = (hi - lo) / 255.f;
  const float scale = step > kFloor ? step : kFloor;
  zp = std::nearbyint(-lo / scale);
  return scale;
}

// The scale and zero point from a vector loop's lanes of hi and lo, then values k.. of the row.
inline float lanes_affine_step(const float* his, const float* los, int lanes, const float* x, int64_t k, int64_t K,
                               float* zp) {
  float hi = 0.f, lo = 0.f;
  for (int i = 0; i < lanes; ++i) {
    hi = his[i] > hi ? his[i] : hi;
    lo = los[i] < lo ? los[i] : lo;
  }
  row_range(x, k, K, hi, lo);
  return affine_step(hi, lo, *zp);
}

// One asymmetric row, as the compiler vectorizes it.
ONNXQF_CLONES float quantize_row_asym(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t K, float* zp) {
  float hi = 0.f, lo = 0.f;
  row_range(x, 0, K, hi, lo);
  const float scale = affine_step(hi, lo, *zp);
  row_codes(x, q, 0, K, scale, *zp);
  return scale;
}

// DequantizeRows' row: o = (y - z * c) * s, as the compiler vectorizes it.
ONNXQF_CLONES void dequantize_row(const float* __restrict__ y, const float* __restrict__ c, float* __restrict__ o,
                                  int64_t N, float s, float z) {
  for (int64_t n = 0; n < N; ++n) o[n] = (y[n] - z * c[n]) * s;
}

#if defined(__x86_64__)
// The instruction sets the library's loops may use, read once when it loads: what the CPU has, capped by
// ONNXQF_CPU_ISA=avx2|base (tests run each path on one machine; unset or anything else: the best the CPU has; base:
// the AVX-512 and AVX2 paths off, the compiler-vectorized loops).
struct Isa {
  bool avx512, avx2, avx2_fma;
};
Isa detect_isa() {
  __builtin_cpu_init();
  const char* cap = std::getenv("ONNXQF_CPU_ISA");
  const std::string c = cap != nullptr ? cap : "";
  const bool avx2 = c != "base" && __builtin_cpu_supports("avx2");
  return {c != "base" && c != "avx2" && __builtin_cpu_supports("avx512f"), avx2,
          avx2 && __builtin_cpu_supports("fma")};
}
const Isa isa = detect_isa();

// Eight codes as int32 under AVX2: row_codes' steps, one vector at a time. MAXPS(v, 0) returns v > 0 ? v : 0 (the
// second operand for NaN and for zeros) and MINPS(v, 255) v < 255 ? v : 255: row_codes' comparisons exactly, so the
// codes are the same to the bit.
__attribute__((target("avx2"), always_inline)) inline __m256i codes_avx2(const float* p, __m256 step, __m256 offset) {
  const __m256 round = _mm256_set1_ps(kRound);
  const __m256 r = _mm256_div_ps(_mm256_loadu_ps(p), step);
  __m256 v = _mm256_add_ps(_mm256_sub_ps(_mm256_add_ps(r, round), round), offset);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(255.f));
  return _mm256_cvttps_epi32(v);
}

// A row's codes under AVX2 with intrinsics: GCC compiles row_codes' clamp to compares and masks (with a register
// spill) and its narrowing to uint8 to several packs; here MAXPS/MINPS and two packs per 32 codes.
__attribute__((target("avx2"))) void row_codes_avx2(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t K,
                                                    float step, float offset) {
  const __m256 vstep = _mm256_set1_ps(step), voff = _mm256_set1_ps(offset);
  // packus works within 128-bit halves: this puts the four vectors' dwords of codes back in order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i w01 = _mm256_packus_epi32(codes_avx2(x + k, vstep, voff), codes_avx2(x + k + 8, vstep, voff));
    const __m256i w23 = _mm256_packus_epi32(codes_avx2(x + k + 16, vstep, voff), codes_avx2(x + k + 24, vstep, voff));
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w01, w23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), b);
  }
  row_codes(x, q, k, K, step, offset);
}

// The symmetric row under AVX2: the amax as an integer max of the bit patterns, then the codes.
__attribute__((target("avx2"))) float quantize_row_avx2(const float* __restrict__ x, uint8_t* __restrict__ q,
                                                        int64_t K) {
  const __m256i abs_bits = _mm256_set1_epi32(0x7fffffff);
  __m256i mv = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    mv = _mm256_max_epu32(mv, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)), abs_bits));
  uint32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), mv);
  uint32_t mb = 0;
  for (uint32_t b : lanes) mb = b > mb ? b : mb;
  const float amax = floored_amax(abs_bits_max(x, k, K, mb));
  row_codes_avx2(x, q, K, amax / kQmax, 128.f);
  return amax;
}

// The asymmetric row under AVX2: MAXPS(x, hi) / MINPS(x, lo) keep row_range's order of operands.
__attribute__((target("avx2"))) float quantize_row_asym_avx2(const float* __restrict__ x, uint8_t* __restrict__ q,
                                                             int64_t K, float* zp) {
  __m256 vhi = _mm256_setzero_ps(), vlo = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vhi = _mm256_max_ps(v, vhi);
    vlo = _mm256_min_ps(v, vlo);
  }
  float his[8], los[8];
  _mm256_storeu_ps(his, vhi);
  _mm256_storeu_ps(los, vlo);
  const float scale = lanes_affine_step(his, los, 8, x, k, K, zp);
  row_codes_avx2(x, q, K, scale, *zp);
  return scale;
}

// (GCC 12's AVX-512 headers trip its -Wmaybe-uninitialized on their placeholder vectors, a false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// A row's codes under AVX-512: sixteen values a vector, each vector's codes narrowed to bytes in one instruction
// (VPMOVUSDB); MAXPS/MINPS as above.
__attribute__((target("avx512f"))) void row_codes_avx512(const float* __restrict__ x, uint8_t* __restrict__ q,
                                                         int64_t K, float step, float offset) {
  const __m512 vstep = _mm512_set1_ps(step), round = _mm512_set1_ps(kRound), voff = _mm512_set1_ps(offset),
               v0 = _mm512_setzero_ps(), v255 = _mm512_set1_ps(255.f);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 r = _mm512_div_ps(_mm512_loadu_ps(x + k), vstep);
    __m512 v = _mm512_add_ps(_mm512_sub_ps(_mm512_add_ps(r, round), round), voff);
    v = _mm512_min_ps(_mm512_max_ps(v, v0), v255);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(v)));
  }
  row_codes(x, q, k, K, step, offset);
}

__attribute__((target("avx512f"))) float quantize_row_avx512(const float* __restrict__ x, uint8_t* __restrict__ q,
                                                             int64_t K) {
  const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
  __m512i mv = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) mv = _mm512_max_epu32(mv, _mm512_and_si512(_mm512_loadu_si512(x + k), abs_bits));
  uint32_t lanes[16];
  _mm512_storeu_si512(lanes, mv);
  uint32_t mb = 0;
  for (uint32_t b : lanes) mb = b > mb ? b : mb;
  const float amax = floored_amax(abs_bits_max(x, k, K, mb));
  row_codes_avx512(x, q, K, amax / kQmax, 128.f);
  return amax;
}

__attribute__((target("avx512f"))) float quantize_row_asym_avx512(const float* __restrict__ x, uint8_t* __restrict__ q,
                                                                  int64_t K, float* zp) {
  __m512 vhi = _mm512_setzero_ps(), vlo = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    vhi = _mm512_max_ps(v, vhi);
    vlo = _mm512_min_ps(v, vlo);
  }
  float his[16], los[16];
  _mm512_storeu_ps(his, vhi);
  _mm512_storeu_ps(los, vlo);
  const float scale = lanes_affine_step(his, los, 16, x, k, K, zp);
  row_codes_avx512(x, q, K, scale, *zp);
  return scale;
}
#pragma GCC diagnostic pop
#endif

using QuantizeRow = float (*)(const float*, uint8_t*, int64_t);
using QuantizeRowAsym = float (*)(const float*, uint8_t*, int64_t, float*);
#if defined(__x86_64__)
const QuantizeRow quantize_row_fn = isa.avx512 ? quantize_row_avx512 : isa.avx2 ? quantize_row_avx2 : quantize_row;
const QuantizeRowAsym quantize_row_asym_fn = isa.avx512 ? quantize_row_asym_avx512
                                           : isa.avx2   ? quantize_row_asym_avx2
                                                        : quantize_row_asym;
#else
const QuantizeRow quantize_row_fn = quantize_row;
const QuantizeRowAsym quantize_row_asym_fn = quantize_row_asym;
#endif

enum Kind : int64_t { kIdentity = 0, kDense = 1, kWalsh = 2, kWalshNeg = 3 };

// A Walsh factor over fewer contiguous values than this runs as a product with its +-1 matrix (vectorized over the
// factor's outputs) instead of butterflies, which would work on one float at a time there.
constexpr int64_t kButterflyInner = 8;

struct Rotation {
  std::vector<int64_t> sizes, kinds, offsets;  // per factor; offsets: where a dense factor starts in R
  std::vector<int64_t> walsh_offsets;          // per factor: where its unnormalised +-1 matrix starts in walsh, or -1
  std::vector<float> walsh;
  float scale = 1.f;                            // the Walsh factors' normalisations and signs
  bool empty() const { return sizes.empty(); }
};

// y[o, j, in] = sum_i x[o, i, in] * f[i, j] over the factor's axis (n wide, inner values after it), for vectors
// of VW floats. Every sum runs over i in order from 0, whichever loop computes it. Where inner > 1 the products
// run in register tiles (dense_tile) wherever whole tiles fit, the rest in dense_rest.

// Outputs j0 .. j0+J-1 at inner values k0 .. k0+V*VW-1: J*V vector accumulators held in registers while the sum
// runs over i (per i: V loads of x and J broadcasts of f for J*V vector FMAs).
template <int VW, int J, int V>
__attribute__((always_inline)) inline void dense_tile(const float* __restrict__ xo, float* __restrict__ yo,
                                                      const float* __restrict__ f, int64_t n, int64_t inner,
                                                      int64_t j0, int64_t k0) {
  typedef float Vec __attribute__((vector_size(VW * sizeof(float))));
  Vec acc[J * V];  // (one-dimensional, each vector loaded and stored on its own: kept in registers)
#pragma GCC unroll 16
  for (int t = 0; t < J * V; ++t) acc[t] = Vec{};
  for (int64_t i = 0; i < n; ++i) {
    Vec xv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) std::memcpy(&xv[v], xo + i * inner + k0 + v * VW, sizeof(Vec));
    const float* fi = f + i * n + j0;
#pragma GCC unroll 8
    for (int jj = 0; jj < J; ++jj)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[jj * V + v] += fi[jj] * xv[v];
  }
#pragma GCC unroll 8
  for (int jj = 0; jj < J; ++jj)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) std::memcpy(yo + (j0 + jj) * inner + k0 + v * VW, &acc[jj * V + v], sizeof(Vec));
}

// Outputs j0 .. n-1 at inner values k0 .. k1-1, one output at a time.
__attribute__((always_inline)) inline void dense_rest(const float* __restrict__ xo, float* __restrict__ yo,
                                                      const float* __restrict__ f, int64_t n, int64_t inner,
                                                      int64_t j0, int64_t k0, int64_t k1) {
  for (int64_t j = j0; j < n; ++j) {
    float* yj = yo + j * inner;
    for (int64_t l = k0; l < k1; ++l) yj[l] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float c = f[i * n + j];
      const float* xi = xo + i * inner;
      for (int64_t l = k0; l < k1; ++l) yj[l] += c * xi[l];
    }
  }
}

// inner == 1: Y[o, j] = sum_i X[o, i] F[i, j] for rows o .. o + R - 1 and outputs j0 .. j0 + V*VW - 1, R*V vector
// accumulators in registers (per i: V loads of F's row and R broadcasts of x).
template <int VW, int R, int V>
__attribute__((always_inline)) inline void dense_rows_tile(const float* __restrict__ x, float* __restrict__ y,
                                                           const float* __restrict__ f, int64_t n, int64_t o,
                                                           int64_t j0) {
  typedef float Vec __attribute__((vector_size(VW * sizeof(float))));
  Vec acc[R * V];
#pragma GCC unroll 16
  for (int t = 0; t < R * V; ++t) acc[t] = Vec{};
  for (int64_t i = 0; i < n; ++i) {
    Vec fv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) std::memcpy(&fv[v], f + i * n + j0 + v * VW, sizeof(Vec));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float xr = x[(o + r) * n + i];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r * V + v] += xr * fv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) std::memcpy(y + (o + r) * n + j0 + v * VW, &acc[r * V + v], sizeof(Vec));
}

// inner == 1 over all rows: register tiles of 4 rows by one vector of outputs where they fit, the rest one row at
// a time (vectorized over j).
template <int VW>
__attribute__((always_inline)) inline void dense_rows(const float* __restrict__ x, float* __restrict__ y,
                                                      const float* __restrict__ f, int64_t outer, int64_t n) {
  constexpr int R = 4;
  const int64_t jt = n - n % VW;  // outputs the tiles cover
  int64_t o = 0;
  if (jt > 0)
    for (; o + R <= outer; o += R) {
      for (int64_t j0 = 0; j0 < jt; j0 += VW) dense_rows_tile<VW, R, 1>(x, y, f, n, o, j0);
      for (int64_t r = o; r < o + R; ++r)
        for (int64_t j = jt; j < n; ++j) {
          float acc = 0.f;
          for (int64_t i = 0; i < n; ++i) acc += x[r * n + i] * f[i * n + j];
          y[r * n + j] = acc;
        }
    }
  for (; o < outer; ++o) {
    const float* xo = x + o * n;
    float* yo = y + o * n;
    for (int64_t j = 0; j < n; ++j) yo[j] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float xi = xo[i];
      const float* fi = f + i * n;
      for (int64_t j = 0; j < n; ++j) yo[j] += xi * fi[j];
    }
  }
}

template <int VW>
__attribute__((always_inline)) inline void dense_axis_t(const float* __restrict__ x, float* __restrict__ y,
                                                        const float* __restrict__ f, int64_t outer, int64_t n,
                                                        int64_t inner) {
  constexpr int J = 4;
  if (inner == 1) {  // the vectors across the outputs j: as wide as n allows
    if (VW >= 16 && n >= 16)
      dense_rows<(VW >= 16 ? 16 : 4)>(x, y, f, outer, n);
    else if (VW >= 8 && n >= 8)
      dense_rows<(VW >= 8 ? 8 : 4)>(x, y, f, outer, n);
    else
      dense_rows<4>(x, y, f, outer, n);
    return;
  }
  for (int64_t o = 0; o < outer; ++o) {
    const float* xo = x + o * n * inner;
    float* yo = y + o * n * inner;
    const int64_t jt = n - n % J;  // outputs the tiles cover
    int64_t k0 = 0;
    for (; k0 + 2 * VW <= inner; k0 += 2 * VW) {  // tiles two vectors wide, then one
      for (int64_t j0 = 0; j0 < jt; j0 += J) dense_tile<VW, J, 2>(xo, yo, f, n, inner, j0, k0);
      dense_rest(xo, yo, f, n, inner, jt, k0, k0 + 2 * VW);
    }
    for (; k0 + VW <= inner; k0 += VW) {
      for (int64_t j0 = 0; j0 < jt; j0 += J) dense_tile<VW, J, 1>(xo, yo, f, n, inner, j0, k0);
      dense_rest(xo, yo, f, n, inner, jt, k0, k0 + VW);
    }
    if (k0 < inner) dense_rest(xo, yo, f, n, inner, 0, k0, inner);
  }
}

// dense_axis_t for the widest vectors the CPU has (picked once; a vector type wider than the target's registers
// would be lowered through memory, so each width is its own function)
#if defined(__x86_64__)
__attribute__((target("avx512f"))) void dense_axis_avx512(const float* x, float* y, const float* f, int64_t outer,
                                                          int64_t n, int64_t inner) {
  dense_axis_t<16>(x, y, f, outer, n, inner);
}
__attribute__((target("avx2,fma"))) void dense_axis_avx2(const float* x, float* y, const float* f, int64_t outer,
                                                         int64_t n, int64_t inner) {
  dense_axis_t<8>(x, y, f, outer, n, inner);
}
#endif
void dense_axis_base(const float* x, float* y, const float* f, int64_t outer, int64_t n, int64_t inner) {
  dense_axis_t<4>(x, y, f, outer, n, inner);
}

using DenseAxis = void (*)(const float*, float*, const float*, int64_t, int64_t, int64_t);
#if defined(__x86_64__)
const DenseAxis dense_axis = isa.avx512 ? dense_axis_avx512 : isa.avx2_fma ? dense_axis_avx2 : dense_axis_base;
#else
const DenseAxis dense_axis = dense_axis_base;
#endif

// One butterfly pass over `inner` contiguous values, W floats a vector (inner a multiple of W): p <- p + q, q <- p - q.
template <int W>
__attribute__((always_inline)) inline void butterfly(float* __restrict__ p, float* __restrict__ q, int64_t inner) {
  typedef float Vec __attribute__((vector_size(W * sizeof(float))));
  for (int64_t m = 0; m < inner; m += W) {
    Vec u, v;
    std::memcpy(&u, p + m, sizeof(Vec));
    std::memcpy(&v, q + m, sizeof(Vec));
    const Vec s = u + v, d = u - v;
    std::memcpy(p + m, &s, sizeof(Vec));
    std::memcpy(q + m, &d, sizeof(Vec));
  }
}

// The unnormalised Walsh-Hadamard transform along the factor's axis, in place (n a power of two), each butterfly in
// vectors of VW floats where inner allows (else 8 or 4, else one at a time: the compiler's loop over a short runtime inner
// fell to scalar code under AVX-512). The same sums as one float at a time.
template <int VW>
__attribute__((always_inline)) inline void walsh_axis_t(float* __restrict__ x, int64_t outer, int64_t n,
                                                        int64_t inner) {
  for (int64_t o = 0; o < outer; ++o) {
    float* xo = x + o * n * inner;
    for (int64_t h = 1; h < n; h *= 2)
      for (int64_t i = 0; i < n; i += 2 * h)
        for (int64_t k = i; k < i + h; ++k) {
          float* p = xo + k * inner;
          float* q = p + h * inner;
          if (inner % VW == 0) {
            butterfly<VW>(p, q, inner);
          } else if (VW > 8 && inner % 8 == 0) {
            butterfly<(VW > 8 ? 8 : 4)>(p, q, inner);
          } else if (inner % 4 == 0) {
            butterfly<4>(p, q, inner);
          } else {
            for (int64_t m = 0; m < inner; ++m) {
              const float u = p[m], v = q[m];
              p[m] = u + v;
              q[m] = u - v;
            }
          }
        }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void walsh_axis_avx512(float* x, int64_t outer, int64_t n, int64_t inner) {
  walsh_axis_t<16>(x, outer, n, inner);
}
__attribute__((target("avx2"))) void walsh_axis_avx2(float* x, int64_t outer, int64_t n, int64_t inner) {
  walsh_axis_t<8>(x, outer, n, inner);
}
#endif
void walsh_axis_base(float* x, int64_t outer, int64_t n, int64_t inner) { walsh_axis_t<4>(x, outer, n, inner); }

using WalshAxis = void (*)(float*, int64_t, int64_t, int64_t);
#if defined(__x86_64__)
const WalshAxis walsh_axis = isa.avx512 ? walsh_axis_avx512 : isa.avx2 ? walsh_axis_avx2 : walsh_axis_base;
#else
const WalshAxis walsh_axis = walsh_axis_base;
#endif

// Rotates row x (K values) into buf (2 K floats of scratch); returns the rotated row (in buf).
const float* rotate_row(const float* x, const Rotation& rot, const float* R, int64_t K, float* buf) {
  float* cur = buf;
  float* other = buf + K;
  std::memcpy(cur, x, sizeof(float) * static_cast<size_t>(K));
  int64_t before = 1;
  for (size_t t = 0; t < rot.sizes.size(); ++t) {
    const int64_t n = rot.sizes[t];
    const int64_t inner = K / (before * n);
    if (rot.kinds[t] == kDense) {
      dense_axis(cur, other, R + rot.offsets[t], before, n, inner);
      std::swap(cur, other);
    } else if (rot.kinds[t] != kIdentity && rot.walsh_offsets[t] >= 0) {
      dense_axis(cur, other, rot.walsh.data() + rot.walsh_offsets[t], before, n, inner);
      std::swap(cur, other);
    } else if (rot.kinds[t] != kIdentity) {
      walsh_axis(cur, before, n, inner);
    }
    before *= n;
  }
  if (rot.scale != 1.f)
    for (int64_t k = 0; k < K; ++k) cur[k] *= rot.scale;
  return cur;
}

struct Rows {
  const float* x;
  uint8_t* q;
  float* a;
  float* z;  // the asymmetric rows' zero points (nullptr: symmetric codes)
  int64_t K;
  int64_t rows;
  int64_t per_task;
  const Rotation* rot;
  const float* R;
};

void run_task(void* data, size_t task) {
  const Rows& r = *static_cast<const Rows*>(data);
  const int64_t first = static_cast<int64_t>(task) * r.per_task;
  const int64_t last = std::min(r.rows, first + r.per_task);
  std::vector<float> buf(r.rot->empty() ? 0 : 2 * static_cast<size_t>(r.K));
  for (int64_t i = first; i < last; ++i) {
    const float* row = r.x + i * r.K;
    if (!r.rot->empty()) row = rotate_row(row, *r.rot, r.R, r.K, buf.data());
    if (r.z != nullptr)
      r.a[i] = quantize_row_asym_fn(row, r.q + i * r.K, r.K, r.z + i);
    else
      r.a[i] = quantize_row_fn(row, r.q + i * r.K, r.K);
  }
}

// Rows spread over ONNX Runtime's intra-op threads in tasks of at least ~32k values (small rows, decode, stay on
// one thread).
void for_rows(Ort::KernelContext& ctx, void (*task)(void*, size_t), void* data, int64_t rows, int64_t width,
              int64_t& per_task) {
  per_task = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(width, 1));
  const int64_t tasks = (rows + per_task - 1) / per_task;
  if (tasks == 1)
    task(data, 0);
  else
    ctx.ParallelFor(task, static_cast<size_t>(tasks), 0, data);
}

// What QuantizeRows and W8A8Linear read from their attributes: the rotation and the kind of codes.
struct Quantization {
  Rotation rot;
  int64_t dense_values = 0;  // what R must hold
  bool asymmetric = false;

  // The attributes rotation_sizes, rotation_kinds and asymmetric (op: the op's name in messages).
  OrtStatusPtr read(const OrtKernelInfo* info, const std::string& op) {
    std::vector<int64_t> sizes, kinds;
    try {
      sizes = Ort::ConstKernelInfo(info).GetAttributes<int64_t>("rotation_sizes");
    } catch (const Ort::Exception&) {
      sizes.clear();  // no such attribute: no rotation
    }
    try {
      kinds = Ort::ConstKernelInfo(info).GetAttributes<int64_t>("rotation_kinds");
    } catch (const Ort::Exception&) {
      kinds.clear();
    }
    if (kinds.size() != sizes.size()) return fail(op + ": rotation_kinds must give one kind per rotation_sizes entry");
    int64_t asym = 0;
    try {
      asym = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("asymmetric");
    } catch (const Ort::Exception&) {
      asym = 0;
    }
    if (asym != 0 && asym != 1) return fail(op + ": asymmetric must be 0 or 1");
    asymmetric = asym == 1;
    for (size_t t = 0; t < sizes.size(); ++t) {
      const int64_t n = sizes[t], kind = kinds[t];
      if (n < 1 || kind < kIdentity || kind > kWalshNeg) return fail(op + ": rotation sizes must be >= 1 and kinds 0..3");
      if ((kind == kWalsh || kind == kWalshNeg) && (n & (n - 1)))
        return fail(op + ": a Walsh-Hadamard factor needs a power-of-two size, not " + std::to_string(n));
      rot.sizes.push_back(n);
      rot.kinds.push_back(kind);
      rot.offsets.push_back(dense_values);
      int64_t inner = 1;
      for (size_t u = t + 1; u < sizes.size(); ++u) inner *= sizes[u];
      const bool as_matrix = (kind == kWalsh || kind == kWalshNeg) && inner < kButterflyInner && n <= 64;
      rot.walsh_offsets.push_back(as_matrix ? static_cast<int64_t>(rot.walsh.size()) : -1);
      if (as_matrix)  // Sylvester's H_n: (-1)^popcount(i & j)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) rot.walsh.push_back(__builtin_popcountll(i & j) & 1 ? -1.f : 1.f);
      if (kind == kDense) dense_values += n * n;
      if (kind == kWalsh || kind == kWalshNeg)
        rot.scale *= (kind == kWalshNeg ? -1.f : 1.f) / std::sqrt(static_cast<float>(n));
    }
    return nullptr;
  }

  // The dense factors' values (input `index`, checked against K), or nullptr where none are needed.
  OrtStatusPtr rotation_input(Ort::KernelContext& ctx, size_t index, int64_t K, const std::string& op,
                              const float*& R) const {
    R = nullptr;
    if (rot.empty()) return nullptr;
    int64_t prod = 1;
    for (int64_t n : rot.sizes) prod *= n;
    if (prod != K)
      return fail(op + ": rotation_sizes multiply to " + std::to_string(prod) + ", X has K = " + std::to_string(K));
    if (dense_values == 0) return nullptr;
    if (ctx.GetInputCount() <= index) return fail(op + ": a dense factor needs input R");
    auto Rv = ctx.GetInput(index);
    if (!Rv || static_cast<int64_t>(Rv.GetTensorTypeAndShapeInfo().GetElementCount()) != dense_values)
      return fail(op + ": R must hold " + std::to_string(dense_values) + " values (the dense factors, n*n each)");
    R = Rv.GetTensorData<float>();
    return nullptr;
  }
};

struct QuantizeRowsKernel {
  Quantization quant;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      auto X = ctx.GetInput(0);
      const std::vector<int64_t> shape = X.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty()) return fail("onnxqf.cpu.QuantizeRows: X must have rank >= 1");
      const int64_t K = shape.back();
      const float* R = nullptr;
      if (OrtStatusPtr st = quant.rotation_input(ctx, 1, K, "onnxqf.cpu.QuantizeRows", R)) return st;
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
      std::vector<int64_t> ashape = shape;
      ashape.back() = 1;
      if (quant.asymmetric && ctx.GetOutputCount() < 3)
        return fail("onnxqf.cpu.QuantizeRows: asymmetric = 1 needs the third output (Z, the zero points)");
      auto Q = ctx.GetOutput(0, shape);
      auto A = ctx.GetOutput(1, ashape);
      float* z = quant.asymmetric ? ctx.GetOutput(2, ashape).GetTensorMutableData<float>() : nullptr;
      if (rows == 0 || K == 0) {
        if (K == 0 && rows > 0) std::fill_n(A.GetTensorMutableData<float>(), rows, kFloor);
        if (K == 0 && rows > 0 && z != nullptr) std::fill_n(z, rows, 0.f);
        return nullptr;
      }
      Rows r{X.GetTensorData<float>(), Q.GetTensorMutableData<uint8_t>(), A.GetTensorMutableData<float>(), z, K,
             rows, 0, &quant.rot, R};
      for_rows(ctx, run_task, &r, rows, K, r.per_task);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return fail(std::string("onnxqf.cpu.QuantizeRows: ") + e.what());
    } catch (const std::exception& e) {
      return fail(std::string("onnxqf.cpu.QuantizeRows: ") + e.what());
    }
  }
};

struct QuantizeRowsOp : Ort::CustomOpBase<QuantizeRowsOp, QuantizeRowsKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    auto k = std::make_unique<QuantizeRowsKernel>();
    if (OrtStatusPtr st = k->quant.read(info, "onnxqf.cpu.QuantizeRows")) return st;
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return "QuantizeRows"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i < 2 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
                 : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL;
  }
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape s = ctx.GetInputShape(0);
    if (s.empty()) return nullptr;
    if (OrtStatusPtr st = ctx.SetOutputShape(0, s, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8).release()) return st;
    s.back() = Ort::ShapeInferContext::SymbolicInteger(int64_t{1});
    if (OrtStatusPtr st = ctx.SetOutputShape(1, s, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT).release()) return st;
    int64_t asymmetric = 0;
    try {
      asymmetric = ctx.GetAttrInt("asymmetric");
    } catch (const Ort::Exception&) {
      asymmetric = 0;  // no such attribute: two outputs
    }
    if (asymmetric != 1) return nullptr;
    return ctx.SetOutputShape(2, s, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT).release();
  }
};

struct Dequant {
  const float* y;
  const float* s;
  const float* z;
  const float* c;
  float* o;
  int64_t N;
  int64_t rows;
  int64_t per_task;
};

void dequantize_task(void* data, size_t task) {
  const Dequant& d = *static_cast<const Dequant*>(data);
  const int64_t first = static_cast<int64_t>(task) * d.per_task;
  const int64_t last = std::min(d.rows, first + d.per_task);
  for (int64_t i = first; i < last; ++i) dequantize_row(d.y + i * d.N, d.c, d.o + i * d.N, d.N, d.s[i], d.z[i]);
}

struct DequantizeRowsKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      auto Y = ctx.GetInput(0), S = ctx.GetInput(1), Z = ctx.GetInput(2), C = ctx.GetInput(3);
      const std::vector<int64_t> shape = Y.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty()) return fail("onnxqf.cpu.DequantizeRows: Y must have rank >= 1");
      const int64_t N = shape.back();
      const int64_t rows = N > 0 ? static_cast<int64_t>(Y.GetTensorTypeAndShapeInfo().GetElementCount()) / N : 0;
      if (static_cast<int64_t>(S.GetTensorTypeAndShapeInfo().GetElementCount()) != rows ||
          static_cast<int64_t>(Z.GetTensorTypeAndShapeInfo().GetElementCount()) != rows)
        return fail("onnxqf.cpu.DequantizeRows: S and Z need one value per row of Y (" + std::to_string(rows) + ")");
      if (static_cast<int64_t>(C.GetTensorTypeAndShapeInfo().GetElementCount()) != N)
        return fail("onnxqf.cpu.DequantizeRows: C needs one value per column of Y (" + std::to_string(N) + ")");
      auto O = ctx.GetOutput(0, shape);
      if (rows == 0 || N == 0) return nullptr;
      Dequant d{Y.GetTensorData<float>(), S.GetTensorData<float>(), Z.GetTensorData<float>(), C.GetTensorData<float>(),
                O.GetTensorMutableData<float>(), N, rows, 0};
      for_rows(ctx, dequantize_task, &d, rows, N, d.per_task);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return fail(std::string("onnxqf.cpu.DequantizeRows: ") + e.what());
    } catch (const std::exception& e) {
      return fail(std::string("onnxqf.cpu.DequantizeRows: ") + e.what());
    }
  }
};

struct DequantizeRowsOp : Ort::CustomOpBase<DequantizeRowsOp, DequantizeRowsKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* /*info*/, void** kernel) const {
    *kernel = new DequantizeRowsKernel();
    return nullptr;
  }
  const char* GetName() const { return "DequantizeRows"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape s = ctx.GetInputShape(0);
    if (s.empty()) return nullptr;
    return ctx.SetOutputShape(0, s, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT).release();
  }
};

void gemm_run(void* data, size_t task) {
  const auto& g = *static_cast<const onnxqf_cpu::Gemm*>(data);
  onnxqf_cpu::gemm_task(g, static_cast<int64_t>(task));
}

struct W8A8LinearKernel {
  Quantization quant;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    static const std::string op = "onnxqf.cpu.W8A8Linear";
    try {
      Ort::KernelContext ctx(context);
      auto X = ctx.GetInput(0), W = ctx.GetInput(1), S = ctx.GetInput(2), C = ctx.GetInput(3);
      const std::vector<int64_t> shape = X.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> wshape = W.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty()) return fail(op + ": X must have rank >= 1");
      const int64_t K = shape.back();
      if (wshape.size() != 3 || wshape[2] != 64 || wshape[1] * 4 != K)
        return fail(op + ": W must be int8 [N / 16, K / 4, 64] with K = " + std::to_string(K) +
                    " (the weights in VNNI order: kernels/README.md)");
      const int64_t N = wshape[0] * 16;
      if (static_cast<int64_t>(S.GetTensorTypeAndShapeInfo().GetElementCount()) != N ||
          static_cast<int64_t>(C.GetTensorTypeAndShapeInfo().GetElementCount()) != N)
        return fail(op + ": S and C need one value per column (" + std::to_string(N) + ")");
      const float* R = nullptr;
      if (OrtStatusPtr st = quant.rotation_input(ctx, 4, K, op, R)) return st;
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
      std::vector<int64_t> yshape = shape;
      yshape.back() = N;
      auto Y = ctx.GetOutput(0, yshape);
      if (rows == 0 || N == 0) return nullptr;
      float* y = Y.GetTensorMutableData<float>();
      if (K == 0) {
        std::fill_n(y, rows * N, 0.f);
        return nullptr;
      }
      const int64_t padded = (rows + onnxqf_cpu::kRowPad - 1) / onnxqf_cpu::kRowPad * onnxqf_cpu::kRowPad;
      std::vector<uint8_t> codes(static_cast<size_t>(padded * K));  // zero past the rows (gemm_u8s8.h)
      std::vector<float> scale(rows), zero(rows, 128.f);
      Rows r{X.GetTensorData<float>(), codes.data(), scale.data(), quant.asymmetric ? zero.data() : nullptr, K,
             rows, 0, &quant.rot, R};
      for_rows(ctx, run_task, &r, rows, K, r.per_task);
      if (!quant.asymmetric)
        for (float& a : scale) a = a / kQmax;  // the symmetric codes' step, as QuantizeRows' row made them
      onnxqf_cpu::Gemm g{codes.data(), W.GetTensorData<int8_t>(), scale.data(), zero.data(),
                         S.GetTensorData<float>(), C.GetTensorData<float>(), y, rows, K, N, 0};
      const int64_t tasks = onnxqf_cpu::gemm_tasks(g);
      if (tasks == 1)
        onnxqf_cpu::gemm_task(g, 0);
      else
        ctx.ParallelFor(gemm_run, static_cast<size_t>(tasks), 0, &g);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return fail(op + ": " + e.what());
    } catch (const std::exception& e) {
      return fail(op + ": " + e.what());
    }
  }
};

struct W8A8LinearOp : Ort::CustomOpBase<W8A8LinearOp, W8A8LinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    auto k = std::make_unique<W8A8LinearKernel>();
    if (OrtStatusPtr st = k->quant.read(info, "onnxqf.cpu.W8A8Linear")) return st;
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return "W8A8Linear"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 4 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
                 : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape s = ctx.GetInputShape(0);
    Ort::ShapeInferContext::Shape w = ctx.GetInputShape(1);
    if (s.empty() || w.size() != 3 || !w[0].IsInt()) return nullptr;
    s.back() = Ort::ShapeInferContext::SymbolicInteger(w[0].AsInt() * 16);
    return ctx.SetOutputShape(0, s, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT).release();
  }
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char* onnxqf_cpu_version() { return ONNXQF_CPU_VERSION; }

// The best GEMM path W8A8Linear takes on this CPU ("amx", "vnni", "avx2" or "base"; ONNXQF_CPU_ISA caps it:
// kernels/README.md).
__attribute__((visibility("default"))) const char* onnxqf_cpu_gemm_isa() { return onnxqf_cpu::gemm_isa(); }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (!g_api) return nullptr;  // cannot even report: an ONNX Runtime older than the headers
  Ort::InitApi(g_api);
  static QuantizeRowsOp quantize_rows;
  static DequantizeRowsOp dequantize_rows;
  static W8A8LinearOp w8a8_linear;
  static Ort::CustomOpDomain* domain = nullptr;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  try {
    if (!domain) {
      domain = new Ort::CustomOpDomain("onnxqf.cpu");
      domain->Add(&quantize_rows);
      domain->Add(&dequantize_rows);
      domain->Add(&w8a8_linear);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
