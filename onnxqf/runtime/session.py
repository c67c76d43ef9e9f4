"""ONNX Runtime helpers: sessions from files or in-memory models, providers, placement."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.runtime.target import get_target

__all__ = ["FPA_INTB_ENV", "ort", "session_options", "make_session", "opset_domains", "nbits_kernel_env", "saved",
           "logits"]

#: set to 1 as a session is made, ONNX Runtime's CUDA MatMulNBits uses TensorRT-LLM's CUTLASS weight-only kernels
FPA_INTB_ENV = "ORT_FPA_INTB_GEMM"


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxqfError("this command needs onnxruntime: pip install 'onnxqf[cpu]' (or 'onnxqf[gpu]')") from None
    return onnxruntime


def session_options(*, strict_ep: bool = False, profile: str | None = None, threads: int | None = None,
                    arena: bool = True, custom_op_libraries: tuple[str, ...] = ()):
    """``arena=False``: no CPU memory arena. For short-lived sessions in a long process (one per layer,
    onnxqf.calib.layerwise): with the arena, ~0.3 GB of a Llama-2-7B-shaped layer's session stays resident
    after the session is gone; without it the peak is lower too, at the same speed (measured)."""
    rt = ort()
    so = rt.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    if strict_ep:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if threads:
        so.intra_op_num_threads = threads
    for library in custom_op_libraries:  # onnxqf's kernels (the CUDA runtime loaded first for the CUDA ones)
        from onnxqf.runtime import kernels

        kernels.register(so, library)
    return so


def make_session(path: str | os.PathLike, ep: str = "cpu", provider_options: dict | None = None, **kwargs):
    """A session on target ``ep``; ``provider_options`` go to that provider (e.g. ``{"enable_cuda_graph": "1"}``).
    A provider this onnxruntime lacks: :class:`onnxqf.errors.ProviderUnavailableError` (exit 3)."""
    rt = ort()
    target = get_target(ep)
    target.require(rt)
    providers = target.providers(provider_options)
    domains, ops = _graph_ops(path)
    libraries = target.custom_op_libraries(domains)
    _warn_slow_cpu_gemm(ops)
    try:
        return rt.InferenceSession(str(path),
                                   sess_options=session_options(custom_op_libraries=tuple(libraries), **kwargs),
                                   providers=providers)
    except Exception as exc:
        raise OnnxqfError(f"onnxruntime cannot load {path}: {str(exc).strip().splitlines()[0][:300]}") from None


def opset_domains(path: str | os.PathLike) -> set[str]:
    """The operator domains a model file imports (its weights are not read)."""
    return _graph_ops(path)[0]


def _graph_ops(path: str | os.PathLike) -> tuple[set[str], set[tuple[str, str]]]:
    """(the operator domains a model file imports, the (domain, op type) pairs of its main graph's nodes); its weights
    are not read; empty sets where it is not readable as ONNX (ONNX Runtime says why when it loads it)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set(), set()
    return {o.domain for o in proto.opset_import}, {(n.domain, n.op_type) for n in proto.graph.node}


def _warn_slow_cpu_gemm(ops: set[tuple[str, str]]) -> None:
    """One warning when the graph has onnxqf.cpu.W8A8Linear nodes and this CPU has no AVX-512 VNNI: their GEMM then
    runs the AVX2 path (fast at one token, slower than ONNX Runtime's GEMM for prompts) or the compiler's loop
    (slow everywhere); ``onnxqf-cpu:gemm=mlas`` is the lowering for such a CPU."""
    from onnxqf.runtime import kernels

    if (kernels.CPU_DOMAIN, kernels.W8A8_LINEAR) in ops and kernels.cpu_gemm_isa() in ("avx2", "base"):
        logging.getLogger("onnxqf").warning(
            "this CPU has no AVX-512 VNNI: onnxqf.cpu.W8A8Linear's GEMM is slower than ONNX Runtime's here (for "
            "prompts at least); rewrite with --lowering onnxqf-cpu (gemm=mlas) for this CPU")


@contextlib.contextmanager
def nbits_kernel_env(fpa_intb: bool) -> Iterator[None]:
    """Sessions made inside use ONNX Runtime's CUTLASS weight-only MatMulNBits kernels (``fpa_intb=True``) or
    its default ones (``False``), whatever the caller's environment says; the environment is restored after.
    ONNX Runtime reads ``ORT_FPA_INTB_GEMM`` when a session builds its kernels (measured: sessions made one
    after another in one process follow the variable as it was at their creation)."""
    old = os.environ.get(FPA_INTB_ENV)
    if fpa_intb:
        os.environ[FPA_INTB_ENV] = "1"
    else:
        os.environ.pop(FPA_INTB_ENV, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FPA_INTB_ENV, None)
        else:
            os.environ[FPA_INTB_ENV] = old


@contextlib.contextmanager
def saved(model: ir.Model) -> Iterator[Path]:
    """Write an in-memory model to a temporary file (with external data) for ONNX Runtime."""
    from onnxqf.graph.modelfile import save_model

    with tempfile.TemporaryDirectory(prefix="onnxqf-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, check=False)
        yield path


def logits(session, ids: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.asarray(ids, dtype=np.int64)})[0]
