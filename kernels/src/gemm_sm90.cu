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

int w8a8_gemm_sm90_tile(int64_t M, int64_t N, int sm_count, int rule) {
  if (N <= 0 || sm_count <= 0) return 1;
  if (M <= 128) return rule == 1 ? (M <= 32 ? 11 : 12) : 1;
  // the grid's tiles; pair: the channel tiles run in clusters of 2 (tiles 9, 10), an odd count padded with one
  auto tiles = [&](int64_t tokens, int64_t channels, bool pair) {
    int64_t channel_tiles = (N + channels - 1) / channels;
    if (pair) channel_tiles += channel_tiles % 2;
    return (M + tokens - 1) / tokens * channel_tiles;
  };
  // waves of tiles the grid takes x the products per tile x a factor per tile (larger tiles do more per byte loaded)
  auto cost = [&](int64_t tokens, int64_t channels, double factor, bool pair = false) {
    return double((tiles(tokens, channels, pair) + sm_count - 1) / sm_count) * double(tokens * channels) * factor;
  };
  // candidates from the largest tile down; a later one wins only when strictly cheaper (ties go to the larger)
  const int t128 = (M + 127) / 128 % 2 == 0 ? 0 : 3;
  struct Candidate {
    int tile;
    double cost;
  };
  const Candidate all[] = {{6, cost(256, 128, 0.85)}, {10, cost(144, 128, 1.0, true)}, {t128, cost(128, 128, 1.0)},
                           {9, cost(144, 64, 1.25, true)}, {1, cost(64, 128, 1.25)}};
  // rule 0 takes tile 9 only where its grid is one wave (measured faster there: 264 rows at N = 4096, H100,
  // docs/benchmarks.md g18; slower at more waves, and tiles 10-12 slower everywhere timed)
  const bool one_wave9 = tiles(144, 64, true) <= sm_count;
  Candidate best = all[0];
  for (const Candidate& c : all)
    if ((rule == 1 || (c.tile != 9 && c.tile != 10) || (c.tile == 9 && one_wave9)) && c.cost < best.cost) best = c;
  return best.tile;
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

size_t w8a8_gemm_sm90_workspace(int tile, int64_t M, int64_t N, int64_t K, const GemmSchedule& s, bool asym) {
  if (!sm90::fits_int(M, N, K)) return 0;
  const sm90::TileFns f = tile_fns(tile);
  return (asym ? f.workspace_asym : f.workspace)(int(M), int(N), int(K), sm_count_of_current_device(), s);
}

cudaError_t launch_w8a8_gemm_sm90(int tile, const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                                  const __half* bias, __half* y, int64_t M, int64_t N, int64_t K, void* workspace,
                                  cudaStream_t stream, bool pdl, const GemmSchedule& s, const float* zero,
                                  const float* colsum) {
  if (!sm90::fits_int(M, N, K) || K % 16 != 0 || N % 8 != 0) return cudaErrorNotSupported;
  if (static_cast<bool>(zero) != static_cast<bool>(colsum)) return cudaErrorInvalidValue;
  const sm90::TileFns f = tile_fns(tile);
  return (zero ? f.run_asym : f.run)(q, amax, w, wscale, bias, y, int(M), int(N), int(K),
                                     sm_count_of_current_device(), workspace, stream, pdl, s, zero, colsum);
}

}  // namespace onnxqf
