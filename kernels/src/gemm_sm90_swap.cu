// Instantiation of the data-parallel SWAP tile configurations, tiles 9 and 10 (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

TileFns tile_fns_swap(int tile) { return tile == 10 ? fns_of<SwapTile128>() : fns_of<SwapTile64>(); }

}  // namespace sm90
}  // namespace onnxqf
