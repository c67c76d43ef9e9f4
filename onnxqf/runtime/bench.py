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
``batch * decode_tokens / elapsed`` tokens/s.

**The cache as the client binds it.** onnxruntime-genai runs a folder whose ``genai_config.json`` says
``search.past_present_share_buffer`` (the model builder writes it for every ``GroupQueryAttention`` graph, on
every provider) with one buffer per cache input, ``max_length`` positions long, bound as both ``past`` and
``present``: ``GroupQueryAttention`` then writes the new positions in place and reads the valid ones by the
mask. Without it, every step allocates each ``present``, zeroes it and copies the past into it (on the CPU a
single-threaded memset of every layer's cache per token). ``cache="auto"`` (the default) binds the cache the
way the folder's config says; ``"shared"`` / ``"separate"`` force one way (shared needs a
``GroupQueryAttention`` graph). Shared, each cache input is one buffer of ``past + decode_tokens`` positions
(prefill: ``seq``; a CUDA-graph step: ``past + 1``) whose first ``past`` hold the random past, bound as input
and output; a step's work does not depend on the buffer's length, which genai makes ``max_length``. Each
measurement is ``warmup`` untimed runs, then
``repeats`` timed ones, reported as median, min, max and interquartile range. Timing is
``time.perf_counter`` around ``run_with_iobinding``: with ONNX Runtime's default run options the
provider's stream is synchronized before ``run`` returns, and ``synchronize_outputs`` is called
before the clock stops as well. Models are loaded and measured one after another (one session in
memory at a time); the reference is measured first.

**The CPU** (``--ep cpu``): the table's first line and the JSON's ``cpu`` say how many intra-op threads the
sessions ran with (their ``intra_op_num_threads``; 0 means ONNX Runtime's default, one per physical core) and
the best instruction set of the CPU that ONNX Runtime's kernels dispatch on (AMX, AVX512-VNNI, AVX-512,
AVX-VNNI, AVX2; from /proc/cpuinfo's flags, "unknown" where there is none): int8 speed depends on both.

**Where the time goes** (``op_times``, ``--op-times``): after a model's measurements, a second session with
ONNX Runtime's profiler runs ``OP_TIME_RUNS`` prefills and one decode loop at the first past; the kernel time of
its nodes is summed per operator type (:func:`op_times`) and given per prefill and per decode token. The profiler
adds a few microseconds per node, so on small graphs the totals exceed the table's times: the shares are what to
read. On CUDA that profiler times a node's launch, not its kernel, so there the same runs go under the GPU's
activity tracer instead (:mod:`onnxqf.runtime.cuda_profile`: GPU ms per kernel, e.g. "cutlass GEMM int8",
"walsh_quantize_kernel<4>", "memcpy"; needs PyTorch); a decode token's kernel time below its step time is the
host's share.

**MatMulNBits kernels.** ONNX Runtime's CUDA provider has two sets: its default ones and TensorRT-LLM's
CUTLASS weight-only GEMM/GEMV ("fpA_intB"), which it uses for the nodes they cover when
``ORT_FPA_INTB_GEMM`` is set as a session is made. ``nbits_kernel`` picks them per run ("both": each
model with such nodes twice); the variable is set or cleared around each session, whatever the caller's
environment holds, so a row says which kernels it measured.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxqf.errors import OnnxqfError
from onnxqf.graph.graphio import PAST_RE, GraphIO

__all__ = ["CACHE_MODES", "DEVICE", "ISA_TIERS", "NBITS_KERNELS", "BenchModel", "BenchOptions", "bind_cache",
           "cache_mode", "check_provider", "cpu_info", "cpu_isa", "describe", "format_table", "kernel_runs",
           "measure_decode", "measure_decode_step_graph", "measure_prefill", "op_times", "parse_past", "past_arrays",
           "physical_cores", "run_bench", "shared_cache_buffers"]

DEVICE = {"cpu": "cpu", "cuda": "cuda"}
DRIVES = "bench drives input_ids, attention_mask, position_ids and past_key_values.N.key|value"


@dataclass(frozen=True)
class BenchModel:
    """A model as bench drives it: its inputs and outputs (a :class:`GraphIO` checked by :func:`describe`) and
    its MatMulNBits nodes (:func:`onnxqf.runtime.placement.nbits_kernels`)."""

    io: GraphIO
    nbits: dict = field(default_factory=lambda: {"nodes": 0, "fpa_intb": 0, "blockers": {}})
    shares_cache: bool = False  # its genai_config.json says past_present_share_buffer (see the module doc)
    gqa: bool = False  # its graph has GroupQueryAttention nodes (the op that takes a shared past/present buffer)

    @property
    def path(self) -> str:
        return self.io.path

    @property
    def has_cache(self) -> bool:
        return self.io.has_cache


def describe(path: str | os.PathLike) -> BenchModel:
    """Read the graph's inputs and outputs (external data is not loaded) and check bench can drive them.

    Rules (beyond :class:`GraphIO`'s): a ``logits`` output and an ``input_ids`` input; every other input
    is ``attention_mask``, ``position_ids`` or ``past_key_values.N.key|value`` with its ``present.N.key|value``
    output; a KV-cache graph has an attention mask and static (or genai_config.json-given) kv_heads and
    head_dim.
    """
    import onnx

    from onnxqf.genai.feeds import graph_io
    from onnxqf.runtime.placement import nbits_kernels

    io = graph_io(path)  # an onnxruntime-genai folder: its decoder graph, cache dims from its config
    p = io.path
    if io.logits != "logits" or "logits" not in io.outputs:
        raise OnnxqfError(f"{p}: no 'logits' output (outputs: {', '.join(io.outputs) or 'none'}); bench measures "
                          "LLM graphs input_ids -> logits")
    if io.ids != "input_ids":
        raise OnnxqfError(f"{p}: no 'input_ids' input (inputs: {', '.join(io.inputs) or 'none'})")
    if io.unknown:
        raise OnnxqfError(f"{p}: unsupported input '{io.unknown[0]}' ({DRIVES})")
    if io.conv_state:
        raise OnnxqfError(f"{p}: unsupported input '{io.conv_state[0][0]}' (LFM2's conv state; {DRIVES})")
    for past, present in io.cache:
        if not PAST_RE.match(past):
            raise OnnxqfError(f"{p}: unsupported input '{past}' ({DRIVES})")
        if present is None:
            m = PAST_RE.match(past)
            raise OnnxqfError(f"{p}: input '{past}' has no matching output 'present.{m.group(1)}.{m.group(2)}'")
    if io.cache and (io.cache_rank != 4 or not io.kv_shape_known):
        raise OnnxqfError(f"{p}: '{io.cache[0][0]}' must be [batch, kv_heads, past, head_dim] with static kv_heads and "
                          "head_dim (or a genai_config.json beside the graph that gives them)")
    if io.cache and io.mask is None:
        raise OnnxqfError(f"{p}: a KV-cache graph needs an attention_mask input")
    graph = onnx.load(p, load_external_data=False)
    gqa = any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
    return BenchModel(io, nbits_kernels(graph), shares_cache=bool(io.cache) and gqa and _config_shares(p), gqa=gqa)


def _config_shares(path: str | os.PathLike) -> bool:
    """The ``search.past_present_share_buffer`` of the genai_config.json beside ``path`` (False without one)."""
    from onnxqf.genai.folder import genai_config

    search = (genai_config(path) or {}).get("search")
    return bool(isinstance(search, dict) and search.get("past_present_share_buffer"))


CACHE_MODES = ("auto", "shared", "separate")


def cache_mode(model: BenchModel, mode: str) -> bool:
    """Whether to bind ``model``'s cache as one shared past/present buffer, for ``--cache`` ``mode``."""
    if mode not in CACHE_MODES:
        raise OnnxqfError(f"--cache must be one of {', '.join(CACHE_MODES)}, not '{mode}'")
    if mode == "shared" and model.io.cache and not model.gqa:
        raise OnnxqfError(f"{model.path}: --cache shared needs GroupQueryAttention nodes (the op that writes its "
                          "present into its past buffer); this graph has none")
    return bool(model.io.cache) and (mode == "shared" or (mode == "auto" and model.shares_cache))


# -- inputs ---------------------------------------------------------------------------------------


def _ortvalue(rt, array: np.ndarray, device: str):
    array = np.ascontiguousarray(array)
    try:
        return rt.OrtValue.ortvalue_from_numpy(array, device, 0)
    except Exception:
        if array.size == 0:  # an empty past: nothing to copy, so the host holds it
            return rt.OrtValue.ortvalue_from_numpy(array, "cpu", 0)
        raise


def _ids(io: GraphIO, rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    high = min(io.vocab or 100, 1000)
    return rng.integers(0, high, (batch, seq)).astype(io.int_types[io.ids])


def past_arrays(io: GraphIO, rng: np.random.Generator, batch: int, past: int,
                 capacity: int | None = None) -> np.ndarray:
    """One random [batch, kv_heads, past, head_dim] array (the same values serve every layer); with ``capacity``,
    [batch, kv_heads, capacity, head_dim] whose first ``past`` positions are those values and the rest zeros (a
    shared past/present buffer)."""
    shape = (batch, io.kv_heads, past, io.head_dim)
    values = rng.standard_normal(shape, dtype=np.float32).astype(io.cache_dtype)
    if capacity is None:
        return values
    buffer = np.zeros((batch, io.kv_heads, capacity, io.head_dim), io.cache_dtype)
    buffer[:, :, :past] = values
    return buffer


def shared_cache_buffers(rt, io: GraphIO, rng: np.random.Generator, batch: int, past: int, capacity: int, device: str):
    """One device buffer per cache input (its own: each layer's present is written into it), ``capacity``
    positions, the first ``past`` random."""
    array = past_arrays(io, rng, batch, past, capacity)
    return [rt.OrtValue.ortvalue_from_numpy(array.copy(), device, 0) for _ in io.cache]


def bind_cache(binding, io: GraphIO, values, shared: bool, device: str) -> None:
    """Bind each cache input to ``values``; its present to the same buffer (shared) or to a new output."""
    for (past, present), value in zip(io.cache, values):
        binding.bind_ortvalue_input(past, value)
        if shared:
            binding.bind_ortvalue_output(present, value)
        else:
            binding.bind_output(present, device, 0)


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


def measure_prefill(session, io: GraphIO, *, device: str, batch: int, seq: int, warmup: int, repeats: int,
                    seed: int = 0, traced=None, shared: bool = False) -> list[float]:
    """Seconds per forward of batch x seq tokens (empty past for KV-cache graphs), ``repeats`` values.
    ``traced``: a function that runs the function it is given (a profiler around the runs, not the uploads).
    ``shared``: the cache bound as one past/present buffer of ``seq`` positions (module doc)."""
    from onnxqf.runtime.session import ort

    rt = ort()
    rng = np.random.default_rng(seed)
    feeds = {io.ids: _ids(io, rng, batch, seq)}
    if io.mask:
        feeds[io.mask] = np.ones((batch, seq), io.int_types[io.mask])
    if io.positions:
        feeds[io.positions] = np.broadcast_to(np.arange(seq), (batch, seq)).astype(io.int_types[io.positions])
    values = {name: _ortvalue(rt, arr, device) for name, arr in feeds.items()}  # kept alive while bound
    cache = (shared_cache_buffers(rt, io, rng, batch, 0, seq, device) if shared else
             [_ortvalue(rt, past_arrays(io, rng, batch, 0), device) for _ in io.cache])
    ro = _run_options(rt)
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output(io.logits, device, 0)
    bind_cache(binding, io, cache, shared, device)
    times = []

    def runs():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            session.run_with_iobinding(binding, ro)
            binding.synchronize_outputs()
            if i >= warmup:
                times.append(time.perf_counter() - t)

    (traced or (lambda f: f()))(runs)
    return times


def measure_decode(session, io: GraphIO, *, device: str, batch: int, past: int, tokens: int, warmup: int,
                   repeats: int, seed: int = 0, traced=None, shared: bool = False) -> list[float]:
    """Tokens/s of a KV-cache loop of ``tokens`` steps from a random past of length ``past``, ``repeats`` values
    (``traced``: as :func:`measure_prefill`'s). ``shared``: each cache input one buffer of ``past + tokens``
    positions bound as past and present, written in place (module doc); else each step's presents are the next
    step's pasts."""
    from onnxqf.runtime.session import ort

    if not io.cache:
        raise OnnxqfError(f"{io.path}: no KV cache to decode with")
    rt = ort()
    rng = np.random.default_rng(seed)
    if shared:  # each loop overwrites positions past.. of the same buffers: the same work every time
        start = shared_cache_buffers(rt, io, rng, batch, past, past + max(tokens, 1), device)
    else:
        start_array = past_arrays(io, rng, batch, past)
        start = [_ortvalue(rt, start_array, device) for _ in io.cache]
    token = _ortvalue(rt, _ids(io, rng, batch, 1), device)
    masks = [_ortvalue(rt, np.ones((batch, past + t + 1), io.int_types[io.mask]), device) for t in range(tokens)]
    positions = ([_ortvalue(rt, np.full((batch, 1), past + t, io.int_types[io.positions]), device)
                  for t in range(tokens)]
                 if io.positions else None)
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
            binding.bind_output(io.logits, device, 0)
            bind_cache(binding, io, cur, shared, device)
            session.run_with_iobinding(binding, ro)
            if not shared:
                cur = list(binding.get_outputs())[1:]  # the presents, still on the device, are the next past
        binding.synchronize_outputs()
        return time.perf_counter() - t0

    speeds = []

    def runs():
        for i in range(warmup + repeats):
            elapsed = loop()
            if i >= warmup:
                speeds.append(batch * tokens / elapsed)

    (traced or (lambda f: f()))(runs)
    return speeds


def measure_decode_step_graph(session, io: GraphIO, *, batch: int, past: int, warmup: int, repeats: int,
                              steps: int = 32, seed: int = 0, device: str = "cuda",
                              shared: bool = False) -> list[float]:
    """Tokens/s of one decode step at a fixed ``past``, replayed as a CUDA graph, ``repeats`` values.

    ``session`` must be a CUDA session made with ``enable_cuda_graph=1``. ONNX Runtime captures the
    graph on the first run and replays it on later runs; a replay needs every input and output at the
    same device address, so the step's inputs (one token, a mask of past + 1, a past of ``past``) and
    its outputs (logits, presents of past + 1) are bound once to fixed device buffers. The cache does
    not grow between replays: each replay is the step from ``past`` to ``past + 1``, the same work as
    the KV-cache loop's step at that length, without the per-kernel launch cost on the host. A value
    is ``steps`` replays timed together. (``device="cpu"`` runs the same fixed-buffer loop without a
    graph, for tests.) ``shared``: each cache input one buffer of ``past + 1`` positions bound as past and
    present (module doc): each replay writes position ``past`` in place.
    """
    from onnxqf.runtime.session import ort

    if not io.cache:
        raise OnnxqfError(f"{io.path}: no KV cache to decode with")
    rt = ort()
    rng = np.random.default_rng(seed)
    feeds = {io.ids: _ids(io, rng, batch, 1), io.mask: np.ones((batch, past + 1), io.int_types[io.mask])}
    if io.positions:
        feeds[io.positions] = np.full((batch, 1), past, io.int_types[io.positions])
    if not shared:
        kv = past_arrays(io, rng, batch, past)
        feeds.update({name: kv for name, _ in io.cache})
    values = {name: rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0) for name, a in feeds.items()}
    if not io.vocab:
        raise OnnxqfError(f"{io.path}: a CUDA graph needs a static vocabulary size on 'logits'")
    outs = {io.logits: rt.OrtValue.ortvalue_from_shape_and_type([batch, 1, io.vocab], io.logits_dtype, device, 0)}
    if shared:
        for (name, present), buf in zip(io.cache, shared_cache_buffers(rt, io, rng, batch, past, past + 1, device)):
            values[name] = outs[present] = buf
    else:
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
    op_times: bool = False  # also profile: kernel time per operator type (CPU) or per GPU kernel (CUDA)
    cache: str = "auto"  # how the KV cache is bound: "auto" (as the folder's genai_config says), "shared", "separate"


NBITS_KERNELS = ("default", "fpa-intb", "both")


def kernel_runs(ios: list[BenchModel], kernel: str) -> list[tuple[int, str]]:
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
    described = [describe(p) for p in paths]  # every bad input is reported before anything is measured
    for model in described:
        cache_mode(model, opts.cache)
    provider = check_provider(opts.ep)
    if opts.cuda_graph and opts.ep != "cuda":
        raise OnnxqfError("--cuda-graph needs --ep cuda")
    runs = kernel_runs(described, opts.nbits_kernel)
    if opts.nbits_kernel != "default" and opts.ep != "cuda":
        raise OnnxqfError("--nbits-kernel fpa-intb|both selects CUDA kernels of MatMulNBits: it needs --ep cuda")
    device = DEVICE[opts.ep]
    pasts = list(opts.past) if opts.decode_tokens > 0 else []
    per_cache = len(pasts) * (2 if opts.cuda_graph else 1)
    total = sum(2 + (per_cache if described[i].has_cache else 0) + opts.op_times for i, _ in runs)
    rt = ort()
    result = {"ep": opts.ep, "provider": provider, "onnxruntime": rt.__version__, "batch": opts.batch, "seq": opts.seq,
              "past": pasts, "decode_tokens": opts.decode_tokens, "repeats": opts.repeats, "warmup": opts.warmup,
              "cuda_graph": opts.cuda_graph, "nbits_kernel": opts.nbits_kernel, "cache_mode": opts.cache,
              "reference": paths[0], "models": []}
    names = _names(paths)
    with tqdm(total=total, desc="bench", unit="step", disable=not opts.progress, leave=False) as bar:
        for n, (i, kernel) in enumerate(runs):
            path, model = paths[i], described[i]
            with nbits_kernel_env(kernel == "fpa-intb"):
                row = _bench_one(path, model, names[i] + (" [fpA_intB]" if kernel == "fpa-intb" else ""), n == 0,
                                 opts, device, pasts, bar)
            row["nbits_kernel"] = kernel
            row["matmulnbits"] = model.nbits
            result["models"].append(row)
    if opts.ep == "cpu":  # what the CPU provider ran with: its threads (the reference's session) and the ISA
        result["cpu"] = cpu_info(result["models"][0]["intra_op_threads_setting"])
    _speedups(result)
    return result


# -- the CPU --------------------------------------------------------------------------------------

#: the instruction sets ONNX Runtime's CPU kernels (MLAS) dispatch on, best first, with the /proc/cpuinfo flags
#: each needs: AMX tiles for int8, AVX-512 VNNI, AVX-512 (F + BW), AVX-VNNI (256-bit), AVX2 + FMA
ISA_TIERS = (("AMX", ("amx_tile", "amx_int8")), ("AVX512-VNNI", ("avx512f", "avx512bw", "avx512_vnni")),
             ("AVX-512", ("avx512f", "avx512bw")), ("AVX-VNNI", ("avx2", "avx_vnni")), ("AVX2", ("avx2", "fma")))
ISA_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """(the best ISA of :data:`ISA_TIERS` the CPU has, the relevant flags it has) from ``/proc/cpuinfo``'s flags
    (``cpuinfo``: its text; default: read on Linux). "unknown" where there is no /proc/cpuinfo; "SSE only (no
    AVX2)" on an x86 CPU without AVX2."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "unknown", []
    line = next((ln for ln in cpuinfo.splitlines() if ln.split(":", 1)[0].strip() == "flags"), None)
    if line is None:
        return "unknown", []
    flags = set(line.split(":", 1)[1].split())
    have = [f for f in ISA_FLAGS if f in flags]
    isa = next((name for name, needs in ISA_TIERS if all(f in flags for f in needs)), "SSE only (no AVX2)")
    return isa, have


def physical_cores(cpuinfo: str | None = None) -> int | None:
    """Physical cores (distinct ``physical id`` / ``core id`` pairs of /proc/cpuinfo); None where it cannot tell."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    cores, package = set(), "0"
    for ln in cpuinfo.splitlines():
        key, _, value = ln.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def cpu_info(threads_setting: int = 0) -> dict:
    """The CPU provider's threads and the CPU's ISA, for bench's header and JSON. ``threads_setting``: the
    session's ``intra_op_num_threads`` (0: ONNX Runtime's default, one thread per physical core)."""
    isa, flags = cpu_isa()
    cores = physical_cores()
    if threads_setting > 0:
        threads, source = threads_setting, "session setting"
    else:
        threads, source = cores or os.cpu_count(), "onnxruntime default: physical cores" if cores else \
            "onnxruntime default: physical cores (not readable here: logical CPUs shown)"
    from onnxqf.runtime.kernels import cpu_gemm_isa

    return {"intra_op_threads": threads, "threads_source": source, "physical_cores": cores,
            "logical_cpus": os.cpu_count(), "isa": isa, "isa_flags": flags, "onnxqf_cpu_gemm": cpu_gemm_isa()}


def _bench_one(path, model: BenchModel, name: str, reference: bool, opts: BenchOptions, device: str, pasts: list[int],
               bar) -> dict:
    """One model's row: load, prefill, decode (and CUDA-graph decode steps)."""
    from onnxqf.runtime.session import make_session

    io = model.io
    shared = cache_mode(model, opts.cache)
    bar.set_description(f"{name}: loading")
    session = make_session(io.path, ep=opts.ep)
    bar.update(1)
    row: dict = {"name": name, "path": str(path), "reference": reference, "kv_cache": io.has_cache,
                 "cache": ("shared" if shared else "separate") if io.has_cache else None,
                 "intra_op_threads_setting": int(session.get_session_options().intra_op_num_threads)}
    bar.set_description(f"{name}: prefill {opts.batch}x{opts.seq}")
    times = _guard(name, "prefill", lambda: measure_prefill(session, io, device=device, batch=opts.batch,
                                                             seq=opts.seq, warmup=opts.warmup, repeats=opts.repeats,
                                                             shared=shared))
    row["prefill_ms"] = _stats([t * 1e3 for t in times])
    row["prefill_tokens_per_s"] = opts.batch * opts.seq / float(np.median(times))
    bar.update(1)
    if io.has_cache:
        row["decode"] = {}
        for past in pasts:
            bar.set_description(f"{name}: decode past {past}")
            speeds = _guard(name, f"decode (past {past})", lambda: measure_decode(
                session, io, device=device, batch=opts.batch, past=past, tokens=opts.decode_tokens,
                warmup=opts.warmup, repeats=opts.repeats, shared=shared))
            stats = _stats(speeds)
            row["decode"][str(past)] = {"tokens_per_s": stats, "ms_per_token": opts.batch * 1e3 / stats["median"]}
            bar.update(1)
        if opts.cuda_graph and pasts:
            session = None  # one session in memory at a time
            gc.collect()
            row["decode_graph"] = {}
            for past in pasts:  # a captured graph has fixed shapes: one session per past length
                bar.set_description(f"{name}: decode step past {past}, CUDA graph")
                try:  # a graph ONNX Runtime cannot capture is this row's note, not the end of the run
                    graph_session = _guard(name, "loading with a CUDA graph", lambda: make_session(
                        io.path, ep="cuda", provider_options={"enable_cuda_graph": "1"}))
                    speeds = _guard(name, f"CUDA-graph decode step (past {past})", lambda: measure_decode_step_graph(
                        graph_session, io, batch=opts.batch, past=past, warmup=opts.warmup, repeats=opts.repeats,
                        steps=max(1, opts.decode_tokens), shared=shared))
                except OnnxqfError as exc:
                    row["decode_graph_note"] = str(exc)
                    break
                finally:
                    graph_session = None
                    gc.collect()
                    bar.update(1)
                stats = _stats(speeds)
                row["decode_graph"][str(past)] = {"tokens_per_s": stats,
                                                  "ms_per_token": opts.batch * 1e3 / stats["median"]}
    else:
        row["decode"] = None
        row["decode_note"] = "n/a (no KV cache)"
    session = None  # one session in memory at a time
    gc.collect()
    if opts.op_times:
        bar.set_description(f"{name}: profiling")
        row["op_times"] = _guard(name, "profiling", lambda: _profile(io, opts, device, pasts, shared))
        bar.update(1)
    return row


#: prefills the profiling session runs after its untimed first one; their kernel times are averaged
OP_TIME_RUNS = 3


def op_times(events: list[dict], skip: int = 1) -> dict[str, float]:
    """Milliseconds per run by operator type, largest first, from ONNX Runtime profile ``events`` (its JSON).

    Rules: a run is a ``model_run`` event (``cat`` "Session"); the first ``skip`` runs (warm-up: allocations,
    first-touch of the weights) are left out and the rest averaged; only node events count (``cat`` "Node", a
    name ending "_kernel_time": the kernel's own time, not the "_fence_before/after" events) whose start falls
    after the skipped runs' end; ``dur`` is in microseconds; the operator type is ``args.op_name``. A profile
    with no more than ``skip`` runs: ValueError."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) <= skip:
        raise ValueError(f"the profile holds {len(runs)} runs; {skip} are skipped")
    after = runs[skip - 1]["ts"] + runs[skip - 1]["dur"] if skip else float("-inf")
    total: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e.get("ts", 0) < after:
            continue
        op = (e.get("args") or {}).get("op_name", "?")
        total[op] = total.get(op, 0.0) + float(e.get("dur", 0)) / 1e3
    n = len(runs) - skip
    return {op: ms / n for op, ms in sorted(total.items(), key=lambda kv: -kv[1])}


def _profile(io: GraphIO, opts: BenchOptions, device: str, pasts: list[int], shared: bool = False) -> dict:
    """Kernel ms per operator type: per prefill of ``batch x seq`` and per decode token at ``pasts[0]`` (a loop of
    ``decode_tokens`` steps after a first one)."""
    import json
    import tempfile

    from onnxqf.runtime.session import make_session

    out: dict = {}
    phases = ["prefill"] + (["decode"] if io.has_cache and pasts and opts.decode_tokens > 0 else [])
    if opts.ep == "cuda":
        return _profile_cuda(io, opts, phases, pasts, shared)
    with tempfile.TemporaryDirectory(prefix="onnxqf-profile-") as tmp:
        for phase in phases:
            session = make_session(io.path, ep=opts.ep, profile=os.path.join(tmp, phase))
            if phase == "prefill":
                measure_prefill(session, io, device=device, batch=opts.batch, seq=opts.seq, warmup=1,
                                repeats=OP_TIME_RUNS, shared=shared)
            else:  # one step first (the skipped run), then the loop: each step is one run
                measure_decode(session, io, device=device, batch=opts.batch, past=pasts[0], tokens=1, warmup=0,
                               repeats=1, shared=shared)
                measure_decode(session, io, device=device, batch=opts.batch, past=pasts[0],
                               tokens=opts.decode_tokens, warmup=0, repeats=1, shared=shared)
            events = json.loads(Path(session.end_profiling()).read_text())
            session = None
            gc.collect()
            out[phase] = op_times(events)
    out["decode_past"] = pasts[0] if "decode" in out else None
    return out


def _profile_cuda(io: GraphIO, opts: BenchOptions, phases: list[str], pasts: list[int],
                  shared: bool = False) -> dict:
    """GPU ms per kernel family (:mod:`onnxqf.runtime.cuda_profile`): per prefill (``OP_TIME_RUNS`` after one
    untraced) and per decode token at ``pasts[0]`` (a traced loop of ``decode_tokens`` steps after one untraced)."""
    from onnxqf.runtime.cuda_profile import profile_cuda
    from onnxqf.runtime.session import make_session

    session = make_session(io.path, ep="cuda")
    out: dict = {}
    for phase in phases:
        got: dict = {}

        def traced(fn, n):
            got["times"] = profile_cuda(fn, n)
        if phase == "prefill":  # one untraced run first, then OP_TIME_RUNS traced (the inputs uploaded before)
            measure_prefill(session, io, device="cuda", batch=opts.batch, seq=opts.seq, warmup=1, repeats=0,
                            shared=shared)
            measure_prefill(session, io, device="cuda", batch=opts.batch, seq=opts.seq, warmup=0, repeats=OP_TIME_RUNS,
                            traced=lambda f: traced(f, OP_TIME_RUNS), shared=shared)
        else:  # one untraced loop first, then a traced loop of decode_tokens steps
            measure_decode(session, io, device="cuda", batch=opts.batch, past=pasts[0], tokens=opts.decode_tokens,
                           warmup=0, repeats=1, shared=shared)
            measure_decode(session, io, device="cuda", batch=opts.batch, past=pasts[0], tokens=opts.decode_tokens,
                           warmup=0, repeats=1, traced=lambda f: traced(f, opts.decode_tokens), shared=shared)
        out[phase] = got["times"]
    out["decode_past"] = pasts[0] if "decode" in out else None
    out["unit"] = "GPU ms per kernel family"
    return out


def _guard(name: str, what: str, fn):
    try:
        return fn()
    except OnnxqfError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise OnnxqfError(f"{name}: onnxruntime failed during {what}: {msg}") from None


def _cache_note(rows: list[dict]) -> str:
    """'; KV cache: shared past/present buffers' (or separate, or which row had which)."""
    kinds = {row["name"]: row.get("cache") for row in rows if row.get("cache")}
    if not kinds:
        return ""
    if len(set(kinds.values())) == 1:
        kind = next(iter(kinds.values()))
        return "; KV cache: " + ("one past/present buffer per input (as genai_config.json says)" if kind == "shared"
                                 else "a new present per step")
    return "; KV cache: " + ", ".join(f"{name} {kind}" for name, kind in kinds.items())


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
        cells = [row["name"] + (" (ref)" if row["reference"] else ""),
                 f"{_num(pf['median'])} [{_num(pf['min'])}–{_num(pf['max'])}]",
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
    lines = []
    cpu = result.get("cpu")
    if cpu:
        lines.append(f"CPU: {cpu['intra_op_threads']} intra-op threads ({cpu['threads_source']}); ISA {cpu['isa']}"
                     + (f" ({' '.join(cpu['isa_flags'])})" if cpu["isa_flags"] else "")
                     + (f"; onnxqf.cpu.W8A8Linear's GEMM: {cpu['onnxqf_cpu_gemm']}"
                        if cpu.get("onnxqf_cpu_gemm", "?") != "?" else ""))
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"{result['provider']}, onnxruntime {result['onnxruntime']}; median [min–max] of "
                 f"{result['repeats']} runs after {result['warmup']} warm-up; decode: {result['decode_tokens']} "
                 "tokens per run; ×ref > 1 is faster" + _cache_note(result["models"]))
    for row in result["models"]:
        if row.get("op_times"):
            lines.append(_op_time_line(row))
        if row.get("decode_graph_note"):
            lines.append(f"{row['name']}: no CUDA-graph step: {row['decode_graph_note']}")
        if row.get("nbits_kernel") == "fpa-intb":
            nb = row["matmulnbits"]
            lines.append(f"{row['name']}: ONNX Runtime's CUTLASS weight-only kernels (ORT_FPA_INTB_GEMM=1) for "
                         f"{nb['fpa_intb']} of its {nb['nodes']} MatMulNBits nodes")
    return "\n".join(lines)


def _op_time_line(row: dict, top: int = 6) -> str:
    """``name: prefill 12.3 ms of kernels: MatMul 60% (7.4), ...; decode token ...``: the largest operator types."""
    parts = []
    for phase, unit in (("prefill", "prefill"), ("decode", "decode token")):
        t = row["op_times"].get(phase)
        if not t:
            continue
        total = sum(t.values())
        ops = ", ".join(f"{op} {100 * ms / total:.0f}% ({_num(ms)})" for op, ms in list(t.items())[:top])
        parts.append(f"{unit} {_num(total)} ms of kernels: {ops}")
    return f"{row['name']} op times: " + "; ".join(parts)


def _rate_cells(d: dict, speedup: float | None) -> list[str]:
    s = d["tokens_per_s"]
    return [f"{_num(s['median'])} [{_num(s['min'])}–{_num(s['max'])}]",
            f"{speedup:.2f}" if speedup is not None else "n/a"]


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
