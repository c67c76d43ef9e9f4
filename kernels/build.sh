#!/usr/bin/env bash
# Build onnxqf's CUDA kernels: kernels/build/libonnxqf_kernels.so (an ONNX Runtime custom-op library, sm_90a).
#
#     bash kernels/build.sh            # or: python -m onnxqf.runtime.kernels build
#
# Needs nvcc >= 12.3 (CUDA 13.0 here; $CUDACXX or nvcc on PATH or /usr/local/cuda/bin/nvcc), a C++17 compiler,
# Python with pip. Every other input comes from a registry, into kernels/build/ (ignored by git):
#   - CUTLASS's C++ headers from the PyPI wheel nvidia-cutlass (cutlass_library/source/include)
#   - libcudart.so.13 from the PyPI wheel nvidia-cuda-runtime (linked against; not copied)
#   - ONNX Runtime's C/C++ API headers: $ORT_INCLUDE_DIR (the folder holding onnxruntime_cxx_api.h) if set,
#     else Debian's libonnxruntime-dev through shared/ortheaders/fetch.sh
#   - cmake and ninja from PyPI when they are not installed
# The GPU is not needed to build. ONNXQF_KERNELS_BUILD=DIR builds elsewhere; JOBS=N sets the parallelism.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
build=${ONNXQF_KERNELS_BUILD:-$here/build}
deps=$build/deps
py=${PYTHON:-python3}
mkdir -p "$build"

cutlass=$deps/cutlass_library/source
cudart=$deps/nvidia/cu13/lib/libcudart.so.13
if [ ! -f "$cutlass/include/cutlass/cutlass.h" ] || [ ! -f "$cudart" ]; then
  echo "== nvidia-cutlass and nvidia-cuda-runtime wheels -> $deps"
  "$py" -m pip install -q --no-deps --upgrade --target "$deps" 'nvidia-cutlass==4.2.0.0' 'nvidia-cuda-runtime==13.0.*'
fi

. "$here/ortheaders.sh"  # sets ORT_INCLUDE_DIR

if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  echo "== cmake, ninja from PyPI"
  "$py" -m pip install -q cmake ninja
fi
nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}

echo "== cmake ($nvcc)"
cmake -S "$here" -B "$build/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DORT_INCLUDE_DIR="$ORT_INCLUDE_DIR" -DCUTLASS_INCLUDE_DIR="$cutlass/include" \
  -DCUTLASS_UTIL_INCLUDE_DIR="$cutlass/tools/util/include" -DCUDART_LIBRARY="$cudart" >/dev/null
cmake --build "$build/cmake" -j "${JOBS:-$(nproc)}"
cp "$build/cmake/libonnxqf_kernels.so" "$build/libonnxqf_kernels.so"
echo "== built $build/libonnxqf_kernels.so"
