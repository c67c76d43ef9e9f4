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
