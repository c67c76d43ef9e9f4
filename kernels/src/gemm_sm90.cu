// Dispatch to the SM90 tile configurations (host code only; the kernels live in
// gemm_sm90_{large,small,wide,streamk,tall,swap,swap_streamk}.cu).
#include <climits>

#include "gemm_sm90.cuh"

namespace onnxqf {

int sm_count_of_current_device() {
  static const int n = [] {
    int dev = 0, count = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
    return count;
  }();
  return n;
}

int w8a8_gemm_sm90_tile(int64_t M, int64_t N, int sm_count) {
  if (M <= 128 || N <= 0 || sm_count <= 0) return 1;
  const int64_t n_tiles = (N + 127) / 128;
  // waves of tiles the grid takes x rows per tile x a factor per tile (the 256-row tile does more per row)
  auto cost = [&](int64_t rows, double factor) {
    const int64_t tiles = (M + rows - 1) / rows * n_tiles;
    return double((tiles + sm_count - 1) / sm_count) * double(rows) * factor;
  };
  const double c64 = cost(64, 1.25), c128 = cost(128, 1.0), c256 = cost(256, 0.85);
  if (c256 <= c128 && c256 <= c64) return 6;
  if (c128 <= c64) return (M + 127) / 128 % 2 == 0 ? 0 : 3;
  return 1;
}

namespace {
// The tile's configuration; tiles outside 0..kGemmTiles-1 are refused before (ops.cc) and here run tile 0's.
sm90::TileFns tile_fns(int tile) {
  switch (tile) {
    case 1: return sm90::tile_fns_small(tile);
    case 2: return sm90::tile_fns_wide(tile);
    case 3: case 4: return sm90::tile_fns_streamk(tile);
    case 5: case 6: case 7: return sm90::tile_fns_tall(tile);
    case 9: case 10: return sm90::tile_fns_swap(tile);
    case 11: case 12: return sm90::tile_fns_swap_streamk(tile);
    default: return sm90::tile_fns_large(tile);
  }
}
}  // namespace

const char* gemm_schedule_error(const GemmSchedule& s) {
  if (s.swizzle != 1 && s.swizzle != 2 && s.swizzle != 4 && s.swizzle != 8) return "swizzle must be 1, 2, 4 or 8";
  if (s.raster < 0 || s.raster > 2) return "raster must be 0 (heuristic), 1 (along M) or 2 (along N)";
  if (s.decomposition < 0 || s.decomposition > 3)
    return "decomposition must be 0 (heuristic), 1 (data-parallel), 2 (split-K) or 3 (stream-K)";
  if (s.splits < 1 || s.splits > 64) return "splits must be from 1 to 64";
  return nullptr;
}

size_t w8a8_gemm_sm90_workspace(int tile, int64_t M, int64_t N, int64_t K, const GemmSchedule& s) {
  if (!sm90::fits_int(M, N, K)) return 0;
  return tile_fns(tile).workspace(int(M), int(N), int(K), sm_count_of_current_device(), s);
}

cudaError_t launch_w8a8_gemm_sm90(int tile, const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                                  const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, void* workspace,
                                  cudaStream_t stream, bool pdl, const GemmSchedule& s) {
  if (!sm90::fits_int(M, N, K) || K % 16 != 0 || N % 8 != 0) return cudaErrorNotSupported;
  return tile_fns(tile).run(q, amax, w, wscale, bias, y, int(M), int(N), int(K), sm_count_of_current_device(),
                            workspace, stream, pdl, s);
}

}  // namespace onnxqf
