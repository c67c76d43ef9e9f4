// Instantiation of the wide large-M tile configuration (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace sm90 {

TileFns tile_fns_wide(int) { return fns_of<WideTile>(); }

}  // namespace sm90
}  // namespace onnxqf
