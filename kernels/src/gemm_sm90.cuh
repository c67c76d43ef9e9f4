// The W8A8 GEMM for SM90 (H100/H200) with CUTLASS 3.x: int8 x int8 -> int32 on the tensor cores (wgmma),
// TMA loads, warp-specialized persistent kernel; the epilogue is an epilogue visitor tree that computes
//   y[m, n] = fp16( fma( fp32(acc[m, n]) * amax[m], wscale[n], bias[n] ) )
// (amax: a column vector broadcast along N, wscale and bias: row vectors broadcast along M; a null bias reads 0; with
// SWAP, below, CUTLASS's M is the channels and N the tokens, and the broadcasts are the other way round); with ASYM
// (the asymmetric codes, kernels.h) one node computes
//   y[m, n] = fp16( fma( (fp32(acc[m, n]) - z[m] * colsum[n]) * s[m], wscale[n], bias[n] ) )
// each step rounded on its own (AsymDequant).
// Each tile configuration is instantiated in its own .cu file so that they compile in parallel.
#pragma once

#include <climits>
#include <type_traits>

#include "kernels.h"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#if defined(__CUDA_ARCH__) && !defined(CUTLASS_GDC_ENABLED) && !defined(ONNXQF_GEMM_NO_PDL)
#error "CUTLASS's grid dependency control is off: the GEMM's dependent launch (ONNXQF_GEMM_PDL) would race"
#endif

namespace onnxqf {
namespace sm90 {

using namespace cute;

// Whether a GEMM's sizes are positive and fit CUTLASS's int problem shape.
inline bool fits_int(int64_t M, int64_t N, int64_t K) {
  return M > 0 && N > 0 && K > 0 && M <= INT_MAX && N <= INT_MAX && K <= INT_MAX;
}

// Runs a CUTLASS device GEMM on `stream`: cudaErrorNotSupported when CUTLASS cannot implement the problem.
// pdl: as a programmatic dependent launch (the kernel's prologue overlaps the end of the stream's previous kernel;
// its loads wait for it: CUTLASS_ENABLE_GDC_FOR_SM90, CMakeLists.txt).
template <class Gemm>
cudaError_t run_cutlass(const typename Gemm::Arguments& args, void* workspace, cudaStream_t stream,
                        bool pdl = false) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;
  if (gemm.run(stream, nullptr, pdl) != cutlass::Status::kSuccess) {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? cudaErrorLaunchFailure : e;
  }
  return cudaGetLastError();
}

// The stream-K scheduler's own arguments (split-K, decomposition, reduction); other schedulers have none.
template <class SchedulerArgs>
auto set_streamk(SchedulerArgs& a, const GemmSchedule& s, int) -> decltype(a.splits, void()) {
  using cutlass::gemm::kernel::detail::DecompositionMode;
  using cutlass::gemm::kernel::detail::ReductionMode;
  constexpr DecompositionMode modes[] = {DecompositionMode::Heuristic, DecompositionMode::DataParallel,
                                         DecompositionMode::SplitK, DecompositionMode::StreamK};
  a.splits = s.splits;
  a.decomposition_mode = modes[s.decomposition & 3];
  a.reduction_mode = s.atomic ? ReductionMode::Nondeterministic : ReductionMode::Deterministic;
}
template <class SchedulerArgs>
void set_streamk(SchedulerArgs&, const GemmSchedule&, long) {}

// The asymmetric codes' dequantization of a fragment (Sm90Compute's functor: one template parameter, called with
// fp32 arrays, the accumulators converted to fp32 by the node): (acc - z * colsum) * s by __fmul_rn / __fsub_rn (no
// contraction: each step as int8-token-asym's fp32 nodes round it), then fma(., wscale, bias) as the symmetric tree.
template <class T>
struct AsymDequant {
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& z, T const& colsum, T const& s, T const& wscale,
                                   T const& bias) const {
    T r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < static_cast<int>(T::kElements); ++i)
      r[i] = fmaf(__fmul_rn(__fsub_rn(acc[i], __fmul_rn(z[i], colsum[i])), s[i]), wscale[i], bias[i]);
    return r;
  }
};

// SWAP: the kernel computes y^T [N, M] = w [N, K] . q^T instead: the weight is CUTLASS's A, so the output channels
// fill the tile's first (M) side in steps of 64 (wgmma's rows) and the tokens its second side, which wgmma takes in
// steps of 16. Few tokens then need no 64- or 128-row tile of padding, and more channel tiles share the GPU. The same
// operands in memory (both K-major), the same epilogue arithmetic with its broadcasts swapped, y^T written
// column-major: y row-major.
template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule,
          class TileScheduler = cutlass::gemm::PersistentScheduler, bool SWAP = false, bool ASYM = false>
struct W8A8Gemm {
  // the same tile with the asymmetric codes' epilogue
  using Asym = W8A8Gemm<TileShape, ClusterShape, KernelSchedule, EpilogueSchedule, TileScheduler, SWAP, true>;
  using ElementA = int8_t;  // codes of x, [M, K] row-major (SWAP: w, [N, K] row-major)
  using LayoutA = cutlass::layout::RowMajor;
  using ElementB = int8_t;  // w, [N, K] row-major = [K, N] column-major (SWAP: the codes, [M, K] row-major)
  using LayoutB = cutlass::layout::ColumnMajor;
  using ElementD = cutlass::half_t;
  using LayoutD = std::conditional_t<SWAP, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  static constexpr int kAlignA = 16;
  static constexpr int kAlignB = 16;
  static constexpr int kAlignD = 8;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  // a vector along the tile's first side (ColBroadcast) or its second (RowBroadcast); ALIGN elements per load
  template <bool ALONG_FIRST, class T, int ALIGN>
  using Vector = std::conditional_t<
      ALONG_FIRST, cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, T, float, Stride<_1, _0, int64_t>, ALIGN>,
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, T, float, Stride<_0, _1, int64_t>, ALIGN>>;
  using TokenScale = Vector<!SWAP, float, 1>;  // amax[m]: any M
  using ChannelScale = Vector<SWAP, float, 4>;  // N % 8 == 0
  using Bias = Vector<SWAP, cutlass::half_t, 8>;
  using TokenScaled = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, Acc, TokenScale>;
  using SymTree = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>, TokenScaled,
      ChannelScale, Bias>;
  using TokenZero = TokenScale;      // z[m]
  using ChannelSum = ChannelScale;   // colsum[n]
  using AsymTree = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<AsymDequant, ElementD, float, kRound>, Acc, TokenZero, ChannelSum,
      TokenScale, ChannelScale, Bias>;
  using Tree = std::conditional_t<ASYM, AsymTree, SymTree>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute, void, LayoutD, kAlignD, ElementD,
      LayoutD, kAlignD, EpilogueSchedule, Tree>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignA, ElementB, LayoutB, kAlignB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const int8_t* q, const float* amax, const int8_t* w, const float* wscale,
                                            const __half* bias, __half* y, int M, int N, int K, int sm_count,
                                            const GemmSchedule& sched, const float* zero, const float* colsum) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    // CUTLASS's problem: rows x columns of its output, its A and B (SWAP: y^T, w and the codes)
    const int rows = SWAP ? N : M, cols = SWAP ? M : N;
    const StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, make_shape(rows, K, 1));
    const StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(cols, K, 1));
    const StrideC sc = cutlass::make_cute_packed_stride(StrideC{}, make_shape(rows, cols, 1));
    const StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(rows, cols, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {rows, cols, K, 1},
                                  {SWAP ? w : q, sa, SWAP ? q : w, sb},
                                  {{}, nullptr, sc, reinterpret_cast<ElementD*>(y), sd}};
    auto& tree = args.epilogue.thread;
    using Half = cutlass::half_t;
    if constexpr (ASYM) {
      // children of the root, in order: Acc, TokenZero, ChannelSum, TokenScale, ChannelScale, Bias, op
      tree = {{}, {zero, 0.f, {}}, {colsum, 0.f, {}}, {amax, 0.f, {}}, {wscale, 0.f, {}},
              {reinterpret_cast<const Half*>(bias), Half(0), {}}, {}};
    } else {
      // children of the root, in order: TokenScaled {Acc, TokenScale, op}, ChannelScale, Bias, op
      tree = {{{}, {amax, 0.f, {}}, {}}, {wscale, 0.f, {}}, {reinterpret_cast<const Half*>(bias), Half(0), {}}, {}};
    }
    args.hw_info.sm_count = sm_count;
    using cutlass::gemm::kernel::detail::RasterOrderOptions;
    constexpr RasterOrderOptions rasters[] = {RasterOrderOptions::Heuristic, RasterOrderOptions::AlongM,
                                              RasterOrderOptions::AlongN};
    args.scheduler.max_swizzle_size = sched.swizzle;
    args.scheduler.raster_order = rasters[sched.raster % 3];
    set_streamk(args.scheduler, sched, 0);
    return args;
  }

  // (stream-K's partial sums depend on sm_count and the schedule)
  static size_t workspace(int M, int N, int K, int sm_count, const GemmSchedule& sched) {
    auto args = arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, sm_count, sched, nullptr,
                          nullptr);
    return Gemm::get_workspace_size(args);
  }

  // zero, colsum: the asymmetric codes' (ASYM; ignored otherwise)
  static cudaError_t run(const int8_t* q, const float* amax, const int8_t* w, const float* wscale, const __half* bias,
                         __half* y, int M, int N, int K, int sm_count, void* workspace, cudaStream_t stream,
                         bool pdl, const GemmSchedule& sched, const float* zero, const float* colsum) {
#ifdef ONNXQF_GEMM_NO_PDL
    pdl = false;  // built without grid dependency control: never a dependent launch
#endif
    return run_cutlass<Gemm>(arguments(q, amax, w, wscale, bias, y, M, N, K, sm_count, sched, zero, colsum),
                             workspace, stream, pdl);
  }
};

// tile 0: large M. 128x128x128 tiles, clusters of 2 along M (the weight tile is multicast), ping-pong consumers.
using LargeTile = W8A8Gemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                           cutlass::epilogue::TmaWarpSpecialized>;
// tile 1: M <= 128. 64x128x128 tiles, no cluster, ping-pong consumers.
using SmallTile = W8A8Gemm<Shape<_64, _128, _128>, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                           cutlass::epilogue::TmaWarpSpecialized>;

// tile 2: large M, wider: 128x256x128 tiles in clusters of 2 along M, cooperative consumers (two warpgroups split M).
using WideTile = W8A8Gemm<Shape<_128, _256, _128>, Shape<_2, _1, _1>,
                          cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                          cutlass::epilogue::TmaWarpSpecializedCooperative>;

// tiles 3 and 4: 128x128x128 with a stream-K scheduler (cooperative consumers: CUTLASS's ping-pong kernel has no
// stream-K), without a cluster (3) or in clusters of 2 along M (4). A persistent grid splits the K loops of the last
// wave's tiles across the multiprocessors (partial int32 sums reduced in a fixed order in the workspace: the same
// bits as the data-parallel tiles) instead of leaving most of them idle: for M between one and a few waves of tiles
// (docs/benchmarks.md g15).
// Built without CUTLASS's grid dependency control (gemm_sm90_streamk.cu: CUTLASS 4.2's stream-K scheduler does not
// compile with it), so never launched as a dependent.
using StreamKTile = W8A8Gemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>,
                             cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                             cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler>;
using StreamKClusterTile = W8A8Gemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                                    cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                    cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler>;

// tiles 5, 6 and 7: 256x128x128, cooperative consumers (a warpgroup per 128 rows), in clusters of 2 along M (5: the
// weight tile multicast), of 2 along N (6: the activation tile multicast) or of 2 x 2 (7: both). Per k step a
// 128x128 tile loads 32 KB for 2.1 M products; a 256x128 tile 48 KB for twice as many, less again with multicast
// (timed against the others: docs/benchmarks.md g16).
template <class Cluster>
using TallTile = W8A8Gemm<Shape<_256, _128, _128>, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                          cutlass::epilogue::TmaWarpSpecializedCooperative>;
// tile 8: tile 0 in clusters of 2 along N (the activation tile multicast instead of the weight's).
using LargeTileN = W8A8Gemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized>;

// tiles 9-12, SWAP (the tokens on the tile's second side; channels x tokens x k): for M below a few waves of 128-row
// tiles, where tokens rounded up to 64 or 128 leave most of a tile empty and few tiles share the GPU (docs/benchmarks.md
// g16: at 264 rows cuBLAS's FP16 runs 128 CTAs of 64 x 136, one wave; tile 3 runs 96 CTAs of 128 x 128, one of them
// 8 rows high). 9: 64 x 144, ping-pong, clusters of 2 along the channels (the token tile multicast); 10: 128 x 144,
// cooperative, the same clusters; 11 and 12: 128 x 32 and 128 x 64 with the stream-K scheduler (at a few tokens the
// channel tiles alone cannot fill the GPU: their K loops are split across it).
using SwapTile64 = W8A8Gemm<Shape<_64, _144, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                            cutlass::epilogue::TmaWarpSpecialized, cutlass::gemm::PersistentScheduler, true>;
using SwapTile128 = W8A8Gemm<Shape<_128, _144, _128>, Shape<_2, _1, _1>,
                             cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                             cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler, true>;
template <class Tokens>
using SwapStreamKTile = W8A8Gemm<Shape<_128, Tokens, _128>, Shape<_1, _1, _1>,
                                 cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                 cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler, true>;

// A tile configuration's entry points (the same signature for every configuration: W8A8Gemm::run, ::workspace),
// with the symmetric and the asymmetric codes' epilogues.
struct TileFns {
  using Run = cudaError_t (*)(const int8_t*, const float*, const int8_t*, const float*, const __half*, __half*, int,
                              int, int, int, void*, cudaStream_t, bool, const GemmSchedule&, const float*,
                              const float*);
  using Workspace = size_t (*)(int, int, int, int, const GemmSchedule&);
  Run run;
  Workspace workspace;
  Run run_asym;
  Workspace workspace_asym;
};
template <class Config>
constexpr TileFns fns_of() {
  return {&Config::run, &Config::workspace, &Config::Asym::run, &Config::Asym::workspace};
}
// one per file that instantiates tiles (each compiles on its own): the configuration of `tile`, or the file's
// first for a tile it does not hold
TileFns tile_fns_large(int tile);    // 0, 8 (gemm_sm90_large.cu)
TileFns tile_fns_small(int tile);    // 1 (gemm_sm90_small.cu)
TileFns tile_fns_wide(int tile);     // 2 (gemm_sm90_wide.cu)
TileFns tile_fns_streamk(int tile);  // 3, 4 (gemm_sm90_streamk.cu)
TileFns tile_fns_tall(int tile);     // 5, 6, 7 (gemm_sm90_tall.cu)
TileFns tile_fns_swap(int tile);     // 9, 10 (gemm_sm90_swap.cu)
TileFns tile_fns_swap_streamk(int tile);  // 11, 12 (gemm_sm90_swap_streamk.cu)

}  // namespace sm90
}  // namespace onnxqf
