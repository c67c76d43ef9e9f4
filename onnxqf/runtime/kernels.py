"""onnxqf's kernels: ONNX Runtime custom-op libraries built from ``kernels/``.

- the CUDA kernels, domain ``onnxqf`` (below);
- the CPU op library ``libonnxqf_cpu.so``, domain ``onnxqf.cpu`` (``kernels/cpu/``: per-token uint8 quantization in
  one node, :mod:`onnxqf.lowering.cpu_kernels`), built with a C++ compiler alone (``bash kernels/build_cpu.sh`` or
  ``python -m onnxqf.runtime.kernels build-cpu``) and found at ``$ONNXQF_CPU_KERNELS``, in the package or in
  ``kernels/build/`` like the CUDA one (:func:`cpu_library_path`).

The CUDA library:

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
    "CPU_DOMAIN",
    "CPU_ENV",
    "DOMAIN",
    "ENV",
    "KERNELS_VERSION",
    "W8A8_LINEAR",
    "available",
    "build",
    "build_cpu",
    "check_device",
    "cpu_available",
    "cpu_gemm_isa",
    "cpu_library_path",
    "gemm_tile",
    "libraries_for",
    "library_path",
    "library_target",
    "library_version",
    "preload_cuda_runtime",
    "register",
]

#: the custom-op domain and the op names the library registers
DOMAIN = "onnxqf"
W8A8_LINEAR = "W8A8Linear"
#: environment variable naming the library file
ENV = "ONNXQF_KERNELS"
LIBRARY = "libonnxqf_kernels.so"

#: the CUDA library's version this onnxqf writes graphs for (kernels/src/ops.cc, ONNXQF_KERNELS_VERSION; 2:
#: W8A8Linear's skip_norm, inputs Skip and Gamma; 3: its asymmetric codes, input Wsum)
KERNELS_VERSION = 3

#: the CPU op library: its domain, the variable naming its file, the file
CPU_DOMAIN = "onnxqf.cpu"
CPU_ENV = "ONNXQF_CPU_KERNELS"
CPU_LIBRARY = "libonnxqf_cpu.so"
#: the CPU op library's version this onnxqf writes graphs for (kernels/cpu/quantize_rows.cc, ONNXQF_CPU_VERSION;
#: 2: QuantizeRows' asymmetric codes and DequantizeRows; 3: W8A8Linear, onnxqf's own int8 GEMM)
CPU_VERSION = 3

_HERE = Path(__file__).resolve().parent
_CHECKOUT = Path(__file__).resolve().parents[2]
_BUILD_LIB = _CHECKOUT / "kernels" / "build" / LIBRARY
_BUILD_SCRIPT = _CHECKOUT / "kernels" / "build.sh"
_CPU_BUILD_LIB = _CHECKOUT / "kernels" / "build" / CPU_LIBRARY
_CPU_BUILD_SCRIPT = _CHECKOUT / "kernels" / "build_cpu.sh"


def _candidates(env: str, file: str, build_lib: Path) -> list[Path]:
    value = os.environ.get(env)
    if value:
        return [Path(value)]
    return [_HERE / "lib" / file, build_lib]


def _find(env: str, file: str, build_lib: Path, what: str, how: str) -> Path:
    for path in _candidates(env, file, build_lib):
        if path.is_file():
            return path
    if os.environ.get(env):
        raise OnnxqfError(f"{env}={os.environ[env]}: no such file ({what})")
    raise OnnxqfError(f"{what} is not built: run {how}, or set {env}=PATH to {file}")


def library_path() -> Path:
    """The CUDA library's file; :class:`OnnxqfError` (one line) when it is not there."""
    return _find(ENV, LIBRARY, _BUILD_LIB, "onnxqf's CUDA kernels library",
                 "`python -m onnxqf.runtime.kernels build` (or `bash kernels/build.sh`)")


def cpu_library_path() -> Path:
    """The CPU op library's file; :class:`OnnxqfError` (one line) when it is not there or older than
    :data:`CPU_VERSION` (a library built before this onnxqf: its ops lack what the graphs now use)."""
    path = _find(CPU_ENV, CPU_LIBRARY, _CPU_BUILD_LIB, "onnxqf's CPU op library",
                 "`python -m onnxqf.runtime.kernels build-cpu` (or `bash kernels/build_cpu.sh`)")
    version = cpu_library_version(path)
    if version < CPU_VERSION:
        raise OnnxqfError(f"{path}: onnxqf's CPU op library version {version}, this onnxqf needs {CPU_VERSION}: "
                          "rebuild it (`bash kernels/build_cpu.sh` or `python -m onnxqf.runtime.kernels build-cpu`)")
    return path


def cpu_library_version(path: Path) -> int:
    """The version a CPU op library file reports (``onnxqf_cpu_version()``); 0 when it cannot say."""
    try:
        fn = ctypes.CDLL(str(path)).onnxqf_cpu_version
    except (OSError, AttributeError):
        return 0
    fn.restype = ctypes.c_char_p
    try:
        return int(fn().decode())
    except (ValueError, UnicodeDecodeError):
        return 0


def cpu_gemm_isa(path: Path | None = None) -> str:
    """The best path the CPU library's W8A8Linear takes on this CPU: ``amx``, ``vnni``, ``avx2`` (fast at one token
    only) or ``base`` (the compiler's loop, slow: kernels/README.md); ``?`` when the library is missing or cannot
    say."""
    try:
        fn = ctypes.CDLL(str(path or cpu_library_path())).onnxqf_cpu_gemm_isa
    except (OSError, AttributeError, OnnxqfError):
        return "?"
    fn.restype = ctypes.c_char_p
    return fn().decode()


def available() -> bool:
    """The CUDA library file exists (says nothing about the GPU)."""
    return any(p.is_file() for p in _candidates(ENV, LIBRARY, _BUILD_LIB))


def cpu_available() -> bool:
    """The CPU op library file exists."""
    return any(p.is_file() for p in _candidates(CPU_ENV, CPU_LIBRARY, _CPU_BUILD_LIB))


def libraries_for(domains: set[str]) -> list[Path]:
    """The libraries a graph importing ``domains`` needs (any provider's), each found or refused in one line."""
    return ([library_path()] if DOMAIN in domains else []) + ([cpu_library_path()] if CPU_DOMAIN in domains else [])


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


def library_version(path: Path | None = None) -> int:
    """The version the CUDA library reports (``onnxqf_kernels_version()``); 0 when it cannot say."""
    fn = _load(path).onnxqf_kernels_version
    fn.restype = ctypes.c_char_p
    try:
        return int(fn().decode())
    except (ValueError, UnicodeDecodeError):
        return 0


def gemm_tile(m: int, n: int, sm_count: int = 132, path: Path | None = None, rule: int = 0) -> int:
    """The GEMM tile the library's op launches for ``m`` tokens and ``n`` outputs on ``sm_count`` multiprocessors
    (kernels/src/kernels.h: ``w8a8_gemm_sm90_tile``; 132 is the H100 SXM's count, the H200's too) under ``rule``
    (``ONNXQF_GEMM_RULE``; 0 the default). No GPU needed."""
    lib = _load(path)
    name = "onnxqf_kernels_gemm_tile_rule" if rule else "onnxqf_kernels_gemm_tile"
    try:
        fn = getattr(lib, name)
    except AttributeError:
        raise OnnxqfError(f"{path or library_path()}: this build of onnxqf's CUDA kernels has no "
                          f"{name}: rebuild it (`bash kernels/build.sh`)") from None
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int] + ([ctypes.c_int] if rule else [])
    fn.restype = ctypes.c_int
    tile = int(fn(m, n, sm_count, *([rule] if rule else [])))
    if tile < 0:
        raise OnnxqfError(f"{path or library_path()}: onnxqf's CUDA kernels have no GEMM tile rule {rule}")
    return tile


def _check_version(path: Path) -> None:
    version = library_version(path)
    if version < KERNELS_VERSION:
        raise OnnxqfError(f"{path}: onnxqf's CUDA kernels library version {version}, this onnxqf needs "
                          f"{KERNELS_VERSION}: rebuild it (`bash kernels/build.sh` or "
                          "`python -m onnxqf.runtime.kernels build`)")


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
    """Register a library's ops in ``session_options`` (an ``onnxruntime.SessionOptions``); returns its path.
    ``path``: the CUDA library by default; the CPU op library (a file named ``libonnxqf_cpu.so``, or the one
    ``$ONNXQF_CPU_KERNELS`` names) needs no CUDA runtime. A GPU the CUDA kernels are not built for is refused when
    the session creates its kernels."""
    path = Path(path or library_path())
    named_cpu = os.environ.get(CPU_ENV)
    if path.name != CPU_LIBRARY and not (named_cpu and Path(named_cpu).resolve() == path.resolve()):
        _check_version(path)  # (loads the CUDA runtime first)
    session_options.register_custom_ops_library(str(path))
    return path


def _run_build(script: Path, what: str, jobs: int | None) -> None:
    if not script.is_file():
        raise OnnxqfError(f"no {script}: building {what} needs the onnxqf source checkout")
    env = dict(os.environ, PYTHON=sys.executable)
    if jobs:
        env["JOBS"] = str(jobs)
    done = subprocess.run(["bash", str(script)], env=env, check=False)
    if done.returncode != 0:
        raise OnnxqfError(f"building {what} failed (exit {done.returncode}; see the output above)")


def build(jobs: int | None = None) -> Path:
    """Build the CUDA library from the checkout's ``kernels/`` (``kernels/build.sh``); returns its path."""
    _run_build(_BUILD_SCRIPT, "onnxqf's CUDA kernels", jobs)
    return _BUILD_LIB


def build_cpu() -> Path:
    """Build the CPU op library (``kernels/build_cpu.sh``: a C++ compiler, no CUDA); returns its path."""
    _run_build(_CPU_BUILD_SCRIPT, "onnxqf's CPU op library", None)
    return _CPU_BUILD_LIB


def main(argv: list[str] | None = None) -> int:
    """``python -m onnxqf.runtime.kernels build|path|check|build-cpu|path-cpu``."""
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "path"
    try:
        if cmd == "build":
            print(build())
        elif cmd == "build-cpu":
            print(build_cpu())
        elif cmd == "path-cpu":
            print(cpu_library_path())
        elif cmd == "path":
            print(library_path())
        elif cmd == "check":
            print(f"{library_path()}: {check_device()} kernels run on this GPU")
        else:
            print("usage: python -m onnxqf.runtime.kernels build|path|check|build-cpu|path-cpu", file=sys.stderr)
            return 2
    except OnnxqfError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
