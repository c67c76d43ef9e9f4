// The asymmetric codes' row arithmetic of kernels/src/quant_row.cuh (asym_row_scale, code_of, chunk_range: the
// same source the kernels run) compiled for the host, so that a CPU test can hold it against numpy
// (tests/test_cuda_kernels_lowering.py: test_asymmetric_row_arithmetic_on_the_host). No GPU is needed.
//   asym_row_host IN OUT M K
// IN: M * K fp16 values (row-major); OUT: per row its fp32 s and z, then its K int8 codes.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "quant_row.cuh"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: asym_row_host IN OUT M K\n");
    return 2;
  }
  const long M = std::atol(argv[3]), K = std::atol(argv[4]);
  if (M <= 0 || K <= 0 || K % 8) {
    std::fprintf(stderr, "asym_row_host: M > 0 and K a positive multiple of 8\n");
    return 2;
  }
  std::vector<__half> x(static_cast<size_t>(M * K));
  FILE* in = std::fopen(argv[1], "rb");
  if (!in || std::fread(x.data(), sizeof(__half), x.size(), in) != x.size()) {
    std::fprintf(stderr, "asym_row_host: cannot read %s\n", argv[1]);
    return 1;
  }
  std::fclose(in);
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 1;
  std::vector<int8_t> codes(static_cast<size_t>(K));
  for (long m = 0; m < M; ++m) {
    const __half* row = x.data() + m * K;
    float hi = 0.f, nlo = 0.f;
    for (long c = 0; c < K / 8; ++c) onnxqf::chunk_range(reinterpret_cast<const uint4*>(row)[c], hi, nlo);
    float s = 0.f, z = 0.f;
    const onnxqf::AsymScale a = onnxqf::asym_row_scale(hi, nlo, &s, &z);
    for (long k = 0; k < K; ++k) codes[k] = onnxqf::code_of(row[k], a);
    std::fwrite(&s, sizeof s, 1, out);
    std::fwrite(&z, sizeof z, 1, out);
    std::fwrite(codes.data(), 1, codes.size(), out);
  }
  return std::fclose(out) == 0 ? 0 : 1;
}
