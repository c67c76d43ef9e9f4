// Dispatch to the SM90 tile configurations (host code only; the kernels live in gemm_sm90_{large,small,wide}.cu).
#include <climits>

#include "gemm_sm90.cuh"

namespace onnxqf {

int sm_count_of_current_device() {
  static const int n = [] {
    int dev = 0, count = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
    return count;
  }();
  return n;
}

int w8a8_gemm_sm90_tile(int64_t M) {
  if (M <= 128) return 1;
  return ((M + 127) / 128) % 2 == 0 ? 0 : 3;
}

size_t w8a8_gemm_sm90_workspace(int tile, int64_t M, int64_t N, int64_t K) {
  if (!sm90::fits_int(M, N, K)) return 0;
  const int m = int(M), n = int(N), k = int(K), sms = sm_count_of_current_device();
  switch (tile) {
    case 0: return sm90::workspace_large(m, n, k, sms);
    case 1: return sm90::workspace_small(m, n, k, sms);
    case 2: return sm90::workspace_wide(m, n, k, sms);
    default: return sm90::workspace_streamk(tile == 4 ? 2 : 1, m, n, k, sms);
  }
}

cudaError_t launch_w8a8_gemm_sm90(int tile, const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                                  const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, void* workspace,
                                  cudaStream_t stream, bool pdl) {
  if (!sm90::fits_int(M, N, K) || K % 16 != 0 || N % 8 != 0) return cudaErrorNotSupported;
  const int m = int(M), n = int(N), k = int(K), sm_count = sm_count_of_current_device();
  switch (tile) {
    case 0: return sm90::run_large(q, amax, w, wscale, bias, y, m, n, k, sm_count, workspace, stream, pdl);
    case 1: return sm90::run_small(q, amax, w, wscale, bias, y, m, n, k, sm_count, workspace, stream, pdl);
    case 2: return sm90::run_wide(q, amax, w, wscale, bias, y, m, n, k, sm_count, workspace, stream, pdl);
    default:
      return sm90::run_streamk(tile == 4 ? 2 : 1, q, amax, w, wscale, bias, y, m, n, k, sm_count, workspace, stream,
                               pdl);
  }
}

}  // namespace onnxqf
