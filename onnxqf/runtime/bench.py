"""`onnxqf bench`: prefill and KV-cache decode speed of ONNX LLMs, against a reference in the same run.

Two graph layouts are understood:

* **plain** (what ``onnxqf export`` writes): ``input_ids -> logits``, no cache. Decode is reported as
  "n/a (no KV cache)".
* **KV cache**, the onnxruntime-genai layout: inputs ``input_ids``, ``attention_mask``, optional
  ``position_ids``, ``past_key_values.N.key|value`` ``[batch, kv_heads, past, head_dim]``; outputs
  ``logits``, ``present.N.key|value``.

Method. Every input and output is bound with IOBinding on the provider's device (``cuda`` or
``cpu``), so no host copies are timed. **Prefill** is one forward of ``batch x seq`` tokens (an empty
past for KV-cache graphs). **Decode** starts from a past of length P (random values of the cache's
dtype, already on the device), then runs one token at a time, binding each step's ``present`` outputs
(still on the device) as the next step's ``past`` inputs, for ``decode_tokens`` steps; its speed is
``batch * decode_tokens / elapsed`` tokens/s. Each measurement is ``warmup`` untimed runs, then
``repeats`` timed ones, reported as median, min, max and interquartile range. Timing is
``time.perf_counter`` around ``run_with_iobinding``: with ONNX Runtime's default run options the
provider's stream is synchronized before ``run`` returns, and ``synchronize_outputs`` is called
before the clock stops as well. Models are loaded and measured one after another (one session in
memory at a time); the reference is measured first.

**MatMulNBits kernels.** ONNX Runtime's CUDA provider has two sets: its default ones and TensorRT-LLM's
CUTLASS weight-only GEMM/GEMV ("fpA_intB"), which it uses for the nodes they cover when
``ORT_FPA_INTB_GEMM`` is set as a session is made. ``nbits_kernel`` picks them per run ("both": each
model with such nodes twice); the variable is set or cleared around each session, whatever the caller's
environment holds, so a row says which kernels it measured.
"""

from __future__ import annotations

import gc
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxqf.errors import BadModelFileError, OnnxqfError

PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
DEVICE = {"cpu": "cpu", "cuda": "cuda"}


@dataclass
class ModelIO:
    """What bench needs to know about a model's inputs and outputs (read from the graph, no weights)."""

    path: str
    ids: str = "input_ids"
    logits: str = "logits"
    mask: str | None = None
    positions: str | None = None
    cache: list[tuple[str, str]] = field(default_factory=list)  # (past input, present output)
    cache_dtype: np.dtype | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    logits_dtype: np.dtype | None = None
    int_types: dict[str, np.dtype] = field(default_factory=dict)  # ids / mask / positions
    nbits: dict = field(default_factory=lambda: {"nodes": 0, "fpa_intb": 0, "blockers": {}})  # placement.nbits_kernels

    @property
    def has_cache(self) -> bool:
        return bool(self.cache)


def describe(path: str | os.PathLike) -> ModelIO:
    """Read the graph's inputs and outputs (external data is not loaded) and check bench can drive them."""
    import onnx
    from onnx import helper

    from onnxqf.genai.folder import genai_dir, model_file, read_genai

    p = Path(path)
    if p.is_dir() and genai_dir(p) is not None:
        p = model_file(p)  # an onnxruntime-genai folder: its decoder graph
    if not p.is_file():
        raise OnnxqfError(f"{p}: no such file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise BadModelFileError(f"{p}: not a readable ONNX model ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})") from None
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in inits}
    outputs = {o.name: o for o in graph.output}
    if "logits" not in outputs:
        raise OnnxqfError(f"{p}: no 'logits' output (outputs: {', '.join(outputs) or 'none'}); bench measures LLM graphs "
                          "input_ids -> logits")
    if "input_ids" not in inputs:
        raise OnnxqfError(f"{p}: no 'input_ids' input (inputs: {', '.join(inputs) or 'none'})")
    from onnxqf.runtime.placement import nbits_kernels

    io = ModelIO(path=str(p))
    io.vocab = _static_dim(outputs["logits"], -1)
    io.nbits = nbits_kernels(proto)

    def elem(v) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))

    io.int_types["input_ids"] = elem(inputs["input_ids"])
    io.logits_dtype = elem(outputs["logits"])
    for name, value in inputs.items():
        if name == "input_ids":
            continue
        if name == "attention_mask":
            io.mask = name
            io.int_types[name] = elem(value)
        elif name == "position_ids":
            io.positions = name
            io.int_types[name] = elem(value)
        elif (m := PAST_RE.match(name)) is not None:
            present = f"present.{m.group(1)}.{m.group(2)}"
            if present not in outputs:
                raise OnnxqfError(f"{p}: input '{name}' has no matching output '{present}'")
            heads, head_dim = _static_dim(value, 1), _static_dim(value, 3)
            if (not heads or not head_dim) and genai_dir(p) is not None:  # genai graphs name head_dim 'kv_cache_dim'
                folder = read_genai(p, check_attention=False)
                heads, head_dim = heads or folder.kv_heads, head_dim or folder.head_size
            if _rank(value) != 4 or not heads or not head_dim:
                raise OnnxqfError(f"{p}: '{name}' must be [batch, kv_heads, past, head_dim] with static kv_heads and "
                                  "head_dim (or a genai_config.json beside the graph that gives them)")
            if io.cache and (elem(value) != io.cache_dtype or (heads, head_dim) != (io.kv_heads, io.head_dim)):
                raise OnnxqfError(f"{p}: '{name}' differs in dtype or shape from the other cache inputs")
            io.cache.append((name, present))
            io.cache_dtype, io.kv_heads, io.head_dim = elem(value), heads, head_dim
        else:
            raise OnnxqfError(f"{p}: unsupported input '{name}' (bench drives input_ids, attention_mask, position_ids "
                              "and past_key_values.N.key|value)")
    if io.cache and io.mask is None:
        raise OnnxqfError(f"{p}: a KV-cache graph needs an attention_mask input")
    io.cache.sort(key=lambda c: (int(PAST_RE.match(c[0]).group(1)), c[0]))
    return io


def _rank(value) -> int:
    return len(value.type.tensor_type.shape.dim)


def _static_dim(value, axis: int) -> int | None:
    dims = value.type.tensor_type.shape.dim
    if not dims or not -len(dims) <= axis < len(dims):
        return None
    d = dims[axis]
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None


# -- inputs ---------------------------------------------------------------------------------------


def _ortvalue(rt, array: np.ndarray, device: str):
    array = np.ascontiguousarray(array)
    try:
        return rt.OrtValue.ortvalue_from_numpy(array, device, 0)
    except Exception:
        if array.size == 0:  # an empty past: nothing to copy, so the host holds it
            return rt.OrtValue.ortvalue_from_numpy(array, "cpu", 0)
        raise


def _ids(io: ModelIO, rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    high = min(io.vocab or 100, 1000)
    return rng.integers(0, high, (batch, seq)).astype(io.int_types[io.ids])


def _past_arrays(io: ModelIO, rng: np.random.Generator, batch: int, past: int) -> np.ndarray:
    """One random [batch, kv_heads, past, head_dim] array (the same values serve every layer)."""
    shape = (batch, io.kv_heads, past, io.head_dim)
    return rng.standard_normal(shape, dtype=np.float32).astype(io.cache_dtype)


def _run_options(rt):
    """Quiet runs: a failing kernel becomes one OnnxqfError line, not an extra ONNX Runtime log line."""
    ro = rt.RunOptions()
    ro.log_severity_level = 4
    return ro


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "min": float(a.min()), "max": float(a.max()), "q1": float(q1), "q3": float(q3),
            "n": int(a.size)}


# -- measurements ---------------------------------------------------------------------------------


def measure_prefill(session, io: ModelIO, *, device: str, batch: int, seq: int, warmup: int, repeats: int,
                    seed: int = 0) -> list[float]:
    """Seconds per forward of batch x seq tokens (empty past for KV-cache graphs), ``repeats`` values."""
    from onnxqf.runtime.session import ort

    rt = ort()
    rng = np.random.default_rng(seed)
    feeds = {io.ids: _ids(io, rng, batch, seq)}
    if io.mask:
        feeds[io.mask] = np.ones((batch, seq), io.int_types[io.mask])
    if io.positions:
        feeds[io.positions] = np.broadcast_to(np.arange(seq), (batch, seq)).astype(io.int_types[io.positions])
    if io.cache:
        empty = _past_arrays(io, rng, batch, 0)
        feeds.update({past: empty for past, _ in io.cache})
    values = {name: _ortvalue(rt, arr, device) for name, arr in feeds.items()}  # kept alive while bound
    ro = _run_options(rt)
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in [io.logits] + [present for _, present in io.cache]:
        binding.bind_output(out, device, 0)
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        session.run_with_iobinding(binding, ro)
        binding.synchronize_outputs()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def measure_decode(session, io: ModelIO, *, device: str, batch: int, past: int, tokens: int, warmup: int,
                   repeats: int, seed: int = 0) -> list[float]:
    """Tokens/s of a KV-cache loop of ``tokens`` steps from a random past of length ``past``, ``repeats`` values."""
    from onnxqf.runtime.session import ort

    if not io.cache:
        raise OnnxqfError(f"{io.path}: no KV cache to decode with")
    rt = ort()
    rng = np.random.default_rng(seed)
    start_array = _past_arrays(io, rng, batch, past)
    start = [_ortvalue(rt, start_array, device) for _ in io.cache]
    token = _ortvalue(rt, _ids(io, rng, batch, 1), device)
    masks = [_ortvalue(rt, np.ones((batch, past + t + 1), io.int_types[io.mask]), device) for t in range(tokens)]
    positions = ([_ortvalue(rt, np.full((batch, 1), past + t, io.int_types[io.positions]), device) for t in range(tokens)]
                 if io.positions else None)
    outputs = [io.logits] + [present for _, present in io.cache]
    ro = _run_options(rt)
    binding = session.io_binding()

    def loop() -> float:
        cur = start
        t0 = time.perf_counter()
        for t in range(tokens):
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            binding.bind_ortvalue_input(io.ids, token)
            binding.bind_ortvalue_input(io.mask, masks[t])
            if positions is not None:
                binding.bind_ortvalue_input(io.positions, positions[t])
            for (name, _), value in zip(io.cache, cur):
                binding.bind_ortvalue_input(name, value)
            for out in outputs:
                binding.bind_output(out, device, 0)
            session.run_with_iobinding(binding, ro)
            cur = list(binding.get_outputs())[1:]  # the presents, still on the device, are the next past
        binding.synchronize_outputs()
        return time.perf_counter() - t0

    speeds = []
    for i in range(warmup + repeats):
        elapsed = loop()
        if i >= warmup:
            speeds.append(batch * tokens / elapsed)
    return speeds


def measure_decode_step_graph(session, io: ModelIO, *, batch: int, past: int, warmup: int, repeats: int,
                              steps: int = 32, seed: int = 0, device: str = "cuda") -> list[float]:
    """Tokens/s of one decode step at a fixed ``past``, replayed as a CUDA graph, ``repeats`` values.

    ``session`` must be a CUDA session made with ``enable_cuda_graph=1``. ONNX Runtime captures the
    graph on the first run and replays it on later runs; a replay needs every input and output at the
    same device address, so the step's inputs (one token, a mask of past + 1, a past of ``past``) and
    its outputs (logits, presents of past + 1) are bound once to fixed device buffers. The cache does
    not grow between replays: each replay is the step from ``past`` to ``past + 1``, the same work as
    the KV-cache loop's step at that length, without the per-kernel launch cost on the host. A value
    is ``steps`` replays timed together. (``device="cpu"`` runs the same fixed-buffer loop without a
    graph, for tests.)
    """
    from onnxqf.runtime.session import ort

    if not io.cache:
        raise OnnxqfError(f"{io.path}: no KV cache to decode with")
    rt = ort()
    rng = np.random.default_rng(seed)
    feeds = {io.ids: _ids(io, rng, batch, 1), io.mask: np.ones((batch, past + 1), io.int_types[io.mask])}
    if io.positions:
        feeds[io.positions] = np.full((batch, 1), past, io.int_types[io.positions])
    kv = _past_arrays(io, rng, batch, past)
    feeds.update({name: kv for name, _ in io.cache})
    values = {name: rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0) for name, a in feeds.items()}
    if not io.vocab:
        raise OnnxqfError(f"{io.path}: a CUDA graph needs a static vocabulary size on 'logits'")
    outs = {io.logits: rt.OrtValue.ortvalue_from_shape_and_type([batch, 1, io.vocab], io.logits_dtype, device, 0)}
    for _, present in io.cache:
        outs[present] = rt.OrtValue.ortvalue_from_shape_and_type([batch, io.kv_heads, past + 1, io.head_dim],
                                                                 io.cache_dtype, device, 0)
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name, value in outs.items():
        binding.bind_ortvalue_output(name, value)
    ro = _run_options(rt)
    session.run_with_iobinding(binding, ro)  # capture
    speeds = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            session.run_with_iobinding(binding, ro)
        binding.synchronize_outputs()
        if i >= warmup:
            speeds.append(batch * steps / (time.perf_counter() - t0))
    return speeds


# -- the command ----------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    ep: str = "cpu"
    batch: int = 1
    seq: int = 512
    past: tuple[int, ...] = (128, 512, 2048)
    decode_tokens: int = 32
    repeats: int = 10
    warmup: int = 3
    cuda_graph: bool = False  # also decode steps replayed as CUDA graphs (measure_decode_step_graph)
    progress: bool = True
    nbits_kernel: str = "default"  # MatMulNBits kernels: "default", "fpa-intb" (CUTLASS, ORT_FPA_INTB_GEMM=1) or "both"


NBITS_KERNELS = ("default", "fpa-intb", "both")


def _runs(ios: list[ModelIO], kernel: str) -> list[tuple[int, str]]:
    """(model index, kernel) pairs to measure. The fpA_intB kernels only change models with a MatMulNBits node
    they take; every other model is measured once, with the default kernels."""
    if kernel not in NBITS_KERNELS:
        raise OnnxqfError(f"--nbits-kernel must be one of {', '.join(NBITS_KERNELS)}, not '{kernel}'")
    runs = []
    for i, io in enumerate(ios):
        if io.nbits["fpa_intb"] == 0 or kernel == "default":
            runs.append((i, "default"))
        else:
            runs += [(i, "default"), (i, "fpa-intb")] if kernel == "both" else [(i, "fpa-intb")]
    return runs


def parse_past(text: str) -> tuple[int, ...]:
    """'128,512,2048' -> (128, 512, 2048); '' or 'none' -> ()."""
    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OnnxqfError(f"--past expects comma-separated lengths such as 128,512,2048, not '{text}'") from None
    if any(v < 0 for v in values):
        raise OnnxqfError(f"--past lengths must be >= 0, not '{text}'")
    return values


def check_provider(ep: str) -> str:
    """The provider's name; ProviderUnavailableError (exit 3, as `onnxqf check`) if this onnxruntime lacks it."""
    from onnxqf.runtime.session import ort
    from onnxqf.runtime.target import get_target

    target = get_target(ep)
    target.require(ort())
    return target.provider


def run_bench(models: list[str], opts: BenchOptions, ref: str | None = None) -> dict:
    """Measure ``ref`` (default: the first model) and every model; speedups are against the reference."""
    from tqdm.auto import tqdm

    from onnxqf.runtime.session import nbits_kernel_env, ort

    if not models:
        raise OnnxqfError("no model to measure")
    if opts.batch < 1 or opts.seq < 1 or opts.repeats < 1 or opts.warmup < 0 or opts.decode_tokens < 0:
        raise OnnxqfError("--batch, --seq and --repeats must be >= 1, --warmup and --decode-tokens >= 0")
    paths = ([ref] if ref is not None else []) + list(models)
    ios = [describe(p) for p in paths]  # every bad input is reported before anything is measured
    provider = check_provider(opts.ep)
    if opts.cuda_graph and opts.ep != "cuda":
        raise OnnxqfError("--cuda-graph needs --ep cuda")
    runs = _runs(ios, opts.nbits_kernel)
    if opts.nbits_kernel != "default" and opts.ep != "cuda":
        raise OnnxqfError("--nbits-kernel fpa-intb|both selects CUDA kernels of MatMulNBits: it needs --ep cuda")
    device = DEVICE[opts.ep]
    pasts = list(opts.past) if opts.decode_tokens > 0 else []
    per_cache = len(pasts) * (2 if opts.cuda_graph else 1)
    total = sum(2 + (per_cache if ios[i].has_cache else 0) for i, _ in runs)
    rt = ort()
    result = {"ep": opts.ep, "provider": provider, "onnxruntime": rt.__version__, "batch": opts.batch, "seq": opts.seq,
              "past": pasts, "decode_tokens": opts.decode_tokens, "repeats": opts.repeats, "warmup": opts.warmup,
              "cuda_graph": opts.cuda_graph, "nbits_kernel": opts.nbits_kernel, "reference": paths[0], "models": []}
    names = _names(paths)
    with tqdm(total=total, desc="bench", unit="step", disable=not opts.progress, leave=False) as bar:
        for n, (i, kernel) in enumerate(runs):
            path, io = paths[i], ios[i]
            with nbits_kernel_env(kernel == "fpa-intb"):
                row = _bench_one(path, io, names[i] + (" [fpA_intB]" if kernel == "fpa-intb" else ""), n == 0,
                                 opts, device, pasts, bar)
            row["nbits_kernel"] = kernel
            row["matmulnbits"] = io.nbits
            result["models"].append(row)
    _speedups(result)
    return result


def _bench_one(path, io: ModelIO, name: str, reference: bool, opts: BenchOptions, device: str, pasts: list[int],
               bar) -> dict:
    """One model's row: load, prefill, decode (and CUDA-graph decode steps)."""
    from onnxqf.runtime.session import make_session

    bar.set_description(f"{name}: loading")
    session = make_session(io.path, ep=opts.ep)
    bar.update(1)
    row: dict = {"name": name, "path": str(path), "reference": reference, "kv_cache": io.has_cache}
    bar.set_description(f"{name}: prefill {opts.batch}x{opts.seq}")
    times = _guard(name, "prefill", lambda: measure_prefill(session, io, device=device, batch=opts.batch,
                                                             seq=opts.seq, warmup=opts.warmup, repeats=opts.repeats))
    row["prefill_ms"] = _stats([t * 1e3 for t in times])
    row["prefill_tokens_per_s"] = opts.batch * opts.seq / float(np.median(times))
    bar.update(1)
    if io.has_cache:
        row["decode"] = {}
        for past in pasts:
            bar.set_description(f"{name}: decode past {past}")
            speeds = _guard(name, f"decode (past {past})", lambda: measure_decode(
                session, io, device=device, batch=opts.batch, past=past, tokens=opts.decode_tokens,
                warmup=opts.warmup, repeats=opts.repeats))
            stats = _stats(speeds)
            row["decode"][str(past)] = {"tokens_per_s": stats, "ms_per_token": opts.batch * 1e3 / stats["median"]}
            bar.update(1)
        if opts.cuda_graph and pasts:
            session = None  # one session in memory at a time
            gc.collect()
            row["decode_graph"] = {}
            for past in pasts:  # a captured graph has fixed shapes: one session per past length
                bar.set_description(f"{name}: decode step past {past}, CUDA graph")
                graph_session = _guard(name, "loading with a CUDA graph", lambda: make_session(
                    io.path, ep="cuda", provider_options={"enable_cuda_graph": "1"}))
                speeds = _guard(name, f"CUDA-graph decode step (past {past})", lambda: measure_decode_step_graph(
                    graph_session, io, batch=opts.batch, past=past, warmup=opts.warmup, repeats=opts.repeats,
                    steps=max(1, opts.decode_tokens)))
                stats = _stats(speeds)
                row["decode_graph"][str(past)] = {"tokens_per_s": stats,
                                                  "ms_per_token": opts.batch * 1e3 / stats["median"]}
                graph_session = None
                gc.collect()
                bar.update(1)
    else:
        row["decode"] = None
        row["decode_note"] = "n/a (no KV cache)"
    del session
    gc.collect()
    return row


def _guard(name: str, what: str, fn):
    try:
        return fn()
    except OnnxqfError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise OnnxqfError(f"{name}: onnxruntime failed during {what}: {msg}") from None


def _names(paths: list[str]) -> list[str]:
    stems = [Path(p).name.removesuffix(".onnx") for p in paths]
    return [stem if stems.count(stem) == 1 else str(p) for stem, p in zip(stems, paths)]


def _speedups(result: dict) -> None:
    """Speed relative to the reference (> 1: faster): prefill time ratio, decode tokens/s ratio."""
    ref = result["models"][0]
    for row in result["models"]:
        row["speedup"] = {"prefill": ref["prefill_ms"]["median"] / row["prefill_ms"]["median"], "decode": {}}
        for past, d in (row["decode"] or {}).items():
            rd = (ref["decode"] or {}).get(past)
            row["speedup"]["decode"][past] = d["tokens_per_s"]["median"] / rd["tokens_per_s"]["median"] if rd else None
        if row.get("decode_graph") is not None:
            row["speedup"]["decode_graph"] = {}
            for past, d in row["decode_graph"].items():
                rd = (ref.get("decode_graph") or {}).get(past)
                row["speedup"]["decode_graph"][past] = (d["tokens_per_s"]["median"] / rd["tokens_per_s"]["median"]
                                                        if rd else None)


def format_table(result: dict) -> str:
    """A markdown table: median [min–max] per measurement, and the speedup against the reference."""
    pasts = [str(p) for p in result["past"]]
    head = ["model", f"prefill {result['batch']}x{result['seq']} ms", "×ref"]
    graphs = bool(result.get("cuda_graph"))
    for p in pasts:
        head += [f"decode past {p} tok/s", "×ref"]
        if graphs:
            head += [f"CUDA-graph step past {p} tok/s", "×ref"]
    rows = []
    for row in result["models"]:
        pf = row["prefill_ms"]
        cells = [row["name"] + (" (ref)" if row["reference"] else ""), f"{_num(pf['median'])} [{_num(pf['min'])}–{_num(pf['max'])}]",
                 f"{row['speedup']['prefill']:.2f}"]
        for p in pasts:
            d = (row["decode"] or {}).get(p)
            if d is None:
                cells += [row.get("decode_note", "n/a"), ""]
                continue
            cells += _rate_cells(d, row["speedup"]["decode"].get(p))
            if graphs:
                g = (row.get("decode_graph") or {}).get(p)
                cells += _rate_cells(g, (row["speedup"].get("decode_graph") or {}).get(p)) if g else ["n/a", ""]
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"{result['provider']}, onnxruntime {result['onnxruntime']}; median [min–max] of {result['repeats']} runs "
                 f"after {result['warmup']} warm-up; decode: {result['decode_tokens']} tokens per run; ×ref > 1 is faster")
    for row in result["models"]:
        if row.get("nbits_kernel") == "fpa-intb":
            nb = row["matmulnbits"]
            lines.append(f"{row['name']}: ONNX Runtime's CUTLASS weight-only kernels (ORT_FPA_INTB_GEMM=1) for "
                         f"{nb['fpa_intb']} of its {nb['nodes']} MatMulNBits nodes")
    return "\n".join(lines)


def _rate_cells(d: dict, speedup: float | None) -> list[str]:
    s = d["tokens_per_s"]
    return [f"{_num(s['median'])} [{_num(s['min'])}–{_num(s['max'])}]", f"{speedup:.2f}" if speedup is not None else "n/a"]


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
