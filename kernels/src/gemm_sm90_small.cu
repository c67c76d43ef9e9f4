// Instantiation of the small-M tile configuration (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

TileFns tile_fns_small(int) { return fns_of<SmallTile>(); }

}  // namespace sm90
}  // namespace onnxqf
