// Online rotation fused into the per-token quantization: each row x (K = a * b, viewed as X [a, b] row-major) becomes
// y = x @ kron(A, B), i.e. Y = A^T X B, and fp16(Y) is quantized as launch_quantize_rows quantizes x. Each factor is
// either dense, a product on the tensor cores (WMMA 16x16x16, fp16 in, fp32 accumulate; the row rounded to fp16
// before it, as the standard-op graph's fp16 MatMul reads it), or the normalised Walsh-Hadamard (Sylvester) matrix,
// applied as a fast Walsh-Hadamard transform in fp32 (n log n adds: radix-8 butterfly passes through shared memory,
// the first three stages along a row in registers as the row is loaded). One block of 16 warps per row at a time,
// the blocks striding over the rows; the row lives in shared memory as [a16, b16] fp16 plus fp32 (6 * a16 * b16
// bytes, a16 and b16 = a and b rounded up to 16, the padding zero); dense factors are read from global memory.
#include <mma.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "quant_row.cuh"
#include "walsh_row.cuh"

namespace onnxqf {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kRotThreads = 512;  // 16 warps: at one token the row's tiles are spread over as many warps as is cheap
constexpr int kRotWarps = kRotThreads / 32;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// dst [rows16 x cols] (fp32, shared) = lhs [rows16 x inner] @ rhs [inner x cols]; every operand row-major, every
// size a multiple of 16; the warps split the 16x16 output tiles.
__device__ __forceinline__ void tile_gemm(const __half* lhs, int ld_lhs, const __half* rhs, int ld_rhs, float* dst,
                                          int rows16, int cols, int inner) {
  const int warp = threadIdx.x >> 5;
  const int tiles_n = cols / 16;
  const int tiles = (rows16 / 16) * tiles_n;
  for (int t = warp; t < tiles; t += kRotWarps) {
    const int ti = t / tiles_n, tj = t % tiles_n;
    FragC c;
    wmma::fill_fragment(c, 0.f);
#pragma unroll 4
    for (int k = 0; k < inner; k += 16) {  // unrolled: the next fragments' loads in flight during this product
      FragA fa;
      FragB fb;
      wmma::load_matrix_sync(fa, lhs + static_cast<int64_t>(ti) * 16 * ld_lhs + k, ld_lhs);
      wmma::load_matrix_sync(fb, rhs + static_cast<int64_t>(k) * ld_rhs + tj * 16, ld_rhs);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(dst + static_cast<int64_t>(ti) * 16 * cols + tj * 16, c, cols, wmma::mem_row_major);
  }
}

// fp32 values (times `scale`) back to fp16 (the rounding of a standard fp16 MatMul's output).
__device__ __forceinline__ void to_half(const float* src, __half* dst, int n, float scale) {
  for (int e = threadIdx.x * 2; e < n; e += kRotThreads * 2)
    *reinterpret_cast<__half2*>(dst + e) = __floats2half2_rn(src[e] * scale, src[e + 1] * scale);
}

// fp16 row to fp32.
__device__ __forceinline__ void to_float(const __half* src, float* dst, int n) {
  for (int e = threadIdx.x * 2; e < n; e += kRotThreads * 2) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(src + e));
    dst[e] = f.x;
    dst[e + 1] = f.y;
  }
}

// The unnormalised Walsh-Hadamard transform on P = 2^R values in registers (natural, Sylvester order).
template <int P>
__device__ __forceinline__ void walsh_regs(float* r) {
#pragma unroll
  for (int s = 1; s < P; s <<= 1)
#pragma unroll
    for (int k = 0; k < P; ++k)
      if (!(k & s)) {
        const float u = r[k], v = r[k + s];
        r[k] = u + v;
        r[k + s] = u - v;
      }
}

// R butterfly stages (spans h, 2h, ..., h 2^(R-1)) of the unnormalised Walsh-Hadamard transform of `lines` vectors
// of length n in f (fp32, shared): vector l's element e is f[l * line_stride + e * elem_stride]. Each thread takes
// groups of P = 2^R elements {base + k h}, the groups closed under these stages. lines_fast: consecutive threads
// take consecutive vectors (elements strided: coalesced when the vectors are columns), else consecutive groups.
template <int R>
__device__ __forceinline__ void walsh_pass(float* f, int lines, int n, int line_stride, int elem_stride, int h,
                                           bool lines_fast) {
  constexpr int P = 1 << R;
  const int groups = n / P, total = lines * groups;
  for (int u = threadIdx.x; u < total; u += kRotThreads) {
    const int l = lines_fast ? u % lines : u / groups, p = lines_fast ? u / lines : u % groups;
    float* v = f + l * line_stride + ((p / h) * (h * P) + p % h) * elem_stride;
    const int step = h * elem_stride;
    float r[P];
#pragma unroll
    for (int k = 0; k < P; ++k) r[k] = v[k * step];
    walsh_regs<P>(r);
#pragma unroll
    for (int k = 0; k < P; ++k) v[k * step] = r[k];
  }
}

// The stages of spans h0, 2 h0, ..., n/2 (n a power of two), three at a time, each pass followed by a barrier.
__device__ __forceinline__ void walsh(float* f, int lines, int n, int line_stride, int elem_stride, int h0,
                                      bool lines_fast) {
  for (int h = h0; h < n;) {
    const int left = n / h;
    if (left >= 8) {
      walsh_pass<3>(f, lines, n, line_stride, elem_stride, h, lines_fast);
      h *= 8;
    } else if (left == 4) {
      walsh_pass<2>(f, lines, n, line_stride, elem_stride, h, lines_fast);
      h *= 4;
    } else {
      walsh_pass<1>(f, lines, n, line_stride, elem_stride, h, lines_fast);
      h *= 2;
    }
    __syncthreads();
  }
}

// ASYM: the asymmetric codes (quant_row.cuh: AsymScale), each row's s to amax_out and z to zero_out.
template <bool ASYM>
__global__ void __launch_bounds__(kRotThreads) rotate_quantize_kernel(const __half* __restrict__ x,
                                                                     const __half* __restrict__ at,
                                                                     const __half* __restrict__ bm,
                                                                     int walsh_mask, int8_t* __restrict__ q,
                                                                     float* __restrict__ amax_out,
                                                                     float* __restrict__ zero_out, int64_t M,
                                                                     int a, int b) {
  extern __shared__ __align__(128) unsigned char rot_smem[];
  const int a16 = (a + 15) / 16 * 16, b16 = (b + 15) / 16 * 16;
  const int K = a * b, n16 = a16 * b16;
  const int bc = b / 8;                                              // 16-byte chunks per row of X (b % 8 == 0)
  __half* xs = reinterpret_cast<__half*>(rot_smem);                  // [a16, b16] fp16: the row, then X B
  float* ts = reinterpret_cast<float*>(rot_smem + size_t(n16) * 2);  // [a16, b16] fp32 products / transforms
  __shared__ float red[2 * kRotWarps];
  __shared__ RowScale<ASYM> inv_s;
  const int tid = threadIdx.x;
  const bool walsh_b = walsh_mask & 1, walsh_a = walsh_mask & 2;
  const bool load_f32 = walsh_b || (walsh_a && !bm);  // the row goes straight to the fp32 buffer
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * K);
    for (int c = tid; c < n16 / 8; c += kRotThreads) {  // a 16-byte chunk of X, or of the zero padding
      const int i = c / (b16 / 8), j = c % (b16 / 8);
      const uint4 v = (i < a && j < bc) ? __ldg(xr + i * bc + j) : make_uint4(0, 0, 0, 0);
      if (!load_f32) {
        reinterpret_cast<uint4*>(xs)[c] = v;
        continue;
      }
      float r[8];
      halves_to_floats(v, r);
      if (walsh_b) walsh_regs<8>(r);  // the first three stages along the row: the chunk is 8 aligned elements
      float4* d = reinterpret_cast<float4*>(ts + size_t(c) * 8);
      d[0] = make_float4(r[0], r[1], r[2], r[3]);
      d[1] = make_float4(r[4], r[5], r[6], r[7]);
    }
    __syncthreads();
    bool in_f32 = load_f32;  // where the row is now: ts (fp32, times `scale`) or xs (fp16)
    float scale = 1.f;
    if (walsh_b) {  // X H_b / sqrt(b) along each row, from span 8 on
      walsh(ts, a, b, b16, 1, 8, false);
      scale *= rsqrtf(static_cast<float>(b));
    } else if (bm) {  // X B (bm zero-padded to [b16, b16]: the padding columns stay zero)
      tile_gemm(xs, b16, bm, b16, ts, a16, b16, b16);
      __syncthreads();
      in_f32 = true;
    }
    if (walsh_a) {  // H_a / sqrt(a) (X B) along each column
      if (!in_f32) {
        to_float(xs, ts, n16);
        __syncthreads();
        in_f32 = true;
      }
      walsh(ts, b, a, 1, b16, 1, true);
      scale *= rsqrtf(static_cast<float>(a));
    } else if (at) {  // A^T (X B): at is A^T zero-padded to [a16, a16], so the padding rows stay zero
      if (in_f32) {
        to_half(ts, xs, n16, scale);
        scale = 1.f;
        __syncthreads();
      }
      tile_gemm(at, a16, xs, b16, ts, a16, b16, a16);
      __syncthreads();
      in_f32 = true;
    }
    if (in_f32) {
      to_half(ts, xs, n16, scale);
      __syncthreads();
    }
    float m = 0.f, nlo = 0.f;  // the padding is zero: the range over [a16, b16] is the row's (which holds 0)
    for (int e = tid * 2; e < n16; e += kRotThreads * 2) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(xs + e));
      see_value<ASYM>(f.x, m, nlo);
      see_value<ASYM>(f.y, m, nlo);
    }
    block_scale<ASYM, kRotWarps>(m, nlo, red, &inv_s, amax_out + row, ASYM ? zero_out + row : nullptr);
    const RowScale<ASYM> inv = inv_s;
    int8_t* qr = q + row * K;
    for (int e = tid * 4; e < K; e += kRotThreads * 4) {  // b % 8 == 0: 4 codes lie in one row of X
      const __half* v = xs + (e / b) * b16 + e % b;
      char4 c;
      c.x = code_of(v[0], inv);
      c.y = code_of(v[1], inv);
      c.z = code_of(v[2], inv);
      c.w = code_of(v[3], inv);
      *reinterpret_cast<char4*>(qr + e) = c;
    }
    __syncthreads();  // xs is overwritten by the next row
  }
}

// Rows rotated by Walsh-Hadamard factors alone (walsh_row.cuh): a block of WARPS * 32 = K / 16 threads per row at a
// time, the blocks striding over the rows.
template <int WARPS, bool ASYM>
__global__ void __launch_bounds__(WARPS * 32) walsh_quantize_kernel(const __half* __restrict__ x, WalshSpec spec,
                                                                    int8_t* __restrict__ q,
                                                                    float* __restrict__ amax_out,
                                                                    float* __restrict__ zero_out, int64_t M) {
  extern __shared__ __align__(16) unsigned char walsh_smem[];
  __shared__ float red[2 * WARPS];
  __shared__ RowScale<ASYM> inv_s;
  const int64_t K = int64_t{1} << spec.n;
  float* fs = reinterpret_cast<float*>(walsh_smem);
  int64_t row = blockIdx.x;
  if (row >= M) return;
  WalshLoad next = walsh_load(x + row * K, spec.n);
  for (; row < M; row += gridDim.x) {  // the next row's loads are in flight while this one is transformed
    const WalshLoad cur = next;
    if (row + gridDim.x < M) next = walsh_load(x + (row + gridDim.x) * K, spec.n);
    walsh_quantize_loaded<WARPS, ASYM>(cur, spec, fs, q + row * K, amax_out + row, red, &inv_s,
                                       ASYM ? zero_out + row : nullptr);
  }
}

template <int WARPS, bool ASYM>
cudaError_t launch_walsh_t(const __half* x, const WalshSpec& spec, int8_t* q, float* amax, float* zero, int64_t M,
                           int sm_count, cudaStream_t stream) {
  constexpr auto kernel = walsh_quantize_kernel<WARPS, ASYM>;
  const size_t smem = size_t{8} << spec.n;  // two fp32 buffers of K
  // up to 128 KiB (K = 16384), asked once per instance
  if (const cudaError_t oe = opt_in_smem<kernel>(size_t{8} << 14); oe != cudaSuccess) return oe;
  int per_sm = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WARPS * 32, smem);
  const int64_t blocks = std::min<int64_t>(M, static_cast<int64_t>(std::max(1, sm_count)) * std::max(1, per_sm));
  kernel<<<static_cast<unsigned>(blocks), WARPS * 32, smem, stream>>>(x, spec, q, amax, zero, M);
  return cudaGetLastError();
}

// By the rows' K / 16 threads.
template <bool ASYM>
cudaError_t launch_walsh_by_n(const __half* x, const WalshSpec& spec, int8_t* q, float* amax, float* zero, int64_t M,
                              int sm_count, cudaStream_t stream) {
  switch (spec.n) {
    case 9: return launch_walsh_t<1, ASYM>(x, spec, q, amax, zero, M, sm_count, stream);
    case 10: return launch_walsh_t<2, ASYM>(x, spec, q, amax, zero, M, sm_count, stream);
    case 11: return launch_walsh_t<4, ASYM>(x, spec, q, amax, zero, M, sm_count, stream);
    case 12: return launch_walsh_t<8, ASYM>(x, spec, q, amax, zero, M, sm_count, stream);
    case 13: return launch_walsh_t<16, ASYM>(x, spec, q, amax, zero, M, sm_count, stream);
    case 14: return launch_walsh_t<32, ASYM>(x, spec, q, amax, zero, M, sm_count, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The unnormalised Walsh-Hadamard transform of a row of 8 tpr values held 8 per lane by tpr consecutive lanes (chunk
// c of the row in this lane; tpr a power of two dividing 32, every lane of the warp taking part): the first three
// stages in registers, the others by shuffles with the lane holding the partner chunk.
__device__ __forceinline__ void walsh_chunk(float* r, int c, int tpr) {
  walsh_regs<8>(r);
  for (int l = 1; l < tpr; l <<= 1) {  // span 8 l: the partner chunk is c ^ l, lane ^ l
    const bool upper = c & l;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float p = __shfl_xor_sync(0xffffffffu, r[k], l);
      r[k] = upper ? p - r[k] : r[k] + p;
    }
  }
}

// A loaded chunk c (8 halves, all zero for a padding row) of a row of b = 8 tpr values times B (unnormalised), in
// fp32. The lanes holding one row's tpr chunks call it together (walsh_chunk's shuffles).
__device__ __forceinline__ void loaded_chunk_times_b(const uint4& v, int c, int tpr, bool walsh_b, float* r) {
  halves_to_floats(v, r);
  if (walsh_b) walsh_chunk(r, c, tpr);
}

// Chunk c (8 values) of row i of token m's X [a, b] times B, read from global memory: zero for the padding rows
// i >= a. u: null, or X is SwiGLU's silu(x) * u (glu_chunk).
__device__ __forceinline__ void chunk_times_b(const __half* __restrict__ x, const __half* __restrict__ u, int64_t m,
                                              int a, int b, int i, int c, bool walsh_b, float* r) {
  const int64_t row = (m * a + i) * b;
  const uint4 v = i < a ? load_chunk(reinterpret_cast<const uint4*>(x + row),
                                     u ? reinterpret_cast<const uint4*>(u + row) : nullptr, c)
                        : make_uint4(0u, 0u, 0u, 0u);
  loaded_chunk_times_b(v, c, b / 8, walsh_b, r);
}

// The dense-factor path, step 1: Z [M * b, a8] with Z[m * b + j][i] = fp16((X_m B)[i][j] * scale) for i < a, zero
// for a <= i < a8 (B = the unnormalised Walsh-Hadamard matrix, scale = 1 / sqrt(b); or B = I, scale = 1). A block
// of 256 threads takes `rows` = 2048 / b rows of one token: b / 8 threads per row, 8 values each in registers (the
// first three stages there, the others across the row's lanes by shuffles); the block's [b, rows] tile goes out
// through shared memory, so that the transposed writes are whole rows of Z.
constexpr int kZThreads = 256;

__global__ void __launch_bounds__(kZThreads) rows_to_z_kernel(const __half* __restrict__ x,
                                                              const __half* __restrict__ u, __half* __restrict__ z,
                                                              int a, int a8, int b, bool walsh_b, float scale) {
  __shared__ __align__(16) __half tile[kZThreads * 8];  // [b][rows]
  const int tpr = b / 8, rows = kZThreads / tpr;
  const int64_t m = blockIdx.x;
  const int r0 = blockIdx.y * rows;
  const int t = threadIdx.x, lr = t / tpr, c = t % tpr, i = r0 + lr;
  float r[8];
  chunk_times_b(x, u, m, a, b, i, c, walsh_b, r);
#pragma unroll
  for (int k = 0; k < 8; ++k) tile[(c * 8 + k) * rows + lr] = __float2half_rn(r[k] * scale);
  __syncthreads();
  // rows / 2 half2 per row of the tile: row j of the tile is Z[m * b + j][r0 .. r0 + rows)
  const int pairs = rows / 2;
  for (int e = t; e < b * pairs; e += kZThreads) {
    const int j = e / pairs, p = e % pairs, col = r0 + 2 * p;
    if (col < a8)  // a8 and r0 are even: the pair lies inside or outside together
      *reinterpret_cast<__half2*>(z + (m * b + j) * a8 + col) = reinterpret_cast<const __half2*>(tile + j * rows)[p];
  }
}

// The dense-factor path, step 3: D [M * b, a8] holds each token's rotated row transposed (D[m * b + j][i] = Y_m[i][j]);
// quantize token m (one block) into q[m][i * b + j]. Shared memory: the token's b * a8 values.
constexpr int kDThreads = 512;

template <bool ASYM>
__global__ void __launch_bounds__(kDThreads) quantize_from_d_kernel(const __half* __restrict__ d,
                                                                    int8_t* __restrict__ q,
                                                                    float* __restrict__ amax_out,
                                                                    float* __restrict__ zero_out, int a, int a8,
                                                                    int b) {
  extern __shared__ __align__(16) unsigned char d_smem[];
  __half* ds = reinterpret_cast<__half*>(d_smem);
  __shared__ float red[2 * kDThreads / 32];
  __shared__ RowScale<ASYM> inv_s;
  const int64_t m = blockIdx.x;
  const int n = b * a8, K = a * b;  // n % 8 == 0
  const uint4* src = reinterpret_cast<const uint4*>(d + m * n);
  float mx = 0.f, nlo = 0.f;  // the padding columns are zero
  for (int e = threadIdx.x; e < n / 8; e += kDThreads) {
    const uint4 v = __ldg(src + e);
    reinterpret_cast<uint4*>(ds)[e] = v;
    see_chunk<ASYM>(v, mx, nlo);
  }
  // (its barriers also publish ds)
  block_scale<ASYM, kDThreads / 32>(mx, nlo, red, &inv_s, amax_out + m, ASYM ? zero_out + m : nullptr);
  const RowScale<ASYM> inv = inv_s;
  int8_t* qr = q + m * K;
  for (int e = threadIdx.x * 4; e < K; e += kDThreads * 4) {  // b % 8 == 0: 4 codes of one i
    const int i = e / b, j = e % b;
    char4 cc;
    cc.x = code_of(ds[(j + 0) * a8 + i], inv);
    cc.y = code_of(ds[(j + 1) * a8 + i], inv);
    cc.z = code_of(ds[(j + 2) * a8 + i], inv);
    cc.w = code_of(ds[(j + 3) * a8 + i], inv);
    *reinterpret_cast<char4*>(qr + e) = cc;
  }
}

// The dense-factor path in one kernel, for a factor small enough to stay in shared memory (a16 <= 192, b = B): a
// persistent block per multiprocessor holds A^T, and its warps, in GROUPS groups, take whole tokens in turn (a group
// its own tokens, buffers and barriers, so that one group's transform runs while the other's product does). For each
// token, its row of X (and of U for SwiGLU) comes into shared memory by cp.async while the group works on the token
// before; Z = fp16(X B * scale) (B Walsh, chunk_times_b's steps, or the identity) is written in X's own order,
// [a16, B] (the padding rows zero); Y = A^T Z by mma.sync m16n8k16 (fp32 sums; warps_m x warps_n warps over
// [a16, B], ldmatrix from padded rows, so no bank conflicts), rounded to fp16 in registers; the token's amax by one
// reduction over the group; its codes through shared memory to q in coalesced 16-byte stores. The same arithmetic
// as the three kernels above (to the summation order of the fp32 products), without Z or D in global memory.
constexpr int kFusedWarpsM = 4;
constexpr int kFusedMaxTilesM = 3;  // m-tiles of 16 rows per warp: a16 <= 16 * kFusedWarpsM * kFusedMaxTilesM
constexpr size_t kFusedMaxSmem = 224 * 1024;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x16, row-major fragment) * b (16x8, column fragment); fp16 in, fp32 sums
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

struct FusedLayout {  // the fused kernel's shared memory, in bytes from its start
  int lda, ldz;       // row strides of A^T and Z in halves (8 more than the rows: ldmatrix without bank conflicts)
  int nbuf;           // tokens' rows in shared memory per group: the one worked on and the next (2), or one (1)
  size_t z;           // the first group's part (A^T before it); in a group's part: Z at 0, then codes, then raw
  size_t codes, raw, raw_bytes, group_bytes, total;
};

// Two groups with SwiGLU's second input hold one token's rows each (the next one's are fetched once the transform
// has read them): two buffers each would not fit.
__host__ __device__ inline FusedLayout fused_layout(int a, int b, bool glu, int groups = 1) {
  FusedLayout L;
  const int a16 = (a + 15) / 16 * 16;
  const size_t K = size_t(a) * b;
  L.lda = a16 + 8;
  L.ldz = b + 8;
  L.nbuf = groups > 1 && glu ? 1 : 2;
  L.z = size_t(a16) * L.lda * 2;
  L.codes = size_t(a16) * L.ldz * 2;
  L.raw = L.codes + (K + 15) / 16 * 16;
  L.raw_bytes = K * 2 * (glu ? 2 : 1);  // one token's X (and U)
  L.group_bytes = L.raw + L.nbuf * L.raw_bytes;
  L.total = L.z + groups * L.group_bytes;
  return L;
}

__device__ __forceinline__ void cp_async_chunks(void* dst, const void* src, int chunks, int tid, int threads) {
  for (int e = tid; e < chunks; e += threads)
    cp_async16(static_cast<char*>(dst) + 16 * size_t(e), static_cast<const char*>(src) + 16 * size_t(e));
}

// A barrier of the THREADS threads of group g (named barrier 1 + g; 0 is __syncthreads'), or of the block.
template <int GROUPS, int THREADS>
__device__ __forceinline__ void group_sync(int g) {
  if constexpr (GROUPS == 1) {
    __syncthreads();
  } else {
    asm volatile("bar.sync %0, %1;\n" ::"r"(1 + g), "r"(THREADS) : "memory");
  }
}

// ASYM: the asymmetric codes (quant_row.cuh: AsymScale), each token's s to amax_out and z to zero_out.
template <int B, int WARPS, int GROUPS, bool ASYM>
__global__ void __launch_bounds__(WARPS * 32, 1) rotate_dense_fused_kernel(const __half* __restrict__ x,
                                                                            const __half* __restrict__ u,
                                                                            const __half* __restrict__ at,
                                                                            int8_t* __restrict__ q,
                                                                            float* __restrict__ amax_out,
                                                                            float* __restrict__ zero_out, int64_t M,
                                                                            int a, bool walsh_b, float scale) {
  constexpr int GW = WARPS / GROUPS, GT = GW * 32, WN = GW / kFusedWarpsM, NT = B / (8 * WN), TPR = B / 8;
  static_assert(WARPS % GROUPS == 0 && GW % kFusedWarpsM == 0 && NT >= 2 && NT % 2 == 0 && 32 % TPR == 0,
                "fused rotation layout");
  extern __shared__ __align__(128) unsigned char fused_smem[];
  constexpr int SLOTS = ASYM ? 2 : 1;  // reduction slots per warp (ASYM: the largest value and the largest negated)
  __shared__ float red[SLOTS * WARPS];
  const FusedLayout L = fused_layout(a, B, u != nullptr, GROUPS);
  const int a16 = (a + 15) / 16 * 16, K = a * B, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = warp / GW, gwarp = warp % GW, gtid = tid % GT;
  __half* as = reinterpret_cast<__half*>(fused_smem);
  unsigned char* part = fused_smem + L.z + grp * L.group_bytes;
  __half* zs = reinterpret_cast<__half*>(part);
  int8_t* cs = reinterpret_cast<int8_t*>(part + L.codes);
  float* gred = red + grp * SLOTS * GW;
  auto raw = [&](int buf) { return reinterpret_cast<__half*>(part + L.raw + buf * L.raw_bytes); };
  auto fetch = [&](int64_t m, int buf) {  // the group copies token m's rows to raw(buf): a cp.async group
    if (m < M) {
      cp_async_chunks(raw(buf), x + m * K, K / 8, gtid, GT);
      if (u) cp_async_chunks(raw(buf) + K, u + m * K, K / 8, gtid, GT);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  const int64_t stride = int64_t(gridDim.x) * GROUPS;
  int64_t m = int64_t(blockIdx.x) * GROUPS + grp;  // (a group past M skips the loop; no thread returns early)
  for (int e = tid; e < a16 * (a16 / 8); e += WARPS * 32) {  // A^T, row by row into the padded layout
    const int r = e / (a16 / 8), c = e % (a16 / 8);
    cp_async16(as + r * L.lda + 8 * c, at + r * a16 + 8 * c);
  }
  for (int e = gtid; e < (a16 - a) * (B / 8); e += GT)  // Z's padding rows: zero for good
    *reinterpret_cast<uint4*>(zs + (a + e / (B / 8)) * L.ldz + 8 * (e % (B / 8))) = make_uint4(0, 0, 0, 0);
  fetch(m, 0);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();  // A^T, the padding rows and each group's first token in place
  const int wm = gwarp % kFusedWarpsM, wn = gwarp / kFusedWarpsM, tiles_m = a16 / 16;
  const int g = lane >> 2, t4 = lane & 3;
  for (int it = 0; m < M; m += stride, ++it) {
    const int buf = L.nbuf == 2 ? it & 1 : 0;
    if (L.nbuf == 2) {
      fetch(m + stride, buf ^ 1);
      asm volatile("cp.async.wait_group 1;\n" ::);  // this token's rows have landed
    }
    group_sync<GROUPS, GT>(grp);
    const __half* rx = raw(buf);
    for (int base = 0; base < a * TPR; base += GT) {  // (group-uniform: walsh_chunk's shuffles take every lane)
      const int task = base + gtid, i = task / TPR, c = task % TPR;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (i < a) {
        v = reinterpret_cast<const uint4*>(rx)[task];
        if (u) v = glu_chunk(v, reinterpret_cast<const uint4*>(rx + K)[task]);
      }
      float r[8];
      loaded_chunk_times_b(v, c, TPR, walsh_b, r);
      if (i < a) {
        __half2 o[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = __floats2half2_rn(r[2 * k] * scale, r[2 * k + 1] * scale);
        *reinterpret_cast<uint4*>(zs + i * L.ldz + 8 * c) = *reinterpret_cast<const uint4*>(o);
      }
    }
    group_sync<GROUPS, GT>(grp);
    if (L.nbuf == 1) fetch(m + stride, 0);  // the rows were read: the next token's come in during the product
    float acc[kFusedMaxTilesM][NT][4];
#pragma unroll
    for (int mi = 0; mi < kFusedMaxTilesM; ++mi)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[mi][nt][k] = 0.f;
    const int col0 = wn * (B / WN);
    for (int ks = 0; ks < a16; ks += 16) {  // every fragment of the step loaded before its products
      unsigned bf[NT][2], af[kFusedMaxTilesM][4];
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        unsigned r4[4];
        ldmatrix_x4_trans(r4, zs + (ks + (lane & 15)) * L.ldz + col0 + 16 * p + (lane >> 4) * 8);
        bf[2 * p][0] = r4[0];
        bf[2 * p][1] = r4[1];
        bf[2 * p + 1][0] = r4[2];
        bf[2 * p + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < kFusedMaxTilesM; ++mi)
        if (wm + mi * kFusedWarpsM < tiles_m)  // warp-uniform
          ldmatrix_x4(af[mi], as + ((wm + mi * kFusedWarpsM) * 16 + (lane & 15)) * L.lda + ks + (lane >> 4) * 8);
#pragma unroll
      for (int mi = 0; mi < kFusedMaxTilesM; ++mi)
        if (wm + mi * kFusedWarpsM < tiles_m)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816(acc[mi][nt], af[mi], bf[nt]);
    }
    // fp16 Y (A^T's padding rows are zero, so are those rows of Y), the token's amax (or range), its codes
    __half2 h[kFusedMaxTilesM][NT][2];
    float mx = 0.f, nlo = 0.f;
#pragma unroll
    for (int mi = 0; mi < kFusedMaxTilesM; ++mi)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        h[mi][nt][0] = __floats2half2_rn(acc[mi][nt][0], acc[mi][nt][1]);
        h[mi][nt][1] = __floats2half2_rn(acc[mi][nt][2], acc[mi][nt][3]);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const float2 f = __half22float2(h[mi][nt][k]);
          see_value<ASYM>(f.x, mx, nlo);
          see_value<ASYM>(f.y, mx, nlo);
        }
      }
    // the group's max (two with ASYM): one barrier (the slots are read before the group's next barrier)
    mx = warp_max(mx);
    if constexpr (ASYM) nlo = warp_max(nlo);
    if (lane == 0) {
      gred[gwarp] = mx;
      if constexpr (ASYM) gred[GW + gwarp] = nlo;
    }
    group_sync<GROUPS, GT>(grp);
#pragma unroll
    for (int w = 0; w < GW; ++w) {
      mx = fmaxf(mx, gred[w]);
      if constexpr (ASYM) nlo = fmaxf(nlo, gred[GW + w]);
    }
    RowScale<ASYM> inv;
    if constexpr (ASYM) {
      float sv, zv;
      inv = asym_row_scale(mx, nlo, &sv, &zv);
      if (gtid == 0) {
        amax_out[m] = sv;
        zero_out[m] = zv;
      }
    } else {
      float amax;
      row_scale(mx, &inv, &amax);
      if (gtid == 0) amax_out[m] = amax;
    }
#pragma unroll
    for (int mi = 0; mi < kFusedMaxTilesM; ++mi) {
      const int row = (wm + mi * kFusedWarpsM) * 16 + g;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int k = 0; k < 2; ++k)
          if (row + 8 * k < a) {
            char2 cc;
            cc.x = code_of(__low2half(h[mi][nt][k]), inv);
            cc.y = code_of(__high2half(h[mi][nt][k]), inv);
            *reinterpret_cast<char2*>(cs + (row + 8 * k) * B + col0 + nt * 8 + 2 * t4) = cc;
          }
    }
    group_sync<GROUPS, GT>(grp);
    int8_t* qr = q + m * K;
    for (int e = gtid; e < K / 16; e += GT)
      reinterpret_cast<uint4*>(qr)[e] = reinterpret_cast<const uint4*>(cs)[e];
    if (L.nbuf == 1) asm volatile("cp.async.wait_group 0;\n" ::);  // the next token's rows, before the barrier
  }
  asm volatile("cp.async.wait_group 0;\n" ::);  // (the last, empty groups)
}

// The dense-factor path at small M, step 1 of 2 (the one-launch GEMV quantizes its output): block (rt, m) computes
// rows [16 rt, 16 rt + 16) of token m's rotated row Y = A^T (X B), fp16, in the row's own order. Each block starts
// copying A^T's 16-row panel into shared memory (cp.async), transforms the whole of X_m meanwhile (b / 8 threads per
// row, as rows_to_z_kernel) into shared memory [a16, b] fp16, then its warps take (16-column tile of B, part of the
// sum over i) pairs: WMMA products from shared memory (fp32 sums), the parts added at the end.
constexpr int kRowsThreads = 128;
constexpr int kRowsWarps = kRowsThreads / 32;

// The parts the sum over i is cut into so that every warp has a tile: b / 16 column tiles, kRowsWarps warps.
__host__ __device__ constexpr int rows_k_parts(int b) { return b / 16 >= kRowsWarps ? 1 : kRowsWarps / (b / 16); }

__global__ void __launch_bounds__(kRowsThreads) rotate_dense_rows_kernel(const __half* __restrict__ x,
                                                                         const __half* __restrict__ u,
                                                                         const __half* __restrict__ at,
                                                                         __half* __restrict__ y, int a, int a16,
                                                                         int b, bool walsh_b, float scale) {
  extern __shared__ __align__(128) unsigned char rows_smem[];
  __half* zs = reinterpret_cast<__half*>(rows_smem);                           // [a16, b]
  __half* ps = zs + size_t(a16) * b;                                           // [16, a16]: A^T's panel
  float* os = reinterpret_cast<float*>(ps + size_t(16) * a16);                 // [parts][16, b]
  const int64_t m = blockIdx.y;
  const int rt = blockIdx.x, tpr = b / 8;
  const __half* panel = at + static_cast<int64_t>(rt) * 16 * a16;  // 16 contiguous rows of a16
  for (int e = threadIdx.x; e < 2 * a16; e += kRowsThreads) cp_async16(ps + 8 * e, panel + 8 * e);
  asm volatile("cp.async.commit_group;\n" ::);
  // a16 * tpr is a multiple of 32 (a16 % 16 == 0, tpr >= 2): a row's lanes are in one warp, every warp whole
  for (int task = threadIdx.x; task < a16 * tpr; task += kRowsThreads) {
    const int i = task / tpr, c = task % tpr;
    float r[8];
    chunk_times_b(x, u, m, a, b, i, c, walsh_b, r);
    __half2 o[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = __floats2half2_rn(r[2 * k] * scale, r[2 * k + 1] * scale);
    *reinterpret_cast<uint4*>(zs + i * b + 8 * c) = *reinterpret_cast<const uint4*>(o);
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  const int warp = threadIdx.x >> 5, parts = rows_k_parts(b), steps = a16 / 16;
  for (int task = warp; task < (b / 16) * parts; task += kRowsWarps) {
    const int ct = task % (b / 16), part = task / (b / 16);
    FragC acc;
    wmma::fill_fragment(acc, 0.f);
    for (int s = part * steps / parts; s < (part + 1) * steps / parts; ++s) {
      FragA fa;
      FragB fb;
      wmma::load_matrix_sync(fa, ps + 16 * s, a16);
      wmma::load_matrix_sync(fb, zs + 16 * s * b + ct * 16, b);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(os + part * 16 * b + ct * 16, acc, b, wmma::mem_row_major);
  }
  __syncthreads();
  const int rows = min(16, a - rt * 16);  // the padding rows of A^T are not written
  __half* yr = y + m * int64_t(a) * b + int64_t(rt) * 16 * b;
  for (int e = threadIdx.x * 2; e < rows * b; e += kRowsThreads * 2) {
    float v0 = 0.f, v1 = 0.f;
    for (int p = 0; p < parts; ++p) {
      v0 += os[p * 16 * b + e];
      v1 += os[p * 16 * b + e + 1];
    }
    *reinterpret_cast<__half2*>(yr + e) = __floats2half2_rn(v0, v1);
  }
}

// rotate_dense_rows_kernel's shared memory: X B [a16, b] and A^T's panel [16, a16] in fp16, the parts [16, b] fp32.
size_t rotate_dense_rows_smem(int64_t a16, int64_t b) {
  return static_cast<size_t>(a16 * b * 2 + 16 * a16 * 2 + rows_k_parts(static_cast<int>(b)) * 16 * b * 4);
}

float inv_sqrt(int64_t n) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(n))); }  // a Walsh scale

int log2_of(int64_t n) {
  int r = 0;
  while ((int64_t{1} << r) < n) ++r;
  return r;
}

}  // namespace

WalshSpec walsh_spec(int64_t K, int64_t b, bool walsh_a, bool walsh_b) {
  WalshSpec s;
  if (b <= 0 || K % b != 0 || !is_pow2(K) || !is_pow2(b) || K < 512 || K > 16384 || !(walsh_a || walsh_b)) return s;
  const int nb = log2_of(b), n = log2_of(K);
  s.lo = walsh_b ? 0 : nb;
  s.hi = walsh_a ? n : nb;
  s.scale = inv_sqrt(int64_t{1} << (s.hi - s.lo));
  s.n = n;
  return s;
}

cudaError_t launch_walsh_quantize_rows(const __half* x, const WalshSpec& spec, int8_t* q, float* amax, int64_t M,
                                       int sm_count, cudaStream_t stream, float* zero) {
  if (M <= 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  return zero ? launch_walsh_by_n<true>(x, spec, q, amax, zero, M, sm_count, stream)
              : launch_walsh_by_n<false>(x, spec, q, amax, zero, M, sm_count, stream);
}

bool rotate_dense_supported(int64_t K, int64_t b, bool walsh_b) {
  if (b < 8 || b > 256 || K % b != 0 || (walsh_b && !is_pow2(b)) || (!walsh_b && b % 8 != 0)) return false;
  const int64_t a8 = round_up_to(K / b, 8);
  // one token's D in the quantizing block's shared memory; 2048 / b rows per block of step 1 (b divides 2048)
  return 2048 % b == 0 && b * a8 * 2 <= static_cast<int64_t>(kRotateMaxSmem) && a8 >= 16;
}

namespace {
size_t dense_z_bytes(int64_t M, int64_t K, int64_t b) {
  const int64_t a8 = round_up_to(K / b, 8);
  return (static_cast<size_t>(M * b * a8) * 2 + 255) / 256 * 256;
}
}  // namespace

size_t rotate_dense_scratch(int64_t M, int64_t K, int64_t b) {
  const int64_t a8 = round_up_to(K / b, 8);
  return 2 * dense_z_bytes(M, K, b) + f16_gemm_sm90_workspace(M * b, a8, a8);
}

namespace {
template <int B, int WARPS, int GROUPS, bool ASYM>
cudaError_t launch_fused_t(const __half* x, const __half* u, const __half* at, int8_t* q, float* amax, float* zero,
                           int64_t M, int a, bool walsh_b, cudaStream_t stream) {
  constexpr auto kernel = rotate_dense_fused_kernel<B, WARPS, GROUPS, ASYM>;
  if (const cudaError_t oe = opt_in_smem<kernel>(kFusedMaxSmem); oe != cudaSuccess) return oe;
  const int sm_count = std::max(1, sm_count_of_current_device());
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((M + GROUPS - 1) / GROUPS, sm_count));
  kernel<<<blocks, WARPS * 32, fused_layout(a, B, u != nullptr, GROUPS).total, stream>>>(
      x, u, at, q, amax, zero, M, a, walsh_b, walsh_b ? inv_sqrt(B) : 1.f);
  return cudaGetLastError();
}

// The one kernel's configuration by b and the rule (launch_rotate_dense_quantize: two groups, or 8 warps).
template <bool ASYM>
cudaError_t launch_fused_by_b(const __half* x, const __half* u, const __half* at, int8_t* q, float* amax, float* zero,
                              int64_t M, int a, int64_t b, bool walsh_b, bool two, bool narrow, cudaStream_t stream) {
  switch (b) {
    case 32: return two ? launch_fused_t<32, 16, 2, ASYM>(x, u, at, q, amax, zero, M, a, walsh_b, stream)
                        : launch_fused_t<32, 8, 1, ASYM>(x, u, at, q, amax, zero, M, a, walsh_b, stream);
    case 64: return two      ? launch_fused_t<64, 16, 2, ASYM>(x, u, at, q, amax, zero, M, a, walsh_b, stream)
                    : narrow ? launch_fused_t<64, 8, 1, ASYM>(x, u, at, q, amax, zero, M, a, walsh_b, stream)
                             : launch_fused_t<64, 16, 1, ASYM>(x, u, at, q, amax, zero, M, a, walsh_b, stream);
    default: return narrow ? launch_fused_t<128, 8, 1, ASYM>(x, u, at, q, amax, zero, M, a, walsh_b, stream)
                           : launch_fused_t<128, 16, 1, ASYM>(x, u, at, q, amax, zero, M, a, walsh_b, stream);
  }
}

// Two groups of 8 warps on alternate tokens: b = 32 or 64 (at 128 a group's sums would not fit in its registers),
// where both groups' buffers fit beside A^T.
bool fused_two_groups_fit(int a, int b, bool glu) {
  return (b == 32 || b == 64) && fused_layout(a, b, glu, 2).total <= kFusedMaxSmem;
}
}  // namespace

bool rotate_dense_fused_supported(int64_t K, int64_t b, bool walsh_b, bool glu) {
  if ((b != 32 && b != 64 && b != 128) || !rotate_dense_supported(K, b, walsh_b)) return false;  // (K % b there)
  const int64_t a = K / b;
  return round_up_to(a, 16) <= 16 * kFusedWarpsM * kFusedMaxTilesM &&
         fused_layout(static_cast<int>(a), static_cast<int>(b), glu).total <= kFusedMaxSmem;
}

cudaError_t launch_rotate_dense_quantize(const __half* x, const __half* at, bool walsh_b, int8_t* q, float* amax,
                                         int64_t M, int64_t K, int64_t b, void* scratch, cudaStream_t stream,
                                         const __half* u, int fused, float* zero) {
  if (M <= 0) return cudaSuccess;
  if (!rotate_dense_supported(K, b, walsh_b) || !at ||
      (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(u) | reinterpret_cast<uintptr_t>(at)) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(q) % 4 != 0 || M > 0x7fffffff)
    return cudaErrorInvalidValue;
  const int a = static_cast<int>(K / b);
  if (fused && rotate_dense_fused_supported(K, b, walsh_b, u != nullptr)) {
    if (reinterpret_cast<uintptr_t>(q) % 16 != 0) return cudaErrorInvalidValue;
    // `fused` as kernels.h says; the rule's two groups only where every block has a token for each group (M >= 2
    // blocks per multiprocessor): below that a token's 16 warps finish it sooner (docs/benchmarks.md g15)
    const int64_t two_from = 2 * int64_t(std::max(1, sm_count_of_current_device()));
    const bool two = fused_two_groups_fit(a, static_cast<int>(b), u != nullptr) &&
                     (fused == 4 || (fused == 1 && b == 64 && M >= two_from));
    const bool narrow = fused == 2;
    return zero ? launch_fused_by_b<true>(x, u, at, q, amax, zero, M, a, b, walsh_b, two, narrow, stream)
                : launch_fused_by_b<false>(x, u, at, q, amax, zero, M, a, b, walsh_b, two, narrow, stream);
  }
  if (!scratch) return cudaErrorInvalidValue;
  const int a8 = static_cast<int>(round_up_to(a, 8)), a16 = static_cast<int>(round_up_to(a, 16));
  const int rows = 2048 / static_cast<int>(b);
  auto* z = static_cast<__half*>(scratch);
  auto* d = reinterpret_cast<__half*>(static_cast<char*>(scratch) + dense_z_bytes(M, K, b));
  void* ws = static_cast<char*>(scratch) + 2 * dense_z_bytes(M, K, b);
  const float scale = walsh_b ? inv_sqrt(b) : 1.f;
  rows_to_z_kernel<<<dim3(static_cast<unsigned>(M), (a8 + rows - 1) / rows), kZThreads, 0, stream>>>(
      x, u, z, a, a8, static_cast<int>(b), walsh_b, scale);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  e = launch_f16_gemm_sm90(z, at, a16, d, M * b, a8, a8, ws, stream);
  if (e != cudaSuccess) return e;
  const size_t smem = static_cast<size_t>(b) * a8 * 2;
  const auto from_d = zero ? quantize_from_d_kernel<true> : quantize_from_d_kernel<false>;
  if (const cudaError_t oe = zero ? opt_in_smem<quantize_from_d_kernel<true>>(kRotateMaxSmem)
                                  : opt_in_smem<quantize_from_d_kernel<false>>(kRotateMaxSmem);
      oe != cudaSuccess)
    return oe;
  from_d<<<static_cast<unsigned>(M), kDThreads, smem, stream>>>(d, q, amax, zero, a, a8, static_cast<int>(b));
  return cudaGetLastError();
}

bool rotate_dense_rows_supported(int64_t K, int64_t b, bool walsh_b) {
  if (b < 16 || b > 256 || b % 16 != 0 || K % b != 0 || (walsh_b && !is_pow2(b))) return false;
  return rotate_dense_rows_smem(round_up_to(K / b, 16), b) <= kRotateMaxSmem;
}

cudaError_t launch_rotate_dense_rows(const __half* x, const __half* at, bool walsh_b, __half* y, int64_t M, int64_t K,
                                     int64_t b, cudaStream_t stream, const __half* u) {
  if (M <= 0) return cudaSuccess;
  if (!rotate_dense_rows_supported(K, b, walsh_b) || !at || M > 65535 ||
      (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(u)) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(at) % 32 != 0 || reinterpret_cast<uintptr_t>(y) % 4 != 0)
    return cudaErrorInvalidValue;
  const int a = static_cast<int>(K / b), a16 = static_cast<int>(round_up_to(a, 16));
  const size_t smem = rotate_dense_rows_smem(a16, b);
  if (const cudaError_t oe = opt_in_smem<rotate_dense_rows_kernel>(kRotateMaxSmem); oe != cudaSuccess) return oe;
  const float scale = walsh_b ? inv_sqrt(b) : 1.f;
  rotate_dense_rows_kernel<<<dim3(a16 / 16, static_cast<unsigned>(M)), kRowsThreads, smem, stream>>>(
      x, u, at, y, a, a16, static_cast<int>(b), walsh_b, scale);
  return cudaGetLastError();
}

size_t rotate_quantize_smem(int64_t K, int64_t b) {
  if (b <= 0 || K % b != 0) return 0;
  const int64_t a16 = round_up_to(K / b, 16), b16 = round_up_to(b, 16);
  return static_cast<size_t>(a16 * b16 * 6);
}

bool rotate_quantize_supported(int64_t K, int64_t b) {
  return b > 0 && b % 8 == 0 && K % b == 0 && rotate_quantize_smem(K, b) <= kRotateMaxSmem;
}

cudaError_t launch_rotate_quantize_rows(const __half* x, const __half* at, const __half* bm, int walsh, int8_t* q,
                                        float* amax, int64_t M, int64_t K, int64_t b, int sm_count,
                                        cudaStream_t stream, float* zero) {
  if (M <= 0) return cudaSuccess;
  if (!rotate_quantize_supported(K, b) || walsh < 0 || walsh > 3 || ((walsh & 1) && (bm || !is_pow2(b))) ||
      ((walsh & 2) && (at || !is_pow2(K / b))) || (!walsh && !at && !bm) || reinterpret_cast<uintptr_t>(x) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(q) % 4 != 0 || reinterpret_cast<uintptr_t>(at) % 32 != 0 ||
      reinterpret_cast<uintptr_t>(bm) % 32 != 0)
    return cudaErrorInvalidValue;
  const size_t smem = rotate_quantize_smem(K, b);
  const auto kernel = zero ? rotate_quantize_kernel<true> : rotate_quantize_kernel<false>;
  if (const cudaError_t oe = zero ? opt_in_smem<rotate_quantize_kernel<true>>(kRotateMaxSmem)
                                  : opt_in_smem<rotate_quantize_kernel<false>>(kRotateMaxSmem);
      oe != cudaSuccess)
    return oe;
  int per_sm = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kRotThreads, smem);
  const int64_t blocks = std::min<int64_t>(M, static_cast<int64_t>(std::max(1, sm_count)) * std::max(1, per_sm));
  kernel<<<static_cast<unsigned>(blocks), kRotThreads, smem, stream>>>(x, at, bm, walsh, q, amax, zero, M,
                                                                       static_cast<int>(K / b), static_cast<int>(b));
  return cudaGetLastError();
}

}  // namespace onnxqf
