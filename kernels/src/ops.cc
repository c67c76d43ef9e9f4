// ONNX Runtime custom-op library: registers the domain "onnxqf" with its ops on the CUDA execution provider.
//
//   onnxqf.W8A8Linear (version 1)
//     inputs:  X      float16 [..., K]
//              W      int8    [N, K]   (row-major; the transpose of ONNX MatMul's [K, N])
//              Wscale float    [N]     (weight scale per output channel, already divided by 127)
//              B      float16 [N]     (optional bias)
//              RA     float16 [a16, a16] (optional: A^T zero-padded to a16 = a rounded up to 16; absent: A = I)
//              RB     float16 [b16, b16] (optional: B zero-padded to b16 = b rounded up to 16; absent: B = I)
//              U      float16 [..., K] (optional: with input_glu)
//              Skip, Gamma          (optional, 7 and 8: with skip_norm, below)
//              Wsum   float    [N]     (optional, 9: with asymmetric, below: sum_k W[n, k] per output channel)
//     attribute: rotation_block (int, default 0): b; when > 0, X is first rotated online, X <- X @ kron(A, B)
//                (a = K / b), inside the quantization (kernels.h: launch_rotate_quantize_rows)
//     attribute: rotation_walsh (int, default 0): bit 0: B = H_b / sqrt(b), bit 1: A = H_a / sqrt(a) (Sylvester's
//                Walsh-Hadamard matrix, run as a fast transform; that factor's input RB / RA absent)
//     attribute: input_glu (int, default 0): 1: the op's input is SwiGLU's silu(X) * U (input U float16, the shape
//                of X), computed inside the quantization in the fp16 steps of the standard Sigmoid / Mul / Mul nodes
//     attribute: output_sizes (ints, optional): the N output channels cut into consecutive parts, one output each
//                (at most 4: a linear group's q/k/v or gate/up, whose codes are shared); absent: one output
//     attribute: skip_norm (int, default 0): 1: the op's input is ONNX Runtime's SkipSimplifiedLayerNormalization of
//                X and input Skip (index 7, X's shape) with input Gamma (index 8, [K]) and attribute epsilon (float):
//                s = X + Skip, the row quantized fp16(Gamma * fp16(s * r)), r = fp16(1 / sqrt(mean(s^2) + epsilon))
//                (kernels.h: NormSpec); 2: the same, and s is the op's last output (the residual stream). Not with
//                a rotation or input_glu.
//     attribute: asymmetric (int, default 0): 1: asymmetric per-token codes (a step and a zero point per token,
//                int8-token-asym's arithmetic: kernels.h); Wscale is then the weight's per-channel step (not divided by
//                127) and input Wsum (index 9, float [N]) the weights' per-channel sums.
//     outputs: Y...   float16 [..., N] (or [..., output_sizes[i]] each), then S float16 [..., K] when skip_norm = 2
//   Y = per-token int8 quantization of X (kernels.h), int8 GEMM, dequantization fused (fp16 out).
//
// The library is built for sm_90a (H100/H200, compute capability 9.0) and refuses any other GPU when a session
// creates the kernel. Environment (read at kernel creation):
//   ONNXQF_GEMV_MAX_M   rows up to which the GEMV runs (default 4: one launch with the quantization fused for
//                       M <= 4, the separate quantization kernel + GEMV above); larger M takes the tensor-core GEMM
//   ONNXQF_GEMM_TILE    force the GEMM tile, 0..kGemmTiles-1 (kernels.h: launch_w8a8_gemm_sm90; another value stops
//                       the session's creation; default: w8a8_gemm_sm90_tile, kernels.h)
//   ONNXQF_GEMM_RULE    1: the default tile by the rule with tiles 9-12 (kernels.h: w8a8_gemm_sm90_tile; default 0;
//                       measured slower, docs/benchmarks.md g18)
//   ONNXQF_GEMM_SWIZZLE, ONNXQF_GEMM_RASTER, ONNXQF_GEMM_SK, ONNXQF_GEMM_SPLITS, ONNXQF_GEMM_SK_ATOMIC
//                       the GEMM's schedule (kernels.h: GemmSchedule; out of range stops the session's creation)
//   ONNXQF_QUANT_PIPE   N > 0: the separate quantization kernel as N blocks per multiprocessor striding over the rows,
//                       each loading its next row while it finishes one (where M > 2 N x multiprocessors; default 0,
//                       which measured faster: docs/benchmarks.md g18)
//   ONNXQF_QUANT_REGS   0: the separate quantization kernel as a block of 256 threads per row (default 1: each row
//                       held in registers by as many warps as it needs)
//   ONNXQF_GEMV_CONFIG  the one-token GEMV's outputs per warp x weight chunks in flight (kernels.h; -1: by shape)
//   ONNXQF_GEMV_PERSIST 0: the small-M GEMV's grid one warp per group of outputs (default 1: as many blocks as the
//                       GPU holds at once, each striding over the outputs)
//   ONNXQF_PDL          1: the small-M GEMV as a programmatic dependent launch (default 0)
//   ONNXQF_GEMM_PDL     1: the int8 GEMM as a programmatic dependent launch behind the quantization, 0: not
//                       (default: with the 64x128 tile only, i.e. M <= 128; docs/benchmarks.md g11)
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

#ifndef ONNXQF_KERNELS_TARGET
#define ONNXQF_KERNELS_TARGET "sm_90a"
#endif
#define ONNXQF_KERNELS_VERSION "3"  // 2: skip_norm, 3: asymmetric (onnxqf.runtime.kernels.KERNELS_VERSION)

namespace {

const OrtApi* g_api = nullptr;

OrtStatusPtr fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, msg.c_str()); }

// Empty string when the current device can run this library, else the one-line reason.
std::string device_problem(int* device_out) {
  int dev = -1;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return std::string("onnxqf kernels: no CUDA device (") + cudaGetErrorString(e) + ")";
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (device_out) *device_out = dev;
  if (major != 9 || minor != 0) {
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, dev);
    return "onnxqf kernels: built for " ONNXQF_KERNELS_TARGET " (H100/H200, compute capability 9.0); GPU " +
           std::to_string(dev) + " (" + prop.name + ") has compute capability " + std::to_string(major) + "." +
           std::to_string(minor);
  }
  return {};
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return (end && *end == 0) ? int(x) : fallback;
}

// The node's attribute `name` (an int or a float), or `fallback` when the node has none.
template <class T>
T attribute_or(const OrtKernelInfo* info, const char* name, T fallback) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

// Stream-ordered scratch memory from a pool of our own per device that keeps what it has (no release at syncs).
cudaError_t scratch_alloc(void** p, size_t bytes, int device, cudaStream_t stream) {
  static std::mutex mu;
  static std::map<int, cudaMemPool_t> pools;
  cudaMemPool_t pool;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = pools.find(device);
    if (it == pools.end()) {
      cudaMemPoolProps props{};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      cudaError_t e = cudaMemPoolCreate(&pool, &props);
      if (e != cudaSuccess) return e;
      uint64_t keep = UINT64_MAX;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      pools[device] = pool;
    } else {
      pool = it->second;
    }
  }
  return cudaMallocFromPoolAsync(p, bytes, pool, stream);
}

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Scratch given back (stream-ordered) when the scope ends, whichever way it ends.
struct ScratchGuard {
  void* p = nullptr;
  cudaStream_t stream = nullptr;
  ~ScratchGuard() {
    if (p) cudaFreeAsync(p, stream);
  }
};

struct W8A8LinearKernel {
  int device = 0;
  int gemv_max_m = 4;
  onnxqf::GemvOptions gemv;
  int force_tile = -1;
  int gemm_rule = 0;           // ONNXQF_GEMM_RULE: w8a8_gemm_sm90_tile's rule (kernels.h)
  onnxqf::GemmSchedule schedule;  // ONNXQF_GEMM_SWIZZLE, _RASTER, _SK, _SPLITS, _SK_ATOMIC
  bool tile_rotation = false;  // ONNXQF_ROTATION_TILES=1: every rotation by the per-token tensor-core kernel
  bool quant_regs = true;      // ONNXQF_QUANT_REGS=0: the quantization's block-per-row kernel (A/B runs)
  int quant_pipe = 0;          // ONNXQF_QUANT_PIPE=N: the quantization's grid N blocks per multiprocessor, striding
  int rot_fused = 1;           // ONNXQF_ROT_FUSED: a dense factor's one-kernel path and its warps (1-4) or not (0)
  int gemm_pdl = -1;           // ONNXQF_GEMM_PDL: the GEMM as a dependent launch (1), not (0), by tile (-1)
  int sm_count = 1;
  int64_t rotation_block = 0;
  int rotation_walsh = 0;
  bool input_glu = false;
  int skip_norm = 0;  // 0: none, 1: skip + norm before the quantization, 2: and the sum as the last output
  float epsilon = 1e-5f;
  bool asymmetric = false;  // asymmetric per-token codes (input Wsum, index 9)
  std::vector<int64_t> output_sizes;  // empty: one output

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      return compute(context);
    } catch (const Ort::Exception& e) {
      return fail(std::string("onnxqf.W8A8Linear: ") + e.what());
    } catch (const std::exception& e) {
      return fail(std::string("onnxqf.W8A8Linear: ") + e.what());
    }
  }

  OrtStatusPtr compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_in = ctx.GetInputCount();
    auto X = ctx.GetInput(0);
    auto W = ctx.GetInput(1);
    auto S = ctx.GetInput(2);
    Ort::ConstValue B{nullptr}, RA{nullptr}, RB{nullptr}, U{nullptr}, SK{nullptr}, G{nullptr}, WS{nullptr};
    if (n_in > 3) B = ctx.GetInput(3);
    if (n_in > 4) RA = ctx.GetInput(4);
    if (n_in > 5) RB = ctx.GetInput(5);
    if (n_in > 6) U = ctx.GetInput(6);
    if (n_in > 7) SK = ctx.GetInput(7);
    if (n_in > 8) G = ctx.GetInput(8);
    if (n_in > 9) WS = ctx.GetInput(9);
    const std::vector<int64_t> xs = X.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> wsh = W.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.empty()) return fail("onnxqf.W8A8Linear: X must have rank >= 1");
    if (wsh.size() != 2) return fail("onnxqf.W8A8Linear: W must be [N, K]");
    const int64_t K = xs.back(), N = wsh[0];
    if (wsh[1] != K)
      return fail("onnxqf.W8A8Linear: W is [" + std::to_string(N) + ", " + std::to_string(wsh[1]) + "] but X has K = " +
                  std::to_string(K));
    if (static_cast<int64_t>(S.GetTensorTypeAndShapeInfo().GetElementCount()) != N)
      return fail("onnxqf.W8A8Linear: Wscale must have N = " + std::to_string(N) + " elements");
    const __half* bias = nullptr;
    if (B) {
      if (static_cast<int64_t>(B.GetTensorTypeAndShapeInfo().GetElementCount()) != N)
        return fail("onnxqf.W8A8Linear: B must have N = " + std::to_string(N) + " elements");
      bias = reinterpret_cast<const __half*>(B.GetTensorRawData());
    }
    const float* colsum = nullptr;  // asymmetric: the weights' per-channel sums
    if (asymmetric != static_cast<bool>(WS))
      return fail("onnxqf.W8A8Linear: input Wsum is given exactly when asymmetric = 1");
    if (WS) {
      if (static_cast<int64_t>(WS.GetTensorTypeAndShapeInfo().GetElementCount()) != N)
        return fail("onnxqf.W8A8Linear: Wsum must have N = " + std::to_string(N) + " elements");
      colsum = reinterpret_cast<const float*>(WS.GetTensorRawData());
    }
    const __half* u = nullptr;  // SwiGLU's up projection: the input is silu(X) * U
    if (input_glu != static_cast<bool>(U))
      return fail("onnxqf.W8A8Linear: input U is given exactly when input_glu = 1");
    if (U) {
      if (U.GetTensorTypeAndShapeInfo().GetShape() != xs) return fail("onnxqf.W8A8Linear: U must have X's shape");
      u = reinterpret_cast<const __half*>(U.GetTensorRawData());
    }
    onnxqf::NormSpec norm;  // skip_norm: X + Skip normalized before the quantization
    if ((skip_norm != 0) != static_cast<bool>(SK) || static_cast<bool>(SK) != static_cast<bool>(G))
      return fail("onnxqf.W8A8Linear: inputs Skip and Gamma are given exactly when skip_norm = 1 or 2");
    if (SK) {
      if (SK.GetTensorTypeAndShapeInfo().GetShape() != xs) return fail("onnxqf.W8A8Linear: Skip must have X's shape");
      if (static_cast<int64_t>(G.GetTensorTypeAndShapeInfo().GetElementCount()) != K)
        return fail("onnxqf.W8A8Linear: Gamma must have K = " + std::to_string(K) + " elements");
      if (K % 8 != 0 || K > 24576)  // (the normalized row is held in shared memory: 2 K bytes)
        return fail("onnxqf.W8A8Linear: skip_norm needs K % 8 == 0 and K <= 24576, not K = " + std::to_string(K));
      norm.skip = reinterpret_cast<const __half*>(SK.GetTensorRawData());
      norm.gamma = reinterpret_cast<const __half*>(G.GetTensorRawData());
      norm.eps = epsilon;
    }
    const __half* rot_a = nullptr;
    const __half* rot_b = nullptr;
    if (rotation_block > 0) {
      const int64_t b = rotation_block;
      if (!onnxqf::rotate_quantize_supported(K, b))
        return fail("onnxqf.W8A8Linear: cannot rotate K = " + std::to_string(K) + " by blocks of rotation_block = " +
                    std::to_string(b) + " (b % 8 == 0, K % b == 0, 6 * a16 * b16 <= " +
                    std::to_string(onnxqf::kRotateMaxSmem) + " bytes)");
      const int64_t a16 = onnxqf::round_up_to(K / b, 16), b16 = onnxqf::round_up_to(b, 16);
      if (RA) {
        const auto sh = RA.GetTensorTypeAndShapeInfo().GetShape();
        if (sh.size() != 2 || sh[0] != a16 || sh[1] != a16)
          return fail("onnxqf.W8A8Linear: RA must be [" + std::to_string(a16) + ", " + std::to_string(a16) + "]");
        rot_a = reinterpret_cast<const __half*>(RA.GetTensorRawData());
      }
      if (RB) {
        const auto sh = RB.GetTensorTypeAndShapeInfo().GetShape();
        if (sh.size() != 2 || sh[0] != b16 || sh[1] != b16)
          return fail("onnxqf.W8A8Linear: RB must be [" + std::to_string(b16) + ", " + std::to_string(b16) + "]");
        rot_b = reinterpret_cast<const __half*>(RB.GetTensorRawData());
      }
      if ((rotation_walsh & 1) && (rot_b || !onnxqf::is_pow2(b)))
        return fail("onnxqf.W8A8Linear: rotation_walsh bit 0 needs no RB and a power-of-two rotation_block");
      if ((rotation_walsh & 2) && (rot_a || !onnxqf::is_pow2(K / b)))
        return fail("onnxqf.W8A8Linear: rotation_walsh bit 1 needs no RA and a power-of-two K / rotation_block");
      if (!rot_a && !rot_b && !rotation_walsh)
        return fail("onnxqf.W8A8Linear: rotation_block is set but neither RA, RB nor rotation_walsh is given");
    }
    if (norm.skip && (rotation_block > 0 || input_glu))
      return fail("onnxqf.W8A8Linear: skip_norm does not combine with a rotation or input_glu");
    // the outputs: one of N channels, or output_sizes' consecutive parts (a linear group's q/k/v, gate/up)
    const size_t n_all = ctx.GetOutputCount();
    const size_t n_out = n_all - (skip_norm == 2 ? 1 : 0);  // (skip_norm = 2: the sum is the last output)
    const std::vector<int64_t> parts = output_sizes.empty() ? std::vector<int64_t>{N} : output_sizes;
    if (parts.size() != n_out || n_all < 1)
      return fail("onnxqf.W8A8Linear: " + std::to_string(n_all) + " outputs but output_sizes gives " +
                  std::to_string(parts.size()) + " sizes" + (skip_norm == 2 ? " (and skip_norm = 2 one sum)" : ""));
    if (skip_norm == 2) norm.sum = reinterpret_cast<__half*>(ctx.GetOutput(n_out, xs).GetTensorMutableRawData());
    onnxqf::OutSplit out;
    std::vector<int64_t> ys = xs;
    int64_t total = 0;
    for (size_t i = 0; i < n_out; ++i) {
      total += parts[i];
      ys.back() = parts[i];
      out.y[i] = reinterpret_cast<__half*>(ctx.GetOutput(i, ys).GetTensorMutableRawData());
      out.end[i] = total;
    }
    out.count = static_cast<int>(n_out);
    if (total != N)
      return fail("onnxqf.W8A8Linear: output_sizes add up to " + std::to_string(total) + ", W has N = " +
                  std::to_string(N));
    int64_t M = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
    if (M == 0 || N == 0) return nullptr;
    if (K == 0) return fail("onnxqf.W8A8Linear: K = 0");

    auto stream = reinterpret_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    const auto* x = reinterpret_cast<const __half*>(X.GetTensorRawData());
    const auto* w = reinterpret_cast<const int8_t*>(W.GetTensorRawData());
    const auto* ws = reinterpret_cast<const float*>(S.GetTensorRawData());
    bool parts_aligned = true;  // each part's columns start 8-aligned (its scales, bias and output 16-byte aligned)
    for (int i = 0; i < out.count; ++i)
      parts_aligned = parts_aligned && parts[i] % 8 == 0 && reinterpret_cast<uintptr_t>(out.y[i]) % 16 == 0;
    const bool aligned = K % 16 == 0 && parts_aligned && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(ws) % 16 == 0 &&
                         (!bias || reinterpret_cast<uintptr_t>(bias) % 16 == 0) &&
                         reinterpret_cast<uintptr_t>(colsum) % 16 == 0;
    // the rotation's kernel: Walsh-Hadamard factors alone as a transform in registers (any M; at small M inside the
    // GEMV); a dense outer factor over a Walsh or identity inner one as a GEMM over all tokens; else the per-token
    // tensor-core product (rotate_quant.cu)
    const bool rotate = rotation_block > 0;
    const bool walsh_a = rotation_walsh & 2, walsh_b = rotation_walsh & 1;
    const onnxqf::WalshSpec wspec = rotate && !rot_a && !rot_b && !tile_rotation
                                        ? onnxqf::walsh_spec(K, rotation_block, walsh_a, walsh_b)
                                        : onnxqf::WalshSpec{};
    const bool dense = rotate && rot_a && !rot_b && !walsh_a && !tile_rotation &&
                       onnxqf::rotate_dense_supported(K, rotation_block, walsh_b);
    // SwiGLU's products: made as X is read where the kernel reads it as it is (no rotation) or by rows of X (the
    // dense factor's kernels), else written once first (write_glu)
    ScratchGuard glu_rows{nullptr, stream};
    auto write_glu = [&]() -> cudaError_t {
      if (!u) return cudaSuccess;
      cudaError_t e = scratch_alloc(&glu_rows.p, round_up(size_t(M) * size_t(K) * 2, 256), device, stream);
      if (e == cudaSuccess) e = onnxqf::launch_glu(x, u, static_cast<__half*>(glu_rows.p), M * K, stream);
      x = static_cast<const __half*>(glu_rows.p);
      u = nullptr;
      return e;
    };
    if (u && ((rotate && !dense) || reinterpret_cast<uintptr_t>(u) % 16 != 0))
      if (const cudaError_t e = write_glu(); e != cudaSuccess)
        return fail(std::string("onnxqf.W8A8Linear: SwiGLU: ") + cudaGetErrorString(e));
    // small M in one launch, no scratch: quantization (after a Walsh rotation) into shared memory + GEMV
    if ((!rotate || wspec.n) && M <= gemv_max_m &&
        onnxqf::w8a8_fused_gemv_supported(x, w, M, K, rotate ? &wspec : nullptr, norm.skip != nullptr)) {
      cudaError_t e = onnxqf::launch_w8a8_fused_gemv(x, w, ws, bias, out, M, K, stream, rotate ? &wspec : nullptr,
                                                     gemv, u, norm.skip ? &norm : nullptr, colsum);
      if (e != cudaSuccess) return fail(std::string("onnxqf.W8A8Linear: CUDA error: ") + cudaGetErrorString(e));
      return nullptr;
    }
    // a dense factor at small M: the rotated rows (fp16) by one kernel, then the one-launch GEMV quantizes them
    if (dense && M <= gemv_max_m && onnxqf::rotate_dense_rows_supported(K, rotation_block, walsh_b) &&
        onnxqf::w8a8_fused_gemv_supported(x, w, M, K)) {
      void* rows = nullptr;
      cudaError_t e = scratch_alloc(&rows, round_up(size_t(M) * size_t(K) * 2, 256), device, stream);
      if (e != cudaSuccess) return fail(std::string("onnxqf.W8A8Linear: scratch allocation: ") + cudaGetErrorString(e));
      auto* xr = static_cast<__half*>(rows);
      e = onnxqf::launch_rotate_dense_rows(x, rot_a, walsh_b, xr, M, K, rotation_block, stream, u);
      if (e == cudaSuccess)
        e = onnxqf::launch_w8a8_fused_gemv(xr, w, ws, bias, out, M, K, stream, nullptr, gemv, nullptr, nullptr, colsum);
      const cudaError_t ef = cudaFreeAsync(rows, stream);
      if (e == cudaSuccess) e = ef;
      if (e != cudaSuccess) return fail(std::string("onnxqf.W8A8Linear: CUDA error: ") + cudaGetErrorString(e));
      return nullptr;
    }
    int path = 0;  // 0 naive, 1 gemv, 2 gemm
    // each output's GEMM tile (by M and its N) and whether it runs as a dependent launch (g11: the small tile)
    auto tile_of = [&](int64_t n) {
      return force_tile >= 0 ? force_tile : onnxqf::w8a8_gemm_sm90_tile(M, n, sm_count, gemm_rule);
    };
    if (aligned) path = (M <= gemv_max_m) ? 1 : 2;
    else if (K % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0) path = 1;

    const size_t q_bytes = round_up(size_t(M) * size_t(K), 256);
    const size_t amax_bytes = round_up(size_t(M) * sizeof(float), 256);
    const size_t a_bytes = amax_bytes * (asymmetric ? 2 : 1);  // amax (or s), then z
    size_t ws_bytes = 0;
    for (int i = 0; path == 2 && i < out.count; ++i)
      ws_bytes = std::max(ws_bytes, round_up(onnxqf::w8a8_gemm_sm90_workspace(tile_of(parts[i]), M, parts[i], K,
                                                                              schedule, asymmetric), 256));
    const bool dense_fused = dense && rot_fused && onnxqf::rotate_dense_fused_supported(K, rotation_block, walsh_b,
                                                                                          u != nullptr);
    const size_t r_bytes = dense && !dense_fused ? onnxqf::rotate_dense_scratch(M, K, rotation_block) : 0;
    void* scratch = nullptr;
    cudaError_t e = scratch_alloc(&scratch, q_bytes + a_bytes + ws_bytes + r_bytes, device, stream);
    if (e != cudaSuccess) return fail(std::string("onnxqf.W8A8Linear: scratch allocation: ") + cudaGetErrorString(e));
    auto* q = static_cast<int8_t*>(scratch);
    auto* amax = reinterpret_cast<float*>(static_cast<char*>(scratch) + q_bytes);
    float* zero = asymmetric ? amax + amax_bytes / sizeof(float) : nullptr;
    void* workspace = ws_bytes ? static_cast<char*>(scratch) + q_bytes + a_bytes : nullptr;
    void* r_scratch = static_cast<char*>(scratch) + q_bytes + a_bytes + ws_bytes;

    if (!rotate) e = onnxqf::launch_quantize_rows(x, q, amax, M, K, stream, u, norm.skip ? &norm : nullptr,
                                                     quant_regs, quant_pipe * sm_count, zero);
    else if (wspec.n) e = onnxqf::launch_walsh_quantize_rows(x, wspec, q, amax, M, sm_count, stream, zero);
    else if (dense)
      e = onnxqf::launch_rotate_dense_quantize(x, rot_a, walsh_b, q, amax, M, K, rotation_block, r_scratch, stream,
                                               u, dense_fused ? rot_fused : 0, zero);
    if (rotate && !wspec.n && (!dense || e == cudaErrorNotSupported)) {  // (CUTLASS may refuse a small factor)
      if (dense) (void)cudaGetLastError();  // the refusal's, as after the int8 GEMM's below
      e = write_glu();
      if (e == cudaSuccess)
        e = onnxqf::launch_rotate_quantize_rows(x, rot_a, rot_b, rotation_walsh, q, amax, M, K, rotation_block,
                                                sm_count, stream, zero);
    }
    std::string refused;  // a forced GEMM tile CUTLASS cannot run
    for (int i = 0; e == cudaSuccess && i < out.count; ++i) {  // each output its own product of the shared codes
      const int64_t start = i ? out.end[i - 1] : 0, n = parts[i];
      const int8_t* wi = w + start * K;
      const float* si = ws + start;
      const __half* bi = bias ? bias + start : nullptr;
      const float* ci = colsum ? colsum + start : nullptr;
      int part_path = path;
      if (part_path == 2) {
        const int tile = tile_of(n);
        const bool pdl = gemm_pdl < 0 ? tile == 1 : gemm_pdl != 0;
        e = onnxqf::launch_w8a8_gemm_sm90(tile, q, amax, wi, si, bi, out.y[i], M, n, K, workspace, stream,
                                          pdl, schedule, zero, ci);
        if (e == cudaErrorNotSupported) {
          (void)cudaGetLastError();
          if (force_tile >= 0) {  // a forced tile is being timed or tested: never the GEMV in its place
            refused = "onnxqf.W8A8Linear: ONNXQF_GEMM_TILE=" + std::to_string(force_tile) + " cannot run " +
                      std::to_string(M) + " x " + std::to_string(n) + " x " + std::to_string(K) +
                      " (CUTLASS refused it); unset it for the default tile";
            break;  // (e stays set: no more parts)
          }
          part_path = 1;
        }
      }
      if (part_path == 1) e = onnxqf::launch_w8a8_gemv(q, amax, wi, si, bi, out.y[i], M, n, K, stream, zero, ci);
      if (part_path == 0) e = onnxqf::launch_w8a8_naive(q, amax, wi, si, bi, out.y[i], M, n, K, stream, zero, ci);
    }
    cudaError_t ef = cudaFreeAsync(scratch, stream);
    if (!refused.empty()) return fail(refused);
    if (e == cudaSuccess) e = ef;
    if (e != cudaSuccess) return fail(std::string("onnxqf.W8A8Linear: CUDA error: ") + cudaGetErrorString(e));
    return nullptr;
  }
};

struct W8A8LinearOp : Ort::CustomOpBase<W8A8LinearOp, W8A8LinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    int dev = 0;
    const std::string problem = device_problem(&dev);
    if (!problem.empty()) return fail(problem);
    const int64_t rotation_block = attribute_or<int64_t>(info, "rotation_block", 0);  // (none: no rotation)
    if (rotation_block < 0) return fail("onnxqf.W8A8Linear: rotation_block must be >= 0");
    const int64_t rotation_walsh = attribute_or<int64_t>(info, "rotation_walsh", 0);
    if (rotation_walsh < 0 || rotation_walsh > 3 || (rotation_walsh && rotation_block == 0))
      return fail("onnxqf.W8A8Linear: rotation_walsh must be 0..3, and set only with rotation_block");
    std::vector<int64_t> output_sizes;
    try {
      output_sizes = Ort::ConstKernelInfo(info).GetAttributes<int64_t>("output_sizes");
    } catch (const Ort::Exception&) {
      output_sizes.clear();  // no such attribute: one output
    }
    if (output_sizes.size() > static_cast<size_t>(onnxqf::kMaxOutputs))
      return fail("onnxqf.W8A8Linear: at most " + std::to_string(onnxqf::kMaxOutputs) + " outputs (output_sizes)");
    for (int64_t v : output_sizes)
      if (v <= 0) return fail("onnxqf.W8A8Linear: output_sizes must be positive");
    const int64_t input_glu = attribute_or<int64_t>(info, "input_glu", 0);
    if (input_glu != 0 && input_glu != 1) return fail("onnxqf.W8A8Linear: input_glu must be 0 or 1");
    const int64_t skip_norm = attribute_or<int64_t>(info, "skip_norm", 0);
    const float epsilon = attribute_or<float>(info, "epsilon", 1e-5f);
    if (skip_norm < 0 || skip_norm > 2) return fail("onnxqf.W8A8Linear: skip_norm must be 0, 1 or 2");
    if (!(epsilon >= 0.f)) return fail("onnxqf.W8A8Linear: epsilon must be >= 0");
    const int64_t asymmetric = attribute_or<int64_t>(info, "asymmetric", 0);
    if (asymmetric != 0 && asymmetric != 1) return fail("onnxqf.W8A8Linear: asymmetric must be 0 or 1");
    auto* k = new W8A8LinearKernel();
    auto refuse = [&](const std::string& why) {  // an environment value out of range: no kernel, one line
      delete k;
      return fail("onnxqf.W8A8Linear: " + why);
    };
    k->input_glu = input_glu == 1;
    k->skip_norm = static_cast<int>(skip_norm);
    k->epsilon = epsilon;
    k->asymmetric = asymmetric == 1;
    k->output_sizes = output_sizes;
    k->device = dev;
    k->rotation_block = rotation_block;
    k->rotation_walsh = static_cast<int>(rotation_walsh);
    cudaDeviceGetAttribute(&k->sm_count, cudaDevAttrMultiProcessorCount, dev);
    k->gemv_max_m = env_int("ONNXQF_GEMV_MAX_M", 4);
    k->gemv.config = env_int("ONNXQF_GEMV_CONFIG", -1);
    k->gemv.sm_count = env_int("ONNXQF_GEMV_PERSIST", 1) != 0 ? k->sm_count : 0;
    k->gemv.pdl = env_int("ONNXQF_PDL", 0) != 0;
    k->force_tile = env_int("ONNXQF_GEMM_TILE", -1);
    if (k->force_tile < -1 || k->force_tile >= onnxqf::kGemmTiles)
      return refuse("ONNXQF_GEMM_TILE must be a tile from 0 to " + std::to_string(onnxqf::kGemmTiles - 1) +
                    " (kernels.h: launch_w8a8_gemm_sm90)");
    k->gemm_rule = env_int("ONNXQF_GEMM_RULE", 0);
    if (k->gemm_rule < 0 || k->gemm_rule >= onnxqf::kGemmRules)
      return refuse("ONNXQF_GEMM_RULE must be from 0 to " + std::to_string(onnxqf::kGemmRules - 1) +
                    " (kernels.h: w8a8_gemm_sm90_tile)");
    k->schedule.swizzle = env_int("ONNXQF_GEMM_SWIZZLE", 1);
    k->schedule.raster = env_int("ONNXQF_GEMM_RASTER", 0);
    k->schedule.decomposition = env_int("ONNXQF_GEMM_SK", 0);
    k->schedule.splits = env_int("ONNXQF_GEMM_SPLITS", 1);
    k->schedule.atomic = env_int("ONNXQF_GEMM_SK_ATOMIC", 0) != 0;
    if (const char* why = onnxqf::gemm_schedule_error(k->schedule))
      return refuse(std::string("ONNXQF_GEMM_SWIZZLE/RASTER/SK/SPLITS: ") + why);
    k->quant_regs = env_int("ONNXQF_QUANT_REGS", 1) != 0;
    k->quant_pipe = env_int("ONNXQF_QUANT_PIPE", 0);
    if (k->quant_pipe < 0 || k->quant_pipe > 32)
      return refuse("ONNXQF_QUANT_PIPE must be from 0 (a block per row) to 32 (blocks per multiprocessor)");
    k->gemm_pdl = env_int("ONNXQF_GEMM_PDL", -1);
    k->rot_fused = env_int("ONNXQF_ROT_FUSED", 1);
    k->tile_rotation = env_int("ONNXQF_ROTATION_TILES", 0) != 0;  // the per-token kernel for every rotation (A/B runs)
    *kernel = k;
    return nullptr;
  }

  const char* GetName() const { return "W8A8Linear"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }

  size_t GetInputTypeCount() const { return 10; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case 2: case 9: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  // one or more float16 outputs (output_sizes): a variadic output of one type
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_VARIADIC;
  }
  int GetVariadicOutputMinArity() const { return 1; }
  bool GetVariadicOutputHomogeneity() const { return true; }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    if (ctx.GetInputCount() < 2) return nullptr;
    Ort::ShapeInferContext::Shape y = ctx.GetInputShape(0);
    const auto& w = ctx.GetInputShape(1);
    if (y.empty() || w.size() != 2) return nullptr;
    std::vector<int64_t> sizes;
    try {
      sizes = ctx.GetAttrInts("output_sizes");
    } catch (const Ort::Exception&) {
      sizes.clear();
    }
    int64_t skip_norm = 0;
    try {
      skip_norm = ctx.GetAttrInt("skip_norm");
    } catch (const Ort::Exception&) {
      skip_norm = 0;
    }
    const Ort::ShapeInferContext::Shape x = y;
    if (sizes.empty()) sizes.push_back(-1);  // one output of W's N
    for (size_t i = 0; i < sizes.size(); ++i) {
      y.back() = sizes[i] < 0 ? w[0] : Ort::ShapeInferContext::SymbolicInteger(sizes[i]);
      if (OrtStatusPtr st = ctx.SetOutputShape(i, y, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16).release()) return st;
    }
    if (skip_norm == 2)  // the sum: X's shape
      return ctx.SetOutputShape(sizes.size(), x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16).release();
    return nullptr;
  }
};

}  // namespace

extern "C" {

// The arch this library's kernels are built for, and its ABI version (read by onnxqf.runtime.kernels).
__attribute__((visibility("default"))) const char* onnxqf_kernels_target() { return ONNXQF_KERNELS_TARGET; }
__attribute__((visibility("default"))) const char* onnxqf_kernels_version() { return ONNXQF_KERNELS_VERSION; }
// The GEMM tile the op launches for an M x N product on `sm_count` multiprocessors (kernels.h: w8a8_gemm_sm90_tile;
// tests read the rule through it, no GPU needed).
__attribute__((visibility("default"))) int onnxqf_kernels_gemm_tile(int64_t M, int64_t N, int sm_count) {
  return onnxqf::w8a8_gemm_sm90_tile(M, N, sm_count);
}
// The same under another rule (ONNXQF_GEMM_RULE); -1 for a rule the library does not have.
__attribute__((visibility("default"))) int onnxqf_kernels_gemm_tile_rule(int64_t M, int64_t N, int sm_count,
                                                                          int rule) {
  return rule < 0 || rule >= onnxqf::kGemmRules ? -1 : onnxqf::w8a8_gemm_sm90_tile(M, N, sm_count, rule);
}

// 0 when the current CUDA device can run the kernels; else 1 and the reason in msg.
__attribute__((visibility("default"))) int onnxqf_kernels_check_device(char* msg, size_t len) {
  const std::string p = device_problem(nullptr);
  if (p.empty()) return 0;
  if (msg && len) {
    std::strncpy(msg, p.c_str(), len - 1);
    msg[len - 1] = 0;
  }
  return 1;
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (!g_api) return nullptr;  // cannot even report: an ONNX Runtime older than the headers
  Ort::InitApi(g_api);
  static W8A8LinearOp w8a8_linear;
  static Ort::CustomOpDomain* domain = nullptr;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  try {
    if (!domain) {
      domain = new Ort::CustomOpDomain("onnxqf");
      domain->Add(&w8a8_linear);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
