// Per-token int8 quantization, the small-M (decode) W8A8 GEMV and a slow any-shape fallback.
// Conventions: kernels.h.
#include "kernels.h"
#include "quant_row.cuh"
#include "walsh_row.cuh"

#include <algorithm>
#include <map>
#include <mutex>

namespace onnxqf {
namespace {

// Programmatic dependent launch (sm_90): a kernel launched with the attribute may start while the kernel before
// it in the stream finishes; it reads nothing that kernel writes before pdl_wait(). Both are no-ops otherwise.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }

constexpr int kQuantThreads = 256;
constexpr int kQuantCached = 8;  // 16-byte chunks of x per thread held in registers (K <= 16384 read once)

// Quantizes one row with the whole block (kQuantThreads threads): codes to qr (global or shared memory), the
// floored amax to *amax_dst (thread 0). ur: null, or the row of u when the row is SwiGLU's silu(xr) * ur (glu_one).
// vec: the rows start 16-byte aligned and K % 8 == 0. red ([2 * kQuantThreads / 32]) / scale_s: shared. ASYM: the
// asymmetric codes (quant_row.cuh: AsymScale), the row's s to *amax_dst and z to *zero_dst.
template <int CACHED = kQuantCached, bool ASYM = false>
__device__ __forceinline__ void quantize_row_block(const __half* __restrict__ xr, const __half* __restrict__ ur,
                                                   int8_t* qr, float* amax_dst, int64_t K, bool vec, float* red,
                                                   RowScale<ASYM>* scale_s, float* zero_dst = nullptr) {
  const int tid = threadIdx.x;
  float m = 0.f, nlo = 0.f;
  uint4 cache[CACHED];
  const int64_t nvec = vec ? K / 8 : 0;
  const uint4* xv = reinterpret_cast<const uint4*>(xr);
  const uint4* uv = reinterpret_cast<const uint4*>(ur);
  if (vec) {
#pragma unroll
    for (int i = 0; i < CACHED; ++i) {
      const int64_t c = tid + static_cast<int64_t>(i) * kQuantThreads;
      if (c < nvec) {
        cache[i] = load_chunk(xv, uv, c);
        see_chunk<ASYM>(cache[i], m, nlo);
      }
    }
    for (int64_t c = tid + static_cast<int64_t>(CACHED) * kQuantThreads; c < nvec; c += kQuantThreads)
      see_chunk<ASYM>(load_chunk(xv, uv, c), m, nlo);
  } else {
    for (int64_t k = tid; k < K; k += kQuantThreads)
      see_value<ASYM>(__half2float(ur ? glu_one(xr[k], ur[k]) : xr[k]), m, nlo);
  }
  block_scale<ASYM, kQuantThreads / 32>(m, nlo, red, scale_s, amax_dst, zero_dst);
  const RowScale<ASYM> inv = *scale_s;
  if (vec) {
    uint2* qv = reinterpret_cast<uint2*>(qr);
#pragma unroll
    for (int i = 0; i < CACHED; ++i) {
      const int64_t c = tid + static_cast<int64_t>(i) * kQuantThreads;
      if (c < nvec) qv[c] = chunk_codes(cache[i], inv);
    }
    for (int64_t c = tid + static_cast<int64_t>(CACHED) * kQuantThreads; c < nvec; c += kQuantThreads)
      qv[c] = chunk_codes(load_chunk(xv, uv, c), inv);
  } else {
    for (int64_t k = tid; k < K; k += kQuantThreads) qr[k] = code_of(ur ? glu_one(xr[k], ur[k]) : xr[k], inv);
  }
}

// Row `row` of x through the op's skip_norm (kernels.h: NormSpec; its sum row written when write_sum), normalized
// into ys (shared memory, K halves), then quantized as quantize_row_block does. Whole block; K % 8 == 0, aligned.
template <bool ASYM = false>
__device__ __forceinline__ void norm_quantize_row_block(const __half* __restrict__ x, const NormSpec& norm,
                                                        int64_t row, bool write_sum, __half* ys, int8_t* qr,
                                                        float* amax_dst, int64_t K, float* red,
                                                        RowScale<ASYM>* scale_s, float* zero_dst = nullptr) {
  float nlo = 0.f;
  const float m = skip_norm_row<kQuantThreads, ASYM>(x + row * K, norm.skip + row * K, norm.gamma, norm.eps,
                                                     write_sum && norm.sum ? norm.sum + row * K : nullptr, ys, K, red,
                                                     &nlo);
  const uint4* yv = reinterpret_cast<const uint4*>(ys);
  block_scale<ASYM, kQuantThreads / 32>(m, nlo, red, scale_s, amax_dst, zero_dst);
  const RowScale<ASYM> inv = *scale_s;
  uint2* qv = reinterpret_cast<uint2*>(qr);
  for (int64_t c = threadIdx.x; c < K / 8; c += kQuantThreads) qv[c] = chunk_codes(yv[c], inv);
}

// One block per row (norm: dynamic shared memory of K halves for the normalized row). zero_out: ASYM's z per row.
template <bool ASYM>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(const __half* __restrict__ x,
                                                                      const __half* __restrict__ u,
                                                                      int8_t* __restrict__ q,
                                                                      float* __restrict__ amax_out,
                                                                      float* __restrict__ zero_out, int64_t K,
                                                                      bool vec, NormSpec norm) {
  extern __shared__ __align__(16) unsigned char rows_smem[];
  __shared__ float red[2 * kQuantThreads / 32];
  __shared__ RowScale<ASYM> scale_s;
  const int64_t row = blockIdx.x;
  float* zd = ASYM ? zero_out + row : nullptr;
  if (norm.skip) {
    norm_quantize_row_block<ASYM>(x, norm, row, true, reinterpret_cast<__half*>(rows_smem), q + row * K,
                                  amax_out + row, K, red, &scale_s, zd);
    return;
  }
  quantize_row_block<kQuantCached, ASYM>(x + row * K, u ? u + row * K : nullptr, q + row * K, amax_out + row, K, vec,
                                         red, &scale_s, zd);
}

constexpr int kRegsChunks = 8;        // 16-byte chunks of a row per thread in quantize_rows_regs_kernel
constexpr int kRegsMaxThreads = 512;  // its largest block: rows of K <= 8 * 8 * 512 = 32768

// One row in registers: thread t holds the chunks t + i * blockDim.x (i < kRegsChunks), the block as many warps as the
// row needs. MODE 0: the row is x; 1: silu(x) * u (glu_one); 2: the op's skip_norm (NormSpec, as skip_norm_row
// computes it: the fp16 sum, an fp32 sum of squares, fp16(gamma * fp16(s * r))). The codes and amax are
// quantize_row_block's (ASYM: the asymmetric codes, z to zero_out). Rows 16-byte aligned, K % 8 == 0.
constexpr int kRegsRed = 2 * kRegsMaxThreads / 32;  // shared floats of one reduction buffer (two per warp: ASYM's)
template <int MODE, bool ASYM = false>
struct RegsRow {
  static constexpr int C = kRegsChunks;
  uint4 c[C], b[MODE ? C : 1];

  // Issues every load of row `row` (no arithmetic).
  __device__ __forceinline__ void load(const __half* __restrict__ x, const __half* __restrict__ u, int64_t row,
                                       int64_t K, const NormSpec& norm) {
    const int tid = threadIdx.x, T = blockDim.x;
    const int64_t nvec = K / 8;
    const uint4* xv = reinterpret_cast<const uint4*>(x + row * K);
    const uint4* bv = MODE == 1 ? reinterpret_cast<const uint4*>(u + row * K)
                                : MODE == 2 ? reinterpret_cast<const uint4*>(norm.skip + row * K) : nullptr;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int64_t k = tid + static_cast<int64_t>(i) * T;
      if (k < nvec) {
        c[i] = __ldg(xv + k);
        if (MODE) b[i] = __ldg(bv + k);
      }
    }
  }

  // The loaded row's codes and amax (ASYM: s and z), written; red: shared, two buffers (two reductions, one barrier
  // each).
  __device__ __forceinline__ void finish(int8_t* __restrict__ q, float* __restrict__ amax_out,
                                         float* __restrict__ zero_out, int64_t row, int64_t K, const NormSpec& norm,
                                         float (*red)[kRegsRed]) {
    const int tid = threadIdx.x, T = blockDim.x;
    const int64_t nvec = K / 8;
    float m = 0.f, nlo = 0.f;
    if (MODE == 2) {
      uint4* sv = norm.sum ? reinterpret_cast<uint4*>(norm.sum + row * K) : nullptr;
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const int64_t k = tid + static_cast<int64_t>(i) * T;
        if (k < nvec) {
          ss = add_square_chunk(c[i], b[i], ss);
          if (sv) sv[k] = c[i];
        }
      }
      const float total = block_all<true>(ss, red[0]);
      const __half2 r = __float2half2_rn(rsqrtf(total / static_cast<float>(K) + norm.eps));
      const uint4* gv = reinterpret_cast<const uint4*>(norm.gamma);
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const int64_t k = tid + static_cast<int64_t>(i) * T;
        if (k < nvec) {
          norm_chunk(c[i], __ldg(gv + k), r);
          see_chunk<ASYM>(c[i], m, nlo);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const int64_t k = tid + static_cast<int64_t>(i) * T;
        if (k < nvec) {
          if (MODE == 1) c[i] = glu_chunk(c[i], b[i]);
          see_chunk<ASYM>(c[i], m, nlo);
        }
      }
    }
    RowScale<ASYM> inv;
    if constexpr (ASYM) {
      const float2 r = block_max2(m, nlo, red[1]);
      float sv, zv;
      inv = asym_row_scale(r.x, r.y, &sv, &zv);
      if (tid == 0) {
        amax_out[row] = sv;
        zero_out[row] = zv;
      }
    } else {
      float a;
      row_scale(block_all<false>(m, red[1]), &inv, &a);
      if (tid == 0) amax_out[row] = a;
    }
    uint2* qv = reinterpret_cast<uint2*>(q + row * K);
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int64_t k = tid + static_cast<int64_t>(i) * T;
      if (k < nvec) qv[k] = chunk_codes(c[i], inv);
    }
  }
};

// One block per row (RegsRow): every load issued before any arithmetic; one barrier per reduction (two with the norm).
template <int MODE, bool ASYM>
__global__ void __launch_bounds__(kRegsMaxThreads) quantize_rows_regs_kernel(const __half* __restrict__ x,
                                                                            const __half* __restrict__ u,
                                                                            int8_t* __restrict__ q,
                                                                            float* __restrict__ amax_out,
                                                                            float* __restrict__ zero_out, int64_t K,
                                                                            NormSpec norm) {
  __shared__ float red[2][kRegsRed];
  RegsRow<MODE, ASYM> r;
  r.load(x, u, blockIdx.x, K, norm);
  pdl_launch_dependents();  // the GEMM after it (launched as a dependent: ONNXQF_GEMM_PDL) may start its prologue
  r.finish(q, amax_out, zero_out, blockIdx.x, K, norm, red);
}

// The same rows, a grid smaller than M striding over them (ONNXQF_QUANT_PIPE): each block issues the loads of its next
// row before the reductions and stores of the current one, so that the reads of some rows overlap the writes of
// others (one block per row runs as a single wave at 2048 rows: every read, then every write; docs/benchmarks.md
// g16). The shared reductions alternate between two buffers: a row's writes to one cannot overtake the previous
// row's reads of it (a barrier of the row between lies between them).
constexpr int kPipeMaxThreads = 256;  // two rows in registers: rows of K <= 8 * 8 * 256 = 16384 (up to 255 registers)
template <int MODE, bool ASYM>
__global__ void __launch_bounds__(kPipeMaxThreads) quantize_rows_pipe_kernel(const __half* __restrict__ x,
                                                                            const __half* __restrict__ u,
                                                                            int8_t* __restrict__ q,
                                                                            float* __restrict__ amax_out,
                                                                            float* __restrict__ zero_out, int64_t M,
                                                                            int64_t K, NormSpec norm) {
  __shared__ float red[2][2][kRegsRed];
  RegsRow<MODE, ASYM> cur, next;
  int64_t row = blockIdx.x;
  cur.load(x, u, row, K, norm);
  pdl_launch_dependents();
  for (int parity = 0; row < M; row += gridDim.x, parity ^= 1) {
    const int64_t after = row + gridDim.x;
    if (after < M) next.load(x, u, after, K, norm);
    cur.finish(q, amax_out, zero_out, row, K, norm, red[parity]);
    cur = next;
  }
}

// y = silu(g) * u elementwise (glu_one), 8 values per thread where all three are 16-byte aligned and n % 8 == 0.
__global__ void glu_kernel(const __half* __restrict__ g, const __half* __restrict__ u, __half* __restrict__ y,
                           int64_t n, bool vec) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec) {
    if (i < n / 8)
      reinterpret_cast<uint4*>(y)[i] =
          load_chunk(reinterpret_cast<const uint4*>(g), reinterpret_cast<const uint4*>(u), i);
  } else if (i < n) {
    y[i] = glu_one(g[i], u[i]);
  }
}

__device__ __forceinline__ int4 load_stream(const int4* p) {
  int4 v;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ int dot16(const int4& a, const int4& b, int acc) {
  acc = __dp4a(a.x, b.x, acc);
  acc = __dp4a(a.y, b.y, acc);
  acc = __dp4a(a.z, b.z, acc);
  acc = __dp4a(a.w, b.w, acc);
  return acc;
}

__device__ __forceinline__ __half dequant(int acc, float amax, float wscale, const __half* bias, int64_t n) {
  const float t = static_cast<float>(acc) * amax;
  const float b = bias ? __half2float(bias[n]) : 0.f;
  return __float2half_rn(fmaf(t, wscale, b));
}

// The asymmetric codes' dequantization (zero: the tokens' z, colsum: the weights' per-channel sums; kernels.h):
// fp16(fma((acc - z * colsum) * s, wscale, bias)), each fp32 step rounded on its own as int8-token-asym's nodes take
// them (no step contracted into an fma but the bias's).
__device__ __forceinline__ __half dequant_asym(int acc, float s, float z, float colsum, float wscale,
                                               const __half* bias, int64_t n) {
  const float t = __fmul_rn(__fsub_rn(static_cast<float>(acc), __fmul_rn(z, colsum)), s);
  const float b = bias ? __half2float(bias[n]) : 0.f;
  return __float2half_rn(fmaf(t, wscale, b));
}

// Token m's output n: dequant, or dequant_asym where zero (the tokens' z) is given.
__device__ __forceinline__ __half dequant_at(int acc, const float* amax, const float* zero, const float* colsum,
                                             const float* wscale, const __half* bias, int64_t m, int64_t n) {
  return zero ? dequant_asym(acc, amax[m], zero[m], colsum[n], wscale[n], bias, n)
              : dequant(acc, amax[m], wscale[n], bias, n);
}

constexpr int kGemvWarps = 4;
constexpr int kFusedMaxSmem = 96 * 1024;  // codes of x in shared memory: MT * K bytes at most

// Each warp computes R consecutive outputs n for MT rows of M (blockIdx.y picks the MT rows); the lanes stride
// over K in 16-byte chunks, U chunks per row in flight. Weights are streamed past L1 (read once); the codes of
// x are small and read through L1.
// zero / colsum: null, or the asymmetric codes' (dequant_at).
template <int MT, int R, int U>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const int8_t* __restrict__ q,
                                                              const float* __restrict__ amax,
                                                              const int8_t* __restrict__ w,
                                                              const float* __restrict__ wscale,
                                                              const __half* __restrict__ bias, __half* __restrict__ y,
                                                              int64_t M, int64_t N, int64_t K,
                                                              const float* __restrict__ zero,
                                                              const float* __restrict__ colsum) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  const int64_t n0 = warp * R;
  if (n0 >= N) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int64_t nch = K >> 4;
  const int4* wrow[R];
  const int4* xrow[MT];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = reinterpret_cast<const int4*>(w + min(n0 + r, N - 1) * K);
#pragma unroll
  for (int m = 0; m < MT; ++m) xrow[m] = reinterpret_cast<const int4*>(q + min(m0 + m, M - 1) * K);
  int acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0;

  int64_t c = lane;
  for (; c + 32 * (U - 1) < nch; c += 32 * U) {
    int4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) wv[u][r] = load_stream(wrow[r] + c + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int4 xv = __ldg(xrow[m] + c + 32 * u);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = dot16(xv, wv[u][r], acc[m][r]);
      }
  }
  for (; c < nch; c += 32) {
    int4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = load_stream(wrow[r] + c);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int4 xv = __ldg(xrow[m] + c);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = dot16(xv, wv[r], acc[m][r]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int v = warp_sum(acc[m][r]);
      const int64_t mm = m0 + m, nn = n0 + r;
      if (lane == ((m * R + r) & 31) && mm < M && nn < N)
        y[mm * N + nn] = dequant_at(v, amax, zero, colsum, wscale, bias, mm, nn);
    }
}

// Small M, one launch: each block first quantizes the MT rows of x into shared memory (every block redoes this
// small, L2-resident work; its first weight loads are already in flight meanwhile), rotating each row first when
// rot.n > 0 (walsh_row.cuh: fp32 buffers of 2 K after the codes). Then each of its 8 warps computes R consecutive
// outputs at a time, its lanes striding over K in steps of U 16-byte chunks per row, the next step's chunks loaded
// while the current ones are used; a warp strides over the output groups (R outputs) by the grid's warp count,
// the loads running on from one group into the next (the grid may be smaller than one warp per group: the
// launch sizes it to the blocks the GPU holds at once, so that each block's quantization is paid once).
// Needs K % 16 == 0, x 16-byte aligned; shared memory MT * K bytes (+ 8 K).
constexpr int kFusedWarps = kQuantThreads / 32;

// zero_s / colsum: null, or the asymmetric codes' (dequant_at).
template <int MT, int R>
__device__ __forceinline__ void write_group(int (&acc)[MT][R], int lane, int64_t n0, int mcount, int64_t N,
                                            const float* amax_s, const float* zero_s, const float* __restrict__ colsum,
                                            const float* __restrict__ wscale, const __half* __restrict__ bias,
                                            const OutSplit& out) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int v = warp_sum(acc[m][r]);
      acc[m][r] = 0;
      const int64_t nn = n0 + r;
      if (lane == ((m * R + r) & 31) && m < mcount && nn < N) {
        __half* yp = out.y[0];  // the output holding column nn (static indices: out stays in parameter space)
        int64_t start = 0, end = out.end[0];
#pragma unroll
        for (int i = 1; i < kMaxOutputs; ++i)
          if (i < out.count && nn >= out.end[i - 1]) {
            yp = out.y[i];
            start = out.end[i - 1];
            end = out.end[i];
          }
        yp[m * (end - start) + (nn - start)] = dequant_at(v, amax_s, zero_s, colsum, wscale, bias, m, nn);
      }
    }
}

// ASYM: the asymmetric codes, colsum the weights' per-channel sums.
template <int MT, int R, int U, int MINB = 3, bool ASYM = false>
__global__ void __launch_bounds__(kQuantThreads, MINB) fused_gemv_kernel(const __half* __restrict__ x,
                                                                  const __half* __restrict__ u,
                                                                  const int8_t* __restrict__ w,
                                                                  const float* __restrict__ wscale,
                                                                  const __half* __restrict__ bias, OutSplit out,
                                                                  int64_t M, int64_t N, int64_t K, WalshSpec rot,
                                                                  NormSpec norm, const float* __restrict__ colsum) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  int8_t* qs = reinterpret_cast<int8_t*>(fused_smem);  // [MT][K]
  __shared__ float amax_s[MT];
  __shared__ float zero_s[ASYM ? MT : 1];
  __shared__ float red[2 * kQuantThreads / 32];
  __shared__ RowScale<ASYM> scale_s;
  const int lane = threadIdx.x & 31;
  const int64_t groups = (N + R - 1) / R;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kFusedWarps;
  int64_t g = static_cast<int64_t>(blockIdx.x) * kFusedWarps + (threadIdx.x >> 5);
  const int64_t nch = K >> 4;
  const int steps = static_cast<int>((nch + 32 * U - 1) / (32 * U));  // per group

  int4 wv[U][R];
  auto load_step = [&](int64_t gg, int j) {
    const int64_t base = static_cast<int64_t>(j) * 32 * U + lane;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int4* row = reinterpret_cast<const int4*>(w + min(gg * R + r, N - 1) * K);
#pragma unroll
      for (int v = 0; v < U; ++v) {
        const int64_t c = base + 32 * v;
        wv[v][r] = c < nch ? load_stream(row + c) : make_int4(0, 0, 0, 0);
      }
    }
  };
  if (g < groups) load_step(g, 0);  // the weights: written by no kernel, read before the wait
  pdl_wait();
  const int mcount = M < MT ? static_cast<int>(M) : MT;
  if (rot.n) {
    float* fs = reinterpret_cast<float*>(fused_smem + MT * K);  // MT * K is a multiple of 16
    for (int m = 0; m < mcount; ++m)
      walsh_quantize_row<kFusedWarps, ASYM>(x + m * K, rot, fs, qs + m * K, &amax_s[m], red, &scale_s,
                                            ASYM ? &zero_s[m] : nullptr);
  } else if (norm.skip) {  // the normalized row in shared memory after the codes; block 0 writes the sums
    __half* ys = reinterpret_cast<__half*>(fused_smem + MT * K);
    for (int m = 0; m < mcount; ++m)
      norm_quantize_row_block<ASYM>(x, norm, m, blockIdx.x == 0, ys, qs + m * K, &amax_s[m], K, red, &scale_s,
                                    ASYM ? &zero_s[m] : nullptr);
  } else {
    for (int m = 0; m < mcount; ++m)
      quantize_row_block<2, ASYM>(x + m * K, u ? u + m * K : nullptr, qs + m * K, &amax_s[m], K, true, red,
                                  &scale_s, ASYM ? &zero_s[m] : nullptr);
  }
  __syncthreads();
  pdl_launch_dependents();
  if (g >= groups) return;

  const int4* xs[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) xs[m] = reinterpret_cast<const int4*>(qs + min(m, mcount - 1) * K);
  int acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0;

  for (int j = 0;;) {
    int4 cur[U][R];
#pragma unroll
    for (int v = 0; v < U; ++v)
#pragma unroll
      for (int r = 0; r < R; ++r) cur[v][r] = wv[v][r];
    int64_t g2 = g;
    int j2 = j + 1;
    if (j2 == steps) {
      j2 = 0;
      g2 += stride;
    }
    if (g2 < groups) load_step(g2, j2);
    const int64_t base = static_cast<int64_t>(j) * 32 * U + lane;
#pragma unroll
    for (int v = 0; v < U; ++v) {
      const int64_t c = base + 32 * v;
      if (c < nch) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const int4 xv = xs[m][c];
#pragma unroll
          for (int r = 0; r < R; ++r) acc[m][r] = dot16(xv, cur[v][r], acc[m][r]);
        }
      }
    }
    if (j == steps - 1)
      write_group<MT, R>(acc, lane, g * R, mcount, N, amax_s, ASYM ? zero_s : nullptr, colsum, wscale, bias, out);
    if (g2 >= groups) break;
    g = g2;
    j = j2;
  }
}

// MINB: blocks per multiprocessor the registers must allow (the weight registers grow with R * U)
template <int MT, int R, int U, int MINB = 3, bool ASYM = false>
cudaError_t launch_fused_t(const __half* x, const __half* u, const int8_t* w, const float* wscale,
                           const __half* bias, const OutSplit& out, int64_t M, int64_t K, const WalshSpec& rot,
                           const GemvOptions& opt, cudaStream_t stream, const NormSpec& norm, const float* colsum) {
  auto kernel = fused_gemv_kernel<MT, R, U, MINB, ASYM>;
  const int64_t N = out.end[out.count - 1];
  const size_t smem = static_cast<size_t>(MT) * static_cast<size_t>(K) + (rot.n ? 8 * static_cast<size_t>(K) : 0) +
                      (norm.skip ? 2 * static_cast<size_t>(K) : 0);
  if (const cudaError_t e = opt_in_smem<fused_gemv_kernel<MT, R, U, MINB, ASYM>>(kFusedMaxSmem); e != cudaSuccess)
    return e;
  const int64_t warps = (N + R - 1) / R;
  int64_t blocks = (warps + kFusedWarps - 1) / kFusedWarps;
  if (opt.sm_count > 0 && blocks > static_cast<int64_t>(opt.sm_count) * MINB) {
    static std::mutex mu;  // the blocks one multiprocessor holds at once, by shared memory size (at least MINB)
    static std::map<size_t, int> per_sm_of;
    int per_sm = MINB;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = per_sm_of.find(smem);
      if (it == per_sm_of.end()) {
        int n = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kQuantThreads, smem) != cudaSuccess || n < 1) {
          cudaGetLastError();
          n = MINB;
        }
        it = per_sm_of.emplace(smem, n).first;
      }
      per_sm = it->second;
    }
    blocks = std::min<int64_t>(blocks, static_cast<int64_t>(opt.sm_count) * per_sm);
  }
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kQuantThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = opt.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, x, u, w, wscale, bias, out, M, N, K, rot, norm, colsum);
}

// The one-launch GEMV's configuration by M (and at M = 1 by opt.config or the shape).
template <bool ASYM>
cudaError_t launch_fused_by_m(const __half* x, const __half* u, const int8_t* w, const float* wscale,
                              const __half* bias, const OutSplit& out, int64_t M, int64_t K, const WalshSpec& r,
                              const GemvOptions& opt, cudaStream_t stream, const NormSpec& nrm, const float* colsum) {
  if (M <= 1) {
    int config = opt.config;
    if (config < 0) {  // by shape: wide N -> 1 x 8, else 2 x 4 (H100 A/B of the persistent grid, benchmarks.md g11;
      // g6's sweep of the grid before it had 4 x 4 for K >= 8192, now 8 % slower there)
      config = out.end[out.count - 1] >= 8192 ? 1 : 0;
    }
    switch (config) {  // outputs per warp x 16-byte chunks per row in flight (A/B runs: ONNXQF_GEMV_CONFIG)
      case 1: return launch_fused_t<1, 1, 8, 3, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
      case 2: return launch_fused_t<1, 2, 8, 2, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
      case 3: return launch_fused_t<1, 4, 4, 2, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
      case 4: return launch_fused_t<1, 4, 2, 3, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
      case 5: return launch_fused_t<1, 1, 16, 2, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
      default: return launch_fused_t<1, 2, 4, 3, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
    }
  }
  if (M <= 2) return launch_fused_t<2, 2, 4, 3, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
  return launch_fused_t<4, 2, 2, 3, ASYM>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum);
}

// One warp per output element, byte loads: any K, any alignment.
__global__ void naive_kernel(const int8_t* __restrict__ q, const float* __restrict__ amax,
                             const int8_t* __restrict__ w, const float* __restrict__ wscale,
                             const __half* __restrict__ bias, __half* __restrict__ y, int64_t M, int64_t N,
                             int64_t K, const float* __restrict__ zero, const float* __restrict__ colsum) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (e >= M * N) return;
  const int64_t m = e / N, n = e % N;
  int acc = 0;
  for (int64_t k = lane; k < K; k += 32) acc += static_cast<int>(q[m * K + k]) * static_cast<int>(w[n * K + k]);
  acc = warp_sum(acc);
  if (lane == 0) y[e] = dequant_at(acc, amax, zero, colsum, wscale, bias, m, n);
}

template <int MT, int R, int U>
cudaError_t launch_gemv_t(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                          const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream,
                          const float* zero, const float* colsum) {
  const int64_t warps = (N + R - 1) / R;
  const int64_t bx = (warps + kGemvWarps - 1) / kGemvWarps;
  const int64_t by = (M + MT - 1) / MT;
  if (bx > 0x7fffffff || by > 65535) return cudaErrorInvalidValue;
  gemv_kernel<MT, R, U><<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)), kGemvWarps * 32, 0, stream>>>(
      q, amax, w, wscale, bias, y, M, N, K, zero, colsum);
  return cudaGetLastError();
}

// launch_quantize_rows with the symmetric (ASYM false) or asymmetric codes (z to zero).
template <bool ASYM>
cudaError_t launch_quantize_rows_t(const __half* x, int8_t* q, float* amax, float* zero, int64_t M, int64_t K,
                                   cudaStream_t stream, const __half* u, const NormSpec& n, bool vec, size_t smem,
                                   bool regs, int pipe_blocks) {
  const int64_t regs_threads = (K / 8 + kRegsChunks - 1) / kRegsChunks;
  if (regs && vec && regs_threads <= kRegsMaxThreads) {
    const unsigned t = static_cast<unsigned>(std::max<int64_t>(32, (regs_threads + 31) / 32 * 32));
    if (pipe_blocks > 0 && M > 2 * static_cast<int64_t>(pipe_blocks) && t <= kPipeMaxThreads) {  // >= 2 rows each
      const unsigned g = static_cast<unsigned>(pipe_blocks);
      if (n.skip) quantize_rows_pipe_kernel<2, ASYM><<<g, t, 0, stream>>>(x, u, q, amax, zero, M, K, n);
      else if (u) quantize_rows_pipe_kernel<1, ASYM><<<g, t, 0, stream>>>(x, u, q, amax, zero, M, K, n);
      else quantize_rows_pipe_kernel<0, ASYM><<<g, t, 0, stream>>>(x, u, q, amax, zero, M, K, n);
      return cudaGetLastError();
    }
    const unsigned rows = static_cast<unsigned>(M);
    if (n.skip) quantize_rows_regs_kernel<2, ASYM><<<rows, t, 0, stream>>>(x, u, q, amax, zero, K, n);
    else if (u) quantize_rows_regs_kernel<1, ASYM><<<rows, t, 0, stream>>>(x, u, q, amax, zero, K, n);
    else quantize_rows_regs_kernel<0, ASYM><<<rows, t, 0, stream>>>(x, u, q, amax, zero, K, n);
    return cudaGetLastError();
  }
  quantize_rows_kernel<ASYM><<<static_cast<unsigned>(M), kQuantThreads, smem, stream>>>(x, u, q, amax, zero, K, vec,
                                                                                         n);
  return cudaGetLastError();
}

}  // namespace

static bool norm_aligned(const __half* x, const NormSpec& n, int64_t K) {
  return K % 8 == 0 && !((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(n.skip) |
                          reinterpret_cast<uintptr_t>(n.gamma) | reinterpret_cast<uintptr_t>(n.sum)) % 16);
}

cudaError_t launch_quantize_rows(const __half* x, int8_t* q, float* amax, int64_t M, int64_t K, cudaStream_t stream,
                                 const __half* u, const NormSpec* norm, bool regs, int pipe_blocks, float* zero) {
  if (M <= 0) return cudaSuccess;
  if (M > 0x7fffffff) return cudaErrorInvalidValue;
  const bool vec = (K % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(u) % 16 == 0) && (reinterpret_cast<uintptr_t>(q) % 8 == 0);
  const NormSpec n = norm ? *norm : NormSpec{};
  size_t smem = 0;
  if (n.skip) {
    if (u || !vec || !norm_aligned(x, n, K) || !n.gamma) return cudaErrorInvalidValue;
    smem = 2 * static_cast<size_t>(K);  // the normalized row
    if (smem > 48 * 1024) return cudaErrorInvalidValue;  // (K > 24576: no model has such rows)
  }
  return zero ? launch_quantize_rows_t<true>(x, q, amax, zero, M, K, stream, u, n, vec, smem, regs, pipe_blocks)
              : launch_quantize_rows_t<false>(x, q, amax, zero, M, K, stream, u, n, vec, smem, regs, pipe_blocks);
}

cudaError_t launch_glu(const __half* g, const __half* u, __half* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = n % 8 == 0 && (reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(u) |
                                  reinterpret_cast<uintptr_t>(y)) % 16 == 0;
  const int64_t blocks = ((vec ? n / 8 : n) + 255) / 256;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  glu_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(g, u, y, n, vec);
  return cudaGetLastError();
}

cudaError_t launch_w8a8_gemv(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                             const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream,
                             const float* zero, const float* colsum) {
  if (K % 16 != 0 || reinterpret_cast<uintptr_t>(q) % 16 != 0 || reinterpret_cast<uintptr_t>(w) % 16 != 0 ||
      (zero != nullptr) != (colsum != nullptr))
    return cudaErrorInvalidValue;
  if (M <= 1) return launch_gemv_t<1, 2, 4>(q, amax, w, wscale, bias, y, M, N, K, stream, zero, colsum);
  if (M <= 2) return launch_gemv_t<2, 2, 4>(q, amax, w, wscale, bias, y, M, N, K, stream, zero, colsum);
  if (M <= 4) return launch_gemv_t<4, 2, 4>(q, amax, w, wscale, bias, y, M, N, K, stream, zero, colsum);
  if (M <= 8) return launch_gemv_t<8, 2, 2>(q, amax, w, wscale, bias, y, M, N, K, stream, zero, colsum);
  return launch_gemv_t<16, 4, 1>(q, amax, w, wscale, bias, y, M, N, K, stream, zero, colsum);
}

bool w8a8_fused_gemv_supported(const __half* x, const int8_t* w, int64_t M, int64_t K, const WalshSpec* rot,
                               bool norm) {
  // a rotated row is held by K / 16 of the block's threads, 16 values each
  const bool rot_ok = !rot || !rot->n || (K == (int64_t{1} << rot->n) && K <= 16 * kQuantThreads);
  const int64_t smem = static_cast<int64_t>(kFusedMaxM) * K + (rot && rot->n ? 8 * K : 0) + (norm ? 2 * K : 0);
  return M >= 1 && M <= kFusedMaxM && K % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0 && smem <= kFusedMaxSmem && rot_ok;
}

cudaError_t launch_w8a8_fused_gemv(const __half* x, const int8_t* w, const float* wscale, const __half* bias,
                                   const OutSplit& out, int64_t M, int64_t K, cudaStream_t stream,
                                   const WalshSpec* rot, const GemvOptions& opt, const __half* u,
                                   const NormSpec* norm, const float* colsum) {
  const NormSpec nrm = norm ? *norm : NormSpec{};
  if (!w8a8_fused_gemv_supported(x, w, M, K, rot, nrm.skip != nullptr) || out.count < 1 ||
      out.count > kMaxOutputs || (u && ((rot && rot->n) || reinterpret_cast<uintptr_t>(u) % 16 != 0)) ||
      (nrm.skip && (u || (rot && rot->n) || !nrm.gamma || !norm_aligned(x, nrm, K))))
    return cudaErrorInvalidValue;
  const WalshSpec r = rot ? *rot : WalshSpec{};
  return colsum ? launch_fused_by_m<true>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, colsum)
                : launch_fused_by_m<false>(x, u, w, wscale, bias, out, M, K, r, opt, stream, nrm, nullptr);
}

cudaError_t launch_w8a8_naive(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                              const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream,
                              const float* zero, const float* colsum) {
  if ((zero != nullptr) != (colsum != nullptr)) return cudaErrorInvalidValue;
  const int64_t threads = M * N * 32;
  if (threads <= 0) return cudaSuccess;
  const int64_t blocks = (threads + 255) / 256;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  naive_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(q, amax, w, wscale, bias, y, M, N, K, zero, colsum);
  return cudaGetLastError();
}

}  // namespace onnxqf
