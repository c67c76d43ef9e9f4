// A rotation by Walsh-Hadamard factors alone, fused into the per-token quantization, for one row held by a block:
// K = 2^n values, T = K / 16 threads each holding 16 of them in registers (the block may have more threads: they
// only take part in the barriers). The transform runs over the bits [lo, hi) of the element index (kernels.h:
// WalshSpec) in windows of four bits: a window's stages are butterflies between a thread's own registers, and the
// values move between windows through shared memory (two fp32 buffers of K, alternated: one barrier per move).
// The row is read as 16 contiguous values per thread (window 0), the codes are written from the last window.
#pragma once

#include <cuda_fp16.h>

#include "kernels.h"
#include "quant_row.cuh"

namespace onnxqf {

// The register k of thread t when the window starts at bit s: bits [s, s + 4) of the index are k's.
__device__ __forceinline__ int walsh_index(int t, int k, int s) {
  return ((t >> s) << (s + 4)) | (k << s) | (t & ((1 << s) - 1));
}

// Where index i lives in a shared buffer: the low four bits XORed with the next four. A window's exchange writes or
// reads, for each register k, index walsh_index(t, k, s) across a warp's threads; unswizzled, the window at bit 0
// puts the 32 threads 16 words apart (a 16-way bank conflict); swizzled, no pattern here conflicts more than 2-way.
__device__ __forceinline__ int walsh_slot(int i) { return i ^ ((i >> 4) & 15); }

// The butterfly stages of spans 2^lo .. 2^(hi-1) (0 <= lo, hi <= 4) over 16 registers (unnormalised).
__device__ __forceinline__ void walsh16(float* r, int lo, int hi) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    if (s < lo || s >= hi) continue;
    const int h = 1 << s;
#pragma unroll
    for (int k = 0; k < 16; ++k)
      if (!(k & h)) {
        const float u = r[k], v = r[k + h];
        r[k] = u + v;
        r[k + h] = u - v;
      }
  }
}

// The thread's 16 values of row xr (window 0: two 16-byte chunks), or zeros for threads beyond K / 16.
struct WalshLoad {
  uint4 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
};
__device__ __forceinline__ WalshLoad walsh_load(const __half* __restrict__ xr, int n) {
  WalshLoad v;
  const int t = threadIdx.x;
  if (t < ((1 << n) >> 4)) {
    const uint4* src = reinterpret_cast<const uint4*>(xr) + 2 * t;
    v.lo = __ldg(src);
    v.hi = __ldg(src + 1);
  }
  return v;
}

// walsh_quantize_row on a row already loaded (walsh_load): a caller striding over rows loads the next one first.
template <int WARPS, bool ASYM = false>
__device__ __forceinline__ void walsh_quantize_loaded(const WalshLoad& in, const WalshSpec& spec, float* fs,
                                                      int8_t* qr, float* amax_dst, float* red,
                                                      RowScale<ASYM>* inv_s, float* zero_dst = nullptr) {
  const int t = threadIdx.x, n = spec.n, K = 1 << n;
  const bool mine = t < (K >> 4);
  float r[16];
  halves_to_floats(in.lo, r);
  halves_to_floats(in.hi, r + 8);
  int s = 0, done = 0, buf = 0;  // the window's first bit; the bits below `done` are transformed
  for (;;) {
    const int from = max(spec.lo, max(s, done)), to = min(spec.hi, s + 4);
    if (mine && from < to) walsh16(r, from - s, to - s);
    done = s + 4;
    if (done >= spec.hi) break;
    const int next = min(max(done, spec.lo), n - 4);  // the window holding the next bit to transform
    float* f = fs + buf * K;
    if (mine) {
#pragma unroll
      for (int k = 0; k < 16; ++k) f[walsh_slot(walsh_index(t, k, s))] = r[k];
    }
    __syncthreads();
    if (mine) {
#pragma unroll
      for (int k = 0; k < 16; ++k) r[k] = f[walsh_slot(walsh_index(t, k, next))];
    }
    buf ^= 1;
    s = next;
  }
  __half h[16];
  float m = 0.f, nlo = 0.f;
  if (mine) {
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      h[k] = __float2half_rn(r[k] * spec.scale);
      see_value<ASYM>(__half2float(h[k]), m, nlo);
    }
  }
  block_scale<ASYM, WARPS>(m, nlo, red, inv_s, amax_dst, zero_dst);
  if (mine) {
    const RowScale<ASYM> inv = *inv_s;
#pragma unroll
    for (int k = 0; k < 16; ++k) qr[walsh_index(t, k, s)] = code_of(h[k], inv);
  }
}

// Rotates row xr (fp16, 16-byte aligned) by `spec` and quantizes it: codes to qr (global or shared memory), the
// floored amax to *amax_dst (ASYM: the asymmetric codes, s there and z to *zero_dst). fs: shared, 2 * K floats; red:
// shared, 2 * WARPS floats. Every thread of the block (WARPS warps, >= K / 16 threads) calls it; it ends with a
// barrier (block_scale's), after which fs may be reused.
template <int WARPS, bool ASYM = false>
__device__ __forceinline__ void walsh_quantize_row(const __half* __restrict__ xr, const WalshSpec& spec, float* fs,
                                                   int8_t* qr, float* amax_dst, float* red, RowScale<ASYM>* inv_s,
                                                   float* zero_dst = nullptr) {
  walsh_quantize_loaded<WARPS, ASYM>(walsh_load(xr, spec.n), spec, fs, qr, amax_dst, red, inv_s, zero_dst);
}

}  // namespace onnxqf
