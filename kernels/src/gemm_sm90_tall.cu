// Instantiation of the 256x128 tile configurations, tiles 5, 6 and 7 (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

TileFns tile_fns_tall(int tile) {
  switch (tile) {
    case 5: return fns_of<TallTile<Shape<_2, _1, _1>>>();
    case 6: return fns_of<TallTile<Shape<_1, _2, _1>>>();
    default: return fns_of<TallTile<Shape<_2, _2, _1>>>();
  }
}

}  // namespace sm90
}  // namespace onnxqf
