// Per-token int8 quantization, the small-M (decode) W8A8 GEMV and a slow any-shape fallback.
// Conventions: kernels.h.
#include "kernels.h"

#include <algorithm>

namespace onnxqf {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kQuantCached = 8;  // 16-byte chunks of x per thread held in registers (K <= 16384 read once)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float chunk_absmax(const uint4& c, float m) {
  const __half2* h = reinterpret_cast<const __half2*>(&c);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(__habs2(h[j]));
    m = fmaxf(m, fmaxf(f.x, f.y));
  }
  return m;
}

// The scale of one token: fp16 127/amax as the graph computes it; when that overflows fp16 (amax < 127/65504,
// where the fp16 graph makes inf/NaN codes), the codes are computed in fp32 instead (finite: zeros stay 0).
struct TokenScale {
  __half inv;
  float finv;
  bool wide;
};

__device__ __forceinline__ int8_t code_of(__half x, const TokenScale& s) {
  // fp16 product (correctly rounded, as ONNX Runtime's fp16 Mul), then round half to even
  const float r = s.wide ? rintf(__half2float(x) * s.finv) : rintf(__half2float(__hmul(x, s.inv)));
  return static_cast<int8_t>(fminf(fmaxf(r, -127.f), 127.f));
}

__device__ __forceinline__ uint2 chunk_codes(const uint4& c, const TokenScale& s) {
  const __half* h = reinterpret_cast<const __half*>(&c);
  union {
    int8_t b[8];
    uint2 u;
  } out;
#pragma unroll
  for (int j = 0; j < 8; ++j) out.b[j] = code_of(h[j], s);
  return out.u;
}

// One block per row. vec: the row starts 16-byte aligned and K % 8 == 0.
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(const __half* __restrict__ x,
                                                                      int8_t* __restrict__ q,
                                                                      float* __restrict__ amax_out, int64_t K,
                                                                      bool vec) {
  const int64_t row = blockIdx.x;
  const __half* xr = x + row * K;
  int8_t* qr = q + row * K;
  const int tid = threadIdx.x;
  float m = 0.f;
  uint4 cache[kQuantCached];
  const int64_t nvec = vec ? K / 8 : 0;
  if (vec) {
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
#pragma unroll
    for (int i = 0; i < kQuantCached; ++i) {
      const int64_t c = tid + static_cast<int64_t>(i) * kQuantThreads;
      if (c < nvec) {
        cache[i] = __ldg(xv + c);
        m = chunk_absmax(cache[i], m);
      }
    }
    for (int64_t c = tid + static_cast<int64_t>(kQuantCached) * kQuantThreads; c < nvec; c += kQuantThreads)
      m = chunk_absmax(__ldg(xv + c), m);
  } else {
    for (int64_t k = tid; k < K; k += kQuantThreads) m = fmaxf(m, fabsf(__half2float(xr[k])));
  }
  __shared__ float red[kQuantThreads / 32];
  __shared__ TokenScale scale_s;
  m = warp_max(m);
  if ((tid & 31) == 0) red[tid >> 5] = m;
  __syncthreads();
  if (tid < 32) {
    float v = tid < kQuantThreads / 32 ? red[tid] : 0.f;
    v = warp_max(v);
    if (tid == 0) {
      // the max of fp16 magnitudes is an fp16 value: exact; the floor is onnxqf's fp16 tiny (1e-4)
      __half a = __float2half_rn(v);
      const __half tiny = __float2half_rn(1e-4f);
      if (__hlt(a, tiny)) a = tiny;
      TokenScale ts;
      ts.inv = __hdiv(__float2half_rn(127.f), a);  // ONNX Runtime's fp16 Div
      ts.finv = 127.f / __half2float(a);
      ts.wide = __hisinf(ts.inv) != 0;
      scale_s = ts;
      amax_out[row] = __half2float(a);
    }
  }
  __syncthreads();
  const TokenScale inv = scale_s;
  if (vec) {
    uint2* qv = reinterpret_cast<uint2*>(qr);
#pragma unroll
    for (int i = 0; i < kQuantCached; ++i) {
      const int64_t c = tid + static_cast<int64_t>(i) * kQuantThreads;
      if (c < nvec) qv[c] = chunk_codes(cache[i], inv);
    }
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    for (int64_t c = tid + static_cast<int64_t>(kQuantCached) * kQuantThreads; c < nvec; c += kQuantThreads)
      qv[c] = chunk_codes(__ldg(xv + c), inv);
  } else {
    for (int64_t k = tid; k < K; k += kQuantThreads) qr[k] = code_of(xr[k], inv);
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

constexpr int kGemvWarps = 4;

// Each warp computes R consecutive outputs n for MT rows of M (blockIdx.y picks the MT rows); the lanes stride
// over K in 16-byte chunks, U chunks per row in flight. Weights are streamed past L1 (read once); the codes of
// x are small and read through L1.
template <int MT, int R, int U>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const int8_t* __restrict__ q,
                                                              const float* __restrict__ amax,
                                                              const int8_t* __restrict__ w,
                                                              const float* __restrict__ wscale,
                                                              const __half* __restrict__ bias, __half* __restrict__ y,
                                                              int64_t M, int64_t N, int64_t K) {
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
      if (lane == ((m * R + r) & 31) && mm < M && nn < N) y[mm * N + nn] = dequant(v, amax[mm], wscale[nn], bias, nn);
    }
}

// One warp per output element, byte loads: any K, any alignment.
__global__ void naive_kernel(const int8_t* __restrict__ q, const float* __restrict__ amax,
                             const int8_t* __restrict__ w, const float* __restrict__ wscale,
                             const __half* __restrict__ bias, __half* __restrict__ y, int64_t M, int64_t N,
                             int64_t K) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (e >= M * N) return;
  const int64_t m = e / N, n = e % N;
  int acc = 0;
  for (int64_t k = lane; k < K; k += 32) acc += static_cast<int>(q[m * K + k]) * static_cast<int>(w[n * K + k]);
  acc = warp_sum(acc);
  if (lane == 0) y[e] = dequant(acc, amax[m], wscale[n], bias, n);
}

template <int MT, int R, int U>
cudaError_t launch_gemv_t(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                          const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const int64_t warps = (N + R - 1) / R;
  const int64_t bx = (warps + kGemvWarps - 1) / kGemvWarps;
  const int64_t by = (M + MT - 1) / MT;
  if (bx > 0x7fffffff || by > 65535) return cudaErrorInvalidValue;
  gemv_kernel<MT, R, U><<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)), kGemvWarps * 32, 0, stream>>>(
      q, amax, w, wscale, bias, y, M, N, K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize_rows(const __half* x, int8_t* q, float* amax, int64_t M, int64_t K, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (M > 0x7fffffff) return cudaErrorInvalidValue;
  const bool vec = (K % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(q) % 8 == 0);
  quantize_rows_kernel<<<static_cast<unsigned>(M), kQuantThreads, 0, stream>>>(x, q, amax, K, vec);
  return cudaGetLastError();
}

cudaError_t launch_w8a8_gemv(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                             const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (K % 16 != 0 || reinterpret_cast<uintptr_t>(q) % 16 != 0 || reinterpret_cast<uintptr_t>(w) % 16 != 0)
    return cudaErrorInvalidValue;
  if (M <= 1) return launch_gemv_t<1, 2, 4>(q, amax, w, wscale, bias, y, M, N, K, stream);
  if (M <= 2) return launch_gemv_t<2, 2, 4>(q, amax, w, wscale, bias, y, M, N, K, stream);
  if (M <= 4) return launch_gemv_t<4, 2, 4>(q, amax, w, wscale, bias, y, M, N, K, stream);
  if (M <= 8) return launch_gemv_t<8, 2, 2>(q, amax, w, wscale, bias, y, M, N, K, stream);
  return launch_gemv_t<16, 4, 1>(q, amax, w, wscale, bias, y, M, N, K, stream);
}

cudaError_t launch_w8a8_naive(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                              const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const int64_t threads = M * N * 32;
  if (threads <= 0) return cudaSuccess;
  const int64_t blocks = (threads + 255) / 256;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  naive_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(q, amax, w, wscale, bias, y, M, N, K);
  return cudaGetLastError();
}

}  // namespace onnxqf
