"""One linear through onnxqf's CUDA kernels against FP16 and ONNX Runtime's MatMulInteger, per shape and token count.

Each graph holds 8 copies of one linear (8 weight sets, one shared fp16 input, 8 outputs), so that ONNX Runtime's
per-run overhead is shared and the weights do not sit in L2; time per linear = run time / 8. Variants:

    fp16        MatMul(x, W[K, N] fp16)
    onnxqf      onnxqf.W8A8Linear(x, Wq[N, K] int8, wscale[N]) (quantization of x included, in each copy)
    onnxqf-gemm the same with ONNXQF_GEMV_MAX_M=0: the tensor-core GEMM also at M <= 4 (rows M <= 16 only)
    onnxqf-gemv the same with ONNXQF_GEMV_MAX_M=16: quantization kernel + GEMV at 4 < M <= 16 (rows M = 16 only)
    onnxqf-tile0/2 the same with ONNXQF_GEMM_TILE=0 (128x128) / 2 (128x256 cooperative) (rows M >= 128 only)
    int8-token  onnxqf's standard-op graph (int8-token lowering): Abs, ReduceMax, Max, Div, Mul, Round, Cast,
                MatMulInteger(int8 x int8 [K, N]), Cast, Mul, Mul, Cast -- quantization in each copy

Timing: IOBinding, input and outputs on the GPU, a warm-up, then the median of N runs (perf_counter around each
run; ONNX Runtime synchronizes its stream at the end of a run). Outputs are checked: onnxqf against int8-token
(bit-exact expected: the same integer products and the same fp32 rescale) and against fp16 (relative error).

    python scripts/kernel_bench.py [--shapes 4096x11008,11008x4096,4096x4096] [--tokens 1,16,128,2048] [--json OUT]

Needs onnxruntime-gpu, a GPU the library is built for (sm_90a) and the built library (kernels/build.sh).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxqf.runtime import kernels

COPIES = 8
#: extra variants of the onnxqf op: (environment at session creation, token counts timed)
VARIANTS = {
    "onnxqf-gemm": ({"ONNXQF_GEMV_MAX_M": "0"}, lambda M: M <= 16),
    "onnxqf-gemv": ({"ONNXQF_GEMV_MAX_M": "16"}, lambda M: M == 16),
    "onnxqf-tile0": ({"ONNXQF_GEMM_TILE": "0"}, lambda M: M == 128),
    "onnxqf-tile2": ({"ONNXQF_GEMM_TILE": "2"}, lambda M: M >= 128),
}
F16, I8, F32 = TensorProto.FLOAT16, TensorProto.INT8, TensorProto.FLOAT


def weights(K: int, N: int, seed: int):
    """8 copies of (int8 weights [N, K], fp32 per-channel scale / 127): the weight is q * wscale * 127."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(COPIES):
        q = rng.integers(-127, 128, size=(N, K), dtype=np.int8)
        wscale = (rng.uniform(0.5, 1.5, size=N) * 0.02 / np.sqrt(K) / 127).astype(np.float32)
        out.append((q, wscale))
    return out


def graph_fp16(K, N, ws):
    nodes, inits, outs = [], [], []
    for i, (q, scale) in enumerate(ws):
        w = (q.T.astype(np.float32) * (scale[None, :] * 127)).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", F16, ["M", N]))
    return _model(nodes, inits, K, outs)


def graph_onnxqf(K, N, ws):
    nodes, inits, outs = [], [], []
    for i, (q, scale) in enumerate(ws):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(q), f"wq{i}"))
        inits.append(numpy_helper.from_array(scale, f"ws{i}"))
        nodes.append(helper.make_node(kernels.W8A8_LINEAR, ["x", f"wq{i}", f"ws{i}"], [f"y{i}"], domain=kernels.DOMAIN))
        outs.append(helper.make_tensor_value_info(f"y{i}", F16, ["M", N]))
    return _model(nodes, inits, K, outs, extra_opsets=[helper.make_opsetid(kernels.DOMAIN, 1)])


def graph_int8_token(K, N, ws):
    """onnxqf's int8-token lowering (onnxqf/lowering/w8a8.py), written out: quantization in each copy."""
    nodes, outs = [], []
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-4, np.float16), "tiny"),
             numpy_helper.from_array(np.array(127.0, np.float16), "qmax")]
    for i, (q, scale) in enumerate(ws):
        p = f"c{i}_"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(q.T), f"wq{i}"))
        inits.append(numpy_helper.from_array(scale, f"ws{i}"))
        nodes += [
            helper.make_node("Abs", ["x"], [p + "abs"]),
            helper.make_node("ReduceMax", [p + "abs", "axes"], [p + "amax0"], keepdims=1),
            helper.make_node("Max", [p + "amax0", "tiny"], [p + "amax"]),
            helper.make_node("Div", ["qmax", p + "amax"], [p + "inv"]),
            helper.make_node("Mul", ["x", p + "inv"], [p + "scaled"]),
            helper.make_node("Round", [p + "scaled"], [p + "round"]),
            helper.make_node("Cast", [p + "round"], [p + "xq"], to=I8),
            helper.make_node("Cast", [p + "amax"], [p + "amax32"], to=F32),
            helper.make_node("MatMulInteger", [p + "xq", f"wq{i}"], [p + "acc"]),
            helper.make_node("Cast", [p + "acc"], [p + "accf"], to=F32),
            helper.make_node("Mul", [p + "accf", p + "amax32"], [p + "t"]),
            helper.make_node("Mul", [p + "t", f"ws{i}"], [p + "y32"]),
            helper.make_node("Cast", [p + "y32"], [f"y{i}"], to=F16),
        ]
        outs.append(helper.make_tensor_value_info(f"y{i}", F16, ["M", N]))
    return _model(nodes, inits, K, outs)


def _model(nodes, inits, K, outs, extra_opsets=()):
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", F16, ["M", K])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), *extra_opsets])
    m.ir_version = 9
    return m


class Runner:
    def __init__(self, ort, model: onnx.ModelProto, custom: bool, env: dict | None = None):
        self.ort = ort
        so = ort.SessionOptions()
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if custom:
            kernels.register(so)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def bind(self, x: np.ndarray, N: int):
        b = self.sess.io_binding()
        xv = self.ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        b.bind_ortvalue_input("x", xv)
        ys = []
        for name in self.outputs:
            y = self.ort.OrtValue.ortvalue_from_numpy(np.full((x.shape[0], N), np.nan, np.float16), "cuda", 0)
            b.bind_ortvalue_output(name, y)
            ys.append(y)
        return b, (xv, ys)

    def time(self, x, N, warmup: int, iters: int):
        b, keep = self.bind(x, N)
        for _ in range(warmup):
            self.sess.run_with_iobinding(b)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.sess.run_with_iobinding(b)
            times.append(time.perf_counter() - t0)
        outs = [y.numpy() for y in keep[1]]
        return statistics.median(times) / COPIES * 1e3, outs


def activations(M, K, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    cols = rng.choice(K, size=max(1, K // 256), replace=False)  # a few outlier channels, as in LLM activations
    x[:, cols] *= 20
    return x.astype(np.float16)


def compare(a, b):
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    return {"max_abs_diff": float(np.max(np.abs(a32 - b32))), "mismatches": int(np.sum(a != b)),
            "rel_err": float(np.linalg.norm(a32 - b32) / max(np.linalg.norm(b32), 1e-30)),
            "nan": int(np.isnan(a32).sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x11008,11008x4096,4096x4096")
    ap.add_argument("--tokens", default="1,16,128,2048")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default="", help=f"extra onnxqf variants, comma-separated: {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}; library {kernels.library_path()} ({kernels.check_device()})", flush=True)
    results = []
    tokens = [int(t) for t in args.tokens.split(",")]
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        ws = weights(K, N, seed=K * 7 + N)
        runners = {
            "fp16": Runner(ort, graph_fp16(K, N, ws), False),
            "onnxqf": Runner(ort, graph_onnxqf(K, N, ws), True),
            "int8-token": Runner(ort, graph_int8_token(K, N, ws), False),
        }
        for name in args.variants.split(",") if args.variants else []:
            runners[name] = Runner(ort, graph_onnxqf(K, N, ws), True, VARIANTS[name][0])
        for M in tokens:
            x = activations(M, K, seed=M + K)
            iters = args.iters if M < 2048 else max(20, args.iters // 2)
            row = {"K": K, "N": N, "M": M, "ms": {}, "check": {}}
            outs = {}
            for name, r in runners.items():
                if name in VARIANTS and not VARIANTS[name][1](M):
                    continue
                row["ms"][name], outs[name] = r.time(x, N, args.warmup, iters)
            for name in ("onnxqf", *VARIANTS):
                if name in outs:
                    row["check"][f"{name}_vs_int8-token"] = compare(outs[name][0], outs["int8-token"][0])
                    row["check"][f"{name}_vs_fp16"] = compare(outs[name][0], outs["fp16"][0])
                    # every copy written (outputs were poisoned with NaN)
                    row["check"][f"{name}_nan_any_copy"] = int(sum(np.isnan(o.astype(np.float32)).sum()
                                                                   for o in outs[name]))
            row["speedup_vs_fp16"] = {k: row["ms"]["fp16"] / v for k, v in row["ms"].items() if k != "fp16"}
            results.append(row)
            ex = row["check"]["onnxqf_vs_int8-token"]
            print(f"{K}->{N} M={M}: " + ", ".join(f"{k} {v*1e3:.1f} us" for k, v in row["ms"].items())
                  + f" | onnxqf vs int8-token: {ex['mismatches']} mismatches (max {ex['max_abs_diff']:.3g}),"
                  f" vs fp16 rel {row['check']['onnxqf_vs_fp16']['rel_err']:.2e}", flush=True)
        del runners

    extra = [v for v in VARIANTS if any(v in r["ms"] for r in results)]
    print("\n| K → N | M | FP16 µs | onnxqf µs | × FP16 | int8-token (MatMulInteger) × | exact vs int8-token |"
          + "".join(f" {v} × |" for v in extra))
    print("|---|---|---|---|---|---|---|" + "---|" * len(extra))
    for r in results:
        s = r["speedup_vs_fp16"]
        ex = r["check"]["onnxqf_vs_int8-token"]
        print(f"| {r['K']}→{r['N']} | {r['M']} | {r['ms']['fp16']*1e3:.1f} | {r['ms']['onnxqf']*1e3:.1f} | "
              f"**{s['onnxqf']:.2f}×** | {s['int8-token']:.2f}× | "
              f"{'yes' if ex['mismatches'] == 0 else ex['mismatches']} |"
              + "".join(f" {s[v]:.2f}× |" if v in s else " — |" for v in extra))
    doc = {"date": datetime.date.today().isoformat(), "onnxruntime": ort.__version__, "copies_per_graph": COPIES,
           "device": _device_name(),
           "command": " ".join(["python", "scripts/kernel_bench.py", *(argv or sys.argv[1:])]),
           "results": results}
    path = args.json or (os.path.join(os.environ["OUT"], "kernel_bench.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(doc, indent=1))
        print(f"wrote {path}")
    return 0


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the name is decoration
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
