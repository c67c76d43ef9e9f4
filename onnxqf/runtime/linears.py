"""One linear at a time: graphs of ``copies`` independent linears, lowered by a registered lowering, timed with
IOBinding (``onnxqf bench --linears``).

Rules:

- A graph reads one input ``x`` ``[M, K]`` (M dynamic; float32 or float16) and holds ``copies`` independent
  linears ``y_i = x @ W_i`` with distinct random weights ``W_i`` ``[K, N]`` (normal, std 0.02, drawn from
  ``seed``: the same weights for every lowering of one shape). Outputs ``y0 .. y{copies-1}`` ``[M, N]`` in the
  activation's dtype.
- ``rotate``: each linear reads its own online Hadamard rotation of ``x`` (``x_i = Identity(x)``, rotated by the
  nodes :func:`onnxqf.graph.edit.rotate_value_online` writes in the provider's style, the Hadamard factors of K):
  what ``--hybrid`` puts before a down_proj or o_proj; a lowering that runs the rotation itself (onnxqf-cuda)
  takes it in. The float row stays unrotated (the time to beat); the errors are against float with the rotation.
- ``float`` keeps the MatMuls: the reference. Any other row names a registered lowering
  (:mod:`onnxqf.lowering`), optionally with fields of its dataclass (``matmulnbits:bits=8:block_size=128``;
  MatMulNBits without ``accuracy_level`` gets the target's, as ``onnxqf rewrite --ep`` gives it);
  each linear is its own group, rounded to nearest by the lowering's ``round`` and lowered by its ``emit``:
  the nodes ``onnxqf rewrite`` writes for a linear (a W8A8 lowering quantizes ``x`` once per copy).
- Timing: ``x`` and every output bound on the provider's device (IOBinding), ``warmup`` untimed runs, then
  ``repeats`` timed ones, each ``time.perf_counter`` around ``run_with_iobinding`` and
  ``synchronize_outputs``, as :mod:`onnxqf.runtime.bench` times models. A row's time is per linear (a run /
  ``copies``: ONNX Runtime's per-run overhead is spread over the copies; 8 copies of a 7B-sized weight are
  larger than a GPU's L2, so weights come from memory as in a model). ``speedup`` = float time / this time at
  the same M (> 1: faster than float).
- Check: every lowered graph's outputs on one random ``x`` against the float graph's:
  ``max |y - y_float| / max |y_float|`` (``error``); it states the lowering computes the same product up to
  its rounding.
- ``kernel_times`` (CUDA only): after a row's timed runs at each M, ``repeats`` more run under the GPU's activity
  tracer (:mod:`onnxqf.runtime.cuda_profile`); the row's ``kernels`` give GPU µs per kernel family per linear
  (per run / ``copies``) at each M: which of a lowering's kernels the time goes to.
- On CUDA sessions refuse CPU fallback: a lowering with a node CUDA cannot run is reported, not timed.
  ``nbits_kernel`` (``default``, ``fpa-intb``, ``both``) picks ONNX Runtime's MatMulNBits kernels on CUDA
  for MatMulNBits rows, as ``onnxqf bench --nbits-kernel`` does (``both``: two rows; on the CPU the variable
  changes nothing, which checks the path).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.graph.structure import Linear
from onnxqf.lowering import base as lowering_base
from onnxqf.maths.gptq import column_chunks
from onnxqf.maths.hadamard import hadamard_factors
from onnxqf.runtime.target import get_target, with_cpu_weights

__all__ = [
    "DTYPES",
    "FLOAT",
    "LinearsOptions",
    "bench_linears",
    "bound_runs",
    "format_linears",
    "linear_model",
    "parse_counts",
    "parse_lowering",
    "parse_shapes",
    "time_runs",
]

FLOAT = "float"
DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


@dataclasses.dataclass(frozen=True)
class LinearsOptions:
    """What :func:`bench_linears` measures: shapes (K, N), batch sizes M, lowering specs (``float`` first is
    added when missing), provider, activation dtype, copies per graph, runs, MatMulNBits kernels."""

    shapes: tuple[tuple[int, int], ...] = ((2048, 5632),)
    rotate: bool = False
    ms: tuple[int, ...] = (1, 16, 256)
    lowerings: tuple[str, ...] = ("uint8-token", "int8-token", "matmulnbits")
    ep: str = "cpu"
    dtype: str = "float32"
    copies: int = 8
    repeats: int = 30
    warmup: int = 5
    nbits_kernel: str = "default"
    seed: int = 0
    kernel_times: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise OnnxqfError(f"--dtype must be float32 or float16, not '{self.dtype}'")
        if self.nbits_kernel not in ("default", "fpa-intb", "both"):
            raise OnnxqfError(f"--nbits-kernel must be default, fpa-intb or both, not '{self.nbits_kernel}'")
        if self.copies < 1 or self.repeats < 1 or self.warmup < 0 or not self.ms or min(self.ms) < 1:
            raise OnnxqfError("copies, repeats and every M must be positive")
        get_target(self.ep)
        if self.kernel_times and self.ep != "cuda":
            raise OnnxqfError("--linears --op-times reads GPU kernel times: it needs --ep cuda (on the CPU, time "
                              "models with --op-times)")
        for spec in self.lowerings:
            parse_lowering(spec)


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``K:N[,K:N...]`` -> ((K, N), ...)."""
    try:
        shapes = tuple((int(k), int(n)) for k, n in (item.split(":") for item in text.split(",") if item.strip()))
    except ValueError:
        raise OnnxqfError(f"--linears takes K:N[,K:N...], not '{text}'") from None
    if not shapes or min(min(s) for s in shapes) < 1:
        raise OnnxqfError(f"--linears takes positive K:N pairs, not '{text}'")
    return shapes


def parse_counts(text: str, what: str = "--m") -> tuple[int, ...]:
    """``1,16,256`` -> (1, 16, 256), each positive."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise OnnxqfError(f"{what} takes positive comma-separated counts such as 1,16,256, not '{text}'")
    return values


def parse_lowering(spec: str, ep: str | None = None) -> lowering_base.Lowering | None:
    """``float`` -> None; ``NAME[:FIELD=VALUE]...`` -> that registered lowering with those dataclass fields
    (values parsed as the field's default's type). With ``ep``, a MatMulNBits lowering without an
    ``accuracy_level`` gets the target's (4 on the CPU, 0 on CUDA), as ``onnxqf rewrite --ep`` gives it."""
    if spec.split(":")[0] == FLOAT:
        if ":" in spec:
            raise OnnxqfError("'float' takes no fields")
        return None
    cls, kwargs = lowering_base.parse_spec(spec)
    defaults = {f.name for f in dataclasses.fields(cls)}
    if ep is not None and "accuracy_level" in defaults and "accuracy_level" not in kwargs:
        kwargs["accuracy_level"] = get_target(ep).nbits_accuracy_level
    return cls(**with_cpu_weights(cls, kwargs))  # (uint8 weights only for the uint8-activation, CPU lowerings)


def linear_model(K: int, N: int, lowering: lowering_base.Lowering | None, *, copies: int = 8,
                 dtype: str = "float32", seed: int = 0, rotate: bool = False, ep: str = "cuda",
                 rotate_block: int | None = None) -> ir.Model:
    """The graph of the module docstring: ``copies`` linears K -> N, lowered by ``lowering`` (None: float);
    ``rotate``: each reads its own online rotation of x, emitted in ``ep``'s style; ``rotate_block``: the
    rotation's non-power-of-two Hadamard block (:func:`onnxqf.maths.hadamard.hadamard_factors`' ``block``)."""
    dt = DTYPES[dtype]
    graph = ir.Graph([ir.Value(name="x", shape=ir.Shape(["M", K]), type=ir.TensorType(dt))], [], nodes=[],
                     opset_imports={"": 18}, name="linears")
    x = graph.inputs[0]
    rng = np.random.default_rng(seed)
    linears = []
    if rotate:  # one construction for every copy, checked before anything is built
        try:
            factors = hadamard_factors(K, block=rotate_block)
        except ValueError as exc:
            raise OnnxqfError(f"--rotated: {exc}") from None
        if factors is None:
            raise OnnxqfError(f"--rotated: no Hadamard construction of order K = {K}")
        online = get_target(ep).online.kwargs()
    for i in range(copies):
        w = (rng.standard_normal((K, N), dtype=np.float32) * 0.02).astype(dt.numpy())
        weight = ir.Value(name=f"linear{i}.weight", shape=ir.Shape([K, N]), type=ir.TensorType(dt),
                          const_value=ir.tensor(w, name=f"linear{i}.weight"))
        graph.register_initializer(weight)
        xi = x
        if rotate:
            ident = ir.Node("", "Identity", [x], name=f"linear{i}/input", num_outputs=1)
            xi = ident.outputs[0]
            xi.name, xi.shape, xi.type = f"x{i}", x.shape, x.type
            graph.append(ident)
        node = ir.Node("", "MatMul", [xi, weight], name=f"linear{i}/MatMul", num_outputs=1)
        y = node.outputs[0]
        y.name, y.shape, y.type = f"y{i}", ir.Shape(["M", N]), ir.TensorType(dt)
        graph.append(node)
        if rotate:
            edit.rotate_value_online(graph, xi, factors, dt, f"linear{i}/hadamard", **online)
        graph.outputs.append(y)
        linears.append(Linear(node, weight, role=f"linear{i}"))
    if lowering is not None:
        for lin in linears:
            group = lowering_base.LinearGroup([lin], lin.node)
            B = lin.stored_matrix()
            rounded = lowering.concat([lowering.round(chunk, None, group) for _, chunk in column_chunks(B)])
            lowering.emit(graph, group, [rounded])
        for domain, version in lowering.domains.items():
            graph.opset_imports[domain] = max(graph.opset_imports.get(domain, version), version)
    return ir.Model(graph, ir_version=10)


def bound_runs(session, feeds: dict[str, np.ndarray], *, device: str):
    """A function ``runs(warmup, repeats)`` -> seconds per timed run of ``session`` with ``feeds`` uploaded once and
    every output bound on ``device`` (IOBinding)."""
    from onnxqf.runtime.session import ort

    rt = ort()
    values = {k: rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0) for k, v in feeds.items()}
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, device, 0)

    def runs(warmup: int, repeats: int) -> list[float]:
        times = []
        for i in range(warmup + repeats):
            t = time.perf_counter()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return times

    runs.values = values  # (kept alive with the function)
    return runs


def time_runs(session, feeds: dict[str, np.ndarray], *, device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per run of ``session`` with ``feeds`` and every output bound on ``device`` (IOBinding)."""
    return bound_runs(session, feeds, device=device)(warmup, repeats)


def _stats_ms(seconds: list[float], scale: float) -> dict:
    a = np.asarray(seconds, np.float64) * 1e3 / scale
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "min": float(a.min()), "max": float(a.max()), "q1": float(q1), "q3": float(q3),
            "n": int(a.size)}


def bench_linears(opts: LinearsOptions, progress=None) -> dict:
    """Time every (shape, lowering[, MatMulNBits kernel]) at every M; rows in the order measured, float first per
    shape. ``progress``: a function taking one line per row. Returns a JSON-able dict (``rows``)."""
    from onnxqf.runtime.session import make_session, nbits_kernel_env, ort, saved

    specs = [FLOAT] + [s for s in opts.lowerings if s != FLOAT]
    device = "cuda" if opts.ep == "cuda" else "cpu"
    result = {"ep": opts.ep, "dtype": opts.dtype, "copies": opts.copies, "repeats": opts.repeats, "warmup": opts.warmup,
              "ms": list(opts.ms), "onnxruntime": ort().__version__, "rows": []}
    rng = np.random.default_rng(opts.seed + 1)
    for K, N in opts.shapes:
        xs = {M: rng.standard_normal((M, K), dtype=np.float32).astype(DTYPES[opts.dtype].numpy()) for M in opts.ms}
        reference = None
        for spec in specs:
            lowering = parse_lowering(spec, opts.ep)
            nbits = lowering is not None and lowering.name == "matmulnbits"
            kernels = {"default": ["default"], "fpa-intb": ["fpa-intb"],
                       "both": ["default", "fpa-intb"]}[opts.nbits_kernel]
            model = linear_model(K, N, lowering, copies=opts.copies, dtype=opts.dtype, seed=opts.seed,
                                 rotate=opts.rotate and lowering is not None, ep=opts.ep)
            for kernel in kernels if nbits else ["default"]:
                row = {"K": K, "N": N, "lowering": spec, "kernel": kernel,
                       "what": "MatMul" if lowering is None else lowering.describe(),
                       "nodes": sum(1 for _ in model.graph) // opts.copies, "ms": {}, "speedup": {}}
                try:
                    with saved(model) as path, nbits_kernel_env(kernel == "fpa-intb"):
                        session = make_session(path, opts.ep, strict_ep=opts.ep == "cuda")
                    outs = session.run(None, {"x": xs[opts.ms[0]]})
                    if reference is None:
                        reference = outs
                        if opts.rotate:  # what the rotated lowerings approximate
                            rotated = linear_model(K, N, None, copies=opts.copies, dtype=opts.dtype, seed=opts.seed,
                                                   rotate=True, ep=opts.ep)
                            with saved(rotated) as rpath:
                                rsession = make_session(rpath, opts.ep, strict_ep=opts.ep == "cuda")
                            reference = rsession.run(None, {"x": xs[opts.ms[0]]})
                    top = max(float(np.abs(r.astype(np.float32)).max()) for r in reference)
                    row["error"] = max(float(np.abs(o.astype(np.float32) - r.astype(np.float32)).max())
                                       for o, r in zip(outs, reference)) / max(top, 1e-30)
                    for M in opts.ms:
                        runs = time_runs(session, {"x": xs[M]}, device=device, warmup=opts.warmup,
                                         repeats=opts.repeats)
                        row["ms"][str(M)] = _stats_ms(runs, opts.copies)
                        if opts.kernel_times:
                            row.setdefault("kernels", {})[str(M)] = _kernel_us(session, xs[M], opts)
                    session = None
                except OnnxqfError as exc:
                    row["refused"] = str(exc)
                _speedups(result["rows"], row)
                result["rows"].append(row)
                if progress is not None:
                    progress(format_linears({**result, "rows": [row]}, header=False))
    return result


def _kernel_us(session, x: np.ndarray, opts: LinearsOptions) -> dict[str, float]:
    """GPU µs per linear by kernel family over ``repeats`` traced runs."""
    from onnxqf.runtime.cuda_profile import profile_cuda

    runs = bound_runs(session, {"x": x}, device="cuda")  # the upload before the trace starts
    runs(1, 0)
    ms = profile_cuda(lambda: runs(0, opts.repeats), opts.repeats)
    return {k: v * 1e3 / opts.copies for k, v in ms.items()}


def _speedups(rows: list[dict], row: dict) -> None:
    ref = next((r for r in rows if (r["K"], r["N"]) == (row["K"], row["N"]) and r["lowering"] == FLOAT), None)
    for M, s in row["ms"].items():
        base = ((ref or row)["ms"].get(M) or {}).get("median")
        if base:
            row["speedup"][M] = base / s["median"]


def format_linears(result: dict, header: bool = True) -> str:
    """A markdown table: ms per linear (median) and × float per M, the error against float."""
    ms = result["ms"]
    lines = []
    if header:
        where = result["ep"]
        title = (f"One linear, {result['dtype']} activations, {result['copies']} copies per graph, onnxruntime "
                 f"{result['onnxruntime']} ({where}); ms per linear, median of {result['repeats']}; x = float time / "
                 "this")
        lines += [title, "",
                  "| K -> N | lowering | kernel | " + " | ".join(f"M = {m}" for m in ms) + " | max rel. error |",
                  "|" + "---|" * (4 + len(ms))]
    for r in result["rows"]:
        if "refused" in r:
            cells = ["refused: " + r["refused"][:100]] + [""] * (len(ms) - 1)
        else:
            cells = [f"{r['ms'][str(m)]['median']:.4f}"
                     + ("" if r["lowering"] == FLOAT else f" ({r['speedup'][str(m)]:.2f}x)")
                     for m in ms]
        err = "" if "error" not in r or r["lowering"] == FLOAT else f"{r['error']:.2e}"
        lines.append(f"| {r['K']} -> {r['N']} | {r['lowering']} | {r['kernel']} | " + " | ".join(cells)
                     + f" | {err} |")
    for r in result["rows"]:
        for m, kernels in (r.get("kernels") or {}).items():
            parts = ", ".join(f"{k} {us:.1f}" for k, us in kernels.items())
            lines.append(f"{r['K']} -> {r['N']} {r['lowering']} M = {m}: GPU µs per linear {sum(kernels.values()):.1f}"
                         f" = {parts}")
    return "\n".join(lines)
