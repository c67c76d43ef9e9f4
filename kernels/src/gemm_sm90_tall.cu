// Instantiation of the tall large-M tile configuration (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

cudaError_t run_tall(const int8_t* q, const float* amax, const int8_t* w, const float* wscale, const __half* bias,
                      __half* y, int M, int N, int K, int sm_count, void* workspace, cudaStream_t stream) {
  return TallTile::run(q, amax, w, wscale, bias, y, M, N, K, sm_count, workspace, stream);
}

size_t workspace_tall(int M, int N, int K) { return TallTile::workspace(M, N, K); }

}  // namespace sm90
}  // namespace onnxqf
