// Instantiation of the 128x128 tile configurations, clusters along M (0) or N (8) (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

TileFns tile_fns_large(int tile) {
  return tile == 8 ? fns_of<LargeTileN>() : fns_of<LargeTile>();
}

}  // namespace sm90
}  // namespace onnxqf
