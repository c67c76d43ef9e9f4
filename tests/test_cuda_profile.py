"""The GPU kernel-time table's pure parts (onnxqf.runtime.cuda_profile) on hand-made trace events."""

import pytest

from onnxqf.errors import OnnxqfError
from onnxqf.runtime.cuda_profile import kernel_family, kernel_times


@pytest.mark.parametrize("name, family", [
    ("void onnxqf::(anonymous namespace)::walsh_quantize_kernel<4>(__half const*, signed char*, float*, int)",
     "walsh_quantize_kernel<4>"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int>, "
     "cutlass::gemm::collective::CollectiveMma<int8_t, int8_t>>>(Params)", "cutlass GEMM int8"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::half_t, half>>(Params)",
     "cutlass GEMM fp16"),
    # mangled, as CUPTI reports CUTLASS 3 kernels: int8 operands ("a") with half_t output; fp16 operands
    ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEENS1_10collective13CollectiveMmaI"
     "NS1_35MainloopSm90TmaGmmaWarpSpecializedILi4ENS5_ILi1ELi1ELi1EEEEENS5_IJNS4_1CILi128EEESG_SG_EEEaNS5_IJlS9_"
     "EEEaNS_6half_tEEEvEEvNT_6ParamsE", "cutlass GEMM int8"),
    ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEENS1_10collective13CollectiveMmaI"
     "NS1_35MainloopSm90TmaGmmaWarpSpecializedILi4EEENS_6half_tENS5_IJlS9_EEES8_EEvEEvNT_6ParamsE",
     "cutlass GEMM fp16"),
    ("void onnxruntime::cuda::_BinaryElementWise<float, float, float, onnxruntime::cuda::OP_Add<float>, true>"
     "(float const*, float*)", "_BinaryElementWise"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_war"),  # cut at 60
])
def test_kernel_family_names(name, family):
    assert kernel_family(name) == family


def test_kernel_times_sums_per_family_per_run():
    events = [
        {"cat": "kernel", "name": "void a::k<1>(int)", "dur": 30},
        {"cat": "kernel", "name": "void b::k<2>(float)", "dur": 10},  # the same family: k
        {"cat": "kernel", "name": "void onnxqf::gemv<4>(int)", "dur": 100},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 4},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "dur": 1000},  # host side: not a GPU time
        {"ph": "M", "name": "process_name"},
    ]
    t = kernel_times(events, runs=2)
    assert list(t) == ["gemv<4>", "k", "memcpy"]  # largest first
    assert t == pytest.approx({"gemv<4>": 0.05, "k": 0.02, "memcpy": 0.002})


def test_linears_kernel_times_need_cuda():
    from onnxqf.runtime.linears import LinearsOptions

    with pytest.raises(OnnxqfError, match="needs --ep cuda"):
        LinearsOptions(ep="cpu", kernel_times=True)
