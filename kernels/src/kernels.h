// onnxqf CUDA kernels: launch functions shared by the ONNX Runtime op (ops.cc) and the kernel sources.
//
// Conventions (the W8A8 linear, see kernels/README.md):
//   x      fp16 [M, K] row-major (the op's leading dims flattened)
//   w      int8 [N, K] row-major ("TN": the transpose of ONNX MatMul's [K, N] weight)
//   wscale fp32 [N]   the weight's per-channel scale already divided by 127
//   bias   fp16 [N]   optional (nullptr)
//   amax[m] = max(max_k |x[m,k]|, 2^-9)                        (fp16 arithmetic, exact; 127/amax finite)
//   inv[m]  = fp16(127 / amax[m])                               (__hdiv, as ONNX Runtime's fp16 Div)
//   q[m,k]  = rint(fp16(x[m,k] * inv[m]))  in [-127, 127]       (__hmul then round half to even)
//   acc     = sum_k q[m,k] * w[n,k]                             (int32, exact)
//   y[m,n]  = fp16( fma( fp32(acc) * fp32(amax[m]), wscale[n], fp32(bias[n]) ) )
// which is bit-for-bit onnxqf's standard-op int8-token graph when there is no bias.
// With the asymmetric codes (the op's asymmetric = 1; quant_row.cuh: AsymScale, int8-token-asym's arithmetic) the
// row's step s goes where amax goes, z[m] (its zero point - 128) beside it, wscale is the weight's per-channel step
// (not divided by 127), colsum[n] = sum_k w[n,k] (fp32) and
//   y[m,n]  = fp16( fma( (fp32(acc[m,n]) - z[m] * colsum[n]) * s[m], wscale[n], fp32(bias[n]) ) )
// each fp32 step rounded on its own (no contraction but the bias's fma): bit-for-bit int8-token-asym's graph when
// there is no bias.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace onnxqf {

// The op's skip_norm: ONNX Runtime's SkipSimplifiedLayerNormalization in front of the quantization. Per row
// s = x + skip (fp16 add, as that node), written to sum (when not null: the residual stream the next norm adds to);
// the row quantized is y = fp16(gamma * fp16(s * r)), r = fp16(1 / sqrt(mean(s^2) + eps)) (the mean in fp32).
// skip null: no norm. Rows 16-byte aligned, K % 8 == 0.
struct NormSpec {
  const __half* skip = nullptr;
  const __half* gamma = nullptr;
  __half* sum = nullptr;
  float eps = 0.f;
};

// Per-token quantization: q [M, K] int8, amax [M] fp32 (the floored fp16 amax, widened). u: null, or the rows are
// SwiGLU's products silu(x) * u, computed on the way in (quant_row.cuh: glu_one). norm: null, or each row is first
// normalized (NormSpec; not with u). regs (the default): rows of K <= 32768 (aligned) by a block holding the row in
// registers; false (ONNXQF_QUANT_REGS=0), or longer rows: a block of 256 threads per row, a norm's row in shared memory.
// pipe_blocks > 0 (with regs, where M > 2 * pipe_blocks and K <= 16384): a grid of that many blocks striding over
// the rows, each loading its next row while it finishes the current one (ONNXQF_QUANT_PIPE; default 0: a block per
// row, which measured faster on an H100, docs/benchmarks.md g18).
// zero: null, or the asymmetric codes (amax then holds each row's step s, zero its z).
cudaError_t launch_quantize_rows(const __half* x, int8_t* q, float* amax, int64_t M, int64_t K, cudaStream_t stream,
                                 const __half* u = nullptr, const NormSpec* norm = nullptr, bool regs = true,
                                 int pipe_blocks = 0, float* zero = nullptr);

// y = silu(g) * u elementwise, n values, in the standard graph's fp16 steps (quant_row.cuh: glu_one).
cudaError_t launch_glu(const __half* g, const __half* u, __half* y, int64_t n, cudaStream_t stream);

// y = dequant(q @ w^T) for small M: reads w once per 16 rows of M (any M; fast when M <= 16).
// Requires K % 16 == 0 (else use launch_w8a8_naive). zero, colsum: null, or the asymmetric codes' (both given).
cudaError_t launch_w8a8_gemv(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                             const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream,
                             const float* zero = nullptr, const float* colsum = nullptr);

// A rotation x @ kron(A, B) whose factors are each H_n / sqrt(n) (Sylvester's Walsh-Hadamard) or the identity, K =
// a b a power of two: the Walsh-Hadamard transform over the bits [lo, hi) of the element index (B's bits are the
// low log2 b, A's the high log2 a), times scale. n = 0: not such a rotation (or too small: K < 512, or K > 16384).
struct WalshSpec {
  int n = 0, lo = 0, hi = 0;
  float scale = 1.f;
};
WalshSpec walsh_spec(int64_t K, int64_t b, bool walsh_a, bool walsh_b);

// The op's outputs: the N output channels cut into `count` consecutive parts (the q/k/v or gate/up of one linear
// group), part i the columns [end[i-1], end[i]) (end[-1] = 0) written as its own tensor y[i] [M, end[i] - end[i-1]].
constexpr int kMaxOutputs = 4;
struct OutSplit {
  __half* y[kMaxOutputs] = {};
  int64_t end[kMaxOutputs] = {};
  int count = 0;
};
inline OutSplit one_output(__half* y, int64_t N) {
  OutSplit o;
  o.y[0] = y;
  o.end[0] = N;
  o.count = 1;
  return o;
}

// Small M (<= kFusedMaxM) in one launch: quantization of x into shared memory + GEMV; with a WalshSpec (n > 0;
// K <= 4096) each row is rotated first. Check support first. N = out.end[out.count - 1].
constexpr int kFusedMaxM = 4;
// norm: with a skip_norm (NormSpec), whose normalized row also takes shared memory (2 K bytes).
bool w8a8_fused_gemv_supported(const __half* x, const int8_t* w, int64_t M, int64_t K, const WalshSpec* rot = nullptr,
                               bool norm = false);
struct GemvOptions {
  // M = 1: -1 = by shape (the default: 1 x 8 for N >= 8192, else 0), 0 = 2 outputs per warp x 4
  // chunks in flight, 1 = 1 x 8, 2 = 2 x 8, 3 = 4 x 4, 4 = 4 x 2, 5 = 1 x 16 (ONNXQF_GEMV_CONFIG, A/B runs)
  int config = -1;
  // > 0: the grid holds at most the blocks this many multiprocessors run at once, each warp striding over the
  // outputs (each block's quantization of x paid once); 0: one warp per group of outputs (ONNXQF_GEMV_PERSIST=0)
  int sm_count = 0;
  // launched as a programmatic dependent launch (ONNXQF_PDL=1): loads weights while the stream's previous kernel
  // ends (docs/benchmarks.md g7 has what it measured; CUPTI's kernel times count a dependent's wait)
  bool pdl = false;
};
// u (16-byte aligned, no rotation): the rows are SwiGLU's silu(x) * u, as in launch_quantize_rows. norm (no
// rotation, no u): each row normalized first (NormSpec), in shared memory; block 0 writes the sums. colsum: the
// asymmetric codes, colsum the weights' per-channel sums (and wscale their steps).
cudaError_t launch_w8a8_fused_gemv(const __half* x, const int8_t* w, const float* wscale, const __half* bias,
                                   const OutSplit& out, int64_t M, int64_t K, cudaStream_t stream,
                                   const WalshSpec* rot = nullptr, const GemvOptions& opt = GemvOptions{},
                                   const __half* u = nullptr, const NormSpec* norm = nullptr,
                                   const float* colsum = nullptr);

// Rotation by Walsh-Hadamard factors (a WalshSpec with n > 0) fused into the per-token quantization, any M: one
// block of K / 16 threads per row at a time, 16 values per thread in registers (kernels/src/walsh_row.cuh).
// zero (here and in the rotations below): null, or the asymmetric codes (as launch_quantize_rows's).
cudaError_t launch_walsh_quantize_rows(const __half* x, const WalshSpec& spec, int8_t* q, float* amax, int64_t M,
                                       int sm_count, cudaStream_t stream, float* zero = nullptr);

// Rotation with a dense outer factor A (at: A^T zero-padded to [a16, a16]) and B Walsh-Hadamard (b a power of two,
// 8 <= b <= 256) or the identity, as a GEMM over all rows: each row's X B is written transposed, Z [M * b, a8]
// (a8 = a rounded up to 8, the padding zero); D = Z A on the tensor cores (CUTLASS, fp32 sums, fp16 out) is the
// rotated rows transposed back; the per-token quantization reads D. scratch: rotate_dense_scratch(M, K, b) bytes.
bool rotate_dense_supported(int64_t K, int64_t b, bool walsh_b);
size_t rotate_dense_scratch(int64_t M, int64_t K, int64_t b);
// Where the factor and a token's rows fit in shared memory (a16 <= 192, b = 32, 64 or 128: 11008 = 172 x 64), the
// whole path is one kernel instead (rotate_quant.cu: rotate_dense_fused_kernel), without Z, D or scratch; q 16-byte
// aligned. fused: 0 the three kernels always; else the one kernel where supported, its warps: 1 the rule (b = 64:
// two groups of 8 warps on alternate tokens, where their buffers fit and M >= twice the multiprocessors, else one
// group of 16; b = 128: one group of 16; b = 32: one of 8),
// 2 one group of 8, 3 one group of 16 (8 for b = 32), 4 two groups of 8 wherever they fit (b = 32 or 64).
bool rotate_dense_fused_supported(int64_t K, int64_t b, bool walsh_b, bool glu);
// u: null, or x is SwiGLU's silu(x) * u, made as it is read (here and in launch_rotate_dense_rows).
cudaError_t launch_rotate_dense_quantize(const __half* x, const __half* at, bool walsh_b, int8_t* q, float* amax,
                                         int64_t M, int64_t K, int64_t b, void* scratch, cudaStream_t stream,
                                         const __half* u = nullptr, int fused = 1, float* zero = nullptr);

// Online rotation fused into the quantization: each row x [K] (viewed as X [a, b], a = K / b) becomes
// fp16(x @ kron(A, B)) = fp16(A^T (X B)), then is quantized as launch_quantize_rows does. Each factor is dense, the
// identity, or (walsh) the normalised Walsh-Hadamard matrix of Sylvester's construction, H_n / sqrt(n):
//   at    fp16 [a16, a16]: A^T zero-padded to a16 = a rounded up to 16; nullptr: A = I (or Walsh, below)
//   bm    fp16 [b16, b16]: B zero-padded to b16 = b rounded up to 16; nullptr: B = I (or Walsh)
//   walsh bit 0: B = H_b / sqrt(b) (bm must be nullptr, b a power of two); bit 1: A = H_a / sqrt(a) (at nullptr)
// A dense factor is a tensor-core product (fp32 sums) on the fp16-rounded row; a Walsh factor a fast transform in
// fp32. Requires rotate_quantize_supported(K, b) (b % 8 == 0, 6 * a16 * b16 <= kRotateMaxSmem bytes), some factor
// not the identity, and 32-byte aligned factors. sm_count: the GPU's multiprocessors (the grid strides over the rows).
constexpr size_t kRotateMaxSmem = 200 * 1024;
constexpr bool is_pow2(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }  // a Walsh factor's size
constexpr int64_t round_up_to(int64_t n, int64_t m) { return (n + m - 1) / m * m; }  // a factor's padded size
size_t rotate_quantize_smem(int64_t K, int64_t b);
bool rotate_quantize_supported(int64_t K, int64_t b);
cudaError_t launch_rotate_quantize_rows(const __half* x, const __half* at, const __half* bm, int walsh, int8_t* q,
                                        float* amax, int64_t M, int64_t K, int64_t b, int sm_count,
                                        cudaStream_t stream, float* zero = nullptr);

// Lets kernel F use up to `bytes` of dynamic shared memory: asked once per process and kernel, the answer kept.
template <auto F>
cudaError_t opt_in_smem(size_t bytes) {
  static const cudaError_t e =
      cudaFuncSetAttribute(F, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return e;
}

// The multiprocessor count of the first device asked, read once per process (one-GPU processes are the rule; 0 if
// it cannot be read: CUTLASS then asks itself).
int sm_count_of_current_device();

// The same rotation at small M (b % 16 == 0, 16 <= b <= 256), unquantized: y [M, K] fp16 = the rotated rows in their
// own order, a block per 16 rows of A^T and token (each block transforms its token's X B itself); the one-launch
// GEMV then quantizes y.
bool rotate_dense_rows_supported(int64_t K, int64_t b, bool walsh_b);
cudaError_t launch_rotate_dense_rows(const __half* x, const __half* at, bool walsh_b, __half* y, int64_t M, int64_t K,
                                     int64_t b, cudaStream_t stream, const __half* u = nullptr);

// D [M, N] = A [M, K] @ B, fp16 in and out, fp32 sums (CUTLASS SM90): A row-major (lda = K), B given as its
// transpose [N, K] row-major with leading dimension ldb (>= K), D row-major (ldd = N). K, N, ldb % 8 == 0.
size_t f16_gemm_sm90_workspace(int64_t M, int64_t N, int64_t K);
cudaError_t launch_f16_gemm_sm90(const __half* a, const __half* bt, int64_t ldb, __half* d, int64_t M, int64_t N,
                                 int64_t K, void* workspace, cudaStream_t stream);

// Any shape, slow: one warp per output element. For shapes the fast paths cannot take.
cudaError_t launch_w8a8_naive(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                              const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream,
                              const float* zero = nullptr, const float* colsum = nullptr);

// CUTLASS 3.x SM90 int8 tensor-core GEMM, dequantization fused in the epilogue (fp16 out).
// Requires K % 16 == 0 and N % 8 == 0 and 16-byte aligned pointers. `tile` (0 .. kGemmTiles - 1): 0 = 128x128 in
// clusters of 2 along M (large M), 1 = 64x128 (M <= 128), 2 = 128x256 cooperative, 3 = 128x128 stream-K, 4 = the same
// in clusters of 2 along M, 5 / 6 / 7 = 256x128 cooperative in clusters of 2 along M / 2 along N / 2 x 2, 8 = 128x128
// in clusters of 2 along N; with the tokens on the tile's second side (y^T = w . q^T, gemm_sm90.cuh: SWAP), channels x
// tokens: 9 = 64x144 in clusters of 2 along the channels, 10 = 128x144 cooperative in the same clusters, 11 / 12 =
// 128x32 / 128x64 stream-K. Returns cudaErrorNotSupported when CUTLASS cannot implement the problem.
// pdl: a programmatic dependent launch, its prologue overlapping the end of the stream's previous kernel (which
// launch_quantize_rows's kernel allows as soon as it starts); its loads wait for that kernel's end.
constexpr int kGemmTiles = 13;
// How a GEMM's tiles are laid on the persistent grid (CUTLASS's tile scheduler arguments; defaults: CUTLASS's).
struct GemmSchedule {
  int swizzle = 1;        // tiles per swizzle group: 1, 2, 4 or 8 (consecutive CTAs on neighbouring tiles)
  int raster = 0;         // 0: CUTLASS's heuristic, 1: along M, 2: along N
  int decomposition = 0;  // stream-K tiles (3, 4): 0 CUTLASS's heuristic, 1 data-parallel, 2 split-K, 3 stream-K
  int splits = 1;         // stream-K tiles: K split into this many parts (split-K; with heuristic, > 1 means split-K)
  bool atomic = false;    // stream-K tiles: partial sums added in any order (int32: the same bits) instead of in turn
};
// The schedule's fields in their ranges (above), else the first that is not, as a message.
const char* gemm_schedule_error(const GemmSchedule& s);
// asym: the tile with the asymmetric codes' epilogue (launch_w8a8_gemm_sm90's zero / colsum)
size_t w8a8_gemm_sm90_workspace(int tile, int64_t M, int64_t N, int64_t K, const GemmSchedule& s = {},
                                bool asym = false);
// The default tile for an M x N product on sm_count multiprocessors: 1 (64x128) for M <= 128; above, of the 64-, 128-
// and 256-row tiles the one whose grid costs least, cost = waves of tiles (ceil(tiles / sm_count)) x rows per tile x
// 1.25, 1 or 0.85 (the larger tiles do more per row); ties go to the larger tile. 256 rows: tile 6 (clusters of 2
// along N); 128 rows: tile 0 (clusters of 2 along M) where M spans an even number of 128-row tiles, else the stream-K
// tile 3 (an odd count leaves a cluster of 2 a tile of padding). Fitted to H100 runs at 192-2048 rows on the
// Llama-2-7B shapes (docs/benchmarks.md g16): it picks the fastest tile or one within 8.4 % of it in 20 of 21 cases.
// Tile 9 (below) is a candidate too where its grid is one wave (e.g. 257-288 rows at N = 4096: 2 x 64 CTAs), where
// it measured 1.17-1.27x faster than tile 3 (g18).
// rule 1 (ONNXQF_GEMM_RULE=1; g17's model, measured slower on an H100: docs/benchmarks.md g18): the same costs with
// tiles 9 and 10 among the candidates wherever they cost least (products per tile: 144 tokens x 64 channels x 1.25,
// 144 x 128 x 1; an odd count of their channel tiles padded to their clusters of 2), and at M <= 128 the stream-K
// tiles 11 (M <= 32) and 12 instead of tile 1.
int w8a8_gemm_sm90_tile(int64_t M, int64_t N, int sm_count, int rule = 0);
constexpr int kGemmRules = 2;
// zero, colsum: null, or the asymmetric codes' (both given; the same tiles with the asymmetric epilogue).
cudaError_t launch_w8a8_gemm_sm90(int tile, const int8_t* q, const float* amax, const int8_t* w,
                                  const float* wscale, const __half* bias, __half* y, int64_t M, int64_t N,
                                  int64_t K, void* workspace, cudaStream_t stream, bool pdl = false,
                                  const GemmSchedule& s = {}, const float* zero = nullptr,
                                  const float* colsum = nullptr);

}  // namespace onnxqf
