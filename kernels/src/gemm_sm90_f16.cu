// An fp16 GEMM for SM90 with CUTLASS 3.x (wgmma, TMA, warp-specialized persistent kernel, fp32 accumulation, the
// sums rounded once to fp16): the dense factor of an online rotation applied to every token at once
// (launch_rotate_dense_quantize). D [M, N] = A [M, K] @ B, A row-major, B given as its transpose [N, K] with a
// leading dimension of its own (the op's padded factor), D row-major.
#include "gemm_sm90.cuh"

namespace onnxqf {
namespace {

using namespace cute;

struct F16Gemm {
  using Half = cutlass::half_t;
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  static constexpr int kAlign = 8;  // 16 bytes

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlign, Half,
      cutlass::layout::RowMajor, kAlign, cutlass::epilogue::TmaWarpSpecialized,
      cutlass::epilogue::fusion::ScaledAcc<Half, float, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Half, cutlass::layout::RowMajor, kAlign, Half,
      cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const __half* a, const __half* bt, int ldb, __half* d, int M, int N, int K,
                                            int sm_count) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    const StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, make_shape(M, K, 1));
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K, 1));
    get<0>(sb) = ldb;  // B^T's rows are ldb apart (the factor is zero-padded to a16)
    const StrideC sc = cutlass::make_cute_packed_stride(StrideC{}, make_shape(M, N, 1));
    const StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(M, N, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {reinterpret_cast<const Half*>(a), sa, reinterpret_cast<const Half*>(bt), sb},
                                  {{}, nullptr, sc, reinterpret_cast<Half*>(d), sd}};
    args.epilogue.thread.alpha = 1.f;
    args.hw_info.sm_count = sm_count;
    return args;
  }
};

}  // namespace

size_t f16_gemm_sm90_workspace(int64_t M, int64_t N, int64_t K) {
  if (!sm90::fits_int(M, N, K)) return 0;
  auto args = F16Gemm::arguments(nullptr, nullptr, int(K), nullptr, int(M), int(N), int(K), 0);
  return F16Gemm::Gemm::get_workspace_size(args);
}

cudaError_t launch_f16_gemm_sm90(const __half* a, const __half* bt, int64_t ldb, __half* d, int64_t M, int64_t N,
                                 int64_t K, void* workspace, cudaStream_t stream) {
  if (!sm90::fits_int(M, N, K) || ldb < K || ldb > INT_MAX || K % 8 != 0 || N % 8 != 0 || ldb % 8 != 0)
    return cudaErrorInvalidValue;
  const int sm_count = sm_count_of_current_device();
  return sm90::run_cutlass<F16Gemm::Gemm>(F16Gemm::arguments(a, bt, int(ldb), d, int(M), int(N), int(K), sm_count),
                                          workspace, stream);
}

}  // namespace onnxqf
