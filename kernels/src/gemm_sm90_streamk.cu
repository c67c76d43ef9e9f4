// Instantiation of the stream-K small-M tile configuration (gemm_sm90.cuh). Without CUTLASS's grid dependency
// control: CUTLASS 4.2's cooperative kernel does not compile with it and the stream-K scheduler (a const member
// calls a non-const one), so this tile is never a dependent launch.
#undef CUTLASS_ENABLE_GDC_FOR_SM90
#define ONNXQF_NO_GDC
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

cudaError_t run_streamk(const int8_t* q, const float* amax, const int8_t* w, const float* wscale, const __half* bias,
                        __half* y, int M, int N, int K, int sm_count, void* workspace, cudaStream_t stream, bool) {
  return StreamKTile::run(q, amax, w, wscale, bias, y, M, N, K, sm_count, workspace, stream, false);
}

size_t workspace_streamk(int M, int N, int K) { return StreamKTile::workspace(M, N, K); }

}  // namespace sm90
}  // namespace onnxqf
