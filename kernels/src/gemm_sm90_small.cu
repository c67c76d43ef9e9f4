// Instantiation of the small-M tile configuration (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

cudaError_t run_small(const int8_t* q, const float* amax, const int8_t* w, const float* wscale, const __half* bias,
                      __half* y, int M, int N, int K, int sm_count, void* workspace, cudaStream_t stream, bool pdl) {
  return SmallTile::run(q, amax, w, wscale, bias, y, M, N, K, sm_count, workspace, stream, pdl);
}

size_t workspace_small(int M, int N, int K, int sm_count) { return SmallTile::workspace(M, N, K, sm_count); }

}  // namespace sm90
}  // namespace onnxqf
