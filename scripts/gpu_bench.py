#!/usr/bin/env python3
"""The benchmark behind docs/benchmarks.md: int8/int4 kernels, online rotations and end-to-end speed on
ONNX Runtime's CUDA provider at Llama-2-7B shapes (issue 9, and issue 7's cost of online rotations).

On the GPU machine (one command; it keeps to --budget seconds, 500 by default, under the 10-minute limit):

    source .ortgpu/activate.sh && python scripts/gpu_bench.py --out $OUT

What each section needs:

  a   per-linear kernels            onnx + numpy + onnxruntime-gpu only (graphs built here with onnx.helper)
  b   online rotations              the same; the Kronecker factor sizes come from onnxqf.maths.hadamard (pure numpy)
                                    when it imports, else the sizes it gives today (4096: 16x16x16, 11008: 344x16x2)
  c2  hand-built KV-cache decoder   the same to build and time; the decode loop is `onnxqf bench`'s
                                    (onnxqf.runtime.bench, needs onnx_ir importable) or, without it, one step at a fixed past
  c1  onnxqf end to end             onnxqf installed from this tree (`pip install --no-deps --no-build-isolation -e .`:
                                    onnxqf.passes and onnxqf.models import only installed) with onnx_ir, onnxscript,
                                    torch and transformers. Export and rewrites run in a background process on the
                                    CPU (no GPU) while a, b and c2 time; then `onnxqf check` and `onnxqf bench` on
                                    the GPU. Without them c1 is skipped with the reason in the JSON.

Every result is written to OUT/gpu_bench.json as soon as it is measured, so a run cut short keeps what
it got; OUT/gpu_bench.md gets the markdown tables at the end (also printed). Sections that did not fit
in the budget are listed with the command that runs them (``--sections``).

Method: graphs in float16; inputs and outputs bound on the device with IOBinding; each timed run is
time.perf_counter around run_with_iobinding + synchronize_outputs (ONNX Runtime synchronizes the
provider's stream before run returns under default run options); medians of --repeats (>= 20 on
the GPU) after --warmup runs. Per-linear and rotation graphs hold R independent copies of the op
(distinct weights, all larger than the H100's 50 MB L2 together) and report total/R, so ONNX Runtime's
per-run overhead is spread out and the weights are not served from L2.

On a CPU, every path runs at tiny shapes: python scripts/gpu_bench.py --out /tmp/gb --ep cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
ONNXQF_INSTALLED = importlib.util.find_spec("onnxqf") is not None
if not ONNXQF_INSTALLED:  # the core modules (hadamard, bench, runtime) import from the tree; passes/models need an install
    sys.path.append(str(ROOT))

F16, F32, I8, U8, I64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT64
MS = "com.microsoft"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# -- configuration ----------------------------------------------------------------------------------


@dataclass
class Config:
    hidden: int = 4096
    heads: int = 32
    head_dim: int = 128
    d_ff: int = 11008
    vocab: int = 32000
    linears: tuple = ((4096, 11008), (11008, 4096), (4096, 4096))
    ms: tuple = (1, 16, 2048)
    rot_ms: tuple = (1, 2048)
    attn_past: int = 512  # attention cost at M=1 is over this many cached tokens (+1)
    copies: int = 8  # R: independent copies of the op per timed graph
    prefill_seq: int = 2048
    pasts: tuple = (128, 512, 2048)
    decode_tokens: int = 16
    c2_layers: int = 4
    c1_layers: int = 2
    repeats: int = 30
    warmup: int = 5
    e2e_repeats: int = 20
    e2e_warmup: int = 3
    decode_repeats: int = 20
    decode_warmup: int = 3
    graph_pasts: tuple = (512,)  # c2: decode steps replayed as CUDA graphs at these pasts (CUDA only)


def tiny_config() -> Config:
    # d_ff 172 = 43 * 4 has a large non-power-of-two factor, as 11008 = 43 * 256 does
    return Config(hidden=64, heads=4, head_dim=16, d_ff=172, vocab=512, linears=((64, 172), (172, 64), (64, 64)),
                  ms=(1, 4, 32), rot_ms=(1, 32), attn_past=16, copies=2, prefill_seq=32, pasts=(8, 16), decode_tokens=3,
                  c2_layers=2, c1_layers=2, repeats=3, warmup=1, e2e_repeats=2, e2e_warmup=1, decode_repeats=2,
                  decode_warmup=1)


class Results:
    """The JSON results, rewritten atomically after every measurement."""

    def __init__(self, out: Path, meta: dict):
        self.path = out / "gpu_bench.json"
        self.data = {"meta": meta, "a_linears": [], "b_rotations": [], "c2_decoder": [], "c1_onnxqf": {}, "skipped": [],
                     "errors": []}
        self.save()

    def add(self, section: str, row) -> None:
        if isinstance(self.data[section], list):
            self.data[section].append(row)
        else:
            self.data[section].update(row)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


class Budget:
    def __init__(self, seconds: float):
        self.end = T0 + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def ok(self, need: float) -> bool:
        return self.left() > need

    def limit(self, seconds: float) -> "Budget":
        """A budget that ends ``seconds`` from now, or with this one if that comes first."""
        b = Budget(0)
        b.end = min(self.end, time.perf_counter() + max(0.0, seconds))
        return b


# -- graph building (onnx.helper only) -------------------------------------------------------------


class G:
    """A small graph builder: unique names, initializers, ops; ``model()`` makes an ONNX model (IR 10).

    With ``data`` (a file path), initializers of 1 KiB or more are written straight into that file as
    external data (4 KiB aligned): no multi-gigabyte protobuf is ever built or copied. The model must then be
    saved in the same folder (``save``) and loaded by path.
    """

    def __init__(self, data: Path | None = None):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.k = 0
        self.domains: set[str] = set()
        self.data = Path(data) if data is not None else None
        self._file = open(self.data, "wb") if self.data is not None else None

    def _name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def init(self, array: np.ndarray, base: str = "w") -> str:
        name = self._name(base)
        arr = np.ascontiguousarray(array)
        if self._file is None or arr.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        t = TensorProto()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        offset = self._file.tell()
        if offset % 4096:
            self._file.write(b"\0" * (4096 - offset % 4096))
            offset = self._file.tell()
        self._file.write(memoryview(arr.reshape(-1).view(np.uint8)))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.inits.append(t)
        return name

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, elem: int, shape: list | None = None, name: str | None = None) -> str:
        if name is not None and name != value:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
            value = name
        self.outputs.append(helper.make_tensor_value_info(value, elem, shape))
        return value

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        outs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        if domain:
            self.domains.add(domain)
        return outs[0] if n_out == 1 else outs

    def model(self, opset: int = 18) -> onnx.ModelProto:
        if self._file is not None:
            self._file.close()
        graph = helper.make_graph(self.nodes, "bench", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=10)


class Pools:
    """Random weights without generating gigabytes: distinct windows of a few random pools."""

    def __init__(self, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.size = size
        self.f16 = (rng.standard_normal(size, dtype=np.float32) * 0.02).astype(np.float16)
        # integer weights: the bytes of the float16 pool (values do not change a kernel's speed)
        self.i8, self.u8 = self.f16.view(np.int8), self.f16.view(np.uint8)
        self.count = 0

    def take(self, pool: np.ndarray, shape) -> np.ndarray:
        n = int(np.prod(shape))
        self.count += 1
        start = (self.count * 7919) % max(1, pool.size - n + 1)
        if n > pool.size:
            return np.resize(pool, shape)
        return pool[start:start + n].reshape(shape)


# -- linear lowerings -------------------------------------------------------------------------------
# W8A8 "token" is exactly what passes/quantize.py emits for a float16 model; the QuantizeLinear
# variants are candidates for issue 9's leaner lowering.


def act_quant_token(g: G, x: str) -> tuple[str, str]:
    """Abs, ReduceMax(-1), Max(tiny), Div(127, amax), Mul, Round, Cast<int8>; amax -> float32 for the rescale."""
    absx = g.op("Abs", [x])
    amax = g.op("ReduceMax", [absx, g.init(np.array([-1], np.int64), "axes")], keepdims=1)
    amax = g.op("Max", [amax, g.init(np.array(1e-4, np.float16), "tiny")])
    inv = g.op("Div", [g.init(np.array(127.0, np.float16), "qmax"), amax])
    xq = g.op("Cast", [g.op("Round", [g.op("Mul", [x, inv])])], to=I8)
    return xq, g.op("Cast", [amax], to=F32)


def rescale(g: G, acc: str, row_scale: str, w_scale: str) -> str:
    """Cast<f32>(acc) * row scale * column scale -> float16 (int32 accumulators overflow float16)."""
    y = g.op("Mul", [g.op("Cast", [acc], to=F32), row_scale])
    return g.op("Cast", [g.op("Mul", [y, w_scale])], to=F16)


def act_quant_ql(g: G, x2d: str, mode: str) -> tuple[str, str]:
    """Per-row scale at run time, then one QuantizeLinear (axis 0) in place of Div/Mul/Round/Cast.

    ql21: opset 21, output_dtype=int8, no zero point. ql19: opset 19, an int8 zero point of the scale's
    shape made with ConstantOfShape (per-axis zero points must match the scale's shape).
    """
    amax = g.op("ReduceMax", [g.op("Abs", [x2d]), g.init(np.array([1], np.int64), "axes")], keepdims=0)
    amax = g.op("Max", [amax, g.init(np.array(1e-4, np.float16), "tiny")])
    scale = g.op("Mul", [amax, g.init(np.array(1 / 127, np.float16), "inv_qmax")])
    if mode == "ql21":
        xq = g.op("QuantizeLinear", [x2d, scale], axis=0, output_dtype=I8)
    else:
        zp = g.op("ConstantOfShape", [g.op("Shape", [scale])], value=helper.make_tensor("z", I8, [1], [0]))
        xq = g.op("QuantizeLinear", [x2d, scale, zp], axis=0)
    row = g.op("Cast", [g.op("Unsqueeze", [scale, g.init(np.array([1], np.int64), "axes")])], to=F32)
    return xq, row


def nbits_weights(g: G, pools: Pools, K: int, N: int, bits: int, block: int) -> tuple[str, str]:
    """Random packed B uint8 [N, ceil(K/block), block*bits/8] and float16 scales [N*ceil(K/block)]."""
    blocks = -(-K // block)
    B = g.init(pools.take(pools.u8, (N, blocks, block * bits // 8)), "nbits_B")
    scales = g.init(np.abs(pools.take(pools.f16, (N * blocks,))) * np.float16(0.05) + np.float16(1e-3), "nbits_scales")
    return B, scales


def matmul_nbits(g: G, x: str, B: str, scales: str, K: int, N: int, bits: int, block: int) -> str:
    return g.op("MatMulNBits", [x, B, scales], domain=MS, K=K, N=N, bits=bits, block_size=block, accuracy_level=0)


# variant -> (opset, description)
LINEAR_VARIANTS = {
    "fp16": (18, "FP16 MatMul"),
    "mmi-only": (18, "MatMulInteger int8 x int8 -> int32 alone (input already int8)"),
    "w8a8-token": (18, "onnxqf W8A8 token lowering: Abs ReduceMax Max Div Mul Round Cast -> MatMulInteger -> Cast Mul Mul Cast"),
    "w8a8-ql21": (21, "lean: ReduceMax(Abs) Max Mul -> QuantizeLinear(opset 21, per-row runtime scale, int8) -> MatMulInteger -> rescale"),
    "w8a8-ql19": (19, "lean, opset 19: QuantizeLinear with a ConstantOfShape int8 zero point (tried if ql21 is refused)"),
    "w8a8-ql21-dq": (21, "lean + DequantizeLinear(int32 acc, column scales, axis 1) in place of Cast+Mul"),
    "int4-b32": (18, "MatMulNBits 4-bit, block 32, symmetric"),
    "int4-b128": (18, "MatMulNBits 4-bit, block 128, symmetric"),
    "int8w-b32": (18, "MatMulNBits 8-bit, block 32, symmetric"),
}


def linear_graph(variant: str, K: int, N: int, copies: int, pools: Pools, data: Path | None = None) -> onnx.ModelProto:
    """``copies`` independent linears K -> N reading one input x [M, K] (each with its own activation quantization)."""
    g = G(data)
    opset = LINEAR_VARIANTS[variant][0]
    x = g.input("x", I8 if variant == "mmi-only" else F16, ["M", K])
    for i in range(copies):
        if variant == "fp16":
            y = g.op("MatMul", [x, g.init(pools.take(pools.f16, (K, N)))])
            g.output(y, F16, ["M", N], f"y{i}")
        elif variant == "mmi-only":
            y = g.op("MatMulInteger", [x, g.init(pools.take(pools.i8, (K, N)))])
            g.output(y, TensorProto.INT32, ["M", N], f"y{i}")
        elif variant.startswith("w8a8"):
            wq = g.init(pools.take(pools.i8, (K, N)))
            ws = g.init(np.abs(pools.take(pools.f16, (N,))).astype(np.float32) + 1e-4, "wscale")
            if variant == "w8a8-token":
                xq, row = act_quant_token(g, x)
                y = rescale(g, g.op("MatMulInteger", [xq, wq]), row, ws)
            else:
                xq, row = act_quant_ql(g, x, "ql19" if variant == "w8a8-ql19" else "ql21")
                acc = g.op("MatMulInteger", [xq, wq])
                if variant == "w8a8-ql21-dq":
                    y = g.op("Cast", [g.op("Mul", [g.op("DequantizeLinear", [acc, ws], axis=1), row])], to=F16)
                else:
                    y = rescale(g, acc, row, ws)
            g.output(y, F16, ["M", N], f"y{i}")
        else:
            bits = 8 if variant.startswith("int8w") else 4
            block = int(variant.rsplit("-b", 1)[1])
            B, s = nbits_weights(g, pools, K, N, bits, block)
            g.output(matmul_nbits(g, x, B, s, K, N, bits, block), F16, ["M", N], f"y{i}")
    return g.model(opset)


# -- online rotations as onnxqf emits them ------------------------------------------------------------


def rotation_factor_sizes(n: int) -> tuple[list[int], str]:
    """The Kronecker factor sizes of onnxqf's rotation of size n (onnxqf.maths.hadamard when importable)."""
    try:
        from onnxqf.maths.hadamard import rotation

        r = rotation(n, 0)
        return [int(f.shape[0]) for f in r.factors], r.kind
    except Exception:
        known = {4096: [16, 16, 16], 11008: [344, 16, 2]}
        return known.get(n, [n]), "sizes assumed (onnxqf.maths.hadamard not importable)"


def add_rotation(g: G, x: str, factors: list[np.ndarray | None], sizes: list[int], legacy: bool = False) -> str:
    """x <- x @ kron(F_1, ..., F_r), node for node as onnxqf.graph.edit.rotate_value_online emits it: factors regrouped
    by onnxqf.maths.hadamard.online_groups; per group, Reshape to [-1, g] and MatMul(., G) (one GEMM), then Reshape to
    [-1, n/g, g] and Transpose(0, 2, 1) to cycle the axes; Reshape back. ``legacy``: the emission before
    2026-11-25 (per factor Reshape to [-1, f, after] and MatMul(F^T, .), a 2-D weight on the left)."""
    shape = g.op("Shape", [x])
    y = x
    if legacy:
        for i, (f, size) in enumerate(zip(factors, sizes)):
            if f is None:
                continue
            after = int(np.prod(sizes[i + 1:])) if i + 1 < len(sizes) else 1
            if after == 1:
                y = g.op("Reshape", [y, g.init(np.array([-1, size], np.int64), "shape")])
                y = g.op("MatMul", [y, g.init(np.asarray(f, np.float16), "factor")])
            else:
                y = g.op("Reshape", [y, g.init(np.array([-1, size, after], np.int64), "shape")])
                y = g.op("MatMul", [g.init(np.asarray(f, np.float16).T.copy(), "factorT"), y])
        return g.op("Reshape", [y, shape])
    from onnxqf.maths.hadamard import online_groups

    groups = online_groups(factors, sizes)
    n = int(np.prod([s for s, _ in groups]))

    def matmul(y, size, f):
        y = g.op("Reshape", [y, g.init(np.array([-1, size], np.int64), "shape")])
        return g.op("MatMul", [y, g.init(np.asarray(f, np.float16), "factor")])

    if all(f is None for _, f in groups[:-1]):
        if groups[-1][1] is not None:
            y = matmul(y, *groups[-1])
    else:
        order = list(range(len(groups)))
        for _ in groups:
            size, f = groups[order[-1]]
            if f is not None:
                y = matmul(y, size, f)
            y = g.op("Reshape", [y, g.init(np.array([-1, n // size, size], np.int64), "shape")])
            y = g.op("Transpose", [y], perm=[0, 2, 1])
            order = order[-1:] + order[:-1]
    return g.op("Reshape", [y, shape])


def random_factors(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.linalg.qr(rng.standard_normal((s, s)))[0] for s in sizes]


def rotation_graph(n: int, factors: list, sizes: list[int], copies: int, legacy: bool = False) -> onnx.ModelProto:
    g = G()
    x = g.input("x", F16, ["M", n])
    for i in range(copies):
        g.output(add_rotation(g, x, factors, sizes, legacy), F16, ["M", n], f"y{i}")
    return g.model(18)


def attention_graph(heads: int, head_dim: int, copies: int) -> onnx.ModelProto:
    """softmax(q k^T / sqrt(d)) v, naive (MatMul, Mul, Softmax, MatMul), no mask; q [1,h,M,d], k/v [1,h,T,d]."""
    g = G()
    q = g.input("q", F16, [1, heads, "M", head_dim])
    k = g.input("k", F16, [1, heads, "T", head_dim])
    v = g.input("v", F16, [1, heads, "T", head_dim])
    for i in range(copies):
        s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        s = g.op("Mul", [s, g.init(np.array(1 / math.sqrt(head_dim), np.float16), "scale")])
        g.output(g.op("MatMul", [g.op("Softmax", [s], axis=-1), v]), F16, [1, heads, "M", head_dim], f"y{i}")
    return g.model(18)


# -- timing -------------------------------------------------------------------------------------------


class Background:
    """The background c1 job; timed loops pause it (SIGSTOP to its process group) so it does not compete."""

    proc: subprocess.Popen | None = None

    @classmethod
    @contextlib.contextmanager
    def paused(cls):
        p = cls.proc
        stopped = False
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGSTOP)
                stopped = True
            except Exception:
                pass
        try:
            yield
        finally:
            if stopped:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                except Exception:
                    pass


class Runner:
    def __init__(self, ep: str, repeats: int, warmup: int):
        import onnxruntime as ort

        self.ort, self.ep = ort, ep
        self.device = "cuda" if ep == "cuda" else "cpu"
        self.providers = ["CUDAExecutionProvider"] if ep == "cuda" else ["CPUExecutionProvider"]
        self.repeats, self.warmup = repeats, warmup

    def session_options(self, strict: bool):
        so = self.ort.SessionOptions()
        so.log_severity_level = 3
        if strict and self.ep == "cuda":
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def session(self, model, strict: bool):
        so = self.session_options(strict)
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return self.ort.InferenceSession(src, so, providers=self.providers)

    def load(self, model) -> tuple[object, dict]:
        """A session with every node on the provider if possible; else one with CPU fallback, and why."""
        try:
            return self.session(model, strict=True), {"on_provider": True}
        except Exception as exc:
            msg = _short(exc)
        try:
            return self.session(model, strict=False), {"on_provider": False, "strict_error": msg}
        except Exception as exc:
            return None, {"on_provider": False, "strict_error": msg, "error": _short(exc)}

    def value(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        try:
            return self.ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
        except Exception:
            if array.size == 0:  # an empty past stays on the host: nothing to copy
                return self.ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0)
            raise

    def time(self, sess, feeds: dict[str, np.ndarray], scale: float = 1.0) -> dict:
        """ms per run / scale: median, min, max, q1, q3 of self.repeats runs after self.warmup."""
        values = {k: self.value(v) for k, v in feeds.items()}
        io = sess.io_binding()
        for k, v in values.items():
            io.bind_ortvalue_input(k, v)
        for o in sess.get_outputs():
            io.bind_output(o.name, self.device, 0)
        times = []
        with Background.paused():
            for i in range(self.warmup + self.repeats):
                t = time.perf_counter()
                sess.run_with_iobinding(io)
                io.synchronize_outputs()
                if i >= self.warmup:
                    times.append((time.perf_counter() - t) * 1e3 / scale)
        return stats(times)


def stats(values) -> dict:
    a = np.asarray(values, np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "min": float(a.min()), "max": float(a.max()), "q1": float(q1), "q3": float(q3), "n": int(a.size)}


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:400]


# -- section a: per-linear kernels --------------------------------------------------------------------


def section_a(cfg: Config, run: Runner, res: Results, budget: Budget, pools: Pools, work: Path) -> None:
    rng = np.random.default_rng(1)
    ql21_ok = None
    for K, N in cfg.linears:
        for variant in LINEAR_VARIANTS:
            if variant == "w8a8-ql19" and ql21_ok is not False:
                continue  # only needed when opset-21 QuantizeLinear is refused
            if not budget.ok(30):
                res.add("skipped", f"a {variant} {K}->{N}: out of time")
                continue
            t = time.perf_counter()
            path = work / "linear.onnx"
            try:
                build(path, linear_graph, variant, K, N, cfg.copies, pools)
                sess, placement = run.load(path)
            except Exception as exc:
                sess, placement = None, {"error": _short(exc)}
            if variant == "w8a8-ql21":
                ql21_ok = bool(placement.get("on_provider"))
            row = {"variant": variant, "K": K, "N": N, "copies": cfg.copies, "what": LINEAR_VARIANTS[variant][1], **placement,
                   "ms_per_linear": {}}
            if sess is not None and not placement.get("on_provider"):
                row["note"] = "not timed: some node is not on the provider (see strict_error)"
            elif sess is not None:
                for M in cfg.ms:
                    if variant == "mmi-only":
                        x = rng.integers(-127, 128, (M, K), dtype=np.int8)
                    else:
                        x = (rng.standard_normal((M, K), dtype=np.float32)).astype(np.float16)
                    try:
                        row["ms_per_linear"][str(M)] = run.time(sess, {"x": x}, scale=cfg.copies)
                    except Exception as exc:
                        row["ms_per_linear"][str(M)] = {"error": _short(exc)}
            sess = None  # frees the session (and its device memory) before the next one
            for f in (path, path.with_name(path.name + ".data")):
                f.unlink(missing_ok=True)
            res.add("a_linears", row)
            cells = " ".join(f"M={m}:{_fmt(row['ms_per_linear'].get(str(m)))}" for m in cfg.ms)
            log(f"a {K}->{N} {variant:13s} {'on provider' if placement.get('on_provider') else 'FALLBACK/ERR'} {cells} "
                f"({time.perf_counter() - t:.1f}s)")


def _fmt(s) -> str:
    if not isinstance(s, dict):
        return "-"
    return f"{s['median']:.4f}" if "median" in s else "err"


# -- section b: online rotations ------------------------------------------------------------------------


def section_b(cfg: Config, run: Runner, res: Results, budget: Budget) -> None:
    rng = np.random.default_rng(2)
    items = []
    for n in (cfg.hidden, cfg.d_ff):
        sizes, kind = rotation_factor_sizes(n)
        items.append((f"hadamard {n}", n, random_factors(sizes), sizes, kind))
    items.append((f"head mix {cfg.heads}x{cfg.head_dim}", cfg.hidden, [random_factors([cfg.heads])[0], None],
                  [cfg.heads, cfg.head_dim], "dense num_heads mixing (rotate_vo)"))
    # the emission before 2026-11-25 (2-D factor on the left of a 3-D MatMul), for comparison
    items += [(f"legacy {name}", n, factors, sizes, kind) for name, n, factors, sizes, kind in list(items)]
    for name, n, factors, sizes, kind in items:
        if not budget.ok(20):
            res.add("skipped", f"b {name}: out of time")
            continue
        sess, placement = run.load(rotation_graph(n, factors, sizes, cfg.copies, legacy=name.startswith("legacy")))
        row = {"rotation": name, "n": n, "factor_sizes": sizes, "kind": kind, "copies": cfg.copies, **placement, "ms": {},
               "multiply_adds_per_row": n * sum(s for s, f in zip(sizes, factors) if f is not None)}
        if sess is not None:
            for M in cfg.rot_ms:
                x = rng.standard_normal((M, n), dtype=np.float32).astype(np.float16)
                row["ms"][str(M)] = run.time(sess, {"x": x}, scale=cfg.copies)
        sess = None  # frees the session (and its device memory) before the next one
        res.add("b_rotations", row)
        log(f"b {name:22s} factors {sizes} " + " ".join(f"M={m}:{_fmt(row['ms'].get(str(m)))}" for m in cfg.rot_ms))
    if budget.ok(20):
        sess, placement = run.load(attention_graph(cfg.heads, cfg.head_dim, max(1, cfg.copies // 2)))
        row = {"rotation": "attention (naive, reference)", "n": cfg.hidden, **placement, "ms": {},
               "note": f"M=1: over {cfg.attn_past}+1 cached tokens; M={cfg.rot_ms[-1]}: full {cfg.rot_ms[-1]}x{cfg.rot_ms[-1]} "
                       "scores, no mask"}
        if sess is not None:
            for M in cfg.rot_ms:
                T = cfg.attn_past + 1 if M == 1 else M
                q = rng.standard_normal((1, cfg.heads, M, cfg.head_dim), dtype=np.float32).astype(np.float16)
                kv = rng.standard_normal((1, cfg.heads, T, cfg.head_dim), dtype=np.float32).astype(np.float16)
                row["ms"][str(M)] = run.time(sess, {"q": q, "k": kv, "v": kv}, scale=max(1, cfg.copies // 2))
        sess = None  # frees the session (and its device memory) before the next one
        res.add("b_rotations", row)
        log(f"b attention " + " ".join(f"M={m}:{_fmt(row['ms'].get(str(m)))}" for m in cfg.rot_ms))


def rotation_shares(cfg: Config, data: dict) -> list[dict]:
    """Online-rotation time as a share of one decoder layer's time (from sections a and b)."""
    def lin(variant, K, N, M):
        for r in data["a_linears"]:
            if r["variant"] == variant and (r["K"], r["N"]) == (K, N):
                return r["ms_per_linear"].get(str(M), {}).get("median")
        return None

    def rot(prefix, M):
        for r in data["b_rotations"]:
            if r["rotation"].startswith(prefix):
                return r["ms"].get(str(M), {}).get("median")
        return None

    H, F = cfg.hidden, cfg.d_ff
    out = []
    for M in cfg.rot_ms:
        row = {"M": M}
        for variant in ("fp16", "w8a8-token", "int4-b32"):
            parts = [lin(variant, H, H, M), lin(variant, H, F, M), lin(variant, F, H, M)]
            row[f"layer_{variant}_ms"] = None if None in parts else 4 * parts[0] + 2 * parts[1] + parts[2]
        row["attention_ms"] = rot("attention", M)
        r_h, r_f, r_mix = rot(f"hadamard {H}", M), rot(f"hadamard {F}", M), rot("head mix", M)
        row["rot_full_hybrid_ms"] = None if None in (r_h, r_f, r_mix) else 2 * r_h + r_f + r_mix
        row["rot_rotate_ms"] = None if None in (r_f, r_mix) else r_f + r_mix  # --rotate / two-site hybrid: down_proj + head mix
        for key in ("rot_full_hybrid_ms", "rot_rotate_ms"):
            for variant in ("fp16", "w8a8-token", "int4-b32"):
                layer = row[f"layer_{variant}_ms"]
                if row[key] is not None and layer:
                    row[f"{key[:-3]}_share_of_{variant}_linears"] = row[key] / (layer + row[key])
                    if row["attention_ms"]:
                        row[f"{key[:-3]}_share_of_{variant}_linears+attn"] = row[key] / (layer + row["attention_ms"] + row[key])
        out.append(row)
    return out


# -- section c2: a hand-built KV-cache decoder of Llama-2-7B layer shapes --------------------------------


@dataclass
class Decoder:
    name: str
    linear: str = "fp16"  # fp16 | w8a8-token | w8a8-lean | int4-b32 | int4-b128 | int8w-b32
    rot_norms: bool = False  # online Hadamard after each norm (full hybrid)
    rot_down: bool = False  # online Hadamard before down_proj
    head_mix: bool = False  # num_heads mixing before o_proj
    layers: int | None = None  # None: cfg.c2_layers


C2_VARIANTS = [
    Decoder("fp16"),
    Decoder("int4-b32", "int4-b32"),
    Decoder("w8a8-token", "w8a8-token"),
    Decoder("embed+lm_head only", layers=0),
    Decoder("int8w-b32", "int8w-b32"),
    Decoder("w8a8-lean", "w8a8-lean"),
    Decoder("fp16 + full-hybrid rotations", rot_norms=True, rot_down=True, head_mix=True),
    Decoder("int4-b32 + rotate (down_proj, head mix)", "int4-b32", rot_down=True, head_mix=True),
    Decoder("w8a8-token + full-hybrid rotations", "w8a8-token", rot_norms=True, rot_down=True, head_mix=True),
    Decoder("int4-b128", "int4-b128"),
]


def decoder_graph(cfg: Config, d: Decoder, pools: Pools, ql_mode: str, data: Path | None = None) -> tuple[onnx.ModelProto, int]:
    """Batch 1, float16. Per layer: RMSNorm, q/k/v, past/present Concat, naive attention with the mask as a bias
    (no rotary, no causal mask at prefill), o_proj, residual, RMSNorm, SiLU-gated MLP, residual; then norm and an
    FP16 lm_head. Inputs/outputs in the onnxruntime-genai layout."""
    H, F, nh, hd = cfg.hidden, cfg.d_ff, cfg.heads, cfg.head_dim
    layers = cfg.c2_layers if d.layers is None else d.layers
    g = G(data)
    ids = g.input("input_ids", I64, [1, "seq"])
    mask = g.input("attention_mask", I64, [1, "total"])
    x = g.op("Gather", [g.init(pools.take(pools.f16, (cfg.vocab, H)), "embed"), ids])
    bias = g.op("Mul", [g.op("Sub", [g.init(np.array(1.0, np.float16), "one"), g.op("Cast", [mask], to=F16)]),
                        g.init(np.array(-1e4, np.float16), "neg")])
    bias = g.op("Unsqueeze", [bias, g.init(np.array([1, 2], np.int64), "axes")])
    eps = g.init(np.array(1e-5, np.float16), "eps")
    axes_last = g.init(np.array([-1], np.int64), "axes")
    sizes_h, _ = rotation_factor_sizes(H)
    sizes_f, _ = rotation_factor_sizes(F)
    fac_h, fac_f, fac_mix = random_factors(sizes_h, 1), random_factors(sizes_f, 2), random_factors([nh], 3)

    def rmsnorm(v):
        ms = g.op("ReduceMean", [g.op("Mul", [v, v]), axes_last], keepdims=1)
        y = g.op("Div", [v, g.op("Sqrt", [g.op("Add", [ms, eps])])])
        return g.op("Mul", [y, g.init(np.ones(H, np.float16), "gamma")])

    def linears(v, K, Ns):
        """The linears reading v (one activation quantization shared, as onnxqf does)."""
        kind = d.linear
        if kind == "fp16":
            return [g.op("MatMul", [v, g.init(pools.take(pools.f16, (K, N)))]) for N in Ns]
        if kind.startswith(("int4", "int8w")):
            bits, block = (8 if kind.startswith("int8w") else 4), int(kind.rsplit("-b", 1)[1])
            outs = []
            for N in Ns:
                B, s = nbits_weights(g, pools, K, N, bits, block)
                outs.append(matmul_nbits(g, v, B, s, K, N, bits, block))
            return outs
        if kind == "w8a8-token":
            xq, row = act_quant_token(g, v)
            return [rescale(g, g.op("MatMulInteger", [xq, g.init(pools.take(pools.i8, (K, N)))]), row,
                            g.init(np.full(N, 1e-4, np.float32), "wscale")) for N in Ns]
        # w8a8-lean: per-row QuantizeLinear once, one MatMulInteger over the concatenated weights, Split
        v2 = g.op("Reshape", [v, g.init(np.array([-1, K], np.int64), "shape")])
        xq, row = act_quant_ql(g, v2, ql_mode)
        total = sum(Ns)
        y = rescale(g, g.op("MatMulInteger", [xq, g.init(pools.take(pools.i8, (K, total)))]), row,
                    g.init(np.full(total, 1e-4, np.float32), "wscale"))
        y = g.op("Reshape", [y, g.init(np.array([1, -1, total], np.int64), "shape")])
        if len(Ns) == 1:
            return [y]
        return list(g.op("Split", [y, g.init(np.array(Ns, np.int64), "split")], n_out=len(Ns), axis=-1))

    def heads_view(v):
        return g.op("Transpose", [g.op("Reshape", [v, g.init(np.array([1, -1, nh, hd], np.int64), "shape")])], perm=[0, 2, 1, 3])

    for i in range(layers):
        n1 = rmsnorm(x)
        if d.rot_norms:
            n1 = add_rotation(g, n1, fac_h, sizes_h)
        q, k, v = linears(n1, H, [H, H, H])
        q, k, v = heads_view(q), heads_view(k), heads_view(v)
        presents = []
        for kind, new in (("key", k), ("value", v)):
            past = g.input(f"past_key_values.{i}.{kind}", F16, [1, nh, "past", hd])
            cat = g.op("Concat", [past, new], axis=2)
            presents.append(g.output(cat, F16, [1, nh, "total", hd], f"present.{i}.{kind}"))
        s = g.op("MatMul", [q, g.op("Transpose", [presents[0]], perm=[0, 1, 3, 2])])
        s = g.op("Add", [g.op("Mul", [s, g.init(np.array(1 / math.sqrt(hd), np.float16), "scale")]), bias])
        a = g.op("MatMul", [g.op("Softmax", [s], axis=-1), presents[1]])
        a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.init(np.array([1, -1, H], np.int64), "shape")])
        if d.head_mix:
            a = add_rotation(g, a, [fac_mix[0], None], [nh, hd])
        x = g.op("Add", [x, linears(a, H, [H])[0]])
        n2 = rmsnorm(x)
        if d.rot_norms:
            n2 = add_rotation(g, n2, fac_h, sizes_h)
        gate, up = linears(n2, H, [F, F])
        h = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        if d.rot_down:
            h = add_rotation(g, h, fac_f, sizes_f)
        x = g.op("Add", [x, linears(h, F, [H])[0]])
    logits = g.op("MatMul", [rmsnorm(x), g.init(pools.take(pools.f16, (H, cfg.vocab)), "lm_head")])
    g.output(logits, F16, [1, "seq", cfg.vocab], "logits")
    return g.model(21 if ql_mode == "ql21" and d.linear == "w8a8-lean" else (19 if d.linear == "w8a8-lean" else 18)), layers


def build(path: Path, fn, *args, **kwargs):
    """Build a graph with its weights written to ``path``.data and save it as ``path``; returns fn's result."""
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    out = fn(*args, data=path.with_name(path.name + ".data"), **kwargs)
    model = out[0] if isinstance(out, tuple) else out
    onnx.save_model(model, str(path))
    return out


def section_c2(cfg: Config, run: Runner, res: Results, budget: Budget, pools: Pools, work: Path) -> None:
    try:
        from onnxqf.runtime import bench as obench  # the decode loop of `onnxqf bench`
        from onnxqf.runtime import session as runtime  # noqa: F401  (what onnxqf.runtime.bench imports when it runs: needs onnx_ir)

        method = "onnxqf.runtime.bench KV-cache loop (present fed back as past)"
    except Exception as exc:
        obench = None
        method = f"one decode step at a fixed past (onnxqf.runtime.bench not importable: {_short(exc)})"
    a_rows = res.data["a_linears"]
    ql21_ok = any(r["variant"] == "w8a8-ql21" and r.get("on_provider") for r in a_rows) or not a_rows
    ql_mode = "ql21" if ql21_ok else "ql19"
    res.data["c2_meta"] = {"method": method, "layers": cfg.c2_layers, "lean_quantize_linear": ql_mode,
                           "decode_tokens": cfg.decode_tokens, "pasts": list(cfg.pasts), "prefill": f"1x{cfg.prefill_seq}"}
    log(f"c2 decode method: {method}")
    rng = np.random.default_rng(3)
    for d in C2_VARIANTS:
        if not budget.ok(45):
            res.add("skipped", f"c2 {d.name}: out of time")
            continue
        t = time.perf_counter()
        row = {"variant": d.name, **asdict(d)}
        path = work / "c2.onnx"
        try:
            for mode in ([ql_mode, "ql19" if ql_mode == "ql21" else "ql21"] if d.linear == "w8a8-lean" else [ql_mode]):
                sess = None
                _, layers = build(path, decoder_graph, cfg, d, pools, mode)
                row["layers"] = layers
                sess, placement = run.load(path)
                row.update(placement)
                if d.linear == "w8a8-lean":
                    row["quantize_linear"] = mode
                if placement.get("on_provider"):
                    break
                if d.linear == "w8a8-lean":
                    row.setdefault("tried", []).append({"mode": mode, **placement})
            if sess is not None:
                if obench is not None:
                    io = obench.describe(path)
                    with Background.paused():
                        pf = obench.measure_prefill(sess, io, device=run.device, batch=1, seq=cfg.prefill_seq,
                                                    warmup=cfg.e2e_warmup, repeats=cfg.e2e_repeats)
                    row["prefill_ms"] = stats([x * 1e3 for x in pf])
                else:
                    feeds = {"input_ids": rng.integers(0, cfg.vocab, (1, cfg.prefill_seq)),
                             "attention_mask": np.ones((1, cfg.prefill_seq), np.int64)}
                    feeds.update({f"past_key_values.{i}.{k}": np.zeros((1, cfg.heads, 0, cfg.head_dim), np.float16)
                                  for i in range(layers) for k in ("key", "value")})
                    row["prefill_ms"] = run.time(sess, feeds)
                row["decode"] = {}
                if layers == 0:  # no cache: a one-token forward stands for its share of a decode step
                    row["one_token_ms"] = run.time(sess, {"input_ids": np.zeros((1, 1), np.int64),
                                                          "attention_mask": np.ones((1, 1), np.int64)})
                for past in cfg.pasts if layers else ():
                    if obench is not None:
                        with Background.paused():
                            sp = obench.measure_decode(sess, io, device=run.device, batch=1, past=past,
                                                       tokens=cfg.decode_tokens, warmup=cfg.decode_warmup,
                                                       repeats=cfg.decode_repeats)
                        row["decode"][str(past)] = {"tokens_per_s": stats(sp)}
                    else:
                        kv = rng.standard_normal((1, cfg.heads, past, cfg.head_dim), dtype=np.float32).astype(np.float16)
                        feeds = {"input_ids": np.zeros((1, 1), np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
                        feeds.update({f"past_key_values.{i}.{k}": kv for i in range(layers) for k in ("key", "value")})
                        st = run.time(sess, feeds)
                        row["decode"][str(past)] = {"tokens_per_s": {"median": 1e3 / st["median"], "min": 1e3 / st["max"],
                                                                     "max": 1e3 / st["min"], "q1": 1e3 / st["q3"],
                                                                     "q3": 1e3 / st["q1"], "n": st["n"]}}
                if layers and obench is not None and run.ep == "cuda" and cfg.graph_pasts:
                    sess = None
                    row["decode_graph"] = {}
                    for past in cfg.graph_pasts:  # a captured graph has fixed shapes: one session per past
                        try:
                            gs = run.ort.InferenceSession(str(path), run.session_options(strict=True), providers=[
                                ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
                            with Background.paused():
                                sp = obench.measure_decode_step_graph(gs, io, batch=1, past=past, warmup=cfg.decode_warmup,
                                                                      repeats=cfg.decode_repeats, steps=cfg.decode_tokens)
                            row["decode_graph"][str(past)] = {"tokens_per_s": stats(sp)}
                        except Exception as exc:
                            row["decode_graph"][str(past)] = {"error": _short(exc)}
                        finally:
                            gs = None
        except Exception as exc:
            row["error"] = _short(exc)
            log(traceback.format_exc(limit=3))
        finally:
            sess = None  # frees the session (and its device memory) before the next one
            for p in (path, path.with_name(path.name + ".data")):
                p.unlink(missing_ok=True)
        res.add("c2_decoder", row)
        dec = " ".join(f"past{p}:{row.get('decode', {}).get(str(p), {}).get('tokens_per_s', {}).get('median', float('nan')):.0f}tok/s"
                       for p in cfg.pasts)
        dec += "".join(f" graph{p}:{v['tokens_per_s']['median']:.0f}tok/s" if "tokens_per_s" in v else f" graph{p}:{v['error'][:80]}"
                       for p, v in row.get("decode_graph", {}).items())
        log(f"c2 {d.name:42s} prefill {row.get('prefill_ms', {}).get('median', float('nan')):.2f} ms {dec} "
            f"{'' if row.get('on_provider') else 'NOT ALL ON PROVIDER '}{row.get('error', '')} ({time.perf_counter() - t:.1f}s)")


# -- section c1: onnxqf's own graphs end to end -----------------------------------------------------------


def export_c1(path: Path, cfg: Config, layers: int) -> None:
    """A random-weight Llama of cfg's shapes, exported float16 with onnxqf's plain exporter."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnxqf.models.export import export_model

    hf = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.d_ff, num_hidden_layers=layers,
                     num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, head_dim=cfg.head_dim,
                     vocab_size=cfg.vocab, tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).eval()
    export_model(model, path, dtype="float16")


def sh(args: list, timeout: float | None = None, env: dict | None = None) -> dict:
    log("$ " + " ".join(str(a) for a in args) + (f"   (timeout {timeout:.0f}s)" if timeout else ""))
    t = time.perf_counter()
    try:
        p = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                           timeout=None if timeout is None else max(5.0, timeout), env=env)
        r = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    except subprocess.TimeoutExpired as exc:
        r = {"rc": "timeout", "stdout": exc.stdout or "", "stderr": exc.stderr or ""}
        r = {k: (v.decode(errors="replace") if isinstance(v, bytes) else v) for k, v in r.items()}
    r["seconds"] = round(time.perf_counter() - t, 1)
    tail = (r["stderr"] or "").strip().splitlines()[-3:]
    log(f"  -> rc {r['rc']} in {r['seconds']}s " + (" | ".join(tail)[-400:] if r["rc"] != 0 else ""))
    return r


def c1_env() -> dict:
    env = dict(os.environ)
    if not ONNXQF_INSTALLED:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (env.get("PYTHONPATH", ""), str(ROOT)) if x)
    return env


C1_MODULES = ("torch", "transformers", "onnx_ir", "onnxscript")


def c1_prepare(work: Path, cfg: Config) -> None:
    """(background subprocess, CPU only) export, then every rewrite, one after another; status in work/prepare.json.

    Runs while sections a, b and c2 use the GPU, pinned to the CPU cores the timing process does not use.
    """
    status: dict = {"steps": {}, "models": {}, "done": False}
    path = work / "prepare.json"
    if os.environ.get("ONNXQF_BENCH_CORES"):
        try:  # leave the timing process its cores (children inherit this)
            os.sched_setaffinity(0, {int(c) for c in os.environ["ONNXQF_BENCH_CORES"].split(",")})
            status["cores"] = os.environ["ONNXQF_BENCH_CORES"]
        except Exception as exc:
            status["cores"] = f"not pinned: {_short(exc)}"

    def save():
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, path)

    missing = [m for m in C1_MODULES if importlib.util.find_spec(m) is None]
    try:
        importlib.import_module("onnxqf.models.export")
        importlib.import_module("onnxqf.passes")
    except Exception as exc:
        missing.append(f"onnxqf.models/onnxqf.passes ({_short(exc)}; install the project: "
                       "pip install --no-deps --no-build-isolation -e .)")
    if missing:
        status.update(done=True, skipped=f"needs {', '.join(missing)} (not importable here)")
        save()
        return
    f16 = work / "llama7b-shape.fp16.onnx"
    t = time.perf_counter()
    try:
        export_c1(f16, cfg, cfg.c1_layers)
        status["steps"]["export"] = {"rc": 0, "seconds": round(time.perf_counter() - t, 1)}
        status["models"]["fp16"] = str(f16)
    except Exception as exc:
        status["steps"]["export"] = {"rc": 1, "seconds": round(time.perf_counter() - t, 1), "error": _short(exc),
                                     "traceback": traceback.format_exc(limit=8)}
        status["done"] = True
        save()
        return
    save()
    env = c1_env()
    py = sys.executable
    ids = work / "calib_ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, cfg.vocab, 4096))
    help_text = sh([py, "-m", "onnxqf.cli", "rewrite", "--help"], env=env)["stdout"]
    variants = [("w8a8-token", [])]
    if "int4" in help_text:
        variants += [("int4-b32", ["--quant", "int4"]), ("rotate-int4-b32", ["--rotate", "--quant", "int4"])]
    variants.append(("hybrid", ["--hybrid"]))
    if "int8w" in help_text:
        variants.append(("int8w-b32", ["--quant", "int8w"]))
    status["variants"] = {name: flags for name, flags in variants}
    common = ["--weight-rounding", "rtn", "--calib", ids, "--calib-windows", "1", "--calib-seq", "64", "-q"]
    for name, flags in variants:
        dst = work / f"llama7b-shape.{name}.onnx"
        r = sh([py, "-m", "onnxqf.cli", "rewrite", f16, *flags, *common, "-o", dst], env=env)
        status["steps"][f"rewrite {name}"] = {"flags": flags, "rc": r["rc"], "seconds": r["seconds"],
                                              "stderr_tail": r["stderr"][-1500:]}
        if r["rc"] == 0 and dst.exists():
            status["models"][name] = str(dst)
        save()
    status["done"] = True
    save()


def c1_start(cfg: Config, work: Path, args) -> subprocess.Popen:
    """Start c1_prepare in the background, on all but two CPU cores (those stay free for the timing process);
    it sees no GPU (CUDA_VISIBLE_DEVICES empty): export and rewrite run on the CPU."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except Exception:
        cores = []
    env = c1_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    if len(cores) >= 4:
        n = str(len(cores) - 2)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, ONNXQF_BENCH_CORES=",".join(map(str, cores[2:])))
    cmd = [sys.executable, __file__, "--c1-prepare", str(work), "--c1-layers", str(cfg.c1_layers)] + (["--tiny"] if args.tiny else [])
    log("c1: export and rewrites start in the background: " + " ".join(cmd))
    logf = open(work / "prepare.log", "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc


def c1_stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the background job's own process group (start_new_session)
        except Exception:
            proc.kill()
        proc.wait()


def section_c1(cfg: Config, run: Runner, res: Results, budget: Budget, work: Path, proc: subprocess.Popen | None) -> None:
    """Wait for the background export/rewrites (keeping ``tail`` seconds), then check and bench on the GPU."""
    env, py = c1_env(), sys.executable
    c1: dict = {"layers": cfg.c1_layers}
    res.add("c1_onnxqf", {"c1": c1})
    if importlib.util.find_spec("onnxruntime_genai") is None:
        c1["kv_cache_note"] = "onnxruntime_genai is not installed here: no `onnxqf export --kv-cache` graph; decode is in c2"
    tail = 120
    last = None
    while proc is not None and proc.poll() is None and budget.left() > tail:
        time.sleep(2)
        state = _read_json(work / "prepare.json")
        steps = list((state or {}).get("steps", {}))
        if steps != last:
            log(f"c1 background: done {steps}")
            last = steps
    if proc is not None and proc.poll() is None:
        c1_stop(proc)
        c1["stopped"] = "the background export/rewrites were stopped to keep time for check and bench"
        res.add("skipped", "c1 rewrites still running: stopped")
    prep = _read_json(work / "prepare.json") or {}
    c1["prepare"] = {k: v for k, v in prep.items() if k != "models"}
    log_text = (work / "prepare.log").read_text()[-3000:] if (work / "prepare.log").exists() else ""
    c1["prepare_log_tail"] = log_text
    models = {name: Path(p) for name, p in prep.get("models", {}).items() if Path(p).exists()}
    c1["models"] = list(models)
    res.save()
    if prep.get("skipped"):
        c1["skipped"] = prep["skipped"]
        log(f"c1 skipped: {prep['skipped']}")
        return
    if "fp16" not in models:
        log("c1: no exported model (see c1.prepare in the JSON)\n" + log_text[-1500:])
        return
    c1["check"], c1["bench"] = {}, {}

    def bench(label: str, seq: int) -> None:
        if not budget.ok(25):
            res.add("skipped", f"c1 bench {label}: out of time")
            return
        r = sh([py, "-m", "onnxqf.cli", "bench", *models.values(), "--ep", run.ep, "--seq", seq, "--decode-tokens", "0",
                "--repeats", cfg.e2e_repeats, "--warmup", cfg.e2e_warmup, "--json", "-q"], timeout=budget.left() - 10, env=env)
        try:
            c1["bench"][label] = json.loads(r["stdout"].strip().splitlines()[-1])
        except Exception:
            c1["bench"][label] = {"rc": r["rc"], "stderr_tail": r["stderr"][-800:]}
        res.save()

    bench(f"prefill 1x{cfg.prefill_seq}", cfg.prefill_seq)
    for name, path in models.items():
        if not budget.ok(40):
            res.add("skipped", f"c1 check {name}: out of time")
            continue
        r = sh([py, "-m", "onnxqf.cli", "check", path, "--ep", run.ep, "--json"], timeout=min(120, budget.left() - 35), env=env)
        try:
            c1["check"][name] = {"rc": r["rc"], **json.loads(r["stdout"].strip().splitlines()[-1])}
        except Exception:
            c1["check"][name] = {"rc": r["rc"], "stderr_tail": r["stderr"][-500:]}
        res.save()
    bench("forward 1x1", 1)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


# -- summary ----------------------------------------------------------------------------------------------


def summary(cfg: Config, data: dict) -> str:
    L = []
    ref = {}
    for r in data["a_linears"]:
        if r["variant"] == "fp16":
            ref[(r["K"], r["N"])] = r["ms_per_linear"]
    if data["a_linears"]:
        L.append(f"## a. One linear, ms (median of {cfg.repeats}, per copy of {cfg.copies}; x = time / FP16 time)\n")
    head = "| K->N | variant | all on provider | " + " | ".join(f"M={m}" for m in cfg.ms) + " |"
    L += [head, "|" + "---|" * (3 + len(cfg.ms))] if data["a_linears"] else []
    for r in data["a_linears"]:
        cells = []
        for m in cfg.ms:
            s = r["ms_per_linear"].get(str(m), {})
            base = ref.get((r["K"], r["N"]), {}).get(str(m), {}).get("median")
            if "median" in s:
                cells.append(f"{s['median']:.4f}" + (f" ({s['median'] / base:.2f}x)" if base and r["variant"] != "fp16" else ""))
            else:
                cells.append("-")
        on = "yes" if r.get("on_provider") else ("**no**: " + (r.get("strict_error") or r.get("error") or "")[:80])
        L.append(f"| {r['K']}->{r['N']} | {r['variant']} | {on} | " + " | ".join(cells) + " |")
    if not data["b_rotations"]:
        return _summary_c(cfg, data, L)
    L.append("\n## b. Online rotations, ms per application (median)\n")
    L += ["| rotation | factors | " + " | ".join(f"M={m}" for m in cfg.rot_ms) + " |", "|" + "---|" * (2 + len(cfg.rot_ms))]
    for r in data["b_rotations"]:
        L.append(f"| {r['rotation']} | {r.get('factor_sizes', '')} | " +
                 " | ".join(_fmt(r["ms"].get(str(m))) for m in cfg.rot_ms) + " |")
    shares = rotation_shares(cfg, data)
    data["b_shares"] = shares
    L.append("\n### Share of one layer's time (rotations / (layer + rotations))\n")
    L += ["| M | FP16 linears ms | attention ms | full hybrid rot ms | share of FP16 linears | of FP16 linears+attn | "
          "of W8A8 linears | --rotate rot ms | share of int4 linears |", "|" + "---|" * 9]
    for s in shares:
        g = lambda k, f="{:.4f}": (f.format(s[k]) if s.get(k) is not None else "-")  # noqa: E731
        L.append(f"| {s['M']} | {g('layer_fp16_ms')} | {g('attention_ms')} | {g('rot_full_hybrid_ms')} | "
                 f"{g('rot_full_hybrid_share_of_fp16_linears', '{:.1%}')} | {g('rot_full_hybrid_share_of_fp16_linears+attn', '{:.1%}')} | "
                 f"{g('rot_full_hybrid_share_of_w8a8-token_linears', '{:.1%}')} | {g('rot_rotate_ms')} | "
                 f"{g('rot_rotate_share_of_int4-b32_linears', '{:.1%}')} |")
    return _summary_c(cfg, data, L)


def _summary_c(cfg: Config, data: dict, L: list[str]) -> str:
    rows = data["c2_decoder"]
    if rows:
        meta = data.get("c2_meta", {})
        L.append(f"\n## c2. Hand-built decoder, {cfg.c2_layers} layers of Llama-2-7B shape + FP16 lm_head, batch 1 "
                 f"({meta.get('method', '')})\n")
        base = next((r for r in rows if r["variant"] == "fp16"), None)
        L0 = next((r for r in rows if r.get("layers") == 0), None)
        head = "| variant | prefill 1x%d ms | x | " % cfg.prefill_seq + " | ".join(f"decode past {p} tok/s | x" for p in cfg.pasts)
        head += f" | ms/layer/token past {cfg.pasts[len(cfg.pasts) // 2]} |"
        gp = [str(p) for p in cfg.graph_pasts] if any(r.get("decode_graph") for r in rows) else []
        head += "".join(f" CUDA-graph step past {p} tok/s | x |" for p in gp)
        L += [head, "|" + "---|" * (3 + 2 * len(cfg.pasts) + 1 + 2 * len(gp))]
        mid = str(cfg.pasts[len(cfg.pasts) // 2])
        for r in rows:
            pf = r.get("prefill_ms", {}).get("median")
            bpf = base.get("prefill_ms", {}).get("median") if base else None
            cells = [r["variant"] + ("" if r.get("on_provider", True) else " (CPU fallback!)"),
                     f"{pf:.2f}" if pf else r.get("error", "-")[:60], f"{bpf / pf:.2f}" if pf and bpf else "-"]
            for p in cfg.pasts:
                t = r.get("decode", {}).get(str(p), {}).get("tokens_per_s", {}).get("median")
                bt = base.get("decode", {}).get(str(p), {}).get("tokens_per_s", {}).get("median") if base else None
                cells += [f"{t:.0f}" if t else "-", f"{t / bt:.2f}" if t and bt else "-"]
            t = r.get("decode", {}).get(mid, {}).get("tokens_per_s", {}).get("median")
            l0 = (L0 or {}).get("one_token_ms", {}).get("median")
            cells.append(f"{(1e3 / t - l0) / r['layers']:.3f}" if t and l0 is not None and r.get("layers") else "-")
            for p in gp:
                t = r.get("decode_graph", {}).get(p, {}).get("tokens_per_s", {}).get("median")
                bt = (base or {}).get("decode_graph", {}).get(p, {}).get("tokens_per_s", {}).get("median")
                cells += [f"{t:.0f}" if t else r.get("decode_graph", {}).get(p, {}).get("error", "-")[:60],
                          f"{t / bt:.2f}" if t and bt else "-"]
            L.append("| " + " | ".join(cells) + " |")
    c1 = data.get("c1_onnxqf", {}).get("c1")
    if c1:
        L.append(f"\n## c1. onnxqf export + rewrite, {cfg.c1_layers} layers of Llama-2-7B shape, float16\n")
        if c1.get("skipped"):
            L.append(f"skipped: {c1['skipped']}")
        checks = c1.get("check", {})
        benches = c1.get("bench", {})
        labels = list(benches)
        L += ["| model | export/rewrite s | check | " + " | ".join(f"{l} ms | x" for l in labels) + " |",
              "|" + "---|" * (3 + 2 * len(labels))]
        steps = c1.get("prepare", {}).get("steps", {})
        names = c1.get("models", []) + [k.split(" ", 1)[1] for k, v in steps.items()
                                        if k.startswith("rewrite ") and v.get("rc") != 0]
        for name in names:
            rw = steps.get("export" if name == "fp16" else f"rewrite {name}", {})
            ck = checks.get(name, {})
            status = ck.get("status", ck.get("rc", "-"))
            nodes = ck.get("nodes")
            cells = [name, str(rw.get("seconds", "")) + ("" if rw.get("rc", 0) == 0 else f" (rc {rw.get('rc')})"),
                     f"{status} {nodes}" if nodes else str(status)]
            for l in labels:
                b = benches[l]
                row = next((m for m in b.get("models", []) if Path(m["path"]).name.endswith(f".{name}.onnx")), None)
                cells += [f"{row['prefill_ms']['median']:.2f}" if row else "-", f"{row['speedup']['prefill']:.2f}" if row else "-"]
            L.append("| " + " | ".join(cells) + " |")
    if data["skipped"]:
        counts: dict[str, int] = {}
        for item in data["skipped"]:
            counts[item.split()[0]] = counts.get(item.split()[0], 0) + 1
        L.append("\nSkipped for the time budget (details in the JSON): " + ", ".join(f"{k}: {n}" for k, n in counts.items()))
    return "\n".join(L)


# -- main -------------------------------------------------------------------------------------------------


def device_name(ep: str) -> str:
    if ep == "cuda":
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            return "cuda (nvidia-smi unavailable)"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="folder for gpu_bench.json and gpu_bench.md")
    ap.add_argument("--ep", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (to test every path on a CPU)")
    ap.add_argument("--sections", default="a,b,c2,c1", help="comma-separated subset of a,b,c2,c1 (default all, in this order)")
    ap.add_argument("--budget", type=float, default=500.0, help="seconds for the whole run (default 500)")
    ap.add_argument("--repeats", type=int, help="timed runs per kernel measurement (default 30; 3 with --tiny)")
    ap.add_argument("--c1-layers", type=int, help="layers of the onnxqf end-to-end model (default 2)")
    ap.add_argument("--c2-layers", type=int, help="layers of the hand-built decoder (default 4)")
    ap.add_argument("--c1-prepare", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = tiny_config() if args.tiny else Config()
    if args.repeats:
        cfg.repeats = args.repeats
    if args.c1_layers:
        cfg.c1_layers = args.c1_layers
    if args.c2_layers:
        cfg.c2_layers = args.c2_layers
    if args.c1_prepare:  # internal: c1's export and rewrites, in the background
        c1_prepare(Path(args.c1_prepare), cfg)
        return 0
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [x for x in sections if x not in ("a", "b", "c2", "c1")]
    if unknown:
        ap.error(f"unknown sections {unknown}: use a subset of a,b,c2,c1")
    budget = Budget(args.budget)
    import onnxruntime as ort

    if args.ep == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"CUDAExecutionProvider is not available in onnxruntime {ort.__version__} ({ort.__file__}); "
              "source .ortgpu/activate.sh first", flush=True)
        return 3
    meta = {"device": device_name(args.ep), "ep": args.ep, "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
            "onnx": onnx.__version__, "numpy": np.__version__, "python": platform.python_version(), "tiny": args.tiny,
            "config": asdict(cfg), "sections": sections, "budget_s": args.budget}
    res = Results(out, meta)
    log(f"onnxruntime {ort.__version__} on {meta['device']}; sections {sections}; budget {args.budget:.0f}s")
    work_c1 = Path(tempfile.mkdtemp(prefix="onnxqf-gpu-bench-c1-", dir=_scratch(24e9)))
    work_c2 = Path(tempfile.mkdtemp(prefix="onnxqf-gpu-bench-c2-", dir=_scratch(8e9)))
    proc = c1_start(cfg, work_c1, args) if "c1" in sections else None
    Background.proc = proc
    tail_c1 = 150 if "c1" in sections else 0
    try:
        run = Runner(args.ep, cfg.repeats, cfg.warmup)
        pools = None
        if any(x in sections for x in ("a", "c2")):
            biggest = max(K * N for K, N in cfg.linears)  # larger tensors (embedding, lm_head) repeat the pool
            pools = Pools(biggest + 64 * 7919)
            log(f"random weight pools ready ({pools.size / 1e6:.0f}M values each)")
        for name in sections:
            try:
                if name == "a":
                    section_a(cfg, run, res, budget.limit(170 if len(sections) > 1 else budget.left()), pools, work_c2)
                elif name == "b":
                    section_b(cfg, run, res, budget.limit(60 if len(sections) > 1 else budget.left()))
                elif name == "c2":
                    section_c2(cfg, run, res, budget.limit(budget.left() - tail_c1), pools, work_c2)
                elif name == "c1":
                    section_c1(cfg, run, res, budget, work_c1, proc)
            except Exception as exc:
                res.add("errors", {"section": name, "error": _short(exc), "traceback": traceback.format_exc(limit=6)})
                log(f"section {name} failed: {traceback.format_exc(limit=6)}")
    finally:
        c1_stop(proc)
        shutil.rmtree(work_c1, ignore_errors=True)
        shutil.rmtree(work_c2, ignore_errors=True)
        text = summary(cfg, res.data)
        res.save()
        (out / "gpu_bench.md").write_text(text + "\n")
        print("\n" + text, flush=True)
        if res.data["skipped"]:
            left = sorted({x.split()[0] for x in res.data["skipped"]}, key="a b c2 c1".split().index)
            print(f"\nNot all fitted in the budget; the rest: python scripts/gpu_bench.py --out $OUT --sections {','.join(left)}",
                  flush=True)
        log("done")
    return 0


def _scratch(need_bytes: float) -> str | None:
    """/dev/shm (memory) when it has room, else the default temporary folder."""
    try:
        if shutil.disk_usage("/dev/shm").free > need_bytes:
            return "/dev/shm"
    except OSError:
        pass
    return None

if __name__ == "__main__":
    sys.exit(main())
