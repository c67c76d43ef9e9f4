"""ONNX Runtime's CUTLASS weight-only kernels for MatMulNBits (TensorRT-LLM's fpA_intB, switched on by the
environment variable ORT_FPA_INTB_GEMM=1) against its default MatMulNBits kernels and FP16, per linear at
Llama-2-7B shapes; and a probe of the FP8 GEMM contrib op (GemmFloat8) as a future W8A8 path (issue 9).

    source .ortgpu/activate.sh && python scripts/fpa_intb_bench.py --out $OUT

For each K -> N of (4096 -> 11008, 11008 -> 4096, 4096 -> 4096) and each variant, one graph of
``--copies`` independent linears reading one input is timed at M = 1, 16, 2048 with IOBinding (median of
``--repeats``), twice for the MatMulNBits variants: in a session made without the variable and in one
made with it (ONNX Runtime reads it when it builds the kernel). Both sessions' outputs on the same input
are compared (max |difference| / max |first|): the fast kernel must compute the same product. Results go
to OUT/fpa_intb_bench.json as they come; a markdown table is printed at the end. ``--ep cpu --tiny`` runs
every path at tiny shapes on the CPU (the variable does nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import F16, G, MS, Pools, Runner, _short, log, nbits_weights  # noqa: E402  (puts the source tree on sys.path)

from onnxqf.runtime.session import nbits_kernel_env  # noqa: E402

FP8 = 17  # TensorProto.FLOAT8E4M3FN

# variant -> (bits, block, asymmetric) for MatMulNBits; None for the float / fp8 variants
VARIANTS = {
    "fp16": None,
    "int4-b32": (4, 32, False),
    "int4-b64": (4, 64, False),
    "int4-b128": (4, 128, False),
    "int4-b32-zp": (4, 32, True),
    "int8w-b32": (8, 32, False),
    "fp8-gemm": None,
    "fp8-gemm-tb": None,
}


def graph(variant: str, K: int, N: int, copies: int, pools: Pools):
    g = G()
    x = g.input("x", F16, ["M", K])
    spec = VARIANTS[variant]
    for i in range(copies):
        if variant == "fp16":
            y = g.op("MatMul", [x, g.init(pools.take(pools.f16, (K, N)))])
        elif variant.startswith("fp8-gemm"):
            # the cheapest FP8 W8A8 lowering: Cast the activations, one cuBLASLt FP8 GEMM with unit scales
            # (a real one would scale per token before the Cast and rescale after); -tb: B stored [N, K]
            import onnx

            tb = variant.endswith("-tb")
            shape = (N, K) if tb else (K, N)
            w8 = (pools.take(pools.f16, shape).astype(np.float32) * 10).astype(np.float16)
            name = g._name("w8")
            g.inits.append(onnx.helper.make_tensor(name, FP8, list(shape), _to_fp8_bytes(w8), raw=True))
            a8 = g.op("Cast", [x], to=FP8)
            one = g.init(np.array([1.0], np.float32), "one")
            y = g.op("GemmFloat8", [a8, name, "", one, one], domain=MS, dtype=F16, transA=0, transB=int(tb))
        else:
            bits, block, asym = spec
            inputs = [x, *nbits_weights(g, pools, K, N, bits, block)]
            if asym:
                per = (-(-K // block) * bits + 7) // 8
                inputs.append(g.init(pools.take(pools.u8, (N * per,)), "zp"))
            y = g.op("MatMulNBits", inputs, domain=MS, K=K, N=N, bits=bits, block_size=block, accuracy_level=0)
        g.output(y, F16, ["M", N], f"y{i}")
    return g.model(19 if variant.startswith("fp8") else 18)


def _to_fp8_bytes(a: np.ndarray) -> bytes:
    """float16 -> float8 e4m3fn bytes (round to nearest even), with ml_dtypes (a dependency of onnx)."""
    from ml_dtypes import float8_e4m3fn

    return np.asarray(a, np.float32).astype(float8_e4m3fn).view(np.uint8).tobytes()


def outputs(sess, x: np.ndarray) -> np.ndarray:
    return np.stack(sess.run(None, {"x": x})).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ep", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--fpa-first", action="store_true", help="make the fpA_intB session first (shows whether the "
                    "variable is read per session or once per process)")
    args = ap.parse_args()
    t_end = time.perf_counter() + args.budget
    linears = ((64, 192), (192, 64), (64, 64)) if args.tiny else ((4096, 11008), (11008, 4096), (4096, 4096))
    ms = (1, 4, 32) if args.tiny else (1, 16, 2048)
    copies = 2 if args.tiny else args.copies
    run = Runner(args.ep, 3 if args.tiny else args.repeats, 1 if args.tiny else args.warmup)
    pools = Pools(1 << 22 if args.tiny else 1 << 26)
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"meta": {"onnxruntime": run.ort.__version__, "ep": args.ep, "copies": copies}, "rows": [], "errors": []}

    def save():
        tmp = args.out / "fpa_intb_bench.json.partial"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.out / "fpa_intb_bench.json")

    rng = np.random.default_rng(0)
    for K, N in linears:
        for variant in args.variants.split(","):
            if time.perf_counter() > t_end - 20:
                res["errors"].append(f"{variant} {K}->{N}: out of time")
                continue
            model = graph(variant, K, N, copies, pools)
            kernels = ["default", "fpa_intb"] if VARIANTS[variant] is not None else ["default"]
            if args.fpa_first:
                kernels.reverse()
            check_x = (rng.standard_normal((16, K), dtype=np.float32)).astype(np.float16)
            ref_out = None
            for kernel in kernels:
                t = time.perf_counter()
                row = {"variant": variant, "K": K, "N": N, "kernel": kernel, "ms_per_linear": {}}
                with nbits_kernel_env(kernel == "fpa_intb"):
                    try:
                        sess, placement = run.load(model)
                    except Exception as exc:
                        sess, placement = None, {"error": _short(exc)}
                    row.update(placement)
                    if sess is not None and placement.get("on_provider"):
                        try:
                            out = outputs(sess, check_x)
                            row["finite"] = bool(np.isfinite(out).all())
                            if ref_out is None:
                                ref_out = out
                            else:
                                row["max_rel_diff_vs_first"] = float(np.abs(out - ref_out).max() / max(1e-6, np.abs(ref_out).max()))
                            for M in ms:
                                x = (rng.standard_normal((M, K), dtype=np.float32)).astype(np.float16)
                                row["ms_per_linear"][str(M)] = run.time(sess, {"x": x}, scale=copies)
                        except Exception as exc:
                            row["error"] = _short(exc)
                    sess = None
                res["rows"].append(row)
                save()
                cells = " ".join(f"M={m}:{row['ms_per_linear'].get(str(m), {}).get('median', float('nan')):.4f}" for m in ms)
                log(f"{K}->{N} {variant:12s} {kernel:8s} {cells} diff={row.get('max_rel_diff_vs_first', '-')} "
                    f"{row.get('error') or row.get('strict_error') or ''} ({time.perf_counter() - t:.1f}s)")
    print_table(res, ms)
    return 0


def print_table(res: dict, ms) -> None:
    fp16 = {(r["K"], r["N"]): r for r in res["rows"] if r["variant"] == "fp16"}
    print("\n| K -> N | variant | kernel | " + " | ".join(f"M = {m} ms (x FP16)" for m in ms) + " | rel. diff vs the other kernel |")
    print("|---|---|---|" + "---|" * len(ms) + "---|")
    for r in res["rows"]:
        cells = []
        for m in ms:
            s = r["ms_per_linear"].get(str(m))
            f = fp16.get((r["K"], r["N"]), {}).get("ms_per_linear", {}).get(str(m))
            if not s or "median" not in s:
                cells.append("error" if (r.get("error") or r.get("strict_error")) else "-")
                continue
            cells.append(f"{s['median']:.4f}" + (f" ({s['median'] / f['median']:.2f}x)" if f and "median" in f else ""))
        diff = r.get("max_rel_diff_vs_first")
        print(f"| {r['K']} -> {r['N']} | {r['variant']} | {r['kernel']} | " + " | ".join(cells) +
              f" | {'' if diff is None else f'{diff:.2e}'} |")
    errors = {(r["variant"], r["kernel"]): r.get("error") or r.get("strict_error") for r in res["rows"]
              if r.get("error") or r.get("strict_error")}
    for (variant, kernel), msg in errors.items():
        print(f"- {variant} ({kernel}): {msg}")


if __name__ == "__main__":
    sys.exit(main())
