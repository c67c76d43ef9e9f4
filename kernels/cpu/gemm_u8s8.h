// onnxqf's CPU int8 GEMM (gemm_u8s8.cc): uint8 activation codes x int8 weights held in the "VNNI order", the
// per-row x per-column dequantization in its epilogue. Used by the onnxqf.cpu.W8A8Linear op (quantize_rows.cc).
//
//   Y[m][n] = s[m] * (w[n] * sum_k A[m][k] * Wq[k][n] - z[m] * c[n])
//
// A: uint8 [Mp, K] row-major, rows M..Mp-1 zero (Mp = M rounded up to kRowPad); Wq int8 [K, N] held packed as
// B [N / 16][K / 4][16][4]: B[j][q][i][t] = Wq[4q + t][16j + i] (each 64-byte line is 16 columns x 4 consecutive k,
// the operand of one VPDPBUSD and one row of an AMX B tile). K % 4 == 0 and N % 16 == 0; AMX needs K % 64 == 0.
#pragma once

#include <cstdint>

namespace onnxqf_cpu {

constexpr int64_t kRowPad = 16;

struct Gemm {
  const uint8_t* A;
  const int8_t* B;
  const float* s;  // per row
  const float* z;
  const float* w;  // per column
  const float* c;
  float* Y;  // [M, N]
  int64_t M, K, N;
  int path;  // set by gemm_tasks: a GemmPath
};

enum GemmPath : int { kGemmBase = 0, kGemmAvx2 = 1, kGemmVnni = 2, kGemmAmx = 3 };

// The number of tasks the product splits into (each a range of columns by a range of rows), ready for gemm_task.
int64_t gemm_tasks(Gemm& g);
void gemm_task(const Gemm& g, int64_t task);

// The best path this CPU has, capped by ONNXQF_CPU_ISA (read when the library loads): "amx", "vnni", "avx2" or
// "base".
const char* gemm_isa();

}  // namespace onnxqf_cpu
