// Per-token quantization arithmetic shared by every kernel that quantizes activations (kernels.h: conventions).
#pragma once

#include <cuda_fp16.h>

#include <type_traits>

namespace onnxqf {

// Eight fp16 values (one 16-byte chunk) to fp32.
__device__ __forceinline__ void halves_to_floats(const uint4& v, float* r) {
  const __half2* h2 = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __half22float2(h2[k]);
    r[2 * k] = f.x;
    r[2 * k + 1] = f.y;
  }
}

// SwiGLU's product silu(g) * u in the fp16 steps of the standard graph on ONNX Runtime's CUDA provider: Sigmoid
// (fp16 exp of -|g| from fp32, 1 / (1 + e) in fp16, mirrored for g <= 0), then two fp16 Muls, g * sigmoid(g) first.
__device__ __forceinline__ __half glu_one(__half g, __half u) {
  const __half one = __float2half_rn(1.f);
  const __half e = __float2half_rn(expf(-fabsf(__half2float(g))));
  const __half r = __hdiv(one, __hadd(one, e));
  const __half s = __hgt(g, __float2half_rn(0.f)) ? r : __hsub(one, r);
  return __hmul(__hmul(g, s), u);
}

// Eight products (glu_one) of two 16-byte chunks.
__device__ __forceinline__ uint4 glu_chunk(const uint4& g, const uint4& u) {
  uint4 r;
  const __half* gh = reinterpret_cast<const __half*>(&g);
  const __half* uh = reinterpret_cast<const __half*>(&u);
  __half* rh = reinterpret_cast<__half*>(&r);
#pragma unroll
  for (int j = 0; j < 8; ++j) rh[j] = glu_one(gh[j], uh[j]);
  return r;
}

// Chunk c of a row: x's own (u null), or glu_chunk of x's and u's (a SwiGLU input, attribute input_glu).
__device__ __forceinline__ uint4 load_chunk(const uint4* xv, const uint4* uv, int64_t c) {
  return uv ? glu_chunk(__ldg(xv + c), __ldg(uv + c)) : __ldg(xv + c);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The warp's sum of v (every lane gets it): the int32 dot products of the GEMV, the fp32 squares of the norm.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The block's sum (SUM) or max of v over its warps (WARPS of them; 0: blockDim.x / 32), returned to every thread:
// one barrier. red: shared, one slot per warp; a later reduction in the same block takes other slots or waits for
// a barrier (there is none after the reads here). The sum adds the warps' sums in order, from 0.
template <bool SUM, int WARPS = 0>
__device__ __forceinline__ float block_all(float v, float* red) {
  v = SUM ? warp_sum(v) : warp_max(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  const int warps = WARPS ? WARPS : static_cast<int>(blockDim.x >> 5);
  float r = SUM ? 0.f : red[0];
  for (int i = SUM ? 0 : 1; i < warps; ++i) r = SUM ? r + red[i] : fmaxf(r, red[i]);
  return r;
}

// The largest |value| of an fp16 chunk (eight values), or m if larger.
__device__ __forceinline__ float chunk_absmax(const uint4& c, float m) {
  const __half2* h = reinterpret_cast<const __half2*>(&c);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(__habs2(h[j]));
    m = fmaxf(m, fmaxf(f.x, f.y));
  }
  return m;
}

// skip_norm's first step on one chunk: a <- fp16(a + b); returns ss plus the fp32 squares of the sums.
__device__ __forceinline__ float add_square_chunk(uint4& a, const uint4& b, float ss) {
  __half2* ha = reinterpret_cast<__half2*>(&a);
  const __half2* hb = reinterpret_cast<const __half2*>(&b);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    ha[j] = __hadd2(ha[j], hb[j]);
    const float2 f = __half22float2(ha[j]);
    ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
  }
  return ss;
}

// skip_norm's second step on one chunk: a <- fp16(gamma * fp16(a * r)).
__device__ __forceinline__ void norm_chunk(uint4& a, const uint4& gamma, __half2 r) {
  __half2* ha = reinterpret_cast<__half2*>(&a);
  const __half2* hg = reinterpret_cast<const __half2*>(&gamma);
#pragma unroll
  for (int j = 0; j < 4; ++j) ha[j] = __hmul2(hg[j], __hmul2(ha[j], r));
}

// The row's floored fp16 amax and fp16 127/amax from the max of its fp16 magnitudes (an fp16 value: exact). The
// floor is onnxqf's fp16 one (2^-9: 127/amax stays a finite fp16, FP16_AMAX_FLOOR in onnxqf/lowering/w8a8.py).
__device__ __forceinline__ void row_scale(float absmax, __half* inv, float* amax) {
  __half a = __float2half_rn(absmax);
  const __half floor = __float2half_rn(0.001953125f);
  if (__hlt(a, floor)) a = floor;
  *inv = __hdiv(__float2half_rn(127.f), a);  // ONNX Runtime's fp16 Div
  *amax = __half2float(a);
}

__device__ __forceinline__ int8_t code_of(__half x, __half inv) {
  // fp16 product (correctly rounded, as ONNX Runtime's fp16 Mul), then round half to even
  const float r = rintf(__half2float(__hmul(x, inv)));
  return static_cast<int8_t>(fminf(fmaxf(r, -127.f), 127.f));
}

// Asymmetric codes (the op's attribute asymmetric = 1): int8-token-asym's arithmetic, fp16 steps as its standard
// graph takes them (onnxqf/lowering/w8a8.py: asymmetric_codes, code_offset 128):
//   hi = max(max_k x, 0), lo = min(min_k x, 0)                 fp16 (exact)
//   s  = max(fp16(fp16(hi - lo) / 255), fp16(1e-4))            fp16 Sub, Div (ONNX Runtime's fp16 Div: __hdiv), Max
//   zp = rint(fp16(-lo / s))                                   fp16 Neg, Div, Round (half to even)
//   c  = clip(rint(fp16(x / s)) + zp, 0, 255) - 128            int8 (sums of small integers: exact in fp16 and fp32)
// The row's s (fp32, exact) is written where the symmetric amax goes, and z = zp - 128 (fp32) beside it; the
// dequantization is then (acc - z * colsum(W)) * s * wscale (kernels.h).
struct AsymScale {
  __half s;  // the row's step
  float zp;  // its zero point, an integer in [0, 256]
};

// The row's step and zero point from the largest value (hi >= 0) and the largest negated value (nlo >= 0) of its fp16
// values (with 0 among them); *s_out, *z_out (when not null) its fp32 s and z.
__host__ __device__ __forceinline__ AsymScale asym_row_scale(float hi, float nlo, float* s_out, float* z_out) {
  const __half h = __float2half_rn(hi), l = __float2half_rn(-nlo);  // fp16 values: exact
  const __half step = __hdiv(__hsub(h, l), __float2half_rn(255.f));
  const __half tiny = __float2half_rn(1e-4f);  // the graph's fp16 floor (np.float16(1e-4): the same bits)
  AsymScale a;
  a.s = __hlt(step, tiny) ? tiny : step;
  a.zp = rintf(__half2float(__hdiv(__hneg(l), a.s)));
  if (s_out) *s_out = __half2float(a.s);
  if (z_out) *z_out = a.zp - 128.f;
  return a;
}

// (code_of for the asymmetric codes)
__host__ __device__ __forceinline__ int8_t code_of(__half x, const AsymScale& a) {
  const float r = rintf(__half2float(__hdiv(x, a.s))) + a.zp;
  return static_cast<int8_t>(fminf(fmaxf(r, 0.f), 255.f) - 128.f);
}

// The largest value and the largest negated value of an fp16 chunk, or hi / nlo if larger.
__host__ __device__ __forceinline__ void chunk_range(const uint4& c, float& hi, float& nlo) {
  const __half2* h = reinterpret_cast<const __half2*>(&c);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    hi = fmaxf(hi, fmaxf(f.x, f.y));
    nlo = fmaxf(nlo, fmaxf(-f.x, -f.y));
  }
}

// The block's maxima of a and b over its warps (WARPS of them; 0: blockDim.x / 32), returned to every thread: one
// barrier. red: shared, 2 * warps slots (the same rules as block_all's).
template <int WARPS = 0>
__device__ __forceinline__ float2 block_max2(float a, float b, float* red) {
  a = warp_max(a);
  b = warp_max(b);
  const int warps = WARPS ? WARPS : static_cast<int>(blockDim.x >> 5);
  if ((threadIdx.x & 31) == 0) {
    red[threadIdx.x >> 5] = a;
    red[warps + (threadIdx.x >> 5)] = b;
  }
  __syncthreads();
  float2 r = make_float2(red[0], red[warps]);
  for (int i = 1; i < warps; ++i) {
    r.x = fmaxf(r.x, red[i]);
    r.y = fmaxf(r.y, red[warps + i]);
  }
  return r;
}

// block_row_scale's asymmetric twin: the block's hi / nlo (red: shared [2 * WARPS]), the row's AsymScale written to
// *scale_s (shared) and its s / z to *s_dst / *z_dst by thread 0. Ends with a barrier.
template <int WARPS>
__device__ __forceinline__ void block_row_range(float hi, float nlo, float* red, AsymScale* scale_s, float* s_dst,
                                                float* z_dst) {
  const float2 r = block_max2<WARPS>(hi, nlo, red);
  if (threadIdx.x == 0) *scale_s = asym_row_scale(r.x, r.y, s_dst, z_dst);
  __syncthreads();
}

// Eight codes of an fp16 chunk: symmetric (scale: inv = 127 / amax, __half) or asymmetric (an AsymScale).
template <class Scale>
__device__ __forceinline__ uint2 chunk_codes(const uint4& c, const Scale& scale) {
  const __half* h = reinterpret_cast<const __half*>(&c);
  union {
    int8_t b[8];
    uint2 u;
  } out;
#pragma unroll
  for (int j = 0; j < 8; ++j) out.b[j] = code_of(h[j], scale);
  return out.u;
}

// The block's max of m (each thread's, WARPS warps; red: shared [WARPS]), then the row's scale (row_scale) written
// by thread 0. Ends with a barrier: *inv is then readable by every thread, and red may be used again.
template <int WARPS>
__device__ __forceinline__ void block_row_scale(float m, float* red, __half* inv, float* amax) {
  m = block_all<false, WARPS>(m, red);
  if (threadIdx.x == 0) row_scale(m, inv, amax);
  __syncthreads();
}

// The shared row scale of a block-wide quantization: fp16 127 / amax (symmetric), or the asymmetric step and zero
// point.
template <bool ASYM>
using RowScale = std::conditional_t<ASYM, AsymScale, __half>;

// The block's reduction of the thread's m (symmetric: largest |x|) or m / nlo (asymmetric: largest x and -x), then
// the row's scale in *scale_s (shared) and its fp32 amax or s (and z) written by thread 0; red: shared [2 * WARPS].
// Ends with a barrier.
template <bool ASYM, int WARPS>
__device__ __forceinline__ void block_scale(float m, float nlo, float* red, RowScale<ASYM>* scale_s, float* amax_dst,
                                            float* zero_dst) {
  if constexpr (ASYM) block_row_range<WARPS>(m, nlo, red, scale_s, amax_dst, zero_dst);
  else block_row_scale<WARPS>(m, red, scale_s, amax_dst);
}

// The thread's running statistic of one value or a chunk: largest |x| (symmetric) or largest x and -x (asymmetric).
template <bool ASYM>
__device__ __forceinline__ void see_value(float v, float& m, float& nlo) {
  if constexpr (ASYM) {
    m = fmaxf(m, v);
    nlo = fmaxf(nlo, -v);
  } else {
    m = fmaxf(m, fabsf(v));
  }
}
template <bool ASYM>
__device__ __forceinline__ void see_chunk(const uint4& c, float& m, float& nlo) {
  if constexpr (ASYM) chunk_range(c, m, nlo);
  else m = chunk_absmax(c, m);
}

// The op's skip_norm of one row by the whole block (THREADS threads; kernels.h: NormSpec): s = x + skip, written to
// sum_row (when not null); y = fp16(gamma * fp16(s * r)) to yr (shared or global), r = fp16(rsqrt(mean(s^2) + eps))
// from an fp32 sum of squares. red: shared [THREADS / 32]. Rows 16-byte aligned, K % 8 == 0. Returns the largest
// |y| of the thread's own chunks (chunks tid, tid + THREADS, ...: each thread reads back only what it wrote); ASYM:
// the largest y, and the largest -y in *nlo (see_chunk). Ends with a barrier.
template <int THREADS, bool ASYM = false>
__device__ __forceinline__ float skip_norm_row(const __half* __restrict__ xr, const __half* __restrict__ sr,
                                              const __half* __restrict__ gamma, float eps, __half* sum_row,
                                              __half* yr, int64_t K, float* red, float* nlo = nullptr) {
  const int tid = threadIdx.x;
  const int64_t nvec = K / 8;
  float ss = 0.f;
  for (int64_t c = tid; c < nvec; c += THREADS) {
    uint4 a = __ldg(reinterpret_cast<const uint4*>(xr) + c);
    ss = add_square_chunk(a, __ldg(reinterpret_cast<const uint4*>(sr) + c), ss);
    if (sum_row) reinterpret_cast<uint4*>(sum_row)[c] = a;
    reinterpret_cast<uint4*>(yr)[c] = a;  // s, read back below by this same thread
  }
  const float total = block_all<true, THREADS / 32>(ss, red);
  const __half2 r = __float2half2_rn(rsqrtf(total / static_cast<float>(K) + eps));
  float m = 0.f, n = 0.f;
  for (int64_t c = tid; c < nvec; c += THREADS) {
    uint4 a = reinterpret_cast<const uint4*>(yr)[c];
    norm_chunk(a, __ldg(reinterpret_cast<const uint4*>(gamma) + c), r);
    see_chunk<ASYM>(a, m, n);
    reinterpret_cast<uint4*>(yr)[c] = a;
  }
  __syncthreads();  // every thread has read red: it may be used again
  if (nlo) *nlo = n;
  return m;
}

}  // namespace onnxqf
