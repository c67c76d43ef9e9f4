#!/usr/bin/env bash
# Build onnxqf's CPU op library: kernels/build/libonnxqf_cpu.so (an ONNX Runtime custom-op library, domain
# onnxqf.cpu, for the CPU execution provider; kernels/README.md).
#
#     bash kernels/build_cpu.sh        # or: python -m onnxqf.runtime.kernels build-cpu
#
# Needs a C++17 compiler ($CXX, else g++) on x86-64 or aarch64; the row kernel is compiled for AVX-512, AVX2 and the
# baseline on x86-64 and picked when the library loads. ONNX Runtime's C/C++ API headers as for kernels/build.sh
# ($ORT_INCLUDE_DIR, else Debian's libonnxruntime-dev through shared/ortheaders/fetch.sh). No CUDA.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
build=${ONNXQF_KERNELS_BUILD:-$here/build}
mkdir -p "$build"
. "$here/ortheaders.sh"  # sets ORT_INCLUDE_DIR

cxx=${CXX:-g++}
tmp=$(mktemp "$build/.libonnxqf_cpu.XXXXXX")
trap 'rm -f "$tmp"' EXIT
echo "== $cxx -> $build/libonnxqf_cpu.so"
"$cxx" -std=c++17 -O3 -fPIC -shared -fvisibility=hidden -fno-math-errno -Wall -Wextra \
  -I"$ORT_INCLUDE_DIR" "$here/cpu/quantize_rows.cc" "$here/cpu/gemm_u8s8.cc" -o "$tmp"
mv -f "$tmp" "$build/libonnxqf_cpu.so"
trap - EXIT
echo "== built $build/libonnxqf_cpu.so"
