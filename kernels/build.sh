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
#
# A GPU machine without network: on one with network
#     bash kernels/build.sh --pack-deps deps.tar.xz       # the inputs above in one file (~1.3 MB); builds nothing
# then, on the GPU machine (nvcc, a C++17 compiler, cmake and ninja installed)
#     ONNXQF_KERNELS_DEPS=deps.tar.xz bash kernels/build.sh
# unpacks them into kernels/build/ and builds with no download.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
build=${ONNXQF_KERNELS_BUILD:-$here/build}
case $build in /*) ;; *) build=$PWD/$build ;; esac  # absolute: the pack links to what lies in it
deps=$build/deps
py=${PYTHON:-python3}
usage="usage: bash kernels/build.sh [--pack-deps FILE]"
pack=""
if [ "${1:-}" = "--pack-deps" ]; then
  [ -n "${2:-}" ] || { echo "onnxqf kernels: --pack-deps needs a file to write (e.g. deps.tar.xz)" >&2; exit 2; }
  [ $# -eq 2 ] || { echo "onnxqf kernels: unexpected argument after --pack-deps $2 ($usage)" >&2; exit 2; }
  case $2 in */) echo "onnxqf kernels: --pack-deps $2: a file to write, not a folder" >&2; exit 2 ;; esac
  [ ! -d "$2" ] || { echo "onnxqf kernels: --pack-deps $2: a file to write, not a folder" >&2; exit 2; }
  [ -d "$(dirname "$2")" ] || { echo "onnxqf kernels: --pack-deps $2: no folder $(dirname "$2")" >&2; exit 2; }
  pack=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
elif [ -n "${1:-}" ]; then
  echo "onnxqf kernels: unknown argument $1 ($usage)" >&2
  exit 2
fi
# what a pack holds, under the names this script looks for
pack_files="deps/cutlass_library/source/include/cutlass/cutlass.h
deps/cutlass_library/source/tools/util/include/cutlass/util/packed_stride.hpp
deps/nvidia/cu13/lib/libcudart.so.13
ortheaders/include/onnxruntime/onnxruntime_cxx_api.h"
if [ -n "${ONNXQF_KERNELS_DEPS:-}" ]; then
  [ -f "$ONNXQF_KERNELS_DEPS" ] || { echo "onnxqf kernels: ONNXQF_KERNELS_DEPS=$ONNXQF_KERNELS_DEPS: no such file" >&2; exit 2; }
  listing=$(tar -tJf "$ONNXQF_KERNELS_DEPS" 2>/dev/null || true)
  for f in $pack_files; do
    if ! grep -qxF "$f" <<<"$listing"; then
      echo "onnxqf kernels: ONNXQF_KERNELS_DEPS=$ONNXQF_KERNELS_DEPS is not a whole pack written by" \
           "\`bash kernels/build.sh --pack-deps FILE\` (no $f in it)" >&2
      exit 2
    fi
  done
  mkdir -p "$build"
  echo "== build inputs from $ONNXQF_KERNELS_DEPS -> $build"
  tar -xJf "$ONNXQF_KERNELS_DEPS" -C "$build"
fi

mkdir -p "$build"

cutlass=$deps/cutlass_library/source
cudart=$deps/nvidia/cu13/lib/libcudart.so.13
if [ ! -f "$cutlass/include/cutlass/cutlass.h" ] || [ ! -f "$cudart" ]; then
  echo "== nvidia-cutlass and nvidia-cuda-runtime wheels -> $deps"
  "$py" -m pip install -q --no-deps --upgrade --target "$deps" 'nvidia-cutlass==4.2.0.0' 'nvidia-cuda-runtime==13.0.*'
fi

. "$here/ortheaders.sh"  # sets ORT_INCLUDE_DIR

if [ -n "$pack" ]; then
  # the inputs under the names this script looks for them by, written whole or not at all
  stage=$(mktemp -d)
  trap 'rm -rf "$stage" "$pack.tmp.$$"' EXIT
  mkdir -p "$stage/deps/cutlass_library/source/tools/util" "$stage/deps/nvidia/cu13/lib" "$stage/ortheaders/include"
  ln -s "$cutlass/include" "$stage/deps/cutlass_library/source/include"
  ln -s "$cutlass/tools/util/include" "$stage/deps/cutlass_library/source/tools/util/include"
  ln -s "$cudart" "$stage/deps/nvidia/cu13/lib/libcudart.so.13"
  ln -s "$(cd "$ORT_INCLUDE_DIR" && pwd)" "$stage/ortheaders/include/onnxruntime"
  tar -chJf "$pack.tmp.$$" -C "$stage" deps ortheaders
  mv "$pack.tmp.$$" "$pack"
  echo "== wrote $pack ($(du -h "$pack" | cut -f1)): on the machine to build on," \
       "ONNXQF_KERNELS_DEPS=$(basename "$pack") bash kernels/build.sh"
  exit 0
fi

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
