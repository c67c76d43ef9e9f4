# Sourced by kernels/build.sh and kernels/build_cpu.sh with $here (kernels/), $root (the checkout) and $build set:
# sets ORT_INCLUDE_DIR to a folder holding ONNX Runtime's C/C++ API headers ($ORT_INCLUDE_DIR if set, else Debian's
# libonnxruntime-dev fetched into $build/ortheaders by shared/ortheaders/fetch.sh).
if [ -z "${ORT_INCLUDE_DIR:-}" ]; then
  ORT_INCLUDE_DIR=$build/ortheaders/include/onnxruntime
  if [ ! -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ]; then
    fetch=""
    for f in "$root/shared/ortheaders/fetch.sh" "$root/../shared/ortheaders/fetch.sh"; do
      [ -f "$f" ] && { fetch=$f; break; }
    done
    if [ -z "$fetch" ]; then
      echo "onnxqf kernels: set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h (ONNX Runtime >= 1.21:" \
           "its release archive's include/ or Debian's libonnxruntime-dev)" >&2
      exit 2
    fi
    echo "== ONNX Runtime C/C++ API headers -> $build/ortheaders"
    bash "$fetch" "$build/ortheaders"
  fi
fi
export ORT_INCLUDE_DIR
