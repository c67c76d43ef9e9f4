// Instantiation of the stream-K SWAP tile configurations, tiles 11 and 12 (gemm_sm90.cuh). Without grid dependency
// control, as gemm_sm90_streamk.cu and for the same reason: never launched as dependents.
#undef CUTLASS_ENABLE_GDC_FOR_SM90
#define ONNXQF_GEMM_NO_PDL
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

TileFns tile_fns_swap_streamk(int tile) {
  return tile == 12 ? fns_of<SwapStreamKTile<_64>>() : fns_of<SwapStreamKTile<_32>>();
}

}  // namespace sm90
}  // namespace onnxqf
