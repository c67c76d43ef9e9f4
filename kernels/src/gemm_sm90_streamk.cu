// Instantiation of the stream-K tile configurations (gemm_sm90.cuh). Without grid dependency control: with it, the
// cooperative kernel's early release calls the stream-K scheduler's const is_last_tile, which CUTLASS 4.2 does not
// compile (a const member passed as a non-const reference). These kernels therefore never run as dependent launches.
#undef CUTLASS_ENABLE_GDC_FOR_SM90
#define ONNXQF_GEMM_NO_PDL
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

cudaError_t run_streamk(int cluster, const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                        const __half* bias, __half* y, int M, int N, int K, int sm_count, void* workspace,
                        cudaStream_t stream, bool /*pdl: never (above)*/) {
  return cluster > 1 ? StreamKClusterTile::run(q, amax, w, wscale, bias, y, M, N, K, sm_count, workspace, stream, false)
                     : StreamKTile::run(q, amax, w, wscale, bias, y, M, N, K, sm_count, workspace, stream, false);
}

size_t workspace_streamk(int cluster, int M, int N, int K, int sm_count) {
  return cluster > 1 ? StreamKClusterTile::workspace(M, N, K, sm_count) : StreamKTile::workspace(M, N, K, sm_count);
}

}  // namespace sm90
}  // namespace onnxqf
