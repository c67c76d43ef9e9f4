"""GPU time per kernel on the CUDA provider (``onnxqf bench --op-times --ep cuda``).

ONNX Runtime's own profiler times a CUDA node's launch on the host, not its kernel. The GPU's activity tracer
(CUPTI) records every kernel the process launches, whichever library launched it; PyTorch's profiler drives it.
So a function that runs ONNX Runtime sessions is run under ``torch.profiler`` with CUDA activity only, the trace
is written as Chrome JSON, and its kernel events are summed.

Rules:

- :func:`kernel_times` reads Chrome-trace ``events``: a kernel is an event of ``cat`` "kernel"; copies and sets
  (``cat`` "gpu_memcpy" / "gpu_memset") count as one row each, "memcpy" / "memset". ``dur`` is in microseconds.
  The sum per :func:`kernel_family` name is divided by ``runs`` and returned in milliseconds, largest first.
- :func:`kernel_family` shortens a demangled kernel name to what tells kernels apart in a table: the function's
  own name without its namespaces, return type, arguments or template arguments, except: a CUTLASS kernel is
  "cutlass GEMM" with its element type (int8 when the name holds ``int8_t`` or ``signed char``, else fp16
  when it holds ``half`` / ``bfloat16``; in a mangled name, ``a`` — signed char — as a type, and ``half_t``),
  and an onnxqf kernel keeps its first template argument (the warps of ``walsh_quantize_kernel<4>``). Names
  longer than 60 characters are cut.
- :func:`profile_cuda` runs ``fn`` once under the tracer, synchronizes the device, and returns the
  :func:`kernel_times` of ``runs`` runs. Without PyTorch, or when the trace holds no kernel at all (a tracer
  that could not attach), an :class:`OnnxqfError` says so: zero is never reported as a time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

from onnxqf.errors import OnnxqfError

__all__ = ["kernel_family", "kernel_times", "profile_cuda"]

_INT8 = re.compile(r"int8_t|signed char")
_HALF = re.compile(r"\bhalf\b|bfloat16|__half")
# CUPTI may report a CUTLASS kernel's name mangled (Itanium ABI): signed char is the builtin code "a", which after
# the "E" that closes a name or template list and before the next name ("N…", a substitution "S…") or "E" is a type
_INT8_MANGLED = re.compile(r"Ea[NSE]")
_HALF_MANGLED = re.compile(r"\d+half_t|\d+__half|\d+bfloat16")


def kernel_family(name: str) -> str:
    """A kernel's short name (the module docstring's rules)."""
    if "cutlass" in name and ("device_kernel" in name or "Kernel" in name):
        int8, half = (_INT8_MANGLED, _HALF_MANGLED) if name.startswith("_Z") else (_INT8, _HALF)
        kind = "int8" if int8.search(name) else "fp16" if half.search(name) else "?"
        return f"cutlass GEMM {kind}"
    text = name.strip().replace("(anonymous namespace)::", "")
    if text.startswith("void "):
        text = text[5:]
    depth, cut = 0, len(text)
    for i, ch in enumerate(text):  # the first '(' outside template brackets ends the name
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    text = text[:cut]
    base, _, targs = text.partition("<")
    base = base.split("::")[-1]
    if "onnxqf" in text and targs:
        first = targs.split(",")[0].rstrip(">").strip()
        if len(first) <= 12:
            base = f"{base}<{first}>"
    return base[:60] or name[:60]


def kernel_times(events: list[dict], runs: int = 1) -> dict[str, float]:
    """Milliseconds per run by kernel family, largest first (module docstring)."""
    total: dict[str, float] = {}
    for e in events:
        cat = e.get("cat")
        if cat == "kernel":
            key = kernel_family(str(e.get("name", "?")))
        elif cat in ("gpu_memcpy", "gpu_memset"):
            key = cat[4:]
        else:
            continue
        total[key] = total.get(key, 0.0) + float(e.get("dur", 0)) / 1e3
    n = max(1, runs)
    return {k: v / n for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def profile_cuda(fn, runs: int = 1) -> dict[str, float]:
    """Run ``fn()`` (which runs ``runs`` model runs) under the GPU activity tracer: ms per run by kernel family."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        raise OnnxqfError("--op-times on CUDA reads the GPU's kernel times through PyTorch's profiler: install torch "
                          "(pip install 'onnxqf[export]')") from None
    with tempfile.TemporaryDirectory(prefix="onnxqf-cupti-") as tmp:
        trace = os.path.join(tmp, "trace.json")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f).get("traceEvents", [])
    times = kernel_times(events, runs)
    if not times:
        raise OnnxqfError("the GPU activity tracer recorded no kernel (CUPTI could not attach to ONNX Runtime's "
                          "kernels here)")
    return times
