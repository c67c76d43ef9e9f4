"""onnxqf's CUDA kernels: an ONNX Runtime custom-op library (``kernels/``, domain ``onnxqf``).

The library, ``libonnxqf_kernels.so``, is built from the repository's ``kernels/`` folder for sm_90a (H100/H200)::

    python -m onnxqf.runtime.kernels build        # = bash kernels/build.sh

and found, in this order, at ``$ONNXQF_KERNELS``, in the package (``onnxqf/runtime/lib/``), or in the checkout's
build folder (``kernels/build/``). A session loads it with :func:`register` (or
``SessionOptions.register_custom_ops_library(library_path())`` after :func:`preload_cuda_runtime`). Its op
``onnxqf.W8A8Linear`` is documented in ``kernels/README.md``; :mod:`onnxqf.lowering.cuda_kernels` emits it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from onnxqf.errors import OnnxqfError

__all__ = [
    "DOMAIN",
    "ENV",
    "W8A8_LINEAR",
    "available",
    "build",
    "check_device",
    "library_path",
    "library_target",
    "preload_cuda_runtime",
    "register",
]

#: the custom-op domain and the op names the library registers
DOMAIN = "onnxqf"
W8A8_LINEAR = "W8A8Linear"
#: environment variable naming the library file
ENV = "ONNXQF_KERNELS"
LIBRARY = "libonnxqf_kernels.so"

_PACKAGE_LIB = Path(__file__).resolve().parent / "lib" / LIBRARY
_CHECKOUT = Path(__file__).resolve().parents[2]
_BUILD_LIB = _CHECKOUT / "kernels" / "build" / LIBRARY
_BUILD_SCRIPT = _CHECKOUT / "kernels" / "build.sh"


def _candidates() -> list[Path]:
    env = os.environ.get(ENV)
    if env:
        return [Path(env)]
    return [_PACKAGE_LIB, _BUILD_LIB]


def library_path() -> Path:
    """The library file; :class:`OnnxqfError` (one line) when it is not there."""
    env = os.environ.get(ENV)
    for path in _candidates():
        if path.is_file():
            return path
    if env:
        raise OnnxqfError(f"{ENV}={env}: no such file (onnxqf's CUDA kernels library)")
    raise OnnxqfError("onnxqf's CUDA kernels are not built: run `python -m onnxqf.runtime.kernels build` "
                      f"(or `bash kernels/build.sh`), or set {ENV}=PATH to {LIBRARY}")


def available() -> bool:
    """The library file exists (says nothing about the GPU)."""
    return any(p.is_file() for p in _candidates())


def preload_cuda_runtime() -> None:
    """Load libcudart.so.13 process-wide (the library links it, like ONNX Runtime's CUDA provider): from the
    loader's path if it finds it, else from the ``nvidia-cuda-runtime`` wheel (nvidia/cu13/lib)."""
    mode = getattr(os, "RTLD_GLOBAL", 0)
    try:
        ctypes.CDLL("libcudart.so.13", mode=mode)
        return
    except OSError:
        pass
    for entry in sys.path:
        lib = Path(entry or ".") / "nvidia" / "cu13" / "lib" / "libcudart.so.13"
        if lib.is_file():
            try:
                ctypes.CDLL(str(lib), mode=mode)
                return
            except OSError:
                continue
    raise OnnxqfError("onnxqf's CUDA kernels need libcudart.so.13 (CUDA 13 runtime): pip install nvidia-cuda-runtime, "
                      "or put its folder on LD_LIBRARY_PATH")


def _load(path: Path | None = None) -> ctypes.CDLL:
    path = path or library_path()
    preload_cuda_runtime()
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise OnnxqfError(f"cannot load {path}: {e}") from None


def library_target(path: Path | None = None) -> str:
    """The GPU architecture the library's kernels are built for (``sm_90a``)."""
    lib = _load(path)
    fn = lib.onnxqf_kernels_target
    fn.restype = ctypes.c_char_p
    return fn().decode()


def check_device(path: Path | None = None) -> str:
    """Check that the current CUDA device can run the library; returns its target arch, raises
    :class:`OnnxqfError` naming the GPU and its compute capability when it cannot (no GPU, another arch)."""
    lib = _load(path)
    fn = lib.onnxqf_kernels_check_device
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    buf = ctypes.create_string_buffer(512)
    if fn(buf, len(buf)) != 0:
        raise OnnxqfError(buf.value.decode(errors="replace"))
    return library_target(path)


def register(session_options, path: Path | None = None) -> Path:
    """Register the library's ops in ``session_options`` (an ``onnxruntime.SessionOptions``); returns its path.
    A GPU the kernels are not built for is refused when the session creates its kernels."""
    path = path or library_path()
    preload_cuda_runtime()
    session_options.register_custom_ops_library(str(path))
    return path


def build(jobs: int | None = None) -> Path:
    """Build the library from the checkout's ``kernels/`` (``kernels/build.sh``); returns its path."""
    if not _BUILD_SCRIPT.is_file():
        raise OnnxqfError(f"no {_BUILD_SCRIPT}: building the kernels needs the onnxqf source checkout")
    env = dict(os.environ, PYTHON=sys.executable)
    if jobs:
        env["JOBS"] = str(jobs)
    done = subprocess.run(["bash", str(_BUILD_SCRIPT)], env=env, check=False)
    if done.returncode != 0:
        raise OnnxqfError(f"building onnxqf's CUDA kernels failed (exit {done.returncode}; see the output above)")
    return _BUILD_LIB


def main(argv: list[str] | None = None) -> int:
    """``python -m onnxqf.runtime.kernels build|path|check``."""
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "path"
    try:
        if cmd == "build":
            print(build())
        elif cmd == "path":
            print(library_path())
        elif cmd == "check":
            print(f"{library_path()}: {check_device()} kernels run on this GPU")
        else:
            print("usage: python -m onnxqf.runtime.kernels build|path|check", file=sys.stderr)
            return 2
    except OnnxqfError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
