// Instantiation of the stream-K tile configurations (gemm_sm90.cuh). Without grid dependency control: with it, the
// cooperative kernel's early release calls the stream-K scheduler's const is_last_tile, which CUTLASS 4.2 does not
// compile (a const member passed as a non-const reference). These kernels therefore never run as dependent launches
// (W8A8Gemm::run drops pdl under ONNXQF_GEMM_NO_PDL).
#undef CUTLASS_ENABLE_GDC_FOR_SM90
#define ONNXQF_GEMM_NO_PDL
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

TileFns tile_fns_streamk(int tile) {
  return tile == 4 ? fns_of<StreamKClusterTile>() : fns_of<StreamKTile>();
}

}  // namespace sm90
}  // namespace onnxqf
