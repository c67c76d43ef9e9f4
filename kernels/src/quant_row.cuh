// Per-token quantization arithmetic shared by every kernel that quantizes activations (kernels.h: conventions).
#pragma once

#include <cuda_fp16.h>

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

// The block's max of m (each thread's, WARPS warps; red: shared [WARPS]), then the row's scale (row_scale) written
// by thread 0. Ends with a barrier: *inv is then readable by every thread.
template <int WARPS>
__device__ __forceinline__ void block_row_scale(float m, float* red, __half* inv, float* amax) {
  const int tid = threadIdx.x;
  m = warp_max(m);
  if ((tid & 31) == 0) red[tid >> 5] = m;
  __syncthreads();
  if (tid < 32) {
    float v = tid < WARPS ? red[tid] : 0.f;
    v = warp_max(v);
    if (tid == 0) row_scale(v, inv, amax);
  }
  __syncthreads();
}

}  // namespace onnxqf
