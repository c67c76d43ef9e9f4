// onnxqf's CPU op library (libonnxqf_cpu.so): per-token uint8 quantization in one node for ONNX Runtime's CPU
// provider, domain "onnxqf.cpu". See kernels/README.md ("The CPU library").
//
// QuantizeRows: X float32 [..., K] -> Q uint8 [..., K], A float32 [..., 1], for every row (token) x:
//   A = max(max_k |x_k|, 1e-6)          (the float32 steps of Max(ReduceMax(Abs(x)), 1e-6))
//   s = A / 127                         (float32 division, as Div(amax, 127))
//   Q = saturate(round_half_even(x / s) + 128)   (as QuantizeLinear(x, s, 128) into uint8)
// which are the codes and the scale of onnxqf's uint8-token-ql lowering (onnxqf/lowering/w8a8.py), made in one
// pass over the row instead of six nodes. Rows are spread over ONNX Runtime's intra-op threads.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#define ONNXQF_CPU_VERSION "1"

namespace {

const OrtApi* g_api = nullptr;

OrtStatusPtr fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, msg.c_str()); }

constexpr float kFloor = 1e-6f;  // = the tiny of onnxqf.lowering.w8a8.token_amax for float32 graphs
constexpr float kQmax = 127.f;

#if defined(__x86_64__)
#define ONNXQF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ONNXQF_CLONES
#endif

// One row: its amax (floored) and its codes. On x86-64 compiled for AVX-512, AVX2 and the baseline, picked at load.
ONNXQF_CLONES float quantize_row(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t K) {
  float m = 0.f;
  for (int64_t k = 0; k < K; ++k) m = std::fmax(m, std::fabs(x[k]));
  const float amax = std::fmax(m, kFloor);
  const float step = amax / kQmax;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] / step) + 128.f;  // the default rounding mode: half to even
    v = std::fmin(std::fmax(v, 0.f), 255.f);
    q[k] = static_cast<uint8_t>(v);
  }
  return amax;
}

struct Rows {
  const float* x;
  uint8_t* q;
  float* a;
  int64_t K;
  int64_t rows;
  int64_t per_task;
};

void run_task(void* data, size_t task) {
  const Rows& r = *static_cast<const Rows*>(data);
  const int64_t first = static_cast<int64_t>(task) * r.per_task;
  const int64_t last = std::min(r.rows, first + r.per_task);
  for (int64_t i = first; i < last; ++i) r.a[i] = quantize_row(r.x + i * r.K, r.q + i * r.K, r.K);
}

struct QuantizeRowsKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      auto X = ctx.GetInput(0);
      const std::vector<int64_t> shape = X.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty()) return fail("onnxqf.cpu.QuantizeRows: X must have rank >= 1");
      const int64_t K = shape.back();
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
      std::vector<int64_t> ashape = shape;
      ashape.back() = 1;
      auto Q = ctx.GetOutput(0, shape);
      auto A = ctx.GetOutput(1, ashape);
      if (rows == 0 || K == 0) {
        if (K == 0 && rows > 0) std::fill_n(A.GetTensorMutableData<float>(), rows, kFloor);
        return nullptr;
      }
      Rows r{X.GetTensorData<float>(), Q.GetTensorMutableData<uint8_t>(), A.GetTensorMutableData<float>(), K, rows,
             0};
      // tasks of at least ~32k values: small rows (decode) stay on one thread
      r.per_task = std::max<int64_t>(1, (int64_t{1} << 15) / K);
      const int64_t tasks = (rows + r.per_task - 1) / r.per_task;
      if (tasks == 1) {
        run_task(&r, 0);
      } else {
        ctx.ParallelFor(run_task, static_cast<size_t>(tasks), 0, &r);
      }
      return nullptr;
    } catch (const Ort::Exception& e) {
      return fail(std::string("onnxqf.cpu.QuantizeRows: ") + e.what());
    } catch (const std::exception& e) {
      return fail(std::string("onnxqf.cpu.QuantizeRows: ") + e.what());
    }
  }
};

struct QuantizeRowsOp : Ort::CustomOpBase<QuantizeRowsOp, QuantizeRowsKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* /*info*/, void** kernel) const {
    *kernel = new QuantizeRowsKernel();
    return nullptr;
  }
  const char* GetName() const { return "QuantizeRows"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape s = ctx.GetInputShape(0);
    if (s.empty()) return nullptr;
    if (OrtStatusPtr st = ctx.SetOutputShape(0, s, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8).release()) return st;
    s.back() = Ort::ShapeInferContext::SymbolicInteger(int64_t{1});
    return ctx.SetOutputShape(1, s, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT).release();
  }
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char* onnxqf_cpu_version() { return ONNXQF_CPU_VERSION; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (!g_api) return nullptr;  // cannot even report: an ONNX Runtime older than the headers
  Ort::InitApi(g_api);
  static QuantizeRowsOp quantize_rows;
  static Ort::CustomOpDomain* domain = nullptr;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  try {
    if (!domain) {
      domain = new Ort::CustomOpDomain("onnxqf.cpu");
      domain->Add(&quantize_rows);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
