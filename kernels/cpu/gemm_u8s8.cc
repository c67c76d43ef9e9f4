// onnxqf's CPU int8 GEMM: see gemm_u8s8.h. Four paths, picked when the library loads:
//   amx   Intel AMX (Sapphire Rapids and later): 16 x 64-byte tiles, 32 rows x 32 columns of int32 sums per step,
//         for products of more than kAmxMinRows rows;
//   vnni  AVX-512 VNNI: VPDPBUSD on the packed lines, 4 rows x 64 columns of sums in registers (every M on CPUs
//         without AMX; small M, decode, on those with it: one weight line a VPDPBUSD per row);
//   avx2  AVX2 without VNNI: each line widened to int16 and multiplied pairwise into int32 (VPMADDWD; exact, as
//         VPMADDUBSW's int16 sums would not be), 2 rows x 16 columns a step;
//   base  the compiler's loop (any CPU).
// Each task is a range of columns for a range of rows, so a task streams its own part of the weights once (decode) or
// keeps it in its core's cache while its rows go by (prefill).
#include "gemm_u8s8.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace onnxqf_cpu {
namespace {

constexpr int64_t kAmxMinRows = 8;  // fewer rows: the VNNI path (an AMX step costs as much for 1 row as for 16)
// Tasks of 64 columns (decode: many tasks, each streaming its part of the weights once) by 64 rows (a multiple of the
// AMX step's 32 and the VNNI step's 4: prefill keeps a task's weights in its core's cache for its rows, and has row
// chunks x column chunks of tasks for the threads where N alone gives few).
constexpr int64_t kTaskCols = 64, kTaskRows = 64;

inline void epilogue(const Gemm& g, int64_t m, int64_t n, const int32_t* acc, int64_t count) {
  float* y = g.Y + m * g.N + n;
  const float s = g.s[m], z = g.z[m];
  for (int64_t i = 0; i < count; ++i) y[i] = s * (g.w[n + i] * static_cast<float>(acc[i]) - z * g.c[n + i]);
}

// base: one 16-column block of one row at a time.
void tile_base(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t KQ = g.K / 4;
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* a = g.A + m * g.K;
    for (int64_t j = n0 / 16; j < n1 / 16; ++j) {
      int32_t acc[16] = {0};
      const int8_t* b = g.B + j * KQ * 64;
      for (int64_t q = 0; q < KQ; ++q, b += 64)
        for (int i = 0; i < 16; ++i)
          for (int t = 0; t < 4; ++t) acc[i] += static_cast<int32_t>(a[4 * q + t]) * static_cast<int32_t>(b[4 * i + t]);
      epilogue(g, m, 16 * j, acc, 16);
    }
  }
}

#if defined(__x86_64__)
struct Cpu {
  bool avx2, vnni, amx;
};

bool amx_permitted() {
  // Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
}

Cpu detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return {false, false, false};
  // (the compiler's checks for AVX2 and AVX-512 also ask whether the OS saves their registers)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2"), avx512 = __builtin_cpu_supports("avx512f"),
             avx512bw = __builtin_cpu_supports("avx512bw"), vnni = (c >> 11) & 1u;
  const bool amx = ((d >> 24) & 1u) && ((d >> 25) & 1u);  // AMX-TILE, AMX-INT8
  const char* cap = std::getenv("ONNXQF_CPU_ISA");
  const std::string capped = cap != nullptr ? cap : "";
  const bool use_vnni = avx512 && avx512bw && vnni && capped != "base" && capped != "avx2" && capped != "avx512";
  const bool use_amx = use_vnni && amx && capped != "vnni" && amx_permitted();
  return {avx2 && capped != "base", use_vnni, use_amx};
}
const Cpu cpu = detect();

// (GCC 12's AVX-512 headers trip its -Wmaybe-uninitialized on their placeholder vectors, a false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define ONNXQF_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

ONNXQF_VNNI inline void epilogue16(const Gemm& g, int64_t m, int64_t n, __m512i acc) {
  const __m512 s = _mm512_set1_ps(g.s[m]), z = _mm512_set1_ps(g.z[m]);
  const __m512 v = _mm512_fmsub_ps(_mm512_loadu_ps(g.w + n), _mm512_cvtepi32_ps(acc),
                                   _mm512_mul_ps(z, _mm512_loadu_ps(g.c + n)));
  _mm512_storeu_ps(g.Y + m * g.N + n, _mm512_mul_ps(s, v));
}

// R rows x J 16-column blocks of sums in registers, over all of K: R * J VPDPBUSD per k-quad, J weight lines read.
template <int R, int J>
ONNXQF_VNNI void block_vnni(const Gemm& g, int64_t m, int64_t j0) {
  const int64_t KQ = g.K / 4;
  __m512i acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_si512();
  const int8_t* b[J];
  for (int j = 0; j < J; ++j) b[j] = g.B + (j0 + j) * KQ * 64;
  const uint8_t* a = g.A + m * g.K;
  for (int64_t q = 0; q < KQ; ++q) {
    __m512i av[R];
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * g.K + 4 * q, 4);
      av[r] = _mm512_set1_epi32(four);
    }
    for (int j = 0; j < J; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(b[j] + 64 * q + 1024), _MM_HINT_T0);
      const __m512i bv = _mm512_loadu_si512(b[j] + 64 * q);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av[r], bv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) epilogue16(g, m + r, 16 * (j0 + j), acc[r][j]);
}

using BlockFn = void (*)(const Gemm&, int64_t, int64_t);
#define ONNXQF_ROW(R) {block_vnni<R, 1>, block_vnni<R, 2>, block_vnni<R, 3>, block_vnni<R, 4>}
const BlockFn kBlocks[4][4] = {ONNXQF_ROW(1), ONNXQF_ROW(2), ONNXQF_ROW(3), ONNXQF_ROW(4)};
#undef ONNXQF_ROW

void tile_vnni(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t j = n0 / 16; j < n1 / 16; j += 4) {
    const int64_t J = std::min<int64_t>(4, n1 / 16 - j);
    for (int64_t m = m0; m < m1; m += 4) kBlocks[std::min<int64_t>(4, m1 - m) - 1][J - 1](g, m, j);
  }
}

// AVX2: R rows x one 16-column block, over all of K. Per line, four 16-byte quarters (4 columns x 4 k each) widened
// to int16; the row's 4 codes as int16 repeated; VPMADDWD leaves each column's two pair sums side by side.
template <int R>
__attribute__((target("avx2"))) void block_avx2(const Gemm& g, int64_t m, int64_t j) {
  const int64_t KQ = g.K / 4;
  __m256i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_si256();
  const int8_t* b = g.B + j * KQ * 64;
  const uint8_t* a = g.A + m * g.K;
  for (int64_t q = 0; q < KQ; ++q, b += 64) {
    __m256i ap[R];
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * g.K + 4 * q, 4);
      ap[r] = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(four)));
    }
    for (int c = 0; c < 4; ++c) {
      const __m256i bw = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * c)));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(bw, ap[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) int32_t pairs[4][8];
    int32_t sums[16];
    for (int c = 0; c < 4; ++c) _mm256_store_si256(reinterpret_cast<__m256i*>(pairs[c]), acc[r][c]);
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 4; ++i) sums[4 * c + i] = pairs[c][2 * i] + pairs[c][2 * i + 1];
    epilogue(g, m + r, 16 * j, sums, 16);
  }
}

void tile_avx2(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t j = n0 / 16; j < n1 / 16; ++j)
    for (int64_t m = m0; m < m1; m += 2) {
      if (m + 1 < m1)
        block_avx2<2>(g, m, j);
      else
        block_avx2<1>(g, m, j);
    }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// AMX: tiles 0-3 the sums of 32 rows x 32 columns (two row tiles x two column blocks), 4-5 the rows' codes (16 rows
// x 64 k), 6-7 the weights (16 k-quads x 16 columns x 4): four TDPBUSD per 64 k. Rows past M read the zero padding
// (A holds a multiple of 16 rows) and are not written.
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vnni"))) void tile_amx(const Gemm& g, int64_t m_first,
                                                                                       int64_t m_last, int64_t n0,
                                                                                       int64_t n1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const int64_t KQ = g.K / 4, KC = g.K / 64, J1 = n1 / 16;
  alignas(64) int32_t sums[4][16 * 16];
  for (int64_t m0 = m_first; m0 < m_last; m0 += 32) {
    const bool two_rows = m0 + 16 < m_last;
    for (int64_t j = n0 / 16; j < J1; j += 2) {
      const bool two_cols = j + 1 < J1;
      const int8_t* b0 = g.B + j * KQ * 64;
      const int8_t* b1 = b0 + KQ * 64;
      const uint8_t* a0 = g.A + m0 * g.K;
      const uint8_t* a1 = a0 + 16 * g.K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kc = 0; kc < KC; ++kc) {
        _tile_loadd(4, a0 + 64 * kc, g.K);
        _tile_loadd(6, b0 + 1024 * kc, 64);
        _tile_dpbusd(0, 4, 6);
        if (two_cols) {
          _tile_loadd(7, b1 + 1024 * kc, 64);
          _tile_dpbusd(1, 4, 7);
        }
        if (two_rows) {
          _tile_loadd(5, a1 + 64 * kc, g.K);
          _tile_dpbusd(2, 5, 6);
          if (two_cols) _tile_dpbusd(3, 5, 7);
        }
      }
      _tile_stored(0, sums[0], 64);
      _tile_stored(1, sums[1], 64);
      _tile_stored(2, sums[2], 64);
      _tile_stored(3, sums[3], 64);
      const int64_t rows = std::min<int64_t>(32, m_last - m0);
      for (int64_t r = 0; r < rows; ++r) {
        const int half = r < 16 ? 0 : 2;
        const int64_t rr = r % 16;
        epilogue16(g, m0 + r, 16 * j, _mm512_load_si512(sums[half] + 16 * rr));
        if (two_cols) epilogue16(g, m0 + r, 16 * (j + 1), _mm512_load_si512(sums[half + 1] + 16 * rr));
      }
    }
  }
  _tile_release();
}
#pragma GCC diagnostic pop
#endif

int64_t row_chunks(const Gemm& g) { return (g.M + kTaskRows - 1) / kTaskRows; }

}  // namespace

int64_t gemm_tasks(Gemm& g) {
#if defined(__x86_64__)
  g.path = cpu.amx && g.M >= kAmxMinRows && g.K % 64 == 0 ? kGemmAmx
           : cpu.vnni                                       ? kGemmVnni
           : cpu.avx2                                       ? kGemmAvx2
                                                            : kGemmBase;
#else
  g.path = kGemmBase;
#endif
  return row_chunks(g) * ((g.N + kTaskCols - 1) / kTaskCols);
}

void gemm_task(const Gemm& g, int64_t task) {
  const int64_t rows = row_chunks(g), col = task / rows, row = task % rows;
  const int64_t n0 = col * kTaskCols, n1 = std::min(g.N, n0 + kTaskCols);
  const int64_t m0 = row * kTaskRows, m1 = std::min(g.M, m0 + kTaskRows);
#if defined(__x86_64__)
  if (g.path == kGemmAmx) return tile_amx(g, m0, m1, n0, n1);
  if (g.path == kGemmVnni) return tile_vnni(g, m0, m1, n0, n1);
  if (g.path == kGemmAvx2) return tile_avx2(g, m0, m1, n0, n1);
#endif
  tile_base(g, m0, m1, n0, n1);
}

const char* gemm_isa() {
#if defined(__x86_64__)
  return cpu.amx ? "amx" : cpu.vnni ? "vnni" : cpu.avx2 ? "avx2" : "base";
#else
  return "base";
#endif
}

}  // namespace onnxqf_cpu
